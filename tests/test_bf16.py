"""A bfloat16 teacher's cache against float64 forwards of the same teacher, on CPU.

A tiny random-init Llama (3 layers, V = 512) is captured with `teacher.dtype = "bfloat16"` through the
real capture (`run_capture`: 43 rows of 32 tokens, some padded, batches of 3, top-16), and the stored
top-K log-probs, logsumexp and tail mass are compared, on the real (unpadded) positions, with three sets
of logits of the same rows:

- `own`: the bf16 teacher's own logits (bf16 values), replayed forward by forward as the capture batched
  the rows (same rows per forward, same attention mask; a batch's 96 positions are one LM-head block of the
  capture, so the head's product has the same shape too: bf16 matmuls round by shape), hence the same bf16
  arithmetic bit for bit;
- `rounded`: a float64 forward with the weights rounded to bf16 (what a bf16 teacher holds): the
  difference from `own` is the bf16 *arithmetic* alone;
- `original`: a float64 forward with the saved float32 weights: bf16 arithmetic plus weight rounding,
  what a user comparing against a float32 teacher sees.

Notation, per position: z the logits (V,), m = max_i |z_i| of the float64 reference (9 to 16 here),
u = 2^-8 the bf16 unit roundoff (8 significant bits, round to nearest: |fl(x) - x| <= u |x|),
T = 1 - sum_K p the tail mass at the stored ids.

1. The capture loses nothing of the bf16 logits (against `own`), to float32 / float16 storage rounding:
   - logsumexp is stored as float32 and |lse - lse(own)| <= e_lse = 2^-24 (2 |lse| + 4 log2 V): float32
     rounding of the max-shifted sum of V exps (pairwise, <= log2 V ulps), its log and the final add. A
     logsumexp computed in bf16 would be off by up to 2^-9 |lse|, ~10^4 times more, and one from a
     float32 teacher by the model's error below, ~10^4 times more too;
   - the stored ids are a top-K of `own` (their logits equal its K largest exactly, ties allowed);
   - topk_logprobs = float16(z - lse): |error| <= s = 2^-11 |log p| (float16 storage) + 2 e_lse + 2^-24;
   - the tail mass from the stored log-probs: |error| <= sum_K p (exp(s) - 1).
2. The model's error (against `rounded` / `original`): max_i |z_own,i - z_ref,i| <= B = C u m, a budget
   of relative-u roundings, each reaching the logits with gain <= ~m (the rounding error of the final
   state is uncorrelated with the head's rows). Arithmetic, C_a = n_layers + 2: 1 for rounding the logits
   themselves to bf16 (the head's output is bf16, widened afterwards: exact, |fl(z) - z| <= u m), 1 for the
   final norm's output, 1 per decoder layer for the residual stream (growth taken as linear, the worst
   case). Weights, C_w = n_layers + 1: every weight rounded by <= u, 1 per layer and 1 for the head.
   Against `rounded` C = C_a; against `original` the two independent sources add in quadrature,
   C = hypot(C_a, C_w). Here (3 layers) 5 and 6.4; measured 2.4 and 2.5 (weights alone 1.2 against 4;
   on twice the rows over six seeds at most 3.0 and 3.2, with 6 layers at most 3.9 and 4.1 against 8 and
   10.6). The real teacher, SmolLM2-135M (30 layers, benchmarks/bench_bf16.py): 23.4 and 25.0 against 32
   and 44.6.
3. The cache against the reference follows from 2 with no further assumption (lse is 1-Lipschitz in the
   max-norm, log p = z - lse), plus the storage terms of 1:
   - |lse - lse_ref| <= B + e_lse;
   - |log p - log p_ref| <= 2 B + s at every stored id;
   - |T - T_ref| <= 2 B T (1 - T) e^(4B) + the storage term of 1 (the log of the tail / top-K mass ratio
     moves by <= 2B, and dT / d log ratio = T (1 - T));
   - a stored id's reference log-prob is >= the reference's K-th largest - 2B (ids swap only near ties).
   At m <= 16 that is B <= 0.31 nats against `rounded`: a missing logsumexp (log p = z - max, off by
   -log p_top) or a float16 overflow (inf) fails it, and the precision bugs it cannot see (a bf16
   logsumexp, bf16 log-probs, a teacher run in float32) fail 1: `test_the_checks_catch_capture_bugs`
   shows each. The whole file takes about 6 s on two idle CPU cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from conftest import capture, settings, shard_files
from transformers import AutoModelForCausalLM

from pipeline.config import TeacherCacheConfig
from pipeline.format import Cache

U = 2.0**-8  # bf16 unit roundoff
F16 = 2.0**-11  # float16 unit roundoff (topk_logprobs' storage)
F32 = 2.0**-24  # float32 unit roundoff (logsumexp's storage)
K = 16
BATCH = 3


@dataclass(frozen=True)
class Stored:
    """The fields of the cache's train split, on every position (use `valid`)."""

    ids: torch.Tensor  # (N, L, K) int64
    logprobs: torch.Tensor  # (N, L, K) float64 of the stored float16
    logsumexp: torch.Tensor  # (N, L) float64 of the stored float32
    target_logprob: torch.Tensor  # (N, L) float64 of the stored float32, NaN where no next token
    next_ids: torch.Tensor  # (N, L) int64, the next token (0 where there is none)
    valid: torch.Tensor  # (N, L) bool, real positions
    has_next: torch.Tensor  # (N, L) bool, real positions with a next token


