"""What the loss terms read: the positions that count (`Masks`), the cached teacher targets of a batch
(`TeacherSignal`) and the student's forward pass (`StudentOutput`), each computed once per batch and
shared by every term and student that asks.

The teacher's top-K log-probs and tail at a temperature are computed once per batch
(`TeacherSignal.topk`); the student's logsumexp, its log-probs at the teacher's ids and its projected
hidden states once per student and batch (`StudentOutput`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..errors import StudentError
from ..format.manifest import Capture
from . import losses


class TopK(NamedTuple):
    """Log-probs at K ids and the log of the mass beyond them (the tail bucket)."""

    logprobs: torch.Tensor  # (B, L, K)
    log_tail: torch.Tensor  # (B, L)


class Sampled(NamedTuple):
    """The sampled targets at a temperature: ids, the teacher's log-probs at them, log importance weights."""

    ids: torch.Tensor  # (B, L, N) int64
    logprobs: torch.Tensor  # (B, L, N) log p_T
    log_weights: torch.Tensor  # (B, L, N); -inf in an empty slot


# ---------------------------------------------------------------------------------------------
# masks


@dataclass
class Masks:
    """Which positions of a batch count for what, and how the student attends."""

    real: torch.Tensor  # (B, L) a real token: representation terms (hidden states, attention maps)
    kd: torch.Tensor  # (B, L) real and trained (loss_mask): KD terms, top-1 agreement, KL
    ce: torch.Tensor  # (B, L) trained with a real next token: CE, NLL, calibration
    forward: dict  # attention_mask or position_ids for the student's forward pass
    rep: torch.Tensor | None = None  # (B, L) representation terms' positions: `real`, or its aligned ones

    def __post_init__(self):
        if self.rep is None:
            self.rep = self.real

    def block(self, a: int, b: int) -> "Masks":
        """Positions a..b of every row (per-position masks only)."""
        return Masks(self.real[:, a:b], self.kd[:, a:b], self.ce[:, a:b], {}, self.rep[:, a:b])


def aligned_masks(view: dict, device) -> Masks:
    """A cross-tokenizer student's masks on its own positions (`view`: its re-tokenised rows): CE on every real
    next token, teacher terms (KD and representations) on the positions aligned with a teacher position."""
    m = batch_masks(view, device)
    aligned = view["align"].to(device) >= 0
    return Masks(m.real, m.kd & aligned, m.ce, m.forward, m.real & aligned)


def batch_masks(batch: dict, device) -> Masks:
    if "labels" in batch:
        return class_masks(batch, device)
    ids = batch["input_ids"]
    pos = torch.arange(ids.shape[1], device=device)
    length = batch["length"].to(device)
    real = pos[None] < length[:, None]  # (B, L)
    has_next = pos[None] < (length[:, None] - 1)  # (B, L)
    trained = batch.get("loss_mask")
    kd, ce = (real, has_next) if trained is None else (real & trained.to(device), has_next & trained.to(device))
    # use_cache=False: training needs no KV cache, and transformers ignores packed position_ids when one exists
    if "position_ids" in batch:  # documents kept apart, as the teacher saw them; padding is its own segment
        forward = {"position_ids": batch["position_ids"].to(device), "use_cache": False}
    else:
        full = bool((batch["length"] == ids.shape[1]).all())  # on the CPU copy: no device sync
        forward = {"attention_mask": None if full else real.long(), "use_cache": False}
    return Masks(real, kd, ce, forward)


def class_masks(batch: dict, device) -> Masks:
    """A classification batch: `kd` and `ce` are per row (B,) for sequence classification (every row has the
    teacher's distribution and a gold label), the labelled positions (B, L) for token classification (each
    word's first token); the student always gets the attention mask (an encoder attends both ways)."""
    ids, labels = batch["input_ids"], batch["labels"].to(device)
    pos = torch.arange(ids.shape[1], device=device)
    real = pos[None] < batch["length"].to(device)[:, None]
    labelled = (labels >= 0) & (real if labels.ndim == 2 else True)
    kd = labelled if labels.ndim == 2 else torch.ones_like(labelled)
    return Masks(real, kd, labelled, {"attention_mask": real.long()})


