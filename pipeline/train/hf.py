"""A cache in transformers' `Trainer` (and what builds on it: TRL's trainers, axolotl's): a torch `Dataset` of
a cache split's rows, its collator, and a `Trainer` whose loss is any weighted set of this project's terms.

    from pipeline.train.hf import CacheDataset, DistillTrainer, collate
    train = CacheDataset("data/caches/smollm2-stdlib", "train", losses={"kd_forward": 0.5, "ce": 0.5})
    trainer = DistillTrainer(model=student, args=TrainingArguments(..., remove_unused_columns=False),
                             train_dataset=train, eval_dataset=CacheDataset(..., "validation", ...),
                             data_collator=collate, distill=train.loss)
    trainer.train()

A row holds what `distill student` reads: `input_ids`, `length`, the loss mask and position ids where the
cache has them, and the fields the terms read (`terms.fields_for`). `collate` stacks rows into the batch
`CacheBatches` yields, so the loss is the recipe's own computation (`step.step_losses`), term for term.
Terms on hidden states or attention maps learn a projection and a layer map, which `distill student` owns:
they are refused here (train those students with `distill student`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..config import StudentConfig
from ..errors import StudentError
from ..format.reader import Cache
from . import terms
from .reader import FLOAT_FIELDS, ROW_FIELDS
from .signal import Wiring
from .step import step_losses

REPRESENTATION = {"hidden_states", "attentions", "hidden_scale"}


class DistillLoss:
    """A weighted set of this project's terms (a `losses` table as in `[[students]]`) on a batch of a cache."""

    def __init__(self, cache: Cache, losses: dict[str, float], temperature: float = 1.0, jsd_beta: float = 0.5,
                 allow_biased_kd: bool = False):
        self.cache, self.manifest = cache, cache.manifest
        self.spec = StudentConfig(name="student", arch={"num_layers": 1, "hidden_size": 8, "num_heads": 1},
                                  losses=losses, temperature=temperature, jsd_beta=jsd_beta,
                                  allow_biased_kd=allow_biased_kd)
        self.fields = terms.fields_for(self.spec, self.manifest)
        uses = REPRESENTATION & (set(self.fields) | terms.student_needs(self.spec))
        if uses:
            raise StudentError(f"losses {sorted(losses)} read {sorted(uses)}: representation terms learn projections "
                               "and a layer map that `distill student` owns; train such students with it")
        self.head = None
        if "final_hidden" in self.manifest.fields:
            from .head import TeacherHead

            self.head = TeacherHead.from_cache(cache, torch.device("cpu"))
        self._head_device = torch.device("cpu")

    def __call__(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Every term and the weighted total (`total`) for `model` on `batch` (from `collate`)."""
        device = next(model.parameters()).device
        if self.head is not None and device != self._head_device:
            from .head import TeacherHead

            self.head, self._head_device = TeacherHead.from_cache(self.cache, device), device
        return step_losses(model, batch, self.spec, self.manifest, device, Wiring(), self.head)


class CacheDataset(torch.utils.data.Dataset):
    """The rows of one cache split as a map-style dataset (any sampler, any order). `losses` (or `fields`) says
    which teacher fields each row carries; `self.loss` is the matching `DistillLoss`. Rows are read a Zarr
    chunk at a time; the chunk last read is kept, so rows in cache order cost one read per chunk."""

    def __init__(self, cache: str | Cache, split: str, losses: dict[str, float] | None = None,
                 fields: list[str] | None = None, storage_options: dict | None = None, **loss_settings):
        self.cache = cache if isinstance(cache, Cache) else Cache(cache, storage_options=storage_options)
        if split not in self.cache.manifest.splits:
            raise StudentError(f"{self.cache.root}: no split {split!r} (splits: {', '.join(self.cache.splits)})")
        self.split = split
        self.loss = DistillLoss(self.cache, losses, **loss_settings) if losses is not None else None
        self.fields = list(fields) if fields is not None else (self.loss.fields if self.loss else [])
        m = self.cache.manifest
        rows = self.cache.rows(split, ["input_ids", "length"] + [c for c in ROW_FIELDS if c in m.fields])
        self.rows = {c: np.asarray(rows.column(c).to_pylist(), dtype) for c, dtype in
                     [("input_ids", np.int64), ("length", np.int64)] + [(c, t) for c, t in ROW_FIELDS.items()
                                                                          if c in rows.column_names]}
        self.arrays = {f: self.cache.array(split, f) for f in self.fields}
        self.chunk = int(m.capture.value("rows_per_chunk"))  # rows a reader decompresses together
        self._held: dict[str, tuple[int, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.rows["length"])

    def _field(self, f: str, i: int) -> np.ndarray:
        c = self.chunk
        start = i - i % c
        if f not in self._held or self._held[f][0] != start:
            self._held[f] = (start, np.asarray(self.arrays[f][start:min(start + c, len(self))]))
        return self._held[f][1][i - start]

    def __getitem__(self, i: int) -> dict:
        row = {c: v[i] for c, v in self.rows.items()}
        for f in self.fields:
            a = self._field(f, int(i))
            if a.dtype == np.uint16 and f in ("topk_ids", "sample_ids", "sample_counts"):
                a = a.astype(np.int32)  # ids of vocabularies <= 65,536 are stored as uint16
            row[f] = a
        return row

    def row_numbers(self):
        """The split's row numbers as a `datasets.Dataset`, for trainers that take nothing else (TRL's); its
        collator is `collate_rows`, which reads the rows from the cache as batches are made."""
        import datasets

        return datasets.Dataset.from_dict({"row": np.arange(len(self), dtype=np.int64)})

    def collate_rows(self, items: list[dict]) -> dict:
        """`collate` of the rows whose numbers `items` (from `row_numbers`) hold."""
        return collate([self[int(it["row"])] for it in items])


def collate(rows: list[dict]) -> dict:
    """Rows of a `CacheDataset` as the batch `distill student` trains on (CPU tensors)."""
    out = {}
    for k in rows[0]:
        t = torch.from_numpy(np.stack([np.asarray(r[k]) for r in rows]))
        out[k] = t.float() if k in FLOAT_FIELDS else t
    return out


@functools.cache
def _trainer_class():
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """transformers' `Trainer` with this project's loss: `distill` (a `DistillLoss`, e.g. `CacheDataset.loss`)
        replaces the model's own. Every term is logged with the loss (`distill/<term>`, averaged over the
        logging interval). Set `remove_unused_columns=False`: the rows carry the teacher's fields."""

        def __init__(self, *args, distill: DistillLoss, **kwargs):
            super().__init__(*args, **kwargs)
            if self.args.remove_unused_columns:
                raise StudentError("DistillTrainer needs TrainingArguments(remove_unused_columns=False): the "
                                   "batches carry the teacher's fields, which the model's forward does not take")
            self.distill = distill
            self._terms: dict[str, list[float]] = {}
            # the terms are means over each micro-batch's positions: the Trainer divides by the accumulation
            # steps (as `distill student` does), instead of leaving it to a model-side num_items_in_batch
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            parts = self.distill(model, inputs)
            for k, v in parts.items():
                if k != "total":
                    self._terms.setdefault(k, []).append(float(v.detach()))
            loss = parts["total"]
            return (loss, {"loss": loss}) if return_outputs else loss

        def log(self, logs: dict, *args, **kwargs):
            if self._terms and "loss" in logs:
                logs = {**logs, **{f"distill/{k}": sum(v) / len(v) for k, v in self._terms.items()}}
                self._terms = {}
            super().log(logs, *args, **kwargs)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            with torch.no_grad():
                loss = self.distill(model, inputs)["total"]
            return loss.detach(), None, None

    return DistillTrainer


def __getattr__(name: str):
    if name == "DistillTrainer":  # built on first use: importing this module does not import transformers' Trainer
        return _trainer_class()
    raise AttributeError(name)
