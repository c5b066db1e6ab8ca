"""The statistics of a finished cache (the manifest's `stats`), counted where their data is: in the shards' commit
records, which `CacheWriter.finalize` reads once to write the shard index and hands to a `Tally` one at a time, and
in the sizes of the files written beside the shards, which the writer measures and gives as numbers. A cache that
grows another starts from the statistics of the one it grows.
"""

from __future__ import annotations

import time

from .index import field_of
from .layout import HEAD_FILE
from .manifest import Manifest
from .records import Stats


class Tally:
    """The statistics of the cache a writer finishes: its new shards' commit records (`add`, one at a time), plus
    `base`'s when it grows one."""

    def __init__(self, plan: Manifest, base: Manifest | None = None):
        old = base.stats if base is not None else Stats(0, 0, 0, {}, 0.0, 0.0, None)
        self.plan = plan
        self.tokens, self.seconds, self.mass = old.tokens, old.seconds, (old.mean_topk_mass or 0.0) * old.tokens
        self.positions = old.tokens  # positions with a target (a capture: every token; an import: trained ones)
        self.wait = old.writer_wait_seconds
        self.per_field = {k: v * old.tokens for k, v in old.bytes_per_token.items()}
        self.right = {s: list(v) for s, v in (old.teacher_correct_labelled or {}).items()}
        kl = old.logprob_kl or {}  # bounded-error log-probs: [sum, max, positions] of KL(exact || stored)
        self.kl = [kl.get("mean", 0.0) * kl.get("positions", 0), kl.get("max", 0.0), kl.get("positions", 0)]

    def add(self, c: dict) -> None:
        self.tokens += c["tokens"]
        self.seconds += c["seconds"]
        self.wait += c.get("writer_wait_seconds", 0.0)
        for rel, d in c["files"].items():
            name = field_of(rel, c.get("part", c["split"]))
            self.per_field[name] = self.per_field.get(name, 0) + d["bytes"]
        if self.plan.task.classifier:
            r = self.right.setdefault(c["split"], [0, 0])
            r[0], r[1] = r[0] + c["teacher_correct"], r[1] + c["labelled"]
        else:
            self.mass += c["topk_mass_sum"]
            self.positions += c.get("target_positions", c["tokens"])
            if "logprob_kl_sum" in c:
                self.kl = [self.kl[0] + c["logprob_kl_sum"], max(self.kl[1], c["logprob_kl_max"]),
                           self.kl[2] + c["tokens"]]

    def result(self, rows_bytes: list[int], head_bytes: int | None = None, layout: dict | None = None,
               field_files: dict[str, int] | None = None) -> dict:
        """The manifest's `stats`, given the bytes of each written part's rows.parquet and (a new cache that
        stores one) of the LM head file; `layout`: the writing ranks' layout, kept with the timing; `field_files`:
        bytes of files beside a field's shards that count as the field's (the parts' id orders)."""
        per_field, tokens, right = dict(self.per_field), self.tokens, self.right
        for name, size in (field_files or {}).items():
            per_field[name] = per_field.get(name, 0) + size
        for size in rows_bytes:
            per_field["rows.parquet"] = per_field.get("rows.parquet", 0) + size
        if head_bytes is not None:
            per_field[HEAD_FILE] = head_bytes  # once per cache
        # a classifier's accuracy on the gold labels, per split, over every part; a causal LM's top-K mass
        quality = {"teacher_correct_labelled": right,
                   "teacher_accuracy": {s: a / max(n, 1) for s, (a, n) in right.items()}} \
            if self.plan.task.classifier else {"mean_topk_mass": self.mass / max(self.positions, 1)}
        if self.kl[2]:
            quality["logprob_kl"] = {"mean": self.kl[0] / self.kl[2], "max": self.kl[1], "positions": self.kl[2]}
        return quality | {
            "tokens": tokens,
            "rows": sum(s.rows for s in self.plan.splits.values()),
            "bytes_on_disk": round(sum(per_field.values())),
            "bytes_per_token": {k: v / max(tokens, 1) for k, v in per_field.items()},
            "timing": {"seconds": self.seconds, "tokens_per_second": tokens / self.seconds if self.seconds else 0.0,
                       "writer_wait_seconds": self.wait,
                       "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            | ({"layout": layout} if layout else {}),
        }
