"""Target modes: the lossless top-K codec, sampled targets (importance-sampled KD), exact full-vocabulary
KD from the cached final hidden state and LM head, int8 hidden states, and the guard against a
student trained on tail-free targets alone. Numerics against float64."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import STUDENT_ARCH, capture, make_llama, settings
from test_targets import _check_logit_targets, _load_split, _reference

from pipeline.capture.targets import draw_samples
from pipeline.student_config import StudentConfig
from pipeline.format import HEAD_FILE, Cache, verify
from pipeline.train import losses
from pipeline.train import terms
from pipeline.format.manifest import Capture
from pipeline.train.head import TeacherHead
from pipeline.train.signal import TeacherSignal

# ---------------------------------------------------------------------------------------------
# 1. lossless top-K


def _dir_bytes(root, field):
    return sum(p.stat().st_size for p in (root / "train" / field).rglob("*") if p.is_file())


def test_pcodec_topk_fields_hold_exactly_the_zstd_values_in_fewer_bytes(llama_dir, corpus, tmp_path):
    data = {"seq_len": 64, "max_tokens": 6000}
    capture(settings(llama_dir, corpus, tmp_path / "z", data=data, capture={"top_k": 64, "topk_codec": "zstd"}))
    capture(settings(llama_dir, corpus, tmp_path / "p", data=data, capture={"top_k": 64}))
    _, _, _, fz = _load_split(tmp_path / "z")
    c, _, _, fp = _load_split(tmp_path / "p")
    assert fz["topk_ids"].dtype == np.int32 and fp["topk_ids"].dtype == np.uint16  # vocab 512 fits in 16 bits
    assert c.manifest.fields["topk_ids"].codec == "pcodec"
    np.testing.assert_array_equal(fp["topk_ids"].astype(np.int32), fz["topk_ids"])
    np.testing.assert_array_equal(fp["topk_logprobs"].view(np.uint16), fz["topk_logprobs"].view(np.uint16))
    for field in ("topk_ids", "topk_logprobs"):
        assert _dir_bytes(tmp_path / "p", field) < _dir_bytes(tmp_path / "z", field), field
    assert verify(tmp_path / "p") == []


def test_a_finished_zstd_cache_is_done_for_the_pcodec_default(llama_dir, corpus, tmp_path):
    """A cache written before the codec change holds the same values: rerunning the capture is a no-op."""
    capture(settings(llama_dir, corpus, tmp_path / "c", capture={"topk_codec": "zstd"}))
    again = capture(settings(llama_dir, corpus, tmp_path / "c"))
    assert again.computed_shards == 0
    assert "codec" not in Cache(tmp_path / "c").manifest.document["fields"]["topk_ids"]


@pytest.fixture(scope="session")
def hugevocab_dir(tokenizer_dir, tmp_path_factory):
    """A Llama whose LM head has 140,000 rows (above 131,072: Qwen's and Gemma's vocabularies are larger)."""
    return make_llama(tokenizer_dir, tmp_path_factory.mktemp("hugevocab"), vocab=140_000, hidden=16, layers=2,
                      heads=2, kv_heads=1)


@pytest.mark.slow
def test_vocabulary_above_131072_in_every_mode(hugevocab_dir, corpus, tmp_path):
    capture(settings(hugevocab_dir, corpus, tmp_path / "c", data={"max_tokens": 500},
                     capture={"top_k": 32, "samples": 16, "final_hidden": True, "final_hidden_dtype": "float32"}))
    c, f = _check_logit_targets(hugevocab_dir, tmp_path / "c", 32)
    assert f["topk_ids"].dtype == np.int32 and f["sample_ids"].dtype == np.int32
    assert f["topk_ids"].max() > 131_072 and f["sample_ids"].max() > 131_072
    _check_samples(hugevocab_dir, tmp_path / "c", 16)
    _check_final_hidden(hugevocab_dir, tmp_path / "c")


# ---------------------------------------------------------------------------------------------
# 2. sampled targets


def _check_samples(model_dir, root, n):
    c, ids, lengths, f = _load_split(root)
    out, valid = _reference(model_dir, ids, lengths)
    logp = torch.log_softmax(out.logits, -1)
    sid, cnt, slp = f["sample_ids"].astype(np.int64), f["sample_counts"].astype(np.int64), f["sample_logprobs"]
    assert (cnt.sum(-1)[valid] == n).all() and (cnt[~valid] == 0).all() and (sid[~valid] == 0).all()
    used = cnt > 0
    assert (used[..., :-1] >= used[..., 1:]).all()  # the distinct ids first, then empty slots
    d = np.diff(sid, axis=-1)
    assert (d[used[..., 1:]] > 0).all()  # distinct and ascending
    assert (sid[~used] == 0).all() and (slp[~used] == 0).all()
    ref = logp.gather(-1, torch.from_numpy(sid)).numpy()
    np.testing.assert_allclose(slp.astype(np.float64)[used], ref[used], rtol=2e-3, atol=2e-3)
    return c, f


@pytest.mark.slow
def test_sampled_targets_match_the_teacher_and_a_rerun_draws_the_same(llama_dir, corpus, tmp_path):
    cap = {"top_k": 4, "samples": 24, "sample_seed": 3}  # draws are seeded per batch: batch_size is in the plan
    capture(settings(llama_dir, corpus, tmp_path / "a", capture=cap))
    capture(settings(llama_dir, corpus, tmp_path / "b", capture=cap))
    _, fa = _check_samples(llama_dir, tmp_path / "a", 24)
    _, _, _, fb = _load_split(tmp_path / "b")
    for k in ("sample_ids", "sample_counts", "sample_logprobs"):
        np.testing.assert_array_equal(fa[k], fb[k])  # the same seed, rows and settings: the same draws
    capture(settings(llama_dir, corpus, tmp_path / "c", capture={"top_k": 4, "samples": 24, "sample_seed": 4}))
    _, _, _, fc = _load_split(tmp_path / "c")
    assert not np.array_equal(fa["sample_ids"], fc["sample_ids"])  # another seed, other draws
    # the draws follow the teacher: the most drawn id is the teacher's argmax far more often than chance
    top = np.take_along_axis(fa["sample_ids"], fa["sample_counts"].argmax(-1)[..., None], -1)[..., 0]
    real = fa["sample_counts"].sum(-1) > 0
    assert (top == fa["topk_ids"][..., 0])[real].mean() > 0.5


def _capture(**settings) -> Capture:
    """The capture record of a manifest, for a teacher signal built by hand."""
    base = dict(top_k=8, temperatures=(), hidden_layers=(), hidden_dtype="float16", attention_layers=(),
                rows_per_shard=8, rows_per_chunk=2, compression_level=3)
    return Capture(**{**base, **settings})


def _reference_divergence(t_lp: torch.Tensor, s_lp: torch.Tensor, kind: str = "forward", beta: float = 0.5):
    """Per position, from the definitions in float64, written apart from the production code: sum p log(p / q)
    over the last axis; the JSD against the mixture m = beta t + (1 - beta) s in probability space."""
    p, q = t_lp.double().exp(), s_lp.double().exp()

    def kl(a, b):  # KL(a || b) of probability vectors, 0 log 0 = 0
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), 0.0).sum(-1)

    if kind == "forward":
        return kl(p, q)
    if kind == "reverse":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def test_the_reference_divergence_is_right():
    """The reference against hand-computed values: two-point distributions."""
    t = torch.tensor([[0.5, 0.5]], dtype=torch.float64).log()
    s = torch.tensor([[0.25, 0.75]], dtype=torch.float64).log()
    fwd = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    rev = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    m = [0.375, 0.625]
    js = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + \
        0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    for kind, want in (("forward", fwd), ("reverse", rev), ("jsd", js)):
        assert _reference_divergence(t, s, kind).item() == pytest.approx(want, rel=1e-12)


def _estimate(z_t, z_s, n, T, tau, draws, gen):
    """Per-position importance-sampled KL estimates and their gradients w.r.t. the student's logits, from
    `draws` independent sets of `n` draws, through the capture's sampler and the training term."""
    V = z_t.shape[-1]
    zt = z_t.expand(draws, V)
    ids, counts, zs_at = draw_samples(zt, n, tau, gen)
    lse1 = torch.logsumexp(zt, -1)
    batch = {"sample_ids": ids[:, None], "sample_counts": counts[:, None],
             "sample_logprobs": torch.where(counts > 0, zs_at - lse1[:, None], 0.0)[:, None],
             "logsumexp": lse1[:, None],
             "logsumexp_tempered": torch.stack([torch.logsumexp(zt / t, -1) for t in (2.0, 0.5)], 1)[..., None]}
    sig = TeacherSignal(batch, "cpu", _capture(temperatures=(2.0, 0.5), sample_temperature=tau))
    S = z_s.expand(draws, V).clone().requires_grad_(True)
    s_logits = S[:, None]
    ids_, t_lp, log_w = sig.sampled(T)  # Sampled(ids, logprobs, log_weights)
    s_lp = s_logits.gather(-1, ids_) / T - torch.logsumexp(s_logits / T, -1)[..., None]
    mask = torch.ones(draws, 1, dtype=torch.bool)
    loss = losses.sampled_kl(t_lp, s_lp, log_w, mask, T)
    loss.backward()
    per = ((log_w.exp() * (t_lp - s_lp)).masked_fill(log_w == -math.inf, 0).sum(-1)[:, 0] * T**2).detach()
    return loss.detach(), per, S.grad * draws



