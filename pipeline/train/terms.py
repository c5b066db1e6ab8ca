"""The loss terms a student trains with, each declared once, in `TERMS`.

A `Term` names itself, says how it is computed on a causal-LM cache and (where it is defined there)
on a classification cache, each `Computation` naming the cache fields it reads; what of the student it needs
(logits, hidden states, attention maps); the capture settings its values depend on; whether it is
defined across tokenizers; and whether it ignores the teacher's tail (`tail_free`) or accounts for a
whole distribution (`anchors`). Everything else is derived from `TERMS`: the names a config may use
(`check_losses`), the fields a run reads (`fields_for`), whether a student's forward pass records
hidden states or attention maps, which capture settings several caches of one run must share.
Adding a loss is one function in `computations.py` and one `Term(...)` entry here.

Terms with weight 0 are not computed and their fields not read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import StudentError
from ..format.manifest import Manifest
from . import losses
from .computations import (Compute, attention_term, ce, ce_classes, class_divergence, full_divergence,
                           hidden_scale_fields, hidden_term, kd_mapped, kd_positions, kd_sampled, matched_positions,
                           mse_logits, mse_logits_classes, next_token_positions, nll_match, sampled_fields,
                           topk_divergence, uld)
from .fused import fused_terms
from .signal import Context, StudentOutput, TeacherSignal, Wiring

TOPK_FIELDS = ("topk_ids", "topk_logprobs", "logsumexp")
CLASS_FIELDS = ("class_logprobs", "class_logsumexp")
FULL_FIELDS = ("final_hidden",)
HIDDEN_KEYS = ("hidden_layers", "hidden_dtype")
ATTENTION_KEYS = ("attention_layers", "attention_heads_stored")



@dataclass(frozen=True)
class Computation:
    """How a term is computed on one kind of cache: the cache fields it reads, the function, and the positions its
    masked mean is over (a function of the student's output and the signal that never reads the logits: a term
    fused with the head needs its batch's count before its first block)."""

    fields: tuple[str, ...]
    compute: Compute
    positions: Callable = kd_positions


@dataclass(frozen=True)
class Term:
    name: str
    description: str
    causal: Computation  # on a causal-LM cache
    classes: Computation | None = None  # on a classification cache (sequence or token); None: not defined there
    student: frozenset[str] = frozenset({"logits"})  # of the student: "logits", "hidden_states", "attentions"
    tempered: bool = False  # reads the teacher's top-K at the student's temperature (its logsumexp when captured)
    capture_keys: tuple[str, ...] = ()  # capture settings its values depend on (must agree across a run's caches)
    # fields it reads besides its own that depend on how the cache was captured: (spec, manifest) -> names;
    # raises StudentError for a cache it cannot be computed from
    cache_fields: Callable[[object, Manifest], list[str]] | None = None
    cross_tokenizer: bool = False  # defined for a student with another tokenizer than the cache's
    tail_free: bool = False  # sees the teacher's top-K alone, its tail ignored (biased)
    anchors: bool = False  # accounts for a whole distribution (the data's, or all of the teacher's mass)

    def on(self, task: str) -> Computation | None:
        return self.causal if task == "causal-lm" else self.classes

    def computes(self, task: str) -> bool:
        return self.on(task) is not None


# ---------------------------------------------------------------------------------------------
# the registry


def registry(*terms: Term) -> dict[str, Term]:
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"loss terms registered twice: {sorted(n for n in names if names.count(n) > 1)}")
    return {t.name: t for t in terms}


def _representation(name: str, description: str, compute: Compute, field: str, needs: str, keys, **kw) -> Term:
    """A hidden-state or attention term: the same computation on every kind of cache, any tokenizer."""
    both = Computation((field,), compute)
    return Term(name, description, both, classes=both, student=frozenset({needs}), capture_keys=keys,
                cross_tokenizer=True, **kw)


