"""What each loss term computes: a function of the student's output, the teacher's signal and the term's
`Context` (settings, wiring), returning the term's masked mean over its positions; and the cache fields some
terms read depending on how the cache was captured. `terms.TERMS` declares which term uses which.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import StudentError
from ..format.manifest import Manifest
from . import losses
from .representation import decode_hidden, map_heads
from .signal import Context, StudentOutput, TeacherSignal

Compute = Callable[[StudentOutput, TeacherSignal, Context], torch.Tensor]



def kd_positions(out, sig) -> torch.Tensor:
    """The positions a term over the teacher's distribution averages over: every position with targets."""
    return out.masks.kd


def next_token_positions(out, sig) -> torch.Tensor:
    """The positions a next-token term averages over: those with a next token."""
    return out.masks.ce


def matched_positions(out, sig) -> torch.Tensor:
    """nll_match's positions: a next token and the teacher's log-prob of it."""
    return out.masks.ce & torch.isfinite(sig.field("target_logprob"))


def ce(out, sig, ctx):
    return losses.cross_entropy(out.next_logprobs(), out.masks.ce, counts=ctx.counts)


def ce_classes(out, sig, ctx):
    return losses.class_cross_entropy(out.logits, sig.field("labels"), out.masks.ce, counts=ctx.counts)


def topk_divergence(kind: str) -> Compute:
    """A divergence over the teacher's top-K ids + exact tail bucket, at the student's temperature."""
    def compute(out, sig, ctx):
        T = ctx.spec.temperature
        t, s = sig.topk(T), out.topk(sig.topk_ids, T)
        if kind == "forward":
            return losses.forward_kl(t.logprobs, t.log_tail, s.logprobs, s.log_tail, out.masks.kd, T, counts=ctx.counts)
        if kind == "reverse":
            return losses.reverse_kl(t.logprobs, t.log_tail, s.logprobs, s.log_tail, out.masks.kd, T, counts=ctx.counts)
        if kind == "jsd":
            return losses.jsd(t.logprobs, t.log_tail, s.logprobs, s.log_tail, out.masks.kd, ctx.spec.jsd_beta, T,
                              counts=ctx.counts)
        if kind == "renorm":
            return losses.forward_kl_renormalized(t.logprobs, s.logprobs, out.masks.kd, T, counts=ctx.counts)
        return losses.mse_logprobs(t.logprobs, s.logprobs, out.masks.kd, counts=ctx.counts)

    if kind not in ("forward", "reverse", "jsd", "renorm", "mse"):
        raise ValueError(f"unknown top-K divergence {kind!r}")
    return compute


def class_divergence(kind: str) -> Compute:
    """A divergence over every class (a classifier's distribution is stored whole: exact at any T)."""
    def compute(out, sig, ctx):
        T = ctx.spec.temperature
        return losses.class_divergence(sig.classes(T), out.logits, out.masks.kd, T, kind, ctx.spec.jsd_beta,
                                       counts=ctx.counts)
    return compute


def uld(out, sig, ctx):
    T = ctx.spec.temperature
    t = sig.topk(T)
    s = out.largest(t.logprobs.shape[-1], T)
    return losses.uld(t.logprobs, t.log_tail, s.logprobs, s.log_tail, out.masks.kd, T, counts=ctx.counts)


def mapped_ids(sig: TeacherSignal, ctx: Context) -> torch.Tensor:
    """The student id of each of the teacher's top-K ids (-1: none): the ids themselves for the same vocabulary."""
    vmap = ctx.wiring.vocab_map
    return sig.topk_ids if vmap is None else vmap.ids.to(sig.device)[sig.topk_ids]


def kd_mapped(out, sig, ctx):
    T = ctx.spec.temperature
    t = sig.topk(T)
    mapped = mapped_ids(sig, ctx)
    return losses.mapped_forward_kl(t.logprobs, t.log_tail, mapped, out.at(mapped, T), out.masks.kd, T,
                                    counts=ctx.counts)


def mse_logits(out, sig, ctx):
    t_logits = sig.field("topk_logprobs") + sig.field("logsumexp")[..., None]
    return losses.mse_logits(t_logits, losses.upcast(out.logits.gather(-1, sig.topk_ids)), out.masks.kd,
                             counts=ctx.counts)


