"""The plan of a capture: everything that determines a cache's bytes, i.e. its manifest less shards,
metadata files, statistics and digest. Built from the settings, the teacher's facts and the prepared rows
through the format's records (`build_plan`, with `format.plans`); compared with what an output location
holds (`diff`, `described`); grown by the rows of new documents for an append (`plan_append`, `grown_plan`).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass

import pyarrow as pa

from .. import distributed, models
from ..config import TeacherCacheConfig
from ..errors import CaptureError
from ..format.columns import row_fields
from ..format.layout import MANIFEST, part_path
from ..format.manifest import FORMAT_VERSION, Manifest, canonical, migrate
from ..format.plans import part_record, plan_document, tokenizer_record
from ..format.reader import Cache, read_manifest
from ..format.records import Part, Split
from ..format.specs import FieldSpec
from ..format.storage import Storage
from .labels import Classifier
from .rows import Prepared
from .teacher import TeacherFacts, stored_heads


def software() -> dict:
    import datasets
    import pyarrow
    import torch
    import transformers
    import zarr

    return {"torch": torch.__version__, "transformers": transformers.__version__, "zarr": zarr.__version__,
            "datasets": datasets.__version__, "pyarrow": pyarrow.__version__, "python": sys.version.split()[0]}


def build_plan(cfg: TeacherCacheConfig, teacher: TeacherFacts, prepared: Prepared, specs: list[FieldSpec],
               weights_sha256: str | None = None) -> dict:
    """Everything that determines the cache's bytes; the manifest minus shards and stats. `weights_sha256`: the
    teacher's weights fingerprint, when already computed."""
    split_rows = {s: len(r) for s, r in prepared.splits.items()}
    fields = {s.name: s.to_dict(split_rows, cfg.capture.rows_per_chunk, cfg.capture.rows_per_shard) for s in specs}
    fields |= _row_fields(prepared, split_rows, cfg.data.seq_len)
    if cfg.data.key_columns:
        fields["key"]["description"] += f" and the values of {', '.join(cfg.data.key_columns)} (key_columns)"
    classifier, shard_rows = teacher.classifier, cfg.capture.rows_per_shard
    return plan_document(
        teacher={"model": cfg.teacher.model, "gguf_file": cfg.teacher.gguf_file, "revision": cfg.teacher.revision,
                 "weights_sha256": weights_sha256 if weights_sha256 is not None else
                 models.weights_fingerprint(cfg.teacher), "dtype": cfg.teacher.dtype,
                 "device_type": teacher.device.type, **teacher.spec.to_dict()},
        tokenizer=tokenizer_record(teacher.tokenizer),
        dataset=prepared.info,
        preparation={**_preparation(cfg, classifier), **prepared.convention},
        capture={**cfg.capture.model_dump(exclude={"batch_size", "position_chunk", "hidden_layers", "attention_layers",
                                                   "writers", "attention_budget_gib"}),
                 "hidden_layers": teacher.hidden, "attention_layers": teacher.attention,
                 "attention_heads_stored": stored_heads(cfg.capture, teacher.spec),
                 "temperatures_all": [1.0, *cfg.capture.temperatures],
                 "batch_size": cfg.capture.batch_size, "position_chunk": cfg.capture.position_chunk},
        splits=[Split.of(s, (new_part(s, 0, prepared.splits[s], shard_rows),)) for s in split_rows],
        fields=fields,
        software=software(),
        # a classification teacher: its task and labels (a causal LM's plan has no such key)
        task=classifier.record(cfg.data.label_column) if classifier is not None else None,
    )


def _row_fields(prepared: Prepared, split_rows: dict[str, int], L: int) -> dict:
    """The manifest entries of the rows.parquet columns the prepared rows have."""
    schema = next(iter(prepared.splits.values())).schema if prepared.splits else None  # None: an append of nothing
    columns = schema.names if schema is not None else []
    labels = pa.types.is_fixed_size_list(schema.field("labels").type) if "labels" in columns else None
    return row_fields(columns, split_rows, L, labels)


