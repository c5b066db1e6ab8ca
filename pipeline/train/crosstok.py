"""Cross-tokenizer students: a cache's rows re-tokenised for another tokenizer, positions aligned by text.

The text of a cache row is recovered from its own tokens with the cache's tokenizer, then encoded
by the student's tokenizer. Both sides get, for every position, the character offset where the
text it has read ends (its "boundary"); a student position and a teacher position whose
boundaries are equal predict what follows the same text, and are *aligned*. Only they carry
teacher terms; every student position still trains with CE on its own next token.

Rows are cut into runs of ordinary tokens and single special tokens:
- A run is decoded alone (the cache tokenizer's Rust decoder, no clean-up of spaces). Its teacher
  boundaries come from encoding that text again with offsets: when the encoding gives back the
  cached ids (a *lossless* run; 95-100% of rows on the default cache, docs/cross-tokenizer.md), its offsets are the
  boundaries. Otherwise (a row that starts inside a character or a word the tokenizer would have
  merged otherwise, a normalizer that changed the text), each boundary is the length of the
  decoded prefix of the run, ids[:i + 1]: exact for any tokenizer, O(L^2), used only there.
- A boundary inside a character (a byte-level token holding part of a UTF-8 sequence: the next
  token starts before this one ends, or a decoded prefix ends in U+FFFD) is no boundary: that
  position is never aligned. So is a boundary two positions of one side share.
- A special token maps to the student's token of the same role (eos, bos, pad, unk, ...) or of the
  same text; it then counts as one unit of text on both sides, so the positions at and after it
  align. A special token the student has no counterpart for is dropped from the student's row, and
  the teacher position before it (which predicted it) is not aligned.
- The student's text is the run's decoded text, less the U+FFFD a decode makes of a character cut
  at the run's start or end (a row that starts inside a character): those bytes are no text.
- Text that spells a special token ("</s>" in a string literal) is text on both sides, never that
  special token.

Per-position settings follow the text: a student position takes the loss mask of the teacher
position whose boundary is the last at or before its own, and the document of the teacher token
holding its last character (so that document masking keeps documents apart on both sides).

`VocabMap` maps the teacher's vocabulary to the student's through the tokens' text, for the
vocabulary-mapped KL (`kd_mapped`) and the cross-tokenizer agreement metric.
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

REPLACEMENT = "\ufffd"
SPECIAL_ROLES = ("eos_token", "bos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")
FORMAT = 2  # of the stored re-tokenisation: bump when what `retokenize_split` computes changes


def _plain(tok):
    """The Rust tokenizer behind a fast transformers tokenizer, without its post-processor (which adds special
    tokens and, in some, trims offsets)."""
    from tokenizers import Tokenizer

    t = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    t.post_processor = None
    t.encode_special_tokens = True  # text that spells a special token ("</s>" in a string) is text, not that token
    return t


def require_offsets(tok, what: str):
    """Refuse a tokenizer that cannot give character offsets (a slow, pure-Python one)."""
    if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
        raise StudentError(f"{what}: {type(tok).__name__} is a slow tokenizer without character offsets; "
                           "cross-tokenizer distillation aligns positions by offsets and needs a fast tokenizer "
                           "(a tokenizer.json; AutoTokenizer.from_pretrained(..., use_fast=True) converts most)")


def tokenizer_digest(tok) -> str:
    """sha256 of everything that decides how a fast tokenizer cuts text (its whole tokenizer.json)."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()


def special_map(teacher_tok, student_tok) -> dict[int, int | None]:
    """Teacher special id -> the student's id of the same role, else of the same text, else None (dropped)."""
    out: dict[int, int | None] = {}
    s_vocab = student_tok.get_vocab()
    roles = {}
    for role in SPECIAL_ROLES:  # a token with two roles (pad = eos) keeps the first listed
        t_id = getattr(teacher_tok, role + "_id", None)
        s_id = getattr(student_tok, role + "_id", None)
        if t_id is not None and s_id is not None and t_id not in roles:
            roles[t_id] = s_id
    for t_id in teacher_tok.all_special_ids:
        text = teacher_tok.convert_ids_to_tokens(t_id)
        out[t_id] = roles.get(t_id, s_vocab.get(text))
    return out


