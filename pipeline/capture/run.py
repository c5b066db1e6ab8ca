"""Stage 1 end to end: settings -> checks -> prepared rows -> teacher targets -> finished cache.

Everything that can be checked without the teacher's weights is checked first (settings
against the model config, the dataset, the output directory, the disk), so bad input fails
in seconds. Shards are computed in order; each is handed to a pool of writer threads (several
shards in flight, at most one per writer) while the next ones are computed, and committed when
its files are on disk. A rerun of the same command resumes at the first uncommitted shard;
batches never cross shards, so the bytes are the same as an uninterrupted run's.

On several ranks (torchrun), every rank loads the teacher and computes its share of the shards;
rank 0 alone prepares the output (`output.prepare_output`) and writes the manifest once every
shard is committed.
"""

from __future__ import annotations

import os
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import distributed, models
from ..config import TeacherCacheConfig
from ..errors import CaptureError, StorageError, TeacherError
from ..format.index import field_of
from ..format.layout import HEAD_FILE, IGNORE_INDEX, MANIFEST
from ..format.manifest import Manifest
from ..format.records import Stats
from ..format.reader import read_manifest
from ..format.specs import FieldSpec, field_specs
from ..format.storage import Storage
from ..format.writer import CacheWriter
from .arrival import warn_if_grouped
from .checks import (check_output_dir, check_settings, check_task, check_teacher_document_masking, first_rows_check,
                     row_pad_id, stored_heads)
from .memory import WorkingSet, check_memory, parameter_count, working_set
from .output import Output, prepare_output, store_head, writer_lock
from .plan import Append, TaskInfo, append_base, build_plan, cached_keys, plan_append, same_rows_on_every_rank
from .rows import Prepared, prepare
from .targets import ClassTargetComputer, TargetComputer, TeacherTargets


@dataclass
class CaptureResult:
    root: Path | str  # a local directory, or the URL captured to
    manifest: Manifest
    resumed_shards: int
    computed_shards: int
    shard_seconds: float = 0.0  # this rank's shard loop alone (targets, writes, checksums, commits), wall clock


@dataclass(frozen=True)
class TeacherFacts:
    """What the capture knows of its teacher before loading its weights."""

    spec: models.TeacherSpec
    tokenizer: object
    hidden: list[int]  # resolved hidden-state indices
    attention: list[int]  # resolved attention layers
    device: object  # torch.device
    task: TaskInfo | None  # a classifier's labels; None for a causal LM
    memory: WorkingSet | None = None  # the device memory it will take, estimated


def run_capture(cfg: TeacherCacheConfig, log: Callable[[str], None] = print, progress: bool = True,
                model=None) -> CaptureResult:
    """Capture (or resume, or grow) the cache of `cfg`: in this process, or as one rank of a torchrun
    launch, where every rank loads the teacher, the ranks compute disjoint shards and rank 0 prepares
    the output and finalizes the manifest once every shard is committed. `model`: the teacher of
    `cfg.teacher` already loaded on its device (it is then not loaded again)."""
    ranks = distributed.setup()
    if not ranks.main:
        log, progress = (lambda m: None), False
    st = Storage(cfg.output.dir, cfg.output.storage_options)
    teacher = describe_teacher(cfg)
    distributed.on_main(lambda: check_output_dir(st))
    with ExitStack() as held:
        if st.is_local:  # object stores have no lock: one capture per URL is the user's to ensure
            distributed.on_main(lambda: held.enter_context(writer_lock(st.local_path())))  # rank 0 holds it
        return _locked_capture(cfg, st, teacher, log, progress, model)


def describe_teacher(cfg: TeacherCacheConfig) -> TeacherFacts:
    """The teacher's tokenizer, architecture and task, its settings checked: no weights loaded."""
    tokenizer = models.load_tokenizer(cfg.teacher)
    model_config = models.load_model_config(cfg.teacher)
    spec = models.TeacherSpec.from_config(model_config)
    labels = check_task(cfg, model_config)
    hidden, attn = check_settings(cfg, spec, tokenizer)
    device = teacher_device(cfg)
    task = None if labels is None else TaskInfo(cfg.teacher.task, labels, row_pad_id(model_config, tokenizer),
                                                models.bidirectional(model_config, cfg.teacher.task))
    ws = working_set(cfg, spec, parameter_count(model_config, cfg.teacher.task), len(hidden), len(attn),
                     stored_heads(cfg.capture, spec))
    check_memory(cfg, ws, device, weight_shards(cfg))
    return TeacherFacts(spec, tokenizer, hidden, attn, device, task, ws)


