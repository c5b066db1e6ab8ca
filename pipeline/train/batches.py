"""The order of an epoch's batches, computed without reading data and without listing every row.

For epoch e with seed s: the shards are permuted; shard i of that order goes to DataLoader worker
i % num_workers; each worker's rows are its shards' rows one after the other, each shard's rows permuted
(the shard is the shuffle buffer) by a generator of its own (seeded by s, e and the shard), and cut into
batches; the loader takes one batch from each worker in turn, skipping exhausted workers. `EpochPlan`
answers "which rows are batch k" and "which batches does worker w read from k on" from per-worker
cumulative row counts (one integer per shard), so the start-up of a run and its memory do not grow with
the rows of the cache.

`batch_plan` is the order of runs started before this scheme (one generator drawn through in sequence):
a checkpoint that recorded it resumes with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PER_SHARD = "per-shard"  # the row-order scheme of EpochPlan; a state without one is `batch_plan`'s


@dataclass(frozen=True)
class Batch:
    """Rows of a batch, as index arrays; `worker` produces it, `index` is its place in the epoch."""

    index: int
    worker: int
    rows: np.ndarray  # (B,) row indices into the split


class EpochPlan:
    """One epoch's batches over shards given as row ranges (`ranges`) or as explicit row arrays (`subsets`: a
    subset of the rows by key). Sequence-like: `len(plan)`, `plan[k]`, `plan.worker_batches(w, start)`."""

    def __init__(self, batch_size: int, num_workers: int, seed: int, epoch: int, shuffle: bool, drop_last: bool,
                 ranges: np.ndarray | None = None, subsets: list[np.ndarray] | None = None):
        self.bs, self.nw = batch_size, max(num_workers, 1)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.ranges, self.subsets = ranges, subsets
        sizes = (ranges[:, 1] - ranges[:, 0]) if ranges is not None else np.asarray([len(s) for s in subsets])
        n = len(sizes)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        self.shards = [order[w::self.nw] for w in range(self.nw)]  # each worker's shards, in its order
        self.cum = [np.concatenate([[0], np.cumsum(sizes[s])]).astype(np.int64) for s in self.shards]
        totals = np.asarray([c[-1] for c in self.cum], dtype=np.int64)
        self.counts = totals // self.bs if drop_last else -(-totals // self.bs)  # batches per worker
        self.rounds = int(self.counts.max()) if n else 0
        self._len = int(self.counts.sum())

    def __len__(self) -> int:
        return self._len

    def _before(self, j: int) -> int:
        """Batches of the rounds before round j (round j holds the workers with more than j batches)."""
        return int(np.minimum(self.counts, j).sum())

    def _locate(self, k: int) -> tuple[int, int]:
        """(worker, its j-th batch) of global batch k."""
        lo, hi = 0, self.rounds
        while lo < hi:  # the round j with before(j) <= k < before(j + 1)
            mid = (lo + hi + 1) // 2
            if self._before(mid) <= k:
                lo = mid
            else:
                hi = mid - 1
        j = lo
        active = np.nonzero(self.counts > j)[0]
        return int(active[k - self._before(j)]), j

    def index_of(self, w: int, j: int) -> int:
        return self._before(j) + int((self.counts[:w] > j).sum())

    def __getitem__(self, k: int) -> Batch:
        if not 0 <= k < self._len:
            raise IndexError(k)
        w, j = self._locate(k)
        return Batch(k, w, self._rows(w, j))

    def worker_batches(self, w: int, start: int = 0):
        """Worker w's batches with index >= start, in order."""
        for j in range(int(self.counts[w])):
            k = self.index_of(w, j)
            if k >= start:
                yield Batch(k, w, self._rows(w, j))

    def _rows(self, w: int, j: int) -> np.ndarray:
        a, b = j * self.bs, min((j + 1) * self.bs, int(self.cum[w][-1]))
        cum, out = self.cum[w], []
        first = int(np.searchsorted(cum, a, side="right")) - 1
        for i in range(first, len(cum) - 1):
            if cum[i] >= b:
                break
            rows = self._shard_rows(int(self.shards[w][i]))
            out.append(rows[max(a - cum[i], 0): b - cum[i]])
        return np.concatenate(out) if len(out) > 1 else out[0]

    def _shard_rows(self, shard: int) -> np.ndarray:
        rows = (np.arange(self.ranges[shard, 0], self.ranges[shard, 1]) if self.ranges is not None
                else self.subsets[shard])
        if not self.shuffle:
            return rows
        return np.random.default_rng([self.seed, self.epoch, 2, shard]).permutation(rows)


def batch_plan(shards: list[np.ndarray], batch_size: int, num_workers: int, seed: int, epoch: int,
               shuffle: bool, drop_last: bool = False) -> list[Batch]:
    """The epoch's batches in the order a DataLoader with `num_workers` yields them (the scheme before
    per-shard generators: every row listed)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(shards)) if shuffle else np.arange(len(shards))
    nw = max(num_workers, 1)
    per_worker: list[list[np.ndarray]] = [[] for _ in range(nw)]
    for i, sh in enumerate(order):
        rows = shards[sh]
        per_worker[i % nw].append(rng.permutation(rows) if shuffle else rows)
    batches: list[list[np.ndarray]] = []
    for rows_list in per_worker:
        rows = np.concatenate(rows_list) if rows_list else np.zeros(0, dtype=np.int64)
        cut = [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
        if drop_last and cut and len(cut[-1]) < batch_size:
            cut.pop()
        batches.append(cut)
    out, k = [], 0
    for j in range(max((len(b) for b in batches), default=0)):  # round robin, exhausted workers skipped
        for w in range(nw):
            if j < len(batches[w]):
                out.append(Batch(k, w, batches[w][j]))
                k += 1
    return out
