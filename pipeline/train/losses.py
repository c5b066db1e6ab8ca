"""Distillation losses: pure functions over tensors, each with a float64 reference in the tests.

Conventions
- Shapes: B rows, L positions, V student vocabulary, K cached teacher ids per position.
- Every loss is a per-token mean over the positions where `mask` is True.
- KD terms compare distributions at temperature T and are multiplied by T**2 (Hinton et al.,
  2015), so their gradient scale does not shrink as T grows; CE is never scaled.
- The support of the top-K losses is the K cached ids plus one "tail" bucket holding all other
  mass. The teacher's tail is exact: 1 - sum(p_topk), p from the cached log-probs, which the
  cached logsumexp makes exact at T=1 and at every captured temperature. The student's tail is
  1 - sum of its own probabilities at the same ids. `forward_kl_renormalized` drops the tail and
  renormalises both sides over the K ids: biased (over-confident students), an explicit option.
- Memory: a student's logits are computed block by block of positions (`fused.fused_terms`, each block's
  gradients made in the forward pass): each loss here sees one block, and its masked mean's count is appended to
  the loss's `counts` list, when given, so that the blocks add up to the mean over the whole batch. Where a student's logits
  are materialised (mutual learning), its logsumexp is still computed in blocks of positions, forward and
  backward (`logsumexp_t`).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: float64 stays float64 (references, gradcheck), anything else -> float32."""
    return x if x.dtype == torch.float64 else x.float()


# ---------------------------------------------------------------------------------------------
# student side


class _LogSumExpT(torch.autograd.Function):
    """logsumexp(z / T) over the last axis in float32, blockwise over positions."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float, block: int) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])  # (N, V) view
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        out = torch.empty(flat.shape[0], dtype=acc, device=logits.device)
        for s in range(0, flat.shape[0], block):
            out[s : s + block] = torch.logsumexp(upcast(flat[s : s + block]) / temperature, dim=-1)
        ctx.save_for_backward(logits, out)
        ctx.temperature, ctx.block = temperature, block
        return out.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, lse = ctx.saved_tensors
        T, block = ctx.temperature, ctx.block
        flat = logits.reshape(-1, logits.shape[-1])
        g = grad.reshape(-1).to(lse.dtype) / T
        out = torch.empty_like(flat)
        for s in range(0, flat.shape[0], block):  # d lse / d z = softmax(z / T) / T
            p = torch.exp(upcast(flat[s : s + block]) / T - lse[s : s + block, None])
            out[s : s + block] = (p * g[s : s + block, None]).to(out.dtype)
        return out.reshape(logits.shape), None, None


def logsumexp_t(logits: torch.Tensor, temperature: float = 1.0, block: int = 1024) -> torch.Tensor:
    """(..., V) -> (...) float32 logsumexp(logits / T), never holding a float32 copy of the logits."""
    return _LogSumExpT.apply(logits, float(temperature), block)


def student_topk_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                          lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log-probs at the teacher's ids and of its tail bucket.

    logits (B, L, V), ids (B, L, K) -> (log p_s(ids) (B, L, K) float32, log p_s(tail) (B, L)).
    """
    if lse is None:
        lse = logsumexp_t(logits, temperature)  # (B, L)
    lp = upcast(logits.gather(-1, ids)) / temperature - lse[..., None]  # (B, L, K)
    return lp, log1mexp(torch.logsumexp(lp, dim=-1))