def _boundaries_from_offsets(offsets: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(ends, valid) of tokens with character offsets: a token whose successor starts before it ends holds part
    of a character (byte-level pieces of one UTF-8 sequence all carry that character's span)."""
    ends = np.asarray([e for _, e in offsets], dtype=np.int64)
    starts = np.asarray([s for s, _ in offsets], dtype=np.int64)
    valid = np.ones(len(ends), dtype=bool)
    if len(ends) > 1:
        valid[:-1] = starts[1:] >= ends[:-1]
    return np.maximum.accumulate(ends) if len(ends) else ends, valid


def _boundaries_from_prefixes(t, ids: list[int], text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ends, valid) by decoding every prefix: exact for any tokenizer whose runs do not encode back losslessly."""
    prefixes = t.decode_batch([ids[: i + 1] for i in range(len(ids))], skip_special_tokens=False)
    ends = np.asarray([len(p) for p in prefixes], dtype=np.int64)
    valid = np.asarray([text.startswith(p) and not p.endswith(REPLACEMENT) for p in prefixes], dtype=bool)
    return np.minimum(np.maximum.accumulate(ends), len(text)), valid


@dataclass
class Row:
    """One cache row on both sides: boundaries (character offsets into the row's text, special tokens one
    unit each; -1: no boundary), characters per token, and the student's ids."""

    student_ids: np.ndarray  # (L_s,) int64
    student_ends: np.ndarray  # (L_s,) int64, -1 where the position ends inside a character
    student_chars: np.ndarray  # (L_s,) characters of text each student token holds (0 for special tokens)
    teacher_ends: np.ndarray  # (L_t,)
    teacher_chars: np.ndarray  # (L_t,)
    teacher_last: np.ndarray  # (L_t,) the boundary of each teacher position, -1 ones included (monotone)
    student_last: np.ndarray  # (L_s,) likewise for the student
    lossless: bool  # every run of the row encoded back to the cached ids


class Retokenizer:
    """Cache rows -> student rows and their alignment (see the module docstring)."""

    def __init__(self, teacher_tok, student_tok, name: str = "student"):
        require_offsets(teacher_tok, "the cache's tokenizer")
        require_offsets(student_tok, f"student {name!r}'s tokenizer")
        self.t, self.s = _plain(teacher_tok), _plain(student_tok)
        self.specials = special_map(teacher_tok, student_tok)

    def row(self, ids: list[int]) -> Row:
        s_ids, s_ends, s_chars, s_last = [], [], [], []
        t_ends, t_chars, t_last = [], [], []
        base, lossless = 0, True
        for i, j, special in runs(ids, self.specials):
            if special:
                s_id = self.specials[ids[i]]
                if s_id is not None:
                    base += 1
                    s_ids.append(s_id), s_ends.append(base), s_chars.append(0), s_last.append(base)
                elif t_ends:  # the teacher position before a dropped special predicted it: no student partner
                    t_ends[-1] = -1
                t_ends.append(base if s_id is not None else -1), t_chars.append(0), t_last.append(base)
                continue
            text, ends, valid, exact = teacher_run(self.t, ids[i:j])
            lossless &= exact
            t_ends += np.where(valid, ends + base, -1).tolist()
            t_chars += np.diff(ends, prepend=0).tolist()
            t_last += (ends + base).tolist()
            # the U+FFFD a decode makes of the bytes of a character cut at the run's edges are not text: the student
            # does not read them (the teacher positions inside them are no boundaries anyway)
            lead = 0 if exact else len(text) - len(text.lstrip(REPLACEMENT))
            trail = 0 if exact else len(text[lead:]) - len(text[lead:].rstrip(REPLACEMENT))
            enc_s = self.s.encode(text[lead: len(text) - trail], add_special_tokens=False)
            ends_s, valid_s = _boundaries_from_offsets(enc_s.offsets)
            ends_s = ends_s + lead
            s_ids += enc_s.ids
            s_ends += np.where(valid_s, ends_s + base, -1).tolist()
            s_chars += np.diff(ends_s, prepend=lead).tolist()
            s_last += (ends_s + base).tolist()
            base += len(text)
        a = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
        return Row(a(s_ids), a(s_ends), a(s_chars), a(t_ends), a(t_chars), a(t_last), a(s_last), lossless)


def runs(ids: list[int], specials) -> list[tuple[int, int, bool]]:
    """A row cut into (start, end, is_special): runs of ordinary tokens and single special tokens."""
    out, i = [], 0
    while i < len(ids):
        j = i + 1
        if ids[i] not in specials:
            while j < len(ids) and ids[j] not in specials:
                j += 1
        out.append((i, j, ids[i] in specials))
        i = j
    return out


def teacher_run(t, run: list[int]) -> tuple[str, np.ndarray, np.ndarray, bool]:
    """A run of ordinary cached tokens: its text, each token's boundary in it and whether that is one, and whether
    the text encodes back to the run (lossless: the offsets are the boundaries; else decoded prefixes are)."""
    text = t.decode(run, skip_special_tokens=False)
    enc = t.encode(text, add_special_tokens=False)
    if enc.ids == run:
        return text, *_boundaries_from_offsets(enc.offsets), True
    return text, *_boundaries_from_prefixes(t, run, text), False


def align(teacher_ends: np.ndarray, student_ends: np.ndarray) -> np.ndarray:
    """(L_s,) the teacher position aligned with each student position, -1 for none: equal boundaries, each
    boundary valid (>= 0) and held by one position on each side."""
    def unique(ends):
        vals, counts = np.unique(ends[ends >= 0], return_counts=True)
        return set(vals[counts == 1].tolist())

    both = unique(teacher_ends) & unique(student_ends)
    where = {e: t for t, e in enumerate(teacher_ends.tolist()) if e in both}
    return np.asarray([where.get(e, -1) for e in student_ends.tolist()], dtype=np.int64)


def follow(teacher_last: np.ndarray, student_last: np.ndarray, values: np.ndarray, kind: str) -> np.ndarray:
    """A per-position teacher value carried to the student's positions: 'mask' (the loss mask of the teacher
    position whose boundary is the last at or before the student's), 'document' (the document of the teacher
    token holding the student token's last character)."""
    if kind == "mask":
        t = np.searchsorted(teacher_last, student_last, side="right") - 1
    else:
        t = np.searchsorted(teacher_last, np.maximum(student_last - 1, 0), side="right")
    return values[np.clip(t, 0, len(values) - 1)]


def documents(position_ids: np.ndarray) -> np.ndarray:
    """Document index of each position of a row whose position ids restart at 0 with every document."""
    return np.cumsum(position_ids == 0)


# ---------------------------------------------------------------------------------------------
# a split, re-tokenised once and kept beside the student's output


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
    t, specials = _plain(tok), set(tok.all_special_ids)
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


# ---------------------------------------------------------------------------------------------
# the teacher's vocabulary in the student's


def surfaces(tok) -> list[str]:
    """The text each id adds after an ordinary token (so that a leading space a decoder strips at the start of a
    text is kept); U+FFFD for a piece of a character."""
    t = _plain(tok)
    anchor = t.encode("a", add_special_tokens=False).ids[-1:]
    n = t.get_vocab_size(with_added_tokens=True)
    head = t.decode(anchor, skip_special_tokens=False)
    both = t.decode_batch([anchor + [i] for i in range(n)], skip_special_tokens=False)
    return [b[len(head):] if b.startswith(head) else REPLACEMENT for b in both]


@dataclass
class VocabMap:
    """Teacher id -> student id (-1: unmapped), and how each was mapped (counts)."""

    ids: torch.Tensor  # (V_t,) int64
    counts: dict

    @classmethod
    def identity(cls, vocab: int) -> "VocabMap":
        return cls(torch.arange(vocab), {"exact": vocab, "first_piece": 0, "unmapped": 0})

    @classmethod
    def build(cls, teacher_tok, student_tok, teacher_vocab: int) -> "VocabMap":
        """GOLD's rule: a teacher token whose text is one student token maps to it; one whose text the student
        writes with several tokens maps to the first of them (when that piece's text begins the teacher token's);
        special tokens by role (`special_map`); pieces of characters and the rest map nowhere (their mass joins
        the tail bucket)."""
        t_text, s_text = surfaces(teacher_tok), surfaces(student_tok)
        s_special = set(student_tok.all_special_ids)
        exact = {}
        for i, x in enumerate(s_text):
            if x and REPLACEMENT not in x and i not in s_special:
                exact.setdefault(x, i)
        out = np.full(teacher_vocab, -1, dtype=np.int64)
        counts = {"exact": 0, "first_piece": 0, "unmapped": 0}
        todo = []
        specials = special_map(teacher_tok, student_tok)
        for v, x in enumerate(t_text[:teacher_vocab]):
            if v in specials:
                if specials[v] is not None:
                    out[v] = specials[v]
                    counts["exact"] += 1
            elif x and REPLACEMENT not in x and x in exact:
                out[v] = exact[x]
                counts["exact"] += 1
            elif x and REPLACEMENT not in x:
                todo.append(v)
        s = _plain(student_tok)
        for v, enc in zip(todo, s.encode_batch([t_text[v] for v in todo], add_special_tokens=False)):
            if enc.ids and t_text[v].startswith(s_text[enc.ids[0]]) and s_text[enc.ids[0]]:
                out[v] = enc.ids[0]
                counts["first_piece"] += 1
        counts["unmapped"] = int((out < 0).sum())
        return cls(torch.from_numpy(out), counts)


def prepare_student(name: str, tokenizer, model, folder: Path, tasks: dict, cache_tokenizer, vocab_size: int
                    ) -> tuple[VocabMap, dict, dict]:
    """A student with another tokenizer: (the teacher's vocabulary mapped into its own, every split of every task
    re-tokenised for it ({(task, split): StudentRows}, computed once and kept in `folder`), its train split's
    alignment statistics). `cache_tokenizer` is the first task's cache's tokenizer."""
    require_offsets(tokenizer, f"student {name!r}'s tokenizer")
    vocab_map = VocabMap.build(cache_tokenizer, tokenizer, vocab_size)
    first = next(iter(tasks.values()))[0]
    rows, longest = {}, 0
    for task, (c, _) in tasks.items():
        for split in c.splits:
            rows[(task, split)] = stored_rows(c, split, tokenizer, folder, name,
                                              cache_tokenizer if c is first else None)
            longest = max(longest, rows[(task, split)].input_ids.shape[1])
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and longest > limit:
        raise StudentError(f"student {name!r}: its tokenizer writes the cache's rows in up to {longest} "
                           f"tokens, more than its {limit} positions")
    train = rows.get((next(iter(tasks)), "train"))
    return vocab_map, rows, train.stats() if train is not None else {}
