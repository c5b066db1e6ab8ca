"""Step 1b for classifiers: one labelled example per row, as the classifier reads it.

A classification teacher is described by a `Classifier` (its task, labels, padding id, attention); the manifest
records it as its `task` (`Classifier.record`). Gold labels (class names, ids in the teacher's numbering, or a
`datasets` ClassLabel's ids mapped by name) become the teacher's class ids; labels the teacher does not know are
refused together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from ..format.layout import IGNORE_INDEX
from ..format.records import Task
from ..models import LabelSet
from .documents import DOC_BATCH


@dataclass(frozen=True)
class Classifier:
    """A classification teacher: its task (what it predicts), its labels, the id its rows are padded with."""

    task: str
    labels: LabelSet
    pad_id: int
    bidirectional: bool = False  # an encoder: every token attends to every real token (attention maps are full)

    @property
    def per_token(self) -> bool:
        return self.task == "token-classification"

    def record(self, label_column: str) -> Task:
        """The manifest's `task` of this teacher, its gold labels read from `label_column`."""
        return Task(self.task, tuple(self.labels.names), label_column, self.pad_id,
                    IGNORE_INDEX if self.per_token else None, self.bidirectional)


def _label_feature_names(ds, column: str) -> list[str] | None:
    """Class names a datasets ClassLabel feature gives the column's ints (Sequence(ClassLabel) too)."""
    feat = ds.features.get(column)
    feat = getattr(feat, "feature", feat)  # Sequence(ClassLabel) / List(ClassLabel)
    names = getattr(feat, "names", None)
    return list(names) if names else None


class _LabelMapper:
    """Gold labels (names, or ids in the teacher's numbering, or a ClassLabel's ids mapped by name) -> teacher ids;
    labels the teacher does not know are collected and refused together."""

    def __init__(self, labels: LabelSet, feature_names: list[str] | None):
        self.labels, self.ids = labels, labels.ids
        self.feature_names = None if (feature_names is None or labels.generic) else feature_names
        self.unknown: dict[str, int] = {}

    def __call__(self, value) -> int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value == IGNORE_INDEX:
            return IGNORE_INDEX  # already "no label" (a word or row left out on purpose)
        if isinstance(value, (bool, np.bool_)) or value is None:
            key = repr(value)
        elif isinstance(value, (int, np.integer)):
            if self.feature_names is not None and 0 <= value < len(self.feature_names):
                return self(self.feature_names[int(value)])
            if 0 <= value < len(self.labels.names):
                return int(value)
            key = str(int(value))
        elif isinstance(value, str):
            if value in self.ids:
                return self.ids[value]
            key = repr(value)
        else:
            key = f"{type(value).__name__} {value!r}"
        self.unknown[key] = self.unknown.get(key, 0) + 1
        return IGNORE_INDEX

    def check(self, where: str) -> None:
        if self.unknown:
            shown = ", ".join(f"{k} (x{n})" for k, n in list(self.unknown.items())[:8])
            raise DataError(f"{where}: {sum(self.unknown.values())} labels are not in the teacher's label set "
                            f"{self.labels.names} (ids 0..{len(self.labels.names) - 1}): {shown}")


def _examples(batch: dict, cfg: DataConfig, words: bool, start: int, where: str, stats: dict) -> tuple[list, list]:
    """The non-empty examples of a batch of documents with their gold labels; malformed ones refused by row."""
    texts, golds = [], []
    for i, (text, gold) in enumerate(zip(batch[cfg.text_column], batch[cfg.label_column])):
        if words:
            ok = isinstance(text, list) and all(isinstance(w, str) for w in text)
            if not ok or not isinstance(gold, list) or len(gold) != len(text):
                raise DataError(f"{where} row {start + i}: token-classification reads a list of words in "
                                f"{cfg.text_column!r} and one label per word in {cfg.label_column!r} (got "
                                f"{type(text).__name__} of {len(text) if isinstance(text, list) else '?'} and "
                                f"{type(gold).__name__} of {len(gold) if isinstance(gold, list) else '?'})")
            empty = not text
        else:
            if text is not None and not isinstance(text, str):
                raise DataError(f"{where} row {start + i}: column {cfg.text_column!r} must hold text, got "
                                f"{type(text).__name__}")
            empty = not text or not text.strip()
        if empty:
            stats["documents_empty"] += 1
            continue
        texts.append(text)
        golds.append(gold)
    return texts, golds