TERMS: dict[str, Term] = registry(
    Term("ce", "cross-entropy on the true next token (hard labels); classification: on the gold labels",
         Computation((), ce, next_token_positions), classes=Computation((), ce_classes), cross_tokenizer=True, anchors=True),
    Term("kd_forward", "KL(teacher || student) over the top-K ids + exact tail bucket, x T^2",
         Computation(TOPK_FIELDS, topk_divergence("forward")), classes=Computation(CLASS_FIELDS, class_divergence("forward")),
         tempered=True, anchors=True),
    Term("kd_forward_renorm", "KL over the top-K ids renormalised, tail ignored (biased), x T^2",
         Computation(TOPK_FIELDS, topk_divergence("renorm")), tempered=True, tail_free=True),
    Term("kd_reverse", "KL(student || teacher) over the top-K ids + tail bucket, x T^2",
         Computation(TOPK_FIELDS, topk_divergence("reverse")), classes=Computation(CLASS_FIELDS, class_divergence("reverse")),
         tempered=True, anchors=True),
    Term("kd_jsd", "generalised Jensen-Shannon (jsd_beta) over the top-K ids + tail bucket, x T^2",
         Computation(TOPK_FIELDS, topk_divergence("jsd")), classes=Computation(CLASS_FIELDS, class_divergence("jsd")),
         tempered=True, anchors=True),
    Term("uld", "Universal Logit Distillation: Wasserstein-1 between the sorted teacher (top-K + exact tail) and "
         "student probability vectors, vocabulary-agnostic (any tokenizer), x T^2", Computation(TOPK_FIELDS, uld),
         tempered=True, cross_tokenizer=True, anchors=True),
    Term("kd_mapped", "KL(teacher || student) with the teacher's top-K mapped into the student's vocabulary through "
         "the tokens' text (GOLD's first-piece rule), unmapped mass in the tail bucket, x T^2",
         Computation(TOPK_FIELDS, kd_mapped), tempered=True, cross_tokenizer=True, anchors=True),
    Term("mse_logprobs", "squared error of log-probs at the top-K ids", Computation(TOPK_FIELDS, topk_divergence("mse")),
         tempered=True, tail_free=True),
    Term("mse_logits", "squared error of centred logits at the top-K ids", Computation(TOPK_FIELDS, mse_logits),
         classes=Computation(CLASS_FIELDS, mse_logits_classes), tail_free=True),
    Term("kd_sampled", "KL(teacher || student) estimated from the sampled targets by importance sampling "
         "(unbiased, full-vocabulary student softmax), x T^2",
         Computation(("sample_ids", "sample_counts", "sample_logprobs", "logsumexp"), kd_sampled), tempered=True,
         capture_keys=("samples", "sample_temperature"), cache_fields=sampled_fields, anchors=True),
    Term("kd_full_forward", "KL(teacher || student) over the whole vocabulary, the teacher's distribution recomputed "
         "from its cached final hidden state and LM head (exact), x T^2",
         Computation(FULL_FIELDS, full_divergence("forward")), anchors=True),
    Term("kd_full_reverse", "KL(student || teacher) over the whole vocabulary (exact, from the cached final hidden "
         "state and LM head), x T^2", Computation(FULL_FIELDS, full_divergence("reverse")), anchors=True),
    Term("kd_full_jsd", "generalised Jensen-Shannon (jsd_beta) over the whole vocabulary (exact, from the cached "
         "final hidden state and LM head), x T^2", Computation(FULL_FIELDS, full_divergence("jsd")), anchors=True),
    Term("nll_match", "squared difference of student and teacher NLL of the true next token",
         Computation(("target_logprob",), nll_match, matched_positions)),
    _representation("hidden_mse", "MSE of (projected) student and cached teacher hidden states, mapped layers",
                    hidden_term(losses.hidden_mse), "hidden_states", "hidden_states", HIDDEN_KEYS,
                    cache_fields=hidden_scale_fields),
    _representation("hidden_cosine", "1 - cosine of (projected) student and cached teacher hidden states, mapped "
                    "layers", hidden_term(losses.hidden_cosine), "hidden_states", "hidden_states", HIDDEN_KEYS,
                    cache_fields=hidden_scale_fields),
    _representation("attn_kl", "KL(teacher || student) of attention rows (MiniLM), mapped layers and head groups",
                    attention_term(losses.attention_kl), "attentions", "attentions", ATTENTION_KEYS),
    _representation("attn_mse", "MSE of attention probabilities (TinyBERT), mapped layers and head groups",
                    attention_term(losses.attention_mse), "attentions", "attentions", ATTENTION_KEYS),
)


# ---------------------------------------------------------------------------------------------
# derived from the registry


def check_losses(spec) -> None:
    """Refuse a student whose `losses` name a term that does not exist, or whose only distribution terms ignore
    the teacher's tail with nothing to anchor the student's whole distribution (unless allowed)."""
    on = active(spec)  # refuses unknown names
    tail_free = sorted(t.name for t in on if t.tail_free)
    if tail_free and not any(t.anchors for t in on) and not spec.allow_biased_kd and spec.task in (None, "causal-lm"):
        raise StudentError(
            f"student {spec.name!r}: {', '.join(tail_free)} ignores the teacher's tail and nothing "
            "anchors the student's full distribution (no ce, no tail-aware KD term): in benchmarks/bench_targets.py "
            "a teacher-initialised student on kd_forward_renorm alone ended at validation NLL 11.9 and top-1 "
            "agreement 0, against 6.0 with kd_forward. Add ce (or kd_forward), or set allow_biased_kd = true to "
            "train it anyway (a classifier's class distribution is stored whole: set task for it)")


def active(spec) -> list[Term]:
    """The terms a student computes: those with a positive weight (an unknown name is refused)."""
    unknown = [k for k in spec.losses if k not in TERMS]
    if unknown:
        raise StudentError(f"student {spec.name!r}: unknown loss terms {unknown} (known: {', '.join(TERMS)})")
    return [TERMS[n] for n, w in spec.losses.items() if w > 0]


def student_needs(spec) -> set[str]:
    return set().union(*(t.student for t in active(spec)))


def reads_tempered(spec) -> bool:
    return any(t.tempered for t in active(spec))


