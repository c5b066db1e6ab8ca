"""One split of a finished cache as a dataset of training batches: only the needed fields, deterministic,
resumable, and with memory and start-up that do not grow with the cache.

The order of an epoch's batches is `batch_order.EpochPlan` (computed from one integer per shard, nothing
read); the rows of a batch are read by `split_reader.SplitReader` (a row group of rows.parquet, and the Zarr
chunks holding those rows). Several caches mixed by weight are `mixing.SourceMix`. A run resumes at batch b of epoch e by starting the plan there, not by reading what
came before. Rows can be restricted to a set of content keys.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import distributed
from ..errors import CacheError, StudentError
from ..format.reader import Cache
from ..config import DEFAULT_SHUFFLE_WINDOW
from .batch_order import Batch, EpochPlan, batch_plan, rows_scheme, window_of
from .split_reader import SplitReader

__all__ = ["Batch", "CacheBatches", "batch_plan", "make_loader"]

# optional rows.parquet columns, in every batch (labels: a classifier's gold class per row, or per position)
ROW_FIELDS = {"loss_mask": np.bool_, "position_ids": np.int64, "labels": np.int64}
FLOAT_FIELDS = {"topk_logprobs", "logsumexp", "target_logprob", "logsumexp_tempered", "attentions", "sample_logprobs",
                "hidden_scale", "class_logprobs", "class_logsumexp", "class_logsumexp_tempered"}
# to float32 here; hidden_states and final_hidden are decoded on the device
WIDENED = ("topk_ids", "sample_ids", "sample_counts")  # stored as uint16 for vocabularies <= 65,536: read as int32


def row_dtypes(manifest) -> dict:
    """{rows.parquet column: the dtype a batch holds it in} of the columns a batch carries."""
    return {"input_ids": np.int64, "length": np.int64} | {
        name: dtype for name, dtype in ROW_FIELDS.items() if name in manifest.fields}


def widened(field: str, arr: np.ndarray) -> np.ndarray:
    """A dense field as batches hold it: ids (and counts) stored as uint16 widened to int32."""
    return arr.astype(np.int32) if arr.dtype == np.uint16 and field in WIDENED else arr


class CacheBatches(torch.utils.data.IterableDataset):
    """Batches of one split: dicts of CPU tensors holding `input_ids`, `length`, `row`, `fields` and,
    when the cache has them, `loss_mask` (B, L) bool and `position_ids` (B, L).

    Set `epoch` and `start` (the first batch index to yield) before iterating; the same values
    give the same batches, with any number of workers as long as it is the same number. Or set
    `indices`, the plan's batches to yield in that order (one rank's share of an epoch under DDP):
    the other batches are never read, and the j-th listed batch is read by worker j % num_workers.
    `scheme`: the row order (`batch_order.rows_scheme(window)`: the rows of `window` shards shuffled together, "per-shard"
    for one; None: the order of runs checkpointed before per-shard generators). Memory holds the window's shards
    of the fields read (and of the rows' columns), per worker.
    """

    def __init__(self, root, split: str, fields: list[str], batch_size: int, seed: int = 0, shuffle: bool = True,
                 keys: list[str] | None = None, num_workers: int = 0, drop_last: bool = False,
                 storage_options: dict | None = None, trim: bool = False,
                 scheme: str | None = rows_scheme(DEFAULT_SHUFFLE_WINDOW)):
        self.cache = root if isinstance(root, Cache) else Cache(root, storage_options=storage_options)
        root = self.cache.root
        if split not in self.cache.splits:
            raise CacheError(f"{root}: no split {split!r} (has: {', '.join(self.cache.splits)})")
        missing = [f for f in fields if f not in self.cache.dense_fields]
        if missing:
            raise CacheError(f"{root}: the cache has no field {', '.join(missing)} "
                             f"(captured: {', '.join(self.cache.dense_fields)})")
        self.root, self.split, self.fields = root, split, list(fields)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.num_workers, self.drop_last = num_workers, drop_last
        # trim: cut every batch's position axes to its longest row (one example per padded row: classification)
        self.position_axes = {name: list(f.position_axes) for name, f in self.cache.manifest.fields.items()} \
            if trim else None
        self.epoch, self.start = 0, 0
        self.indices = None  # a sequence of batch indices (one rank's share), or None
        self.scheme = scheme
        n = self.cache.manifest.splits[split].rows
        self.ranges = np.asarray(self.cache.shard_ranges(split), dtype=np.int64).reshape(-1, 2)  # across parts
        self.subsets: list[np.ndarray] | None = None
        if keys is not None:
            all_keys = self.cache.rows(split).column("key").to_pylist()
            where = {k: i for i, k in enumerate(all_keys)}
            unknown = [k for k in keys if k not in where]
            if unknown:
                raise CacheError(f"{len(unknown)} requested keys are not in {root}/{split} (first: {unknown[0]})")
            keep = np.zeros(n, dtype=bool)
            keep[[where[k] for k in keys]] = True
            self.subsets = [s for s in (np.arange(a, b)[keep[a:b]] for a, b in self.ranges) if len(s)]
        self._plans: dict[int, object] = {}

    def plan(self, epoch: int | None = None):
        """The epoch's batches: an `EpochPlan` (a list of `Batch` under the scheme before it)."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._plans:
            if len(self._plans) > 2:
                self._plans.clear()
            if self.scheme is not None:
                self._plans[epoch] = EpochPlan(self.batch_size, self.num_workers, self.seed, epoch, self.shuffle,
                                               self.drop_last, None if self.subsets is not None else self.ranges,
                                               self.subsets, window_of(self.scheme))
            else:
                shards = self.subsets if self.subsets is not None else [np.arange(a, b) for a, b in self.ranges]
                self._plans[epoch] = batch_plan(shards, self.batch_size, self.num_workers, self.seed, epoch,
                                                self.shuffle, self.drop_last)
        return self._plans[epoch]

    def __len__(self) -> int:
        return len(self.plan())

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 0)
        if n_workers != self.num_workers:
            raise RuntimeError(f"CacheBatches was planned for {self.num_workers} workers but runs in {n_workers}")
        plan = self.plan()
        if self.indices is not None:  # an explicit list: its j-th batch is read by worker j % workers, in order
            nw = max(n_workers, 1)
            mine = (plan[i] for j, i in enumerate(self.indices) if j % nw == worker)
        else:
            if n_workers and self.start < len(plan):
                # the DataLoader asks worker 0 first: rotate so that it serves the plan's batch `start`
                worker = (worker + plan[self.start].worker) % n_workers
            mine = plan.worker_batches(worker, self.start) if isinstance(plan, EpochPlan) else \
                (b for b in plan if b.worker == worker and b.index >= self.start)
        window = window_of(self.scheme) if self.scheme is not None and self.shuffle else 1
        # see split_reader.py; a batch no larger than a window straddles two windows at most (a larger one reads more)
        reader = SplitReader(self.cache, self.split, whole_shards=self.indices is None, hold_shards=window + 1)
        row_fields = row_dtypes(self.cache.manifest)
        for b in mine:
            cols = reader.columns(b.rows, row_fields)
            out = {"input_ids": torch.from_numpy(cols.pop("input_ids")), "length": torch.from_numpy(cols.pop("length")),
                   "row": torch.from_numpy(b.rows.astype(np.int64)), "batch_index": b.index,
                   **{name: torch.from_numpy(a) for name, a in cols.items()}}
            for f, arr in reader.dense(b.rows, self.fields).items():
                t = torch.from_numpy(np.ascontiguousarray(widened(f, arr)))
                out[f] = t.float() if f in FLOAT_FIELDS else t
            yield out if self.position_axes is None else self._trimmed(out)

    def _trimmed(self, batch: dict) -> dict:
        """The batch with its padding past the longest row cut off, on every position axis of every field."""
        n = int(batch["length"].max())
        key = {"length": "length", "row": None, "batch_index": None}
        for name, value in batch.items():
            axes = self.position_axes.get(key.get(name, name)) or []
            if axes and isinstance(value, torch.Tensor) and value.shape[axes[0]] > n:
                for a in axes:
                    value = value.narrow(a, 0, n)
                batch[name] = value.contiguous()
        return batch