@pytest.mark.parametrize("T,tau", [(1.0, 1.0), (1.0, 2.0), (2.0, 1.0), (2.0, 0.5)])
def test_sampled_kl_is_unbiased_in_value_and_gradient(T, tau):
    """float64: the mean over many independent draw sets equals the full KL(p_T || s_T) T^2 and its gradient,
    within 5 standard errors."""
    g = torch.Generator().manual_seed(0)
    V, n, draws = 40, 8, 20_000
    z_t = torch.randn(V, generator=g, dtype=torch.float64) * 2.5
    z_s = torch.randn(V, generator=g, dtype=torch.float64)
    loss, per, grads = _estimate(z_t, z_s, n, T, tau, draws, g)
    zs = z_s.clone().requires_grad_(True)
    exact = _reference_divergence(torch.log_softmax(z_t / T, -1), torch.log_softmax(zs / T, -1)) * T**2
    exact.backward()
    se = per.std() / math.sqrt(draws)
    assert abs(loss.item() - exact.item()) < 5 * se.item() + 1e-12, (loss.item(), exact.item(), se.item())
    g_se = grads.std(0) / math.sqrt(draws)
    # ids so unlikely that no draw set holds them have an empirical spread of 0: bound their term w_v by its
    # second moment, E[w_v^2] <= r_v^2 (q_v / n + q_v^2), r_v = p_T(v) / q(v), in the gradient times T
    q = torch.softmax(z_t / tau, -1)
    r = torch.softmax(z_t / T, -1) / q
    floor = 5 * T * (r**2 * (q / n + q**2) / draws).sqrt()
    assert ((grads.mean(0) - zs.grad).abs() <= 5 * g_se + floor).all()
    assert se.item() > 0  # the estimate is random: the bound is not vacuous


