"""Building a cache's plan: the writing side of `Manifest`'s typed reading, from the same records (records.py).

A plan is everything that determines a cache's bytes: the manifest less what only a finished cache has (shard
index, metadata files, statistics, digest). `plan_document` assembles one, stamping the format and its version;
the typed parts are written by their records' `to_dict` (the tokenizer, the splits and their parts, a
classifier's task), so that what the readers read and what the writers write are one description. The parts
that record settings as a capture or an import was given them (teacher, dataset, preparation, capture, fields,
software) stay mappings. Nothing here loads a tokenizer or imports torch: a tokenizer is handed in.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from .layout import shard_ranges, tokenizer_fingerprint
from .manifest import FORMAT_NAME, FORMAT_VERSION
from .records import Part, Split, Task, Tokenizer


def tokenizer_record(tokenizer) -> Tokenizer:
    """The manifest's `tokenizer` of a loaded tokenizer: its fingerprint, class, size and special ids."""
    return Tokenizer(tokenizer_fingerprint(tokenizer), type(tokenizer).__name__, len(tokenizer),
                     tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id)


def part_record(path: str, row_start: int, rows: int, tokens: int, shard_rows: int) -> Part:
    """A part of `rows` rows, cut into shards of `shard_rows`."""
    return Part(path, row_start, rows, tokens, len(shard_ranges(rows, shard_rows)))


def plan_document(*, teacher: Mapping, tokenizer: Tokenizer, dataset: Mapping, preparation: Mapping,
                  capture: Mapping, splits: Iterable[Split], fields: Mapping, software: Mapping,
                  task: Task | None = None, imported: Mapping | None = None) -> dict:
    """A plan from its parts. `task`: a classification teacher's (a causal LM's plan has no such key);
    `imported`: what `distill import` learnt of its source (a capture's plan has no such key)."""
    plan = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "teacher": dict(teacher),
        "tokenizer": tokenizer.to_dict(),
        "dataset": dataset,
        "preparation": dict(preparation),
        "capture": dict(capture),
        "splits": {s.name: s.to_dict() for s in splits},
        "fields": dict(fields),
        "software": dict(software),
    }
    if task is not None:
        plan["task"] = task.to_dict()
    if imported is not None:
        plan["imported"] = imported
    return plan
