"""A student's memory per rank under DDP and under FSDP2, on this machine's CPU ranks (gloo).

    python benchmarks/bench_fsdp.py [--ranks 2] [--layers 8] [--width 512] [--steps 4]

One student of the default cache's family and vocabulary (SmolLM2's 49,152 tokens, tied embeddings), `--layers` x
`--width`, kd_forward + ce, AdamW, trained for `--steps` steps with batch_size 2 on `--ranks` ranks (torchrun, one
thread each), once with parallel = "ddp" and once with "fsdp". Each rank reports its peak RSS (ru_maxrss) and its
RSS before the student was built (the Python, torch and transformers baseline); the difference is what the student
took on that rank: its weights, gradients and AdamW state (16 bytes per parameter whole under DDP, divided over the
ranks under FSDP, plus the gathered units), activations and logit blocks (the same under both). Figures only.
Needs the default cache (make teacher-cache).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CACHE = REPO / "data" / "caches" / "smollm2-stdlib"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    """One rank: build and train the student, then report its memory."""
    import importlib

    import torch

    from pipeline.student_config import StudentRunConfig
    from pipeline.train.recipe import Recipe

    for module in ("transformers", "transformers.models.llama.modeling_llama"):  # in the baseline, not the student
        importlib.import_module(module)

    torch.set_num_threads(1)
    cfg = StudentRunConfig.model_validate({
        "cache": str(CACHE), "output_dir": args.out, "parallel": args.parallel, "batch_size": 2,
        "max_steps": args.steps, "eval_every": args.steps, "eval_rows": 8, "log_every": args.steps, "num_workers": 0,
        "shuffle_window": 1, "device": "cpu",
        "students": [{"name": "s", "losses": {"kd_forward": 0.5, "ce": 0.5}, "lr": 1e-3,
                      "arch": {"num_layers": args.layers, "hidden_size": args.width, "num_heads": 8,
                               "num_kv_heads": 4}}]})
    before = _rss_mib()
    recipe = Recipe(cfg, log=lambda m: None, progress=False)
    t0 = time.perf_counter()
    report = recipe.train()[0]
    seconds = time.perf_counter() - t0
    rank = int(os.environ.get("RANK", 0))
    Path(args.out, f"memory-{rank}.json").write_text(json.dumps(
        {"rank": rank, "baseline_mib": before, "peak_mib": _rss_mib(), "seconds": seconds,
         "parameters": report["parameters"]}))


def run(parallel: str, args) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix=f"bench-fsdp-{parallel}-") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks),
               __file__, "--worker", "--parallel", parallel, "--out", out, "--layers", str(args.layers),
               "--width", str(args.width), "--steps", str(args.steps)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return [json.loads(Path(out, f"memory-{r}.json").read_text()) for r in range(args.ranks)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--parallel", default="ddp")
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not (CACHE / "manifest.json").exists():
        sys.exit(f"{CACHE} is missing: run make teacher-cache first")
    print(f"student {args.layers} x {args.width}, vocabulary 49,152, {args.ranks} ranks, {args.steps} steps")
    print(f"{'parallel':<9} {'parameters':>11} {'per rank: baseline MiB':>23} {'peak MiB':>9} {'student MiB':>12} "
          f"{'wall s':>7}")
    for parallel in ("ddp", "fsdp"):
        ranks = run(parallel, args)
        worst = max(ranks, key=lambda r: r["peak_mib"] - r["baseline_mib"])
        print(f"{parallel:<9} {worst['parameters'] / 1e6:>10.1f}M {worst['baseline_mib']:>23,.0f} "
              f"{worst['peak_mib']:>9,.0f} {worst['peak_mib'] - worst['baseline_mib']:>12,.0f} "
              f"{max(r['seconds'] for r in ranks):>7.1f}")


if __name__ == "__main__":
    main()
