"""One student's step: its module (model + projections), how it is wired to the cache's representations,
its forward pass, its optimiser and schedule, and the mutual term between several students.

The recipe (`recipe.py`) runs these for every student; benchmarks and tests call `step_losses` to get
the same computation for one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import attention, models
from ..config import StudentConfig
from ..errors import StudentError
from ..format.manifest import Manifest
from . import losses
from . import terms
from .representation import attention_pairs, hidden_pairs, make_projections
from .signal import StudentOutput, TeacherSignal, Wiring, aligned_masks, batch_masks


class StudentHead:
    """A student's LM head as its own forward pass applies it (the head's linear map, then the family's logit
    scale, divisor and softcap), to a block of last hidden states: logits (B, P, V) float32 (float64 for a
    float64 student). The weight is
    passed per call: the view of it that the student's forward pass returned (see `StudentModule`)."""

    def __init__(self, spec: models.TeacherSpec, autocast: bool):
        self.spec, self.autocast = spec, autocast

    def __call__(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            z = torch.nn.functional.linear(h, weight)
        return models.finish_logits(losses.upcast(z), self.spec.logit_scale, self.spec.logits_divisor,
                                    self.spec.logit_softcap)


def can_block(model) -> bool:
    """Whether a model's logits can be made a block of positions at a time from its base model's last hidden
    state: a plain linear head without bias (the family's logit scale and softcap are applied after it)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return isinstance(head, torch.nn.Linear) and head.bias is None and getattr(model, "base_model", model) is not model


def block_positions(model, rows: int, block_mib: float) -> int:
    """Positions of each of `rows` rows in a block whose float32 logits take at most `block_mib` MiB (at least 1);
    0 when the logits are not made in blocks (block_mib 0, or a head `can_block` refuses)."""
    if not block_mib or not can_block(model):
        return 0
    return max(1, int(block_mib * 2**20 // (4 * model.get_output_embeddings().weight.shape[0] * rows)))


class StudentModule(torch.nn.Module):
    """Everything a student trains: the model and its hidden-state projections. Its forward pass
    returns exactly what the step's loss uses (logits only when a term or the mutual term reads
    them, the projected hidden states, the recorded attention maps), so that DDP, which finds the
    parameters that get no gradient by walking back from the outputs, sees the truth.

    `blockwise`: instead of the logits, the last hidden state and a view of the LM head's weight, from which
    the terms make the logits one block of positions at a time (no (B, L, V) tensor); the weight view is an
    output so that DDP sees the head as used."""

    def __init__(self, model, wiring: Wiring):
        super().__init__()
        self.model, self.projections = model, wiring.projections
        self.hidden_indices = [s for s, _ in wiring.hidden]
        self.attention_layers = [s for s, _ in wiring.attention]

    def forward(self, input_ids, want_logits: bool = True, blockwise: bool = False, **kw):
        recorder = attention.AttentionRecorder(self.attention_layers, None, "none") if self.attention_layers else None
        blockwise = blockwise and want_logits
        with attention.recording(recorder):
            run = self.model.base_model if blockwise else self.model
            out = run(input_ids=input_ids, output_hidden_states=bool(self.hidden_indices), **kw)
        hidden = [out.hidden_states[s].float() for s in self.hidden_indices]
        if len(self.projections):
            hidden = [p(h) for p, h in zip(self.projections, hidden)]
        maps = recorder.maps if recorder else {}
        if blockwise:
            weight = self.model.get_output_embeddings().weight
            return None, hidden, maps, out.last_hidden_state, weight.view_as(weight)
        return (out.logits if want_logits else None), hidden, maps, None, None


def build_wiring(spec: StudentConfig, model, manifest: Manifest, device, vocab_map=None, cross: bool = False
                 ) -> Wiring:
    needs = terms.student_needs(spec)
    w = Wiring(cross=cross, vocab_map=vocab_map)
    n_s = model.config.num_hidden_layers
    if "hidden_states" in needs:
        w.hidden = hidden_pairs(spec, manifest, n_s)
        w.projections = make_projections(w.hidden, model.config.hidden_size, manifest.teacher.hidden_size).to(device)
        w.hidden_encoding = manifest.fields["hidden_states"].encoding
    if "attentions" in needs:
        w.attention = attention_pairs(spec, manifest, n_s)
        w.bidirectional = manifest.task.bidirectional
        attention.enable(model)  # eager attention on the mapped layers only, sdpa elsewhere
    return w


def autocast_on(device, precision: str = "auto") -> bool:
    """Whether a student's forward pass runs under bf16 autocast (StudentRunConfig.precision)."""
    return precision == "bf16-autocast" or (precision == "auto" and device.type == "cuda")


