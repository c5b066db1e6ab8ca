"""Every loss against a float64 reference computed over the full vocabulary, plus gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.train import losses

B, L, V = 2, 5, 40


def _setup(K, T=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 3
    zs = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    ids = zt.topk(K, -1).indices  # (B, L, K)
    cached = dict(topk_logprobs=torch.log_softmax(zt, -1).gather(-1, ids).to(dtype),
                  logsumexp=torch.logsumexp(zt, -1).to(dtype),
                  logsumexp_tempered=torch.logsumexp(zt / T, -1).to(dtype))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    return zt, zs, ids, cached, mask


def _buckets(z, ids, T):
    """Reference K + 1 distribution from full logits: probs at ids, then the tail's total."""
    p = torch.softmax(z / T, -1)
    outside = torch.ones_like(p).scatter(-1, ids, 0.0)  # exactly zero tail when K = V
    return torch.cat([p.gather(-1, ids), (p * outside).sum(-1, keepdim=True)], -1)


def _ref_kl(p, q, mask):
    kl = torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)
    return (kl * mask).sum() / mask.sum()


def _ours(zs, ids, cached, T, captured=True):
    t_lp, t_tail = losses.teacher_topk_logprobs(cached["topk_logprobs"], cached["logsumexp"], T,
                                            cached["logsumexp_tempered"] if captured else None)
    s_lp, s_tail = losses.student_topk_logprobs(zs, ids, T)
    return t_lp, t_tail, s_lp, s_tail


@pytest.mark.parametrize("T", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("K", [6, V])
def test_forward_reverse_kl_and_jsd_match_reference(K, T):
    zt, zs, ids, cached, mask = _setup(K, T)
    t_lp, t_tail, s_lp, s_tail = _ours(zs, ids, cached, T)
    P, Q = _buckets(zt, ids, T), _buckets(zs, ids, T)
    torch.testing.assert_close(losses.forward_kl(t_lp, t_tail, s_lp, s_tail, mask, T), _ref_kl(P, Q, mask) * T**2)
    torch.testing.assert_close(losses.reverse_kl(t_lp, t_tail, s_lp, s_tail, mask, T), _ref_kl(Q, P, mask) * T**2)
    for beta in (0.5, 0.1):
        M = beta * P + (1 - beta) * Q
        ref = (beta * _ref_kl(P, M, mask) + (1 - beta) * _ref_kl(Q, M, mask)) * T**2
        torch.testing.assert_close(losses.jsd(t_lp, t_tail, s_lp, s_tail, mask, beta, T), ref)


def test_top_k_equal_to_vocabulary_is_full_kl():
    zt, zs, ids, cached, mask = _setup(V)
    t_lp, t_tail, s_lp, s_tail = _ours(zs, ids, cached, 1.0)
    full = _ref_kl(torch.softmax(zt, -1), torch.softmax(zs, -1), mask)
    torch.testing.assert_close(losses.forward_kl(t_lp, t_tail, s_lp, s_tail, mask), full)
    torch.testing.assert_close(losses.forward_kl_renormalized(t_lp, s_lp, mask), full)
    torch.testing.assert_close(losses.full_forward_kl(zt, zs, mask, block=3), full)


def test_renormalized_kl_matches_reference_and_differs_from_tail():
    zt, zs, ids, cached, mask = _setup(6)
    t_lp, t_tail, s_lp, s_tail = _ours(zs, ids, cached, 1.0)
    pt = torch.softmax(zt.gather(-1, ids), -1)
    ps = torch.softmax(zs.gather(-1, ids), -1)
    torch.testing.assert_close(losses.forward_kl_renormalized(t_lp, s_lp, mask), _ref_kl(pt, ps, mask))
    assert not torch.isclose(losses.forward_kl_renormalized(t_lp, s_lp, mask),
                             losses.forward_kl(t_lp, t_tail, s_lp, s_tail, mask))


def test_full_forward_kl_with_temperature_and_padded_student_vocab():
    zt, zs, _, _, mask = _setup(4)
    zs_pad = torch.cat([zs, torch.randn(B, L, 7, dtype=torch.float64)], -1)  # student head padded past V
    ref = _ref_kl(torch.softmax(zt / 2, -1), torch.softmax(zs_pad / 2, -1)[..., :V], mask) * 4
    torch.testing.assert_close(losses.full_forward_kl(zt, zs_pad, mask, temperature=2.0, block=4), ref)


def test_mse_and_cross_entropy_match_reference():
    zt, zs, ids, cached, mask = _setup(6)
    t_lp, _, s_lp, _ = _ours(zs, ids, cached, 1.0)
    ref_lp = ((torch.log_softmax(zs, -1).gather(-1, ids) - torch.log_softmax(zt, -1).gather(-1, ids)) ** 2).mean(-1)
    torch.testing.assert_close(losses.mse_logprobs(t_lp, s_lp, mask), (ref_lp * mask).sum() / mask.sum())
    tz, sz = zt.gather(-1, ids), zs.gather(-1, ids)
    ref_z = (((sz - sz.mean(-1, keepdim=True)) - (tz - tz.mean(-1, keepdim=True))) ** 2).mean(-1)
    t_logits = cached["topk_logprobs"] + cached["logsumexp"][..., None]  # raw logits from the cache
    torch.testing.assert_close(losses.mse_logits(t_logits, sz, mask), (ref_z * mask).sum() / mask.sum())
    target = torch.randint(0, V, (B, L))
    lse = losses.logsumexp_t(zs)
    s_tgt = zs.gather(-1, target[..., None])[..., 0] - lse
    ref_ce = F.cross_entropy(zs[mask], target[mask])
    torch.testing.assert_close(losses.cross_entropy(s_tgt, mask), ref_ce)


def test_masked_positions_never_contribute():
    zt, zs, ids, cached, mask = _setup(6)
    t_lp, t_tail, s_lp, s_tail = _ours(zs, ids, cached, 1.0)
    base = losses.forward_kl(t_lp, t_tail, s_lp, s_tail, mask)
    zs2 = zs.clone()
    zs2[~mask] = 1e3 * torch.randn_like(zs2[~mask])
    _, _, s_lp2, s_tail2 = _ours(zs2, ids, cached, 1.0)
    torch.testing.assert_close(losses.forward_kl(t_lp, t_tail, s_lp2, s_tail2, mask), base)
    zs2.requires_grad_(True)
    _, _, s_lp3, s_tail3 = _ours(zs2, ids, cached, 1.0)
    losses.forward_kl(t_lp, t_tail, s_lp3, s_tail3, mask).backward()
    assert zs2.grad[~mask].abs().max() == 0


def test_logsumexp_t_values_gradients_and_blocks():
    z = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    for T, block in ((1.0, 4), (2.5, 100)):
        torch.testing.assert_close(losses.logsumexp_t(z, T, block), torch.logsumexp(z / T, -1))
        assert torch.autograd.gradcheck(lambda x: losses.logsumexp_t(x, T, block), (z,))
    z32 = torch.randn(2, 3, 9, requires_grad=True)
    w = torch.randn(2, 3)
    (losses.logsumexp_t(z32, 1.0, 2) * w).sum().backward()
    ref = z32.detach().clone().requires_grad_(True)
    (torch.logsumexp(ref, -1) * w).sum().backward()
    torch.testing.assert_close(z32.grad, ref.grad)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "renorm", "mse_logprobs"])
