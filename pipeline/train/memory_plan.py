"""A student run's memory per rank, planned before any weight or batch is read: each student's model built on
the meta device (no memory), its parts counted for `ddp` and for `fsdp` at a number of ranks, the run checked
against its device (`distill student --dry-run` prints it; `parallel = "auto"` picks with it; every run is
refused before loading when it cannot fit).

What a rank holds for one student (bytes; P its parameters, projections included; W the ranks):
- weights, gradients, optimizer: float32 parameters, their gradients and AdamW's two moments, 4 + 4 + 8 bytes
  per parameter: whole on every rank under ddp, divided by W under fsdp;
- buffers: ddp over W > 1 ranks: DistributedDataParallel's gradient buckets (4 P). fsdp over W > 1: the units
  gathered at once, in the dtype they compute in (the root unit, which stays gathered from its forward to its
  backward, and two decoder layers: the one running and the one prefetched); their unsharded gradients come
  later in the backward pass, as the activations are freed. Under
  bf16 autocast a ddp student also keeps the bfloat16 copies autocast makes of its weight matrices (not the input
  embeddings, a lookup; not a fused head) from its forward pass to its backward, saved by autograd;
- activations, what autograd keeps for the backward pass: per decoder layer and token, 32 d + 8 kv + 16 ff bytes
  in float32 and 30 d + 4 kv + 8 ff under bf16 autocast (d the width, kv the key/value width, ff the FFN width;
  counted from the tensors a Llama decoder layer saves, attention through sdpa, whose scores are never
  materialised), plus the scores of the layers whose attention maps a term records (eager attention:
  8 bytes per head and pair of positions). With activation_checkpointing, each layer keeps its 4 d byte input
  and one layer's activations are rebuilt at a time. The root keeps 16 d bytes per token (embeddings, final norm);
- logits: materialised, the float32 logits of the batch, kept for the backward pass, and their gradient and the
  terms' work on them at once: 20 bytes per logit (22 under autocast, whose bfloat16 logits are kept too). Made a
  block of positions at a time (`logit_block_mib`, fused with the head: `fused.py`), one block's logits, the
  terms' work on them and their gradients, 28 bytes per logit (30 under autocast), the head's weight gradient
  gathered over the blocks (a V x d float32 matrix) and the last hidden states' (B x L x d float32) from the
  forward pass to the backward, and under autocast the head's weight in bfloat16 and a block's bfloat16 product
  for its gradient (2 + 2 bytes per weight). A head that cannot be split off (`step.can_block`) is materialised;
- evaluation: a block of at most `metrics.EVAL_BLOCK_MIB` of float32 logits (or the batch's, when smaller) and what
  the metrics derive from it, 8 bytes per logit, beside the weights and optimizer state (no gradients then).

A step's gradients fill as its activations are freed (they are None when it starts: `zero_grad(set_to_none)`),
so one micro-batch per step peaks at the larger of the two; with grad_accum > 1 the gradients are held too.
Measured against torch's tensor-level tracker (`torch.distributed._tools.mem_tracker`) and the process's peak RSS
in `benchmarks/bench_memory_plan.py`; the RSS adds the allocator's own (freed memory it has not handed back).

Every student of a run is held at once, and their batches pass one student at a time: a run's peak is the sum
of its students' weights, optimizer state and buffers (and gradients), plus the largest step of one of them
(every student's logits at once with mutual learning), or an evaluation. The estimate does not count what does not grow
with the students: the Python, torch and CUDA runtimes, the cache reader and its shuffle window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed, models
from ..config import TeacherConfig
from ..errors import StudentError
from ..format.manifest import Manifest
from ..student_config import StudentConfig, StudentRunConfig
from . import terms
from .metrics import EVAL_BLOCK_MIB
from .representation import attention_pairs, hidden_pairs
from .sources import open_inputs
from .step import autocast_on, can_block
from .student_init import from_arch, label_settings

HEADROOM = 0.9  # of a device's memory a run may plan to take (the capture's margin)
GIB, MIB = 2**30, 2**20
PARTS = ("weights", "gradients", "optimizer", "buffers", "activations", "logits", "evaluation")


@dataclass(frozen=True)
class StudentShape:
    """What the plan knows of one student: counted from its model on the meta device."""

    name: str
    params: int  # the model's and its projections'
    layer_params: int  # the largest decoder layer's
    layers: int
    hidden: int
    kv: int  # key/value width
    ffn: int
    heads: int
    vocab: int  # LM head rows; 0 for a classifier
    matrices: int  # parameters in weight matrices autocast casts to bfloat16 (all but the input embeddings')
    head: int  # the LM head's weight's parameters (cast by autocast only when the logits are materialised)
    recorded_layers: int  # layers whose attention maps a term records (eager attention)
    blockable: bool = True  # its logits can be made in blocks from its last hidden state (`step.can_block`)

    @classmethod
    def from_model(cls, name: str, model, classifier: bool, projections: int = 0,
                   recorded_layers: int = 0) -> "StudentShape":
        c = model.config
        d, heads = c.hidden_size, c.num_attention_heads
        kv = (getattr(c, "num_key_value_heads", None) or heads) * (getattr(c, "head_dim", None) or d // heads)
        ffn = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d
        unique = list({id(p): p for p in model.parameters()}.values())  # a tied head counted once
        params = sum(p.numel() for p in unique)
        stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == c.num_hidden_layers]
        layer = max(sum(p.numel() for p in m.parameters()) for m in stacks[0]) if len(stacks) == 1 \
            else params // c.num_hidden_layers
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head = out.weight if isinstance(out, torch.nn.Linear) else None
        vocab = 0 if classifier or head is None else head.shape[0]
        embed = model.get_input_embeddings().weight
        lookup = 0 if head is not None and embed is head else embed.numel()  # a tied table is the head's matrix
        matrices = sum(p.numel() for p in unique if p.dim() >= 2) - lookup + projections
        return cls(name, params + projections, layer, c.num_hidden_layers, d, kv, ffn, heads, vocab, matrices,
                   0 if head is None else head.numel(), recorded_layers, can_block(model))


@dataclass(frozen=True)
class Batch:
    """The run's settings the activations and logits depend on."""

    rows: int  # batch_size
    positions: int  # the cache's seq_len
    autocast: bool
    block_mib: float  # logit_block_mib
    mutual: bool
    grad_accum: int = 1