def mse_logits_classes(out, sig, ctx):
    t_logits = sig.field("class_logprobs") + sig.field("class_logsumexp")[..., None]
    return losses.mse_logits(t_logits, out.logits.float(), out.masks.kd, counts=ctx.counts)


def sampled_fields(spec, manifest: Manifest) -> list[str]:
    """The importance weights need logsumexp at the student's T and the proposal's: both exact, never
    approximated, so T must be 1 or captured; the proposal's was captured by construction."""
    cap = manifest.capture
    if spec.temperature != 1.0 and spec.temperature not in cap.temperatures:
        raise StudentError(f"student {spec.name!r}: kd_sampled at temperature {spec.temperature} needs that "
                           f"temperature's logsumexp, which the cache did not capture (captured: "
                           f"{list(cap.temperatures_all)}); use one of those")
    return ["logsumexp_tempered"] if cap.sample_temperature != 1.0 else []


def kd_sampled(out, sig, ctx):
    T = ctx.spec.temperature
    s = sig.sampled(T)
    s_lp = losses.upcast(out.logits.gather(-1, s.ids)) / T - out.lse(T)[..., None]
    return losses.sampled_kl(s.logprobs, s_lp, s.log_weights, out.masks.kd, T, counts=ctx.counts)


def full_divergence(kind: str) -> Compute:
    """A divergence over the whole vocabulary, the teacher's logits recomputed from its cached final hidden
    state and LM head."""
    def compute(out, sig, ctx):
        if sig.head is None:
            raise StudentError(f"student {ctx.spec.name!r}: full-vocabulary terms need the cache's LM head "
                               "(not loaded)")
        h = sig.head.decode(sig.field("final_hidden"))  # (B, L, d) float32
        return losses.full_divergence(sig.head, h, out.logits, out.masks.kd, ctx.spec.temperature, kind,
                                      ctx.spec.jsd_beta, counts=ctx.counts)
    return compute


def nll_match(out, sig, ctx):
    return losses.nll_match(out.next_logprobs(), sig.field("target_logprob"), matched_positions(out, sig),
                            counts=ctx.counts)


def hidden_scale_fields(spec, manifest: Manifest) -> list[str]:
    """int8 hidden states come with their per-position scale."""
    field = manifest.fields.get("hidden_states")
    return ["hidden_scale"] if field is not None and field.encoding == "int8-scaled" else []


def hidden_term(fn) -> Compute:
    """`fn` over each mapped pair of (projected) student and cached teacher hidden states, averaged."""
    def compute(out, sig, ctx):
        cached = sig.field("hidden_states")  # (B, n_cached, L, d_t) in its stored dtype
        scale = sig.field("hidden_scale") if ctx.wiring.hidden_encoding == "int8-scaled" else None  # (B, n, L)
        parts = [fn(out.hidden[i], decode_hidden(cached[:, j], ctx.wiring.hidden_encoding,
                                                 None if scale is None else scale[:, j]), out.masks.rep)
                 for i, (_, j) in enumerate(ctx.wiring.hidden)]
        return torch.stack(parts).mean()
    return compute


def attention_term(fn) -> Compute:
    """`fn` over each mapped pair of student and cached teacher attention maps (heads grouped), averaged."""
    def compute(out, sig, ctx):
        cached = sig.field("attentions")  # (B, n_cached, H_t, L, L)
        parts = []
        for s, j in ctx.wiring.attention:
            a_t, a_s = map_heads(cached[:, j].float(), out.attentions[s].float(), ctx.spec.attention_heads,
                                 ctx.spec.name)
            if ctx.wiring.cross:  # each row as a distribution over the aligned keys, on both sides
                a_t, a_s = over_keys(a_t, out.masks.rep), over_keys(a_s, out.masks.rep)
            parts.append(fn(a_t, a_s, out.masks.rep, causal=not ctx.wiring.bidirectional))
        return torch.stack(parts).mean()
    return compute


def over_keys(a: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Attention rows (B, H, L, L) restricted to the keys where `keys` (B, L) and renormalised over them."""
    a = a * keys[:, None, None, :].to(a.dtype)
    return a / a.sum(-1, keepdim=True).clamp(min=1e-12)
