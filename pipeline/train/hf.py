"""A cache in transformers' `Trainer` (and what builds on it: TRL's trainers, axolotl's): a torch `Dataset` of
a cache split's rows, its collator, and a `Trainer` whose loss is any weighted set of this project's terms.

    from pipeline.train.hf import CacheDataset, DistillTrainer, collate
    train = CacheDataset("data/caches/smollm2-stdlib", "train", losses={"kd_forward": 0.5, "ce": 0.5})
    trainer = DistillTrainer(model=student, args=TrainingArguments(..., remove_unused_columns=False),
                             train_dataset=train, eval_dataset=CacheDataset(..., "validation", ...),
                             data_collator=collate, distill=train.loss)
    trainer.train()

A row holds what `distill student` reads: `input_ids`, `length`, the loss mask and position ids where the
cache has them, and the fields the terms read (`terms.fields_for`). Rows are read as they are asked for (memory
does not grow with the split), and `DistillTrainer` asks for them in `distill student`'s order
(`CacheDataset.sampler`: batches that sample a shuffle window of shards, each shard read once). `collate` stacks rows into the batch
`CacheBatches` yields, so the loss is the recipe's own computation (`step.step_losses`), term for term.
Terms on hidden states or attention maps learn a projection and a layer map, which `distill student` owns:
they are refused here (train those students with `distill student`).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from ..student_config import StudentConfig
from ..errors import StudentError
from ..format.reader import Cache
from . import terms
from ..config import DEFAULT_SHUFFLE_WINDOW
from .batch_order import EpochPlan
from .split_reader import SplitReader
from .dataset import FLOAT_FIELDS, row_dtypes, widened
from .signal import Wiring
from .step import step_losses
from .student_init import check_output_rows

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
        self._checked: set[int] = set()  # models whose output layer was checked against the cache

    def check(self, model) -> None:
        """Refuse a model the cache's targets do not fit, as `distill student` does: a causal LM whose output layer
        has fewer rows than the teacher's vocabulary (its top-K ids would be gathered out of range), a classifier
        with another number of labels."""
        m = self.manifest
        model = getattr(model, "module", model)  # under DDP (accelerate, Trainer): the model it wraps
        if m.task.classifier:
            labels = getattr(model.config, "num_labels", None)
            if labels != len(m.task.labels):
                raise StudentError(f"the model has {labels} labels, the cache's {m.task.type} teacher "
                                   f"{len(m.task.labels)} ({', '.join(m.task.labels)})")
        else:
            check_output_rows(model, m.teacher.vocab_size, "the model")
        self._checked.add(id(model))

    def __call__(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Every term and the weighted total (`total`) for `model` on `batch` (from `collate`)."""
        if id(model) not in self._checked:
            self.check(model)
            self._checked.add(id(model))
        device = next(model.parameters()).device
        if self.head is not None and device != self._head_device:
            from .head import TeacherHead

            self.head, self._head_device = TeacherHead.from_cache(self.cache, device), device
        return step_losses(model, batch, self.spec, self.manifest, device, Wiring(), self.head)


