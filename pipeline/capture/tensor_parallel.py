"""A capture's teacher under tensor parallelism (`teacher.tp_size`): the ranks of a torchrun launch form a
data-parallel x tensor-parallel mesh, groups of `tp_size` consecutive ranks (one node's GPUs), each group loading
one teacher through transformers' tensor-parallel plan (`DistributedConfig(tp_plan="auto", tp_size,
dp_replicate_size=groups)`: its layers' matrices split over the group's devices, their outputs all-reduced, the LM
head's logits gathered; the groups hold replicas, each running its own batches). Every rank of a group runs the
same batches in lockstep; the group computes its data-parallel share of the shards and its first rank writes them. The cache does not depend on the
layout (the targets are the model's, up to summation order); the manifest records it beside the timing.

Checked before any weight loads (`check_tensor_parallel`): tp_size divides the launch and the model's attention
heads, key-value heads and vocabulary; the model's family has a tensor-parallel plan; no device_map beside it;
a causal-LM teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import distributed
from ..config import TeacherCacheConfig
from ..errors import CaptureError


@dataclass(frozen=True)
class Layout:
    """Where this rank stands in the capture's mesh."""

    tp: int = 1  # ranks per teacher
    dp: int = 1  # teachers (groups)
    dp_rank: int = 0  # this rank's group
    tp_rank: int = 0  # this rank within its group
    mesh: object = None  # the group's DeviceMesh (tp > 1)

    @property
    def writes(self) -> bool:
        """Whether this rank writes its group's shards (the group's first rank)."""
        return self.tp_rank == 0

    @property
    def leads(self) -> bool:
        """Whether this rank's group is the first (which runs the checks that rank 0 reports)."""
        return self.dp_rank == 0

    def share(self, todo: list) -> list:
        """This rank's group's share of the shards `todo`."""
        return todo[self.dp_rank::self.dp]

    def record(self) -> dict:
        return {"ranks": self.tp * self.dp, "tensor_parallel": self.tp}


def check_tensor_parallel(cfg: TeacherCacheConfig, model_config, spec) -> None:
    """Refuse a tp_size the launch or the model cannot take, naming the numbers (see the module docstring)."""
    t, tp = cfg.teacher, cfg.teacher.tp_size
    if tp == 1:
        return
    if t.device_map is not None:
        raise CaptureError(f"teacher.tp_size={tp} splits the teacher over a group of ranks, teacher.device_map over "
                           "one rank's devices: give one of them")
    if t.task != "causal-lm":
        raise CaptureError(f"teacher.tp_size={tp}: tensor-parallel capture is for causal-LM teachers; a {t.task} "
                           "teacher runs data-parallel (tp_size = 1) or over a device_map")
    world = distributed.launch_world()
    if world % tp:
        raise CaptureError(f"teacher.tp_size={tp} does not divide the launch's {world} rank{'s' * (world > 1)} "
                           "(torchrun --nproc_per_node x nodes): the ranks form groups of tp_size")
    plan = getattr(model_config, "base_model_tp_plan", None)
    if not plan:
        raise CaptureError(f"teacher.tp_size={tp}: transformers has no tensor-parallel plan for the "
                           f"{model_config.model_type} family (its config's base_model_tp_plan is empty); spread "
                           "it with teacher.device_map instead, one rank per node")
    kv = getattr(model_config, "num_key_value_heads", None) or spec.num_heads
    for what, n in (("attention heads", spec.num_heads), ("key-value heads", kv), ("vocabulary", spec.vocab_size)):
        if n % tp:
            raise CaptureError(f"teacher.tp_size={tp} does not divide the teacher's {n:,} {what}: each rank of a "
                               f"group holds an equal slice of them; pick a tp_size that divides {n:,}")


def layout(cfg: TeacherCacheConfig, device) -> Layout:
    """This rank's place in the mesh (after `distributed.setup`); one group of one rank without tensor parallelism."""
    r, tp = distributed.ranks(), cfg.teacher.tp_size
    if tp == 1:
        return Layout(1, r.world, r.rank, 0)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (r.world // tp, tp), mesh_dim_names=("dp", "tp"))
    return Layout(tp, r.world // tp, r.rank // tp, r.rank % tp, mesh["tp"])


def head_gatherer(lay: Layout):
    """A function (B, H_local, Q, K) -> (B, H, Q, K): a layer's attention maps of the heads this rank computes,
    joined with its group's (each rank holds a contiguous block of heads, in rank order); None without tensor
    parallelism."""
    if lay.tp == 1:
        return None
    import torch
    import torch.distributed as dist

    group = lay.mesh.get_group()

    def gather(maps: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(maps) for _ in range(lay.tp)]
        dist.all_gather(parts, maps.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    return gather

