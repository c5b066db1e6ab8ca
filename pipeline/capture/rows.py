"""Step 1b, rows: documents -> fixed-length token rows with content keys and a split (`prepare`).

Rows are `seq_len` tokens: documents joined and cut (packing), or one document per row, truncated
and right-padded. When the teacher's tokenizer adds BOS, every packed row starts with it, even one
that starts mid-document (the BOS is inserted, the row then holds seq_len - 1 stream tokens).

Optional per-position columns travel with the rows: `loss_mask` (position t trains iff the token
it predicts, t + 1, is an assistant/response token; the last position of a row looks at the
stream's next token) and `position_ids` (document_mask: positions restart at 0 at each document,
and the padding of a row is a segment of its own, so attention is block-diagonal causal).

Each row's key is blake2b-128 of its real tokens (int32 little-endian), so students can join,
subset and reorder rows; identical rows are dropped (keys are unique). The validation split is
chosen by key, so it does not depend on row order and a subset of a corpus keeps its rows' assignment.

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

from ..config import DataConfig
from ..errors import DataError
from ..models import LabelSet
from .arrival import Runs
from .documents import DOC_BATCH, RowConvention, check_generation, load_documents, token_documents
from .labels import classification_blocks
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


def tokenizer_pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


@dataclass
class _RowBuilder:
    """Collects rows (token ids, lengths and, as configured, prediction masks and position ids) until taken."""

    seq_len: int
    pad: int
    with_mask: bool
    with_positions: bool
    ids: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    positions: list = field(default_factory=list)
    salts: list = field(default_factory=list)

    def add(self, toks: np.ndarray, flags: np.ndarray, starts: np.ndarray, next_flag: int,
            salt: bytes | None = None) -> None:
        """One row of n <= seq_len tokens; flags[t] = token t trains, starts[t] = a document starts at t; `salt`:
        what data.key_columns add to its key."""
        L, n = self.seq_len, len(toks)
        self.salts.append(salt)
        row = np.full(L, self.pad, dtype=np.int32)
        row[:n] = toks
        self.ids.append(row)
        self.lengths.append(n)
        if self.with_mask:  # position t trains iff the token it predicts (t + 1) does
            m = np.zeros(L, dtype=np.uint8)
            m[: n - 1] = flags[1:n]
            m[n - 1] = next_flag
            self.masks.append(m)
        if self.with_positions:
            t = np.arange(n)
            first = np.maximum.accumulate(np.where(starts[:n] | (t == 0), t, 0))
            pos = np.empty(L, dtype=np.int32)
            pos[:n] = t - first
            pos[n:] = np.arange(L - n)  # the padding is a segment of its own
            self.positions.append(pos)

    def take(self) -> dict | None:
        """The rows collected so far (None: none), and a fresh start."""
        if not self.ids:
            return None
        out = {"input_ids": np.stack(self.ids), "lengths": np.asarray(self.lengths, dtype=np.int32),
               "loss_mask": np.stack(self.masks) if self.with_mask else None,
               "position_ids": np.stack(self.positions) if self.with_positions else None,
               "salts": self.salts if any(s is not None for s in self.salts) else None}
        self.ids, self.lengths, self.masks, self.positions, self.salts = [], [], [], [], []
        return out


class _Stream:
    """The packing stream: tokens, their trained flags and document starts, as numpy buffers."""

    def __init__(self):
        self.ids = np.zeros(0, np.int32)
        self.flags = np.zeros(0, np.uint8)
        self.starts = np.zeros(0, bool)

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, ids: np.ndarray, flags: np.ndarray) -> None:
        starts = np.zeros(len(ids), bool)
        starts[0] = True
        self.ids = np.concatenate([self.ids, ids])
        self.flags = np.concatenate([self.flags, flags])
        self.starts = np.concatenate([self.starts, starts])

    def pop(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.ids[:n], self.flags[:n], self.starts[:n]
        self.ids, self.flags, self.starts = self.ids[n:], self.flags[n:], self.starts[n:]
        return out


def row_blocks(ds, tokenizer, cfg: DataConfig, conv: RowConvention, stats: dict, timing: dict | None = None):
    """The rows of a dataset split in order, a block (the rows of up to DOC_BATCH documents) at a time:
    {input_ids (n, L) int32, lengths (n,), loss_mask, position_ids}. `stats` is filled as they go (what the
    manifest records); `timing` receives this rank's tokenising seconds (see `token_documents`)."""
    L = cfg.seq_len
    eos = tokenizer.eos_token_id
    if cfg.packing and cfg.format == "text" and eos is None:
        raise DataError("packing joins documents with EOS, but the tokenizer has no eos_token_id")
    bos = conv.bos_token_id
    if bos is not None and L < 2:
        raise DataError("rows begin with BOS: data.seq_len must be at least 2")
    out = _RowBuilder(L, tokenizer_pad_id(tokenizer), cfg.loss_mask == "assistant", cfg.document_mask)
    budget = cfg.max_tokens if cfg.max_tokens is not None else float("inf")
    stats.update({"documents": 0, "documents_truncated": 0, "tokens_read": 0, "rows_bos_inserted": 0})
    if out.with_mask:
        stats["trained_positions"] = 0
    stream = _Stream()
    one = np.ones(1, np.uint8)

    def cut(final: bool) -> None:
        """Emit full rows from the stream, keeping one token of look-ahead (the last position's mask);
        once the stream has ended, also the rest as one last, padded row."""
        while len(stream):
            insert = bos is not None and not stream.starts[0]  # a row that starts mid-document gets BOS first
            take = L - insert
            if len(stream) <= take and not final:
                return
            nxt = int(stream.flags[take]) if len(stream) > take else 0
            toks, flags, starts = stream.pop(take)
            if insert:
                toks, flags, starts = (np.concatenate([[bos], toks]).astype(np.int32), np.concatenate([[0], flags]),
                                       np.concatenate([[True], starts]))
            out.add(toks, flags, starts, nxt)
            stats["rows_bos_inserted"] += int(insert)

    def block() -> dict | None:
        b = out.take()
        if b is not None and b["loss_mask"] is not None:
            stats["trained_positions"] += int(b["loss_mask"].sum())
        return b

    for ids, doc_flags, salt in token_documents(ds, tokenizer, cfg, conv, timing):
        if stats["tokens_read"] >= budget:
            break
        if not len(ids):
            continue
        stats["documents"] += 1
        doc_flags = doc_flags if doc_flags is not None else np.broadcast_to(one, len(ids))
        if cfg.packing:
            take = int(min(len(ids), budget - stats["tokens_read"]))
            stream.extend(ids[:take], doc_flags[:take])
            stats["tokens_read"] += take
            cut(final=False)
        else:
            nxt = int(doc_flags[L]) if len(ids) > L else 0
            if len(ids) > L:
                stats["documents_truncated"] += 1
                ids, doc_flags = ids[:L], doc_flags[:L]
            take = int(min(len(ids), budget - stats["tokens_read"]))
            if take < len(ids) and cfg.format == "tokens":
                stats["documents"] -= 1
                break  # rows given as tokens are never cut: data.max_tokens stops before the row that passes it
            if take < len(ids):
                nxt = int(doc_flags[take])
            stats["tokens_read"] += take
            starts = np.zeros(take, bool)
            starts[:1] = True
            out.add(ids[:take], doc_flags[:take], starts, nxt, salt)
        if len(out.ids) >= DOC_BATCH:
            yield block()
    if cfg.packing:
        cut(final=True)
    last = block()
    if last is not None:
        yield last
    if not stats["documents"] or not stats["tokens_read"]:
        raise DataError("the dataset produced no tokens (every document empty?)")
    if out.with_mask and stats["trained_positions"] == 0:
        raise DataError("data.loss_mask = 'assistant' left no position to train on (no assistant tokens?)")


