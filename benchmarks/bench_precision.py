"""Figures: does a student trained on bounded-error log-probs (`capture.logprob_precision`) differ from one trained
on the exact cache by more than the seed noise?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_precision.py [--precision 0.005] [--seeds 3] [--steps 240]

1. The default cache (make teacher-cache), and the same config captured again with `capture.logprob_precision`
   into data/caches/smollm2-stdlib-p<precision> (kept; captured once). Printed per cache: the top-K log-probs'
   bytes per token and the manifest's KL(exact || stored) per position.
2. On each cache, the default student (data/configs/student.toml: its arch, losses, lr, batch size, data order)
   for --steps steps with weight seeds 0 .. --seeds-1, no early stopping, then its validation NLL and top-1
   agreement on the cache's validation split (the same tokens in both caches). Printed: each seed, the mean and
   standard deviation per cache, and the difference of the means against the seeds' spread.
Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bounded_cache(precision: float, log) -> Path:
    """The default capture config with `capture.logprob_precision`, captured once into data/caches."""
    from pipeline.capture.run import run_capture
    from pipeline.config import TeacherCacheConfig, load_config

    out = REPO / "data" / "caches" / f"smollm2-stdlib-p{precision:g}"
    if (out / "manifest.json").exists():
        return out
    cfg = load_config(TeacherCacheConfig, REPO / "data/configs/teacher_cache.toml",
                      [f"capture.logprob_precision={precision}", f"output.dir={out}"])
    t0 = time.perf_counter()
    run_capture(cfg, log=log, progress=False)
    log(f"captured {out} in {time.perf_counter() - t0:.0f}s")
    return out


def train(cache: Path, seeds: int, steps: int) -> list[dict]:
    """The default student on `cache`, once per weight seed, in one run (one read of the cache)."""
    from pipeline.config import load_config
    from pipeline.student_config import StudentRunConfig
    from pipeline.train.recipe import train_students

    cfg = load_config(StudentRunConfig, REPO / "data/configs/student.toml", [])
    spec = cfg.students[0].model_dump()
    with tempfile.TemporaryDirectory(dir=REPO / "data") as tmp:
        run = StudentRunConfig.model_validate({
            **cfg.model_dump(), "cache": str(cache), "output_dir": tmp, "max_steps": steps, "eval_every": steps,
            "patience": None, "num_workers": 0,
            "students": [{**spec, "name": f"seed{s}", "seed": s} for s in range(seeds)]})
        reports = {r["name"]: r["final"] for r in train_students(run, log=lambda m: None, progress=False)}
    return [reports[f"seed{s}"] for s in range(seeds)]


def main() -> None:
    from pipeline.format import Cache

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", type=float, default=0.005)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=240)
    args = ap.parse_args()
    print(f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_precision.py --precision {args.precision:g} "
          f"--seeds {args.seeds} --steps {args.steps}", flush=True)
    exact = REPO / "data" / "caches" / "smollm2-stdlib"
    caches = {"exact (float16)": exact,
              f"logprob_precision {args.precision:g}": bounded_cache(args.precision, lambda m: print(m, flush=True))}
    print("\n| cache | topk_logprobs B/token | KL(exact \\|\\| stored) mean / max | val NLL per seed | mean | sd | "
          "top-1 agreement (mean) |\n|---|---|---|---|---|---|---|")
    means = {}
    for label, path in caches.items():
        m = Cache(path).manifest
        kl = m.stats.logprob_kl
        t0 = time.perf_counter()
        finals = train(path, args.seeds, args.steps)
        nll = [f["nll"] for f in finals]
        means[label] = (statistics.mean(nll), statistics.stdev(nll) if len(nll) > 1 else 0.0)
        top1 = statistics.mean(f["top1_agreement"] for f in finals)
        kl_s = f"{kl['mean']:.2e} / {kl['max']:.2e}" if kl else "-"
        print(f"| {label} | {m.stats.bytes_per_token['topk_logprobs']:.1f} | {kl_s} | "
              f"{', '.join(f'{x:.4f}' for x in nll)} | {means[label][0]:.4f} | {means[label][1]:.4f} | {top1:.3f} |"
              f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    (a, sa), (b, sb) = means.values()
    print(f"\ndifference of the means {b - a:+.4f} nats; the seeds' standard deviations {sa:.4f} and {sb:.4f}")


if __name__ == "__main__":
    sys.exit(main())
