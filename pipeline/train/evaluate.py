"""Students against the cached teacher on held-out rows: one read of the validation batches per
evaluation, whatever the number of students, split over ranks and summed.

Metrics: NLL and perplexity of the true next token, top-1 agreement with the teacher, KL(teacher
|| student) and expected calibration error (15 equal-width confidence bins). KL is exact over the
whole vocabulary when the cache holds the teacher's final hidden states and LM head
(`capture.final_hidden`, `head` given), else over the cached top-K + exact tail bucket (a lower
bound of the full KL). Every rank adds its batches into float64 sums; one all-reduce per evaluation
gives every rank the same metrics, so early-stopping decisions agree.
"""

from __future__ import annotations

import math

import torch

from .. import distributed
from . import losses as L
from .terms import batch_masks

ECE_BINS = 15
LOWER_IS_BETTER = {"nll": True, "kl": True, "top1_agreement": False}
_SUMS = ("nll", "n_next", "agree", "kl", "n_valid")


def _empty() -> torch.Tensor:
    return torch.zeros(len(_SUMS) + 3 * ECE_BINS, dtype=torch.float64)


@torch.no_grad()
def _accumulate(acc: torch.Tensor, model, batch: dict, device, head=None) -> None:
    ids = batch["input_ids"].to(device)
    masks = batch_masks(batch, device)
    valid, has_next = masks.kd, masks.ce
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=ids, **masks.forward).logits
    lse = L.logsumexp_t(logits)
    nxt = torch.roll(ids, -1, dims=1)
    tgt_lp = L.next_token_logprobs(logits, ids, lse)
    top_val, top_id = logits.max(-1)
    topk_ids = batch["topk_ids"].to(device).long()
    if head is not None and "final_hidden" in batch:
        kl = L.full_divergence(head, head.decode(batch["final_hidden"].to(device)), logits, valid) * valid.sum()
    else:
        s_lp, s_tail = L.student_topk_logprobs(logits, topk_ids, 1.0, lse=lse)
        t_lp, t_tail = L.teacher_topk_logprobs(batch["topk_logprobs"].to(device), batch["logsumexp"].to(device))
        kl = L.forward_kl(t_lp, t_tail, s_lp, s_tail, valid) * valid.sum()
    conf = torch.exp(top_val.float() - lse)[has_next].double()
    correct = (top_id == nxt)[has_next].double()
    b = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1)
    sums = torch.stack([-(tgt_lp[has_next]).double().sum(), has_next.sum().double(),
                        (top_id == topk_ids[..., 0])[valid].double().sum(), kl.double(), valid.sum().double()])
    bins = torch.cat([torch.bincount(b, minlength=ECE_BINS).double(),
                      torch.bincount(b, weights=conf, minlength=ECE_BINS),
                      torch.bincount(b, weights=correct, minlength=ECE_BINS)])
    acc += torch.cat([sums, bins]).cpu()  # one device-to-host copy per batch


def _metrics(acc: torch.Tensor) -> dict[str, float]:
    s = dict(zip(_SUMS, acc[: len(_SUMS)].tolist()))
    n_bins, conf, correct = acc[len(_SUMS):].reshape(3, ECE_BINS)
    n = max(s["n_next"], 1)
    nll = s["nll"] / n
    return {"nll": nll, "ppl": math.exp(min(nll, 50)), "top1_agreement": s["agree"] / max(s["n_valid"], 1),
            "kl": s["kl"] / max(s["n_valid"], 1), "ece": float((correct - conf).abs().sum() / max(n_bins.sum(), 1)),
            "tokens": int(s["n_next"])}


def evaluate_all(models: dict[str, torch.nn.Module], batches, device, head=None) -> dict[str, dict[str, float]]:
    """{name: metrics} for every model, reading `batches` once (this rank's share of them); the sums
    are added over ranks when run under torch.distributed. `head`: the cache's TeacherHead, for an
    exact KL from batches that hold final_hidden."""
    acc = {name: _empty() for name in models}
    was = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        for batch in batches:
            for name, m in models.items():
                _accumulate(acc[name], m, batch, device, head)
    finally:
        for name, m in models.items():
            m.train(was[name])
    if not acc:
        return {}
    stacked = distributed.sum_(torch.stack(list(acc.values())))  # one collective per evaluation
    return {name: _metrics(stacked[i]) for i, name in enumerate(acc)}


def evaluate(model, batches, device, head=None) -> dict[str, float]:
    """One model's metrics (see `evaluate_all`)."""
    return evaluate_all({"model": model}, batches, device, head)["model"]