@dataclass(frozen=True)
class Bf16Capture:
    cache: Cache
    stored: Stored
    logits: dict[str, torch.Tensor]  # "own" (bf16 values), "rounded", "original": (N, L, V) float64
    n_layers: int


def replay(model, ids: np.ndarray, lengths: np.ndarray, batches: list[tuple[int, int]]) -> torch.Tensor:
    """(N, L, V) float64 logits of `model` over the rows, one forward per batch as the capture ran them
    (attention mask None when every row of the batch is full, as `TargetComputer` does)."""
    out = []
    with torch.no_grad():
        for a, b in batches:
            x = torch.from_numpy(ids[a:b]).long()
            valid = torch.arange(x.shape[1])[None] < torch.from_numpy(lengths[a:b].astype(np.int64))[:, None]
            mask = None if bool(valid.all()) else valid.long()
            out.append(model(input_ids=x, attention_mask=mask, use_cache=False).logits.double())
    return torch.cat(out)


@pytest.fixture(scope="module")
def bf16(llama_dir, corpus, tmp_path_factory) -> Bf16Capture:
    root = tmp_path_factory.mktemp("bf16") / "cache"
    cfg = settings(llama_dir, corpus, root, teacher={"model": str(llama_dir), "dtype": "bfloat16"},
                   data={"packing": False, "max_tokens": 1500}, capture={"top_k": K, "batch_size": BATCH})
    capture(cfg)
    c = Cache(root)
    rows = c.rows("train")
    ids = np.stack(rows.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int64)  # (N, L)
    lengths = rows.column("length").to_numpy().astype(np.int64)
    L = ids.shape[1]
    assert BATCH * L <= TeacherCacheConfig.model_validate(cfg).capture.position_chunk  # one head block per batch
    # the capture's forwards: batches of BATCH rows that never cross a shard
    batches = [(s, min(s + BATCH, b)) for (split, _), sh in sorted(shard_files(root).items()) if split == "train"
               for a, b in [sh["rows"]] for s in range(a, b, BATCH)]
    assert batches[-1][1] == len(ids)
    pos = torch.arange(L)[None]
    lens = torch.from_numpy(lengths)[:, None]
    nxt = np.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    f = {name: c.array("train", name)[:] for name in ("topk_ids", "topk_logprobs", "logsumexp", "target_logprob")}
    assert f["logsumexp"].dtype == np.float32 and c.manifest.fields["logsumexp"].dtype == "float32"
    assert f["topk_logprobs"].dtype == np.float16
    stored = Stored(ids=torch.from_numpy(f["topk_ids"].astype(np.int64)),
                    logprobs=torch.from_numpy(f["topk_logprobs"].astype(np.float64)),
                    logsumexp=torch.from_numpy(f["logsumexp"].astype(np.float64)),
                    target_logprob=torch.from_numpy(f["target_logprob"].astype(np.float64)),
                    next_ids=torch.from_numpy(nxt), valid=pos < lens, has_next=pos < lens - 1)
    assert (~stored.valid).any() and stored.valid.any(), "expected padded rows and real ones"

    own_model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    weights = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    original = replay(weights.double(), ids, lengths, batches)  # .double() and .to() convert in place: in this order
    rounded = replay(weights.to(torch.bfloat16).double(), ids, lengths, batches)
    logits = {"own": replay(own_model, ids, lengths, batches), "rounded": rounded, "original": original}
    return Bf16Capture(c, stored, logits, own_model.config.num_hidden_layers)


