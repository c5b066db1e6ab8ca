"""Offline vs on-policy vs a 50/50 mix, from one student, with the default teacher (docs/onpolicy.md).

Every variant continues the same start student (by default the `from_teacher = 6` student of
data/configs/student_from_teacher.toml, trained first if it is missing) for the same number of
optimiser steps with the same loss (0.5 forward KL + 0.5 reverse KL, both with the tail bucket):

  (a) offline   `distill student` on the offline cache, rounds x steps steps
  (b) onpolicy  `distill onpolicy`: rounds of (the student samples completions for training prompts,
                the teacher scores them, steps steps on the rounds' caches)
  (c) mix       the same rounds, each training on the offline cache and the rounds' caches, 50/50
  (d) onpolicy-exact (--variants onpolicy-exact): (b) with the rounds scored with capture.final_hidden and
                the same loss computed exactly over the whole vocabulary (kd_full_forward + kd_full_reverse)

Measured for each final student, per seed (the seed of the sampling and of the data order):
  held-out teacher NLL  the student samples completions for held-out prompts (temperature 1, one
                        fixed seed), the teacher scores them: its NLL per completion token (how likely
                        the teacher finds what the student writes; lower is better)
  validation NLL        the student's NLL per token on the offline cache's validation split

    python benchmarks/bench_onpolicy.py [--seeds 0 1 2] [--rounds 3] [--steps 20]

Prints a table, writes the figures as JSON and a plot (--plot, docs/img/onpolicy.png by default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEACHER = ROOT / "data/teachers/SmolLM2-135M-Instruct"
CACHE = ROOT / "data/caches/smollm2-stdlib"
START = ROOT / "data/students/from-teacher/smollm2-5of30/model"
LOSSES = {"kd_forward": 0.5, "kd_reverse": 0.5}
EXACT = {"kd_full_forward": 0.5, "kd_full_reverse": 0.5}  # the same mix over the whole vocabulary (final_hidden)
FOLDERS = {"offline": "a", "onpolicy": "b", "mix": "c", "onpolicy-exact": "d"}


def validation_nll(model_dir: Path, cache: Path, batch: int = 8) -> float:
    """NLL per token of a saved model on the cache's validation rows (every real position but the last)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.format import Cache
    from pipeline.format.layout import row_column

    c = Cache(str(cache))
    t = c.rows("validation", ["input_ids", "length"])
    ids, lengths = row_column(t, "input_ids", np.int64), t.column("length").to_numpy()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.inference_mode():
        for a in range(0, len(ids), batch):
            x = torch.as_tensor(ids[a:a + batch])
            ln = torch.as_tensor(lengths[a:a + batch])
            mask = torch.arange(x.shape[1])[None] < ln[:, None]
            logits = model(input_ids=x, attention_mask=mask.long()).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
            keep = torch.arange(x.shape[1] - 1)[None] < (ln[:, None] - 1)
            total += float(nll[keep].sum())
            n += int(keep.sum())
    return total / n


def tail_share(cache: Path) -> dict:
    """Where a round's sampled tokens fall in the teacher's distribution: the share of completion tokens inside the
    teacher's cached top-K, and the share of the teacher's NLL of the completions that the others carry."""
    import numpy as np

    from pipeline.format import Cache
    from pipeline.format.layout import row_column

    c = Cache(str(cache))
    t = c.rows("train", ["input_ids", "loss_mask"])
    ids, mask = row_column(t, "input_ids", np.int64), row_column(t, "loss_mask", bool)
    nxt = np.concatenate([ids[:, 1:], np.zeros((len(ids), 1), np.int64)], 1)  # the token each position predicts
    inside = (np.asarray(c.array("train", "topk_ids")[:]) == nxt[..., None]).any(-1)[mask]
    nll = -np.asarray(c.array("train", "target_logprob")[:], np.float64)[mask]
    return {"inside_top_k": float(inside.mean()), "nll_share_outside": float(nll[~inside].sum() / nll.sum()),
            "nll_inside": float(nll[inside].mean()), "nll_outside": float(nll[~inside].mean())}


def tails(root: Path) -> None:
    """--tails DIR: tail_share of every round cache under DIR (a variant's folders b-0, c-1, ...)."""
    for cache in sorted(root.glob("*-*/caches/round-*")):
        f = tail_share(cache)
        print(f"{cache.relative_to(root)}: {f['inside_top_k']:.1%} of sampled tokens in the teacher's top-K; "
              f"teacher NLL {f['nll_inside']:.2f} inside, {f['nll_outside']:.2f} outside "
              f"({f['nll_share_outside']:.0%} of it from outside)")


