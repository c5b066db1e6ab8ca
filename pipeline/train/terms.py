"""The loss terms a student trains with, declared once each.

A `Term` names itself, the cache fields it reads, what of the student it needs (logits, hidden
states, attention maps), the capture settings whose values it depends on, and how it computes
its value from a typed `StudentOutput` and a typed `TeacherSignal`. Everything else is derived
from `TERMS`: the names a config may use, the fields a run reads, whether a student's forward
pass records hidden states or attention maps, which capture settings several caches of one run
must share. Adding a loss is one `@term(...)` function here.

Per-batch work is shared: the teacher's top-K log-probs and tail at a temperature are computed
once per batch (`TeacherSignal.topk`) for every term and student that asks; the student's
logsumexp, its log-probs at the teacher's ids and its projected hidden states once per student
and batch (`StudentOutput`). Terms with weight 0 are not computed and their fields not read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from . import losses as L
from .representation import decode_hidden, map_heads
from .students import StudentError, task_of

TOPK_FIELDS = ("topk_ids", "topk_logprobs", "logsumexp")


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
# what the terms read


class TeacherSignal:
    """The cached teacher targets of one batch on the training device, as the terms read them.

    `topk(T)` is the teacher's log-probs at its K ids and its tail bucket at temperature T: exact
    at T=1 and at a captured temperature, computed once per batch and temperature.
    """

    def __init__(self, batch: dict, device, temperatures: list[float], capture: dict | None = None, head=None,
                 task: str = "causal-lm", align: torch.Tensor | None = None, dims: dict | None = None):
        self.batch, self.device, self.task = batch, device, task
        # a cross-tokenizer student's view: every per-position field taken at the teacher position aligned with
        # each student position (align (B, L_s), -1: none, read as position 0 and masked by the student's masks)
        self.align, self.dims = align, dims or {}
        self.temperatures = temperatures  # captured temperatures besides 1, in logsumexp_tempered's order
        self.capture = capture or {}  # the cache's capture settings (sampled targets' proposal temperature)
        self.head = head  # a TeacherHead, for the full-vocabulary terms
        self._topk: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fields: dict[str, torch.Tensor] = {}

    def field(self, name: str) -> torch.Tensor:
        if name not in self._fields:
            x = self.batch[name].to(self.device, non_blocking=True)
            if self.align is not None:
                x = gather_positions(x, self.align.to(self.device).clamp(min=0), position_axes(self.dims, name))
            self._fields[name] = x
        return self._fields[name]

    def aligned(self, align: torch.Tensor, dims: dict) -> "TeacherSignal":
        """This batch's targets on a cross-tokenizer student's positions (`align`: see __init__)."""
        return TeacherSignal(self.batch, self.device, self.temperatures, self.capture, self.head, self.task,
                             align, dims)

    @property
    def topk_ids(self) -> torch.Tensor:
        if "topk_ids.long" not in self._fields:
            self._fields["topk_ids.long"] = self.field("topk_ids").long()
        return self._fields["topk_ids.long"]

    def tempered_index(self, T: float) -> int | None:
        return self.temperatures.index(T) if T in self.temperatures else None

    def lse(self, T: float) -> torch.Tensor:
        """The teacher's logsumexp(z / T) (B, L) at T = 1 or a captured temperature."""
        if T == 1.0:
            return self.field("logsumexp")
        i = self.tempered_index(T)
        if i is None:
            raise StudentError(f"temperature {T} was not captured (captured: 1.0, {self.temperatures})")
        return self.field("logsumexp_tempered")[:, i]

    def sampled(self, T: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, log p_T at them, log importance weights) of the sampled targets, each (B, L, N); an empty
        slot has weight 0 (log -inf). w_v = (c_v / N) p_T(v) / q(v), q = softmax(z / sample_temperature)."""
        key = f"sampled@{T}"
        if key not in self._fields:
            lp1 = self.field("sample_logprobs")
            counts = self.field("sample_counts").to(lp1.dtype)
            z = lp1 + self.field("logsumexp")[..., None]  # the teacher's logits at the drawn ids
            tau = self.capture.get("sample_temperature", 1.0)
            lp_t = lp1 if T == 1.0 else z / T - self.lse(T)[..., None]
            lq = lp1 if tau == 1.0 else z / tau - self.lse(tau)[..., None]
            n = counts.sum(-1, keepdim=True).clamp(min=1)  # N at every real position
            log_w = torch.where(counts > 0, (counts / n).log() + lp_t - lq, -torch.inf)
            self._fields[key] = (self.field("sample_ids").long(), lp_t, log_w)
        return self._fields[key]

    def classes(self, T: float = 1.0) -> torch.Tensor:
        """A classifier's log-probs over every class at temperature T, (B, C) or (B, L, C); exact at any T."""
        key = f"classes@{T}"
        if key not in self._fields:
            i = self.tempered_index(T) if T != 1.0 else None
            lse_T = None if i is None else self.field("class_logsumexp_tempered")[:, i]
            self._fields[key] = L.teacher_class_logprobs(self.field("class_logprobs"), self.field("class_logsumexp"),
                                                         T, lse_T)
        return self._fields[key]

    def topk(self, T: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        if T not in self._topk:
            i = self.tempered_index(T) if T != 1.0 else None
            lse_T = self.field("logsumexp_tempered")[:, i] if i is not None else None
            self._topk[T] = L.teacher_topk_logprobs(self.field("topk_logprobs"), self.field("logsumexp"), T, lse_T)
        return self._topk[T]


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


class StudentOutput:
    """A student's forward pass on one batch and the quantities the terms derive from it."""

    def __init__(self, logits: torch.Tensor, input_ids: torch.Tensor, masks: Masks,
                 hidden: list[torch.Tensor] | None = None, attentions: dict | None = None):
        self.logits, self.input_ids, self.masks = logits, input_ids, masks
        self.hidden = hidden or []  # per hidden pair: the student's state, projected to the teacher's width
        self.attentions = attentions or {}  # student layer -> (B, H_s, L, L) attention probabilities
        self._lse: dict[float, torch.Tensor] = {}
        self._topk: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self._next: torch.Tensor | None = None

    def lse(self, T: float = 1.0) -> torch.Tensor:
        if T not in self._lse:
            self._lse[T] = L.logsumexp_t(self.logits, T)
        return self._lse[T]

    def next_logprobs(self) -> torch.Tensor:
        """(B, L) log p_student(true next token); the last position wraps and is masked by `masks.ce`."""
        if self._next is None:
            self._next = L.next_token_logprobs(self.logits, self.input_ids, self.lse(1.0))
        return self._next

    def topk(self, ids: torch.Tensor, T: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs at the teacher's ids and the student's tail bucket, at temperature T."""
        if T not in self._topk:
            self._topk[T] = L.student_topk_logprobs(self.logits, ids, T, lse=self.lse(T))
        return self._topk[T]

    def largest(self, k: int, T: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's own k largest log-probs (B, L, k) and the log of its mass beyond them, at T."""
        key = ("largest", k, T)
        if key not in self._topk:
            z = self.logits.topk(min(k, self.logits.shape[-1]), dim=-1).values
            lp = L._acc(z) / T - self.lse(T)[..., None]
            self._topk[key] = lp, L.log1mexp(torch.logsumexp(lp, dim=-1))
        return self._topk[key]

    def at(self, ids: torch.Tensor, T: float = 1.0) -> torch.Tensor:
        """Log-probs (B, L, K) at student ids (-1 read as id 0), at T."""
        return L._acc(self.logits.gather(-1, ids.clamp(min=0))) / T - self.lse(T)[..., None]


@dataclass
class Wiring:
    """A student's representation-distillation wiring (empty when it uses none)."""

    hidden: list[tuple[int, int]] = field(default_factory=list)  # (student hidden index, cached position)
    attention: list[tuple[int, int]] = field(default_factory=list)  # (student layer, cached position)
    projections: torch.nn.ModuleList = field(default_factory=torch.nn.ModuleList)
    hidden_encoding: str | None = None
    bidirectional: bool = False  # an encoder cache: attention maps cover every real key, not only key <= query
    cross: bool = False  # the student has another tokenizer: its positions are aligned with the teacher's
    vocab_map: object = None  # crosstok.VocabMap, teacher id -> student id (None: the same vocabulary)


@dataclass(frozen=True)
class Context:
    """What a term may know besides the two signals: the student's settings and its wiring."""

    spec: object  # StudentConfig
    wiring: Wiring


# ---------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class Term:
    name: str
    description: str
    fields: tuple[str, ...]  # cache fields read
    student: frozenset[str]  # of the student: "logits", "hidden_states", "attentions"
    tempered: bool  # reads the teacher's top-K at the student's temperature (logsumexp_tempered when captured)
    capture_keys: tuple[str, ...]  # capture settings its values depend on (must agree across a run's caches)
    compute: Callable[[StudentOutput, TeacherSignal, Context], torch.Tensor]
    # fields it reads besides `fields` that depend on how the cache was captured (spec, manifest) -> names;
    # raises StudentError for a cache it cannot be computed from
    cache_fields: Callable[[object, dict], list[str]] | None = None
    # on a classification cache (sequence or token): the fields read and the computation (None: not defined there)
    class_fields: tuple[str, ...] | None = None
    class_compute: Callable[[StudentOutput, TeacherSignal, Context], torch.Tensor] | None = None
    cross_tokenizer: bool = False  # defined for a student with another tokenizer than the cache's

    def fields_for_task(self, task: str) -> tuple[str, ...]:
        return self.fields if task == "causal-lm" else self.class_fields

    def computes(self, task: str) -> bool:
        return task == "causal-lm" or self.class_compute is not None


TERMS: dict[str, Term] = {}


def term(name: str, description: str, fields: tuple[str, ...] = (), student=("logits",), tempered: bool = False,
         capture_keys: tuple[str, ...] = (), cache_fields: Callable[[object, dict], list[str]] | None = None,
         cross_tokenizer: bool = False):
    def register(fn):
        if name in TERMS:
            raise ValueError(f"loss term {name!r} registered twice")
        TERMS[name] = Term(name, description, tuple(fields), frozenset(student), tempered, tuple(capture_keys), fn,
                           cache_fields, cross_tokenizer=cross_tokenizer)
        return fn
    return register


def for_classification(name: str, fields: tuple[str, ...] | None = None):
    """What term `name` (registered above) computes on a classification cache; without a function (used as a
    plain call), the same computation as on a causal LM (representation terms)."""
    def register(fn=None):
        t = TERMS[name]
        TERMS[name] = replace(t, class_fields=t.fields if fields is None else tuple(fields),
                              class_compute=fn or t.compute)
        return fn
    return register


CLASS_FIELDS = ("class_logprobs", "class_logsumexp")


@term("ce", "cross-entropy on the true next token (hard labels); classification: on the gold labels",
      cross_tokenizer=True)
def _ce(out, sig, ctx):
    return L.cross_entropy(out.next_logprobs(), out.masks.ce)


@for_classification("ce", fields=())
def _ce_classes(out, sig, ctx):
    return L.class_cross_entropy(out.logits, sig.field("labels"), out.masks.ce)


def _class_divergence(out, sig, ctx, kind: str) -> torch.Tensor:
    T = ctx.spec.temperature
    return L.class_divergence(sig.classes(T), out.logits, out.masks.kd, T, kind, ctx.spec.jsd_beta)


def _pair(out: StudentOutput, sig: TeacherSignal, ctx: Context):
    T = ctx.spec.temperature
    t_lp, t_tail = sig.topk(T)
    s_lp, s_tail = out.topk(sig.topk_ids, T)
    return t_lp, t_tail, s_lp, s_tail, T


@term("kd_forward", "KL(teacher || student) over the top-K ids + exact tail bucket, x T^2", TOPK_FIELDS, tempered=True)
def _kd_forward(out, sig, ctx):
    t_lp, t_tail, s_lp, s_tail, T = _pair(out, sig, ctx)
    return L.forward_kl(t_lp, t_tail, s_lp, s_tail, out.masks.kd, T)


@for_classification("kd_forward", CLASS_FIELDS)
def _kd_forward_classes(out, sig, ctx):
    return _class_divergence(out, sig, ctx, "forward")


@term("kd_forward_renorm", "KL over the top-K ids renormalised, tail ignored (biased), x T^2", TOPK_FIELDS,
      tempered=True)
def _kd_forward_renorm(out, sig, ctx):
    t_lp, _, s_lp, _, T = _pair(out, sig, ctx)
    return L.forward_kl_renormalized(t_lp, s_lp, out.masks.kd, T)


@term("kd_reverse", "KL(student || teacher) over the top-K ids + tail bucket, x T^2", TOPK_FIELDS, tempered=True)
def _kd_reverse(out, sig, ctx):
    t_lp, t_tail, s_lp, s_tail, T = _pair(out, sig, ctx)
    return L.reverse_kl(t_lp, t_tail, s_lp, s_tail, out.masks.kd, T)


@for_classification("kd_reverse", CLASS_FIELDS)
def _kd_reverse_classes(out, sig, ctx):
    return _class_divergence(out, sig, ctx, "reverse")


@term("kd_jsd", "generalised Jensen-Shannon (jsd_beta) over the top-K ids + tail bucket, x T^2", TOPK_FIELDS,
      tempered=True)
def _kd_jsd(out, sig, ctx):
    t_lp, t_tail, s_lp, s_tail, T = _pair(out, sig, ctx)
    return L.jsd(t_lp, t_tail, s_lp, s_tail, out.masks.kd, ctx.spec.jsd_beta, T)


@for_classification("kd_jsd", CLASS_FIELDS)
def _kd_jsd_classes(out, sig, ctx):
    return _class_divergence(out, sig, ctx, "jsd")


@term("uld", "Universal Logit Distillation: Wasserstein-1 between the sorted teacher (top-K + exact tail) and "
      "student probability vectors, vocabulary-agnostic (any tokenizer), x T^2", TOPK_FIELDS, tempered=True,
      cross_tokenizer=True)
def _uld(out, sig, ctx):
    T = ctx.spec.temperature
    t_lp, t_tail = sig.topk(T)
    s_lp, s_tail = out.largest(t_lp.shape[-1], T)
    return L.uld(t_lp, t_tail, s_lp, s_tail, out.masks.kd, T)


def mapped_ids(sig: TeacherSignal, ctx: Context) -> torch.Tensor:
    """The student id of each of the teacher's top-K ids (-1: none): the ids themselves for the same vocabulary."""
    vmap = ctx.wiring.vocab_map
    return sig.topk_ids if vmap is None else vmap.ids.to(sig.device)[sig.topk_ids]


@term("kd_mapped", "KL(teacher || student) with the teacher's top-K mapped into the student's vocabulary through "
      "the tokens' text (GOLD's first-piece rule), unmapped mass in the tail bucket, x T^2", TOPK_FIELDS,
      tempered=True, cross_tokenizer=True)
def _kd_mapped(out, sig, ctx):
    T = ctx.spec.temperature
    t_lp, t_tail = sig.topk(T)
    mapped = mapped_ids(sig, ctx)
    return L.mapped_forward_kl(t_lp, t_tail, mapped, out.at(mapped, T), out.masks.kd, T)


@term("mse_logprobs", "squared error of log-probs at the top-K ids", TOPK_FIELDS, tempered=True)
def _mse_logprobs(out, sig, ctx):
    t_lp, _, s_lp, _, _ = _pair(out, sig, ctx)
    return L.mse_logprobs(t_lp, s_lp, out.masks.kd)


@term("mse_logits", "squared error of centred logits at the top-K ids", TOPK_FIELDS)
def _mse_logits(out, sig, ctx):
    t_logits = sig.field("topk_logprobs") + sig.field("logsumexp")[..., None]
    return L.mse_logits(t_logits, out.logits.gather(-1, sig.topk_ids).float(), out.masks.kd)


@for_classification("mse_logits", CLASS_FIELDS)
def _mse_logits_classes(out, sig, ctx):
    t_logits = sig.field("class_logprobs") + sig.field("class_logsumexp")[..., None]
    return L.mse_logits(t_logits, out.logits.float(), out.masks.kd)


def _sampled_fields(spec, manifest: dict) -> list[str]:
    """The importance weights need logsumexp at the student's T and the proposal's: both exact, never
    approximated, so T must be 1 or captured; the proposal's was captured by construction."""
    cap = manifest["capture"]
    if spec.temperature != 1.0 and spec.temperature not in cap["temperatures"]:
        raise StudentError(f"student {spec.name!r}: kd_sampled at temperature {spec.temperature} needs that "
                           f"temperature's logsumexp, which the cache did not capture (captured: "
                           f"{cap['temperatures_all']}); use one of those")
    return ["logsumexp_tempered"] if cap.get("sample_temperature", 1.0) != 1.0 else []


@term("kd_sampled", "KL(teacher || student) estimated from the sampled targets by importance sampling "
      "(unbiased, full-vocabulary student softmax), x T^2", ("sample_ids", "sample_counts", "sample_logprobs",
                                                             "logsumexp"), tempered=True,
      capture_keys=("samples", "sample_temperature"), cache_fields=_sampled_fields)
def _kd_sampled(out, sig, ctx):
    T = ctx.spec.temperature
    ids, t_lp, log_w = sig.sampled(T)
    s_lp = out.logits.gather(-1, ids).float() / T - out.lse(T)[..., None]
    return L.sampled_kl(t_lp, s_lp, log_w, out.masks.kd, T)


def _full(out: StudentOutput, sig: TeacherSignal, ctx: Context, kind: str) -> torch.Tensor:
    if sig.head is None:
        raise StudentError(f"student {ctx.spec.name!r}: full-vocabulary terms need the cache's LM head (not loaded)")
    h = sig.head.decode(sig.field("final_hidden"))  # (B, L, d) float32
    return L.full_divergence(sig.head, h, out.logits, out.masks.kd, ctx.spec.temperature, kind, ctx.spec.jsd_beta)


FULL_FIELDS = ("final_hidden",)


@term("kd_full_forward", "KL(teacher || student) over the whole vocabulary, the teacher's distribution recomputed "
      "from its cached final hidden state and LM head (exact), x T^2", FULL_FIELDS)
def _kd_full_forward(out, sig, ctx):
    return _full(out, sig, ctx, "forward")


@term("kd_full_reverse", "KL(student || teacher) over the whole vocabulary (exact, from the cached final hidden "
      "state and LM head), x T^2", FULL_FIELDS)
def _kd_full_reverse(out, sig, ctx):
    return _full(out, sig, ctx, "reverse")


@term("kd_full_jsd", "generalised Jensen-Shannon (jsd_beta) over the whole vocabulary (exact, from the cached final "
      "hidden state and LM head), x T^2", FULL_FIELDS)
def _kd_full_jsd(out, sig, ctx):
    return _full(out, sig, ctx, "jsd")


@term("nll_match", "squared difference of student and teacher NLL of the true next token", ("target_logprob",))
def _nll_match(out, sig, ctx):
    t_tgt = sig.field("target_logprob")
    return L.nll_match(out.next_logprobs(), t_tgt, out.masks.ce & torch.isfinite(t_tgt))


HIDDEN_KEYS = ("hidden_layers", "hidden_dtype")
ATTENTION_KEYS = ("attention_layers", "attention_heads_stored")


def _hidden(out: StudentOutput, sig: TeacherSignal, ctx: Context, fn) -> torch.Tensor:
    cached = sig.field("hidden_states")  # (B, n_cached, L, d_t) in its stored dtype
    scale = sig.field("hidden_scale") if ctx.wiring.hidden_encoding == "int8-scaled" else None  # (B, n_cached, L)
    parts = [fn(out.hidden[i], decode_hidden(cached[:, j], ctx.wiring.hidden_encoding,
                                             None if scale is None else scale[:, j]), out.masks.rep)
             for i, (_, j) in enumerate(ctx.wiring.hidden)]
    return torch.stack(parts).mean()


def _hidden_scale(spec, manifest: dict) -> list[str]:
    """int8 hidden states come with their per-position scale."""
    return ["hidden_scale"] if manifest["fields"].get("hidden_states", {}).get("encoding") == "int8-scaled" else []


@term("hidden_mse", "MSE of (projected) student and cached teacher hidden states, mapped layers",
      ("hidden_states",), student=("hidden_states",), capture_keys=HIDDEN_KEYS, cache_fields=_hidden_scale,
      cross_tokenizer=True)
def _hidden_mse(out, sig, ctx):
    return _hidden(out, sig, ctx, L.hidden_mse)


@term("hidden_cosine", "1 - cosine of (projected) student and cached teacher hidden states, mapped layers",
      ("hidden_states",), student=("hidden_states",), capture_keys=HIDDEN_KEYS, cache_fields=_hidden_scale,
      cross_tokenizer=True)
def _hidden_cosine(out, sig, ctx):
    return _hidden(out, sig, ctx, L.hidden_cosine)


def _attention(out: StudentOutput, sig: TeacherSignal, ctx: Context, fn) -> torch.Tensor:
    cached = sig.field("attentions")  # (B, n_cached, H_t, L, L)
    parts = []
    for s, j in ctx.wiring.attention:
        a_t, a_s = map_heads(cached[:, j].float(), out.attentions[s].float(), ctx.spec.attention_heads, ctx.spec.name)
        if ctx.wiring.cross:  # each row as a distribution over the aligned keys, on both sides
            a_t, a_s = over_keys(a_t, out.masks.rep), over_keys(a_s, out.masks.rep)
        parts.append(fn(a_t, a_s, out.masks.rep, causal=not ctx.wiring.bidirectional))
    return torch.stack(parts).mean()


def over_keys(a: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Attention rows (B, H, L, L) restricted to the keys where `keys` (B, L) and renormalised over them."""
    a = a * keys[:, None, None, :].to(a.dtype)
    return a / a.sum(-1, keepdim=True).clamp(min=1e-12)


@term("attn_kl", "KL(teacher || student) of attention rows (MiniLM), mapped layers and head groups",
      ("attentions",), student=("attentions",), capture_keys=ATTENTION_KEYS, cross_tokenizer=True)
def _attn_kl(out, sig, ctx):
    return _attention(out, sig, ctx, L.attention_kl)


@term("attn_mse", "MSE of attention probabilities (TinyBERT), mapped layers and head groups",
      ("attentions",), student=("attentions",), capture_keys=ATTENTION_KEYS, cross_tokenizer=True)
def _attn_mse(out, sig, ctx):
    return _attention(out, sig, ctx, L.attention_mse)


for _name in ("hidden_mse", "hidden_cosine", "attn_kl", "attn_mse"):  # positions of real tokens, any task
    for_classification(_name)()


# ---------------------------------------------------------------------------------------------
# derived from the registry

# terms that see the teacher's top-K alone (its tail ignored: biased), and what anchors the student's whole
# distribution besides them: the true next token, or a KD term that accounts for all of the teacher's mass
TAIL_FREE = frozenset({"kd_forward_renorm", "mse_logprobs", "mse_logits"})
ANCHORS = frozenset({"ce", "uld", "kd_mapped", "kd_forward", "kd_reverse", "kd_jsd", "kd_sampled", "kd_full_forward",
                     "kd_full_reverse", "kd_full_jsd"})


def anchored(names) -> bool:
    return bool(set(names) & ANCHORS)



def active(spec) -> list[Term]:
    """The terms a student computes: those with a positive weight."""
    return [TERMS[n] for n, w in spec.losses.items() if w > 0]


def student_needs(spec) -> set[str]:
    return set().union(*(t.student for t in active(spec)))


def reads_tempered(spec) -> bool:
    return any(t.tempered for t in active(spec))


def capture_keys(spec) -> set[str]:
    return set().union(*(t.capture_keys for t in active(spec)))


def tempered_index(spec, manifest: dict) -> int | None:
    """Where the student's temperature sits in the cache's logsumexp_tempered (None: not captured)."""
    temps = manifest["capture"]["temperatures"]
    return temps.index(spec.temperature) if spec.temperature in temps else None


def fields_for(spec, manifest: dict, cross: bool = False) -> list[str]:
    """The cache fields this student's terms read; refuses a term whose field the cache lacks, a term not
    defined for the cache's task, or (`cross`: the student has another tokenizer) one that compares ids."""
    need: list[tuple[str, str]] = []  # (term, field)
    have = set(manifest["fields"])
    task = task_of(manifest)
    if cross:
        wrong = [t.name for t in active(spec) if not t.cross_tokenizer]
        if wrong:
            known = [n for n, t in TERMS.items() if t.cross_tokenizer]
            raise StudentError(f"student {spec.name!r} has another tokenizer than the cache: {', '.join(wrong)} "
                               f"compare{'s' if len(wrong) == 1 else ''} the teacher's token ids with the student's; "
                               f"across tokenizers a student trains with {', '.join(known)}")
    wrong = [t.name for t in active(spec) if not t.computes(task)]
    if wrong:
        known = [n for n, t in TERMS.items() if t.computes(task)]
        raise StudentError(f"student {spec.name!r}: {', '.join(wrong)} {'is a' if len(wrong) == 1 else 'are'} "
                           f"next-token term{'s' if len(wrong) > 1 else ''}; a {task} cache trains with "
                           f"{', '.join(known)}")
    for t in active(spec):
        fields = t.fields_for_task(task)
        need += [(t.name, f) for f in fields]
        if t.tempered and spec.temperature != 1.0 and tempered_index(spec, manifest) is not None:
            need.append((t.name, "logsumexp_tempered" if task == "causal-lm" else "class_logsumexp_tempered"))
        if t.cache_fields is not None and set(fields) <= have:  # else its own fields are refused below
            need += [(t.name, f) for f in t.cache_fields(spec, manifest)]
    for name, f in need:
        if f not in have:
            raise StudentError(f"student {spec.name!r}: loss {name} needs field {f!r}, which the cache does not "
                               f"hold (captured: {', '.join(sorted(have))})")
    return list(dict.fromkeys(f for _, f in need))


def compute(spec, out: StudentOutput, sig: TeacherSignal, wiring: Wiring) -> dict[str, torch.Tensor]:
    """Named values of the student's active terms (unweighted) and 'total', their weighted sum."""
    ctx = Context(spec, wiring)
    classify = sig.task != "causal-lm"
    values = {t.name: (t.class_compute if classify else t.compute)(out, sig, ctx) for t in active(spec)}
    values["total"] = sum(spec.losses[k] * v for k, v in values.items())
    return values