def classification_blocks(ds, tokenizer, cfg: DataConfig, classifier: Classifier, where: str, stats: dict):
    """One example per row, as the classifier reads it: tokenizer(text) with its special tokens, truncated to
    seq_len and right-padded with the classifier's `pad_id`. Sequence classification: one label per row; token classification:
    `text_column` holds words, the label of each word goes to its first token, IGNORE_INDEX elsewhere. Yields the
    rows a block of documents at a time ({input_ids, lengths, labels, loss_mask: None, position_ids: None});
    `stats` is filled as they go; unknown labels are refused together once every document is read."""
    L = cfg.seq_len
    if cfg.shuffle_seed is not None:
        ds = ds.shuffle(seed=cfg.shuffle_seed)
    n_docs = len(ds) if cfg.max_documents is None else min(len(ds), cfg.max_documents)
    mapper = _LabelMapper(classifier.labels, _label_feature_names(ds, cfg.label_column))
    words = classifier.per_token
    if words and not getattr(tokenizer, "is_fast", False):
        raise DataError("token-classification needs a fast tokenizer (which word each token comes from)")
    stats.update({"documents": 0, "documents_truncated": 0, "tokens_read": 0, "documents_empty": 0})
    made = 0
    budget = cfg.max_tokens if cfg.max_tokens is not None else float("inf")
    for start in range(0, n_docs, DOC_BATCH):
        if stats["tokens_read"] >= budget:
            break
        texts, golds = _examples(ds[start : min(start + DOC_BATCH, n_docs)], cfg, words, start, where, stats)
        if not texts:
            continue
        ids_out, lens, labs = [], [], []
        try:
            enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=L, is_split_into_words=words)
        except Exception as e:  # a byte-level BPE without add_prefix_space refuses pre-split words
            raise DataError(f"the teacher's tokenizer cannot encode {'words' if words else 'the texts'}: "
                            f"{type(e).__name__}: {e}") from e
        for i, row in enumerate(enc["input_ids"]):
            if stats["tokens_read"] >= budget:
                break
            stats["documents"] += 1
            stats["tokens_read"] += len(row)
            if words:
                lab = np.full(L, IGNORE_INDEX, dtype=np.int32)
                seen = set()
                for t, w in enumerate(enc.word_ids(i)):
                    if w is not None and w not in seen:
                        seen.add(w)
                        lab[t] = mapper(golds[i][w])
                stats["documents_truncated"] += int(len(seen) < len(golds[i]))
                for w in range(len(seen), len(golds[i])):
                    mapper(golds[i][w])  # a truncated word's label is still checked
            else:
                lab = mapper(golds[i])
                full = tokenizer(texts[i], add_special_tokens=True)["input_ids"] if len(row) == L else row
                stats["documents_truncated"] += int(len(full) > L)
            padded = np.full(L, classifier.pad_id, dtype=np.int32)
            padded[: len(row)] = row
            ids_out.append(padded)
            lens.append(len(row))
            labs.append(lab)
        if ids_out:
            made += len(ids_out)
            yield {"input_ids": np.stack(ids_out), "lengths": np.asarray(lens, dtype=np.int32),
                   "labels": np.stack(labs).astype(np.int32) if words else np.asarray(labs, dtype=np.int32),
                   "loss_mask": None, "position_ids": None}
    mapper.check(where)
    if not made:
        raise DataError(f"{where}: the dataset produced no example (every text empty?)")
