"""`distill import`: tokens per second, and peak memory as the source grows.

    python benchmarks/bench_import.py                 # sources of 512, 2,048 and 8,192 rows of 256 tokens, top-32
    python benchmarks/bench_import.py --rows 256 1024 # other sizes

Each source is a synthetic Parquet file in axolotl's KD layout (the columns `distill export` writes, without the
extras): per position, 32 distinct random ids of the default teacher's vocabulary with sorted log-probs holding 90%
of the mass (-inf at a row's first position), and as its token one of those ids (so that the alignment check
passes, as on real data), in row groups of 64 rows. Each import runs in a fresh process (`distill import`,
the default teacher named, its weights never loaded); the figures are its wall seconds, the tokens per second of
the whole command (both passes, the verification after it and the start-up included) and its peak RSS
(ru_maxrss, imports included: compare sizes, not absolute values). The last line is the growth exponent of the peak
RSS from the smallest to the largest source (log-log slope: 0 is flat, 1 is linear).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "data" / "teachers" / "SmolLM2-135M-Instruct"
VOCAB = 49_152


def source(path: Path, rows: int, n: int, k: int, seed: int = 0) -> None:
    """`rows` rows of `n` tokens in axolotl's layout, written 64 rows at a time."""
    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(path, pa.schema([("input_ids", pa.list_(pa.int32())),
                                           ("target_token_ids", pa.list_(pa.list_(pa.int32()))),
                                           ("target_logprobs", pa.list_(pa.list_(pa.float32())))])) as w:
        for a in range(0, rows, 64):
            b = min(rows, a + 64)
            m = b - a
            tokens = rng.integers(0, VOCAB, size=(m, n), dtype=np.int32)
            ids = (rng.integers(0, VOCAB - k, size=(m, n, 1)) + np.arange(k)).astype(np.int32)  # distinct per position
            p = np.sort(rng.dirichlet(np.ones(k), size=(m, n)), axis=-1)[..., ::-1] * 0.9
            lp = np.log(p).astype(np.float32)
            lp[:, 0] = -np.inf  # position 0 predicts no token of the row
            pick = rng.integers(0, k, size=(m, n - 1, 1))  # the token each position predicts, among its entries
            tokens[:, 1:] = np.take_along_axis(ids[:, 1:], pick, -1)[..., 0]

            def nested(a3):
                inner = pa.ListArray.from_arrays(np.arange(0, m * n * k + 1, k, dtype=np.int32), a3.reshape(-1))
                return pa.ListArray.from_arrays(np.arange(0, m * n + 1, n, dtype=np.int32), inner)

            w.write_table(pa.table({
                "input_ids": pa.ListArray.from_arrays(np.arange(0, m * n + 1, n, dtype=np.int32), tokens.reshape(-1)),
                "target_token_ids": nested(ids), "target_logprobs": nested(lp)}))


def measured(cmd: list[str]) -> dict:
    wrapper = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(json.dumps({'rc': r.returncode, 'err': r.stderr[-2000:], 'wall': time.perf_counter() - t, "
               "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = json.loads(subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env,
                                    cwd=ROOT).stdout)
    if out["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out['err']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=32)
    args = ap.parse_args()
    if not (TEACHER / "config.json").exists():
        raise SystemExit(f"{TEACHER} is missing: run `make teacher` first (its tokenizer and config are read)")
    print(f"{'rows':>7} {'tokens':>11} {'source MiB':>11} {'cache MiB':>10} {'seconds':>8} {'tokens/s':>9} "
          f"{'peak RSS MiB':>13}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        for rows in args.rows:
            src, out = Path(tmp) / f"src-{rows}.parquet", Path(tmp) / f"cache-{rows}"
            source(src, rows, args.seq_len, args.top_k)
            r = measured([sys.executable, "-m", "stages.cli", "import", str(src), str(out), "--teacher", str(TEACHER)])
            tokens = rows * args.seq_len
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
            results.append((tokens, r["rss"]))
            print(f"{rows:>7,} {tokens:>11,} {src.stat().st_size / 2**20:>11.1f} {size:>10.1f} {r['wall']:>8.1f} "
                  f"{tokens / r['wall']:>9,.0f} {r['rss']:>13.0f}")
            src.unlink()
    (t0, m0), (t1, m1) = results[0], results[-1]
    print(f"peak RSS growth exponent {math.log(m1 / m0) / math.log(t1 / t0):.3f} over {t1 / t0:.0f}x the tokens")


if __name__ == "__main__":
    main()