def _preparation(cfg: TeacherCacheConfig, classifier: Classifier | None) -> dict:
    preparation = cfg.data.model_dump(include={"seq_len", "packing", "add_special_tokens", "max_documents",
                                               "max_tokens", "validation_fraction", "sample_by", "shuffle_seed",
                                               "format", "loss_mask", "document_mask"})
    if cfg.data.key_columns:  # recorded only where used, so that earlier caches' plans are unchanged
        preparation["key_columns"] = list(cfg.data.key_columns)
    if cfg.data.splits:
        preparation["splits"] = dict(cfg.data.splits)
        if "validation" in cfg.data.splits:
            preparation["validation_fraction"] = None  # the dataset's own validation split
    if classifier is not None:
        preparation["add_special_tokens"] = True  # a classifier's rows carry its tokenizer's special tokens
    return preparation


def new_part(path: str, row_start: int, rows, shard_rows: int) -> Part:
    """The part at `path` that prepared `rows` fill, from row `row_start` of its split."""
    return part_record(path, row_start, len(rows), rows.n_tokens, shard_rows)


# ---------------------------------------------------------------------------------------------
# comparing plans


def diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """'key.path: old -> new' for every setting that differs between two plans."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def described(old: dict, plan: dict) -> dict:
    """An earlier manifest or plan in the current layout, for comparison with `plan`: a 1.0/1.1 layout
    gets its parts, and architecture facts that newer versions record (e.g. teacher.intermediate_size)
    are taken from `plan` when `old` lacks them: they follow from the weights, which
    teacher.weights_sha256 compares."""
    out = migrate(old)
    if isinstance(out.get("teacher"), dict) and isinstance(plan.get("teacher"), dict):
        out["teacher"] = {**{k: v for k, v in plan["teacher"].items() if k not in out["teacher"]}, **out["teacher"]}
    return out


def changes_from(old: Manifest, plan: dict) -> list[str]:
    """How `plan` differs from the plan the finished cache `old` was made with (in the current layout)."""
    done = described(old.plan(), plan)  # the plan's keys only: never the shard list
    return diff({k: done.get(k) for k in plan}, plan)


def finished_changes(old: Manifest, plan: dict) -> list[str]:
    """How `plan` differs from the plan of the finished cache `old`, less the encodings of the top-K values:
    a cache written with the older codec (zstd, int32 ids) holds the same values and is done."""
    return [c for c in changes_from(old, plan) if not c.startswith(ENCODINGS)]


ENCODINGS = ("capture.topk_codec:", "fields.topk_ids.dtype:", "fields.topk_ids.codec:", "fields.topk_logprobs.codec:",
             "capture.hidden_codec:", "fields.hidden_states.codec:", "fields.final_hidden.codec:",
             "capture.topk_ids_encoding:", "fields.topk_ids.encoding:", "fields.topk_ids.description:")

# What an append may change: which documents, and where and with what software it ran. Everything
# else that determines the cache's bytes must be what the cache was made with.
APPEND_FREE = {"dataset", "software", "splits", "fields", "format_version", "grown", "teacher.device_type",
               "teacher.model", "teacher.revision", "teacher.gguf_file",  # weights_sha256 says which weights
               "capture.batch_size", "capture.position_chunk", "preparation.max_documents",
               "preparation.max_tokens", "preparation.sample_by", "preparation.shuffle_seed"}


def append_differences(base: Manifest, plan: dict) -> list[str]:
    """Why the rows of `plan` cannot join the finished cache `base` (empty: they can)."""
    return [c for c in changes_from(base, plan)
            if not any(c.startswith(f + ".") or c.startswith(f + ":") for f in APPEND_FREE)]


def same_rows_on_every_rank(plan: dict, prepared: Prepared | None) -> None:
    """Every rank computes targets for the rows it prepared itself, and rank 0 alone stores them: refuse
    a job whose ranks (nodes with other data files, library versions or tokenizer files) prepared
    other rows or settings than rank 0."""
    if not distributed.ranks().active:
        return
    h = hashlib.sha256(canonical({k: v for k, v in plan.items() if k != "software"}).encode())
    for split, rows in (prepared.splits.items() if prepared is not None else []):
        h.update(split.encode())
        h.update(rows.keys_sha256.encode())
    every = distributed.all_gather(h.hexdigest())
    odd = [r for r, d in enumerate(every) if d != every[0]]
    if odd:
        raise CaptureError(f"ranks {odd} prepared other rows or settings than rank 0 (data files, library versions or "
                           "tokenizer files differ between nodes?); every rank must see the same inputs")


# ---------------------------------------------------------------------------------------------
# appends


@dataclass(frozen=True)
class Append:
    """What an append adds to the finished cache `base`: its grown plan and the new rows (None: nothing new)."""

    base: Manifest
    plan: dict | None
    prepared: Prepared | None


def append_base(st: Storage) -> Manifest:
    """The finished cache an append grows; refuses a location without one, and a partial pull."""
    out = st.location
    if not st.exists(MANIFEST):
        raise CaptureError(f"output.mode=append: there is no finished cache at {out} to append to; make (or finish) "
                           "it with output.mode=create first")
    base = read_manifest(st)
    if base.subset:
        raise CaptureError(f"cannot append to {out}: it is a partial pull (fields {', '.join(base.subset.fields)}"
                           f", splits {', '.join(base.subset.splits)}) of another cache; append to the whole "
                           "cache, then pull again")
    return base


def cached_keys(st: Storage):
    """The keys of every row of the cache at `st`, a row group at a time (what an append leaves out)."""
    import pyarrow.parquet as pq

    cache = Cache(st)
    for split in cache.splits:
        for part in cache.parts(split):
            f = pq.ParquetFile(str(cache.local_file(f"{part.path}/rows.parquet")))
            for g in range(f.metadata.num_row_groups):
                yield f.read_row_group(g, columns=["key"]).column("key").to_pylist()


def plan_append(st: Storage, plan: dict, prepared: Prepared, cfg: TeacherCacheConfig, log) -> Append:
    """The rows of `prepared` (prepared without the rows the cache at `st` holds) as a grown plan; refuses a
    cache made with another teacher, tokenizer or settings."""
    out = st.location
    base = append_base(st)
    changes = append_differences(base, plan)
    if changes:
        raise CaptureError(f"cannot append to {out}: it was made with another teacher, tokenizer or settings. "
                           "Differences (cache -> now):\n  " + "\n  ".join(changes[:20]))
    duplicates = prepared.already_cached
    if not prepared.splits:
        log(f"nothing to append: all {duplicates} rows of these documents are already in {out}")
        return Append(base, None, None)
    log(f"appending to {out}: " + ", ".join(f"{s} +{len(r)} rows" for s, r in prepared.splits.items())
        + f"; {duplicates} rows already in the cache skipped")
    return Append(base, grown_plan(base, plan, prepared, cfg.capture.rows_per_shard, duplicates), prepared)


def grown_plan(base: Manifest, plan: dict, prepared: Prepared, shard_rows: int, duplicates: int) -> dict:
    """The plan of `base` grown by the rows of `prepared`, each split's new rows a new part."""
    number = len(base.grown) + 1
    g = base.plan()
    g["format_version"] = FORMAT_VERSION
    g["fields"] = {}
    splits = []
    for split in list(base.splits) + [s for s in prepared.splits if s not in base.splits]:
        parts = list(base.parts(split)) if split in base.splits else []
        if split in prepared.splits:
            parts.append(new_part(part_path(split, number), sum(p.rows for p in parts), prepared.splits[split],
                                  shard_rows))
        splits.append(Split.of(split, tuple(parts)))
    g["splits"] = {s.name: s.to_dict() for s in splits}
    for name, f in plan["fields"].items():
        tail = next(iter(f["shape"].values()))[1:]
        g["fields"][name] = {**f, "shape": {s: [v["rows"], *tail] for s, v in g["splits"].items()}}
    g["grown"] = [*g.get("grown", []), {
        "number": number, "parent_digest": base.digest, "dataset": plan["dataset"],
        "rows": {s: len(r) for s, r in prepared.splits.items()},
        "tokens": sum(r.n_tokens for r in prepared.splits.values()), "duplicate_rows_skipped": duplicates,
        "parts": [part_path(s, number) for s in prepared.splits],
        "device_type": plan["teacher"]["device_type"], "software": plan["software"]}]
    return g