# ---------------------------------------------------------------------------------------------
# the checks (raise AssertionError)


def lse_tolerance(lse: torch.Tensor, vocab: int) -> torch.Tensor:
    """e_lse: float32 rounding of a max-shifted logsumexp over `vocab` logits (module docstring, point 1)."""
    return F32 * (2 * lse.abs() + 4 * math.log2(vocab))


def storage_tolerance(logp: torch.Tensor, lse_tol: torch.Tensor) -> torch.Tensor:
    """s: a float16 log-prob computed in float32 as z - lse (module docstring, point 1)."""
    return F16 * logp.abs() + 2 * lse_tol[..., None] + F32


def _worst(err: torch.Tensor, bound: torch.Tensor, what: str) -> str:
    i = int(torch.argmax(err / bound))
    return (f"{what}: error {err.flatten()[i]:.3g} > bound {bound.flatten()[i]:.3g} "
            f"({int((err > bound).sum())} of {err.numel()})")


def check_exact(s: Stored, own: torch.Tensor) -> None:
    """Point 1: the stored fields are the bf16 logits' own, to float32 / float16 storage rounding."""
    v, z = s.valid, own[s.valid]  # (P, V)
    assert torch.isfinite(s.logsumexp[v]).all() and torch.isfinite(s.logprobs[v]).all(), "non-finite targets"
    lse_own = torch.logsumexp(z, -1)
    e_lse = lse_tolerance(lse_own, z.shape[-1])
    err = (s.logsumexp[v] - lse_own).abs()
    assert (err <= e_lse).all(), _worst(err, e_lse, "logsumexp vs the bf16 logits' own")
    ids = s.ids[v]
    z_at = z.gather(-1, ids)
    assert torch.equal(z_at, z.topk(K, -1).values), "stored ids are not a top-K of the bf16 logits"
    exact = z_at - lse_own[:, None]
    tol = storage_tolerance(exact, e_lse)
    err = (s.logprobs[v] - exact).abs()
    assert (err <= tol).all(), _worst(err, tol, "top-K log-probs vs the bf16 logits' own")
    tail_err = ((1 - s.logprobs[v].exp().sum(-1)) - (1 - exact.exp().sum(-1))).abs()
    tail_tol = (exact.exp() * tol.expm1()).sum(-1)
    assert (tail_err <= tail_tol).all(), _worst(tail_err, tail_tol, "tail mass vs the bf16 logits' own")
    h = s.has_next
    lse_h = torch.logsumexp(own[h], -1)
    tgt = own[h].gather(-1, s.next_ids[h][:, None])[:, 0] - lse_h
    tgt_tol = lse_tolerance(lse_h, z.shape[-1]) + 2 * F32 * tgt.abs()  # z - lse in float32
    err = (s.target_logprob[h] - tgt).abs()
    assert (err <= tgt_tol).all(), _worst(err, tgt_tol, "target log-prob vs the bf16 logits' own")


