"""Held-out splits of a student run: which batches each rank evaluates, how each student reads them (the
cache's tokens, or its own re-tokenised rows), the teacher's own figures on them, and one student's metrics
over several sources combined by weight. The metrics themselves are `metrics.py`'s.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import distributed, models
from ..student_config import StudentRunConfig
from ..format.layout import row_column
from ..format.reader import Cache
from .sources import Sources
from .retokenized import teacher_chars
from .metrics import Reading, evaluate_all, teacher_metrics
from .dataset import CacheBatches, make_loader
from .terms import FULL_FIELDS, TOPK_FIELDS

Sets = dict[str, tuple[CacheBatches, float]]  # source -> (this rank's batches of a held-out split, its weight)


class HeldOut:
    """Every student on the held-out splits of every source, one read of the batches per evaluation."""

    def __init__(self, cfg: StudentRunConfig, sources: Sources, heads: dict, dims: dict, device, tokenizer, log):
        self.cfg, self.sources, self.heads, self.dims, self.device, self.log = cfg, sources, heads, dims, device, log
        self.cache = next(iter(sources.values()))[0]
        self.tokenizer = tokenizer  # the first cache's
        self.task = self.cache.manifest.task
        self.val_sources = {n: (c, w) for n, (c, w) in sources.items() if "validation" in c.splits}
        self.test_sources = {n: (c, w) for n, (c, w) in sources.items() if "test" in c.splits}
        self.val_sets: Sets = {}
        self.teacher: dict[str, dict] = {}  # source -> the teacher's validation NLL (per token, per character)
        self._chars: dict[tuple[str, str], np.ndarray | None] = {}  # (source, split) -> characters per cached token

    def prepare(self) -> None:
        """The validation batches, and the teacher's own figures on the same rows, per token and per character."""
        self.val_sets = {n: (self.eval_set(n, c, "validation", self.cfg.eval_rows), w)
                         for n, (c, w) in self.val_sources.items()}
        if self.task.classifier:
            return
        for n, (c, _) in self.val_sources.items():
            m = teacher_metrics(c, "validation", self.char_counts(n, "validation"), self.cfg.eval_rows)
            if m is not None:
                self.teacher[n] = m
                self.log(f"teacher on source {n!r} validation: NLL {m['nll']:.4f} per token"
                         + (f", {m['nll_per_char']:.4f} per character" if "nll_per_char" in m else ""))

    def eval_set(self, name: str, c: Cache, split: str, rows: int | None = None) -> CacheBatches:
        """The batches of a held-out split that this rank evaluates (the first `rows` rows, or all)."""
        r = distributed.ranks()
        keys = None if rows is None else c.rows(split).column("key").to_pylist()[:rows]
        if self.task.classifier:
            fields = ["class_logprobs"]
        else:
            fields = list(TOPK_FIELDS) + (list(FULL_FIELDS) if name in self.heads else [])
        ds = CacheBatches(c, split, fields, self.cfg.batch_size, shuffle=False, keys=keys, trim=self.task.classifier)
        ds.counted = len(ds)
        if r.active:  # this rank's share of the batches
            ds.indices = [j for j in range(len(ds)) if j % r.world == r.rank]
            ds.counted = len(ds.indices)
            if self.cfg.parallel == "fsdp":  # every forward gathers layers with every rank: all run as many
                per_rank = -(-len(ds) // r.world)
                ds.indices += [ds.indices[0] if ds.indices else 0] * (per_rank - len(ds.indices))
        return ds

    def test_sets(self) -> Sets:
        return {n: (self.eval_set(n, c, "test"), w) for n, (c, w) in self.test_sources.items()}

    def run(self, models: dict, sets: Sets, students: dict, split: str = "validation") -> dict[str, dict[str, dict]]:
        """{source: {student: metrics}} over the given evaluation sets (of `split`); `students`: name -> Student."""
        return {n: evaluate_all(models, make_loader(ds), self.device, self.heads.get(n),
                                self.sources[n][0].manifest.task, self.readings(n, split, models, students),
                                self.cfg.precision, counted=ds.counted)
                for n, (ds, _) in sets.items()}

    def readings(self, source: str, split: str, models: dict, students: dict) -> dict[str, Reading] | None:
        """How each student reads a held-out split: its re-tokenised rows (another tokenizer), or the cache's tokens
        with their character counts (NLL per character)."""
        if self.task.classifier:
            return None
        out = {}
        for name in models:
            st = students.get(name)
            if st is not None and st.cross:
                out[name] = Reading(rows=st.rows[(source, split)], vocab_map=st.wiring.vocab_map, dims=self.dims[source])
            else:
                out[name] = Reading(chars=self.char_counts(source, split))
        return out

    def char_counts(self, source: str, split: str) -> np.ndarray | None:
        """Characters per cached token of the rows of `split` that are evaluated (None: not available), once."""
        if (source, split) not in self._chars:
            c = self.sources[source][0]
            try:  # the rows evaluated: the first eval_rows of the validation split, every test row
                table = c.rows(split, max_rows=self.cfg.eval_rows if split == "validation" else None)
                self._chars[(source, split)] = teacher_chars(c.tokenizer() if c is not self.cache else self.tokenizer,
                                                           row_column(table, "input_ids", np.int64),
                                                           table.column("length").to_numpy().astype(np.int64))
            except Exception as e:  # e.g. a slow cache tokenizer: no character offsets, no NLL per character
                self.log(f"source {source!r}: no NLL per character ({e})")
                self._chars[(source, split)] = None
        return self._chars[(source, split)]


    def validate(self, students: list, by_name: dict) -> dict[str, tuple[dict, dict[str, dict]]]:
        """{student: (its metrics over every source combined by weight, {source: its metrics})} on the validation
        batches, every student of `students` in one read of them."""
        per_source = self.run({st.name: st.model for st in students}, self.val_sets, by_name)
        out = {}
        for st in students:
            mine = {n: m[st.name] for n, m in per_source.items()}
            out[st.name] = combine(mine, self.val_sets), mine
        return out

    def test_best(self, students: list, by_name: dict) -> dict[str, dict]:
        """{student: metrics} of each student's best model (as saved in its model/ folder, read back on every rank
        so every rank evaluates the same weights; the training weights when none was saved) on the test splits."""
        if not self.test_sources:
            return {}
        sets = self.test_sets()
        out = {}
        for st in students:  # one at a time: a best model beside the training ones, then freed
            saved = st.out / "model"
            model = models.auto_class(self.task.type).from_pretrained(saved, dtype=torch.float32).to(self.device) \
                if (saved / "config.json").exists() else st.model
            per_source = self.run({st.name: model}, sets, by_name, "test")
            del model
            out[st.name] = combine({n: m[st.name] for n, m in per_source.items()}, sets)
        return out


def combine(mine: dict[str, dict], sets: Sets) -> dict:
    """One student's metrics of several sources, weighted by source (counts added), with each source's."""
    if len(mine) == 1:
        return dict(next(iter(mine.values())))
    total_w = sum(w for _, w in sets.values())
    first = next(iter(mine.values()))
    counts = ("tokens", "examples", "chars")
    m = {k: sum(mine[n][k] * w for n, (_, w) in sets.items()) / total_w for k in first if k not in counts
         and k != "ppl" and all(k in x for x in mine.values())}
    if "nll" in m and "ppl" in first:
        m["ppl"] = math.exp(min(m["nll"], 50))
    for k in counts:
        if k in first:
            m[k] = sum(x[k] for x in mine.values())
    m["sources"] = mine
    return m
