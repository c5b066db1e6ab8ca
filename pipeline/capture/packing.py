"""Step 1b, packing: documents -> fixed-length token rows (`row_blocks`).

Rows are `seq_len` tokens: documents joined and cut (packing), or one document per row, truncated
and right-padded. When the teacher's tokenizer adds BOS, every packed row starts with it, even one
that starts mid-document (the BOS is inserted, the row then holds seq_len - 1 stream tokens).

Optional per-position columns travel with the rows: `loss_mask` (position t trains iff the token
it predicts, t + 1, is an assistant/response token; the last position of a row looks at the
stream's next token) and `position_ids` (document_mask: positions restart at 0 at each document,
and the padding of a row is a segment of its own, so attention is block-diagonal causal).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .documents import DOC_BATCH, RowConvention, token_documents


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