def ensure_start(start: Path) -> None:
    if (start / "model.safetensors").is_file():
        return
    print(f"{start} is missing: training the from-teacher student first (make student STUDENT_CONFIG=...)",
          file=sys.stderr)
    subprocess.run([str(Path(sys.executable).with_name("distill")), "student", "-c",
                    str(ROOT / "data/configs/student_from_teacher.toml")], check=True, cwd=ROOT)


def onpolicy_settings(args, out: Path, seed: int, mix: bool, exact: bool = False):
    from pipeline.onpolicy.settings import OnPolicyConfig

    prompts = {"source": "text", "data_files": ["{stdlib}/email/*.py"], "sample_by": "paragraph", "seq_len": 96,
               "shuffle_seed": 0, "max_documents": args.prompts}
    held_out = {"source": "text", "data_files": ["{stdlib}/http/*.py", "{stdlib}/json/*.py"],
                "sample_by": "paragraph", "seq_len": 96, "shuffle_seed": 1, "max_documents": args.eval_prompts}
    return OnPolicyConfig.model_validate({
        "dir": str(out), "rounds": args.rounds, "start": str(args.start), "teacher": {"model": str(TEACHER)},
        "prompts": prompts, "eval_prompts": held_out,
        "sampling": {"max_new_tokens": args.new_tokens, "prompt_tokens": 32, "batch_size": 16, "rows_per_part": 64,
                     "long_prompts": "skip", "seed": seed},
        "offline": [{"name": "offline", "cache": str(CACHE), "weight": 1.0}] if mix else [],
        "capture": None if mix else {"top_k": 64, "temperatures": [2.0], "final_hidden": exact},  # as the offline cache
        "onpolicy_weight": 1.0,
        "student": {"losses": EXACT if exact else LOSSES, "lr": args.lr, "warmup_steps": 5},
        "train": {"batch_size": 4, "max_steps": args.steps, "eval_every": args.steps, "log_every": 5,
                  "device": "cpu", "seed": seed},
    })


