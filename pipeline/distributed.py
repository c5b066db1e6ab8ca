"""torch.distributed for both stages: one place that knows whether this process is one rank of many.

Under `torchrun` (or `accelerate launch`, which wraps it) the environment carries RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address; `setup()` joins the process group once per process, with
gloo for CPU tensors and NCCL for CUDA tensors when both exist. Without those variables every
helper here is the trivial one-process version, so the stages call them unconditionally.

Errors: a settings error found on one rank must stop every rank, not leave the others waiting in
a collective. `on_main` runs a function on rank 0 and hands its result, or its exception, to all.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launch_world() -> int:
    """The ranks of this launch (torchrun's WORLD_SIZE; 1 without torchrun), known before the process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher speaking its protocol)."""
    return launch_world() > 1


def setup() -> Ranks:
    """Join the process group when launched as one of several ranks; a no-op otherwise."""
    if not launched():
        return Ranks()
    if not dist.is_initialized():
        from datetime import timedelta

        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        # rank 0 may prepare a large output (rows, uploads) while the others wait in a broadcast
        minutes = float(os.environ.get("DISTILL_COLLECTIVE_TIMEOUT_MINUTES", "120"))
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=minutes))
    return ranks()


def ranks() -> Ranks:
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(setting: str) -> torch.device:
    """'auto' -> this rank's GPU (cuda:LOCAL_RANK) when there is one, else the CPU; 'cuda' -> this
    rank's GPU; an explicit 'cuda:N' or 'cpu' as given."""
    r = ranks()
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(setting)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {setting!r} asked for, but torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", r.local_rank % torch.cuda.device_count())
        elif r.active:
            raise ValueError(f"device {setting!r} names one GPU for every rank of a torchrun launch; use 'cuda' "
                             "or 'auto' (each rank takes cuda:LOCAL_RANK)")
        torch.cuda.set_device(dev)
    return dev


def host_memory_available() -> int | None:
    """Bytes of this host's available memory (MemAvailable: free plus what the kernel can reclaim, such as the
    page cache); None: unknown (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def ranks_on_this_host() -> int:
    """Processes of this launch on this host (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def on_main(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only; every rank returns its result or raises its exception."""
    r = ranks()
    if not r.active:
        return fn()
    box: list[Any] = [None]
    if r.main:
        try:
            box[0] = ("ok", fn())
        except BaseException as e:  # noqa: BLE001  handed to every rank, re-raised everywhere
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def all_agree(fn: Callable[[], Any]) -> Any:
    """Run `fn` on every rank; if any rank raises, every rank raises the first failing rank's error."""
    r = ranks()
    if not r.active:
        return fn()
    try:
        mine = ("ok", fn())
    except Exception as e:  # noqa: BLE001
        mine = ("error", e)
    every: list[Any] = [None] * r.world
    dist.all_gather_object(every, (mine[0], mine[1] if mine[0] == "error" else None))
    for kind, err in every:
        if kind == "error":
            if mine[0] == "error":
                raise mine[1]
            raise err
    return mine[1]


def all_gather(obj: Any) -> list[Any]:
    r = ranks()
    if not r.active:
        return [obj]
    out: list[Any] = [None] * r.world
    dist.all_gather_object(out, obj)
    return out


def split_work(items: Iterable[Any], work: Callable[[Any], Any]):
    """Yield work(item) for each item in order, each computed once: under torchrun rank r computes items r, r + W,
    ... and every rank receives every result (in rounds of W items), so each does 1/W of the work and all see
    the same sequence. Every rank iterates the same `items` (reading them is cheap; the work is not). An
    exception on any rank is raised on every rank. Every rank must consume the same number of results (they
    do: they see the same sequence)."""
    r = ranks()
    if not r.active:
        for item in items:
            yield work(item)
        return
    it = iter(items)
    while True:
        block = list(islice(it, r.world))
        if not block:
            return
        try:
            mine = work(block[r.rank]) if r.rank < len(block) else None
        except Exception as e:  # noqa: BLE001  raised below on every rank, not here alone
            mine = _Failed(e)
        results = all_gather(mine)
        for res in results:
            if isinstance(res, _Failed):
                raise res.error
        yield from results[: len(block)]


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def sum_(t: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `t` over ranks (in place, returned)."""
    if ranks().active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def store():
    """The launcher's key-value store (torchrun's TCPStore), for counters that need no collective."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def barrier() -> None:
    """Wait for every rank (nothing on one process)."""
    if ranks().active:
        dist.barrier()


@contextmanager
def maybe_no_sync(module, skip: bool):
    """No gradient reduction when `skip` (a micro-batch that is not the last of its step): DDP's no_sync(), or an
    FSDP2 module's set_requires_gradient_sync(False); else nothing."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2: gradients accumulate unsharded until the last
        module.set_requires_gradient_sync(not skip)
        yield
    elif skip and hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        yield
