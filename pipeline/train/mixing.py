"""A run's training sources (caches mixed by weight) as one endless, resumable stream of batches, split over
ranks. Each source is a `dataset.CacheBatches` of its train split."""

from __future__ import annotations

import numpy as np

from ..errors import CacheError
from .batch_order import PER_SHARD
from .dataset import CacheBatches, make_loader


def upgrade_state(state: dict | None) -> dict | None:
    """A stream state written by an earlier version, in today's keys."""
    if state is not None and "tasks" in state:  # checkpointed before the weighted caches were called sources
        state = {("sources" if k == "tasks" else k): v for k, v in state.items()}
    return state


class SourceMix:
    """Training batches from one or more caches (a run's sources) mixed by weight, endlessly, resumably, and
    split over ranks.

    The draws form one global sequence: the source of draw m is a function of (seed, m) alone, and
    each source walks its own epochs, the k-th draw of a source being batch k of its epoch's plan.
    Under DDP with W ranks, rank r trains on the draws m with m % W == r and reads only those
    batches; `skip_to(m)` moves past the other ranks' draws without reading them. So W ranks with
    a global batch of W x grad_accum micro-batches see exactly the batches one process sees with
    grad_accum x W. `state` (draws so far, each source's epoch and next batch) is all a checkpoint
    needs; it is the same on every rank after `skip_to`.
    """

    BLOCK = 4096  # source choices are drawn in blocks of this many draws

    def __init__(self, sources: dict[str, tuple[CacheBatches, float]], seed: int, state: dict | None = None,
                 rank: int = 0, world: int = 1):
        self.sources = sources
        self.names = list(sources)
        w = np.asarray([sources[n][1] for n in self.names], dtype=np.float64)
        self.p = w / w.sum()
        self.seed, self.rank, self.world = seed, rank, world
        first = next((ds for ds, _ in sources.values() if ds is not None), None)
        self.state = state or {"draws": 0, "sources": {n: {"epoch": 0, "batch": 0} for n in self.names},
                               "scheme": "block", "rows": first.scheme if first is not None else PER_SHARD}
        for ds, _ in sources.values():  # a state from before per-shard row orders continues that run's order
            if ds is not None:
                ds.scheme = self.state.get("rows")
                ds._plans.clear()
        # a state from before block draws continues that run's sequence: one generator per draw
        self.per_draw = self.state.get("scheme") != "block"
        self._iters: dict[str, object] = {}
        self._blocks: dict[int, np.ndarray] = {}
        self._sizes: dict[tuple[str, int], int] = {}

    def _block(self, b: int) -> np.ndarray:
        if b not in self._blocks:
            if len(self._blocks) > 8:
                self._blocks.clear()
            if self.per_draw:
                self._blocks[b] = np.asarray([np.random.default_rng([self.seed, 1, m]).choice(len(self.names), p=self.p)
                                              for m in range(b * self.BLOCK, (b + 1) * self.BLOCK)])
            else:
                rng = np.random.default_rng([self.seed, 1, b])
                self._blocks[b] = rng.choice(len(self.names), size=self.BLOCK, p=self.p)
        return self._blocks[b]

    def choose(self, draw: int) -> str:
        if len(self.names) == 1:
            return self.names[0]
        return self.names[int(self._block(draw // self.BLOCK)[draw % self.BLOCK])]

    def epoch_batches(self, name: str, epoch: int) -> int:
        """Batches in `name`'s plan for `epoch` (computed from the plan, nothing read)."""
        if (name, epoch) not in self._sizes:
            self._sizes[(name, epoch)] = len(self.sources[name][0].plan(epoch))
        return self._sizes[(name, epoch)]

    def _mine(self, name: str, draw: int, batch: int, n: int):
        """The batches of `name`'s epoch from `batch` (drawn at `draw`) on that fall to this rank."""
        if len(self.names) == 1:  # every draw is this source's: batch k is draw draw + k - batch
            return range(batch + (self.rank - draw) % self.world, n, self.world)
        t = self.names.index(name)
        out, k, m = [], batch, draw
        while k < n:  # block by block: the draws of this source are its batches k, k + 1, ... in order
            b = m // self.BLOCK
            hits = (np.nonzero(self._block(b)[m % self.BLOCK:] == t)[0] + m)[: n - k]
            out.append(k + np.nonzero(hits % self.world == self.rank)[0])
            k += len(hits)
            m = (b + 1) * self.BLOCK
        return np.concatenate(out).tolist() if out else []

    def _start(self, name: str):
        ds = self.sources[name][0]
        pos = self.state["sources"][name]
        ds.epoch = pos["epoch"]
        if self.world == 1:
            ds.start, ds.indices = pos["batch"], None
        else:
            ds.start, ds.indices = 0, self._mine(name, self.state["draws"], pos["batch"],
                                                 self.epoch_batches(name, pos["epoch"]))
        self._iters[name] = iter(make_loader(ds))

    def _advance(self) -> tuple[str, bool]:
        """The source of the next draw, rolling its epoch over when that epoch is spent; whether this rank reads it."""
        name = self.choose(self.state["draws"])
        pos = self.state["sources"][name]
        if pos["batch"] >= self.epoch_batches(name, pos["epoch"]):  # that source's epoch is over: the next, reshuffled
            pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0
            self._iters.pop(name, None)
            if self.epoch_batches(name, pos["epoch"]) == 0:
                raise CacheError(f"source {name!r}: its train split yields no batch")
        return name, self.state["draws"] % self.world == self.rank

    def skip_to(self, draws: int) -> None:
        """Move past draws (other ranks') up to `draws` without reading them."""
        while self.state["draws"] < draws:
            name, mine = self._advance()
            if mine:
                raise RuntimeError(f"rank {self.rank} would skip its own draw {self.state['draws']}")
            self.state["sources"][name]["batch"] += 1
            self.state["draws"] += 1

    def __iter__(self):
        while True:
            name, mine = self._advance()
            if mine:
                if name not in self._iters:
                    self._start(name)
                batch = next(self._iters[name])
                expected = self.state["sources"][name]["batch"]
                if batch["batch_index"] != expected:
                    raise RuntimeError(f"source {name!r}: read batch {batch['batch_index']}, expected {expected}")
            self.state["sources"][name]["batch"] += 1
            self.state["draws"] += 1
            if mine:
                yield name, batch