def tokenize_rows(ds, tokenizer, cfg: DataConfig, conv: RowConvention | None = None) -> tuple[dict, dict]:
    """All rows of a (small) dataset in memory, in order: ({input_ids (N, L) int32, lengths (N,), loss_mask,
    position_ids}, stats). `prepare` streams them to disk instead."""
    stats: dict = {}
    blocks = list(row_blocks(ds, tokenizer, cfg, conv or RowConvention.resolve(cfg, tokenizer), stats))
    arrays = {k: None if blocks[0][k] is None else np.concatenate([b[k] for b in blocks]) for k in blocks[0]
              if k != "salts"}
    return arrays, stats


def prepare(cfg: DataConfig, tokenizer, min_validation: bool = True, task: str = "causal-lm",
            labels: LabelSet | None = None, pad_id: int | None = None, shard_rows: int = 64,
            cached_keys=None, scratch: Path | None = None) -> Prepared:
    """Load, tokenize, key, deduplicate and split, streamed: rows go to one Parquet file per split in a scratch
    folder (`scratch`, default a temporary folder in $TMPDIR) in row groups of whole shards (`shard_rows`), keys
    to an on-disk set. Deterministic for the same inputs; under torchrun every rank makes the same files, each
    tokenising 1/W of the documents. `min_validation`: a corpus whose keys put no row in validation still gives
    it one (not for an append: there the split must follow the keys alone, as in the cache it grows).
    `cached_keys` (an append): blocks of the keys the cache holds; those rows are left out (`already_cached`).
    Classification tasks (`labels`: the teacher's classes, `pad_id`: what the rows are padded with) keep one
    example per row with its labels. Splits named in data.splits come from the dataset's own splits; a train row
    equal to one of theirs is dropped from train."""
    classify = task != "causal-lm"
    if classify:
        conv = {"rows": {"one_example_per_row": True, "special_tokens": "tokenizer", "truncation": True,
                         "pad_token_id": pad_id}}
    else:
        conv = RowConvention.resolve(cfg, tokenizer)  # before the dataset: a bad setting fails at once
    tmp = None
    if scratch is None:
        tmp = tempfile.TemporaryDirectory(prefix="distill-rows-")
        scratch = Path(tmp.name)
    scratch.mkdir(parents=True, exist_ok=True)
    store = KeyStore(scratch / "keys.sqlite")
    try:
        run = _Preparation(cfg, tokenizer, conv, task, labels, pad_id, shard_rows, scratch, store)
        cached = store.load(cached_keys, "cache") if cached_keys is not None else 0
        splits, info = run.splits(min_validation, cached=cached > 0)
    except BaseException:
        store.close()
        if tmp is not None:
            tmp.cleanup()
        raise
    store.close()
    return Prepared(splits=splits, info=info, convention=conv if classify else conv.to_dict(),
                    already_cached=run.cached, timing=run.timing, scratch=tmp, label_runs=run.label_runs.summary())


class _Preparation:
    """One preparation's streams: each dataset split's blocks of rows, keyed, deduplicated and routed to the
    cache splits' row files."""

    def __init__(self, cfg: DataConfig, tokenizer, conv, task: str, labels, pad_id, shard_rows: int, scratch: Path,
                 store: KeyStore):
        self.cfg, self.tokenizer, self.conv, self.task = cfg, tokenizer, conv, task
        self.labels, self.pad_id, self.shard_rows = labels, pad_id, shard_rows
        self.scratch, self.store = scratch, store
        self.cached = 0
        self.timing: dict = {}  # this rank's own tokenising (not recorded in the cache: it varies)
        self.label_runs = Runs()

    def blocks(self, split: str | None, where: str, stats: dict):
        """(info, the split's rows as keyed `Rows` blocks)."""
        ds, info = load_documents(self.cfg, split, self.task)
        check_generation(info.get("generation"), self.tokenizer)  # before any row is made
        if self.task != "causal-lm":
            raw = classification_blocks(ds, self.tokenizer, self.cfg, self.task, self.labels, self.pad_id, where,
                                        stats)
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