def next_token_logprobs(logits: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor,
                        next_ids: torch.Tensor | None = None) -> torch.Tensor:
    """log p(ids[:, t + 1]) at each position t, (B, L); the last position's value wraps around and
    must be masked by the caller (positions without a next token). `next_ids` (B, L): the next tokens
    given (a block of positions, whose last next token lies beyond it)."""
    nxt = (torch.roll(ids, -1, dims=1) if next_ids is None else next_ids)[..., None]
    return upcast(logits.gather(-1, nxt)[..., 0]) - lse


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012).

    x is clamped just below 0: a top-K that holds all the mass to rounding leaves a tail of
    ~1e-7, not log(0).
    """
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ---------------------------------------------------------------------------------------------
# teacher side


def teacher_topk_logprobs(topk_logprobs: torch.Tensor, logsumexp: torch.Tensor, temperature: float = 1.0,
                          logsumexp_tempered: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-probs at its cached ids and of its tail bucket, at temperature T.

    topk_logprobs (B, L, K) at T=1, logsumexp (B, L) at T=1, logsumexp_tempered (B, L) at T when
    it was captured. Exact at T=1 and at a captured T. Otherwise (warned): the tail is treated as
    a single token whose logit carries the tail's whole T=1 mass; this underestimates the tail's
    share when T > 1 (the tail is many small logits, each raised) and overestimates it when T < 1.
    """
    lp = upcast(topk_logprobs)
    if temperature == 1.0:
        return lp, log1mexp(torch.logsumexp(lp, dim=-1))
    z = lp + upcast(logsumexp)[..., None]  # raw teacher logits at the ids, (B, L, K)
    if logsumexp_tempered is not None:
        lp_t = z / temperature - upcast(logsumexp_tempered)[..., None]
        return lp_t, log1mexp(torch.logsumexp(lp_t, dim=-1))
    warnings.warn(f"temperature {temperature} was not captured: the teacher's tempered tail is approximated "
                  "(see pipeline.losses.teacher_topk_logprobs)", stacklevel=2)
    tail = log1mexp(torch.logsumexp(lp, dim=-1)) + upcast(logsumexp)  # log of the tail's summed exp(z)
    both = torch.cat([z, tail[..., None]], dim=-1) / temperature  # (B, L, K + 1)
    lp_all = both - torch.logsumexp(both, dim=-1, keepdim=True)
    return lp_all[..., :-1], lp_all[..., -1]


# ---------------------------------------------------------------------------------------------
# the losses (each: per-token mean over mask)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, counts: list | None = None) -> torch.Tensor:
    """Mean of `x` where `mask`; masked positions are selected out, not multiplied by 0, so a NaN or
    inf there (a padded position's garbage) reaches neither the value nor the gradient. `counts`: a list the
    number of positions averaged over is appended to (every loss passes its own `counts` on), so that a loss
    computed on one block of positions is sum / count for that block and blocks combine exactly."""
    mask = mask.expand_as(x) if mask.shape != x.shape else mask
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    n = mask.sum()
    if counts is not None:
        counts.append(n)
    return kept.sum() / n.clamp(min=1).to(x.dtype)


def _with_tail(lp: torch.Tensor, log_tail: torch.Tensor) -> torch.Tensor:
    return torch.cat([lp, log_tail[..., None]], dim=-1)  # (B, L, K + 1)


def _kl(lp_p: torch.Tensor, lp_q: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) over the last axis; 0 * log 0 = 0."""
    p = lp_p.exp()
    return (p * (lp_p - lp_q)).masked_fill(p == 0, 0.0).sum(-1)


def forward_kl(t_lp, t_log_tail, s_lp, s_log_tail, mask, temperature: float = 1.0,
               counts: list | None = None) -> torch.Tensor:
    """KL(teacher || student) over the K ids + tail bucket, times T^2."""
    kl = _kl(_with_tail(t_lp, t_log_tail), _with_tail(s_lp, s_log_tail))
    return masked_mean(kl, mask, counts) * temperature**2


def forward_kl_renormalized(t_lp, s_lp, mask, temperature: float = 1.0, counts: list | None = None) -> torch.Tensor:
    """KL(teacher || student) with both renormalised over the K ids alone (tail ignored), times T^2."""
    t = t_lp - torch.logsumexp(t_lp, -1, keepdim=True)
    s = s_lp - torch.logsumexp(s_lp, -1, keepdim=True)
    return masked_mean(_kl(t, s), mask, counts) * temperature**2


def reverse_kl(t_lp, t_log_tail, s_lp, s_log_tail, mask, temperature: float = 1.0,
               counts: list | None = None) -> torch.Tensor:
    """KL(student || teacher) over the K ids + tail bucket, times T^2."""
    kl = _kl(_with_tail(s_lp, s_log_tail), _with_tail(t_lp, t_log_tail))
    return masked_mean(kl, mask, counts) * temperature**2


def jsd(t_lp, t_log_tail, s_lp, s_log_tail, mask, beta: float = 0.5, temperature: float = 1.0,
        counts: list | None = None) -> torch.Tensor:
    """Generalised JSD: beta KL(t || m) + (1 - beta) KL(s || m), m = beta t + (1 - beta) s; times T^2.

    beta = 0.5 is the symmetric JSD; beta -> 0 approaches forward KL's gradient, beta -> 1 reverse.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    t, s = _with_tail(t_lp, t_log_tail), _with_tail(s_lp, s_log_tail)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
    return masked_mean(beta * _kl(t, m) + (1 - beta) * _kl(s, m), mask, counts) * temperature**2