class CacheDataset(torch.utils.data.Dataset):
    """The rows of one cache split as a map-style dataset (any sampler, any order). `losses` (or `fields`) says
    which teacher fields each row carries; `self.loss` is the matching `DistillLoss`.

    Nothing of the split is held: rows are read as they are asked for, through the student reader's
    `split_reader.SplitReader` (the rows of a shard from its row group of rows.parquet, and the Zarr chunks holding
    them; a few shards of each kept), so memory does not grow with the split. A DataLoader asks for a batch's
    rows at once (`__getitems__`). In `sampler`'s order the reader holds a shuffle window of shards and reads each
    shard's chunks once, all together; in any other order it reads the chunks of the rows asked for (a chunk, and
    a row group, per row in a random order)."""

    def __init__(self, cache: str | Cache, split: str, losses: dict[str, float] | None = None,
                 fields: list[str] | None = None, storage_options: dict | None = None, **loss_settings):
        self.cache = cache if isinstance(cache, Cache) else Cache(cache, storage_options=storage_options)
        if split not in self.cache.manifest.splits:
            raise StudentError(f"{self.cache.root}: no split {split!r} (splits: {', '.join(self.cache.splits)})")
        self.split = split
        self.loss = DistillLoss(self.cache, losses, **loss_settings) if losses is not None else None
        self.fields = list(fields) if fields is not None else (self.loss.fields if self.loss else [])
        m = self.cache.manifest
        missing = [f for f in self.fields if f not in m.dense_fields]
        if missing:
            raise StudentError(f"{self.cache.root}: no field {missing} (has: {', '.join(m.dense_fields)})")
        self.n = m.splits[split].rows
        self.row_fields = row_dtypes(m)
        self._reader: tuple[tuple, SplitReader] | None = None  # ((process, whole shards, shards held), reader)
        self.whole_shards, self.hold_shards = False, 2  # (`sampler` sets them for its window)

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:  # DataLoader workers open readers of their own
        return {**self.__dict__, "_reader": None}

    def reader(self) -> SplitReader:
        """This process's reader: of whole shards, a shuffle window and one more held, when `sampler` drives the
        order; else of the chunks asked for."""
        want = (os.getpid(), self.whole_shards, self.hold_shards)
        if self._reader is None or self._reader[0] != want:
            self._reader = (want, SplitReader(self.cache, self.split, whole_shards=self.whole_shards,
                                              hold_shards=self.hold_shards))
        return self._reader[1]

    def __getitems__(self, indices) -> list[dict]:
        """The rows at `indices`, read together (what a DataLoader's batch asks for)."""
        rows = np.asarray(indices, dtype=np.int64)
        rows = np.where(rows < 0, rows + self.n, rows)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"row {int(rows[(rows < 0) | (rows >= self.n)][0])} of a split of {self.n} rows")
        reader = self.reader()
        cols = reader.columns(rows, self.row_fields)  # (rows in a random order: a read per row; see `sampler`)
        for f, a in reader.dense(rows, self.fields).items():
            cols[f] = widened(f, a)
        return [{c: v[i] for c, v in cols.items()} for i in range(len(rows))]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([int(i)])[0]

    def sampler(self, seed: int = 0, window: int = DEFAULT_SHUFFLE_WINDOW) -> "WindowSampler":
        """The split's rows in the order `distill student` reads them (`WindowSampler`): a shuffled order in which
        each batch is a sample of `window` shards and the reader holds those shards only."""
        return WindowSampler(self, seed, window)

    def row_numbers(self):
        """The split's row numbers as a `datasets.Dataset`, for trainers that take nothing else (TRL's); its
        collator is `collate_rows`, which reads the rows from the cache as batches are made."""
        import datasets

        return datasets.Dataset.from_dict({"row": np.arange(len(self), dtype=np.int64)})

    def collate_rows(self, items: list[dict]) -> dict:
        """`collate` of the rows whose numbers `items` (from `row_numbers`) hold."""
        return collate(self.__getitems__([int(it["row"]) for it in items]))


class WindowSampler(torch.utils.data.Sampler):
    """A `CacheDataset`'s row numbers in the order `distill student` reads a split (`batch_order.EpochPlan` with one
    worker): shards permuted by (seed, epoch), `window` shards' rows shuffled together, window after window. A
    batch is then a sample of the window, however grouped the cache's rows are, and the dataset's reader holds
    the window's shards only (each of their chunks read once), where a plain random order reads a chunk per row.
    `set_epoch` (which transformers' Trainer calls) reshuffles."""

    def __init__(self, dataset: CacheDataset, seed: int = 0, window: int = DEFAULT_SHUFFLE_WINDOW):
        self.ranges = np.asarray(dataset.cache.shard_ranges(dataset.split), dtype=np.int64).reshape(-1, 2)
        self.n, self.seed, self.window, self.epoch = len(dataset), seed, window, 0
        # a window of shards read whole, and one more (a batch that straddles two windows)
        dataset.whole_shards, dataset.hold_shards = True, max(dataset.hold_shards, window + 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        plan = EpochPlan(1, 0, self.seed, self.epoch, True, False, self.ranges, window=self.window)
        for rows in plan.rows_in_order(0):
            yield from rows.tolist()


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

        def __init__(self, *args, distill: DistillLoss, sampler: WindowSampler | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            if self.args.remove_unused_columns:
                raise StudentError("DistillTrainer needs TrainingArguments(remove_unused_columns=False): the "
                                   "batches carry the teacher's fields, which the model's forward does not take")
            self.distill, self.sampler = distill, sampler
            self._terms: dict[str, list[float]] = {}
            # the terms are means over each micro-batch's positions: the Trainer divides by the accumulation
            # steps (as `distill student` does), instead of leaving it to a model-side num_items_in_batch
            self.model_accepts_loss_kwargs = False

        def _get_train_sampler(self, train_dataset=None):
            """A `CacheDataset` is read in `distill student`'s order (its `sampler`, seeded by args.seed); rows given
            another way (TRL's row numbers) in `sampler`'s, when one is given."""
            train_dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.sampler is not None:
                return self.sampler
            if isinstance(train_dataset, CacheDataset):
                return train_dataset.sampler(self.args.seed)
            return super()._get_train_sampler(train_dataset)

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
