"""How many GPUs' teacher output one writer core keeps up with: the capture's host side at real shapes.

    python benchmarks/bench_host.py                           # 7-15 minutes on 2 cores (by their other load)
    python benchmarks/bench_host.py --quick                   # a smoke run, under 2 minutes
    python benchmarks/bench_host.py --hidden-codec zstd --json host.json

Synthetic teacher outputs at the shapes of a Llama-3 teacher (V = 128,256 ids, top-K 64, 64 sampled draws, hidden
width 4,096) go through the capture's own shard loop (`run_shards`: writer threads, shards in flight, `write_shard`,
`shard_stats`) into the real `CacheWriter` on local disk, with the codecs `capture_specs` derives from the capture's
defaults. The teacher is a stand-in whose `submit` hands over pre-computed targets (`Done`), so it costs nothing and
the writer is measured as fast as it takes shards, with 0 (in line), 1, 2, ... writer threads up to the cores present.

Per field set: tokens/s (wall), MB/s of uncompressed input (the stored dtypes' bytes), stored bytes per token,
tokens per CPU-second of the process (all threads: the per-core figure, robust to other work on the machine) and
the scaling over one writer, beside this machine's own ceiling (N threads of sha256 over one, measured before and
after: other work on the machine lowers it). Then the codecs compared at one writer (hidden states under zstd / none; the ids at
pcodec level 12, and the ids and log-probs under shuffle + zstd 1, a FieldSpec change), the pieces of an in-line shard write (concat, stats, zarr encode+write, sha256 read-back, fsync,
commit record) with each codec's own speed, and the GPU table: tokens/s one H100 SXM produces at 50% MFU of its
989 TFLOP/s dense bf16 with 2 x N_params FLOP per token (the forward's matrix products; attention's L^2 term and
the LM head's extra are left out, which flatters the GPU: fewer GPUs per core than real), against the tokens per
CPU-second of each field set. Hidden-state bytes scale with the width: hidden fields are measured at 4,096 and their
cost over top-K scaled by width / 4,096 for the 1B (2,048) and 70B (8,192) teachers.

The synthetic values are calibrated on the default cache (data/caches/smollm2-stdlib, SmolLM2-135M, V = 49,152),
printed side by side when it is present: ids drawn without replacement from a Zipf-like popularity with a cutoff
(popular ids mostly low, as BPE numbers them), ordered by popularity plus noise; log-probs sorted descending with
the real per-rank profile; hidden states Gaussian with lognormal channel scales and two outlier channels. None is
more compressible than the real values (the synthetic ids compress a little less). Figures only; nothing asserted.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.capture import shards as capture_shards  # noqa: E402
from pipeline.capture.shards import run_shards  # noqa: E402
from pipeline.capture.targets import Done, TeacherTargets  # noqa: E402
from pipeline.capture.teacher import TeacherFacts, capture_specs  # noqa: E402
from pipeline.config import TeacherCacheConfig  # noqa: E402
from pipeline.format import Cache, idcodes  # noqa: E402
from pipeline.format import writer as writer_module  # noqa: E402
from pipeline.format.index import field_of  # noqa: E402
from pipeline.format.layout import shard_ranges  # noqa: E402
from pipeline.format.manifest import FORMAT_NAME, FORMAT_VERSION, Manifest  # noqa: E402
from pipeline.format.specs import FieldSpec  # noqa: E402
from pipeline.format.writer import CacheWriter  # noqa: E402
from pipeline.models import TeacherSpec  # noqa: E402

DEFAULT_CACHE = REPO / "data" / "caches" / "smollm2-stdlib"
VOCAB, TOP_K, SAMPLES, WIDTH, LAYERS = 128_256, 64, 64, 4096, [8, 16, 24]
H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM, dense (no sparsity)
MFU = 0.5
TEACHERS = {"1B": (1e9, 2048), "8B": (8e9, 4096), "70B": (70e9, 8192)}  # params, width (Llama 3.2 1B, 3.1 8B, 70B)


@dataclass(frozen=True)
class FieldSet:
    name: str
    capture: dict  # capture settings besides top_k = 64 and the shape's
    hidden: bool = False  # holds hidden states: its bytes beyond top-K scale with the width
    codecs: dict = field(default_factory=dict)  # field -> FieldSpec changes (codec, level): codecs not the capture's
    slow: bool = False  # slow to write: as few shards per run as the hidden sets


FIELD_SETS = [
    FieldSet("top-K", {}),
    FieldSet("top-K + samples", {"samples": SAMPLES}),
    FieldSet("top-K + final hidden f16", {"final_hidden": True}, hidden=True),
    FieldSet("top-K + 3 hidden f16", {"hidden_layers": LAYERS}, hidden=True),
    FieldSet("top-K + 3 hidden int8", {"hidden_layers": LAYERS, "hidden_dtype": "int8"}, hidden=True),
]
CODEC_ROWS = [  # compared at one writer; the hidden codec rows are the ones --hidden-codec does not already run
    FieldSet("top-K, ids pcodec 12", {}, codecs={"topk_ids": {"level": 12}}, slow=True),
    FieldSet("top-K, ids shuffle-zstd 1", {}, codecs={"topk_ids": {"codec": "shuffle-zstd", "level": 1}}),
    FieldSet("top-K, ids + log p shuffle-zstd 1", {}, codecs={n: {"codec": "shuffle-zstd", "level": 1}
                                                             for n in ("topk_ids", "topk_logprobs")}),
    *(FieldSet(f"top-K + 3 hidden f16, {c}", {"hidden_layers": LAYERS, "hidden_codec": c}, hidden=True)
      for c in ("shuffle-zstd", "zstd", "none")),
]


@dataclass(frozen=True)
class Shape:
    seq_len: int = 4096
    rows_per_shard: int = 8  # 32,768 tokens per shard
    rows_per_chunk: int = 2
    batch_size: int = 4  # rows per teacher call: two batches per shard, concatenated by the writer


# ---------------------------------------------------------------------------------------------- synthetic targets


@dataclass(frozen=True)
class Calibration:
    """The id generator's parameters, fitted on the default cache (V = 49,152): popularity of rank r ~
    (r + offset)^-zipf * exp(-r / cutoff); id of rank r: the order of log(1 + r) + id_noise * N(0, 1); a position's
    top-K: K distinct ranks drawn in turn, ordered by log(1 + r) + order_noise * N(0, 1). offset and cutoff scale
    with V / 49,152 at other vocabularies (a wider vocabulary spreads the ids: less compressible, not more)."""

    vocab: int = 49_152
    zipf: float = 0.6
    offset: float = 99.0
    cutoff: float = 1304.0
    id_noise: float = 2.5
    order_noise: float = 2.77


class TargetGenerator:
    """Teacher targets with the statistics of real ones (see the module docstring)."""

    def __init__(self, vocab: int, seed: int = 0, cal: Calibration = Calibration()):
        self.rng, self.vocab, self.cal = np.random.default_rng(seed), vocab, cal
        r, stretch = np.arange(vocab), vocab / cal.vocab
        p = (r + cal.offset * stretch) ** -cal.zipf * np.exp(-r / (cal.cutoff * stretch))
        self.cdf = np.cumsum(p / p.sum())
        self.id_of_rank = np.empty(vocab, np.int64)
        self.id_of_rank[np.argsort(np.log1p(r) + cal.id_noise * self.rng.standard_normal(vocab), kind="stable")] = r
        self.channels: dict[tuple[int, int], np.ndarray] = {}

    def topk_ids(self, positions: int, k: int) -> np.ndarray:
        """(P, K) distinct ids per position: the first K distinct of draws with replacement, popular ones first."""
        out, todo, draws = np.empty((positions, k), np.int64), np.arange(positions), 3 * k
        while len(todo):
            d = np.searchsorted(self.cdf, self.rng.random((len(todo), draws)))
            order = np.argsort(d, axis=1, kind="stable")
            d = np.take_along_axis(d, order, 1)
            first = np.ones_like(d, bool)
            first[:, 1:] = d[:, 1:] != d[:, :-1]
            ok = first.sum(1) >= k
            pick = np.argpartition(np.where(first, order, draws), k - 1, axis=1)[:, :k]  # the earliest distinct
            r = np.take_along_axis(d, pick, 1)
            key = np.log1p(r) + self.cal.order_noise * self.rng.standard_normal(r.shape)
            out[todo[ok]] = np.take_along_axis(r, np.argsort(key, 1), 1)[ok]
            todo, draws = todo[~ok], 2 * draws
        return self.id_of_rank[out]

    def logprobs(self, positions: int, k: int) -> np.ndarray:
        """(P, K) float32 log p, descending: the top-1 ~ -Exp(0.84), a gap to the second, then -1.43 log(rank)
        with a per-position spread (the default cache's mean and spread per rank)."""
        rng = self.rng
        lp0 = -rng.exponential(0.84, positions).clip(1e-3, 20)
        lp1 = np.log1p(-np.exp(lp0)) - rng.gamma(2.0, 0.6, positions)
        slope = 1.43 * np.exp(0.35 * rng.standard_normal(positions) - 0.06)
        rest = lp1[:, None] - slope[:, None] * np.log(np.arange(1, k))[None] + 0.25 * rng.standard_normal((positions, k - 1))
        rest = np.minimum(-np.sort(-rest, axis=1), lp1[:, None])
        lp = np.concatenate([lp0[:, None], rest], 1)
        return (lp - np.log(np.maximum(np.exp(lp).sum(1), 1.0))[:, None]).astype(np.float32)

    def samples(self, ids: np.ndarray, lp: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n draws per position from the top-K probabilities plus the missing mass (an id from the popularity):
        distinct ids ascending, counts, log p (float16); empty slots 0. int64 ids and counts, as the GPU hands them."""
        P, k = ids.shape
        cdf = np.cumsum(np.exp(lp), 1)
        slot = (self.rng.random((P, n))[:, :, None] > cdf[:, None, :]).sum(-1)  # (P, n), k: the missing mass
        tail = slot == k
        draws = np.take_along_axis(ids, np.minimum(slot, k - 1), 1)
        draws[tail] = self.id_of_rank[np.searchsorted(self.cdf, self.rng.random(int(tail.sum())))]
        dlp = np.take_along_axis(lp, np.minimum(slot, k - 1), 1)
        dlp[tail] = lp[:, -1:].repeat(n, 1)[tail] - self.rng.exponential(2.0, int(tail.sum()))
        order = np.argsort(draws, 1, kind="stable")
        draws, dlp = np.take_along_axis(draws, order, 1), np.take_along_axis(dlp, order, 1)
        new = np.ones_like(draws, bool)
        new[:, 1:] = draws[:, 1:] != draws[:, :-1]
        where = np.arange(P)[:, None] * n + np.cumsum(new, 1) - 1  # each draw's slot, flat
        counts = np.bincount(where.ravel(), minlength=P * n).reshape(P, n)
        out_ids, out_lp = np.zeros((P, n), np.int64), np.zeros((P, n), np.float32)
        out_ids.flat[where.ravel()], out_lp.flat[where.ravel()] = draws.ravel(), dlp.ravel()
        return out_ids, counts.astype(np.int64), out_lp.astype(np.float16)

    def hidden(self, rows: int, layers: int, L: int, d: int, int8: bool = False):
        """(rows, layers, L, d) float16: N(0, 1) times a lognormal scale per channel (two outlier channels x30)
        and per position; with `int8`, (int8 values, (rows, layers, L) float32 scales) quantized as the capture
        does (`targets.quantize_int8`: per position, scale = max |h| / 127)."""
        out = np.empty((rows, layers, L, d), np.int8 if int8 else np.float16)
        scale = np.empty((rows, layers, L), np.float32)
        for row, layer in np.ndindex(rows, layers):  # an (L, d) block at a time: bounded temporaries
            ch = self.channels.get((d, layer))
            if ch is None:
                ch = np.exp(0.6 * self.rng.standard_normal(d)).astype(np.float32)
                ch[self.rng.choice(d, 2, replace=False)] *= 30
                self.channels[(d, layer)] = ch
            x = self.rng.standard_normal((L, d), dtype=np.float32)
            x *= ch
            x *= np.exp(0.3 * self.rng.standard_normal((L, 1))).astype(np.float32)
            if int8:
                x = x.astype(np.float16).astype(np.float32)  # the float16 state a capture quantizes
                scale[row, layer] = np.abs(x).max(-1) / 127.0
                x /= np.maximum(scale[row, layer], np.finfo(np.float32).tiny)[:, None]
                out[row, layer] = np.rint(x, out=x).clip(-127, 127)
            else:
                out[row, layer] = x
        return (out, scale) if int8 else out

    def batch(self, cfg, rows: int) -> TeacherTargets:
        """One batch of `rows` full rows of the targets a capture of `cfg` writes."""
        c, L = cfg.capture, cfg.data.seq_len
        P = rows * L
        ids, lp = self.topk_ids(P, c.top_k), self.logprobs(P, c.top_k)
        rank = np.minimum(self.rng.geometric(0.5, P) - 1, c.top_k)  # the next token's rank: 64 = outside top-K
        target = np.where(rank < c.top_k, np.take_along_axis(lp, np.minimum(rank, c.top_k - 1)[:, None], 1)[:, 0],
                          lp[:, -1] - self.rng.exponential(2.0, P)).reshape(rows, L)
        target[:, -1] = np.nan  # the last position has no next token
        t = TeacherTargets(topk_ids=ids.astype(np.int32).reshape(rows, L, -1),
                           topk_logprobs=lp.astype(np.float16).reshape(rows, L, -1),
                           logsumexp=(29 + 7 * self.rng.standard_normal((rows, L))).astype(np.float32),
                           target_logprob=target.astype(np.float32))
        if c.samples:
            sid, count, slp = self.samples(ids, lp, c.samples)
            t.sample_ids, t.sample_counts, t.sample_logprobs = (a.reshape(rows, L, -1) for a in (sid, count, slp))
        if c.final_hidden:
            t.final_hidden = self.hidden(rows, 1, L, WIDTH)[:, 0]
        if c.hidden_layers:
            h = self.hidden(rows, len(c.hidden_layers), L, WIDTH, int8=c.hidden_dtype == "int8")
            t.hidden_states, t.hidden_scale = h if c.hidden_dtype == "int8" else (h, None)
        return t


def quantize_int8(h: np.ndarray) -> np.ndarray:
    """The int8 values of float16 states `h`, quantized per vector of the last axis as the capture does."""
    x = h.astype(np.float32)
    return np.rint(x / np.maximum(np.abs(x).max(-1, keepdims=True) / 127.0, np.finfo(np.float32).tiny)).astype(np.int8)


# ---------------------------------------------------------------------------------------------- the writer, driven


class ReplayTeacher:
    """A teacher that costs nothing: `submit` hands over the batches of `pool` in turn, as already on the host."""

    def __init__(self, pool: list[TeacherTargets]):
        self.pool, self.calls = pool, 0

    def submit(self, input_ids, lengths, position_ids=None, seed=None) -> Done:
        t = self.pool[self.calls % len(self.pool)]
        self.calls += 1
        assert t.logsumexp.shape == input_ids.shape, "the pool's batches must match the loop's"
        return Done(t)


class FullRows:
    """What `run_shards` reads of the prepared rows: full rows of `seq_len` tokens (packed rows are full)."""

    def __init__(self, seq_len: int):
        self.splits, self.seq_len = {"train": self}, seq_len

    def read(self, a: int, b: int):
        return SimpleNamespace(input_ids=np.zeros((b - a, self.seq_len), np.int32),
                               lengths=np.full(b - a, self.seq_len, np.int32), position_ids=None, labels=None)


class NoBar:
    def update(self, n: int) -> None:
        pass


def capture_config(fs: FieldSet, shape: Shape, hidden_codec: str | None) -> TeacherCacheConfig:
    capture = {"top_k": TOP_K, "rows_per_shard": shape.rows_per_shard, "rows_per_chunk": shape.rows_per_chunk,
               "batch_size": shape.batch_size, **({"hidden_codec": hidden_codec} if hidden_codec else {}), **fs.capture}
    return TeacherCacheConfig.model_validate({"teacher": {"model": "synthetic"},
                                              "data": {"source": "parquet", "seq_len": shape.seq_len},
                                              "capture": capture, "output": {"dir": "unused"}})


def field_specs_of(cfg: TeacherCacheConfig, fs: FieldSet) -> list[FieldSpec]:
    """The fields and codecs the capture itself derives (`capture_specs`) for a Llama-3-8B-shaped teacher."""
    spec = TeacherSpec("llama", VOCAB, WIDTH, 32, 32, 131_072, None, None, None, 14_336)
    specs = capture_specs(cfg, TeacherFacts(spec, None, list(cfg.capture.hidden_layers), [], None, None))
    return [dataclasses.replace(s, **fs.codecs.get(s.name, {})) for s in specs]


def plan_of(cfg: TeacherCacheConfig, specs: list[FieldSpec], rows: int) -> Manifest:
    """The part of a plan the writer reads (`build_plan` needs a tokenizer and a corpus): capture settings, the split."""
    c = cfg.capture
    part = {"path": "train", "row_start": 0, "rows": rows, "tokens": rows * cfg.data.seq_len,
            "shards": len(shard_ranges(rows, c.rows_per_shard))}
    return Manifest.from_dict({
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "capture": c.model_dump(),
        "splits": {"train": {"rows": rows, "tokens": part["tokens"], "shards": part["shards"], "parts": [part]}},
        "fields": {s.name: s.to_dict({"train": rows}, c.rows_per_chunk, c.rows_per_shard) for s in specs}})


@dataclass
class Run:
    field_set: str
    writers: int
    shards: int
    tokens: int
    seconds: float  # wall, the shard loop alone
    cpu_seconds: float  # of the process, every thread
    bytes_in: int  # uncompressed, in the stored dtypes
    stored: dict[str, int]  # bytes on disk per field
    pieces: dict[str, float] = field(default_factory=dict)  # seconds per piece of the shard writes (in line)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes_in / self.seconds / 1e6

    @property
    def stored_per_token(self) -> float:
        return sum(self.stored.values()) / self.tokens


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def write_cache(work: Path, cfg, specs, teacher: ReplayTeacher, shards: int, writers: int, name: str,
                pieces: bool = False) -> Run:
    """`shards` shards through `run_shards` into a fresh cache under `work` (removed after)."""
    c, L = cfg.capture, cfg.data.seq_len
    rows = shards * c.rows_per_shard
    folder = Path(tempfile.mkdtemp(dir=work))
    # frequency codes: an order fitted on the synthetic top-1 ids (the rows' tokens, as it were)
    writer = CacheWriter(folder, plan_of(cfg, specs, rows), specs, {"train": rows}, fit_order=lambda split:
                         idcodes.fit_order([t.topk_ids[..., 0].ravel() for t in teacher.pool], VOCAB))
    writer.create_arrays()
    todo = [("train", i, a, b) for i, (a, b) in enumerate(shard_ranges(rows, c.rows_per_shard))]
    with (timed_pieces(writer) if pieces else nullcontext({})) as times:
        t0, c0 = time.perf_counter(), cpu_seconds()
        run_shards(teacher, FullRows(L), todo, writer, c.batch_size, NoBar(), writers)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    stored: dict[str, int] = {}
    for rec in writer.commit_records():
        for rel, d in rec["files"].items():
            stored[field_of(rel, rec["part"])] = stored.get(field_of(rel, rec["part"]), 0) + d["bytes"]
    shutil.rmtree(folder)
    bytes_in = rows * sum(s.bytes_per_row for s in specs)
    return Run(name, writers, shards, rows * L, seconds, cpu, bytes_in, stored, dict(times))


@contextmanager
def timed_pieces(writer: CacheWriter):
    """Wall seconds of the pieces of in-line shard writes, by wrapping what `write_shard` calls (restored after):
    zarr's encode and file writes are what `CacheWriter.write_shard` spends besides the others."""
    times: dict[str, float] = {}

    def timed(name, f):
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        return wrapped

    saved = (capture_shards.shard_stats, writer_module.sync_file, writer_module.write_json, TeacherTargets.concat)
    capture_shards.shard_stats = timed("shard_stats", saved[0])
    writer_module.sync_file = timed("fsync (files, dirs)", saved[1])
    writer_module.write_json = timed("commit record", saved[2])
    TeacherTargets.concat = staticmethod(timed("concat batches", saved[3]))
    writer.st.digest = timed("sha256 read-back", writer.st.digest)
    writer.write_shard = timed("write_shard", writer.write_shard)
    try:
        yield times
    finally:
        capture_shards.shard_stats, writer_module.sync_file, writer_module.write_json = saved[:3]
        TeacherTargets.concat = staticmethod(saved[3])
    inside = sum(v for k, v in times.items() if k in ("fsync (files, dirs)", "commit record", "sha256 read-back"))
    times["zarr encode + write"] = times.pop("write_shard") - inside


# ---------------------------------------------------------------------------------------------- measurements


POOLS: dict[tuple, list[TeacherTargets]] = {}  # made once per run of the benchmark: the codecs do not change values


def pool_of(gen: TargetGenerator, cfg) -> list[TeacherTargets]:
    """One shard's batches (every shard writes the same values: compression does not reach across shards)."""
    c = cfg.capture
    key = (cfg.data.seq_len, c.batch_size, c.rows_per_shard, c.samples, c.final_hidden, tuple(c.hidden_layers),
           c.hidden_dtype)
    if key not in POOLS:
        POOLS[key] = [gen.batch(cfg, c.batch_size) for _ in range(c.rows_per_shard // c.batch_size)]
    return POOLS[key]


def measure(work: Path, gen: TargetGenerator, fs: FieldSet, shape: Shape, hidden_codec, writer_counts, shards,
            repeats: int, warm: bool = True) -> list[Run]:
    """The best (fastest wall) of `repeats` runs at each writer count, runs of one repeat interleaved."""
    cfg = capture_config(fs, shape, hidden_codec)
    specs = field_specs_of(cfg, fs)
    teacher = ReplayTeacher(pool_of(gen, cfg))
    if warm:
        write_cache(work, cfg, specs, teacher, 1, 1, fs.name)  # imports, codec set-up, first-touch of memory
    best: dict[int, Run] = {}
    for _ in range(repeats):
        for w in writer_counts:
            r = write_cache(work, cfg, specs, teacher, shards, w, fs.name)
            if w not in best or r.seconds < best[w].seconds:
                best[w] = r
    print(f"  {fs.name}: " + ", ".join(f"{w} writers {r.tokens_per_s:,.0f} tok/s" for w, r in best.items()),
          flush=True)
    return list(best.values())


def breakdown(work: Path, gen: TargetGenerator, fs: FieldSet, shape: Shape, hidden_codec, shards: int) -> Run:
    cfg = capture_config(fs, shape, hidden_codec)
    specs = field_specs_of(cfg, fs)
    teacher = ReplayTeacher(pool_of(gen, cfg))
    return write_cache(work, cfg, specs, teacher, shards, 0, fs.name, pieces=True)


def cpu_time_of(f, least: float = 0.2):
    """(the fewest CPU seconds of this thread one call of `f` took, over calls for at least `least` seconds, after
    one to warm; its result)."""
    result, best, spent = f(), float("inf"), 0.0
    while spent < least:
        c0 = time.thread_time()
        result = f()
        t = time.thread_time() - c0
        best, spent = min(best, max(t, 1e-9)), spent + t + 1e-4
    return best, result


def zarr_write_seconds(data: np.ndarray, repeats: int = 3) -> float:
    """The fewest process CPU seconds (zarr encodes on its own threads) of writing `data` as one shard of
    single-row chunks through zarr with no codec into memory: zarr's own cost, beside one copy's."""
    import zarr

    arr = zarr.create_array(zarr.storage.MemoryStore(), shape=data.shape, dtype=data.dtype,
                            chunks=(1, *data.shape[1:]), shards=data.shape, compressors=None, fill_value=0,
                            config={"write_empty_chunks": True})
    best = float("inf")
    for _ in range(repeats):
        c0 = cpu_seconds()
        arr[:] = data
        best = min(best, cpu_seconds() - c0)
    return best


def parallel_ceiling(threads: int, seconds: float = 1.0) -> float:
    """How much more `threads` threads of GIL-free C work (sha256 of 16 MB) get done than one thread, on this machine
    now: the ceiling of any writer scaling here (other work on the machine lowers it)."""
    import threading

    buf = np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8)

    def done(n: int) -> int:
        counts = [0] * n

        def work(i: int) -> None:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                hashlib.sha256(buf).digest()
                counts[i] += 1
        pool = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return sum(counts)

    return done(threads) / max(done(1), 1)


def codec_speeds(gen: TargetGenerator, shape: Shape, hidden_codec) -> list[dict]:
    """Each field's codec alone on one chunk (numcodecs' equivalents of the zarr codecs the specs name), and sha256
    and the writer's int narrowing (sample ids and counts arrive as int64): MB/s of input per CPU-second."""
    from numcodecs import PCodec, Shuffle, Zstd

    fs = FieldSet("all", {"samples": SAMPLES, "hidden_layers": LAYERS, "final_hidden": True})
    cfg = capture_config(fs, shape, hidden_codec)
    t = gen.batch(cfg, shape.rows_per_chunk).fields()
    out = []
    for s in field_specs_of(cfg, fs):
        data = np.ascontiguousarray(t[s.name].astype(s.dtype))
        level = s.level if s.level is not None else cfg.capture.compression_level
        steps = {"pcodec": [PCodec(level=level if s.level is not None else 8)],
                 "shuffle-zstd": [Shuffle(elementsize=data.itemsize), Zstd(level=level)],
                 "zstd": [Zstd(level=level)] if level else [], "none": []}[s.codec]

        def encode(data=data, steps=steps):
            for step in steps:
                data = step.encode(data)
            return data
        seconds, buf = cpu_time_of(encode)
        out.append({"field": s.name, "codec": f"{s.codec} {level}" if steps else "none",
                    "MB/CPU-s": data.nbytes / 1e6 / seconds, "ratio": data.nbytes / len(bytes(buf))})
    big = np.ascontiguousarray(t["hidden_states"])
    seconds, _ = cpu_time_of(lambda: hashlib.sha256(memoryview(big).cast("B")).hexdigest())
    out.append({"field": "(every file)", "codec": "sha256", "MB/CPU-s": big.nbytes / 1e6 / seconds})
    seconds, _ = cpu_time_of(lambda: np.array(big))
    out.append({"field": "hidden_states", "codec": "one copy (np.array)", "MB/CPU-s": big.nbytes / 1e6 / seconds})
    seconds = zarr_write_seconds(big)
    out.append({"field": "hidden_states", "codec": "zarr sharded write, no codec, to memory",
                "MB/CPU-s": big.nbytes / 1e6 / seconds})
    ids = t["sample_ids"]
    seconds, _ = cpu_time_of(lambda: (ids.min(), ids.max(), ids.astype(np.int32)))
    out.append({"field": "sample_ids", "codec": "int64 -> int32 range check + cast (the writer's)",
                "MB/CPU-s": ids.size * 4 / 1e6 / seconds})
    return out


# ---------------------------------------------------------------------------------------------- calibration


def calibration(gen_seed: int = 0) -> list[dict]:
    """The default cache's statistics beside the generator's at the same vocabulary (V = 49,152)."""
    import zarr
    from numcodecs import PCodec, Shuffle, Zstd

    part = DEFAULT_CACHE / "train"
    if not (part / "topk_ids" / "zarr.json").exists():
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real_ids = np.asarray(Cache(DEFAULT_CACHE).array("train", "topk_ids")[:]).reshape(-1, TOP_K)  # ids, not codes
        real_lp = zarr.open_array(str(part / "topk_logprobs"))[:].reshape(-1, TOP_K)
        real_h = zarr.open_array(str(part / "hidden_states"))[:8]  # (8, 3, 256, 576)
    gen = TargetGenerator(Calibration().vocab, gen_seed)
    P = len(real_ids)
    syn_ids, syn_lp = gen.topk_ids(P, TOP_K), gen.logprobs(P, TOP_K).astype(np.float16)
    syn_h = gen.hidden(*real_h.shape)

    def pcodec(a, dtype):
        chunks = a[: P // 1024 * 1024].reshape(-1, 1024, TOP_K).astype(dtype)[:40]
        return chunks.nbytes / sum(len(PCodec(level=8).encode(c)) for c in chunks)

    def shuffled(a):
        a = np.ascontiguousarray(a)
        return a.nbytes / len(Zstd(level=1).encode(Shuffle(elementsize=a.itemsize).encode(a)))

    rows = []
    for name, ids, lp, h in (("default cache", real_ids, real_lp, real_h), ("synthetic", syn_ids, syn_lp, syn_h)):
        cnt = np.sort(np.bincount(ids.ravel(), minlength=Calibration().vocab))[::-1]
        first = np.sort(np.bincount(ids[:, 0], minlength=Calibration().vocab))[::-1]
        lpf = lp.astype(np.float32)
        rows.append({"values": name, "top-10 / 100 / 1k ids' share": " / ".join(
            f"{cnt[:q].sum() / cnt.sum():.2f}" for q in (10, 100, 1000)),
            "top-10 share at rank 0": round(first[:10].sum() / P, 2),
            "log p rank 0 / 1 / 63 (mean)": " / ".join(f"{lpf[:, k].mean():.2f}" for k in (0, 1, 63)),
            "ids pcodec 8": round(pcodec(ids, np.uint16), 3), "log p pcodec 8": round(pcodec(lp, np.float16), 3),
            "hidden shuffle-zstd 1": round(shuffled(h), 3),
            "hidden int8 shuffle-zstd 1": round(shuffled(quantize_int8(h)), 3)})
    rows.append({"values": "synthetic at the benchmark's d = 4,096", "hidden shuffle-zstd 1": round(
        shuffled(big := TargetGenerator(VOCAB, gen_seed).hidden(1, 1, 1024, WIDTH)), 3),
        "hidden int8 shuffle-zstd 1": round(shuffled(quantize_int8(big)), 3)})
    return rows


# ---------------------------------------------------------------------------------------------- tables


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(none)"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: f"{v:,.0f}" if isinstance(v, float) and abs(v) >= 100 else (  # noqa: E731
        f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v)))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def throughput_rows(runs: list[Run]) -> list[dict]:
    one = {r.field_set: r for r in runs if r.writers == 1}
    return [{"field set": r.field_set, "writers": r.writers if r.writers else "0 (in line)",
             "tokens/s": r.tokens_per_s, "MB/s in": r.mb_per_s, "bytes/token in": r.bytes_in / r.tokens,
             "bytes/token stored": r.stored_per_token, "ratio": r.bytes_in / max(sum(r.stored.values()), 1),
             "tokens/CPU-s": r.tokens_per_cpu_s, "CPU/wall": r.cpu_seconds / r.seconds,
             "x over 1 writer": r.tokens_per_s / one[r.field_set].tokens_per_s if r.field_set in one else None}
            for r in runs]


def piece_rows(runs: list[Run]) -> list[dict]:
    out = []
    for r in runs:
        shards, total = r.shards, r.seconds
        row = {"field set": r.field_set, "s/shard": total / shards, "CPU-s/shard": r.cpu_seconds / shards}
        for k in ("concat batches", "shard_stats", "zarr encode + write", "sha256 read-back", "fsync (files, dirs)",
                  "commit record"):
            row[k] = f"{r.pieces.get(k, 0.0) / shards:.3f} ({100 * r.pieces.get(k, 0.0) / total:.0f}%)"
        out.append(row)
    return out


def gpu_tokens_per_s(params: float) -> float:
    """Tokens/s of one H100 SXM at MFU of its dense bf16 peak, 2 x params FLOP per token (forward only)."""
    return MFU * H100_BF16_DENSE / (2 * params)


def gpu_rows(runs: list[Run]) -> tuple[list[dict], dict]:
    """GPUs' output one writer core sustains: tokens per CPU-second at one writer / one GPU's tokens/s; hidden
    fields' CPU cost beyond top-K scaled by width / 4,096."""
    cost = {r.field_set: 1 / r.tokens_per_cpu_s for r in runs if r.writers == 1}  # CPU-s per token
    base = cost["top-K"]
    rows, per = [], {}
    for fs in FIELD_SETS:
        row = {"field set": fs.name}
        for teacher, (params, width) in TEACHERS.items():
            c = base + (cost[fs.name] - base) * width / WIDTH if fs.hidden else cost[fs.name]
            per[(fs.name, teacher)] = (1 / c) / gpu_tokens_per_s(params)
            row[f"{teacher} (d={width:,}): GPUs/core"] = per[(fs.name, teacher)]
        rows.append(row)
    return rows, per


def goals(per: dict, runs: list[Run], cores: int, ceiling: list[float]) -> list[str]:
    def met(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    lines = []
    for name in ("top-K", "top-K + samples"):
        v = per[(name, "1B")]
        lines.append(f"{name}, 1B teacher: {v:.2f} H100s per core (goal >= 1): {met(v >= 1)}")
    for name in ("top-K + 3 hidden f16", "top-K + 3 hidden int8"):
        v = per[(name, "8B")]
        lines.append(f"{name}, 8B teacher (d=4,096): {v:.2f} H100s per core, {2 * v:.2f} per 2 cores "
                     f"(goal >= 1 per 2 cores): {met(2 * v >= 1)}")
    for fs in FIELD_SETS:
        mine = {r.writers: r for r in runs if r.field_set == fs.name}
        top = max(mine)
        if top > 1:
            x = mine[top].tokens_per_s / mine[1].tokens_per_s
            lines.append(f"{fs.name}: {top} writers give {x:.2f}x one writer's tokens/s (linear: {top}x; "
                         f"taken as met at >= {0.8 * top:.1f}x): {met(x >= 0.8 * top)}; this machine's ceiling "
                         f"({top} threads of sha256 over one, before / after): "
                         + " / ".join(f"{c:.2f}x" for c in ceiling))
    return lines


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shards, one repeat, no codec rows: a smoke run")
    ap.add_argument("--hidden-codec", choices=["shuffle-zstd", "zstd", "none"], default=None,
                    help="codec of the hidden fields (default: the capture's own default)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per point, the fastest kept (default 2; quick 1)")
    ap.add_argument("--work", type=Path, default=None, help="where caches are written (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    repeats = args.repeats or (1 if args.quick else 2)
    shape = Shape(seq_len=1024) if args.quick else Shape()  # a smoke run: shards of 8,192 tokens
    writer_counts = [0, *range(1, cores + 1)]

    def shards_of(fs: FieldSet) -> int:  # a multiple of every writer count; top-K shards are cheap: more of them
        return cores if fs.hidden or fs.slow else (2 if args.quick else 6) * cores

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-host-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = capture_config(FIELD_SETS[3], shape, args.hidden_codec)
    codecs = ", ".join(f"{s.name} {s.codec}" + (f" {s.level}" if s.level is not None else "")
                       for s in field_specs_of(cfg, FIELD_SETS[3]))
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"settings: {cores} cores, load average {os.getloadavg()[0]:.1f} at start; V = {VOCAB:,}, K = {TOP_K}, "
          f"samples = {SAMPLES}, width {WIDTH:,}, hidden layers {LAYERS}; seq_len {shape.seq_len}, "
          f"{shape.rows_per_shard} rows per shard ({shape.rows_per_shard * shape.seq_len:,} tokens), "
          f"{shape.rows_per_chunk} per chunk, batch {shape.batch_size} rows; writers {writer_counts}; best of "
          f"{repeats}; work in {work}\ncodecs (capture_specs, capture defaults, zstd level "
          f"{cfg.capture.compression_level} where none given): {codecs}", flush=True)
    t_start = time.perf_counter()
    try:
        report = run_all(args, work, shape, writer_counts, shards_of, repeats, cores)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; {time.perf_counter() - t_start:.0f}s in all, "
          f"{cpu_seconds():.0f} CPU-s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


def run_all(args, work: Path, shape: Shape, writer_counts, shards_of, repeats: int, cores: int) -> dict:
    ceiling = [parallel_ceiling(cores)]
    cal = calibration()
    print("\n## Synthetic values against the default cache (V = 49,152, d = 576)\n")
    print(markdown(cal) if cal else f"({DEFAULT_CACHE} is missing: no calibration shown)")
    gen = TargetGenerator(VOCAB)
    print("\n## Writer throughput\n", flush=True)
    runs = [r for fs in FIELD_SETS
            for r in measure(work, gen, fs, shape, args.hidden_codec, writer_counts, shards_of(fs), repeats)]
    print("\n" + markdown(throughput_rows(runs)))
    codec_runs = []
    if not args.quick:
        print("\n## Codecs at one writer (top-K rows: best of the repeats; hidden rows: one run each)\n",
              flush=True)
        main_codec = args.hidden_codec or "shuffle-zstd"
        for fs in CODEC_ROWS:
            if fs.capture.get("hidden_codec") == main_codec:
                same = next(r for r in runs if r.field_set == "top-K + 3 hidden f16" and r.writers == 1)
                codec_runs.append(dataclasses.replace(same, field_set=fs.name))
            else:
                codec_runs += measure(work, gen, fs, shape, args.hidden_codec, [1], shards_of(fs),
                                      1 if fs.hidden else repeats, warm=not fs.hidden)  # the hidden rows cost most
        print("\n" + markdown(throughput_rows([*(r for r in runs if r.field_set == "top-K" and r.writers == 1),
                                               *codec_runs])))
        print("\nStored bytes per token by field: " + "; ".join(
            f"{r.field_set}: " + ", ".join(f"{k} {v / r.tokens:,.0f}" for k, v in sorted(r.stored.items()))
            for r in codec_runs if not r.field_set.startswith("top-K + 3")))
    print("\n## Pieces of an in-line shard write (wall seconds per shard, share of the shard loop)\n", flush=True)
    pieces = [breakdown(work, gen, fs, shape, args.hidden_codec, 1 if args.quick else 2) for fs in FIELD_SETS]
    print(markdown(piece_rows(pieces)))
    speeds = codec_speeds(gen, shape, args.hidden_codec)
    print("\nEach codec alone on one chunk (MB of input per CPU-second, numcodecs' equivalents):\n")
    print(markdown(speeds))
    rows, per = gpu_rows(runs)
    print(f"\n## GPUs' output one writer core sustains\n\nOne H100 SXM at {MFU:.0%} MFU of {H100_BF16_DENSE / 1e12:.0f} "
          f"TFLOP/s (dense bf16), 2 x N FLOP per token (forward matmuls; attention's L^2 term ignored): "
          + ", ".join(f"{t} ({p / 1e9:.1f}e9 params) {gpu_tokens_per_s(p):,.0f} tokens/s"
                      for t, (p, _) in TEACHERS.items())
          + ". Per core: tokens per CPU-second at one writer; hidden fields' cost beyond top-K scaled by width / "
            "4,096.\n")
    print(markdown(rows))
    print("\n## Goals\n")
    ceiling.append(parallel_ceiling(cores))
    verdicts = goals(per, runs, cores, ceiling)
    print("\n".join(f"- {v}" for v in verdicts))
    return {"settings": {**dataclasses.asdict(shape), "vocab": VOCAB, "top_k": TOP_K, "samples": SAMPLES,
                         "width": WIDTH, "hidden_layers": LAYERS, "cores": cores, "repeats": repeats,
                         "hidden_codec": args.hidden_codec, "mfu": MFU, "gpu_flops": H100_BF16_DENSE},
            "calibration": cal, "runs": [dataclasses.asdict(r) | {"tokens_per_s": r.tokens_per_s,
                                                                  "tokens_per_cpu_s": r.tokens_per_cpu_s,
                                                                  "mb_per_s": r.mb_per_s} for r in runs],
            "codec_runs": [dataclasses.asdict(r) for r in codec_runs],
            "pieces": [dataclasses.asdict(r) for r in pieces], "codec_speeds": speeds,
            "gpus_per_core": rows, "goals": verdicts, "parallel_ceiling": ceiling}


if __name__ == "__main__":
    main()