def mse_logprobs(t_lp, s_lp, mask, counts: list | None = None) -> torch.Tensor:
    """Mean over the K ids of (log p_s - log p_t)^2, per token."""
    return masked_mean(((s_lp - t_lp) ** 2).mean(-1), mask, counts)


def mse_logits(t_logits, s_logits, mask, counts: list | None = None) -> torch.Tensor:
    """Mean over the K ids of (z_s - z_t)^2 with each side centred over the K ids (logits are
    defined up to a constant per position; centring removes it), per token."""
    t = t_logits - t_logits.mean(-1, keepdim=True)
    s = s_logits - s_logits.mean(-1, keepdim=True)
    return masked_mean(((s - t) ** 2).mean(-1), mask, counts)


def cross_entropy(s_target_lp: torch.Tensor, mask: torch.Tensor, counts: list | None = None) -> torch.Tensor:
    """Hard-label next-token cross-entropy: -log p_s(true next token), per token."""
    return masked_mean(-s_target_lp, mask, counts)


def divergence(t_lp: torch.Tensor, s_lp: torch.Tensor, kind: str = "forward", beta: float = 0.5) -> torch.Tensor:
    """Per position, over the last axis of two full log-distributions: KL(t || s) ("forward"), KL(s || t)
    ("reverse") or the generalised JSD ("jsd": beta KL(t || m) + (1 - beta) KL(s || m), m = beta t + (1 - beta) s)."""
    if kind == "forward":
        return _kl(t_lp, s_lp)
    if kind == "reverse":
        return _kl(s_lp, t_lp)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
        m = torch.logaddexp(t_lp + math.log(beta), s_lp + math.log(1 - beta))
        return beta * _kl(t_lp, m) + (1 - beta) * _kl(s_lp, m)
    raise ValueError(f"unknown divergence {kind!r}")


def full_divergence(teacher_logits, t_inputs: torch.Tensor, s_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float = 1.0, kind: str = "forward", beta: float = 0.5,
                    block: int = 512, counts: list | None = None) -> torch.Tensor:
    """A divergence between teacher and student over the whole vocabulary, masked mean over positions, x T^2.

    `teacher_logits(x)` maps a block of `t_inputs` (B, L, ...) flattened to (P, ...) to the teacher's
    (P, V) logits: the identity for stored logits (online KD), the teacher's LM head for its cached
    final hidden states. Blockwise over positions under activation checkpointing, so only one
    (block, V) float32 pair is alive at a time, in the forward and in the backward pass. A student with
    more rows than the teacher (a padded vocabulary): they count in its softmax for forward KL, and are
    left out for reverse KL and JSD (where the teacher's p = 0 on them would make KL(s || .) infinite).
    """
    from torch.utils.checkpoint import checkpoint

    def block_div(x, s):
        t = teacher_logits(x)
        V = t.shape[-1]
        t_lp = torch.log_softmax(upcast(t) / temperature, -1)
        if kind == "forward":  # the student's extra rows count in its softmax: KL pushes their mass down
            s_lp = torch.log_softmax(upcast(s) / temperature, -1)[..., :V]
        else:  # KL(s || .) would be infinite on rows the teacher gives p = 0: the student's first V rows
            s_lp = torch.log_softmax(upcast(s[..., :V]) / temperature, -1)
        return divergence(t_lp, s_lp, kind, beta)

    xf = t_inputs.reshape(-1, *t_inputs.shape[2:])
    sf, mf = s_logits.reshape(-1, s_logits.shape[-1]), mask.reshape(-1)
    parts = [checkpoint(block_div, xf[i : i + block], sf[i : i + block], use_reentrant=False)
             for i in range(0, xf.shape[0], block)]
    return masked_mean(torch.cat(parts), mf, counts) * temperature**2


def full_forward_kl(t_logits: torch.Tensor, s_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                    block: int = 512) -> torch.Tensor:
    """KL(teacher || student) over the whole vocabulary from the teacher's logits (online KD), x T^2."""
    return full_divergence(lambda t: t, t_logits, s_logits, mask, temperature, "forward", block=block)