def weight_shards(cfg: TeacherCacheConfig) -> int:
    """Over how many devices a teacher.device_map spreads the weights (1 without one)."""
    import torch

    dm = cfg.teacher.device_map
    if isinstance(dm, dict):
        return len(set(dm.values()))
    return max(1, torch.cuda.device_count()) if dm else 1


def teacher_device(cfg: TeacherCacheConfig):
    """The device this rank runs the teacher on (its first device under a device_map)."""
    import torch

    dm = cfg.teacher.device_map
    if dm is not None:
        if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise CaptureError("teacher.device_map places one teacher over every device of a node: launch one rank "
                               "per node (torchrun --nproc_per_node 1), not "
                               f"{os.environ['LOCAL_WORLD_SIZE']}")
        on_gpu = torch.cuda.is_available() and not (isinstance(dm, dict) and
                                                    all(str(v) in ("cpu", "disk") for v in dm.values()))
        return torch.device("cuda" if on_gpu else "cpu")  # where the layers go is accelerate's; inputs follow them
    try:  # 'auto' and 'cuda' mean this rank's GPU under torchrun
        return distributed.device_for(cfg.teacher.device)
    except ValueError as e:
        raise TeacherError(str(e)) from None


def _locked_capture(cfg: TeacherCacheConfig, st: Storage, teacher: TeacherFacts, log, progress, model=None
                    ) -> CaptureResult:
    cfg = _append_codec(cfg, st, log)
    appending = cfg.output.mode == "append"
    if appending:
        append_base(st)  # before the corpus is read: a location without a finished cache is refused at once
    prepared = prepare(cfg.data, teacher.tokenizer, min_validation=not appending, task=cfg.teacher.task,
                       labels=teacher.task.labels if teacher.task else None,
                       pad_id=teacher.task.pad_id if teacher.task else None, shard_rows=cfg.capture.rows_per_shard,
                       cached_keys=cached_keys(st) if appending else None)
    try:
        warn_if_grouped(cfg.data, prepared, cfg.capture.rows_per_shard, log)
        return _capture_prepared(cfg, st, teacher, prepared, log, progress, model)
    finally:
        prepared.close()


def _capture_prepared(cfg: TeacherCacheConfig, st: Storage, teacher: TeacherFacts, prepared: Prepared, log, progress,
                      model=None) -> CaptureResult:
    out = st.where
    specs = capture_specs(cfg, teacher)
    weights = distributed.on_main(lambda: models.weights_fingerprint(cfg.teacher))  # hashed once, not per rank
    plan = build_plan(cfg, teacher.spec, teacher.tokenizer, prepared, teacher.hidden, teacher.attention, specs,
                      teacher.device.type, weights, teacher.task)
    base = None
    if cfg.output.mode == "append":  # read-only, on every rank: which rows are new
        append: Append = plan_append(st, plan, prepared, cfg, log)
        base, prepared = append.base, append.prepared
        plan = append.plan if append.plan is not None else base.plan()
    same_rows_on_every_rank(plan, prepared)
    # rank 0 alone checks and prepares the output; every rank gets its decision and the shards to do
    outcome: Output = distributed.on_main(lambda: prepare_output(cfg, st, plan, base, prepared, specs,
                                                                 teacher.tokenizer, log))
    if outcome.finished is not None:
        return CaptureResult(out, outcome.finished, resumed_shards=outcome.committed, computed_shards=0)
    writer = CacheWriter(st, Manifest.from_dict(plan), specs, {s: len(r) for s, r in prepared.splits.items()}, base)
    writer.create_arrays()  # opens what rank 0 created
    computer, seconds = _compute(cfg, st, teacher, prepared, outcome.todo, writer, base, log, progress, model)
    loaded = computer.model if computer is not None else model
    manifest = distributed.on_main(lambda: _finish(cfg, st, writer, base, loaded, log))
    return CaptureResult(out, manifest, resumed_shards=outcome.committed, computed_shards=len(outcome.todo),
                         shard_seconds=seconds)


