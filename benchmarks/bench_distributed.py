"""Both stages on 1 and on N ranks under torchrun, on this machine (ranks x threads = cores).

    python benchmarks/bench_distributed.py [--ranks 2] [--tokens 16384] [--steps 30]

Capture: the default teacher config (SmolLM2-135M) over the first `--tokens` tokens, into a fresh
directory, as `torchrun --nproc_per_node R --no-python distill teacher-cache`; tokens/s is the
cache's tokens over the command's whole wall time (processes, teacher load, data, writes) and over
the compute phase alone (the manifest's per-shard seconds, which are per rank, divided by R).
Students: the default student config on the default cache for `--steps` steps, the same global
batch on each layout (1 process with grad_accum R, or R ranks with grad_accum 1); tokens/s is the
report's tokens seen over the command's wall time, and over the recipe's own training seconds.
Also checks that the R-rank cache is byte-identical to the 1-rank one. Figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISTILL = str(Path(sys.executable).with_name("distill"))


def torchrun(ranks: int, threads: int, *args: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "--no-python", DISTILL, *args]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def same_bytes(a: Path, b: Path) -> bool:
    fa = {p.relative_to(a): p for p in a.rglob("*") if p.is_file() and p.name != "manifest.json"}
    fb = {p.relative_to(b): p for p in b.rglob("*") if p.is_file() and p.name != "manifest.json"}
    return fa.keys() == fb.keys() and all(fa[k].read_bytes() == fb[k].read_bytes() for k in fa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    R = args.ranks
    layouts = [(1, cores), (R, max(1, cores // R))]
    print(f"{cores} cores; layouts (ranks x threads): {', '.join(f'{r}x{t}' for r, t in layouts)}")
    with tempfile.TemporaryDirectory() as tmp:
        caches = {}
        print("\n| stage | ranks x threads | wall s | tokens | tokens/s (wall) | tokens/s (compute) |")
        print("|---|---|---|---|---|---|")
        for r, t in layouts:
            out = Path(tmp) / f"cache-{r}"
            wall = torchrun(r, t, "teacher-cache", "-c", "data/configs/teacher_cache.toml",
                            "-s", f"data.max_tokens={args.tokens}", "-s", f"output.dir=\"{out}\"")
            m = json.loads((out / "manifest.json").read_text())
            tok, secs = m["stats"]["tokens"], m["stats"]["timing"]["seconds"] / r
            print(f"| capture | {r}x{t} | {wall:.1f} | {tok:,} | {tok / wall:,.0f} | {tok / secs:,.0f} |", flush=True)
            caches[r] = out
        for r, t in layouts:
            out = Path(tmp) / f"students-{r}"
            wall = torchrun(r, t, "student", "-c", "data/configs/student.toml", "-s", f"output_dir=\"{out}\"",
                            "-s", f"max_steps={args.steps}", "-s", f"eval_every={args.steps}",
                            "-s", f"grad_accum={R // r}", "-s", "patience=1000")
            rep = json.loads(next(out.glob("*/report.json")).read_text())
            tok, secs = rep["tokens_seen"], rep["wall_seconds"]
            print(f"| student | {r}x{t} | {wall:.1f} | {tok:,} | {tok / wall:,.0f} | {tok / secs:,.0f} |", flush=True)
        print(f"\n{R}-rank cache byte-identical to the 1-rank cache (manifest aside): "
              f"{same_bytes(caches[1], caches[R])}")


if __name__ == "__main__":
    main()
