"""A cache split re-tokenised once for a student with another tokenizer (`crosstok.Retokenizer`) and kept beside the
student's output, keyed by the cache, the split and both tokenizers; the teacher's characters per cached token
(for NLL per character); and `prepare_student`, which gives a cross-tokenizer student its vocabulary map and the
rows of every split it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import StudentError
from ..format.layout import row_column, row_values
from .crosstok import (Retokenizer, align, documents, follow, plain_tokenizer, require_offsets, runs, teacher_run,
                       tokenizer_digest)
from .vocab_map import VocabMap

FORMAT = 2  # of the stored re-tokenisation: bump when what `retokenize_split` computes changes


@dataclass
class StudentRows:
    """A cache split as a student with another tokenizer reads it: padded (N, L_s) arrays."""

    input_ids: np.ndarray  # (N, L_s) int64, padded with the student's pad id
    length: np.ndarray  # (N,)
    align: np.ndarray  # (N, L_s) teacher position or -1
    chars: np.ndarray  # (N, L_s) characters per student token
    teacher_chars: np.ndarray  # (N, L_t) characters per teacher token
    loss_mask: np.ndarray | None  # (N, L_s) bool
    position_ids: np.ndarray | None  # (N, L_s)
    lossless: np.ndarray  # (N,) bool

    def stats(self) -> dict:
        real = np.arange(self.input_ids.shape[1])[None] < self.length[:, None]
        return {"rows": int(len(self.length)), "student_tokens": int(self.length.sum()),
                "aligned_share": float((self.align >= 0)[real].mean()) if real.any() else 0.0,
                "lossless_rows": float(self.lossless.mean()) if len(self.lossless) else 1.0}

    def batch(self, rows: torch.Tensor) -> dict:
        """The student's side of a batch of cache rows (its `row` indices), cut to its longest row."""
        r = rows.numpy()
        n = int(self.length[r].max())
        out = {"input_ids": torch.from_numpy(self.input_ids[r, :n]), "length": torch.from_numpy(self.length[r]),
               "align": torch.from_numpy(self.align[r, :n]), "chars": torch.from_numpy(self.chars[r, :n])}
        if self.loss_mask is not None:
            out["loss_mask"] = torch.from_numpy(self.loss_mask[r, :n])
        if self.position_ids is not None:
            out["position_ids"] = torch.from_numpy(self.position_ids[r, :n])
        return out

    def save(self, path: Path) -> None:
        import tempfile

        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")  # each rank its own, renamed in
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: v for k, v in self.__dict__.items() if v is not None})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "StudentRows":
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: (z[k] if k in z.files else None) for k in cls.__dataclass_fields__})


def retokenize_split(retok: Retokenizer, input_ids: np.ndarray, lengths: np.ndarray, pad_id: int,
                     loss_mask: np.ndarray | None = None, position_ids: np.ndarray | None = None) -> StudentRows:
    """Every row of a split (cached ids (N, L_t), lengths (N,)) for the student."""
    rows = [retok.row(ids[:n].tolist()) for ids, n in zip(input_ids, lengths)]
    N, L_t = input_ids.shape
    L_s = max((len(r.student_ids) for r in rows), default=0)
    ids = np.full((N, L_s), pad_id, dtype=np.int64)
    al = np.full((N, L_s), -1, dtype=np.int64)
    chars = np.zeros((N, L_s), dtype=np.int32)
    t_chars = np.zeros((N, L_t), dtype=np.int32)
    lm = None if loss_mask is None else np.zeros((N, L_s), dtype=bool)
    pos = None if position_ids is None else np.zeros((N, L_s), dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r.student_ids)
        ids[i, :n], chars[i, :n] = r.student_ids, r.student_chars
        al[i, :n] = align(r.teacher_ends, r.student_ends)
        t_chars[i, : len(r.teacher_chars)] = r.teacher_chars
        if lm is not None:
            lm[i, :n] = follow(r.teacher_last, r.student_last, loss_mask[i, : len(r.teacher_last)], "mask")
        if pos is not None:
            doc = follow(r.teacher_last, r.student_last, documents(position_ids[i, : len(r.teacher_last)]),
                         "document")
            starts = np.r_[True, doc[1:] != doc[:-1]] if n else np.zeros(0, dtype=bool)
            idx = np.arange(n)
            pos[i, :n] = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    return StudentRows(ids, np.asarray([len(r.student_ids) for r in rows], dtype=np.int64), al, chars, t_chars,
                       lm, pos, np.asarray([r.lossless for r in rows], dtype=bool))


