"""Stage 1 end to end: settings -> checks -> prepared rows -> teacher targets -> finished cache.

Everything that can be checked without the teacher's weights is checked first (settings
against the model config, the dataset, the output directory, the disk: `teacher.describe_teacher`),
so bad input fails in seconds. Then the rows are prepared (`rows.prepare`), the plan is made and
compared with what the output holds (`plan.py`, `output.py`), and the shards left to do are computed
and committed (`shards.run_shards`); a rerun of the same command resumes at the first uncommitted
shard. What every step reads travels as one `CaptureJob`.

On several ranks (torchrun), every rank loads the teacher and computes its share of the shards;
rank 0 alone prepares the output (`output.prepare_output`) and writes the manifest once every
shard is committed. Under tensor parallelism (`teacher.tp_size`, `tensor_parallel.py`) a group of ranks
loads one teacher and computes its group's share, and the group's first rank writes it.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .. import distributed, models
from ..config import TeacherCacheConfig
from ..format.layout import HEAD_FILE, MANIFEST
from ..format.manifest import Manifest
from ..format.reader import read_manifest
from ..format.storage import Storage
from ..format.writer import CacheWriter
from .arrival import warn_if_grouped
from .checks import check_output_dir, check_teacher_document_masking, first_rows_check
from .output import Output, prepare_output, store_head, writer_lock
from .plan import Append, append_base, build_plan, cached_keys, plan_append, same_rows_on_every_rank
from .rows import Prepared, prepare
from .shards import Progress, run_shards, writer_threads
from .targets import ClassTargetComputer, TargetComputer
from .teacher import TeacherFacts, capture_specs, describe_teacher
from .tensor_parallel import Layout, head_gatherer, layout


@dataclass
class CaptureResult:
    root: Path | str  # a local directory, or the URL captured to
    manifest: Manifest
    resumed_shards: int
    computed_shards: int
    shard_seconds: float = 0.0  # this rank's shard loop alone (targets, writes, checksums, commits), wall clock


@dataclass(frozen=True)
class CaptureJob:
    """What every step of one capture reads: its settings, where it writes, what it knows of its teacher, and
    where it reports (on ranks other than 0: nowhere)."""

    cfg: TeacherCacheConfig
    st: Storage
    teacher: TeacherFacts
    log: Callable[[str], None]
    progress: bool
    model: object = None  # the teacher already loaded on its device, when given (it is then not loaded again)
    layout: Layout = Layout()  # this rank's place among the ranks (tensor parallelism: its group, and whether it writes)


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
    job = CaptureJob(cfg, st, teacher, log, progress, model, layout(cfg, teacher.device))
    distributed.on_main(lambda: check_output_dir(st))
    with ExitStack() as held:
        if st.is_local:  # object stores have no lock: one capture per URL is the user's to ensure
            distributed.on_main(lambda: held.enter_context(writer_lock(st.local_path())))  # rank 0 holds it
        return _locked_capture(job)


def _locked_capture(job: CaptureJob) -> CaptureResult:
    job = replace(job, cfg=_append_codec(job.cfg, job.st, job.log))
    cfg, st = job.cfg, job.st
    appending = cfg.output.mode == "append"
    if appending:
        append_base(st)  # before the corpus is read: a location without a finished cache is refused at once
    prepared = prepare(cfg.data, job.teacher.tokenizer, job.teacher.classifier, min_validation=not appending,
                       shard_rows=cfg.capture.rows_per_shard, cached_keys=cached_keys(st) if appending else None)
    try:
        warn_if_grouped(cfg.data, prepared, cfg.capture.rows_per_shard, job.log)
        return _capture_prepared(job, prepared)
    finally:
        prepared.close()


def _capture_prepared(job: CaptureJob, prepared: Prepared) -> CaptureResult:
    cfg, st, teacher = job.cfg, job.st, job.teacher
    specs = capture_specs(cfg, teacher)
    weights = distributed.on_main(lambda: models.weights_fingerprint(cfg.teacher))  # hashed once, not per rank
    plan = build_plan(cfg, teacher, prepared, specs, weights)
    base = None
    if cfg.output.mode == "append":  # read-only, on every rank: which rows are new
        append: Append = plan_append(st, plan, prepared, cfg, job.log)
        base, prepared = append.base, append.prepared
        plan = append.plan if append.plan is not None else base.plan()
    same_rows_on_every_rank(plan, prepared)
    # rank 0 alone checks and prepares the output; every rank gets its decision and the shards to do
    outcome: Output = distributed.on_main(lambda: prepare_output(cfg, st, plan, base, prepared, specs,
                                                                 teacher.tokenizer, job.log))
    if outcome.finished is not None:
        return CaptureResult(st.where, outcome.finished, resumed_shards=outcome.committed, computed_shards=0)
    writer = CacheWriter(st, Manifest.from_dict(plan), specs, {s: len(r) for s, r in prepared.splits.items()}, base,
                         layout=job.layout.record())
    writer.create_arrays()  # opens what rank 0 created
    loaded, seconds = _compute(job, prepared, outcome.todo, writer)
    manifest = distributed.on_main(lambda: _finish(job, writer, loaded))
    return CaptureResult(st.where, manifest, resumed_shards=outcome.committed, computed_shards=len(outcome.todo),
                         shard_seconds=seconds)


def _append_codec(cfg: TeacherCacheConfig, st: Storage, log) -> TeacherCacheConfig:
    """An append stores the top-K values and the hidden states with the codecs of the cache it grows (the
    manifest records one codec per field)."""
    if cfg.output.mode != "append" or not st.exists(MANIFEST):
        return cfg
    base = read_manifest(st).capture
    update = {k: getattr(base, k) for k in ("topk_codec", "hidden_codec", "topk_ids_encoding")
              if getattr(base, k) != getattr(cfg.capture, k)}
    if not update:
        return cfg
    log("appending with " + ", ".join(f"capture.{k}={v!r}" for k, v in update.items())
        + f", the codec{'s' if len(update) > 1 else ''} of the cache at {st.where}")
    return cfg.model_copy(update={"capture": cfg.capture.model_copy(update=update)})


def _compute(job: CaptureJob, prepared: Prepared, todo, writer: CacheWriter):
    """This rank's share of the shards `todo`, with the teacher loaded only when it has one (unless given; under
    tensor parallelism by every rank, since loading is collective): (the teacher's model, loaded or given, None when
    neither; the seconds of its shard loop)."""
    if not todo:
        return job.model, 0.0
    cfg, teacher, log = job.cfg, job.teacher, job.log
    ranks, lay = distributed.ranks(), job.layout
    mine = lay.share(todo)  # every rank of a tensor-parallel group computes its group's shards
    computer, model = None, job.model
    if model is None and (mine or lay.tp > 1):  # tensor parallel: loading is collective over every group
        t0 = time.perf_counter()
        model = models.load_model(cfg.teacher, teacher.device, lay.dp if lay.tp > 1 else None)
        log(f"teacher loaded on {teacher.device} in {time.perf_counter() - t0:.1f}s"
            + (f", split over {lay.tp} ranks" if lay.tp > 1 else "")
            + (f"; {lay.dp} {'groups' if lay.tp > 1 else 'ranks'} share {len(todo)} shards" if lay.dp > 1 else ""))
    if mine:
        computer = (TargetComputer(model, teacher.spec, cfg.capture, teacher.hidden, teacher.attention,
                                   head_gatherer(lay))
                    if teacher.classifier is None else
                    ClassTargetComputer(model, cfg.capture, teacher.hidden, teacher.attention,
                                        teacher.classifier.per_token))
        if cfg.data.document_mask:
            check_teacher_document_masking(computer, teacher.spec, cfg.teacher.dtype)
        if lay.leads and teacher.classifier is None:  # rank 0 (with its tensor-parallel group, which computes along)
            if cfg.capture.final_hidden and writer.base is None and not job.st.exists(HEAD_FILE):
                store_head(job.st, cfg, model, ranks.main)  # now, from the loaded model: a resume need not load it
            first = prepared.splits.get("train") or next(iter(prepared.splits.values()))
            for line in first_rows_check(computer, first.read(0, min(2, len(first))), teacher.tokenizer,
                                         prepared.convention, teacher.spec):
                log(line)
    total = sum(int(prepared.splits[s].shard_tokens[i]) for s, i, _, _ in todo)
    seconds = 0.0
    with Progress(total, job.progress, counting=lay.writes) as bar:
        if mine:
            t0 = time.perf_counter()
            writers = writer_threads(teacher.device, cfg.capture.writers)
            log(f"{writers} writer thread{'s' if writers != 1 else ''}" if writers else "shards written in line")
            run_shards(computer, prepared, mine, writer, cfg.capture.batch_size, bar, writers, write=lay.writes)
            seconds = time.perf_counter() - t0
        bar.wait_for_ranks()
    return model, seconds


def _finish(job: CaptureJob, writer: CacheWriter, model) -> Manifest:
    """Rank 0, once every shard is committed: the LM head (if not stored yet: from `model`, the loaded teacher,
    or loaded for it), the statistics and the manifest (`CacheWriter.finalize`)."""
    cfg, st = job.cfg, job.st
    if cfg.capture.final_hidden and writer.base is None and not st.exists(HEAD_FILE):
        store_head(st, cfg, model)
    manifest = writer.finalize()
    stats = manifest.stats
    quality = (f"mean top-{cfg.capture.top_k} mass {stats.mean_topk_mass:.4f}" if stats.mean_topk_mass is not None
               else "teacher accuracy " + ", ".join(f"{k} {v:.4f}" for k, v in stats.teacher_accuracy.items()))
    job.log(f"finished {st.where}: {stats.tokens:,} tokens, {stats.tokens_per_second:,.0f} tokens/s"
            f"{' per rank' if distributed.ranks().active else ''}, {quality}")
    return manifest
