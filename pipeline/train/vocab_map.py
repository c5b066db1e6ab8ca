"""The teacher's vocabulary in a student's with another tokenizer, mapped through the tokens' text (`VocabMap`), for
the vocabulary-mapped KL (`kd_mapped`) and the cross-tokenizer agreement metric."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .crosstok import REPLACEMENT, plain_tokenizer, special_map


def surfaces(tok) -> list[str]:
    """The text each id adds after an ordinary token (so that a leading space a decoder strips at the start of a
    text is kept); U+FFFD for a piece of a character."""
    t = plain_tokenizer(tok)
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
        s = plain_tokenizer(student_tok)
        for v, enc in zip(todo, s.encode_batch([t_text[v] for v in todo], add_special_tokens=False)):
            if enc.ids and t_text[v].startswith(s_text[enc.ids[0]]) and s_text[enc.ids[0]]:
                out[v] = enc.ids[0]
                counts["first_piece"] += 1
        counts["unmapped"] = int((out < 0).sum())
        return cls(torch.from_numpy(out), counts)