def capture_keys(spec) -> set[str]:
    return set().union(*(t.capture_keys for t in active(spec)))


def on_import(term: Term, manifest: Manifest, temperature: float = 1.0) -> tuple[str, str]:
    """("exact" | "approximate" | "unavailable", why) of a term on a cache `distill import` made, from what its
    source gave (manifest.imported); ("exact", "") on a capture's cache."""
    imp = manifest.imported
    if imp is None:
        return "exact", ""
    fields = term.on(manifest.task.type).fields if term.computes(manifest.task.type) else ()
    missing = [f for f in fields if f not in manifest.fields]
    if missing:
        return "unavailable", f"the import has no {', '.join(missing)}"
    needs_lse = "logsumexp" in fields and (term.name in ("mse_logits", "kd_sampled")
                                           or (term.tempered and temperature != 1.0))
    if needs_lse and not imp.logsumexp:
        return "unavailable", ("it needs the teacher's logits (logsumexp), which the source did not give"
                               + (f" (at temperature {temperature})" if term.tempered and temperature != 1.0 else ""))
    if not imp.tail_known and "topk_logprobs" in fields and term.name != "kd_forward_renorm":
        return "approximate", ("the source's log-probs were renormalised over the K ids: the teacher's tail is taken "
                               "as empty" if term.anchors else "the source's log-probs were renormalised over the K "
                               "ids, so they are not the teacher's")
    if imp.lossy and {"topk_logprobs", "target_logprob"} & set(fields):
        return "approximate", (f"the source's compression kept {imp.exact_entries or 0} of the {imp.top_k} log-probs "
                               "per position exactly and approximated the rest (import with --top-k "
                               f"{imp.compression.get('exact_k')} to keep the exact ones only, when they are float32)")
    if imp.temperature != 1.0 and fields:
        return "approximate", (f"the source's log-probs are the teacher's at temperature {imp.temperature}: the "
                               "student trains against that distribution")
    if term.tempered and temperature != 1.0 and manifest.capture.tempered_index(temperature) is None:
        return "approximate", (f"temperature {temperature} was not captured: the teacher's tempered tail is "
                               "approximated (as on any cache without that temperature)")
    return "exact", ""


def fields_for(spec, manifest: Manifest, cross: bool = False) -> list[str]:
    """The cache fields this student's terms read; refuses a term whose field the cache lacks, a term not
    defined for the cache's task, or (`cross`: the student has another tokenizer) one that compares ids."""
    check_losses(spec)
    task = manifest.task.type
    _check_defined(spec, task, cross)
    have = set(manifest.fields)
    need: list[tuple[str, str]] = []  # (term, field)
    for t in active(spec):
        fields = t.on(task).fields
        need += [(t.name, f) for f in fields]
        if t.tempered and spec.temperature != 1.0 and manifest.capture.tempered_index(spec.temperature) is not None:
            need.append((t.name, "logsumexp_tempered" if task == "causal-lm" else "class_logsumexp_tempered"))
        if t.cache_fields is not None and set(fields) <= have:  # else its own fields are refused below
            need += [(t.name, f) for f in t.cache_fields(spec, manifest)]
    _check_import(spec, manifest)
    for name, f in need:
        if f not in have:
            raise StudentError(f"student {spec.name!r}: loss {name} needs field {f!r}, which the cache does not "
                               f"hold (captured: {', '.join(sorted(have))})")
    return list(dict.fromkeys(f for _, f in need))


def _check_import(spec, manifest: Manifest) -> None:
    """On an imported cache: refuse the terms its source cannot give, warn of the approximate ones."""
    for t in active(spec):
        status, why = on_import(t, manifest, spec.temperature)
        if status == "unavailable":
            raise StudentError(f"student {spec.name!r}: loss {t.name} cannot be computed on this imported cache: "
                               f"{why}")
        if status == "approximate":
            warnings.warn(f"student {spec.name!r}: loss {t.name} is approximate on this imported cache: {why}",
                          stacklevel=2)


def _check_defined(spec, task: str, cross: bool) -> None:
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


def compute(spec, out: StudentOutput, sig: TeacherSignal, wiring: Wiring) -> dict[str, torch.Tensor]:
    """Named values of the student's active terms (unweighted) and 'total', their weighted sum. A student whose
    logits are not materialised (`out.blockwise`) has its logit terms computed in blocks fused with its head
    (`fused.fused_terms`): their values are detached there, and their weighted sum carries the gradient."""
    ctx = Context(spec, wiring)
    on = active(spec)
    reads_logits = [t for t in on if "logits" in t.student] if out.blockwise else []
    values = {t.name: t.on(sig.task).compute(out, sig, ctx) for t in on if t not in reads_logits}
    total = sum(spec.losses[k] * v for k, v in values.items())
    if reads_logits:
        fused, fused_total = fused_terms(reads_logits, [spec.losses[t.name] for t in reads_logits], out, sig, ctx)
        values |= fused
        total = total + fused_total
    values = {t.name: values[t.name] for t in on}  # the config's order
    values["total"] = total
    return values