def offline_run(args, out: Path, seed: int):
    from pipeline.student_config import StudentRunConfig

    steps = args.rounds * args.steps
    return StudentRunConfig.model_validate({
        "cache": str(CACHE), "output_dir": str(out), "batch_size": 4, "max_steps": steps, "eval_every": steps,
        "log_every": 5, "device": "cpu", "seed": seed,
        "students": [{"name": "student", "pretrained": str(args.start), "losses": LOSSES, "lr": args.lr,
                      "warmup_steps": 5}]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="student steps per round (offline: rounds x steps)")
    ap.add_argument("--prompts", type=int, default=48, help="training prompts (paragraphs of the email package)")
    ap.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts (http and json packages)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--start", type=Path, default=START)
    ap.add_argument("--out", type=Path, default=ROOT / "data/bench/onpolicy")
    ap.add_argument("--json", type=Path, default=None, help="default: OUT/figures.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/img/onpolicy.png")
    ap.add_argument("--variants", nargs="+", default=["offline", "onpolicy", "mix"], choices=list(FOLDERS))
    ap.add_argument("--merge", type=Path, nargs="*", default=[], help="earlier figures JSON files whose runs join "
                                                                      "the table and the plot")
    ap.add_argument("--tails", type=Path, default=None, help="only print, for every round cache under this folder "
                                                             "(an --out of an earlier run), where the sampled "
                                                             "tokens fall in the teacher's top-K")
    args = ap.parse_args()
    if args.tails is not None:
        return tails(args.tails)
    ensure_start(args.start)

    from pipeline.onpolicy.loop import Loop, check_before_work, run_onpolicy
    from pipeline.train.recipe import train_students

    quiet = lambda m: None  # noqa: E731
    figures: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": []}

    def held_out(loop: Loop, model: Path, tag: str) -> dict:
        return loop.evaluate(str(model), args.out / "eval" / tag / "samples", args.out / "eval" / tag / "cache")

    for seed in args.seeds:
        ref = Loop(onpolicy_settings(args, args.out / f"b-{seed}", seed, mix=False), quiet, progress=False)
        ref.capture = check_before_work(ref.cfg, quiet)  # the scoring settings, as the loop takes them
        if seed == args.seeds[0]:
            t0 = time.perf_counter()
            ev = held_out(ref, args.start, "start")
            figures["start"] = {"held_out": ev, "validation_nll": validation_nll(args.start, CACHE),
                                "eval_seconds": time.perf_counter() - t0}
            print(f"start: held-out teacher NLL {ev['teacher_nll']:.4f}, validation NLL "
                  f"{figures['start']['validation_nll']:.4f}", flush=True)
        for variant in args.variants:
            out = args.out / f"{FOLDERS[variant]}-{seed}"
            if variant == "offline":  # (a) `distill student` on the offline cache alone
                t0 = time.perf_counter()
                train_students(offline_run(args, out, seed), log=quiet, progress=False)
                model = out / "student" / "model"
                rec = {"variant": variant, "seed": seed, "train_seconds": time.perf_counter() - t0}
            else:  # (b), (c), (d): rounds of `distill onpolicy`
                cfg = onpolicy_settings(args, out, seed, mix=variant == "mix", exact=variant == "onpolicy-exact")
                report = run_onpolicy(cfg, log=quiet, progress=False)
                last = report["rounds"][str(args.rounds)]
                model = Path(last["model"])
                rec = {"variant": variant, "seed": seed, "rounds": {
                    r: {"seconds": e["seconds"], "samples_teacher_nll": e["samples_teacher_nll"]["teacher_nll"],
                        "held_out_teacher_nll": e["eval"]["teacher_nll"],
                        "completion_tokens": e["samples_statistics"]["completion_tokens"],
                        "identical_samples": e.get("identical_samples")}
                    for r, e in report["rounds"].items()}}
            rec |= {"held_out": held_out(ref, model, f"{FOLDERS[variant]}-{seed}") if variant == "offline"
                    else last["eval"], "validation_nll": validation_nll(model, CACHE)}
            figures["runs"].append(rec)
            print(json.dumps(rec), flush=True)
    out_json = args.json or args.out / "figures.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(figures, indent=2) + "\n")
    for f in args.merge:
        figures["runs"] += json.loads(f.read_text())["runs"]
    table(figures)
    if args.plot:
        plot(figures, args.plot)


def table(figures: dict) -> None:
    import numpy as np

    print("\n| variant | held-out teacher NLL (mean ± sd) | validation NLL (mean ± sd) | "
          "per seed (held-out / validation) |")
    print("|---|---|---|---|")
    s = figures.get("start")
    if s:
        print(f"| start | {s['held_out']['teacher_nll']:.3f} | {s['validation_nll']:.3f} | – |")
    for v in FOLDERS:
        runs = [r for r in figures["runs"] if r["variant"] == v]
        if not runs:
            continue
        h = np.array([r["held_out"]["teacher_nll"] for r in runs])
        n = np.array([r["validation_nll"] for r in runs])
        per = ", ".join(f"{a:.3f} / {b:.3f}" for a, b in zip(h, n))
        print(f"| {v} | {h.mean():.3f} ± {h.std(ddof=1) if len(h) > 1 else 0:.3f} | "
              f"{n.mean():.3f} ± {n.std(ddof=1) if len(n) > 1 else 0:.3f} | {per} |")
    rounds = [x for r in figures["runs"] for x in r.get("rounds", {}).values()]
    if rounds:
        for k in ("generate", "score", "train", "evaluate"):
            vals = [x["seconds"][k] for x in rounds if k in x["seconds"]]
            print(f"round {k}: median {np.median(vals):.1f} s (min {min(vals):.1f}, max {max(vals):.1f})")


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    names = [v for v in FOLDERS if any(r["variant"] == v for r in figures["runs"])]
    for i, key in enumerate(("held_out", "validation_nll")):
        for j, v in enumerate(names):
            ys = [r[key]["teacher_nll"] if key == "held_out" else r[key] for r in figures["runs"] if r["variant"] == v]
            ax[i].scatter([j] * len(ys), ys, label=None)
            if ys:
                ax[i].hlines(sum(ys) / len(ys), j - 0.2, j + 0.2)
        s = figures.get("start")
        if s:
            ax[i].axhline(s["held_out"]["teacher_nll"] if key == "held_out" else s["validation_nll"], ls="--",
                          color="grey", label="start")
            ax[i].legend()
        ax[i].set_xticks(range(len(names)), names)
    ax[0].set_title("teacher NLL of the student's completions\n(held-out prompts; lower is better)")
    ax[1].set_title("student NLL on the offline validation split\n(lower is better)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
