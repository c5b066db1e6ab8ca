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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from ..models import LabelSet
from .documents import RowConvention, load_documents, token_documents
from .labels import classification_rows


@dataclass
class Rows:
    """Token rows of one split. Positions >= lengths[i] are padding."""

    input_ids: np.ndarray  # (N, L) int32
    lengths: np.ndarray  # (N,) int32
    keys: list[str]  # (N,) 32 hex chars
    loss_mask: np.ndarray | None = None  # (N, L) uint8: 1 where the prediction of token t+1 trains
    position_ids: np.ndarray | None = None  # (N, L) int32: restart at 0 per document (document_mask)
    labels: np.ndarray | None = None  # classification: (N,) class ids, or (N, L) per token with IGNORE_INDEX elsewhere

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def take(self, idx: np.ndarray) -> "Rows":
        return Rows(self.input_ids[idx], self.lengths[idx], [self.keys[i] for i in idx],
                    None if self.loss_mask is None else self.loss_mask[idx],
                    None if self.position_ids is None else self.position_ids[idx],
                    None if self.labels is None else self.labels[idx])


@dataclass
class Prepared:
    splits: dict[str, Rows]
    info: dict = field(default_factory=dict)  # dataset identity and preparation statistics
    convention: dict = field(default_factory=dict)  # RowConvention.to_dict(): what position 0 is, the template


def content_key(ids: np.ndarray) -> str:
    """blake2b-128 hex digest of the real token ids as little-endian int32."""
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype="<i4").tobytes(), digest_size=16).hexdigest()


def is_validation(key: str, fraction: float) -> bool:
    return int(key[:8], 16) < fraction * 16**8


def tokenizer_pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


@dataclass
class _RowBuilder:
    """Collects rows: token ids, lengths and, as configured, prediction masks and position ids."""

    seq_len: int
    pad: int
    with_mask: bool
    with_positions: bool
    ids: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    positions: list = field(default_factory=list)

    def add(self, toks: list[int], flags: list[int], starts: list[bool], next_flag: int) -> None:
        """One row of n <= seq_len tokens; flags[t] = token t trains, starts[t] = a document starts at t."""
        L, n = self.seq_len, len(toks)
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
            pos = np.empty(L, dtype=np.int32)
            p = 0
            for t in range(n):
                p = 0 if (t == 0 or starts[t]) else p + 1
                pos[t] = p
            pos[n:] = np.arange(L - n)  # the padding is a segment of its own
            self.positions.append(pos)

    def arrays(self) -> dict:
        return {"input_ids": np.stack(self.ids), "lengths": np.asarray(self.lengths, dtype=np.int32),
                "loss_mask": np.stack(self.masks) if self.with_mask else None,
                "position_ids": np.stack(self.positions) if self.with_positions else None}


def tokenize_rows(ds, tokenizer, cfg: DataConfig, conv: RowConvention | None = None) -> tuple[dict, dict]:
    """All rows, in order: ({input_ids (N, L) int32, lengths (N,), loss_mask, position_ids}, stats)."""
    conv = conv or RowConvention.resolve(cfg, tokenizer)
    L = cfg.seq_len
    eos = tokenizer.eos_token_id
    if cfg.packing and cfg.format == "text" and eos is None:
        raise DataError("packing joins documents with EOS, but the tokenizer has no eos_token_id")
    bos = conv.bos_token_id
    if bos is not None and L < 2:
        raise DataError("rows begin with BOS: data.seq_len must be at least 2")
    out = _RowBuilder(L, tokenizer_pad_id(tokenizer), cfg.loss_mask == "assistant", cfg.document_mask)
    budget = cfg.max_tokens if cfg.max_tokens is not None else float("inf")
    stats = {"documents": 0, "documents_truncated": 0, "tokens_read": 0, "rows_bos_inserted": 0}
    toks: list[int] = []  # the packing stream: tokens, their trained flags, document starts
    flags: list[int] = []
    starts: list[bool] = []

    def cut(final: bool) -> None:
        """Emit full rows from the stream, keeping one token of look-ahead (the last position's mask);
        once the stream has ended, also the rest as one last, padded row."""
        while toks:
            insert = bos is not None and not starts[0]  # a row that starts mid-document gets BOS first
            take = L - insert
            if len(toks) <= take and not final:
                return
            nxt = flags[take] if len(toks) > take else 0
            out.add([bos] * insert + toks[:take], [0] * insert + flags[:take], [True] * insert + starts[:take], nxt)
            stats["rows_bos_inserted"] += int(insert)
            del toks[:take], flags[:take], starts[:take]

    for ids, doc_flags in token_documents(ds, tokenizer, cfg, conv):
        if stats["tokens_read"] >= budget:
            break
        if not ids:
            continue
        stats["documents"] += 1
        doc_flags = doc_flags if doc_flags is not None else [1] * len(ids)
        if cfg.packing:
            take = int(min(len(ids), budget - stats["tokens_read"]))
            toks.extend(ids[:take])
            flags.extend(doc_flags[:take])
            starts.extend([True] + [False] * (take - 1))
            stats["tokens_read"] += take
            cut(final=False)
        else:
            nxt = doc_flags[L] if len(ids) > L else 0
            if len(ids) > L:
                stats["documents_truncated"] += 1
                ids, doc_flags = ids[:L], doc_flags[:L]
            take = int(min(len(ids), budget - stats["tokens_read"]))
            if take < len(ids):
                nxt = doc_flags[take]
            stats["tokens_read"] += take
            out.add(ids[:take], doc_flags[:take], [True] + [False] * (take - 1), nxt)
    if cfg.packing:
        cut(final=True)
    if not out.ids:
        raise DataError("the dataset produced no tokens (every document empty?)")
    arrays = out.arrays()
    if arrays["loss_mask"] is not None:
        stats["trained_positions"] = int(arrays["loss_mask"].sum())
        if stats["trained_positions"] == 0:
            raise DataError("data.loss_mask = 'assistant' left no position to train on (no assistant tokens?)")
    return arrays, stats