def sampled_kl(t_lp: torch.Tensor, s_lp: torch.Tensor, log_w: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0, counts: list | None = None) -> torch.Tensor:
    """Importance-sampled forward KL(teacher || student) at sampled ids, masked mean over positions, x T^2.

    Per position, with the distinct drawn ids v, `log_w` = log(c_v / N) + log p_T(v) - log q(v) (-inf in
    empty slots), `t_lp` = log p_T(v) and `s_lp` = log s_T(v) from the student's full softmax:
    sum_v w_v (log p_T(v) - log s_T(v)). Over the draws, E[w_v] = p_T(v) for every v, so the value and
    its gradient are unbiased estimates of the full KL and of its gradient.
    """
    w = log_w.exp()
    per = (w * (t_lp - s_lp)).masked_fill(w == 0, 0.0).sum(-1)
    return masked_mean(per, mask, counts) * temperature**2


# ---------------------------------------------------------------------------------------------
# representation, attention and self-supervised terms (issue: intermediate-layer distillation)


def hidden_mse(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor, counts: list | None = None) -> torch.Tensor:
    """(B, L, d) projected student vs teacher hidden states: mean over d of the squared error, per token."""
    return masked_mean(((upcast(h_s) - upcast(h_t)) ** 2).mean(-1), mask, counts)


def hidden_cosine(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor, counts: list | None = None) -> torch.Tensor:
    """1 - cosine similarity of (B, L, d) student (projected) and teacher hidden states, per token."""
    return masked_mean(1 - F.cosine_similarity(upcast(h_s), upcast(h_t), dim=-1, eps=1e-8), mask, counts)


def _attention_mask(mask: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """(B, L) token mask -> (B, 1, L, L) valid (query, key) pairs: both real, and key <= query when `causal`
    (an encoder's maps cover every real key)."""
    pair = mask[:, :, None] & mask[:, None, :]
    if causal:
        L_ = mask.shape[1]
        pair = pair & torch.ones(L_, L_, dtype=torch.bool, device=mask.device).tril()
    return pair[:, None]


def attention_kl(a_t: torch.Tensor, a_s: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8,
                 causal: bool = True, counts: list | None = None) -> torch.Tensor:
    """KL(teacher || student) between attention distributions of each query row (MiniLM).

    a_t, a_s (B, H, L, L) probabilities over keys; mask (B, L). Padding keys (and, `causal`, keys above
    the diagonal) carry no loss; mean over heads and real query rows.
    """
    pair = _attention_mask(mask, causal)
    t, s = upcast(a_t), upcast(a_s)
    kl = torch.where(pair & (t > 0), t * (torch.log(t.clamp(min=eps)) - torch.log(s.clamp(min=eps))),
                     torch.zeros_like(t)).sum(-1)  # (B, H, L)
    q = mask[:, None, :].expand_as(kl)
    return masked_mean(kl, q, counts)


def attention_mse(a_t: torch.Tensor, a_s: torch.Tensor, mask: torch.Tensor, causal: bool = True,
                  counts: list | None = None) -> torch.Tensor:
    """Mean squared error of attention probabilities over valid (query, key [<= query when `causal`]) pairs
    (TinyBERT)."""
    pair = _attention_mask(mask, causal).expand(a_t.shape)
    return masked_mean((upcast(a_s) - upcast(a_t)) ** 2, pair, counts)


def nll_match(s_target_lp: torch.Tensor, t_target_lp: torch.Tensor, mask: torch.Tensor,
              counts: list | None = None) -> torch.Tensor:
    """Self-supervised matching: squared difference of the student's and the teacher's per-token
    negative log-likelihood of the true next token (both (B, L)); NaN teacher values must be masked."""
    return masked_mean((upcast(s_target_lp) - torch.nan_to_num(upcast(t_target_lp))) ** 2, mask, counts)


# ---------------------------------------------------------------------------------------------
# classification: the teacher's whole class distribution is cached, so every term is exact


def class_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                        counts: list | None = None) -> torch.Tensor:
    """-log p_s(gold class), mean over `mask`; logits (..., C), labels (...) (entries outside `mask` may be
    any value, e.g. -100)."""
    lp = torch.log_softmax(upcast(logits), dim=-1)
    gold = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return masked_mean(-gold, mask, counts)


