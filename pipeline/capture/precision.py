"""Bounded-error top-K log-probs (`capture.logprob_precision`): rounded so that they compress, with each entry's
error bounded and the KL of the stored distribution from the exact one measured at every position.

With a bound b, an entry of probability p is rounded to a grid of step 2^floor(log2(2b / sqrt(p))) nats (at most
4): its error is at most b / sqrt(p) nats (and 2 nats), so each entry adds at most about b^2 / 2 to the KL whatever
its probability, and the low-probability ranks, which are most of K and most of the bytes, get coarse grids that
pcodec stores in a few bits. A power-of-two step keeps every grid value a float16 number. The ranks stay in order
(each value is at most the one before it, which moves no value past its bound), and the most likely entry is not
rounded but carries the probability the others gained or lost, so the tail bucket the losses compute as
1 - sum(p) stays what it was: without that, rounding errors of a few 1e-4 land on tails of 1e-5 at confident
positions, and one bad position outweighs the rest. The stored values are ordinary float16 log-probs: a reader
needs nothing to read them.

The KL is the losses' own view: the K entries plus the tail bucket, each tail at least 1e-7 (as
`losses.log1mexp` clamps it), in float64 from the exact float32 log-probs. Each side is normalised with its clamped
tail (nothing changes unless its entries hold more than 1 - 1e-7 of the mass, as they can where the first entry
could not carry the change), so that the figure is a KL between distributions and 0 for equal ones; an entry of
probability 0 adds nothing.
"""

from __future__ import annotations

import torch

MAX_STEP = 4.0  # the coarsest grid: an entry's error is at most 2 nats whatever its probability
TAIL_FLOOR = 1e-7  # the smallest tail the losses compute (losses.log1mexp)


def round_logprobs(lp: torch.Tensor, bound: float) -> torch.Tensor:
    """Exact top-K log-probs (..., K) float32, most likely first -> float16 log-probs within `bound` / sqrt(p)
    nats of each (the first entry carries the others' change of mass; see the module's docstring)."""
    x = lp.double()
    p = x.exp()
    step = torch.exp2(torch.floor(torch.log2((2 * bound / p.sqrt()).clamp(max=MAX_STEP))))
    q = torch.round(x / step) * step
    q[..., 0] = x[..., 0]
    q = torch.cummin(q, dim=-1).values  # a value past the one before it is cut to it: still within its bound
    q = q.to(torch.float16).double()  # as stored (a grid finer than float16's own is float16's)
    lost = (p[..., 1:] - q[..., 1:].exp()).sum(-1)
    first = torch.log((p[..., 0] + lost).clamp(min=1e-300)).clamp(max=0.0)
    if q.shape[-1] > 1:
        first = torch.maximum(first, q[..., 1])
    q[..., 0] = first
    return q.to(torch.float16)


def stored_kl(exact: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """KL(exact || stored) per position (...,) float32 over the K entries and the tail bucket (see the module)."""
    sides = []
    for v in (exact.double(), stored.double()):
        tail = (1 - v.exp().sum(-1)).clamp(min=TAIL_FLOOR)
        full = torch.cat([v, tail.log()[..., None]], -1)
        sides.append(full - torch.logsumexp(full, -1, keepdim=True))
    a, b = sides
    p = a.exp()
    return torch.where(p > 0, p * (a - b), 0.0).sum(-1).float()