def _append_codec(cfg: TeacherCacheConfig, st: Storage, log) -> TeacherCacheConfig:
    """An append stores the top-K values and the hidden states with the codecs of the cache it grows (the
    manifest records one codec per field)."""
    if cfg.output.mode != "append" or not st.exists(MANIFEST):
        return cfg
    base = read_manifest(st).capture
    update = {k: getattr(base, k) for k in ("topk_codec", "hidden_codec") if getattr(base, k) != getattr(cfg.capture, k)}
    if not update:
        return cfg
    log("appending with " + ", ".join(f"capture.{k}={v!r}" for k, v in update.items())
        + f", the codec{'s' if len(update) > 1 else ''} of the cache at {st.where}")
    return cfg.model_copy(update={"capture": cfg.capture.model_copy(update=update)})


def capture_specs(cfg: TeacherCacheConfig, teacher: TeacherFacts) -> list[FieldSpec]:
    c, spec, task = cfg.capture, teacher.spec, teacher.task
    hidden, attn = teacher.hidden, teacher.attention
    return field_specs(
        seq_len=cfg.data.seq_len, top_k=c.top_k, n_temperatures=len(c.temperatures),
        hidden=(len(hidden), spec.hidden_size) if hidden else None, hidden_dtype=c.hidden_dtype,
        attention=(len(attn), stored_heads(c, spec)) if attn else None, vocab_size=spec.vocab_size,
        topk_codec=c.topk_codec, hidden_codec=c.hidden_codec, samples=c.samples,
        final_hidden=(spec.hidden_size, c.final_hidden_dtype) if c.final_hidden else None,
        classes=len(task.labels.names) if task else None, per_token=bool(task and task.per_token))


def _compute(cfg: TeacherCacheConfig, st: Storage, teacher: TeacherFacts, prepared: Prepared, todo, writer: CacheWriter,
             base: Manifest | None, log, progress, model=None):
    """This rank's share of the shards `todo`, with the teacher loaded only when it has one (unless given): (the
    target computer, None when it computed nothing; the seconds of its shard loop)."""
    if not todo:
        return None, 0.0
    ranks = distributed.ranks()
    mine = todo[ranks.rank::ranks.world]
    computer = None
    if mine:
        if model is None:
            t0 = time.perf_counter()
            model = models.load_model(cfg.teacher, teacher.device)
            log(f"teacher loaded on {teacher.device} in {time.perf_counter() - t0:.1f}s"
                + (f"; {ranks.world} ranks share {len(todo)} shards" if ranks.active else ""))
        computer = (TargetComputer(model, teacher.spec, cfg.capture, teacher.hidden, teacher.attention)
                    if teacher.task is None else
                    ClassTargetComputer(model, cfg.capture, teacher.hidden, teacher.attention, teacher.task.per_token))
        if cfg.data.document_mask:
            check_teacher_document_masking(computer, teacher.spec, cfg.teacher.dtype)
        if ranks.main and teacher.task is None:
            if cfg.capture.final_hidden and base is None and not st.exists(HEAD_FILE):
                store_head(st, cfg, model)  # now, from the loaded model: a resume need not load it for this
            first = prepared.splits.get("train") or next(iter(prepared.splits.values()))
            for line in first_rows_check(computer, first.read(0, min(2, len(first))), teacher.tokenizer,
                                         prepared.convention, teacher.spec):
                log(line)
    total = sum(int(prepared.splits[s].shard_tokens[i]) for s, i, _, _ in todo)
    seconds = 0.0
    with Progress(total, progress) as bar:
        if mine:
            t0 = time.perf_counter()
            writers = writer_threads(teacher.device, cfg.capture.writers)
            log(f"{writers} writer thread{'s' if writers != 1 else ''}" if writers else "shards written in line")
            run_shards(computer, prepared, mine, writer, cfg.capture.batch_size, bar, writers)
            seconds = time.perf_counter() - t0
        bar.wait_for_ranks()
    return computer, seconds


def _finish(cfg: TeacherCacheConfig, st: Storage, writer: CacheWriter, base: Manifest | None, model, log
            ) -> Manifest:
    """Rank 0, once every shard is committed: the LM head (if not stored yet: from `model`, the loaded teacher,
    or loaded for it), the statistics, the manifest."""
    if cfg.capture.final_hidden and base is None and not st.exists(HEAD_FILE):
        store_head(st, cfg, model)
    manifest = writer.finalize(Tally(writer.plan, base))
    stats = manifest.stats
    quality = (f"mean top-{cfg.capture.top_k} mass {stats.mean_topk_mass:.4f}" if stats.mean_topk_mass is not None
               else "teacher accuracy " + ", ".join(f"{k} {v:.4f}" for k, v in stats.teacher_accuracy.items()))
    log(f"finished {st.where}: {stats.tokens:,} tokens, {stats.tokens_per_second:,.0f} tokens/s"
        f"{' per rank' if distributed.ranks().active else ''}, {quality}")
    return manifest


