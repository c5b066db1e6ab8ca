"""A student's logit terms fused with its LM head, a block of positions at a time: the block's logits are made,
every term is computed on them, and the gradients of the weighted terms with respect to the block's last hidden
states and the head's weight are computed there and then (as Liger's chunked losses do, in plain torch), so that
no (B, L, V) tensor exists and no block is made twice: the backward pass only scales the gradients it finds.

Each term is a masked mean over the positions its `Computation.positions` names; the counts of the whole batch
are known before the first block (they depend on the masks, not on the logits), so a block's share of the
weighted total, sum_t w_t * (its sum over the block) / (the batch's count), has exactly the gradient it has in the
batch. The values returned for the terms are the same masked means as with materialised logits, detached; the
weighted total is the differentiable output (`FusedTotal`).
"""

from __future__ import annotations

import torch

from .. import models
from .signal import Context, StudentOutput, TeacherSignal


class FusedTotal(torch.autograd.Function):
    """sum_t w_t * term_t over the blocks: forward computes the value and both gradients (`_blocks`); backward
    returns them times the incoming gradient."""

    @staticmethod
    def forward(fctx, last, weight, run):
        total, g_last, g_weight = run(last, weight)
        fctx.save_for_backward(g_last, g_weight)
        return total

    @staticmethod
    def backward(fctx, grad):
        g_last, g_weight = fctx.saved_tensors  # scaled in place: this graph is walked back once
        return (None if g_last is None else g_last.mul_(grad.to(g_last.dtype)),
                None if g_weight is None else g_weight.mul_(grad.to(g_weight.dtype)), None)


def fused_terms(on: list, weights: list[float], out: StudentOutput, sig: TeacherSignal,
                ctx: Context) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({term: its value, detached}, the weighted total of `on` with its gradient) for the terms `on` (weights
    `weights`), computed `out.block_positions` positions of every row at a time (see the module docstring)."""
    comps = [t.on(sig.task) for t in on]
    exact = torch.promote_types(out.last.dtype, torch.float32)  # sums and counts never in bfloat16 (FSDP's states)
    counts = torch.stack([c.positions(out, sig).sum() for c in comps]).to(exact)
    coef = torch.tensor(weights, dtype=exact, device=out.last.device) / counts.clamp(min=1)
    means = {}
    # read here: inside an autograd Function's forward, grad mode is off
    grad = torch.is_grad_enabled() and (out.last.requires_grad or out.weight.requires_grad)

    def run(last: torch.Tensor, weight: torch.Tensor):
        sums, seen, g_last, g_weight = _blocks(on, comps, coef, out, sig, ctx, last, weight, grad)
        if not torch.equal(seen, counts):
            bad = [t.name for t, a, b in zip(on, seen.tolist(), counts.tolist()) if a != b]
            raise RuntimeError(f"terms {bad} averaged over other positions than their Computation.positions name")
        means.update({t.name: s / n.clamp(min=1) for t, s, n in zip(on, sums, counts)})
        return (coef * sums).sum(), g_last, g_weight

    total = FusedTotal.apply(out.last, out.weight, run)
    return means, total


def _blocks(on, comps, coef, out: StudentOutput, sig: TeacherSignal, ctx: Context, last, weight, grad: bool):
    """(each term's sum over the batch, its count, d total / d last, d total / d weight; the gradients None when
    `grad` is False): block by block."""
    B, L, _ = last.shape
    P = out.block_positions
    spec = out.head.spec
    # the head's products in the dtype autocast would run them in (bfloat16), the weight cast once for every block
    dtype = torch.bfloat16 if out.head.autocast else weight.dtype
    w = weight.detach().to(dtype)
    sums = torch.zeros(len(on), dtype=coef.dtype, device=last.device)
    seen = torch.zeros_like(sums)
    g_last = torch.empty_like(last) if grad else None
    g_weight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                           device=weight.device) if grad else None
    for a in range(0, L, P):
        b = min(L, a + P)
        h = last[:, a:b].detach()
        with torch.enable_grad():
            z = torch.nn.functional.linear(h.to(dtype), w)
            z = z.float() if z.dtype != torch.float64 else z
            z.requires_grad_(grad)
            logits = models.finish_logits(z, spec.logit_scale, spec.logits_divisor, spec.logit_softcap)
            bout = out.block(a, b, logits=logits)
            bsig = sig.block(a, b)
            block_sums, block_counts = [], []
            for t, c in zip(on, comps):
                n: list[torch.Tensor] = []
                v = c.compute(bout, bsig, Context(ctx.spec, ctx.wiring, counts=n))
                if len(n) != 1:
                    raise RuntimeError(f"term {t.name} took {len(n)} masked means; a fused term takes one")
                block_sums.append(v * n[0].to(v.dtype))
                block_counts.append(n[0].to(v.dtype))
            s = torch.stack(block_sums).to(sums.dtype)
            if grad:
                (g_z,) = torch.autograd.grad((coef * s).sum(), z)
        sums += s.detach()
        seen += torch.stack(block_counts).detach().to(seen.dtype)
        if grad:
            _head_grads(g_z, h, w, g_last[:, a:b], g_weight)
    return sums, seen, g_last, (None if g_weight is None else g_weight.to(weight.dtype))


def _head_grads(g_z: torch.Tensor, h: torch.Tensor, w: torch.Tensor, g_h_out: torch.Tensor,
                g_weight: torch.Tensor) -> None:
    """The gradients the head's linear map passes back from the block's logit gradient `g_z` (B, P, V): to the
    block's hidden states (into `g_h_out`) and to the weight (added into `g_weight`), with products in the dtype of
    `w`, the weight as the forward product used it (bfloat16 under autocast, as autograd's products would be)."""
    g = g_z.to(w.dtype).flatten(0, 1)  # (B P, V)
    g_h_out.copy_((g @ w).view_as(g_h_out))
    hp = h.to(w.dtype).flatten(0, 1)  # (B P, d)
    if g_weight.dtype == w.dtype:
        g_weight.addmm_(g.T, hp)
    else:
        g_weight.add_(g.T @ hp)  # a bfloat16 product added into the float32 sum, no float32 copy of it
