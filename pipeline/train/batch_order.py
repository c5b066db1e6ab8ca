"""The order of an epoch's batches, computed without reading data and without listing every row.

For epoch e with seed s: the shards are permuted; shard i of that order goes to DataLoader worker
i % num_workers; each worker's shards are taken `window` at a time (a shuffle window: shards far apart in the
cache, since the order is a permutation), the rows of a window's shards permuted together by a generator of
its own (seeded by s, e, the worker and the window), and those rows cut into batches, window after window; the
loader takes one batch from each worker in turn, skipping exhausted workers. A batch is so a sample of the
window's rows, not of one shard's: a cache whose rows arrive grouped (files concatenated by source, a dataset
sorted by label, a capture without shuffle_seed) still gives mixed batches once a window spans several groups.
The reader holds a window's shards of the fields it reads, so memory is bounded by the window, not the cache.
`window` 1 is a shard on its own (the "per-shard" scheme, its generator unchanged, so runs checkpointed under it
resume exactly).

`EpochPlan` answers "which rows are batch k" and "which batches does worker w read from k on" from per-worker
cumulative row counts (one integer per window), so the start-up of a run and its memory do not grow with the
rows of the cache.

`batch_plan` is the order of runs started before per-shard generators (one generator drawn through in
sequence): a checkpoint that recorded it resumes with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PER_SHARD = "per-shard"  # the row-order scheme of EpochPlan with a window of one shard; a state without one is
#                          `batch_plan`'s


def rows_scheme(window: int) -> str:
    """The name a run's state records for its row order: "per-shard", or "window-N" (N shards shuffled together)."""
    return PER_SHARD if window == 1 else f"window-{window}"


def window_of(scheme: str) -> int:
    """The shuffle window (shards) of a `rows_scheme` name."""
    if scheme == PER_SHARD:
        return 1
    if scheme.startswith("window-") and scheme[len("window-"):].isdigit():
        return int(scheme[len("window-"):])
    raise ValueError(f"unknown row-order scheme {scheme!r}")


@dataclass(frozen=True)
class Batch:
    """Rows of a batch, as index arrays; `worker` produces it, `index` is its place in the epoch."""

    index: int
    worker: int
    rows: np.ndarray  # (B,) row indices into the split


class EpochPlan:
    """One epoch's batches over shards given as row ranges (`ranges`) or as explicit row arrays (`subsets`: a
    subset of the rows by key), `window` shards shuffled together. Sequence-like: `len(plan)`, `plan[k]`,
    `plan.worker_batches(w, start)`; `windows[w]` lists worker w's windows (arrays of shard numbers)."""

    WINDOWS_KEPT = 4  # permuted windows kept (a batch no larger than a window's rows straddles two at most)

    def __init__(self, batch_size: int, num_workers: int, seed: int, epoch: int, shuffle: bool, drop_last: bool,
                 ranges: np.ndarray | None = None, subsets: list[np.ndarray] | None = None, window: int = 1):
        self.bs, self.nw = batch_size, max(num_workers, 1)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.window = window if shuffle else 1
        self.ranges, self.subsets = ranges, subsets
        sizes = (ranges[:, 1] - ranges[:, 0]) if ranges is not None else np.asarray([len(s) for s in subsets])
        n = len(sizes)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        shards = [order[w::self.nw] for w in range(self.nw)]  # each worker's shards, in its order
        self.windows = [[s[i:i + self.window] for i in range(0, len(s), self.window)] for s in shards]
        self.cum = [np.concatenate([[0], np.cumsum([sizes[win].sum() for win in wins])]).astype(np.int64)
                    for wins in self.windows]
        totals = np.asarray([c[-1] for c in self.cum], dtype=np.int64)
        self.counts = totals // self.bs if drop_last else -(-totals // self.bs)  # batches per worker
        self.rounds = int(self.counts.max()) if n else 0
        self._len = int(self.counts.sum())
        self._permuted: dict[tuple[int, int], np.ndarray] = {}

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
            rows = self._window_rows(w, i)
            out.append(rows[max(a - cum[i], 0): b - cum[i]])
        return np.concatenate(out) if len(out) > 1 else out[0]

    def rows_in_order(self, w: int = 0):
        """Worker w's rows in the order its batches take them, a window at a time (arrays)."""
        for i in range(len(self.windows[w])):
            yield self._window_rows(w, i)

    def _shard_rows(self, shard: int) -> np.ndarray:
        return (np.arange(self.ranges[shard, 0], self.ranges[shard, 1]) if self.ranges is not None
                else self.subsets[shard])

    def _window_rows(self, w: int, i: int) -> np.ndarray:
        """The rows of worker w's window i, in the order batches take them."""
        key = (w, i)
        if key not in self._permuted:
            shards = self.windows[w][i]
            if not self.shuffle:
                rows = self._shard_rows(int(shards[0]))
            elif self.window == 1:  # the per-shard scheme: a generator per shard
                rows = np.random.default_rng([self.seed, self.epoch, 2, int(shards[0])]).permutation(
                    self._shard_rows(int(shards[0])))
            else:
                rows = np.random.default_rng([self.seed, self.epoch, 3, w, i]).permutation(
                    np.concatenate([self._shard_rows(int(s)) for s in shards]))
            if len(self._permuted) >= self.WINDOWS_KEPT:
                self._permuted.pop(next(iter(self._permuted)))
            self._permuted[key] = rows
        return self._permuted[key]


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