def teacher_class_logprobs(class_logprobs: torch.Tensor, class_logsumexp: torch.Tensor, temperature: float = 1.0,
                           logsumexp_tempered: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's log-probs over every class at temperature T: exact (all classes are cached), from the
    captured logsumexp(z / T) when there is one."""
    lp = upcast(class_logprobs)
    if temperature == 1.0:
        return lp
    z = (lp + upcast(class_logsumexp)[..., None]) / temperature
    lse = upcast(logsumexp_tempered) if logsumexp_tempered is not None else torch.logsumexp(z, dim=-1)
    return z - lse[..., None]


def class_divergence(t_lp: torch.Tensor, s_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                     kind: str = "forward", beta: float = 0.5, counts: list | None = None) -> torch.Tensor:
    """KL(teacher || student), KL(student || teacher) or the generalised JSD over the classes at temperature T,
    times T^2; t_lp (..., C) the teacher's log-probs at T, s_logits (..., C) the student's logits."""
    s_lp = torch.log_softmax(upcast(s_logits) / temperature, dim=-1)
    return masked_mean(divergence(t_lp, s_lp, kind, beta), mask, counts) * temperature**2


# ---------------------------------------------------------------------------------------------
# across tokenizers: the student's positions aligned with the teacher's, two vocabularies


def uld(t_lp: torch.Tensor, t_log_tail: torch.Tensor, s_lp: torch.Tensor, s_log_tail: torch.Tensor,
        mask: torch.Tensor, temperature: float = 1.0, counts: list | None = None) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al., 2024): the Wasserstein-1 distance between the teacher's
    and the student's probability vectors, each sorted in decreasing order (vocabulary-agnostic), x T^2.

    t_lp (..., K) the teacher's log-probs at its top-K ids, t_log_tail (...) its exact tail; s_lp (..., K_s) the
    student's K_s largest log-probs and s_log_tail its mass beyond them (any order on both sides: both are
    sorted here; the shorter is padded with zeros). The ranks up to K are compared one by one; the ranks beyond
    K, whose teacher values are not cached, by their total mass: |tail_t - tail_s|. That is a lower bound of the
    full-vocabulary sum over those ranks (triangle inequality), equal to it when one side's values beyond K are
    all at least the other's, so the value is at most the full ULD and equal to it when every rank's mass is
    inside the top-K on both sides.
    """
    t = upcast(t_lp).exp().sort(-1, descending=True).values
    s = upcast(s_lp).exp().sort(-1, descending=True).values
    k = max(t.shape[-1], s.shape[-1])
    t, s = F.pad(t, (0, k - t.shape[-1])), F.pad(s, (0, k - s.shape[-1]))
    w = (t - s).abs().sum(-1) + (upcast(t_log_tail).exp() - upcast(s_log_tail).exp()).abs()
    return masked_mean(w, mask, counts) * temperature**2


def mapped_forward_kl(t_lp: torch.Tensor, t_log_tail: torch.Tensor, mapped: torch.Tensor, s_lp: torch.Tensor,
                      mask: torch.Tensor, temperature: float = 1.0, counts: list | None = None) -> torch.Tensor:
    """KL(teacher || student) with the teacher's top-K carried into the student's vocabulary, x T^2.

    t_lp (..., K) the teacher's log-probs at its ids, t_log_tail (...) its exact tail, mapped (..., K) the student
    id each teacher id maps to (-1: none), s_lp (..., K) the student's log-probs at `mapped` (any finite value
    where it is -1). Teacher ids mapped to one student id add their mass on it; the mass of unmapped ids joins
    the teacher's tail bucket. The student's support is the distinct mapped ids plus its tail bucket (all its
    other mass), as in `forward_kl`.
    """
    p = upcast(t_lp).exp()  # (..., K)
    ok = mapped >= 0
    same = (mapped[..., :, None] == mapped[..., None, :]) & ok[..., :, None]  # (..., K, K)
    K = mapped.shape[-1]
    earlier = torch.ones(K, K, dtype=torch.bool, device=mapped.device).tril(-1)
    first = ok & ~(same & earlier).any(-1)  # the first teacher id of each distinct student id
    q = torch.where(first, (same.to(p.dtype) * p[..., None, :]).sum(-1), torch.zeros((), dtype=p.dtype,
                                                                                       device=p.device))
    t_tail = upcast(t_log_tail).exp() + torch.where(ok, torch.zeros_like(p), p).sum(-1)
    s = upcast(s_lp)
    s_tail = log1mexp(torch.logsumexp(torch.where(first, s, torch.full_like(s, -torch.inf)), dim=-1))
    kl = _kl(_with_tail(q.log(), t_tail.clamp(min=0).log()), _with_tail(s, s_tail))
    return masked_mean(kl, mask, counts) * temperature**2
