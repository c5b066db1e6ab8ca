"""Figures: logit KD alone vs + hidden-state KD vs + attention KD vs a teacher-initialised
student, same shape, same data order and tokens, on the default cache (one read feeds all four).

    python benchmarks/bench_methods.py [--config data/configs/methods.toml] [-s max_steps=100 ...]

Prints validation NLL and top-1 agreement of each (the best evaluation; here the last). Figures only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.student_config import StudentRunConfig
from pipeline.train.recipe import train_students  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "data/configs/methods.toml"))
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(StudentRunConfig, args.config, args.overrides)
    t0 = time.perf_counter()
    reports = train_students(cfg, progress=False)
    print(f"\n{len(reports)} students, {cfg.max_steps} steps x batch {cfg.batch_size}, one read, "
          f"{time.perf_counter() - t0:.0f}s in all; validation split of {cfg.cache or [t.cache for t in cfg.sources]}")
    print("| student | params | losses | init | val NLL | top-1 agreement | KL |")
    print("|---|---|---|---|---|---|---|")
    for r in reports:
        f = r["final"]
        init = f"teacher layers {r['init']['layers']}" if r.get("init") else "random"
        losses = " + ".join(f"{w} {k}" for k, w in r["losses"].items())
        print(f"| {r['name']} | {r['parameters'] / 1e6:.1f}M | {losses} | {init} | {f['nll']:.4f} | "
              f"{f['top1_agreement']:.3f} | {f['kl']:.4f} |")


if __name__ == "__main__":
    main()
