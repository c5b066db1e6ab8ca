"""Codec speed and ratio per field, on one core, on a cache's own arrays (how the defaults were chosen).

    python benchmarks/bench_codecs.py                      # the default cache (make teacher-cache)
    python benchmarks/bench_codecs.py --cache PATH --rows 64
    python benchmarks/bench_codecs.py --topk               # the top-K candidates on the whole train split

For each field it encodes the first `--rows` rows (one call per codec, the best of 3) and prints the compression
ratio, the encode and decode speed in MB/s of raw bytes, and for the top-K fields tokens/s per core.

`--topk` measures what a position's K ids and log-probs cost under each layout tried for them (`topk_candidates`:
bytes per token of the split, tokens per CPU-second of the transform and encode), the zero-order entropies that
bound any coder that sees one value at a time, and the bounded-error log-probs (`capture.logprob_precision`) at
several bounds with their KL to the stored float16 values. Figures only.
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
    ap.add_argument("--topk", action="store_true", help="the top-K candidates (the whole split)")
    args = ap.parse_args()
    if args.topk:
        return topk_candidates(args.cache, args.split)
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


# -- the top-K layouts ------------------------------------------------------------------------------------------


def _entropy_bits(x: np.ndarray) -> float:
    _, c = np.unique(x, return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def _frequency_codes(ids: np.ndarray, fit: np.ndarray, vocab: int) -> np.ndarray:
    """Each id replaced by its rank in the ids of `fit` by count (most frequent 0; unseen ones after, by id)."""
    order = np.argsort(-np.bincount(fit.ravel().astype(np.int64), minlength=vocab), kind="stable")
    code = np.empty(vocab, np.uint32)
    code[order] = np.arange(vocab)
    return code.astype(ids.dtype)[ids]


def _mtf_bits(ids: np.ndarray, fallback: np.ndarray, rows: range) -> float:
    """Bits per id of move-to-front down each row's positions (an id's place among those seen most recently, or an
    escape and its frequency code), as zero-order entropies: how much locality across positions is worth."""
    places, escaped = [], []
    for n in rows:
        recent: list[int] = []
        for t in range(ids.shape[1]):
            for i, x in enumerate(ids[n, t].tolist()):
                try:
                    j = recent.index(x)
                    places.append(j)
                    recent.pop(j)
                except ValueError:
                    places.append(-1)
                    escaped.append(int(fallback[n, t, i]))
                recent.insert(0, x)
            del recent[4096:]
    places = np.array(places)
    return _entropy_bits(places) + float((places < 0).mean()) * _entropy_bits(np.array(escaped))


def _timed(fn, x, repeats: int = 3) -> tuple[int, float]:
    """(bytes, seconds) of the best of `repeats` calls of fn(x) -> encoded bytes (or a list of them)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.process_time()
        out = fn(x)
        best = min(best, time.process_time() - t)
    size = sum(len(b) for b in out) if isinstance(out, (list, tuple)) else len(out)
    return size, max(best, 1e-9)


