"""Stage 1 end to end: settings -> checks -> prepared rows -> teacher targets -> finished cache.

Everything that can be checked without the teacher's weights is checked first (settings
against the model config, the dataset, the output directory, the disk), so bad input fails
in seconds. Shards are computed in order; each is handed to a writer thread while the next
one is computed, and committed when its files are on disk. A rerun of the same command
resumes at the first uncommitted shard; batches never cross shards, so the bytes are the
same as an uninterrupted run's.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..format import cache as cache_fmt
from .. import distributed
from . import data as data_mod
from . import teacher as teacher_mod
from ..format.cache import CacheWriter, FieldSpec
from ..format.storage import Storage, StorageError
from ..config import TeacherCacheConfig
from .targets import ClassTargetComputer, TargetComputer, TeacherTargets

DISK_MARGIN_BYTES = 64 << 20


class CaptureError(RuntimeError):
    """Settings or an environment that a capture refuses, with the reason."""


def _resolve_layers(indices: list[int], n: int, what: str, allowed: str) -> list[int]:
    out = []
    for i in indices:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise CaptureError(f"{what} {i} does not exist: the teacher has {allowed}")
        if j in out:
            raise CaptureError(f"{what} {i} is listed twice")
        out.append(j)
    return out


def check_task(cfg: TeacherCacheConfig, model_config) -> data_mod.LabelSet | None:
    """teacher.task against the checkpoint: its head must be the task's (a classifier's trained head, not one
    transformers would initialise at random), a decoder classifier must know its padding id. Returns the
    classifier's labels (None for a causal LM)."""
    task, saved = cfg.teacher.task, teacher_mod.checkpoint_task(model_config)
    arch = ", ".join(getattr(model_config, "architectures", None) or []) or "checkpoint without recorded architecture"
    if task == "causal-lm" and saved not in (None, task):
        raise CaptureError(f"teacher {cfg.teacher.model!r} is a {arch} (a {saved} checkpoint): set "
                           f"teacher.task = {saved!r}")
    if task != "causal-lm" and saved != task:  # a base model, a masked LM, another head: a random classifier
        raise CaptureError(f"teacher.task = {task!r}, but {cfg.teacher.model!r} is a {arch}, not a {task} "
                           f"checkpoint: its {task} head would be initialised at random; fine-tune a {task} model "
                           "first")
    if task == "causal-lm":
        return None
    labels = data_mod.LabelSet.from_config(model_config)
    if len(labels.names) < 2:
        raise CaptureError(f"teacher {cfg.teacher.model!r} has {len(labels.names)} labels (config.num_labels): "
                           "a classifier needs at least 2")
    if task == "sequence-classification" and _pad_id(model_config) is None:
        raise CaptureError(f"teacher {cfg.teacher.model!r} has no pad_token_id in its config: transformers refuses "
                           "batches of more than one row without it (a decoder classifier pools each row at its last "
                           "token that is not padding, found by that id); set config.pad_token_id when saving it")
    return labels


def _pad_id(model_config) -> int | None:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    pad = getattr(text, "pad_token_id", None)
    return None if pad is None else int(pad)


def row_pad_id(model_config, tokenizer) -> int:
    """What a classifier's rows are padded with: its config's pad_token_id (a decoder classifier pools at the
    last token that is not it), else the tokenizer's."""
    pad = _pad_id(model_config)
    return pad if pad is not None else data_mod._pad_id(tokenizer)


def check_settings(cfg: TeacherCacheConfig, spec: teacher_mod.TeacherSpec, tokenizer) -> tuple[list[int], list[int]]:
    """Settings against the teacher's architecture; returns resolved (hidden, attention) layers."""
    c = cfg.capture
    if cfg.teacher.task == "causal-lm" and c.top_k > spec.vocab_size:
        raise CaptureError(f"capture.top_k={c.top_k} is larger than the teacher's vocabulary ({spec.vocab_size})")
    if spec.max_positions is not None and cfg.data.seq_len > spec.max_positions:
        raise CaptureError(f"data.seq_len={cfg.data.seq_len} exceeds the teacher's {spec.max_positions} positions")
    if len(tokenizer) > spec.vocab_size:
        raise CaptureError(f"the tokenizer has {len(tokenizer)} tokens but the teacher's head only {spec.vocab_size}")
    n_hs = spec.num_layers + 1
    hidden = _resolve_layers(c.hidden_layers, n_hs, "capture.hidden_layers index",
                             f"{n_hs} hidden states (0 = embeddings .. {n_hs - 1} = final, or -{n_hs}..-1)")
    attn = _resolve_layers(c.attention_layers, spec.num_layers, "capture.attention_layers index",
                           f"{spec.num_layers} layers (0..{spec.num_layers - 1}, or -{spec.num_layers}..-1)")
    if c.attention_heads is not None:
        if not attn:
            raise CaptureError("capture.attention_heads is set but capture.attention_layers is empty")
        bad = [h for h in c.attention_heads if not 0 <= h < spec.num_heads]
        if bad or not c.attention_heads:
            raise CaptureError(f"capture.attention_heads {bad or '[]'} invalid: the teacher has heads "
                               f"0..{spec.num_heads - 1}")
    if c.topk_codec == "pcodec":
        try:
            import numcodecs.pcodec  # noqa: F401  (needs the pcodec package: numcodecs[pcodec])
        except ImportError:
            raise CaptureError("capture.topk_codec='pcodec' needs the pcodec package (pip install 'numcodecs[pcodec]'),"
                               " which is not installed; install it or set capture.topk_codec='zstd'") from None
    return hidden, attn