def check_within_budget(s: Stored, ref: torch.Tensor, C: float) -> None:
    """Point 3: the cache against a float64 forward, given the model's logit error bound B = C u m."""
    v, z = s.valid, ref[s.valid]  # (P, V)
    assert torch.isfinite(s.logsumexp[v]).all() and torch.isfinite(s.logprobs[v]).all(), "non-finite targets"
    B = C * U * z.abs().amax(-1)  # (P,)
    lse_ref = torch.logsumexp(z, -1)
    e_lse = lse_tolerance(lse_ref, z.shape[-1])
    err = (s.logsumexp[v] - lse_ref).abs()
    assert (err <= B + e_lse).all(), _worst(err, B + e_lse, "logsumexp vs float64")
    ids = s.ids[v]
    logp_ref = z.gather(-1, ids) - lse_ref[:, None]  # (P, K) the reference at the stored ids
    tol = storage_tolerance(logp_ref, e_lse)
    err = (s.logprobs[v] - logp_ref).abs()
    assert (err <= 2 * B[:, None] + tol).all(), _worst(err, 2 * B[:, None] + tol, "top-K log-probs vs float64")
    tail_ref = 1 - logp_ref.exp().sum(-1)
    tail_err = ((1 - s.logprobs[v].exp().sum(-1)) - tail_ref).abs()
    tail_tol = 2 * B * tail_ref * (1 - tail_ref) * (4 * B).exp() + (logp_ref.exp() * tol.expm1()).sum(-1)
    assert (tail_err <= tail_tol).all(), _worst(tail_err, tail_tol, "tail mass vs float64")
    kth = (z.topk(K, -1).values[:, -1] - lse_ref)[:, None]
    assert (logp_ref >= kth - 2 * B[:, None]).all(), "a stored id is far outside the float64 top-K"


def budget(reference: str, n_layers: int) -> float:
    """C of the logit error bound B = C u m against a reference (module docstring, point 2)."""
    arithmetic, weights = n_layers + 2, n_layers + 1
    return {"rounded": arithmetic, "original": math.hypot(arithmetic, weights)}[reference]


def logit_error(c: Bf16Capture, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_i |z_own - z_ref|, m) per real position, (P,) each."""
    v = c.stored.valid
    ref = c.logits[name][v]
    return (c.logits["own"][v] - ref).abs().amax(-1), ref.abs().amax(-1)


# ---------------------------------------------------------------------------------------------


def test_bf16_capture_stores_the_bf16_logits_targets_exactly(bf16):
    m = bf16.cache.manifest
    assert m.teacher.dtype == "bfloat16"
    assert m.fields["logsumexp"].dtype == "float32" and m.fields["topk_logprobs"].dtype == "float16"
    check_exact(bf16.stored, bf16.logits["own"])


@pytest.mark.parametrize("reference", ["rounded", "original"])
def test_bf16_capture_within_its_error_budget_of_a_float64_forward(bf16, reference):
    C = budget(reference, bf16.n_layers)
    err, m = logit_error(bf16, reference)
    ratio = err / (U * m)
    assert (ratio <= C).all(), f"the bf16 teacher's logit error is {ratio.max():.2f} u m > {C:.1f} u m"
    assert ratio.max() > 0.5, "no bf16-sized logit error: is the teacher really running in bfloat16?"
    check_within_budget(bf16.stored, bf16.logits[reference], C)


def test_weight_rounding_alone_stays_within_its_budget(bf16):
    """`rounded` and `original` differ by the weights' bf16 rounding alone: C_w = n_layers + 1."""
    _, m = logit_error(bf16, "original")
    v = bf16.stored.valid
    weights = (bf16.logits["rounded"][v] - bf16.logits["original"][v]).abs().amax(-1) / (U * m)
    assert 0.1 < weights.max() <= bf16.n_layers + 1