def test_sampled_kl_is_exact_in_the_limit_of_many_draws():
    g = torch.Generator().manual_seed(1)
    V = 50
    z_t = torch.randn(V, generator=g, dtype=torch.float64) * 2.0
    z_s = torch.randn(V, generator=g, dtype=torch.float64)
    exact = _reference_divergence(torch.log_softmax(z_t, -1), torch.log_softmax(z_s, -1)).item()
    errors = []
    for n in (64, 400_000):
        loss, _, _ = _estimate(z_t, z_s, n, 1.0, 1.0, 1, g)
        errors.append(abs(loss.item() - exact))
    assert errors[1] < 0.01 * exact
    assert errors[1] < errors[0]


def test_kd_sampled_trains_a_student_and_refuses_an_uncaptured_temperature(llama_dir, corpus, tmp_path):
    from conftest import student_run

    from pipeline.train.recipe import train_students
    from pipeline.errors import StudentError

    capture(settings(llama_dir, corpus, tmp_path / "c", capture={"top_k": 4, "samples": 16}))
    s = {"name": "s", "arch": STUDENT_ARCH, "losses": {"kd_sampled": 1.0}, "lr": 3e-3, "warmup_steps": 0}
    train_students(student_run(tmp_path / "c", tmp_path / "o", [s], max_steps=8, eval_every=8),
                   log=lambda m: None, progress=False)
    rec = [json.loads(x) for x in open(tmp_path / "o/s/metrics.jsonl")]
    train = [r["kd_sampled"] for r in rec if r["split"] == "train"]
    assert all(np.isfinite(train)) and train[-1] < train[0]
    with pytest.raises(StudentError, match="temperature 2.0"):
        terms.fields_for(StudentConfig.model_validate({**s, "temperature": 2.0}), Cache(tmp_path / "c").manifest)


