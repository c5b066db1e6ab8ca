"""What a student run leaves for people to read: the report of each student, its curves, and one-line
summaries of metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .students import Student
from .student_init import count_parameters


def student_report(st: Student, run, cfg, sources: dict, task: str, ranks: int, device: str,
                   extra: dict) -> dict:
    """report.json of one student: its size, where it stopped, its best and last evaluations, its settings and
    the caches it learned from; `extra`: cross-tokenizer statistics, the teacher's figures, test metrics."""
    return {"name": st.name, "parameters": count_parameters(st.model), "steps": run.step,
            "tokens_seen": run.tokens, "wall_seconds": run.seconds, "stopped_early": st.stopped,
            "best_step": st.best_step, "metric": cfg.early_stopping_metric, "final": st.best_eval,
            "last_eval": st.last_eval, "losses": st.spec.losses, "temperature": st.spec.temperature,
            "sources": {n: {"cache": str(c.root), "cache_digest": c.manifest.digest, "weight": w}
                        for n, (c, w) in sources.items()},
            "mutual_weight": cfg.mutual_weight, "device": device, "ranks": ranks,
            "init": getattr(st.model.config, "distill_init", None), "task": task} | extra


def write_report(st: Student, report: dict, tested: dict | None, log) -> None:
    """report.json (whole or absent), curves.png, and the student's best and test figures in the log."""
    tmp = st.out / "report.json.tmp"  # whole or absent: an on-policy loop takes a report as a finished run
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, st.out / "report.json")
    plot_curves(st.out / "metrics.jsonl", st.out / "curves.png", f"{st.name}: {st.spec.losses}")
    if st.best_eval:
        log(f"student {st.name}: best at step {st.best_step}: {describe(st.best_eval)} -> {st.out / 'model'}")
    if tested is not None:
        log(f"student {st.name}: test: {describe(tested)}")


def plot_curves(metrics_path: Path, out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    tr = [(r["step"], r["loss"]) for r in recs if r["split"] == "train"]
    va = [(r["step"], r["nll"]) for r in recs if r["split"] == "validation"
          and "source" not in r and "task" not in r]  # the weighted total only ("task": as earlier runs named it)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    if tr:
        ax[0].plot(*zip(*tr), label="train loss (weighted total)")
    if va:
        ax[1].plot(*zip(*va), marker="o", label="validation NLL")
    for a in ax:
        a.set_xlabel("step")
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def describe(m: dict) -> str:
    """A metrics record in one line."""
    if "accuracy" in m:
        return (f"accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}"
                + (f", entity F1 {m['entity_f1']:.4f}" if "entity_f1" in m else "")
                + f", agreement with the teacher {m['top1_agreement']:.3f}, KL {m['kl']:.4f}, NLL {m['nll']:.4f}, "
                  f"ECE {m['ece']:.4f}")
    return (f"NLL {m['nll']:.4f} (ppl {m['ppl']:.1f}), top-1 agreement {m['top1_agreement']:.3f}, KL {m['kl']:.4f}, "
            f"ECE {m['ece']:.4f}")
