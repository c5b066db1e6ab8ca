"""Step 1c, rows: documents -> fixed-length token rows with content keys and a split (`prepare`).

The rows themselves are made by `packing.py` (a classifier's by `labels.py`). Each row's key is blake2b-128 of
its real tokens (int32 little-endian), so students can join, subset and reorder rows; identical rows are
dropped (keys are unique). The validation split is chosen by key, so it does not depend on row order and a
subset of a corpus keeps its rows' assignment.

Preparation streams (`prepare`): a block of documents is tokenised and packed, its rows keyed, checked
against the keys seen so far (an on-disk set) and appended to its split's Parquet file; memory holds a
block and a row group, not the corpus.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import models
from ..config import DataConfig
from ..errors import DataError
from .arrival import Runs
from .documents import RowConvention, load_documents
from .labels import Classifier, classification_blocks
from .lineage import check_generation
from .packing import row_blocks, tokenizer_pad_id
from .rowfiles import KeyStore, RowFile, RowFileWriter, Rows


@dataclass
class Prepared:
    """The rows of each split, in Parquet files on local scratch (`rowfiles.RowFile`), and what made them. The
    scratch folder is removed with this object (or by `close`)."""

    splits: dict[str, RowFile]
    info: dict = field(default_factory=dict)  # dataset identity and preparation statistics
    convention: dict = field(default_factory=dict)  # RowConvention.to_dict(): what position 0 is, the template
    already_cached: int = 0  # an append: rows of these documents the cache holds already (not in `splits`)
    label_runs: dict | None = None  # sequence classification: runs of one gold label among the training rows
    #                                 in arrival order (`arrival.Runs.summary`)
    timing: dict = field(default_factory=dict)  # this rank's tokenising seconds and documents
    scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def close(self) -> None:
        if self.scratch is not None:
            self.scratch.cleanup()


def content_key(ids: np.ndarray, salt: bytes | None = None) -> str:
    """blake2b-128 hex digest of the real token ids as little-endian int32 (and, with data.key_columns, a zero byte
    and those columns' values)."""
    data = np.ascontiguousarray(ids, dtype="<i4").tobytes()
    return hashlib.blake2b(data if salt is None else data + b"\0" + salt, digest_size=16).hexdigest()


def is_validation(key: str, fraction: float) -> bool:
    return int(key[:8], 16) < fraction * 16**8


def row_pad_id(model_config, tokenizer) -> int:
    """What a classifier's rows are padded with: its config's pad_token_id (a decoder classifier pools at the
    last token that is not it), else the tokenizer's."""
    pad = models.config_pad_id(model_config)
    return pad if pad is not None else tokenizer_pad_id(tokenizer)


def prepare(cfg: DataConfig, tokenizer, classifier: Classifier | None = None, *, min_validation: bool = True,
            shard_rows: int = 64, cached_keys=None, scratch: Path | None = None) -> Prepared:
    """Load, tokenize, key, deduplicate and split, streamed: rows go to one Parquet file per split in a scratch
    folder (`scratch`, default a temporary folder in $TMPDIR) in row groups of whole shards (`shard_rows`), keys
    to an on-disk set. Deterministic for the same inputs; under torchrun every rank makes the same files, each
    tokenising 1/W of the documents. `min_validation`: a corpus whose keys put no row in validation still gives
    it one (not for an append: there the split must follow the keys alone, as in the cache it grows).
    `cached_keys` (an append): blocks of the keys the cache holds; those rows are left out (`already_cached`).
    A classification teacher's rows (`classifier`: its task, its classes, what the rows are padded with) keep
    one example per row with its labels. Splits named in data.splits come from the dataset's own splits; a train
    row equal to one of theirs is dropped from train."""
    if classifier is not None:
        conv = {"rows": {"one_example_per_row": True, "special_tokens": "tokenizer", "truncation": True,
                         "pad_token_id": classifier.pad_id}}
    else:
        conv = RowConvention.resolve(cfg, tokenizer)  # before the dataset: a bad setting fails at once
    tmp = None
    if scratch is None:
        tmp = tempfile.TemporaryDirectory(prefix="distill-rows-")
        scratch = Path(tmp.name)
    scratch.mkdir(parents=True, exist_ok=True)
    store = KeyStore(scratch / "keys.sqlite")
    try:
        run = _Preparation(cfg, tokenizer, conv, classifier, shard_rows, scratch, store)
        cached = store.load(cached_keys, "cache") if cached_keys is not None else 0
        splits, info = run.splits(min_validation, cached=cached > 0)
    except BaseException:
        store.close()
        if tmp is not None:
            tmp.cleanup()
        raise
    store.close()
    return Prepared(splits=splits, info=info, convention=conv if classifier is not None else conv.to_dict(),
                    already_cached=run.cached, timing=run.timing, scratch=tmp, label_runs=run.label_runs.summary())


class _Preparation:
    """One preparation's streams: each dataset split's blocks of rows, keyed, deduplicated and routed to the
    cache splits' row files."""

    def __init__(self, cfg: DataConfig, tokenizer, conv, classifier: Classifier | None, shard_rows: int,
                 scratch: Path, store: KeyStore):
        self.cfg, self.tokenizer, self.conv, self.classifier = cfg, tokenizer, conv, classifier
        self.shard_rows = shard_rows
        self.scratch, self.store = scratch, store
        self.cached = 0
        self.timing: dict = {}  # this rank's own tokenising (not recorded in the cache: it varies)
        self.label_runs = Runs()

    def blocks(self, split: str | None, where: str, stats: dict):
        """(info, the split's rows as keyed `Rows` blocks)."""
        ds, info = load_documents(self.cfg, split, self.classifier.task if self.classifier else "causal-lm")
        check_generation(info.get("generation"), self.tokenizer)  # before any row is made
        if self.classifier is not None:
            raw = classification_blocks(ds, self.tokenizer, self.cfg, self.classifier, where, stats)
        else:
            raw = row_blocks(ds, self.tokenizer, self.cfg, self.conv, stats, self.timing)

        def keyed():
            for b in raw:
                salts = b.get("salts") or [None] * len(b["lengths"])
                keys = [content_key(r[:n], salt) for r, n, salt in zip(b["input_ids"], b["lengths"], salts)]
                yield Rows(b["input_ids"], b["lengths"], keys, b["loss_mask"], b["position_ids"], b.get("labels"))
        return info, keyed()

    def writer(self, name: str) -> RowFileWriter:
        return RowFileWriter(self.scratch / f"{name}.parquet", self.shard_rows)

    def held_out(self) -> tuple[dict[str, RowFile], dict]:
        """The cache splits that come from the dataset's own splits (data.splits), each deduplicated."""
        files, infos = {}, {}
        for name in ("validation", "test"):
            if name not in self.cfg.splits:
                continue
            stats: dict = {}
            sinfo, blocks = self.blocks(self.cfg.splits[name], f"dataset split {self.cfg.splits[name]!r}", stats)
            w, rows = self.writer(name), 0
            for b in blocks:
                keep = [i for i, k in enumerate(b.keys) if self.store.add(k, name)]
                rows += len(b)
                w.add(b.take(keep))
            stats["rows"] = rows
            stats["duplicate_rows_dropped"] = rows - w.rows
            files[name] = w.close()
            infos[name] = {"split": self.cfg.splits[name], "documents_available": sinfo["documents_available"],
                           "datasets_fingerprint": sinfo["datasets_fingerprint"], "data_files": sinfo["data_files"],
                           "statistics": stats}
        return files, infos

    def splits(self, min_validation: bool, cached: bool) -> tuple[dict[str, RowFile], dict]:
        """Every cache split's row file, and the dataset's identity with the preparation statistics."""
        cfg = self.cfg
        held, held_info = self.held_out()
        stats: dict = {}
        info, blocks = self.blocks(None, f"dataset split {cfg.split!r}", stats)
        by_fraction = "validation" not in cfg.splits
        train, val = self.writer("train"), self.writer("validation.fraction") if by_fraction else None
        route = _Router(self.store, cfg.validation_fraction if by_fraction else None, tuple(held), cached)
        for b in blocks:
            to_train, to_val = route(b)
            train.add(b.take(to_train))
            if b.labels is not None and b.labels.ndim == 1:  # one gold label per row: how they arrive
                self.label_runs.add(b.labels[to_train])
            if val is not None:
                val.add(b.take(to_val))
        self.cached = route.cached
        stats["rows"] = route.rows
        stats["duplicate_rows_dropped"] = route.duplicates
        files = {"train": train.close()}
        if val is not None:
            files["validation"] = val.close()
        if by_fraction and min_validation and cfg.validation_fraction > 0 and not files["validation"].rows \
                and route.rows - route.duplicates > 1 and route.smallest is not None:
            files = self._one_validation_row(files, route.smallest)  # a tiny corpus still gets one validation row
        files.update(held)
        if cfg.splits:
            info["splits"] = held_info
            stats["train_rows_in_held_out_splits_dropped"] = route.held_out
        info["statistics"] = stats
        if not route.train_candidates:
            if route.held_out:
                raise DataError(f"every train row is also in a held-out split ({', '.join(cfg.splits.values())}): do "
                                "data_files name each split's own files?")
            raise DataError("no training rows left after the validation split; add data or lower validation_fraction")
        return {s: files[s] for s in ("train", "validation", "test") if s in files and files[s].rows}, info

    def _one_validation_row(self, files: dict[str, RowFile], smallest) -> dict[str, RowFile]:
        """The validation split as the kept row with the smallest key, taken out of train."""
        key, row, in_train = smallest
        val = self.writer("validation.min")
        val.add(row)
        files["validation"] = val.close()
        if in_train:
            train = self.writer("train.min")
            for b in files["train"].iter_blocks():
                train.add(b.take([i for i, k in enumerate(b.keys) if k != key]))
            files["train"] = train.close()
        return files


class _Router:
    """Where each row of the main dataset split goes: dropped as a duplicate, as a copy of a held-out split's
    row or as already cached (an append), else to validation (by key) or train; with the counts."""

    def __init__(self, store: KeyStore, fraction: float | None, held: tuple[str, ...], cached: bool):
        self.store, self.fraction, self.held, self.check_cache = store, fraction, held, cached
        self.rows = self.duplicates = self.held_out = self.cached = self.train_candidates = 0
        self.smallest: tuple[str, Rows, bool] | None = None  # the kept row with the smallest key, whether in train

    def __call__(self, b: Rows) -> tuple[list[int], list[int]]:
        to_train, to_val = [], []
        self.rows += len(b)
        for i, k in enumerate(b.keys):
            if not self.store.add(k, "main"):
                self.duplicates += 1
                continue
            is_val = self.fraction is not None and is_validation(k, self.fraction)
            if not is_val and self.held and self.store.has(k, self.held):
                self.held_out += 1
                continue
            self.train_candidates += not is_val
            if self.check_cache and self.store.has(k, ("cache",)):
                self.cached += 1
                continue
            (to_val if is_val else to_train).append(i)
            if self.smallest is None or k < self.smallest[0]:
                self.smallest = (k, b.take([i]), not is_val)
        return to_train, to_val