def forward(engine, wiring: Wiring, batch: dict, device, want_logits: bool = True,
            view: dict | None = None, block_mib: float = 0, precision: str = "auto") -> StudentOutput:
    """A student's forward pass on a batch (through DDP when wrapped), with what its terms need; `view`: a
    cross-tokenizer student's own rows for the batch (`crosstok.StudentRows.batch`). `block_mib` > 0: its
    logits are made by the terms, blocks of positions whose float32 logits take at most that many MiB (where
    the student's head allows it, see `StudentModule`, and the batch's logits exceed one block); 0: materialised.
    `precision`: see `autocast_on`."""
    src = view if view is not None else batch
    ids = src["input_ids"].to(device, non_blocking=True)
    masks = aligned_masks(view, device) if view is not None else batch_masks(batch, device)
    module = engine.module if hasattr(engine, "module") else engine
    positions = block_positions(module.model, ids.shape[0], block_mib) if "labels" not in batch else 0
    blockwise = 0 < positions < ids.shape[1]  # one block would hold every position: materialised, as fast as ever
    autocast = autocast_on(device, precision)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits, hidden, maps, last, weight = engine(ids, want_logits=want_logits, blockwise=blockwise, **masks.forward)
    if last is None:
        return StudentOutput(logits, ids, masks, hidden, maps)
    head = StudentHead(models.TeacherSpec.from_config(module.model.config), autocast)
    return StudentOutput(None, ids, masks, hidden, maps, last=last, head=head, weight=weight,
                         block_positions=positions)


def step_losses(model, batch: dict, spec: StudentConfig, manifest: Manifest, device,
                wiring: Wiring | None = None, head=None, block_mib: float = 0,
                precision: str = "auto") -> dict[str, torch.Tensor]:
    """One batch's terms and total for a bare model (benchmarks, tests): the recipe's computation."""
    wiring = wiring or Wiring()
    out = forward(StudentModule(model, wiring), wiring, batch, device, block_mib=block_mib, precision=precision)
    sig = TeacherSignal(batch, device, manifest.capture, head, manifest.task.type,
                        dims={f: list(s.dims) for f, s in manifest.fields.items()})
    return terms.compute(spec, out, sig, wiring)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params, spec: StudentConfig, total: int):
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": spec.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=spec.lr, betas=spec.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, spec.warmup_steps, total, spec.min_lr_ratio))
    return opt, sched


def mutual_terms(logits: dict[str, torch.Tensor], mask: torch.Tensor, vocab: int, temperature: float,
                 classes: bool = False) -> dict[str, torch.Tensor]:
    """Deep mutual learning: for each student, mean over the others of KL(other || self) on the
    shared vocabulary (or the classes), the other's prediction taken as a fixed target (detached)."""
    def kl(other, mine):
        if classes:
            t_lp = torch.log_softmax(other.detach().float() / temperature, dim=-1)
            return losses.class_divergence(t_lp, mine, mask, temperature)
        return losses.full_forward_kl(other.detach()[..., :vocab], mine, mask, temperature)

    out = {}
    for name, mine in logits.items():
        others = [kl(o, mine) for n, o in logits.items() if n != name]
        out[name] = torch.stack(others).mean()
    return out


def check_student_document_masking(model, name: str, device) -> None:
    """Refuse a student whose architecture would attend across the documents of a packed row."""
    def run(ids, pos):
        return model(input_ids=ids, position_ids=pos, use_cache=False).logits

    was_training = model.training
    model.eval()
    try:
        attention.check_document_masking(run, model.config.vocab_size, device, f"student {name!r}")
    except attention.DocumentMaskError as e:
        raise StudentError(str(e)) from None
    finally:
        model.train(was_training)


@dataclass
class Student:
    spec: StudentConfig
    model: torch.nn.Module  # the transformers model (saved, evaluated)
    module: StudentModule  # model + projections (trained)
    engine: torch.nn.Module  # module, or DDP(module)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    out: Path
    wiring: Wiring
    identity: dict = field(default_factory=dict)
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped: bool = False
    last_eval: dict = field(default_factory=dict)
    best_eval: dict = field(default_factory=dict)
    running: dict = field(default_factory=dict)  # term -> detached tensor sum since the last log
    tokenizer: object = None  # what its saved model carries: its own, or the cache's
    rows: dict = field(default_factory=dict)  # a cross-tokenizer student's re-tokenised splits: (task, split) -> rows

    @property
    def cross(self) -> bool:
        return self.wiring.cross

    @property
    def name(self) -> str:
        return self.spec.name