def topk_candidates(cache_path: str, split: str) -> None:
    """Bytes per token and tokens per CPU-second of each layout tried for the top-K ids and log-probs."""
    import torch
    from numcodecs import Zstd
    from numcodecs.pcodec import PCodec

    sys.path.insert(0, str(REPO))
    from pipeline.capture.precision import round_logprobs, stored_kl
    from pipeline.format import Cache

    cache = Cache(cache_path)
    ids = np.asarray(cache.array(split, "topk_ids")[:])  # the ids (a cache of frequency codes decoded)
    lp = np.asarray(cache.array(split, "topk_logprobs")[:])
    rows = cache.rows(split, ["input_ids", "length"])
    N, L, K = ids.shape
    tokens, vocab = N * L, cache.manifest.teacher.vocab_size
    inputs = np.zeros((N, L), np.int64)
    for n, r in enumerate(rows.column("input_ids").to_pylist()):
        inputs[n, :len(r)] = r
    real = inputs[np.arange(L)[None, :] < np.asarray(rows.column("length"))[:, None]]  # what 4.0's order counts
    nxt = np.full((N, L), -1, np.int64)
    nxt[:, :-1] = inputs[:, 1:]
    first = slice(0, cache.manifest.capture.rows_per_shard)  # a writer's first shard: what a table is fitted on
    p8, p12, z19 = PCodec(level=8), PCodec(level=12), Zstd(level=19)
    freq = _frequency_codes(ids, ids[first], vocab)
    sorted_ids = np.sort(ids.astype(np.int32), axis=-1)
    id_deltas = np.diff(sorted_ids, axis=-1, prepend=0).astype(ids.dtype)
    order = np.argsort(np.argsort(ids, axis=-1, kind="stable"), axis=-1).astype(np.uint8)  # rank -> place in set
    top1 = np.where(ids[..., :1] == nxt[..., None], 0, ids[..., :1].astype(np.int64) + 1)
    flagged = np.concatenate([top1, ids[..., 1:].astype(np.int64) + 1], -1).astype(np.int32)
    bits = lp.view(np.uint16).astype(np.int32)
    lp_deltas = np.diff(bits, axis=-1, prepend=0).astype(np.uint16)  # a negative float16 grows with its bits
    by_id = np.take_along_axis(lp, np.argsort(ids, axis=-1, kind="stable"), -1)
    print(f"python benchmarks/bench_codecs.py --topk --cache {cache_path}")
    print(f"\n{split}: {N} rows x {L} positions ({tokens:,} tokens), K = {K}, vocabulary {vocab:,}; top-1 id = the "
          f"next token at {(ids[..., 0] == nxt).mean():.1%} of positions, the next token among the K at "
          f"{(ids == nxt[..., None]).any(-1).mean():.1%}")
    print("\n| values | layout | codec | B/token | tokens per CPU-s |\n|---|---|---|---|---|")
    cases = [
        ("ids", "rank order (before 4.0)", "pcodec-8", ids, p8.encode),
        ("ids", "rank order", "pcodec-12", ids, p12.encode),
        ("ids", "rank order", "zstd-19", ids, z19.encode),
        ("ids", "frequency codes by the rows' tokens (format 4.0), rank order", "pcodec-8", ids,
         lambda x: p8.encode(_frequency_codes(x, real, vocab))),
        ("ids", "frequency codes by the first shard's top-K ids, rank order", "pcodec-8", ids,
         lambda x: p8.encode(_frequency_codes(x, x[first], vocab))),
        ("ids", "frequency codes, rank order", "zstd-19", freq, z19.encode),
        ("ids", "top-1 as a flag when it is the next token, rank order", "pcodec-8", flagged, p8.encode),
        ("ids", "sorted, deltas (the set without its order)", "pcodec-8", ids,
         lambda x: p8.encode(np.diff(np.sort(x.astype(np.int32), -1), axis=-1, prepend=0).astype(x.dtype))),
        ("ids", "sorted, deltas", "zstd-19", id_deltas, z19.encode),
        ("ids", "the order of a sorted set: each rank's place in it (uint8)", "zstd-19", order, z19.encode),
        ("ids", "frequency codes sorted, deltas (the set without its order)", "pcodec-8", freq,
         lambda x: p8.encode(np.diff(np.sort(x.astype(np.int32), -1), axis=-1, prepend=0).astype(x.dtype))),
        ("log-probs", "float16, rank order (the default)", "pcodec-8", lp, p8.encode),
        ("log-probs", "float16, rank order", "zstd-19", lp, z19.encode),
        ("log-probs", "float16 bits, deltas down the ranks", "pcodec-8", bits, lambda x: p8.encode(
            np.diff(x, axis=-1, prepend=0).astype(np.uint16))),
        ("log-probs", "float16 bits, deltas down the ranks", "zstd-19", lp_deltas, z19.encode),
        ("log-probs", "bit deltas, ranks 1-8 and 9-K as two arrays", "pcodec-8", lp_deltas,
         lambda x: [p8.encode(np.ascontiguousarray(x[..., :8])), p8.encode(np.ascontiguousarray(x[..., 8:]))]),
        ("log-probs", "float16 in id order (to go with sorted ids)", "pcodec-8", by_id, p8.encode),
    ]
    for what, layout, codec, x, fn in cases:
        size, sec = _timed(fn, np.ascontiguousarray(x))
        print(f"| {what} | {layout} | {codec} | {size / tokens:.1f} | {tokens / sec:,.0f} |", flush=True)
    h_rank = np.mean([_entropy_bits(ids[..., k]) for k in range(K)])
    h_delta = (_entropy_bits(lp_deltas[..., 0]) + sum(_entropy_bits(lp_deltas[..., k]) for k in range(1, K))) / 8
    mtf = _mtf_bits(ids, freq, range(0, N, max(1, N // 24)))
    print(f"\nzero-order bounds, B/token: ids {K * _entropy_bits(ids) / 8:.1f} (one table), {K * h_rank / 8:.1f} (a "
          f"table per rank), move-to-front down each row {K * mtf / 8:.1f} (24 rows); log-prob bit deltas "
          f"{h_delta:.1f} (a table per rank)")
    print("\n| capture.logprob_precision | topk_logprobs B/token | KL(exact \\|\\| stored) mean | max | rounding, "
          "tokens per CPU-s |\n|---|---|---|---|---|")
    x = torch.from_numpy(lp.astype(np.float32))
    for bound in (0.0015, 0.005, 0.015, 0.05):
        t = time.process_time()
        q = round_logprobs(x, bound)
        kl = stored_kl(x, q)
        sec = time.process_time() - t
        print(f"| {bound:g} | {len(p8.encode(q.numpy())) / tokens:.1f} | {kl.mean():.2e} | {kl.max():.2e} | "
              f"{tokens / sec:,.0f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
