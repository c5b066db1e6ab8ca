"""The students of a run: `StudentModule` (what a student trains: its model and hidden-state projections), its
wiring to the cache's representations, its optimiser and schedule, and `Student` (one student as the recipe holds
it: those, its output folder, and where it stands). How a student's model is made (a shape, a checkpoint, the
teacher's layers) is `student_init.py`'s; `build.py` puts a student together for a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import attention
from ..format.manifest import Manifest
from ..student_config import StudentConfig
from . import terms
from .representation import attention_pairs, hidden_pairs, make_projections
from .signal import Wiring


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


@dataclass
class Student:
    """One student of a run as the recipe trains it: its settings, model, optimiser, output folder, and where it
    stands (best value, evaluations without improvement, whether it stopped, its running term sums)."""

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
    rows: dict = field(default_factory=dict)  # a cross-tokenizer student's re-tokenised splits: (source, split) -> rows

    @property
    def cross(self) -> bool:
        return self.wiring.cross

    @property
    def name(self) -> str:
        return self.spec.name

    def observe(self, metrics: dict, step: int, key: str, lower_is_better: bool, patience: int | None) -> bool:
        """Take an evaluation's metrics: whether `key` improved on the best so far (the best model is then this
        one); without improvement for `patience` evaluations the student stops."""
        self.last_eval = {**metrics, "step": step}
        value = metrics[key]
        if self.best is None or (value < self.best if lower_is_better else value > self.best):
            self.best, self.best_step, self.bad_evals, self.best_eval = value, step, 0, self.last_eval
            return True
        self.bad_evals += 1
        if patience is not None and self.bad_evals >= patience:
            self.stopped = True
        return False
