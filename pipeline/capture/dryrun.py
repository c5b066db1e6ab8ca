"""`distill teacher-cache --dry-run`: prepare the rows exactly as the capture would (streamed, in a scratch
folder removed afterwards), then report the rows, the storage the cache will take and whether the output's
disk holds it. No teacher weights are loaded and nothing is written at the output location, so it is how a
user plans storage for a big corpus, and how preparation's own memory and time are measured.
"""

from __future__ import annotations

import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TeacherCacheConfig
from ..errors import CaptureError
from ..format.storage import Storage
from .arrival import warn_if_grouped
from .checks import check_disk, estimate_bytes
from .plan import append_base, cached_keys
from .rows import prepare


@dataclass
class DryRun:
    """What a dry run found: rows and tokens per split, the preparation statistics, the size estimate."""

    splits: dict[str, dict]
    statistics: dict
    bytes_per_token: dict[str, float]
    estimate: int  # bytes the cache will take (uncompressed upper bound)
    disk_free: int | None  # bytes free where the cache goes (None: not on local disk)
    seconds: float
    peak_rss_mib: float
    already_cached: int = 0
    device_memory: dict = field(default_factory=dict)  # the capture's device working set, estimated (bytes by part)
    ranks: list[dict] = field(default_factory=list)  # each rank's seconds, tokenising seconds, documents, peak RSS
    lines: list[str] = field(default_factory=list)
    grouped: str | None = None  # the warning for rows that arrive in long runs of one label or file (`arrival`)


def dry_run(cfg: TeacherCacheConfig, log=print) -> DryRun:
    """Prepare the rows of `cfg` and report (module docstring); refuses a cache the disk cannot hold."""
    from .. import distributed
    from .teacher import capture_specs, describe_teacher

    main = distributed.setup().main
    if not main:  # under torchrun every rank prepares (each tokenising 1/W); rank 0 reports
        log = lambda m: None  # noqa: E731
    t0 = time.perf_counter()
    teacher = describe_teacher(cfg)  # tokenizer and config: no weights
    st = Storage(cfg.output.dir, cfg.output.storage_options)
    appending = cfg.output.mode == "append"
    if appending:
        append_base(st)
    prepared = prepare(cfg.data, teacher.tokenizer, teacher.classifier, min_validation=not appending,
                       shard_rows=cfg.capture.rows_per_shard, cached_keys=cached_keys(st) if appending else None)
    try:
        grouped = warn_if_grouped(cfg.data, prepared, cfg.capture.rows_per_shard, log=lambda m: None)
        splits = {s: {"rows": r.rows, "tokens": r.tokens, "shards": len(r.shard_tokens)}
                  for s, r in prepared.splits.items()}
        statistics = prepared.info.get("statistics", {})
        already, timing = prepared.already_cached, prepared.timing
    finally:
        prepared.close()
    per_token = estimate_bytes(capture_specs(cfg, teacher), cfg.data.seq_len, cfg.data, cfg.capture.rows_per_shard)
    rows = sum(v["rows"] for v in splits.values())
    need = int(sum(per_token.values()) * rows * cfg.data.seq_len)
    free = None
    if st.is_local:
        where = _existing(st.local_path())
        free = shutil.disk_usage(where).free
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = time.perf_counter() - t0
    every = distributed.all_gather({"seconds": seconds, "peak_rss_mib": peak, **timing})
    res = DryRun(splits, statistics, per_token, need, free, seconds, peak, already,
                 {**teacher.memory.__dict__, "total": teacher.memory.total}, every)
    res.grouped = grouped
    res.lines = _report(cfg, res) + teacher.memory.lines() + ([grouped] if grouped else [])
    for line in res.lines:
        log(line)
    if st.is_local:
        check_disk(where, need)
    return res


def _existing(path: Path) -> Path:
    """The nearest folder at or above `path` that exists (the output need not exist yet)."""
    for p in (path, *path.parents):
        if p.exists():
            return p
    raise CaptureError(f"no existing folder above {path}")


def _report(cfg: TeacherCacheConfig, r: DryRun) -> list[str]:
    s = r.statistics
    lines = [f"dry run: rows as the capture would make them (seq_len {cfg.data.seq_len}); no teacher weights loaded, "
             f"nothing written at {cfg.output.dir}",
             "splits: " + ", ".join(f"{k} {v['rows']:,} rows / {v['tokens']:,} tokens / {v['shards']:,} shards"
                                    for k, v in r.splits.items()),
             f"documents {s.get('documents', 0):,}, tokens read {s.get('tokens_read', 0):,}, duplicate rows dropped "
             f"{s.get('duplicate_rows_dropped', 0):,}, documents truncated {s.get('documents_truncated', 0):,}"]
    if r.already_cached:
        lines.append(f"rows already in the cache (an append leaves them out): {r.already_cached:,}")
    lines.append("estimated size (uncompressed upper bound), bytes/token: "
                 + ", ".join(f"{k}={v:,.1f}" for k, v in r.bytes_per_token.items())
                 + f"; {r.estimate / 2**30:,.2f} GiB in all")
    if r.disk_free is not None:
        lines.append(f"disk: {r.disk_free / 2**30:,.2f} GiB free at the output "
                     + ("(enough)" if r.disk_free >= r.estimate else "(NOT enough)"))
    lines += [f"preparation{f' rank {i}' if len(r.ranks) > 1 else ''}: {x['seconds']:.1f}s, of which tokenising "
              f"{x.get('tokenise_seconds', 0.0):.1f}s ({x.get('documents_tokenised', 0):,} documents); peak RSS "
              f"{x['peak_rss_mib']:,.0f} MiB" for i, x in enumerate(r.ranks)]
    return lines