def stored_heads(capture, spec: teacher_mod.TeacherSpec) -> int:
    """Attention heads stored per captured layer: the kept heads, or 1 when they are averaged."""
    if capture.attention_head_reduce == "mean":
        return 1
    return len(capture.attention_heads or range(spec.num_heads))


def check_output_dir(st: Storage) -> None:
    """The output location takes a write (on object storage: a probe object, removed again)."""
    try:
        if st.is_local:
            st.local_path().mkdir(parents=True, exist_ok=True)
        st.write_bytes(".write-test", b"")
        st.remove(".write-test")
    except (OSError, StorageError) as e:
        raise CaptureError(f"output directory {st.location} is not writable: {getattr(e, 'strerror', None) or e}") from None


def estimate_bytes(specs: list[FieldSpec], seq_len: int, data=None) -> dict[str, float]:
    """Uncompressed bytes per token per field (an upper bound: zstd only shrinks them)."""
    est = {s.name: s.bytes_per_row / seq_len for s in specs}
    est["rows.parquet"] = 4 + 24 / seq_len  # input_ids, length, key
    if data is not None:
        est["rows.parquet"] += (data.loss_mask != "all") * 1 + data.document_mask * 4  # loss_mask, position_ids
    return est


def check_disk(out: Path, need: int) -> None:
    free = shutil.disk_usage(out).free
    if free < need + DISK_MARGIN_BYTES:
        raise CaptureError(f"not enough disk at {out}: the cache needs up to {need / 2**20:.1f} MiB "
                           f"(+{DISK_MARGIN_BYTES >> 20} MiB margin), {free / 2**20:.1f} MiB free")


def committed_rows(out: Path | Storage) -> int:
    """Rows of the shards an earlier run of this capture committed."""
    return sum(r["row_end"] - r["row_start"] for r in cache_fmt.read_commits(out).values())


