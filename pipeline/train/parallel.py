"""How a student is spread over the ranks of a torchrun launch, applied from outside the model (as torchtitan
does): the model code stays plain, and `parallelize` returns what the recipe trains through.

- `ddp`: each rank holds the whole student; DistributedDataParallel averages the gradients.
- `fsdp`: torch's FSDP2 (`fully_shard` over a one-dimensional `DeviceMesh`): each decoder layer is its own unit
  and the student's module (embeddings, final norm, LM head, hidden-state projections) the root unit, so
  parameters, gradients and AdamW state are divided over the ranks and a layer's parameters are gathered only
  while it runs. The root's parameters stay gathered from its forward pass to its backward (FSDP2 does not
  reshard the root after forward), which is what lets the logit terms apply the head a block of positions at a
  time. Under bf16 autocast the gathered parameters are bfloat16 and gradients are reduced in float32
  (`MixedPrecisionPolicy`).

Under `fsdp` a student's state is saved with `torch.distributed.checkpoint` (every rank writes its shards; a
checkpoint reloads on any number of ranks), and its model is written as a plain Hugging Face folder from the
shards (`HuggingFaceStorageWriter`), never gathered whole into one rank's memory. One process trains either
layout unwrapped, and reads and writes the same files.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch

from .. import distributed
from ..errors import StudentError
from . import checkpoint
from .students import StudentModule

MODEL_FILE_BYTES = 5 * 10**9  # a saved model's safetensors files hold at most this much each (as Hugging Face's)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the one ModuleList of config.num_hidden_layers modules."""
    n = model.config.num_hidden_layers
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if len(stacks) != 1:
        raise StudentError(f"parallel = 'fsdp' shards a student by decoder layer, but {type(model).__name__} has "
                           f"{len(stacks)} lists of {n} modules, not one: train it with parallel = 'ddp'")
    return stacks[0]


def parallelize(module: StudentModule, parallel: str, device: torch.device, autocast: bool,
                find_unused: bool) -> torch.nn.Module:
    """What the recipe trains through: `module` itself on one process, else DDP(module) or `module` sharded in
    place by FSDP2 (see the module docstring). `find_unused`: a DDP student whose terms leave parameters unused."""
    if not distributed.ranks().active:
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False, find_unused_parameters=find_unused)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (distributed.ranks().world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if autocast \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(module.model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return module


def sharded(engine) -> bool:
    """Whether `engine` is a student sharded by `parallelize` (an FSDP2 module)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(engine, FSDPModule)


@contextlib.contextmanager
def gathered(engines: list):
    """The root units of sharded students gathered, so that their models can be called directly (evaluation);
    each decoder layer still gathers itself as it runs."""
    mine = [e for e in engines if sharded(e)]
    for e in mine:
        e.unshard()
    try:
        yield
    finally:
        for e in mine:
            e.reshard()


def _unique_params(model, sd: dict) -> dict:
    """`sd` less the second name of a tied parameter (the head tied to the embeddings): the keys a Hugging Face
    checkpoint holds."""
    keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in sd.items() if k in keep}


def file_of(sd: dict) -> dict[str, int]:
    """{tensor name: the safetensors file (1, 2, ...) it goes to}: in order, a new file when the next tensor would
    take a file past MODEL_FILE_BYTES (sizes of the whole tensors, not of this rank's shards)."""
    out, index, used = {}, 1, 0
    for name, t in sd.items():
        size = t.numel() * t.element_size()
        if used and used + size > MODEL_FILE_BYTES:
            index, used = index + 1, 0
        out[name], used = index, used + size
    return out


def save_sharded_state(module: torch.nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shards of the module's and the optimiser's state into `folder` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(module, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))


def load_sharded_state(module: torch.nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
    """The module's and the optimiser's state from `folder`, resharded for this launch's ranks (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(module, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def save_model_sharded(model, tokenizer, d: Path, main: bool) -> None:
    """A sharded student's model as a plain Hugging Face folder at `d`: every rank writes its shards, rank 0
    consolidates them file by file into safetensors beside the config and tokenizer, then swaps the folder in
    (collective; `d` holds a complete model at every moment)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    tmp = checkpoint.model_tmp(d)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    sd = _unique_params(model, get_model_state_dict(model))
    dcp.save(sd, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp), fqn_to_index_mapping=file_of(sd),
                                                             save_distributed=True, enable_consolidation=True))
    distributed.barrier()
    if main:
        shutil.rmtree(tmp / "sharded", ignore_errors=True)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        checkpoint.swap_in(d)
    distributed.barrier()