# ---------------------------------------------------------------------------------------------
# 3. exact full-vocabulary KD


def _check_final_hidden(model_dir, root):
    c, ids, lengths, f = _load_split(root)
    out, valid = _reference(model_dir, ids, lengths)
    head = TeacherHead.from_cache(c, "cpu")
    logits = head(head.decode(torch.from_numpy(f["final_hidden"])))  # float32 from the cached state
    ref = torch.log_softmax(out.logits, -1)
    got = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(got[torch.from_numpy(valid)], ref[torch.from_numpy(valid)], rtol=0, atol=2e-4)
    return c, f, head, out, valid


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_full_vocabulary_kd_from_the_cache_equals_the_float64_teacher(llama_dir, corpus, tmp_path, kind):
    capture(settings(llama_dir, corpus, tmp_path / "c", capture={"final_hidden": True,
                                                                  "final_hidden_dtype": "float32"}))
    c, f, head, out, valid = _check_final_hidden(llama_dir, tmp_path / "c")
    assert HEAD_FILE in c.manifest.metadata_files and verify(tmp_path / "c") == []
    g = torch.Generator().manual_seed(0)
    s64 = (torch.randn(out.logits.shape, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    mask = torch.from_numpy(valid)
    h = head.decode(torch.from_numpy(f["final_hidden"]))
    for T in (1.0, 2.0):
        s32 = s64.detach().float().requires_grad_(True)
        got = losses.full_divergence(head, h, s32, mask, T, kind, 0.3, block=7)
        got.backward()
        t_lp = torch.log_softmax(out.logits / T, -1)
        s_lp = torch.log_softmax(s64 / T, -1)
        per = _reference_divergence(t_lp, s_lp, kind, 0.3)
        ref = (per * mask).sum() / mask.sum() * T**2
        (gref,) = torch.autograd.grad(ref, s64)
        torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s32.grad.double(), gref, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_full_divergence_with_a_student_vocabulary_padded_beyond_the_teachers(kind):
    """Forward KL counts the student's extra rows in its softmax (pushing their mass down); reverse KL and JSD
    use its first V rows (the teacher's p = 0 there would make KL(s || .) infinite)."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 10, generator=g, dtype=torch.float64) * 2
    s = torch.randn(2, 3, 13, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(2, 3, dtype=torch.bool)
    got = losses.full_divergence(lambda x: x, t, s, mask, 1.0, kind, 0.3, block=4)
    s_lp = torch.log_softmax(s, -1)[..., :10] if kind == "forward" else torch.log_softmax(s[..., :10], -1)
    ref = _reference_divergence(torch.log_softmax(t, -1), s_lp, kind, 0.3).mean()
    torch.testing.assert_close(got, ref)
    assert torch.isfinite(got)


def test_full_vocabulary_fp16_storage_error_is_small_and_verify_covers_the_head(llama_dir, corpus, tmp_path):
    capture(settings(llama_dir, corpus, tmp_path / "c", capture={"final_hidden": True}))  # float16, the default
    c, ids, lengths, f = _load_split(tmp_path / "c")
    assert f["final_hidden"].dtype == np.float16
    out, valid = _reference(llama_dir, ids, lengths)
    head = TeacherHead.from_cache(c, "cpu")
    got = torch.log_softmax(head(head.decode(torch.from_numpy(f["final_hidden"]))).double(), -1)
    ref = torch.log_softmax(out.logits, -1)
    kl = _reference_divergence(ref, got)[torch.from_numpy(valid)]
    assert kl.max() < 1e-3  # fp16 rounding of the hidden state moves the teacher's distribution this little
    (tmp_path / "c" / HEAD_FILE).write_bytes((tmp_path / "c" / HEAD_FILE).read_bytes()[:-4] + b"\0\0\0\0")
    assert any(HEAD_FILE in p for p in verify(tmp_path / "c"))


def test_full_vocabulary_students_train_and_evaluate_exactly(llama_dir, corpus, tmp_path):
    from conftest import student_run

    from pipeline.train.metrics import evaluate
    from pipeline.train.dataset import CacheBatches, make_loader
    from pipeline.train.recipe import train_students

    capture(settings(llama_dir, corpus, tmp_path / "c", capture={"final_hidden": True}))
    s = {"name": "s", "arch": STUDENT_ARCH, "losses": {"kd_full_forward": 1.0, "kd_full_jsd": 0.2},
         "lr": 3e-3, "warmup_steps": 0}
    train_students(student_run(tmp_path / "c", tmp_path / "o", [s], max_steps=8, eval_every=8),
                   log=lambda m: None, progress=False)
    rec = [json.loads(x) for x in open(tmp_path / "o/s/metrics.jsonl")]
    train = [r["kd_full_forward"] for r in rec if r["split"] == "train"]
    assert train[-1] < train[0]
    # the validation KL is the exact one: at least the top-K + tail bound (data processing inequality)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o/s/model").eval()
    c = Cache(tmp_path / "c")
    ds = CacheBatches(c, "validation", list(terms.TOPK_FIELDS) + ["final_hidden"], 4, shuffle=False)
    exact = evaluate(model, make_loader(ds), torch.device("cpu"), TeacherHead.from_cache(c, "cpu"))
    bound = evaluate(model, make_loader(ds), torch.device("cpu"))
    assert exact["kl"] >= bound["kl"] - 1e-5 and exact["nll"] == pytest.approx(bound["nll"])
    last_val = [r for r in rec if r["split"] == "validation"][-1]
    assert last_val["kl"] == pytest.approx(exact["kl"], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# 4. int8 hidden states


def test_int8_hidden_states_stay_within_half_a_step_of_float16(llama_dir, corpus, tmp_path):
    from pipeline.train.representation import decode_hidden

    hs = {"hidden_layers": [0, 1, -1]}
    capture(settings(llama_dir, corpus, tmp_path / "f", capture=hs))
    capture(settings(llama_dir, corpus, tmp_path / "q", capture={**hs, "hidden_dtype": "int8"}))
    _, _, _, ff = _load_split(tmp_path / "f")
    c, _, _, fq = _load_split(tmp_path / "q")
    assert fq["hidden_states"].dtype == np.int8 and c.manifest.fields["hidden_states"].encoding == "int8-scaled"
    deq = decode_hidden(torch.from_numpy(fq["hidden_states"]), "int8-scaled", torch.from_numpy(fq["hidden_scale"]))
    ref = torch.from_numpy(ff["hidden_states"]).double()
    err = (deq.double() - ref).abs()
    bound = torch.from_numpy(fq["hidden_scale"]).double()[..., None] / 2 + ref.abs() * 2e-3  # + fp16 rounding
    assert (err <= bound).all()
    rel = (err.pow(2).sum() / ref.pow(2).sum()).sqrt().item()
    assert 0 < rel < 0.02
    # representation terms read it unchanged: the same hidden_mse as on the float16 cache, to int8 precision
    from pipeline.train.dataset import CacheBatches
    from pipeline.train.students import build_wiring
    from pipeline.train.step import step_losses
    from pipeline.train.student_init import build_student

    spec = StudentConfig.model_validate({"name": "s", "arch": STUDENT_ARCH, "losses": {"hidden_mse": 1.0}})
    vals = []
    for root in (tmp_path / "f", tmp_path / "q"):
        cache = Cache(root)
        torch.manual_seed(0)
        model = build_student(spec, cache.manifest, cache.tokenizer(), torch.device("cpu"))
        wiring = build_wiring(spec, model, cache.manifest, torch.device("cpu"))
        batch = next(iter(CacheBatches(cache, "train", terms.fields_for(spec, cache.manifest), 4, shuffle=False)))
        vals.append(step_losses(model, batch, spec, cache.manifest, torch.device("cpu"), wiring)["hidden_mse"].item())
    assert vals[1] == pytest.approx(vals[0], rel=0.02)


# ---------------------------------------------------------------------------------------------
# 4b. the guard


def test_tail_free_kd_alone_is_refused_unless_allowed():
    from pipeline.errors import StudentError

    base = {"name": "s", "arch": STUDENT_ARCH}

    def check(**kw):
        terms.check_losses(StudentConfig.model_validate({**base, **kw}))

    with pytest.raises(StudentError, match="ignores the teacher's tail"):
        check(losses={"kd_forward_renorm": 1.0})
    with pytest.raises(StudentError, match="allow_biased_kd"):
        check(losses={"mse_logprobs": 1.0, "ce": 0.0})  # a weight of 0 anchors nothing
    check(losses={"kd_forward_renorm": 1.0, "ce": 0.1})
    check(losses={"kd_forward_renorm": 1.0, "kd_sampled": 0.5})
    check(losses={"kd_forward_renorm": 1.0}, allow_biased_kd=True)
    check(losses={"kd_forward_renorm": 1.0}, task="sequence-classification")  # a class distribution is whole


def test_a_checkpoint_from_before_allow_biased_kd_still_resumes(llama_dir, corpus, tmp_path):
    """Identities written before the settings existed read as allow_biased_kd = false and task = None (the
    cache's), not as another run."""
    from conftest import student_run

    from pipeline.train.sources import open_sources
    from pipeline.train.checkpoint import grown_sources, resume_identity

    capture(settings(llama_dir, corpus, tmp_path / "c"))
    cfg = student_run(tmp_path / "c", tmp_path / "o")
    sources = open_sources(cfg)
    new = resume_identity(cfg.students[0], cfg, sources, 1)
    old = {**new, "student": {k: v for k, v in new["student"].items() if k not in ("allow_biased_kd", "task")}}
    assert grown_sources(old, new, sources) == {}
    changed = {**old, "student": {**old["student"], "lr": 1.0}}
    assert grown_sources(changed, new, sources) is None


def test_a_partial_pull_takes_the_lm_head_only_with_the_final_hidden_states(llama_dir, corpus, tmp_path):
    from pipeline.format.share import pull

    capture(settings(llama_dir, corpus, tmp_path / "c", capture={"final_hidden": True}))
    pull(str(tmp_path / "c"), tmp_path / "p1", fields=["topk_ids", "topk_logprobs", "logsumexp"], log=lambda m: None)
    pull(str(tmp_path / "c"), tmp_path / "p2", fields=["final_hidden"], log=lambda m: None)
    assert not (tmp_path / "p1" / HEAD_FILE).exists() and verify(tmp_path / "p1") == []
    assert (tmp_path / "p2" / HEAD_FILE).exists() and verify(tmp_path / "p2") == []
    TeacherHead.from_cache(Cache(tmp_path / "p2"), "cpu")


def test_a_missing_pcodec_package_or_lm_head_is_a_clear_error(llama_dir, corpus, tmp_path, monkeypatch):
    import sys

    from pipeline.errors import CaptureError
    from pipeline.errors import CacheError

    capture(settings(llama_dir, corpus, tmp_path / "c", data={"max_tokens": 600}))
    with pytest.raises(CacheError, match="no final hidden states"):
        TeacherHead.from_cache(Cache(tmp_path / "c"), "cpu")
    monkeypatch.setitem(sys.modules, "numcodecs.pcodec", None)  # as if the pcodec package were not installed
    with pytest.raises(CaptureError, match="numcodecs\\[pcodec\\]"):
        capture(settings(llama_dir, corpus, tmp_path / "d", data={"max_tokens": 600}))
    assert not (tmp_path / "d" / "manifest.json").exists()
    capture(settings(llama_dir, corpus, tmp_path / "d", data={"max_tokens": 600}, capture={"topk_codec": "zstd"}))