@dataclass(frozen=True)
class Footprint:
    """Bytes one rank holds for one student (see the module docstring), and the logit block's positions."""

    weights: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int
    logits: int
    evaluation: int
    block: int = 0  # positions per logit block; 0: materialised

    @property
    def held(self) -> int:
        """What the student holds across steps: its weights, optimizer state and buffers."""
        return self.weights + self.optimizer + self.buffers

    @property
    def step(self) -> int:
        """A step's own peak with one micro-batch: its gradients fill as its activations and logits are freed."""
        return max(self.gradients, self.activations + self.logits)


def layer_bytes(s: StudentShape, tokens: int, autocast: bool) -> int:
    """Bytes one decoder layer keeps for its backward pass over `tokens` tokens (see the module docstring)."""
    return tokens * ((30 * s.hidden + 4 * s.kv + 8 * s.ffn) if autocast else (32 * s.hidden + 8 * s.kv + 16 * s.ffn))


def activations(s: StudentShape, b: Batch, checkpointing: bool) -> int:
    """Bytes autograd keeps for one forward pass of the student on a batch."""
    tokens = b.rows * b.positions
    layer = layer_bytes(s, tokens, b.autocast)
    scores = b.rows * s.heads * b.positions**2 * 8  # one recorded layer's eager attention scores and probabilities
    root = tokens * 16 * s.hidden
    if checkpointing:
        return root + s.layers * tokens * 4 * s.hidden + layer
    return root + s.layers * layer + s.recorded_layers * scores