def sweep_temporary(out: Path) -> int:
    """Remove the temporary files (`*.tmp`, `*.partial`) a killed capture can leave; returns how many."""
    stale = [p for pattern in ("*.tmp", "*.partial") for p in out.rglob(pattern)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return len(stale)


def _software() -> dict:
    import datasets
    import torch
    import transformers
    import zarr

    return {"torch": torch.__version__, "transformers": transformers.__version__, "zarr": zarr.__version__,
            "datasets": datasets.__version__, "pyarrow": __import__("pyarrow").__version__,
            "python": sys.version.split()[0]}


def build_plan(cfg: TeacherCacheConfig, spec, tokenizer, prepared, hidden, attn, specs, device: str,
               weights_sha256: str | None = None, task: TaskInfo | None = None) -> dict:
    """Everything that determines the cache's bytes; the manifest minus shards and stats."""
    split_rows = {s: len(r) for s, r in prepared.splits.items()}
    heads = stored_heads(cfg.capture, spec)
    fields = {s.name: s.to_dict(split_rows, cfg.capture.rows_per_chunk, cfg.capture.rows_per_shard) for s in specs}
    L = cfg.data.seq_len

    def row_field(column: str, dtype: str, per_position: bool, description: str) -> dict:
        return {"path": "{part}/rows.parquet", "format": "parquet", "column": column, "dtype": dtype,
                "dims": ["row", "position"] if per_position else ["row"],
                "shape": {s: [n, L] if per_position else [n] for s, n in split_rows.items()},
                "description": description}

    fields["input_ids"] = row_field("input_ids", "int32", True, "token ids; positions >= length are padding")
    fields["length"] = row_field("length", "int32", False, "real tokens in the row (the mask is position < length)")
    fields["key"] = row_field("key", "string", False,
                              "blake2b-128 hex of the row's real token ids as little-endian int32")
    first = next(iter(prepared.splits.values()))
    if first.loss_mask is not None:
        fields["loss_mask"] = row_field("loss_mask", "uint8", True, "1 where the targets at position t train (the "
                                        "token t+1 they predict is an assistant/response token); 0 elsewhere")
    if first.labels is not None:
        fields["labels"] = row_field("labels", "int32", first.labels.ndim == 2,
                                     "gold class id per row" if first.labels.ndim == 1 else
                                     f"gold class id of each word's first token; {data_mod.IGNORE} elsewhere")
    if first.position_ids is not None:
        fields["position_ids"] = row_field("position_ids", "int32", True, "0 where a document starts, +1 per token "
                                           "within it; padding is a segment of its own. Attention is causal "
                                           "within a segment only")
    preparation = cfg.data.model_dump(include={"seq_len", "packing", "add_special_tokens", "max_documents",
                                               "max_tokens", "validation_fraction", "sample_by", "shuffle_seed",
                                               "format", "loss_mask", "document_mask"})
    if cfg.data.splits:  # recorded only where used, so that earlier caches' plans are unchanged
        preparation["splits"] = dict(cfg.data.splits)
        if "validation" in cfg.data.splits:
            preparation["validation_fraction"] = None  # the dataset's own validation split
    if task is not None:
        preparation["add_special_tokens"] = True  # a classifier's rows carry its tokenizer's special tokens
    plan = {
        "format": cache_fmt.FORMAT_NAME,
        "format_version": cache_fmt.FORMAT_VERSION,
        "teacher": {
            "model": cfg.teacher.model, "gguf_file": cfg.teacher.gguf_file, "revision": cfg.teacher.revision,
            "weights_sha256": weights_sha256 if weights_sha256 is not None else
            teacher_mod.weights_fingerprint(cfg.teacher), "dtype": cfg.teacher.dtype,
            "device_type": device, **spec.to_dict(),
        },
        "tokenizer": {
            "fingerprint": teacher_mod.tokenizer_fingerprint(tokenizer), "class": type(tokenizer).__name__,
            "size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "dataset": prepared.info,
        "preparation": {**preparation, **prepared.convention},
        "capture": {
            **cfg.capture.model_dump(exclude={"batch_size", "position_chunk", "hidden_layers", "attention_layers"}),
            "hidden_layers": hidden, "attention_layers": attn, "attention_heads_stored": heads,
            "temperatures_all": [1.0, *cfg.capture.temperatures],
            "batch_size": cfg.capture.batch_size, "position_chunk": cfg.capture.position_chunk,
        },
        "splits": {s: _part(s, prepared.splits[s], cfg.capture.rows_per_shard) | {"parts": [
                       {"path": s, "row_start": 0, **_part(s, prepared.splits[s], cfg.capture.rows_per_shard)}]}
                   for s in split_rows},
        "fields": fields,
        "software": _software(),
    }
    if task is not None:  # a classification teacher: its task and labels (a causal LM's plan has no such key)
        plan["task"] = task.to_dict(cfg.data.label_column)
    return plan


def _part(split: str, rows, shard_rows: int) -> dict:
    return {"rows": len(rows), "tokens": rows.n_tokens, "shards": len(cache_fmt.shard_ranges(len(rows), shard_rows))}


# What an append may change: which documents, and where and with what software it ran. Everything
# else that determines the cache's bytes must be what the cache was made with.
APPEND_FREE = {"dataset", "software", "splits", "fields", "format_version", "grown", "teacher.device_type",
               "teacher.model", "teacher.revision", "teacher.gguf_file",  # weights_sha256 says which weights
               "capture.batch_size", "capture.position_chunk", "preparation.max_documents",
               "preparation.max_tokens", "preparation.sample_by", "preparation.shuffle_seed"}


def described(old: dict, plan: dict) -> dict:
    """An earlier manifest or plan in the current layout, for comparison with `plan`: a 1.0/1.1 layout
    gets its parts, and architecture facts that newer versions record (e.g. teacher.intermediate_size)
    are taken from `plan` when `old` lacks them: they follow from the weights, which
    teacher.weights_sha256 compares."""
    out = cache_fmt.current_layout(old)
    if isinstance(out.get("teacher"), dict) and isinstance(plan.get("teacher"), dict):
        out["teacher"] = {**{k: v for k, v in plan["teacher"].items() if k not in out["teacher"]}, **out["teacher"]}
    return out


def append_differences(base: dict, plan: dict) -> list[str]:
    """Why the rows of `plan` cannot join the finished cache `base` (empty: they can)."""
    base = described(base, plan)
    changes = _diff({k: base.get(k) for k in plan}, plan)
    return [c for c in changes if not any(c.startswith(f + ".") or c.startswith(f + ":") for f in APPEND_FREE)]


def grown_plan(base: dict, plan: dict, prepared, shard_rows: int, duplicates: int) -> dict:
    """The plan of `base` grown by the rows of `prepared`, each split's new rows a new part."""
    number = len(base.get("grown", [])) + 1
    g = cache_fmt.manifest_plan(base)
    g["format_version"] = cache_fmt.GROWN_FORMAT_VERSION
    g["fields"] = {}
    g["splits"] = {}
    layout = cache_fmt.current_layout(base)["splits"]  # a 1.0/1.1 base: one part per split, filled in
    for split in list(base["splits"]) + [s for s in prepared.splits if s not in base["splits"]]:
        parts = [dict(p) for p in layout[split]["parts"]] if split in layout else []
        if split in prepared.splits:
            start = sum(p["rows"] for p in parts)
            parts.append({"path": cache_fmt.part_path(split, number), "row_start": start,
                          **_part(split, prepared.splits[split], shard_rows)})
        g["splits"][split] = {k: sum(p[k] for p in parts) for k in ("rows", "tokens", "shards")} | {"parts": parts}
    for name, f in plan["fields"].items():
        tail = next(iter(f["shape"].values()))[1:]
        g["fields"][name] = {**f, "shape": {s: [v["rows"], *tail] for s, v in g["splits"].items()}}
    g["grown"] = [*base.get("grown", []), {
        "number": number, "parent_digest": base["digest"], "dataset": plan["dataset"],
        "rows": {s: len(r) for s, r in prepared.splits.items()},
        "tokens": sum(r.n_tokens for r in prepared.splits.values()), "duplicate_rows_skipped": duplicates,
        "parts": [cache_fmt.part_path(s, number) for s in prepared.splits],
        "device_type": plan["teacher"]["device_type"], "software": plan["software"]}]
    return g


def _plan_append(st: Storage, plan: dict, prepared, cfg: TeacherCacheConfig, log):
    """(base manifest, grown plan, the new rows) for output.mode=append; (None, base, None) when every
    row is already in the cache."""
    out = st.location
    if not st.exists(cache_fmt.MANIFEST):
        raise CaptureError(f"output.mode=append: there is no finished cache at {out} to append to; make (or finish) "
                           "it with output.mode=create first")
    base = cache_fmt.read_manifest(st)
    if base.get("subset"):
        raise CaptureError(f"cannot append to {out}: it is a partial pull (fields {', '.join(base['subset']['fields'])}"
                           f", splits {', '.join(base['subset']['splits'])}) of another cache; append to the whole "
                           "cache, then pull again")
    changes = append_differences(base, plan)
    if changes:
        raise CaptureError(f"cannot append to {out}: it was made with another teacher, tokenizer or settings. "
                           "Differences (cache -> now):\n  " + "\n  ".join(changes[:20]))
    cache = cache_fmt.Cache(st)
    have = {k for split in cache.splits for k in cache.rows(split, columns=["key"]).column("key").to_pylist()}
    new, duplicates = {}, 0
    for split, rows in prepared.splits.items():
        keep = np.asarray([i for i, k in enumerate(rows.keys) if k not in have], dtype=np.int64)
        duplicates += len(rows) - len(keep)
        if len(keep):
            new[split] = rows.take(keep)
    if not new:
        log(f"nothing to append: all {duplicates} rows of these documents are already in {out}")
        return None, base, None
    prepared = data_mod.Prepared(splits=new, info=prepared.info, convention=prepared.convention)
    log(f"appending to {out}: " + ", ".join(f"{s} +{len(r)} rows" for s, r in new.items())
        + f"; {duplicates} rows already in the cache skipped")
    return base, grown_plan(base, plan, prepared, cfg.capture.rows_per_shard, duplicates), prepared


def _finished_plan(st: Storage, plan: dict) -> bool:
    """Whether `plan` is the plan of the finished manifest at `st` (its run ended but for the cleanup)."""
    return plan == cache_fmt.manifest_plan(cache_fmt.read_manifest(st))


def _drop_unlisted_parts(st: Storage, manifest: dict) -> None:
    """Remove the `<split>/grow-NNNN` folders of an abandoned append: parts the manifest does not list."""
    listed = {p["path"] for s in manifest["splits"] for p in cache_fmt.split_parts(manifest, s)}
    for split in manifest["splits"]:
        for rel in st.glob(f"{split}/{cache_fmt.GROW_DIR}*"):
            if rel not in listed:
                st.remove_tree(rel)


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


ENCODINGS = ("capture.topk_codec:", "fields.topk_ids.dtype:", "fields.topk_ids.codec:", "fields.topk_logprobs.codec:")


def _encoding_only(change: str) -> bool:
    """A difference in how the top-K values are stored, not in the values: a finished cache written with the
    older codec (zstd, int32 ids) holds the same values and is done."""
    return change.startswith(ENCODINGS)


def _wipe(st: Storage) -> None:
    """Everything under the output location (the location itself stays)."""
    if st.is_local:
        for p in st.local_path().iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    else:
        for rel in st.files():
            st.remove(rel)


@dataclass(frozen=True)
class TaskInfo:
    """A classification capture: the task, the teacher's labels, the id rows are padded with."""

    task: str
    labels: data_mod.LabelSet
    pad_id: int
    bidirectional: bool = False  # an encoder: every token attends to every real token (attention maps are full)

    @property
    def per_token(self) -> bool:
        return self.task == "token-classification"

    def to_dict(self, label_column: str) -> dict:
        return {"type": self.task, "labels": self.labels.names, "label2id": self.labels.ids,
                "label_column": label_column, "pad_token_id": self.pad_id,
                "ignore_index": data_mod.IGNORE if self.per_token else None, "bidirectional": self.bidirectional}


@dataclass
class CaptureResult:
    root: Path | str  # a local directory, or the URL captured to
    manifest: dict
    resumed_shards: int
    computed_shards: int


def run_capture(cfg: TeacherCacheConfig, log: Callable[[str], None] = print, progress: bool = True) -> CaptureResult:
    """Capture (or resume, or grow) the cache of `cfg`: in this process, or as one rank of a torchrun
    launch, where every rank loads the teacher, the ranks compute disjoint shards and rank 0 prepares
    the output and finalizes the manifest once every shard is committed."""
    ranks = distributed.setup()
    if not ranks.main:
        log, progress = (lambda m: None), False
    st = Storage(cfg.output.dir, cfg.output.storage_options)
    tokenizer = teacher_mod.load_tokenizer(cfg.teacher)
    model_config = teacher_mod.load_model_config(cfg.teacher)
    spec = teacher_mod.TeacherSpec.from_config(model_config)
    labels = check_task(cfg, model_config)
    hidden, attn = check_settings(cfg, spec, tokenizer)
    device = teacher_device(cfg)
    distributed.on_main(lambda: check_output_dir(st))
    with ExitStack() as held:
        if st.is_local:  # object stores have no lock: one capture per URL is the user's to ensure
            distributed.on_main(lambda: held.enter_context(writer_lock(st.local_path())))  # rank 0 holds it
        task = None if labels is None else TaskInfo(cfg.teacher.task, labels, row_pad_id(model_config, tokenizer),
                                                    teacher_mod.bidirectional(model_config, cfg.teacher.task))
        return _locked_capture(cfg, st, tokenizer, spec, hidden, attn, device, log, progress, task)


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
    return teacher_mod.resolve_device(cfg.teacher.device)


@contextmanager
def writer_lock(out: Path):
    """An exclusive flock on the cache directory itself: no lock file is left behind, and the
    kernel drops the lock when the holder dies (kill -9 included)."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CaptureError(f"another capture is writing {out} (its directory lock is held)") from None
        yield
    finally:
        os.close(fd)


def _locked_capture(cfg, st: Storage, tokenizer, spec, hidden, attn, device, log, progress,
                    task: TaskInfo | None = None) -> CaptureResult:
    out = st.local_path() if st.is_local else st.location
    if cfg.output.mode == "append" and st.exists(cache_fmt.MANIFEST):
        codec = cache_fmt.current_layout(cache_fmt.read_manifest(st))["capture"]["topk_codec"]
        if codec != cfg.capture.topk_codec:  # how the values are stored follows the cache being grown
            log(f"appending with capture.topk_codec={codec!r}, the codec of the cache at {out}")
            cfg = cfg.model_copy(update={"capture": cfg.capture.model_copy(update={"topk_codec": codec})})
    prepared = data_mod.prepare(cfg.data, tokenizer, min_validation=cfg.output.mode != "append",
                                task=cfg.teacher.task, labels=task.labels if task else None,
                                pad_id=task.pad_id if task else None)
    n_heads = stored_heads(cfg.capture, spec)
    specs = cache_fmt.field_specs(
        seq_len=cfg.data.seq_len, top_k=cfg.capture.top_k, n_temperatures=len(cfg.capture.temperatures),
        hidden=(len(hidden), spec.hidden_size) if hidden else None, hidden_dtype=cfg.capture.hidden_dtype,
        attention=(len(attn), n_heads) if attn else None, vocab_size=spec.vocab_size,
        topk_codec=cfg.capture.topk_codec, samples=cfg.capture.samples,
        final_hidden=(spec.hidden_size, cfg.capture.final_hidden_dtype) if cfg.capture.final_hidden else None,
        classes=len(task.labels.names) if task else None, per_token=bool(task and task.per_token))
    weights = distributed.on_main(lambda: teacher_mod.weights_fingerprint(cfg.teacher))  # hashed once, not per rank
    plan = build_plan(cfg, spec, tokenizer, prepared, hidden, attn, specs, device.type, weights, task)
    base = None
    if cfg.output.mode == "append":  # read-only, on every rank: which rows are new
        base, plan, prepared = _plan_append(st, plan, prepared, cfg, log)
    _same_rows_on_every_rank(plan, prepared)
    # rank 0 alone checks and prepares the output; every rank gets its decision and the shards to do
    outcome = distributed.on_main(lambda: _prepare_output(cfg, st, plan, base, prepared, specs, tokenizer, log))
    if isinstance(outcome, CaptureResult):
        return outcome
    todo, committed = outcome
    split_rows = {s: len(r) for s, r in prepared.splits.items()}
    writer = CacheWriter(st, plan, specs, split_rows, base)
    writer.create_arrays()  # opens what rank 0 created
    ranks = distributed.ranks()
    mine = todo[ranks.rank::ranks.world]
    computer = None
    if todo:
        t0 = time.perf_counter()
        if mine:
            model = teacher_mod.load_model(cfg.teacher, device)
            log(f"teacher loaded on {device} in {time.perf_counter() - t0:.1f}s"
                + (f"; {ranks.world} ranks share {len(todo)} shards" if ranks.active else ""))
            computer = (TargetComputer(model, spec, cfg.capture, hidden, attn) if task is None else
                        ClassTargetComputer(model, cfg.capture, hidden, attn, task.per_token))
            if cfg.data.document_mask:
                check_teacher_document_masking(computer, spec, cfg.teacher.dtype)
            if ranks.main and task is None:
                if cfg.capture.final_hidden and base is None and not st.exists(cache_fmt.HEAD_FILE):
                    _store_head(st, cfg, model)  # now, from the loaded model: a resume need not load it for this
                first = prepared.splits.get("train") or next(iter(prepared.splits.values()))
                for line in first_rows_check(computer, first, tokenizer, prepared.convention, spec):
                    log(line)
        total = sum(int(prepared.splits[s].lengths[a:b].sum()) for s, _, a, b in todo)
        with Progress(total, progress) as bar:
            if mine:
                _run_shards(computer, prepared, mine, writer, cfg.capture.batch_size, bar, overlap_writes(device))
            bar.wait_for_ranks()

    def finish():
        if cfg.capture.final_hidden and base is None and not st.exists(cache_fmt.HEAD_FILE):
            _store_head(st, cfg, computer.model if computer is not None else None)
        stats = _statistics(writer, base)
        manifest = writer.finalize(stats)
        quality = (f"mean top-{cfg.capture.top_k} mass {stats['mean_topk_mass']:.4f}" if task is None else
                   "teacher accuracy " + ", ".join(f"{k} {v:.4f}" for k, v in stats["teacher_accuracy"].items()))
        log(f"finished {out}: {stats['tokens']:,} tokens, {stats['timing']['tokens_per_second']:,.0f} tokens/s"
            f"{' per rank' if ranks.active else ''}, {quality}")
        return manifest

    manifest = distributed.on_main(finish)
    return CaptureResult(out, manifest, resumed_shards=committed, computed_shards=len(todo))


def _same_rows_on_every_rank(plan: dict, prepared) -> None:
    """Every rank computes targets for the rows it prepared itself, and rank 0 alone stores them: refuse
    a job whose ranks (nodes with other data files, library versions or tokenizer files) prepared
    other rows or settings than rank 0."""
    if not distributed.ranks().active:
        return
    import hashlib

    h = hashlib.sha256(cache_fmt.canonical({k: v for k, v in plan.items() if k != "software"}).encode())
    for split, rows in (prepared.splits.items() if prepared is not None else []):
        h.update(split.encode())
        h.update("".join(rows.keys).encode())
    every = distributed.all_gather(h.hexdigest())
    odd = [r for r, d in enumerate(every) if d != every[0]]
    if odd:
        raise CaptureError(f"ranks {odd} prepared other rows or settings than rank 0 (data files, library versions or "
                           "tokenizer files differ between nodes?); every rank must see the same inputs")


def _prepare_output(cfg, st: Storage, plan: dict, base: dict | None, prepared, specs, tokenizer, log):
    """Rank 0: compare with what the output holds, clear or refuse, write the plan, rows, tokenizer and
    arrays. Returns the finished CaptureResult when there is nothing to do, else (shards to compute
    as (split, index, row start, row end), shards already committed)."""
    out = st.local_path() if st.is_local else st.location
    plan_rel = f"{cache_fmt.WORK_DIR}/plan.json"
    has_plan = st.exists(plan_rel)
    if has_plan and st.exists(cache_fmt.MANIFEST) and _finished_plan(st, json.loads(st.read_bytes(plan_rel))):
        st.remove_tree(cache_fmt.WORK_DIR)  # a run wrote its manifest and was stopped before it cleaned up
        has_plan = False
    if cfg.output.mode == "append":
        if base is None:
            if not has_plan:
                _drop_unlisted_parts(st, plan)  # an abandoned append's folders
            return CaptureResult(out, plan, resumed_shards=0, computed_shards=0)
        if has_plan:
            changes = _diff(described(json.loads(st.read_bytes(plan_rel)), plan), plan)  # across versions
            if changes:
                raise CaptureError(f"{out} holds an unfinished append of other data or settings; rerun that command "
                                   f"to finish it (or remove {out}/{cache_fmt.WORK_DIR} to abandon it). Differences:"
                                   "\n  " + "\n  ".join(changes[:20]))
        else:  # a fresh append: what an abandoned one left is not in the manifest; clear it
            st.remove_tree(cache_fmt.WORK_DIR)
            _drop_unlisted_parts(st, base)
    elif st.exists(cache_fmt.MANIFEST):
        old = cache_fmt.read_manifest(st)
        done = described(old, plan)  # a cache of an earlier version with these settings is done
        changes = [c for c in _diff({k: done.get(k) for k in plan}, plan) if not _encoding_only(c)]
        if not changes:
            log(f"{out} is already a finished cache with these settings; nothing to do")
            st.remove_tree(cache_fmt.WORK_DIR)
            _drop_unlisted_parts(st, old)
            return CaptureResult(out, old, resumed_shards=sum(v["shards"] for v in plan["splits"].values()),
                                 computed_shards=0)
        if not cfg.output.overwrite:
            raise CaptureError(f"{out} holds a finished cache with other settings; pass output.overwrite=true to "
                               "replace it. Differences:\n  " + "\n  ".join(changes[:20]))
        log(f"overwriting the finished cache at {out}")
        _wipe(st)
        has_plan = False
    elif has_plan:
        old_plan = described(json.loads(st.read_bytes(plan_rel)), plan)  # resumable across versions
        changes = _diff(old_plan, plan)
        if changes:
            if not cfg.output.overwrite:
                raise CaptureError(f"{out} holds an unfinished capture with other settings; rerun with the same "
                                   "settings to resume, or pass output.overwrite=true to start over. Differences:\n  "
                                   + "\n  ".join(changes[:20]))
            log(f"discarding the unfinished capture at {out}")
            _wipe(st)
            has_plan = False
    elif st.files():
        if not cfg.output.overwrite:
            raise CaptureError(f"{out} is not empty and is not a cache; choose an empty directory or pass "
                               "output.overwrite=true")
        _wipe(st)

    if has_plan and st.is_local:
        swept = sweep_temporary(out)
        if swept:
            log(f"removed {swept} temporary files left by an interrupted capture")
    total_rows = sum(len(r) for r in prepared.splits.values())
    per_token = estimate_bytes(specs, cfg.data.seq_len, cfg.data)
    left_rows = total_rows - committed_rows(st)  # a resume needs room only for what is left to write
    need = int(sum(per_token.values()) * left_rows * cfg.data.seq_len)
    log(f"cache {out}: {total_rows} rows x {cfg.data.seq_len} positions "
        + ", ".join(f"{s}={len(r)}" for s, r in prepared.splits.items()))
    log("estimated size (uncompressed upper bound), bytes/token: "
        + ", ".join(f"{k}={v:,.1f}" for k, v in per_token.items())
        + f"; {need / 2**20:,.1f} MiB to write" + (f" ({left_rows} of {total_rows} rows left)"
                                                     if left_rows < total_rows else ""))
    if st.is_local:
        check_disk(out, need)

    if not has_plan:
        cache_fmt.write_json(st, plan_rel, plan)
    split_rows = {s: len(r) for s, r in prepared.splits.items()}
    writer = CacheWriter(st, plan, specs, split_rows, base)
    for split, rows in prepared.splits.items():
        rel = f"{writer.parts[split]['path']}/rows.parquet"
        if not st.exists(rel):  # written whole, then put in place at once
            with tempfile.TemporaryDirectory() as tmp:
                cache_fmt.write_rows(Path(tmp) / "rows.parquet", rows)
                st.upload(Path(tmp) / "rows.parquet", rel)
    if base is None:  # students read the tokenizer from the cache, never from the teacher
        _store_tokenizer(st, tokenizer)
    writer.create_arrays()
    committed = writer.committed()
    todo = [(s, i, a, b) for s, n in split_rows.items()
            for i, (a, b) in enumerate(cache_fmt.shard_ranges(n, cfg.capture.rows_per_shard))
            if (s, i) not in committed]
    if committed:
        log(f"resuming: {len(committed)} shards already committed, {len(todo)} to go")
    return todo, len(committed)


def _store_head(st: Storage, cfg: TeacherCacheConfig, model=None) -> None:
    """The teacher's LM head (weight, and bias where it has one) in safetensors, in the dtype the teacher
    computes with; the logit scale, divisor and softcap are in the manifest's `teacher`."""
    import torch
    from safetensors.torch import save_file

    if model is None:
        model = teacher_mod.load_model(cfg.teacher, torch.device("cpu"))
    head = model.get_output_embeddings()
    tensors = {"weight": head.weight.detach().cpu().contiguous()}
    if getattr(head, "bias", None) is not None:
        tensors["bias"] = head.bias.detach().cpu().contiguous()
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, str(Path(tmp) / cache_fmt.HEAD_FILE), metadata={"format": "pt"})
        st.upload(Path(tmp) / cache_fmt.HEAD_FILE, cache_fmt.HEAD_FILE)


def _store_tokenizer(st: Storage, tokenizer) -> None:
    """The teacher's tokenizer files under tokenizer/: on local disk a folder renamed into place once;
    on object storage uploaded file by file (again on a resume: they are small)."""
    if st.is_local:
        final = st.local_path(cache_fmt.TOKENIZER_DIR)
        if final.exists():
            return
        tmp = final.with_name(cache_fmt.TOKENIZER_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(final)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for p in sorted(Path(tmp).rglob("*")):
            if p.is_file():
                st.upload(p, f"{cache_fmt.TOKENIZER_DIR}/{p.relative_to(tmp).as_posix()}")


def check_teacher_document_masking(computer: TargetComputer, spec, dtype: str) -> None:
    from ..attention import DocumentMaskError, check_document_masking

    def run(ids, pos):
        return computer.base(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state

    try:
        check_document_masking(run, spec.vocab_size, computer.device, f"teacher {spec.model_type!r}",
                               rel_tol=1e-3 if dtype == "float32" else 5e-2)
    except DocumentMaskError as e:
        raise CaptureError(str(e)) from None


NEAR_UNIFORM = 0.9  # a teacher NLL above this share of log(V) is close to a uniform guess
BOS_GAIN_NATS = 0.05  # the other BOS choice must beat the rows' by this much (and 2%) to be flagged


def first_rows_check(computer: TargetComputer, rows, tokenizer, convention: dict, spec, n_rows: int = 2
                     ) -> list[str]:
    """Is the teacher in distribution on the rows it is about to label? Its mean NLL on the first
    rows, against a uniform guess (log V) and, when its tokenizer has a BOS token, against the same
    rows with the other BOS choice (the same tokens predicted). Returns log lines, warnings first."""
    import math

    k = min(n_rows, len(rows))
    ids, lens = rows.input_ids[:k], rows.lengths[:k]
    bos = tokenizer.bos_token_id
    applied = convention["bos"]["applied"]
    L = ids.shape[1]
    lines, note = [], ""
    if bos is None or L <= 2:
        nll = float(np.nanmean(-computer(ids, lens).target_logprob))
    else:  # the rows' content with and without a leading BOS; the prepared rows are one of the two
        content = np.zeros_like(ids)
        m = lens - 1 if applied else lens.copy()
        for i in range(k):
            row = ids[i, 1 : lens[i]] if applied else ids[i, : lens[i]]
            content[i, : len(row)] = row
        with_bos = np.concatenate([np.full((k, 1), bos, dtype=ids.dtype), content[:, :-1]], 1)
        lp_with = computer(with_bos, np.minimum(m + 1, L).astype(np.int32)).target_logprob
        lp_without = computer(content, m.astype(np.int32)).target_logprob
        nll = float(np.nanmean(-(lp_with if applied else lp_without)))
        a, b = lp_with[:, 1 : L - 1], lp_without[:, : L - 2]  # both predict content[1 : L - 1]
        both = np.isfinite(a) & np.isfinite(b)
        if both.any():
            nll_with, nll_without = float(-a[both].mean()), float(-b[both].mean())
            ours, other = (nll_with, nll_without) if applied else (nll_without, nll_with)
            note = f"; on the same tokens {nll_with:.3f} with BOS, {nll_without:.3f} without"
            if other < ours - max(BOS_GAIN_NATS, 0.02 * ours):
                lines.append(f"warning: the teacher predicts the first rows better {'without' if applied else 'with'} "
                             f"a leading BOS ({other:.3f} vs {ours:.3f} nats/token as prepared): the rows may not be "
                             f"what it expects; see data.bos (now {convention['bos']['setting']!r})")
    log_v = math.log(spec.vocab_size)
    if nll > NEAR_UNIFORM * log_v:
        lines.insert(0, f"warning: the teacher's NLL on the first {k} rows is {nll:.3f} nats/token, close to a "
                        f"uniform guess over its vocabulary (log V = {log_v:.3f}): check that the teacher, its "
                        "tokenizer and the data belong together")
    lines.append(f"first-rows check: teacher NLL {nll:.3f} nats/token on {k} rows{note}")
    return lines


def overlap_writes(device) -> bool:
    """Write shards in a background thread only when that thread does not take a core from the
    teacher: on a GPU, or when torch leaves CPU cores idle. On a CPU whose cores all run torch's
    OpenMP threads, a competing writer stalls every parallel region, which costs far more than
    writing in line (measured: see README)."""
    import torch

    return device.type == "cuda" or (os.cpu_count() or 1) > torch.get_num_threads()


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


def _run_shards(computer, prepared, todo, writer: CacheWriter, batch_size: int, bar: Progress,
                overlap: bool) -> None:
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer") as pool:
        try:
            for split, index, a, b in todo:
                rows = prepared.splits[split]
                t0 = time.perf_counter()
                parts = []
                for s in range(a, b, batch_size):
                    e = min(s + batch_size, b)
                    pos = None if rows.position_ids is None else rows.position_ids[s:e]
                    seed = [zlib.crc32(split.encode()), writer.parts[split]["row_start"] + s]  # the draws' seed
                    parts.append(computer(rows.input_ids[s:e], rows.lengths[s:e], pos, seed))
                    bar.update(int(rows.lengths[s:e].sum()))
                targets = TeacherTargets.concat(parts)
                stats = _shard_stats(targets, rows.lengths[a:b], time.perf_counter() - t0,
                                     None if rows.labels is None else rows.labels[a:b])
                if pending is not None:
                    pending.result()  # at most one shard in flight; surfaces write errors
                if overlap:
                    pending = pool.submit(writer.write_shard, split, index, targets, stats)
                else:
                    pending = None
                    writer.write_shard(split, index, targets, stats)
            if pending is not None:
                pending.result()
        except OSError as e:
            raise CaptureError(f"writing the cache failed ({e.strerror or e}); committed shards are kept: fix the "
                               "cause and rerun the same command to resume") from e


def _shard_stats(t: TeacherTargets, lengths: np.ndarray, seconds: float, labels: np.ndarray | None = None) -> dict:
    if t.class_logprobs is not None:  # a classifier: how often it agrees with the gold labels
        pred = t.class_logprobs.argmax(-1)
        known = labels != data_mod.IGNORE
        return {"tokens": int(lengths.sum()), "seconds": seconds, "labelled": int(known.sum()),
                "teacher_correct": int((pred == labels)[known].sum())}
    L = t.logsumexp.shape[1]
    valid = np.arange(L)[None, :] < lengths[:, None]
    mass = np.exp(t.topk_logprobs.astype(np.float64)).sum(-1)  # (B, L)
    return {"tokens": int(lengths.sum()), "seconds": seconds, "topk_mass_sum": float(mass[valid].sum())}


def _statistics(writer: CacheWriter, base: dict | None = None) -> dict:
    """Statistics of the cache the writer finishes: its new shards, plus `base`'s when it grows one."""
    commits = writer.committed().values()
    old = base["stats"] if base is not None else {"tokens": 0, "timing": {"seconds": 0.0}, "bytes_per_token": {}}
    tokens = sum(c["tokens"] for c in commits) + old["tokens"]
    seconds = sum(c["seconds"] for c in commits) + old["timing"]["seconds"]
    per_field = {k: v * old["tokens"] for k, v in old["bytes_per_token"].items()}
    for c in commits:
        for rel, d in c["files"].items():
            name = rel[len(c.get("part", c["split"])) + 1:].split("/")[0]
            per_field[name] = per_field.get(name, 0) + d["bytes"]
    for part in writer.parts.values():
        per_field["rows.parquet"] = per_field.get("rows.parquet", 0) + writer.st.size(f"{part['path']}/rows.parquet")
    if base is None and writer.st.exists(cache_fmt.HEAD_FILE):
        per_field[cache_fmt.HEAD_FILE] = writer.st.size(cache_fmt.HEAD_FILE)  # once per cache
    if "task" in writer.plan:  # a classifier: its accuracy on the gold labels, per split, over every part
        right = {s: list(v) for s, v in old.get("teacher_correct_labelled", {}).items()}
        for c in commits:
            r = right.setdefault(c["split"], [0, 0])
            r[0], r[1] = r[0] + c["teacher_correct"], r[1] + c["labelled"]
        quality = {"teacher_correct_labelled": right,
                   "teacher_accuracy": {s: a / max(n, 1) for s, (a, n) in right.items()}}
    else:  # a causal LM: the share of its probability mass its top-K hold
        mass = sum(c["topk_mass_sum"] for c in commits) + old.get("mean_topk_mass", 0.0) * old["tokens"]
        quality = {"mean_topk_mass": mass / max(tokens, 1)}
    return quality | {
        "tokens": tokens,
        "rows": sum(v["rows"] for v in writer.plan["splits"].values()),
        "bytes_on_disk": round(sum(per_field.values())),
        "bytes_per_token": {k: v / max(tokens, 1) for k, v in per_field.items()},
        "timing": {"seconds": seconds, "tokens_per_second": tokens / seconds if seconds else 0.0,
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
