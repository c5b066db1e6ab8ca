"""Step 1, prepare: documents -> fixed-length token rows with content keys and a split.

Documents come through `datasets` (a hub id, or local txt/jsonl/parquet/arrow files).
Rows are `seq_len` tokens: documents joined with EOS and cut (packing), or one document
per row, truncated and right-padded. Each row's key is blake2b-128 of its real tokens
(int32 little-endian), so students can join, subset and reorder rows; identical rows are
dropped (keys are unique). The validation split is chosen by key, so it does not depend
on row order and a subset of a corpus keeps its rows' assignment.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import DataConfig

LOCAL_LOADERS = {"text", "json", "parquet", "arrow", "csv"}
_DOC_BATCH = 256


class DataError(ValueError):
    """A dataset that cannot be prepared as configured."""


@dataclass
class Rows:
    """Token rows of one split. Positions >= lengths[i] are padding."""

    input_ids: np.ndarray  # (N, L) int32
    lengths: np.ndarray  # (N,) int32
    keys: list[str]  # (N,) 32 hex chars

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


@dataclass
class Prepared:
    splits: dict[str, Rows]
    info: dict = field(default_factory=dict)  # dataset identity and preparation statistics


def content_key(ids: np.ndarray) -> str:
    """blake2b-128 hex digest of the real token ids as little-endian int32."""
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype="<i4").tobytes(), digest_size=16).hexdigest()


def is_validation(key: str, fraction: float) -> bool:
    return int(key[:8], 16) < fraction * 16**8


def expand_data_files(cfg: DataConfig) -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    files: list[str] = []
    for pattern in cfg.data_files:
        pattern = pattern.replace("{stdlib}", stdlib)
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"data file pattern {pattern!r} matches no file")
        for m in matches:
            if not Path(m).is_file():
                raise DataError(f"data file {m} does not exist")
        files.extend(m for m in matches if not any(fnmatch.fnmatch(Path(m).name, ex) for ex in cfg.exclude))
    if cfg.data_files and not files:
        raise DataError(f"every data file was excluded by {cfg.exclude}")
    return files


def load_documents(cfg: DataConfig):
    """The configured split as a `datasets.Dataset` with a text column."""
    import datasets

    files = expand_data_files(cfg)
    kwargs: dict = {"split": cfg.split}
    if cfg.source in LOCAL_LOADERS:
        if not files:
            raise DataError(f"data.source={cfg.source!r} reads local files: set data.data_files")
        kwargs["data_files"] = {cfg.split: files}
        if cfg.source == "text":
            kwargs["sample_by"] = cfg.sample_by
    elif files:
        kwargs["data_files"] = files
    try:
        ds = datasets.load_dataset(cfg.source, cfg.config_name, **kwargs)
    except Exception as e:  # datasets raises many types (StopIteration for an empty json file)
        raise DataError(f"cannot load dataset {cfg.source!r} {files[:3] or ''}: "
                        f"{type(e).__name__}: {e or 'no data'}") from e
    if cfg.text_column not in ds.column_names:
        raise DataError(
            f"text column {cfg.text_column!r} not in dataset {cfg.source!r} (columns: {', '.join(ds.column_names)})"
        )
    if len(ds) == 0:
        raise DataError(f"dataset {cfg.source!r} split {cfg.split!r} is empty")
    info = {
        "source": cfg.source,
        "config_name": cfg.config_name,
        "split": cfg.split,
        "text_column": cfg.text_column,
        "data_files": [_portable(f) for f in files],
        "datasets_fingerprint": getattr(ds, "_fingerprint", None),
        "documents_available": len(ds),
    }
    return ds, info


def _portable(path: str) -> str:
    stdlib = sysconfig.get_paths()["stdlib"]
    return "{stdlib}" + path[len(stdlib) :] if path.startswith(stdlib) else path


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def _token_docs(ds, tokenizer, cfg: DataConfig):
    """Yield token id lists per non-empty document, in dataset order, up to the caps."""
    if cfg.shuffle_seed is not None:
        ds = ds.shuffle(seed=cfg.shuffle_seed)
    n_docs = len(ds) if cfg.max_documents is None else min(len(ds), cfg.max_documents)
    for start in range(0, n_docs, _DOC_BATCH):
        texts = ds[start : min(start + _DOC_BATCH, n_docs)][cfg.text_column]
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            continue
        for ids in tokenizer(texts, add_special_tokens=cfg.add_special_tokens)["input_ids"]:
            yield ids


def tokenize_rows(ds, tokenizer, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """All rows, in order: (input_ids (N, L) int32, lengths (N,) int32, stats)."""
    L = cfg.seq_len
    eos = tokenizer.eos_token_id
    if cfg.packing and eos is None:
        raise DataError("packing joins documents with EOS, but the tokenizer has no eos_token_id")
    pad = _pad_id(tokenizer)
    budget = cfg.max_tokens if cfg.max_tokens is not None else float("inf")
    rows: list[np.ndarray] = []
    lengths: list[int] = []
    stats = {"documents": 0, "documents_truncated": 0, "tokens_read": 0}
    stream: list[int] = []
    for ids in _token_docs(ds, tokenizer, cfg):
        if stats["tokens_read"] >= budget:
            break
        stats["documents"] += 1
        if cfg.packing:
            doc = ids + [eos]
            take = int(min(len(doc), budget - stats["tokens_read"]))
            stream.extend(doc[:take])
            stats["tokens_read"] += take
            while len(stream) >= L:
                rows.append(np.asarray(stream[:L], dtype=np.int32))
                lengths.append(L)
                del stream[:L]
        else:
            doc = ids + ([eos] if eos is not None else [])
            if len(doc) > L:
                stats["documents_truncated"] += 1
                doc = doc[:L]
            take = int(min(len(doc), budget - stats["tokens_read"]))
            doc = doc[:take]
            stats["tokens_read"] += take
            row = np.full(L, pad, dtype=np.int32)
            row[: len(doc)] = doc
            rows.append(row)
            lengths.append(len(doc))
    if cfg.packing and stream:  # the tail: one last, padded row
        row = np.full(L, pad, dtype=np.int32)
        row[: len(stream)] = stream
        rows.append(row)
        lengths.append(len(stream))
    if not rows:
        raise DataError("the dataset produced no tokens (every document empty?)")
    return np.stack(rows), np.asarray(lengths, dtype=np.int32), stats


def prepare(cfg: DataConfig, tokenizer) -> Prepared:
    """Load, tokenize, key, deduplicate and split. Deterministic for the same inputs."""
    ds, info = load_documents(cfg)
    input_ids, lengths, stats = tokenize_rows(ds, tokenizer, cfg)
    keys = [content_key(r[:n]) for r, n in zip(input_ids, lengths)]
    seen: set[str] = set()
    keep = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    val = [i for i in keep if is_validation(keys[i], cfg.validation_fraction)]
    if cfg.validation_fraction > 0 and not val and len(keep) > 1:
        val = [min(keep, key=lambda i: keys[i])]  # a tiny corpus still gets one validation row
    val_set = set(val)
    train = [i for i in keep if i not in val_set]
    if not train:
        raise DataError("no training rows left after the validation split; add data or lower validation_fraction")
    splits = {}
    for name, idx in (("train", train), ("validation", val)):
        if idx:
            ix = np.asarray(idx)
            splits[name] = Rows(input_ids[ix], lengths[ix], [keys[i] for i in idx])
    stats["rows"] = len(keys)
    stats["duplicate_rows_dropped"] = len(keys) - len(keep)
    info["statistics"] = stats
    return Prepared(splits=splits, info=info)