def logit_bytes(s: StudentShape, b: Batch) -> tuple[int, int]:
    """(bytes, positions per block) of a step's logits; positions 0: materialised."""
    if not s.vocab:
        return 0, 0
    blocks = s.blockable and not b.mutual and b.block_mib
    block = max(1, int(b.block_mib * MIB // (4 * s.vocab * b.rows))) if blocks else 0
    block = block if block < b.positions else 0  # one block would hold every position: materialised
    if not block:
        return b.rows * b.positions * s.vocab * (22 if b.autocast else 20), 0
    head_grads = s.vocab * s.hidden * (8 if b.autocast else 4) + b.rows * b.positions * s.hidden * 4
    return b.rows * block * s.vocab * (30 if b.autocast else 28) + head_grads, block


def evaluation_bytes(s: StudentShape, b: Batch) -> int:
    """An evaluation's logits: a block of at most EVAL_BLOCK_MIB of float32 logits, or the batch's, and what the
    metrics derive from them; and one layer's working set (no gradients, nothing kept)."""
    tokens = b.rows * b.positions
    layer = layer_bytes(s, tokens, False)
    if not s.vocab:
        return layer
    return layer + 2 * min(tokens * s.vocab * 4, int(EVAL_BLOCK_MIB * MIB))


def footprint(s: StudentShape, b: Batch, parallel: str, world: int, checkpointing: bool) -> Footprint:
    """One rank's bytes for student `s` trained under `parallel` over `world` ranks (see the module docstring)."""
    shards = world if parallel == "fsdp" else 1
    state = -(-s.params // shards)
    logits, block = logit_bytes(s, b)
    if parallel == "fsdp" and world > 1:
        gathered = s.params - s.layers * s.layer_params + 2 * s.layer_params  # the root unit and two layers
        buffers = gathered * (2 if b.autocast else 4)  # at the step's peak (its backward's start) no gradient yet
    else:
        copies = s.matrices - (s.head if block else 0)  # a fused head is cast once per step, counted with it
        buffers = (4 * s.params if world > 1 else 0) + (2 * copies if b.autocast else 0)
    return Footprint(4 * state, 4 * state, 8 * state, buffers, activations(s, b, checkpointing), logits,
                     evaluation_bytes(s, b), block)


@dataclass(frozen=True)
class Plan:
    """A run's memory per rank, for each student and layout, against its device's memory."""

    students: list[StudentShape]
    batch: Batch
    world: int
    checkpointing: bool
    capacity: int | None  # bytes of one rank's device memory; None: unknown
    device: str

    def footprints(self, parallel: str, checkpointing: bool | None = None) -> list[Footprint]:
        ck = self.checkpointing if checkpointing is None else checkpointing
        return [footprint(s, self.batch, parallel, self.world, ck) for s in self.students]

    def total(self, parallel: str, checkpointing: bool | None = None) -> int:
        fps = self.footprints(parallel, checkpointing)
        accumulating = self.batch.grad_accum > 1
        if accumulating:  # every student's gradients are held from micro-batch to micro-batch
            held = sum(f.held + f.gradients for f in fps)
            steps = [f.activations + f.logits for f in fps]
        else:
            held = sum(f.held for f in fps)
            steps = [f.step for f in fps]
        mutual = sum(f.logits for f in fps) if self.batch.mutual else 0
        return held + max(max(steps) + mutual, max(f.evaluation for f in fps))

    def fits(self, parallel: str, checkpointing: bool | None = None) -> bool:
        return self.capacity is None or self.total(parallel, checkpointing) <= HEADROOM * self.capacity

    def resolve(self, parallel: str) -> str:
        """The layout a run uses: its setting, or for "auto" ddp when a replica fits (and on one process), else
        fsdp."""
        if parallel != "auto":
            return parallel
        return "ddp" if self.world == 1 or self.fits("ddp") else "fsdp"

    def lines(self, chosen: str) -> list[str]:
        """The plan as `distill student --dry-run` prints it (GiB, or MiB for runs under 1 GiB)."""
        cap = "unknown" if self.capacity is None else f"{self.capacity / GIB:,.1f} GiB"
        unit, name = (GIB, "GiB") if max(self.total("ddp"), self.total("fsdp")) >= GIB else (MIB, "MiB")
        out = [f"memory plan per rank: {self.world} rank{'s' * (self.world > 1)}, {self.device} ({cap} each, "
               f"{HEADROOM:.0%} usable), batch {self.batch.rows} x {self.batch.positions}"
               + (", bf16 autocast" if self.batch.autocast else ", float32")
               + (f", grad_accum {self.batch.grad_accum}" if self.batch.grad_accum > 1 else "")]
        for s, ddp, fsdp in zip(self.students, self.footprints("ddp"), self.footprints("fsdp")):
            out.append(f"  student {s.name}: {s.params / 1e6:,.1f}M parameters, {s.layers} layers"
                       + (f", vocabulary {s.vocab:,}" if s.vocab else ""))
            out.append(f"    {name:<34}{'ddp':>10}{'fsdp':>10}")
            for part in PARTS:
                label = part + (" (checkpointing)" if part == "activations" and self.checkpointing else "")
                if part == "logits":
                    label += f" (blocks of {ddp.block} positions)" if ddp.block else " (materialised)"
                out.append(f"    {label:<34}{getattr(ddp, part) / unit:>10.2f}{getattr(fsdp, part) / unit:>10.2f}")
                if part == "activations":
                    other = "  without checkpointing" if self.checkpointing else "  with activation_checkpointing"
                    a, b = (footprint(s, self.batch, p, self.world, not self.checkpointing).activations
                            for p in ("ddp", "fsdp"))
                    out.append(f"    {other:<34}{a / unit:>10.2f}{b / unit:>10.2f}")
        label = "peak" if len(self.students) == 1 else "run peak (students held together)"
        out.append(f"  {label:<36}{self.total('ddp') / unit:>10.2f}{self.total('fsdp') / unit:>10.2f}")
        verdict = "fits" if self.fits(chosen) else "does NOT fit"
        out.append(f"  parallel = {chosen!r}: {self.total(chosen) / unit:,.2f} {name} per rank, {verdict}")
        return out

    def check(self, chosen: str) -> None:
        """Refuse a run whose plan under `chosen` exceeds its device, naming the settings that would fit."""
        if self.fits(chosen):
            return
        need = self.total(chosen)
        ways = []
        if chosen == "ddp" and self.world > 1 and self.fits("fsdp"):
            ways.append(f"parallel = 'fsdp' ({self.total('fsdp') / GIB:,.1f} GiB)")
        if not self.checkpointing and self.fits(chosen, True):
            ways.append(f"activation_checkpointing = true ({self.total(chosen, True) / GIB:,.1f} GiB)")
        if chosen == "ddp" and self.world > 1 and not self.checkpointing and not ways and self.fits("fsdp", True):
            ways.append("parallel = 'fsdp' with activation_checkpointing = true")
        ways.append("a lower batch_size (a higher grad_accum keeps the batch)")
        if any(s.vocab for s in self.students):
            ways.append("a lower logit_block_mib")
        if chosen == "fsdp" or self.world > 1:
            ways.append("more ranks (parallel = 'fsdp' divides the weights, gradients and optimizer state by them)")
        raise StudentError(
            f"the students need about {need / GIB:,.1f} GiB per rank under parallel = {chosen!r} over {self.world} "
            f"rank{'s' * (self.world > 1)}, more than {HEADROOM:.0%} of the {self.capacity / GIB:,.1f} GiB of "
            f"{self.device} memory; use " + ", or ".join(ways) + " (distill student --dry-run prints the plan)")


def device_capacity(device: torch.device, host_ranks: int | None = None) -> int | None:
    """Bytes of one rank's device memory: a GPU's total; a CPU's available memory shared by `host_ranks` ranks
    (default: this launch's ranks on this host)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    have = distributed.host_memory_available()
    return None if have is None else have // (host_ranks or distributed.ranks_on_this_host())


def meta_model(spec: StudentConfig, manifest: Manifest, tokenizer, cross: bool):
    """The student's model on the meta device: its shape without a byte of its weights."""
    from transformers import AutoConfig

    task = manifest.task.type
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # an arch student seeds torch: not the run's RNG
        if spec.arch is not None:
            return from_arch(spec, manifest, tokenizer, len(tokenizer) if cross else manifest.teacher.vocab_size)
        if spec.pretrained is not None:
            config = AutoConfig.from_pretrained(spec.pretrained, **label_settings(manifest))
        else:
            t = manifest.teacher
            config = models.load_model_config(TeacherConfig(model=t.model, gguf_file=t.gguf_file,
                                                            revision=t.revision, task=task))
            layers = spec.from_teacher
            config.num_hidden_layers = len(range(0, t.num_layers, layers)) if isinstance(layers, int) \
                else len(layers)
        return models.auto_class(task).from_config(config, dtype=torch.float32)


def student_shape(spec: StudentConfig, manifest: Manifest, tokenizer, cross: bool) -> StudentShape:
    model = meta_model(spec, manifest, tokenizer, cross)
    needs = terms.student_needs(spec)
    projections = 0
    d_s, d_t = model.config.hidden_size, manifest.teacher.hidden_size
    if "hidden_states" in needs and d_s != d_t:
        projections = len(hidden_pairs(spec, manifest, model.config.num_hidden_layers)) * d_s * d_t
    recorded = 0
    if "attentions" in needs:
        recorded = len({s for s, _ in attention_pairs(spec, manifest, model.config.num_hidden_layers)})
    return StudentShape.from_model(spec.name, model, manifest.task.type != "causal-lm", projections, recorded)


def plan_run(cfg: StudentRunConfig, manifest: Manifest, tokenizers: dict[str, tuple[object, bool]], device,
             world: int | None = None, capacity: int | None = None) -> Plan:
    """The plan of `cfg` at `world` ranks (default: this launch's) with `capacity` bytes per rank (default: the
    device's), from the first source's manifest and each student's tokenizer (`Inputs.student_tokenizers`)."""
    shapes = [student_shape(s, manifest, *tokenizers[s.name]) for s in cfg.students]
    batch = Batch(cfg.batch_size, manifest.preparation.seq_len, autocast_on(device, cfg.precision),
                  cfg.logit_block_mib, cfg.mutual_weight > 0, cfg.grad_accum)
    world = world or distributed.ranks().world
    cap = capacity if capacity is not None else device_capacity(device)
    return Plan(shapes, batch, world, cfg.activation_checkpointing, cap, f"{device.type}")


def dry_run(cfg: StudentRunConfig, world: int | None = None, device_gib: float | None = None) -> tuple[Plan, str]:
    """(the plan of `cfg`, the layout it would use): its caches' manifests and tokenizers read, no weight or batch;
    `world` and `device_gib` plan another launch than this one (ranks, memory per rank)."""
    inputs = open_inputs(cfg)
    launched = distributed.launch_world()  # a dry run under torchrun plans that launch
    if device_gib is not None:
        capacity = int(device_gib * GIB)
    elif world and world != launched:  # another number of ranks (on a CPU, sharing this host's memory)
        capacity = device_capacity(inputs.device, world)
    else:
        capacity = None  # this launch's device
    plan = plan_run(cfg, inputs.first.manifest, inputs.student_tokenizers, inputs.device, world or launched, capacity)
    return plan, plan.resolve(cfg.parallel)