def test_gradcheck_through_student_logits(loss):
    _, zs, ids, cached, mask = _setup(5, T=2.0)
    zs = zs[:, :3].clone().requires_grad_(True)
    ids, mask = ids[:, :3], mask[:, :3]
    cached = {k: v[:, :3] for k, v in cached.items()}

    def f(x):
        t_lp, t_tail, s_lp, s_tail = _ours(x, ids, cached, 2.0)
        return {"forward_kl": lambda: losses.forward_kl(t_lp, t_tail, s_lp, s_tail, mask, 2.0),
                "reverse_kl": lambda: losses.reverse_kl(t_lp, t_tail, s_lp, s_tail, mask, 2.0),
                "jsd": lambda: losses.jsd(t_lp, t_tail, s_lp, s_tail, mask, 0.3, 2.0),
                "renorm": lambda: losses.forward_kl_renormalized(t_lp, s_lp, mask, 2.0),
                "mse_logprobs": lambda: losses.mse_logprobs(t_lp, s_lp, mask)}[loss]()

    assert torch.autograd.gradcheck(f, (zs,))


def test_uncaptured_temperature_warns_and_stays_a_distribution():
    zt, zs, ids, cached, mask = _setup(6, T=2.0)
    with pytest.warns(UserWarning, match="not captured"):
        t_lp, t_tail = losses.teacher_topk_logprobs(cached["topk_logprobs"], cached["logsumexp"], 2.0, None)
    total = torch.logsumexp(torch.cat([t_lp, t_tail[..., None]], -1), -1)
    torch.testing.assert_close(total, torch.zeros_like(total))
    exact, exact_tail = losses.teacher_topk_logprobs(cached["topk_logprobs"], cached["logsumexp"], 2.0,
                                                 cached["logsumexp_tempered"])
    assert (t_tail < exact_tail).all()  # documented direction of the bias for T > 1


def test_fp16_cached_logprobs_and_tail_near_zero_stay_finite():
    zt, zs, ids, cached, mask = _setup(V - 1)
    half = {k: v.half() for k, v in cached.items()}
    t_lp, t_tail, s_lp, s_tail = _ours(zs.float(), ids, half, 1.0)
    val = losses.forward_kl(t_lp, t_tail, s_lp, s_tail, mask)
    assert torch.isfinite(val)
    ref = _ref_kl(_buckets(zt, ids, 1.0), _buckets(zs, ids, 1.0), mask)
    torch.testing.assert_close(val.double(), ref, rtol=2e-2, atol=2e-3)
