"""Bounded-error log-probs (`capture.logprob_precision`): the rounding against a float64 reference, a capture that
uses it against the exact capture of the same teacher, and the settings it refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import capture, settings

from pipeline.capture.precision import round_logprobs, stored_kl
from pipeline.format import Cache


def _topk_logprobs(seed: int, positions: int = 400, vocab: int = 5000, k: int = 64) -> torch.Tensor:
    """Top-K log-probs of random logits from flat to very peaked (scale 0.5 to 8), float32, most likely first."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 8.0, positions, dtype=torch.float64)[:, None]
    z = torch.randn(positions, vocab, generator=g, dtype=torch.float64) * scale
    return torch.log_softmax(z, -1).topk(k, dim=-1).values.float()


def _reference_kl(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL over the K entries and the tail bucket (each tail at least 1e-7, each side normalised with it), one
    position at a time in float64."""
    out = []
    for xi, qi in zip(x.astype(np.float64), q.astype(np.float64)):
        p, r = (np.append(np.exp(v), max(1 - math.fsum(np.exp(v)), 1e-7)) for v in (xi, qi))
        p, r = p / math.fsum(p), r / math.fsum(r)
        out.append(math.fsum(p[i] * math.log(p[i] / r[i]) for i in range(len(p)) if p[i] > 0))
    return np.array(out)


@pytest.mark.parametrize("bound", [0.001, 0.005, 0.05])
def test_rounding_keeps_each_entry_within_its_bound_and_the_tail(bound):
    x = _topk_logprobs(int(bound * 1e4))
    q = round_logprobs(x, bound)
    assert q.dtype == torch.float16
    xd, qd = x.double(), q.double()
    assert (qd[:, 1:] <= qd[:, :-1]).all()  # the ranks keep their order
    f16 = 2.0 ** (torch.floor(torch.log2(xd.abs().clamp(min=2**-14))) - 10)  # float16's spacing at each value
    allowed = torch.minimum(bound / xd.exp().sqrt(), torch.full_like(xd, 2.0)) + f16
    assert ((qd - xd).abs()[:, 1:] <= allowed[:, 1:]).all()
    assert ((qd - xd).abs()[:, 1:] > f16[:, 1:]).any()  # it did round: not float16's own rounding alone
    mass_x, mass_q = xd.exp().sum(-1), qd.exp().sum(-1)
    free = qd[:, 0] > qd[:, 1]  # the first entry carried the change unless that would have put it below the second
    assert free.float().mean() > 0.75
    f16_first = 2.0 ** (torch.floor(torch.log2(qd[:, 0].abs().clamp(min=2**-14))) - 10)
    carried = (mass_q - mass_x).abs() <= qd[:, 0].exp() * f16_first + 1e-7  # to float16's rounding of the first
    assert carried[free].all()
    kl = stored_kl(x, q)
    assert np.allclose(kl.numpy(), _reference_kl(x.numpy(), q.numpy()), rtol=1e-4, atol=1e-9)
    assert (kl >= -1e-9).all() and kl.mean() <= 64 * bound**2 / 2


def test_the_kl_of_equal_values_is_zero_and_an_impossible_entry_adds_nothing():
    confident = torch.tensor([[0.0, -30.0, -31.0], [-0.1, -3.0, float("-inf")]])
    assert stored_kl(confident, confident).tolist() == [0.0, 0.0]
    q = round_logprobs(confident, 0.01)
    assert torch.isfinite(stored_kl(confident, q)).all() and q[1, 2] == float("-inf")


def test_coarser_bounds_store_fewer_bytes_and_cost_more_kl():
    from numcodecs.pcodec import PCodec

    x = _topk_logprobs(7, positions=2000)
    sizes, kls = [], []
    for bound in (None, 0.001, 0.005, 0.02):
        q = x.half() if bound is None else round_logprobs(x, bound)
        sizes.append(len(PCodec(level=8).encode(q.numpy())))
        kls.append(float(stored_kl(x, q).mean()))
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 0.6 * sizes[0], sizes
    assert kls == sorted(kls), kls


def test_a_bounded_capture_against_the_exact_one(llama_dir, corpus, tmp_path):
    bound = 0.01
    exact = capture(settings(llama_dir, corpus, tmp_path / "exact", capture={"top_k": 32}))
    cfg = settings(llama_dir, corpus, tmp_path / "bounded", capture={"top_k": 32, "logprob_precision": bound})
    m = capture(cfg).manifest
    assert m.format_version == "4.0" and m.capture.logprob_precision == bound
    assert exact.manifest.capture.logprob_precision is None and exact.manifest.stats.logprob_kl is None
    a, b = Cache(tmp_path / "exact"), Cache(tmp_path / "bounded")
    kls = []
    for split in a.splits:
        ids_a, ids_b = (np.asarray(c.array(split, "topk_ids")[:]) for c in (a, b))
        assert (ids_a == ids_b).all()  # the same teacher, the same ids: only the values are rounded
        xa = np.asarray(a.array(split, "topk_logprobs")[:]).astype(np.float64)
        xb = np.asarray(b.array(split, "topk_logprobs")[:]).astype(np.float64)
        lengths = np.asarray(a.rows(split, ["length"]).column("length"))
        valid = np.arange(xa.shape[1])[None, :] < lengths[:, None]
        f16 = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(xa), 2**-14))) - 10)
        err = np.abs(xb - xa)[valid][:, 1:]
        assert (err <= np.minimum(bound / np.sqrt(np.exp(xa)), 2.0)[valid][:, 1:] + 2 * f16[valid][:, 1:]).all()
        assert (np.diff(xb[valid], axis=-1) <= 0).all()
        kls.append(_reference_kl(xa[valid], xb[valid]))
        for field in ("logsumexp", "target_logprob"):  # the other fields are the exact capture's
            fa, fb = (np.asarray(c.array(split, field)[:]) for c in (a, b))
            np.testing.assert_array_equal(fa, fb)
    kl = np.concatenate(kls)
    st = m.stats.logprob_kl
    assert st["positions"] == m.stats.tokens == len(kl)
    assert st["mean"] == pytest.approx(kl.mean(), rel=0.05, abs=1e-7)  # exact float32 there, float16 here
    assert st["max"] == pytest.approx(kl.max(), rel=0.1, abs=1e-6) and st["max"] > 0
    assert m.stats.bytes_per_token["topk_logprobs"] < 0.8 * exact.manifest.stats.bytes_per_token["topk_logprobs"]


def test_an_append_keeps_the_precision_of_the_cache_it_grows(llama_dir, corpus, tmp_path):
    from pipeline.errors import CaptureError

    root = tmp_path / "c"
    cfg = settings(llama_dir, corpus, root, data={"max_tokens": 1200}, capture={"logprob_precision": 0.01})
    first = capture(cfg).manifest
    more = settings(llama_dir, corpus, root, data={"max_tokens": 2400}, output={"mode": "append"},
                    capture={"logprob_precision": 0.02})
    with pytest.raises(CaptureError, match="logprob_precision"):
        capture(more)
    more["capture"]["logprob_precision"] = 0.01
    grown = capture(more).manifest
    kl0, kl1 = first.stats.logprob_kl, grown.stats.logprob_kl
    assert kl1["positions"] == grown.stats.tokens > kl0["positions"] and kl1["max"] >= kl0["max"]


def test_a_classifier_refuses_rounded_logprobs(tmp_path):
    from pydantic import ValidationError

    from pipeline.config import TeacherCacheConfig

    cfg = {"teacher": {"model": "x", "task": "sequence-classification"},
           "data": {"source": "json", "data_files": ["x.jsonl"], "packing": False, "label_column": "label"},
           "capture": {"logprob_precision": 0.01}, "output": {"dir": str(tmp_path)}}
    with pytest.raises(ValidationError, match="capture.logprob_precision: next-token target modes"):
        TeacherCacheConfig.model_validate(cfg)