# ---------------------------------------------------------------------------------------------
# the teacher's side


class TeacherSignal:
    """The cached teacher targets of one batch on the training device, as the terms read them.

    `topk(T)` is the teacher's log-probs at its K ids and its tail bucket at temperature T: exact at T=1 and at
    a captured temperature. A cross-tokenizer student reads the signal `aligned` with its own positions.
    """

    def __init__(self, batch: dict, device, capture: Capture | None = None, head=None, task: str = "causal-lm",
                 align: torch.Tensor | None = None, dims: dict | None = None):
        self.batch, self.device, self.task = batch, device, task
        self.capture, self.head = capture, head  # head: a TeacherHead, for the full-vocabulary terms
        # captured temperatures besides 1, in logsumexp_tempered's order
        self.temperatures = capture.temperatures if capture is not None else ()
        # a cross-tokenizer student's view: every per-position field taken at the teacher position aligned with
        # each student position (align (B, L_s), -1: none, read as position 0 and masked by the student's masks)
        self.align, self.dims = align, dims or {}
        self._fields: dict[str, torch.Tensor] = {}  # cache field name -> on the device (and aligned)
        self._whole: TeacherSignal | None = None  # a block's batch (`block`)
        self._span: tuple[int, int] = (0, 0)
        self._topk_ids: torch.Tensor | None = None
        self._topk: dict[float, TopK] = {}
        self._sampled: dict[float, Sampled] = {}
        self._classes: dict[float, torch.Tensor] = {}

    def field(self, name: str) -> torch.Tensor:
        """A cache field of the batch on the device (at the aligned positions for a cross-tokenizer student)."""
        if name not in self._fields and self._whole is not None:
            x = self._whole.field(name)
            for ax in position_axes(self.dims, name):
                x = x.narrow(ax, self._span[0], self._span[1] - self._span[0])
            self._fields[name] = x
        if name not in self._fields:
            x = self.batch[name].to(self.device, non_blocking=True)
            if self.align is not None:
                x = gather_positions(x, self.align.to(self.device).clamp(min=0), position_axes(self.dims, name))
            self._fields[name] = x
        return self._fields[name]

    def aligned(self, align: torch.Tensor, dims: dict) -> "TeacherSignal":
        """This batch's targets on a cross-tokenizer student's positions (`align`: see __init__)."""
        return TeacherSignal(self.batch, self.device, self.capture, self.head, self.task, align, dims)

    def block(self, a: int, b: int) -> "TeacherSignal":
        """The targets at positions a..b of every row (each field narrowed on its position axes, as `dims` names
        them): what the terms read for one block of a student's logits."""
        if not self.dims:
            raise StudentError("a block of a batch's targets needs the fields' dims (TeacherSignal(dims=...))")
        blk = TeacherSignal(self.batch, self.device, self.capture, self.head, self.task, None, self.dims)
        blk._whole, blk._span = self, (a, b)
        return blk

    @property
    def topk_ids(self) -> torch.Tensor:
        """(B, L, K) int64 the teacher's top-K ids."""
        if self._topk_ids is None:
            self._topk_ids = self.field("topk_ids").long()
        return self._topk_ids

    def tempered_index(self, T: float) -> int | None:
        return self.temperatures.index(T) if T in self.temperatures else None

    def lse(self, T: float) -> torch.Tensor:
        """The teacher's logsumexp(z / T) (B, L) at T = 1 or a captured temperature."""
        if T == 1.0:
            return self.field("logsumexp")
        i = self.tempered_index(T)
        if i is None:
            raise StudentError(f"temperature {T} was not captured (captured: 1.0, {list(self.temperatures)})")
        return self.field("logsumexp_tempered")[:, i]

    def topk(self, T: float = 1.0) -> TopK:
        if T not in self._topk:
            i = self.tempered_index(T) if T != 1.0 else None
            lse_T = self.field("logsumexp_tempered")[:, i] if i is not None else None
            self._topk[T] = TopK(*losses.teacher_topk_logprobs(self.field("topk_logprobs"), self.field("logsumexp"),
                                                                T, lse_T))
        return self._topk[T]

    def sampled(self, T: float) -> Sampled:
        """The sampled targets at T; w_v = (c_v / N) p_T(v) / q(v), q = softmax(z / sample_temperature)."""
        if T not in self._sampled:
            lp1 = self.field("sample_logprobs")
            counts = self.field("sample_counts").to(lp1.dtype)
            z = lp1 + self.field("logsumexp")[..., None]  # the teacher's logits at the drawn ids
            tau = self.capture.sample_temperature if self.capture is not None else 1.0
            lp_t = lp1 if T == 1.0 else z / T - self.lse(T)[..., None]
            lq = lp1 if tau == 1.0 else z / tau - self.lse(tau)[..., None]
            n = counts.sum(-1, keepdim=True).clamp(min=1)  # N at every real position
            log_w = torch.where(counts > 0, (counts / n).log() + lp_t - lq, -torch.inf)
            self._sampled[T] = Sampled(self.field("sample_ids").long(), lp_t, log_w)
        return self._sampled[T]

    def classes(self, T: float = 1.0) -> torch.Tensor:
        """A classifier's log-probs over every class at temperature T, (B, C) or (B, L, C); exact at any T."""
        if T not in self._classes:
            i = self.tempered_index(T) if T != 1.0 else None
            lse_T = None if i is None else self.field("class_logsumexp_tempered")[:, i]
            self._classes[T] = losses.teacher_class_logprobs(self.field("class_logprobs"),
                                                             self.field("class_logsumexp"), T, lse_T)
        return self._classes[T]


