"""Codec speed and ratio per field, on one core, on a cache's own arrays (how the defaults were chosen).

    python benchmarks/bench_codecs.py                      # the default cache (make teacher-cache)
    python benchmarks/bench_codecs.py --cache PATH --rows 64

For each field it encodes the first `--rows` rows (one call per codec, the best of 3) and prints the compression
ratio, the encode and decode speed in MB/s of raw bytes, and for the top-K fields tokens/s per core. Figures only.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


class _Chain:
    """Filters then a compressor, as zarr applies them."""

    def __init__(self, *codecs):
        self.codecs = codecs

    def encode(self, x):
        for c in self.codecs:
            x = c.encode(x)
        return x

    def decode(self, b):
        for c in reversed(self.codecs):
            b = c.decode(b)
        return b


class _Raw:
    def encode(self, x):
        return x.tobytes()

    def decode(self, b):
        return b


def candidates(field: str, itemsize: int) -> dict:
    from numcodecs import Shuffle, Zstd
    from numcodecs.pcodec import PCodec

    if field in ("topk_ids", "topk_logprobs", "sample_ids", "sample_logprobs"):
        return {f"pcodec-{lvl}": PCodec(level=lvl) for lvl in (4, 8, 10, 12)} | {"zstd-3": Zstd(level=3)}
    return {"zstd-1": Zstd(level=1), "zstd-3": Zstd(level=3),
            "shuffle+zstd-1": _Chain(Shuffle(elementsize=itemsize), Zstd(level=1)),
            "shuffle+zstd-3": _Chain(Shuffle(elementsize=itemsize), Zstd(level=3)),
            "pcodec-8": PCodec(level=8), "none": _Raw()}


def measure(codec, x: np.ndarray, repeats: int = 3) -> tuple[float, float, float]:
    """(ratio, encode MB/s, decode MB/s) of one codec on an array."""
    x = np.ascontiguousarray(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        enc = codec.encode(x)
        best = min(best, time.perf_counter() - t)
    t = time.perf_counter()
    codec.decode(enc)
    dec = time.perf_counter() - t
    size = len(enc) if isinstance(enc, (bytes, bytearray)) else np.asarray(enc).nbytes
    return x.nbytes / size, x.nbytes / best / 1e6, x.nbytes / max(dec, 1e-9) / 1e6


def main() -> None:
    import zarr

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=str(REPO / "data/caches/smollm2-stdlib"))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--split", default="train")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")
    print(f"python benchmarks/bench_codecs.py --cache {args.cache} --rows {args.rows}")
    print("\n| field | codec | ratio | encode MB/s | decode MB/s | tokens/s per core |\n|---|---|---|---|---|---|")
    root = Path(args.cache) / args.split
    for field in ("topk_ids", "topk_logprobs", "hidden_states", "final_hidden"):
        if not (root / field).exists():
            continue
        x = np.asarray(zarr.open_array(str(root / field), mode="r")[: args.rows])
        per_token = x.nbytes / (x.shape[0] * x.shape[-2 if field in ("topk_ids", "topk_logprobs") else -2])
        for name, codec in candidates(field, x.dtype.itemsize).items():
            ratio, enc, dec = measure(codec, x)
            tps = enc * 1e6 / per_token if field.startswith("topk") else float("nan")
            tps_s = f"{tps:,.0f}" if np.isfinite(tps) else ""
            print(f"| {field} ({x.dtype}) | {name} | {ratio:.2f} | {enc:,.0f} | {dec:,.0f} | {tps_s} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