def window_bytes(cache: Cache, split: str, fields: list[str], window: int) -> int:
    """Bytes one reader (a DataLoader worker, or a rank without workers) holds for a shuffle window of `window`
    shards: window + 1 shards' rows of the dense fields it reads (float fields as float32) and of the row columns,
    uncompressed. An estimate, for `check_window`."""
    m = cache.manifest
    held = {name: np.dtype(dtype) for name, dtype in row_dtypes(m).items()}
    for name in fields:  # as batches hold them: floats as float32, uint16 ids as int32
        stored = np.dtype(m.fields[name].dtype)
        held[name] = np.dtype(np.float32) if name in FLOAT_FIELDS else widened(name, np.zeros(0, stored)).dtype
    per_row = sum(int(np.prod(m.fields[name].shape[split][1:], dtype=np.int64)) * dtype.itemsize
                  for name, dtype in held.items())
    return per_row * m.capture.rows_per_shard * (window + 1)


def check_window(datasets: list[CacheBatches], window: int, workers: int, log) -> None:
    """Say what the readers of `datasets` (a run's training sources) hold for their shuffle windows on this host, and refuse windows
    beyond half of its available memory, naming the settings to change."""
    readers = max(workers, 1) * distributed.ranks_on_this_host()
    need = readers * sum(window_bytes(ds.cache, ds.split, ds.fields, window_of(ds.scheme) if ds.scheme else 1)
                         for ds in datasets)
    log(f"reader: shuffle window of {window} shards, about {need / 2**20:,.0f} MiB held by {readers} reader(s) on "
        "this host")
    free = distributed.host_memory_available()
    if free is not None and need > free / 2:
        raise StudentError(f"shuffle_window = {window} holds about {need / 2**30:,.1f} GiB of cache rows ((window + 1) "
                           f"shards of the fields read, per reader: {readers} on this host), more than half of the "
                           f"{free / 2**30:,.1f} GiB this host has available: lower shuffle_window or num_workers")


def make_loader(ds: CacheBatches) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=ds.num_workers,
                                       persistent_workers=False, prefetch_factor=4 if ds.num_workers else None)