def position_axes(dims: dict, name: str) -> list[int]:
    """The position axes (position, query, key) of a cache field, from its manifest dims (row first)."""
    return [i for i, d in enumerate(dims.get(name, ())) if d in ("position", "query", "key")]


def gather_positions(x: torch.Tensor, idx: torch.Tensor, axes: list[int]) -> torch.Tensor:
    """x (B, ..., L_t, ...) at positions idx (B, L_s) on each of `axes`: (B, ..., L_s, ...)."""
    if x.dtype == torch.uint16:  # bfloat16 bits as stored: gathered as int16 (gather has no uint16 kernel)
        return gather_positions(x.view(torch.int16), idx, axes).view(torch.uint16)
    for ax in axes:
        shape = [1] * x.ndim
        shape[0], shape[ax] = idx.shape[0], idx.shape[1]
        size = list(x.shape)
        size[ax] = idx.shape[1]
        x = torch.gather(x, ax, idx.view(shape).expand(size))
    return x


# ---------------------------------------------------------------------------------------------
# the student's side


class StudentOutput:
    """A student's forward pass on one batch and the quantities the terms derive from it.

    `logits` (B, L, V) when materialised; else `last` (B, L, d), the state its LM head reads, `head`
    (`step.StudentHead`) and the head's `weight` (as the forward pass returned it), from which the logit terms
    are computed `block_positions` positions of every row at a time, fused with the head (`fused.py`).
    """

    def __init__(self, logits: torch.Tensor | None, input_ids: torch.Tensor, masks: Masks,
                 hidden: list[torch.Tensor] | None = None, attentions: dict | None = None,
                 last: torch.Tensor | None = None, head=None, weight: torch.Tensor | None = None,
                 block_positions: int = 0, next_ids: torch.Tensor | None = None):
        self.logits, self.input_ids, self.masks = logits, input_ids, masks
        self.last, self.head, self.weight, self.block_positions = last, head, weight, block_positions
        self.next_ids = next_ids
        self.hidden = hidden or []  # per hidden pair: the student's state, projected to the teacher's width
        self.attentions = attentions or {}  # student layer -> (B, H_s, L, L) attention probabilities
        self._lse: dict[float, torch.Tensor] = {}
        self._at_teacher: dict[float, TopK] = {}
        self._largest: dict[tuple[int, float], TopK] = {}
        self._next: torch.Tensor | None = None

    def lse(self, T: float = 1.0) -> torch.Tensor:
        if T not in self._lse:
            self._lse[T] = losses.logsumexp_t(self.logits, T)
        return self._lse[T]

    def next_logprobs(self) -> torch.Tensor:
        """(B, L) log p_student(true next token); the last position wraps and is masked by `masks.ce`."""
        if self._next is None:
            self._next = losses.next_token_logprobs(self.logits, self.input_ids, self.lse(1.0), self.next_ids)
        return self._next

    @property
    def blockwise(self) -> bool:
        """Whether the logits are made block by block from `last` and `head` (not materialised)."""
        return self.logits is None and self.head is not None

    def block(self, a: int, b: int, logits: torch.Tensor) -> "StudentOutput":
        """Positions a..b of every row, with their `logits` (B, b - a, V), made by `fused.fused_terms`."""
        nxt = torch.roll(self.input_ids, -1, dims=1)[:, a:b]  # the next token of a block's last position too
        return StudentOutput(logits, self.input_ids[:, a:b], self.masks.block(a, b), next_ids=nxt)

    def topk(self, ids: torch.Tensor, T: float = 1.0) -> TopK:
        """Log-probs at the teacher's ids and the student's tail bucket, at temperature T (one set of ids per
        batch: the teacher's)."""
        if T not in self._at_teacher:
            self._at_teacher[T] = TopK(*losses.student_topk_logprobs(self.logits, ids, T, lse=self.lse(T)))
        return self._at_teacher[T]

    def largest(self, k: int, T: float = 1.0) -> TopK:
        """The student's own k largest log-probs (B, L, k) and the log of its mass beyond them, at T."""
        if (k, T) not in self._largest:
            z = self.logits.topk(min(k, self.logits.shape[-1]), dim=-1).values
            lp = losses.upcast(z) / T - self.lse(T)[..., None]
            self._largest[(k, T)] = TopK(lp, losses.log1mexp(torch.logsumexp(lp, dim=-1)))
        return self._largest[(k, T)]

    def at(self, ids: torch.Tensor, T: float = 1.0) -> torch.Tensor:
        """Log-probs (B, L, K) at student ids (-1 read as id 0), at T."""
        return losses.upcast(self.logits.gather(-1, ids.clamp(min=0))) / T - self.lse(T)[..., None]


@dataclass
class Wiring:
    """A student's representation-distillation wiring (empty when it uses none)."""

    hidden: list[tuple[int, int]] = field(default_factory=list)  # (student hidden index, cached position)
    attention: list[tuple[int, int]] = field(default_factory=list)  # (student layer, cached position)
    projections: torch.nn.ModuleList = field(default_factory=torch.nn.ModuleList)
    hidden_encoding: str | None = None
    bidirectional: bool = False  # an encoder cache: attention maps cover every real key, not only key <= query
    cross: bool = False  # the student has another tokenizer: its positions are aligned with the teacher's
    vocab_map: object = None  # vocab_map.VocabMap, teacher id -> student id (None: the same vocabulary)


@dataclass(frozen=True)
class Context:
    """What a term may know besides the two signals: the student's settings and its wiring; `counts`, when a term
    is computed on one block of positions (`fused.fused_terms`): the list its loss appends the number of positions
    it averaged over to (`losses.masked_mean`)."""

    spec: object  # StudentConfig
    wiring: Wiring
    counts: list | None = None
