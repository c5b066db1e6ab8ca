"""The shard loop of a capture: this rank's shards computed in order, each handed to a pool of writer threads
(`writer_threads`: several shards in flight, at most one per writer) while the next ones are computed, and
committed when its files are on storage (`run_shards`). Batches never cross shards, so a resumed capture
writes the bytes an uninterrupted one would. Each shard's commit record carries its statistics
(`shard_stats`: tokens, seconds, the top-K mass or a classifier's agreement with the gold labels), which the
writer tallies into the manifest. One progress bar counts every rank's tokens (`Progress`).
"""

from __future__ import annotations

import os
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .. import distributed
from ..errors import CaptureError, StorageError
from ..format.layout import IGNORE_INDEX
from ..format.writer import CacheWriter
from .rows import Prepared
from .targets import TeacherTargets


def writer_threads(device, setting: int | None = None) -> int:
    """How many threads write shards beside the teacher's loop (0: each shard is written in line). `setting`
    (capture.writers) when set; else, with a GPU, up to 4, leaving a core per rank to the loop that feeds it;
    on a CPU, one when torch leaves a core idle, else none: a writer competing with torch's OpenMP threads
    stalls every parallel region, which costs far more than writing in line (measured: see the capture
    figures in the docs)."""
    import torch

    if setting is not None:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if device.type == "cuda":
        return max(1, min(4, per_rank - 1))
    return 1 if per_rank > torch.get_num_threads() else 0


class Progress:
    """One progress bar for the whole capture, on rank 0: tokens computed by every rank, counted in
    the launcher's key-value store (no collective, so ranks never wait on each other while working);
    its rate is the job's tokens/s, summed over ranks."""

    runs = 0  # captures run in this process group so far: each counts under its own keys

    def __init__(self, total: int, enabled: bool, counting: bool = True):
        from tqdm.auto import tqdm

        self.counting = counting  # False: a rank whose tensor-parallel group's tokens another rank counts
        Progress.runs += 1
        self.KEY, self.DONE = f"distill/capture/{Progress.runs}/tokens", f"distill/capture/{Progress.runs}/done"
        self.ranks = distributed.ranks()
        self.store = distributed.store() if self.ranks.active else None
        self.bar = tqdm(total=total, unit="tok", unit_scale=True, desc="capture", disable=not enabled, smoothing=0.1)

    def update(self, n: int) -> None:
        n = n if self.counting else 0
        if self.store is None:
            self.bar.update(n)
            return
        done = self.store.add(self.KEY, n)
        if self.ranks.main:
            self.bar.update(done - self.bar.n)

    def wait_for_ranks(self, poll: float = 0.5) -> None:
        """Until every rank has committed its shards (the bar moves on while others work)."""
        if self.store is None:
            return
        self.store.add(self.DONE, 1)
        while self.store.add(self.DONE, 0) < self.ranks.world:
            self.update(0)
            time.sleep(poll)
        self.update(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def run_shards(computer, prepared: Prepared, todo, writer: CacheWriter, batch_size: int, bar: Progress,
               writers: int, write: bool = True) -> None:
    """Compute and commit the shards `todo`. With `writers` threads, each computed shard is handed to the pool
    (its device-to-host copies still under way) and the loop goes on with the next; at most `writers` shards are
    in flight, so host memory holds at most writers + 1 shards. The seconds the loop waits for a free writer are
    recorded with the next shard it hands over (the manifest's timing.writer_wait_seconds). With 0, each shard is
    written in line. `write` False: a tensor-parallel rank that computes along with its group's writer (every
    forward pass is collective) and writes nothing."""
    in_flight: deque[Future] = deque()
    wait = 0.0
    with ThreadPoolExecutor(max_workers=max(1, writers), thread_name_prefix="cache-writer") as pool:
        try:
            for split, index, a, b in todo:
                t0 = time.perf_counter()
                rows, batches = shard_batches(computer, prepared, split, a, b, writer.parts[split]["row_start"],
                                              batch_size, bar)
                seconds = time.perf_counter() - t0
                if not write:
                    for part in batches:
                        part.result()
                    continue
                if not writers:
                    write_shard(writer, split, index, rows, batches, seconds, 0.0)
                    continue
                t1 = time.perf_counter()
                while len(in_flight) >= writers or (in_flight and in_flight[0].done()):
                    in_flight.popleft().result()  # surfaces write errors
                wait += time.perf_counter() - t1
                in_flight.append(pool.submit(write_shard, writer, split, index, rows, batches, seconds + wait, wait))
                wait = 0.0
            while in_flight:
                in_flight.popleft().result()
        except (OSError, StorageError) as e:
            raise CaptureError(f"writing the cache failed ({getattr(e, 'strerror', None) or e}); committed shards are "
                               "kept: fix the cause and rerun the same command to resume") from e
        finally:
            for f in in_flight:
                f.cancel()


def shard_batches(computer, prepared: Prepared, split: str, a: int, b: int, row_start: int, batch_size: int,
                  bar: Progress) -> tuple:
    """The rows a..b of a split and the teacher's targets for them, batch by batch (batches never cross shards),
    each on its way to the host (`HostBatch`)."""
    rows = prepared.splits[split].read(a, b)
    parts = []
    for s in range(0, b - a, batch_size):
        e = min(s + batch_size, b - a)
        pos = None if rows.position_ids is None else rows.position_ids[s:e]
        seed = [zlib.crc32(split.encode()), row_start + a + s]  # the draws' seed
        parts.append(computer.submit(rows.input_ids[s:e], rows.lengths[s:e], pos, seed))
        bar.update(int(rows.lengths[s:e].sum()))
    return rows, parts


def write_shard(writer: CacheWriter, split: str, index: int, rows, batches: list, seconds: float, wait: float) -> dict:
    """A computed shard on the host (waiting for its copies), its statistics, written and committed."""
    targets = TeacherTargets.concat([p.result() for p in batches])
    stats = shard_stats(targets, rows.lengths, seconds, rows.labels) | {"writer_wait_seconds": wait}
    return writer.write_shard(split, index, targets, stats)


def shard_stats(t: TeacherTargets, lengths: np.ndarray, seconds: float, labels: np.ndarray | None = None) -> dict:
    if t.class_logprobs is not None:  # a classifier: how often it agrees with the gold labels
        pred = t.class_logprobs.argmax(-1)
        known = labels != IGNORE_INDEX
        return {"tokens": int(lengths.sum()), "seconds": seconds, "labelled": int(known.sum()),
                "teacher_correct": int((pred == labels)[known].sum())}
    L = t.logsumexp.shape[1]
    valid = np.arange(L)[None, :] < lengths[:, None]
    mass = np.exp(t.topk_logprobs.astype(np.float32)).sum(-1, dtype=np.float64)  # (B, L)
    out = {"tokens": int(lengths.sum()), "seconds": seconds, "topk_mass_sum": float(mass[valid].sum())}
    if t.logprob_kl is not None:  # bounded-error log-probs: what the rounding cost, per position
        kl = t.logprob_kl[valid]
        out |= {"logprob_kl_sum": float(kl.sum(dtype=np.float64)), "logprob_kl_max": float(kl.max(initial=0.0))}
    return out
