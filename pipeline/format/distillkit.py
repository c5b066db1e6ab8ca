"""DistillKit's offline top-K format (arcee-ai/DistillKit), read and written with numpy alone.

DistillKit's vLLM capture (`distillkit.sample_logits_vllm`) writes Parquet files (`data_0.parquet`, ...) beside a
`compression_config.yaml` that holds the only record of how they were compressed. Per row:

    input_ids            list<uint64>          (T,)            the tokens
    compressed_logprobs  list<list<uint8>>     (T - 1, B_lp)   per position, its log-probs, compressed
    bytepacked_indices   list<list<uint8>>     (T - 1, B_idx)  per position, its k token ids, bit-packed

Row position t holds the teacher's top-k at position t, which predicts token t + 1 (logits[:, t]); there is no row
for the last token. (After DistillKit's packing step, `input_ids` is cut to T - 1 and `attention_mask` holds
segment ids 1, 2, ... of the packed documents.) The log-probs are vLLM's raw log-softmax over the whole vocabulary
at temperature 1, most likely first; no logsumexp is stored.

The encoding, as read from DistillKit's source at commit a61c2e7 (`distillkit/compression`), for settings
d, k, exact_k, exact_dtype, polynomial_terms, term_dtype, residual_bins, delta_encoding, normalize_t:

- ids: each masked to bits = ceil(log2 d) bits, written most significant bit first into one bit stream, zero-padded
  to a whole byte (B_idx = ceil(k * bits / 8));
- log-probs, sorted descending: with delta_encoding, v[0] = lp[0], v[i] = lp[i] - lp[i - 1]; then, concatenated:
  v[:exact_k] as little-endian `exact_dtype` floats (lossless in float32; bfloat16 keeps 8 bits of mantissa), one
  `term_dtype` coefficient per polynomial term of a least-squares fit of the tail v[exact_k:k] over t = 0..m-1
  (or linspace(0, 1, m) with normalize_t; a term is a power of t, "sqrt" or "exp"), and per residual bin a
  `scale_dtype` scale and `num_elements` unsigned codes of `element_bits` bits (offset binary; bit-packed as the
  ids) of the fit's residuals, from the start of the tail. The tail is lossy: residuals past the bins decode as 0.

Decoding follows DistillKit's `decompress_monotonic_logprobs` step for step (the residual rounded to exact_dtype
before it is added to the fit, the fit evaluated in term_dtype, the cumulative sum of deltas in float32 rounded to
exact_dtype), so values equal DistillKit's own to float rounding. `encode_exact` writes the lossless settings
(exact_k = k in float32, no fit, no deltas) that `distill export --format distillkit` uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIG_FILE = "compression_config.yaml"
WIDTH = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
COLUMNS = ("input_ids", "compressed_logprobs", "bytepacked_indices")


class CompressionError(ValueError):
    """Settings or bytes that are not DistillKit's format; the message says which."""


@dataclass(frozen=True)
class ResidualBin:
    scale_dtype: str
    element_bits: int
    num_elements: int