def teacher_chars(tok, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(N, L) characters per cached token (the teacher's side of `Retokenizer.row`; 0 for special tokens), for NLL
    per character."""
    require_offsets(tok, "the cache's tokenizer")
    t, specials = plain_tokenizer(tok), set(tok.all_special_ids)
    out = np.zeros(input_ids.shape, dtype=np.int32)
    for r, (ids, n) in enumerate(zip(input_ids, lengths)):
        ids = ids[:n].tolist()
        for i, j, special in runs(ids, specials):
            if not special:
                out[r, i:j] = np.diff(teacher_run(t, ids[i:j])[1], prepend=0)
    return out


def stored_rows(cache, split: str, student_tok, folder: Path, name: str, teacher_tok=None) -> StudentRows:
    """A split re-tokenised for `student_tok`, computed once and kept in `folder` under a name that holds the
    cache's digest and both tokenizers' digests (a changed cache or tokenizer gets a new file)."""
    teacher_tok = teacher_tok or cache.tokenizer()
    key = hashlib.sha256(json.dumps([FORMAT, cache.manifest.digest, split, tokenizer_digest(teacher_tok),
                                     tokenizer_digest(student_tok)]).encode()).hexdigest()[:24]
    path = folder / f"retokenized-{split}-{key}.npz"
    if path.exists():
        return StudentRows.load(path)
    table = cache.rows(split)
    fields = cache.manifest.fields
    pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else student_tok.eos_token_id
    rows = retokenize_split(Retokenizer(teacher_tok, student_tok, name), row_column(table, "input_ids", np.int64),
                            table.column("length").to_numpy().astype(np.int64), pad if pad is not None else 0,
                            row_values(table, "loss_mask", np.bool_) if "loss_mask" in fields else None,
                            row_values(table, "position_ids", np.int64) if "position_ids" in fields else None)
    folder.mkdir(parents=True, exist_ok=True)
    rows.save(path)
    return rows


def prepare_student(name: str, tokenizer, model, folder: Path, sources: dict, cache_tokenizer, vocab_size: int
                    ) -> tuple[VocabMap, dict, dict]:
    """A student with another tokenizer: (the teacher's vocabulary mapped into its own, every split of every
    source re-tokenised for it ({(source, split): StudentRows}, computed once and kept in `folder`), its train split's
    alignment statistics). `cache_tokenizer` is the first source's cache's tokenizer."""
    require_offsets(tokenizer, f"student {name!r}'s tokenizer")
    vocab_map = VocabMap.build(cache_tokenizer, tokenizer, vocab_size)
    first = next(iter(sources.values()))[0]
    rows, longest = {}, 0
    for source, (c, _) in sources.items():
        for split in c.splits:
            rows[(source, split)] = stored_rows(c, split, tokenizer, folder, name,
                                              cache_tokenizer if c is first else None)
            longest = max(longest, rows[(source, split)].input_ids.shape[1])
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and longest > limit:
        raise StudentError(f"student {name!r}: its tokenizer writes the cache's rows in up to {longest} "
                           f"tokens, more than its {limit} positions")
    train = rows.get((next(iter(sources)), "train"))
    return vocab_map, rows, train.stats() if train is not None else {}
