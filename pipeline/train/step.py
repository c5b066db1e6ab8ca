"""One student's step: its forward pass through its `students.StudentModule` (logits whole, or its head applied
a block of positions at a time), its terms on a batch (`step_losses`), and the mutual term between several
students.

The recipe (`recipe.py`) runs these for every student; benchmarks and tests call `step_losses` to get
the same computation for one batch.
"""

from __future__ import annotations

import torch

from .. import models
from ..student_config import StudentConfig
from ..format.manifest import Manifest
from . import losses
from . import terms
from .signal import StudentOutput, TeacherSignal, Wiring, aligned_masks, batch_masks
from .students import StudentModule


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


def autocast_on(device, precision: str = "auto") -> bool:
    """Whether a student's forward pass runs under bf16 autocast (StudentRunConfig.precision)."""
    return precision == "bf16-autocast" or (precision == "auto" and device.type == "cuda")


def forward(engine, wiring: Wiring, batch: dict, device, want_logits: bool = True,
            view: dict | None = None, block_mib: float = 0, precision: str = "auto") -> StudentOutput:
    """A student's forward pass on a batch (through DDP when wrapped), with what its terms need; `view`: a
    cross-tokenizer student's own rows for the batch (`retokenized.StudentRows.batch`). `block_mib` > 0: its
    logits are made by the terms, blocks of positions whose float32 logits take at most that many MiB (where
    the student's head allows it, see `students.StudentModule`, and the batch's logits exceed one block); 0: materialised.
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