def _dedup(keys: list[str]) -> list[int]:
    seen: set[str] = set()
    keep = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return keep


def prepare(cfg: DataConfig, tokenizer, min_validation: bool = True, task: str = "causal-lm",
            labels: LabelSet | None = None, pad_id: int | None = None) -> Prepared:
    """Load, tokenize, key, deduplicate and split. Deterministic for the same inputs. `min_validation`:
    a corpus whose keys put no row in validation still gives it one (not for an append: there the
    split must follow the keys alone, as in the cache it grows). Classification tasks (`labels`: the
    teacher's classes, `pad_id`: what the rows are padded with) keep one example per row with its labels.
    Splits named in data.splits come from the dataset's own splits; a train row equal to one of theirs
    is dropped from train."""
    classify = task != "causal-lm"
    if classify:
        conv = {"rows": {"one_example_per_row": True, "special_tokens": "tokenizer", "truncation": True,
                         "pad_token_id": pad_id}}
    else:
        conv = RowConvention.resolve(cfg, tokenizer)  # before the dataset: a bad setting fails at once

    def rows_of(split: str | None, where: str):
        ds, info = load_documents(cfg, split, task)
        if classify:
            arrays, stats = classification_rows(ds, tokenizer, cfg, task, labels, pad_id, where)
        else:
            arrays, stats = tokenize_rows(ds, tokenizer, cfg, conv)
        keys = [content_key(r[:n]) for r, n in zip(arrays["input_ids"], arrays["lengths"])]
        every = Rows(arrays["input_ids"], arrays["lengths"], keys, arrays["loss_mask"], arrays["position_ids"],
                     arrays.get("labels"))
        keep = _dedup(keys)
        stats["rows"] = len(keys)
        stats["duplicate_rows_dropped"] = len(keys) - len(keep)
        return every, keep, info, stats

    every, keep, info, stats = rows_of(None, f"dataset split {cfg.split!r}")
    keys = every.keys
    by_fraction = "validation" not in cfg.splits
    val = [i for i in keep if is_validation(keys[i], cfg.validation_fraction)] if by_fraction else []
    if by_fraction and min_validation and cfg.validation_fraction > 0 and not val and len(keep) > 1:
        val = [min(keep, key=lambda i: keys[i])]  # a tiny corpus still gets one validation row
    val_set = set(val)
    train = [i for i in keep if i not in val_set]
    splits = {"train": every.take(np.asarray(train, dtype=np.int64))}
    if val:
        splits["validation"] = every.take(np.asarray(val))
    info["statistics"] = stats
    if cfg.splits:
        info["splits"] = {}
        for name in ("validation", "test"):
            if name not in cfg.splits:
                continue
            rows, kept, sinfo, sstats = rows_of(cfg.splits[name], f"dataset split {cfg.splits[name]!r}")
            splits[name] = rows.take(np.asarray(kept, dtype=np.int64))
            info["splits"][name] = {"split": cfg.splits[name], "documents_available": sinfo["documents_available"],
                                    "datasets_fingerprint": sinfo["datasets_fingerprint"],
                                    "data_files": sinfo["data_files"], "statistics": sstats}
        held_out = {k for name in ("validation", "test") if name in cfg.splits for k in splits[name].keys}
        t = splits["train"]
        clean = np.asarray([i for i, k in enumerate(t.keys) if k not in held_out], dtype=np.int64)
        stats["train_rows_in_held_out_splits_dropped"] = len(t) - len(clean)
        splits["train"] = t.take(clean)
    if not len(splits["train"]):
        if stats.get("train_rows_in_held_out_splits_dropped"):
            raise DataError(f"every train row is also in a held-out split ({', '.join(cfg.splits.values())}): do "
                            "data_files name each split's own files?")
        raise DataError("no training rows left after the validation split; add data or lower validation_fraction")
    return Prepared(splits=splits, info=info, convention=conv if classify else conv.to_dict())
