"""Attention maps of a few layers without running every layer in eager attention.

Registers an attention implementation ("tcd_capture") with transformers' `AttentionInterface`:
for the layers being recorded it calls the model's own `eager_attention_forward` (so the maps
are exactly what `output_attentions=True` gives) and keeps the weights; every other layer runs
`sdpa_attention_forward` with the SDPA mask, causal fast path included. Models whose attention
modules do not dispatch through the interface are detected by `check_recorded` (no map came back).
"""

from __future__ import annotations

import contextvars
import sys
from contextlib import contextmanager

import torch

CAPTURE_IMPL = "tcd_capture"
_ACTIVE: contextvars.ContextVar["AttentionRecorder | None"] = contextvars.ContextVar("tcd_attention", default=None)


class AttentionRecorder:
    """Collects (B, H_kept, L, L) maps for `layers` during one forward pass."""

    def __init__(self, layers: list[int], heads: list[int] | None, reduce: str, gather=None):
        self.layers = set(layers)
        self.heads = heads
        self.reduce = reduce
        self.gather = gather  # a tensor-parallel teacher: its group's heads joined to this rank's (B, H, Q, K)
        self.maps: dict[int, torch.Tensor] = {}

    def keep(self, layer: int, weights: torch.Tensor) -> None:
        w = weights if self.gather is None else self.gather(weights)  # (B, H, Q, K)
        if self.heads is not None:
            w = w[:, self.heads]
        if self.reduce == "mean":
            w = w.float().mean(dim=1, keepdim=True)
        self.maps[layer] = w

    def stacked(self, order: list[int]) -> torch.Tensor:
        """(B, n_layers, H_kept, L, L) in the order of `order`."""
        missing = [i for i in order if i not in self.maps]
        if missing:
            raise RuntimeError(
                f"no attention map was recorded for layers {missing}: this architecture's attention does not "
                "dispatch through transformers' AttentionInterface, so attention capture is not supported for it"
            )
        return torch.stack([self.maps[i] for i in order], dim=1)


def _eager_forward_for(module):
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward in its module")
    return fn


def _additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
                   causal: bool = True) -> torch.Tensor | None:
    """The SDPA mask (None = plain causal for a causal module, attend everywhere for an encoder's; or bool
    True = attend) as the additive float mask eager expects."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    if mask is None:
        if not causal:
            return None
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        keep = keep[None, None]
    elif mask.dtype == torch.bool:
        keep = mask
    else:
        return mask
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    neg = torch.tensor(torch.finfo(query.dtype).min, dtype=query.dtype, device=query.device)
    return torch.where(keep, zero, neg)


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rec = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if rec is None or layer not in rec.layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    eager = _eager_forward_for(module)
    mask = _additive_mask(attention_mask, query, key, bool(getattr(module, "is_causal", True)))
    out, weights = eager(module, query, key, value, mask, **kwargs)
    rec.keep(layer, weights)
    return out, None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPL, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_IMPL, sdpa_mask)


def enable(model) -> None:
    """Switch `model` to the capture implementation (sdpa on every layer not being recorded)."""
    register()
    model.set_attn_implementation(CAPTURE_IMPL)


@contextmanager
def recording(recorder: AttentionRecorder | None):
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


class DocumentMaskError(RuntimeError):
    """A model whose attention does not keep packed documents apart."""


@torch.no_grad()
def check_document_masking(run, vocab_size: int, device, what: str, rel_tol: float = 1e-3,
                           leak_tol: float = 1e-5) -> None:
    """Refuse a model that does not keep packed documents apart.

    `run(ids (1, n), position_ids (1, n) | None) -> outputs (1, n, X)`. Two documents are packed
    with restarting position ids: the second document's outputs must not change when the first one
    does (within `leak_tol`, in any dtype: masked keys get exactly zero weight, so a model that keeps
    documents apart gives the same numbers), and must equal those of the second document run alone
    (within `rel_tol`: other kernels may run for another length).
    """
    g = torch.Generator().manual_seed(0)
    first, other_first, second = (torch.randint(0, vocab_size, (1, n), generator=g) for n in (5, 5, 6))
    pos = torch.cat([torch.arange(5), torch.arange(6)])[None].to(device)
    a = run(torch.cat([first, second], 1).to(device), pos)[:, 5:].float()
    b = run(torch.cat([other_first, second], 1).to(device), pos)[:, 5:].float()
    alone = run(second.to(device), None).float()
    scale = alone.abs().max().clamp(min=1e-6)
    leak, apart = float((a - b).abs().max() / scale), float((a - alone).abs().max() / scale)
    worst = max(leak, apart)
    if leak > leak_tol or apart > rel_tol:
        raise DocumentMaskError(
            f"{what} does not keep packed documents apart (a document's outputs change by {worst:.3g} relative "
            "when the document before it changes): its attention ignores the restarting position_ids that "
            "transformers uses for packed sequences, so data.document_mask is not supported for it")
