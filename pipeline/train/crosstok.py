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

A split re-tokenised this way is kept beside the student's output (`retokenized.py`); `vocab_map.VocabMap` maps
the teacher's vocabulary to the student's through the tokens' text, for the vocabulary-mapped KL (`kd_mapped`)
and the cross-tokenizer agreement metric.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..errors import StudentError

REPLACEMENT = "\ufffd"
SPECIAL_ROLES = ("eos_token", "bos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


def plain_tokenizer(tok):
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
        self.t, self.s = plain_tokenizer(teacher_tok), plain_tokenizer(student_tok)
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