def _mutations(c: Bf16Capture) -> dict[str, Stored]:
    s, v, own = c.stored, c.stored.valid, c.logits["own"]
    top = s.logprobs[..., :1]
    fp16_lse = own.half().exp().sum(-1, dtype=torch.float16).double().log()  # no max shift: exp(z > 11.1) = inf
    lse_f32 = torch.logsumexp(c.logits["original"], -1)  # as a float32 teacher would store it
    lp_f32 = c.logits["original"].gather(-1, s.ids) - lse_f32[..., None]
    return {
        # log p = z - max: the logsumexp forgotten, lse = the max
        "no logsumexp": replace(s, logprobs=s.logprobs - top, logsumexp=s.logsumexp + top[..., 0]),
        "float16 overflow": replace(s, logsumexp=torch.where(v, fp16_lse, 0.0),
                                    logprobs=own.gather(-1, s.ids) - fp16_lse[..., None]),
        "targets one position late": replace(s, logprobs=s.logprobs.roll(1, 1), logsumexp=s.logsumexp.roll(1, 1),
                                             ids=s.ids.roll(1, 1)),
        "logsumexp in bfloat16": replace(s, logsumexp=s.logsumexp.to(torch.bfloat16).double()),
        "log-probs in bfloat16": replace(s, logprobs=s.logprobs.to(torch.bfloat16).double()),
        "teacher run in float32": replace(s, logsumexp=lse_f32.float().double(), logprobs=lp_f32.half().double()),
    }


# which checks each bug must fail: the float64 budget sees gross errors, the exactness check precision losses
CAUGHT_BY = {"no logsumexp": {"exact", "budget"}, "float16 overflow": {"exact", "budget"},
             "targets one position late": {"exact", "budget"}, "logsumexp in bfloat16": {"exact"},
             "log-probs in bfloat16": {"exact"}, "teacher run in float32": {"exact"}}


@pytest.mark.parametrize("bug", list(CAUGHT_BY))
def test_the_checks_catch_capture_bugs(bf16, bug):
    """Each bug, applied to the stored fields, fails the checks it must: the bounds are tight enough."""
    s = _mutations(bf16)[bug]
    C = budget("rounded", bf16.n_layers)
    failed = set()
    for name, check in (("exact", lambda: check_exact(s, bf16.logits["own"])),
                        ("budget", lambda: check_within_budget(s, bf16.logits["rounded"], C))):
        try:
            check()
        except AssertionError:
            failed.add(name)
    assert failed == CAUGHT_BY[bug]


def test_a_bf16_cache_and_its_lm_head_give_students_the_distribution_the_capture_stored(llama_dir, corpus, tmp_path):
    """Stage 2 recomputes a bf16 teacher's logits from `final_hidden` and `lm_head.safetensors` with the head's
    product in bf16, as the capture did: its logsumexp equals the stored one to float32 rounding and the rounding
    of bf16 products of another shape (one bf16 step on a few logits), far below the ~u m (here ~0.04) by which a
    float32 product of the same bf16 states differs."""
    from pipeline.train.head import TeacherHead

    root = tmp_path / "c"
    capture(settings(llama_dir, corpus, root, teacher={"model": str(llama_dir), "dtype": "bfloat16"},
                     data={"packing": False, "max_tokens": 1500},
                     capture={"top_k": K, "final_hidden": True, "final_hidden_dtype": "bfloat16"}))
    c = Cache(root)
    head = TeacherHead.from_cache(c, torch.device("cpu"))
    assert head.weight.dtype == torch.bfloat16
    h = head.decode(torch.from_numpy(c.array("train", "final_hidden")[:]))
    lse = torch.from_numpy(c.array("train", "logsumexp")[:]).double()
    lengths = torch.from_numpy(c.rows("train").column("length").to_numpy().astype(np.int64))
    valid = torch.arange(h.shape[1])[None] < lengths[:, None]
    mine = torch.logsumexp(head(h).double(), -1)
    assert (mine - lse)[valid].abs().max() < 1e-3
    as_float32 = torch.logsumexp((h.float() @ head.weight.float().T).double(), -1)
    assert (as_float32 - lse)[valid].abs().max() > 1e-2  # what a float32 product would have given instead