@dataclass(frozen=True)
class Compression:
    """DistillKit's `DistributionQuantizationConfig` (its defaults where a key is absent)."""

    d: int
    k: int
    exact_k: int
    exact_dtype: str = "float32"
    polynomial_terms: tuple = ()
    term_dtype: str = "float32"
    residual_bins: tuple[ResidualBin, ...] = ()
    delta_encoding: bool = True
    error_diffusion: bool = False  # how residuals were rounded when written; decoding does not depend on it
    normalize_t: bool = False

    @classmethod
    def from_dict(cls, raw: dict) -> "Compression":
        if not isinstance(raw, dict):
            raise CompressionError(f"the settings are a {type(raw).__name__}, not a mapping of DistillKit's keys")
        raw = raw.get("logprob_compressor", raw)  # the section of a DistillKit training YAML
        missing = [k for k in ("d", "k", "exact_k", "residual_bins") if k not in raw]
        if missing:
            raise CompressionError(f"missing {', '.join(missing)} (DistillKit's compression settings need d, k, "
                                   "exact_k and residual_bins)")
        try:
            bins = tuple(ResidualBin(str(b["scale_dtype"]), int(b["element_bits"]), int(b["num_elements"]))
                         for b in raw["residual_bins"] or ())
            out = cls(int(raw["d"]), int(raw["k"]), int(raw["exact_k"]), str(raw.get("exact_dtype", "float32")),
                      tuple(raw.get("polynomial_terms") or ()), str(raw.get("term_dtype", "float32")), bins,
                      bool(raw.get("delta_encoding", True)), bool(raw.get("error_diffusion", False)),
                      bool(raw.get("normalize_t", False)))
        except (TypeError, ValueError, KeyError) as e:
            raise CompressionError(f"unreadable settings ({e})") from None
        out.check()
        return out

    def check(self) -> None:
        for name, dtype in [("exact_dtype", self.exact_dtype), ("term_dtype", self.term_dtype)] + \
                [("scale_dtype", b.scale_dtype) for b in self.residual_bins]:
            if dtype not in WIDTH:
                raise CompressionError(f"{name} {dtype!r} is not one of {', '.join(WIDTH)}")
        if self.d < 1 or self.k < 1 or not 0 <= self.exact_k <= self.k:
            raise CompressionError(f"d {self.d}, k {self.k}, exact_k {self.exact_k}: need d, k >= 1 and "
                                   "0 <= exact_k <= k")
        for t in self.polynomial_terms:
            if t not in ("sqrt", "exp") and not (isinstance(t, int) and t >= 0):
                raise CompressionError(f"polynomial term {t!r} is not a power (an integer), 'sqrt' or 'exp'")
        if any(b.element_bits < 1 or b.element_bits > 32 or b.num_elements < 1 for b in self.residual_bins):
            raise CompressionError("a residual bin needs 1..32 element_bits and num_elements >= 1")
        if sum(b.num_elements for b in self.residual_bins) > self.k - self.exact_k:
            raise CompressionError("the residual bins hold more elements than the k - exact_k tail")

    def to_dict(self) -> dict:
        return {"d": self.d, "k": self.k, "exact_k": self.exact_k, "exact_dtype": self.exact_dtype,
                "polynomial_terms": list(self.polynomial_terms) or None, "term_dtype": self.term_dtype,
                "residual_bins": [{"scale_dtype": b.scale_dtype, "element_bits": b.element_bits,
                                   "num_elements": b.num_elements} for b in self.residual_bins],
                "delta_encoding": self.delta_encoding, "error_diffusion": self.error_diffusion,
                "normalize_t": self.normalize_t}

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(self.d)))

    @property
    def index_bytes(self) -> int:
        return -(-self.k * self.bits // 8)

    @property
    def logprob_bytes(self) -> int:
        return (self.exact_k * WIDTH[self.exact_dtype] + len(self.polynomial_terms) * WIDTH[self.term_dtype]
                + sum(WIDTH[b.scale_dtype] + -(-b.num_elements * b.element_bits // 8) for b in self.residual_bins))

    @property
    def lossless(self) -> bool:
        """Every value stored as itself in float32 or wider: what the cache's float16 keeps, exactly."""
        return self.exact_k == self.k and not self.delta_encoding and self.exact_dtype in ("float32", "float64")

    @property
    def exact_ranks(self) -> int:
        """The leading ranks stored so that a float16 cache holds them as the teacher gave them: up to exact_k in
        float32 or float64 (deltas summed back in float32 err far below float16's step), or in float16 without
        deltas; none in bfloat16 (8 bits of mantissa against float16's 11) or in float16 deltas."""
        exact = self.exact_dtype in ("float32", "float64") or (self.exact_dtype == "float16" and not self.delta_encoding)
        return self.exact_k if exact else 0

    def describe(self) -> str:
        tail = self.k - self.exact_k
        return (f"ranks 1..{self.exact_k} stored as {self.exact_dtype}"
                + (" deltas" if self.delta_encoding else "")
                + (f", ranks {self.exact_k + 1}..{self.k} approximated ({len(self.polynomial_terms)}-term fit, "
                   f"{len(self.residual_bins)} residual bin(s))" if tail else ""))


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 (or float64) values rounded to `dtype`, as torch's `.to(dtype)` rounds (to nearest, ties to even),
    returned as float32 (float64 for float64)."""
    if dtype == "float64":
        return np.asarray(x, np.float64)
    x = np.asarray(x, np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)  # bfloat16: the top 16 bits of a float32, rounded to nearest even
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    keep = np.isnan(x)
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(keep, x, out)


def floats(data: np.ndarray, dtype: str) -> np.ndarray:
    """(N, n * width) little-endian bytes as (N, n) float32 (float64 for float64)."""
    data = np.ascontiguousarray(data, np.uint8)
    if dtype == "bfloat16":
        half = data.view("<u2").astype(np.uint32) << 16
        return half.view(np.float32)
    view = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype]
    return data.view(view).astype(np.float64 if dtype == "float64" else np.float32)


def float_bytes(x: np.ndarray, dtype: str) -> np.ndarray:
    """(N, n) values as (N, n * width) little-endian bytes of `dtype`."""
    if dtype == "bfloat16":
        top = (round_to(x, "bfloat16").view(np.uint32) >> 16).astype("<u2")
        return top.view(np.uint8).reshape(len(x), -1)
    view = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype]
    return np.ascontiguousarray(np.asarray(x).astype(view)).view(np.uint8).reshape(len(x), -1)


def unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """(N, bytes) of a most-significant-bit-first stream as (N, count) unsigned integers of `bits` bits (a byte per
    bit while it works, not a word)."""
    stream = np.unpackbits(np.ascontiguousarray(data, np.uint8), axis=-1, bitorder="big")[:, : count * bits]
    stream = stream.reshape(len(data), count, bits)
    out = np.zeros((len(data), count), np.int64)
    for b in range(bits):
        out = (out << 1) | stream[:, :, b]
    return out


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """(N, count) unsigned integers as (N, ceil(count * bits / 8)) bytes, most significant bit first."""
    values = np.asarray(values, np.uint64)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    stream = ((values[..., None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(len(values), -1)
    return np.packbits(stream, axis=-1, bitorder="big")


def _grid(c: Compression, m: int) -> np.ndarray:
    """(m, terms) of the fit's terms over the tail's t, in term_dtype."""
    dt = np.float64 if c.term_dtype == "float64" else np.float32
    t = np.linspace(0, 1, m, dtype=dt) if c.normalize_t else np.arange(m, dtype=dt)
    cols = [np.sqrt(t) if term == "sqrt" else np.exp(t) if term == "exp" else t ** term for term in
            c.polynomial_terms]
    return round_to(np.stack(cols, -1), c.term_dtype) if cols else np.zeros((m, 0), dt)


SLICE = 4096  # positions decoded together: the working arrays are a few KB per position


def decode(c: Compression, logprob_bytes: np.ndarray, index_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, B_lp) and (P, B_idx) bytes of P positions: their (P, k) ids and (P, k) float64 log-probs (the values
    DistillKit's decoder gives, most likely first), SLICE positions at a time."""
    if logprob_bytes.shape[1:] != (c.logprob_bytes,) or index_bytes.shape[1:] != (c.index_bytes,):
        raise CompressionError(f"positions of {logprob_bytes.shape[1:]} log-prob bytes and {index_bytes.shape[1:]} "
                               f"index bytes, where these settings make {c.logprob_bytes} and {c.index_bytes}")
    if len(logprob_bytes) > SLICE:
        parts = [_decode(c, logprob_bytes[a:a + SLICE], index_bytes[a:a + SLICE])
                 for a in range(0, len(logprob_bytes), SLICE)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return _decode(c, logprob_bytes, index_bytes)


def _decode(c: Compression, logprob_bytes: np.ndarray, index_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    P = len(logprob_bytes)
    ids = unpack(index_bytes, c.bits, c.k)
    at = c.exact_k * WIDTH[c.exact_dtype]
    exact = floats(logprob_bytes[:, :at], c.exact_dtype)  # (P, exact_k)
    m = c.k - c.exact_k
    n_terms = len(c.polynomial_terms)
    coeffs = floats(logprob_bytes[:, at: at + n_terms * WIDTH[c.term_dtype]], c.term_dtype)
    at += n_terms * WIDTH[c.term_dtype]
    residual = np.zeros((P, m), np.float32)
    filled = 0
    for b in c.residual_bins:
        scale = floats(logprob_bytes[:, at: at + WIDTH[b.scale_dtype]], b.scale_dtype)  # (P, 1)
        at += WIDTH[b.scale_dtype]
        size = -(-b.num_elements * b.element_bits // 8)
        q = unpack(logprob_bytes[:, at: at + size], b.element_bits, b.num_elements).astype(np.float32)
        at += size
        step = (q * 2.0 - 1.0) if b.element_bits == 1 else (q - 2.0 ** (b.element_bits - 1))
        residual[:, filled: filled + b.num_elements] = step * scale.astype(np.float32)
        filled += b.num_elements
    if m:
        fit = (_grid(c, m)[None] * coeffs[:, None, :]).sum(-1) if n_terms else np.zeros((P, m), np.float32)
        tail = fit + round_to(residual, c.exact_dtype)
        values = np.concatenate([exact.astype(tail.dtype), tail], -1)
    else:
        values = exact
    if c.delta_encoding:
        values = round_to(np.cumsum(values.astype(np.float32), -1, dtype=np.float32), c.exact_dtype)
    return ids, values.astype(np.float64)


def lossless(d: int, k: int) -> Compression:
    """The settings `encode_exact` writes: every value a float32, no fit, no deltas (DistillKit reads them)."""
    return Compression(d=d, k=k, exact_k=k, exact_dtype="float32", delta_encoding=False)


def encode_exact(c: Compression, ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, k) ids and log-probs, most likely first, as (P, B_lp) and (P, B_idx) bytes under lossless settings."""
    if not c.lossless:
        raise CompressionError("encode_exact writes the lossless settings only (exact_k = k, float32, no deltas)")
    return float_bytes(logprobs, c.exact_dtype), pack(ids, c.bits)