def writer_threads(device, setting: int | None = None) -> int:
    """How many threads write shards beside the teacher's loop (0: each shard is written in line). `setting`
    (capture.writers) when set; else, with a GPU, up to 4, leaving a core per rank to the loop that feeds it;
    on a CPU, one when torch leaves a core idle, else none: a writer competing with torch's OpenMP threads
    stalls every parallel region, which costs far more than writing in line (measured: see the capture
    figures in the docs)."""
    import torch

    if setting is not None:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if device.type == "cuda":
        return max(1, min(4, per_rank - 1))
    return 1 if per_rank > torch.get_num_threads() else 0


class Progress:
    """One progress bar for the whole capture, on rank 0: tokens computed by every rank, counted in
    the launcher's key-value store (no collective, so ranks never wait on each other while working);
    its rate is the job's tokens/s, summed over ranks."""

    runs = 0  # captures run in this process group so far: each counts under its own keys

    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm

        Progress.runs += 1
        self.KEY, self.DONE = f"distill/capture/{Progress.runs}/tokens", f"distill/capture/{Progress.runs}/done"
        self.ranks = distributed.ranks()
        self.store = distributed.store() if self.ranks.active else None
        self.bar = tqdm(total=total, unit="tok", unit_scale=True, desc="capture", disable=not enabled, smoothing=0.1)

    def update(self, n: int) -> None:
        if self.store is None:
            self.bar.update(n)
            return
        done = self.store.add(self.KEY, n)
        if self.ranks.main:
            self.bar.update(done - self.bar.n)

    def wait_for_ranks(self, poll: float = 0.5) -> None:
        """Until every rank has committed its shards (the bar moves on while others work)."""
        if self.store is None:
            return
        self.store.add(self.DONE, 1)
        while self.store.add(self.DONE, 0) < self.ranks.world:
            self.update(0)
            time.sleep(poll)
        self.update(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def run_shards(computer, prepared: Prepared, todo, writer: CacheWriter, batch_size: int, bar: Progress,
               writers: int) -> None:
    """Compute and commit the shards `todo`. With `writers` threads, each computed shard is handed to the pool
    (its device-to-host copies still under way) and the loop goes on with the next; at most `writers` shards are
    in flight, so host memory holds at most writers + 1 shards. The seconds the loop waits for a free writer are
    recorded with the next shard it hands over (the manifest's timing.writer_wait_seconds). With 0, each shard is
    written in line."""
    in_flight: deque[Future] = deque()
    wait = 0.0
    with ThreadPoolExecutor(max_workers=max(1, writers), thread_name_prefix="cache-writer") as pool:
        try:
            for split, index, a, b in todo:
                t0 = time.perf_counter()
                rows, batches = shard_batches(computer, prepared, split, a, b, writer.parts[split]["row_start"],
                                              batch_size, bar)
                seconds = time.perf_counter() - t0
                if not writers:
                    write_shard(writer, split, index, rows, batches, seconds, 0.0)
                    continue
                t1 = time.perf_counter()
                while len(in_flight) >= writers or (in_flight and in_flight[0].done()):
                    in_flight.popleft().result()  # surfaces write errors
                wait += time.perf_counter() - t1
                in_flight.append(pool.submit(write_shard, writer, split, index, rows, batches, seconds + wait, wait))
                wait = 0.0
            while in_flight:
                in_flight.popleft().result()
        except (OSError, StorageError) as e:
            raise CaptureError(f"writing the cache failed ({getattr(e, 'strerror', None) or e}); committed shards are "
                               "kept: fix the cause and rerun the same command to resume") from e
        finally:
            for f in in_flight:
                f.cancel()


def shard_batches(computer, prepared: Prepared, split: str, a: int, b: int, row_start: int, batch_size: int,
                  bar: Progress) -> tuple:
    """The rows a..b of a split and the teacher's targets for them, batch by batch (batches never cross shards),
    each on its way to the host (`HostBatch`)."""
    rows = prepared.splits[split].read(a, b)
    parts = []
    for s in range(0, b - a, batch_size):
        e = min(s + batch_size, b - a)
        pos = None if rows.position_ids is None else rows.position_ids[s:e]
        seed = [zlib.crc32(split.encode()), row_start + a + s]  # the draws' seed
        parts.append(computer.submit(rows.input_ids[s:e], rows.lengths[s:e], pos, seed))
        bar.update(int(rows.lengths[s:e].sum()))
    return rows, parts


def write_shard(writer: CacheWriter, split: str, index: int, rows, batches: list, seconds: float, wait: float) -> dict:
    """A computed shard on the host (waiting for its copies), its statistics, written and committed."""
    targets = TeacherTargets.concat([p.result() for p in batches])
    stats = shard_stats(targets, rows.lengths, seconds, rows.labels) | {"writer_wait_seconds": wait}
    return writer.write_shard(split, index, targets, stats)


def shard_stats(t: TeacherTargets, lengths: np.ndarray, seconds: float, labels: np.ndarray | None = None) -> dict:
    if t.class_logprobs is not None:  # a classifier: how often it agrees with the gold labels
        pred = t.class_logprobs.argmax(-1)
        known = labels != IGNORE_INDEX
        return {"tokens": int(lengths.sum()), "seconds": seconds, "labelled": int(known.sum()),
                "teacher_correct": int((pred == labels)[known].sum())}
    L = t.logsumexp.shape[1]
    valid = np.arange(L)[None, :] < lengths[:, None]
    mass = np.exp(t.topk_logprobs.astype(np.float32)).sum(-1, dtype=np.float64)  # (B, L)
    return {"tokens": int(lengths.sum()), "seconds": seconds, "topk_mass_sum": float(mass[valid].sum())}


class Tally:
    """The statistics of the cache a writer finishes: its new shards' commit records, given one at a time as
    `CacheWriter.finalize` streams them into the shard index (one pass over them), plus `base`'s when it grows
    one."""

    def __init__(self, plan: Manifest, base: Manifest | None = None):
        old = base.stats if base is not None else Stats(0, 0, 0, {}, 0.0, 0.0, None)
        self.plan, self.base = plan, base
        self.tokens, self.seconds, self.mass = old.tokens, old.seconds, (old.mean_topk_mass or 0.0) * old.tokens
        self.positions = old.tokens  # positions with a target (a capture: every token; an import: trained ones)
        self.wait = old.writer_wait_seconds
        self.per_field = {k: v * old.tokens for k, v in old.bytes_per_token.items()}
        self.right = {s: list(v) for s, v in (old.teacher_correct_labelled or {}).items()}

    def add(self, c: dict) -> None:
        self.tokens += c["tokens"]
        self.seconds += c["seconds"]
        self.wait += c.get("writer_wait_seconds", 0.0)
        for rel, d in c["files"].items():
            name = field_of(rel, c.get("part", c["split"]))
            self.per_field[name] = self.per_field.get(name, 0) + d["bytes"]
        if self.plan.task.classifier:
            r = self.right.setdefault(c["split"], [0, 0])
            r[0], r[1] = r[0] + c["teacher_correct"], r[1] + c["labelled"]
        else:
            self.mass += c["topk_mass_sum"]
            self.positions += c.get("target_positions", c["tokens"])

    def result(self, writer: CacheWriter) -> dict:
        per_field, tokens, right = dict(self.per_field), self.tokens, self.right
        for part in writer.parts.values():
            per_field["rows.parquet"] = per_field.get("rows.parquet", 0) + writer.st.size(f"{part['path']}/rows.parquet")
        if self.base is None and writer.st.exists(HEAD_FILE):
            per_field[HEAD_FILE] = writer.st.size(HEAD_FILE)  # once per cache
        # a classifier's accuracy on the gold labels, per split, over every part; a causal LM's top-K mass
        quality = {"teacher_correct_labelled": right,
                   "teacher_accuracy": {s: a / max(n, 1) for s, (a, n) in right.items()}} \
            if self.plan.task.classifier else {"mean_topk_mass": self.mass / max(self.positions, 1)}
        return quality | {
            "tokens": tokens,
            "rows": sum(s.rows for s in self.plan.splits.values()),
            "bytes_on_disk": round(sum(per_field.values())),
            "bytes_per_token": {k: v / max(tokens, 1) for k, v in per_field.items()},
            "timing": {"seconds": self.seconds, "tokens_per_second": tokens / self.seconds if self.seconds else 0.0,
                       "writer_wait_seconds": self.wait,
                       "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        }
