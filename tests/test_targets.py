"""The cache against the teacher's own forward pass (float64 reference where it matters)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import capture, settings
from transformers import AutoModelForCausalLM

from pipeline.format import Cache


def _reference(model_dir, input_ids: np.ndarray, lengths: np.ndarray, eager: bool = False, dtype=torch.float64):
    """Full forward of the saved teacher: float64 log-softmax, hidden states, attentions."""
    kwargs = {"attn_implementation": "eager"} if eager else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs).eval()
    ids = torch.from_numpy(input_ids).long()
    mask = (torch.arange(ids.shape[1])[None] < torch.from_numpy(lengths.copy())[:, None]).long()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=eager, output_attentions=eager)
    return out, mask.bool().numpy()


def _load_split(root, split="train"):
    c = Cache(root)
    rows = c.rows(split)
    ids = np.stack(rows.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int32)
    lengths = rows.column("length").to_numpy()
    fields = {f: c.array(split, f)[:] for f in c.dense_fields}
    return c, ids, lengths, fields


def _check_logit_targets(model_dir, root, k, temperatures=()):
    c, ids, lengths, f = _load_split(root)
    out, valid = _reference(model_dir, ids, lengths)
    logits = out.logits  # (N, L, V) float64
    lse = torch.logsumexp(logits, -1).numpy()
    logp = torch.log_softmax(logits, -1)
    np.testing.assert_allclose(f["logsumexp"][valid], lse[valid], rtol=1e-5, atol=1e-4)
    # stored log-probs are those of the stored ids, to fp16 precision, most likely first
    stored_ids = torch.from_numpy(f["topk_ids"].astype(np.int64))
    ref_at_ids = logp.gather(-1, stored_ids).numpy()
    np.testing.assert_allclose(f["topk_logprobs"].astype(np.float64)[valid], ref_at_ids[valid], rtol=2e-3, atol=2e-3)
    assert (np.diff(f["topk_logprobs"].astype(np.float32), axis=-1)[valid] <= 0).all()
    # and the stored ids are the true top-K: nothing outside them beats the weakest inside (up to fp32 ties)
    kth = logp.topk(k, -1).values[..., -1].numpy()
    assert (ref_at_ids.min(-1)[valid] >= kth[valid] - 1e-4).all()
    # tail mass from logsumexp is exact: 1 - sum(p_topk) equals the reference tail
    ref_tail = 1 - np.exp(ref_at_ids).sum(-1)
    tail = 1 - np.exp(f["topk_logprobs"].astype(np.float64)).sum(-1)
    np.testing.assert_allclose(tail[valid], ref_tail[valid], atol=5e-3)
    # target log-prob of the actual next token; NaN where there is none
    nxt = np.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    ref_tgt = logp.gather(-1, torch.from_numpy(nxt).long()[..., None])[..., 0].numpy()
    has_next = np.arange(ids.shape[1])[None] < (lengths[:, None] - 1)
    np.testing.assert_allclose(f["target_logprob"][has_next], ref_tgt[has_next], rtol=1e-5, atol=1e-4)
    assert np.isnan(f["target_logprob"][~has_next]).all()
    # padding holds zeros
    assert (f["topk_ids"][~valid] == 0).all() and (f["topk_logprobs"][~valid] == 0).all()
    for j, t in enumerate(temperatures):
        ref_t = torch.logsumexp(logits / t, -1).numpy()
        np.testing.assert_allclose(f["logsumexp_tempered"][:, j][valid], ref_t[valid], rtol=1e-5, atol=1e-4)
    assert list(c.manifest.capture.temperatures_all) == [1.0, *temperatures]
    return c, f


@pytest.mark.parametrize("packing", [True, False])
def test_llama_logit_targets_match_float64_forward(llama_dir, corpus, tmp_path, packing):
    cfg = settings(llama_dir, corpus, tmp_path / "c", data={"packing": packing},
                   capture={"top_k": 16, "temperatures": [2.0, 0.5]})
    capture(cfg)
    c, f = _check_logit_targets(llama_dir, tmp_path / "c", 16, (2.0, 0.5))
    if not packing:
        assert (c.rows("train").column("length").to_numpy() < 32).any(), "expected padded rows"


def test_gpt2_logit_targets_match_float64_forward(gpt2_dir, corpus, tmp_path):
    capture(settings(gpt2_dir, corpus, tmp_path / "c", capture={"top_k": 8, "temperatures": [4.0]}))
    _check_logit_targets(gpt2_dir, tmp_path / "c", 8, (4.0,))


def test_vocabulary_above_int16_range(bigvocab_dir, corpus, tmp_path):
    capture(settings(bigvocab_dir, corpus, tmp_path / "c", data={"max_tokens": 600}, capture={"top_k": 32}))
    c, f = _check_logit_targets(bigvocab_dir, tmp_path / "c", 32)
    assert f["topk_ids"].dtype == np.int32
    assert f["topk_ids"].max() > 65_535
    assert c.manifest.teacher.vocab_size == 70_000


def test_k_equal_to_vocabulary_captures_whole_distribution(llama_dir, corpus, tmp_path):
    capture(settings(llama_dir, corpus, tmp_path / "c", data={"max_tokens": 300}, capture={"top_k": 512}))
    c, _, lengths, f = _load_split(tmp_path / "c")
    valid = np.arange(32)[None] < lengths[:, None]
    mass = np.exp(f["topk_logprobs"].astype(np.float64)).sum(-1)
    np.testing.assert_allclose(mass[valid], 1.0, atol=0.02)  # fp16 log-probs, 512 terms
    assert np.isclose(c.manifest.stats.mean_topk_mass, mass[valid].mean(), atol=1e-6)


@pytest.mark.parametrize("model_fixture", ["llama_dir", "gpt2_dir"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_hidden_states_and_attentions_match_eager_forward(request, model_fixture, dtype, corpus, tmp_path):
    model_dir = request.getfixturevalue(model_fixture)
    n_layers = 3 if model_fixture == "llama_dir" else 2
    cfg = settings(model_dir, corpus, tmp_path / "c", data={"packing": False},
                   capture={"hidden_layers": [0, 1, -1], "hidden_dtype": dtype, "attention_layers": [0, -1]})
    capture(cfg)
    c, ids, lengths, f = _load_split(tmp_path / "c")
    out, valid = _reference(model_dir, ids, lengths, eager=True, dtype=torch.float32)
    hs = f["hidden_states"]
    if dtype == "bfloat16":
        assert c.manifest.fields["hidden_states"].encoding == "bfloat16-bits"
        hs = torch.from_numpy(hs.view(np.int16)).view(torch.bfloat16).float().numpy()
        tol = dict(rtol=1e-2, atol=1e-2)
    else:
        tol = dict(rtol=2e-3, atol=2e-3)
    for j, layer in enumerate([0, 1, n_layers]):
        ref = out.hidden_states[layer].numpy()  # (N, L, d)
        np.testing.assert_allclose(hs[:, j][valid], ref[valid], **tol)
        assert (hs[:, j][~valid] == 0).all()
    att = f["attentions"]  # (N, 2, H, L, L)
    both = valid[:, None, :, None] & valid[:, None, None, :]
    for j, layer in enumerate([0, n_layers - 1]):
        ref = out.attentions[layer].numpy()  # (N, H, L, L)
        np.testing.assert_allclose(att[:, j].astype(np.float32)[np.broadcast_to(both, ref.shape)],
                                   ref[np.broadcast_to(both, ref.shape)], atol=1e-3)
    assert np.triu(att.astype(np.float32), k=1).max() == 0  # causal: nothing above the diagonal
    assert list(c.manifest.capture.hidden_layers) == [0, 1, n_layers]


def test_attention_head_selection_and_mean(llama_dir, corpus, tmp_path):
    base = settings(llama_dir, corpus, tmp_path / "a", capture={"attention_layers": [1]})
    capture(base)
    full = Cache(tmp_path / "a").array("train", "attentions")[:]  # (N, 1, 4, L, L)
    capture(settings(llama_dir, corpus, tmp_path / "b", capture={"attention_layers": [1], "attention_heads": [3, 1]}))
    sel = Cache(tmp_path / "b").array("train", "attentions")[:]
    np.testing.assert_array_equal(sel, full[:, :, [3, 1]])
    capture(settings(llama_dir, corpus, tmp_path / "m", capture={"attention_layers": [1],
                                                                "attention_head_reduce": "mean"}))
    mean = Cache(tmp_path / "m").array("train", "attentions")[:]
    assert mean.shape[2] == 1
    np.testing.assert_allclose(mean[:, :, 0].astype(np.float32), full.astype(np.float32).mean(2), atol=1e-3)


def test_attention_capture_keeps_sdpa_for_other_layers(llama_dir):
    """Only the recorded layer goes through eager attention; the model's outputs are unchanged."""
    from transformers.integrations import sdpa_attention

    from pipeline import attention

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        want = model(ids).logits
    calls = []
    real = sdpa_attention.sdpa_attention_forward

    def spy(module, *a, **k):
        calls.append(module.layer_idx)
        return real(module, *a, **k)

    attention.enable(model)
    rec = attention.AttentionRecorder([1], None, "none")
    sdpa_attention.sdpa_attention_forward = spy
    try:
        with torch.no_grad(), attention.recording(rec):
            got = model(ids).logits
    finally:
        sdpa_attention.sdpa_attention_forward = real
    assert sorted(calls) == [0, 2]
    assert rec.maps[1].shape == (2, 4, 16, 16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_chunked_head_matches_full_logits_and_bounds_blocks(llama_dir):
    from pipeline.capture.targets import logit_targets
    from pipeline.models import TeacherSpec, output_logits

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()
    spec = TeacherSpec.from_config(model.config)
    ids = torch.randint(0, 400, (3, 20))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        blocks = []
        head = output_logits(model, spec)

        def counting_head(h):
            blocks.append(h.shape[0])
            return head(h)

        nxt = torch.full_like(ids, -1)
        t = logit_targets(out.hidden_states[-1], counting_head, nxt, 5, [], position_chunk=7)
    assert max(blocks) == 7 and sum(blocks) == 60
    torch.testing.assert_close(t["logsumexp"], torch.logsumexp(out.logits.float(), -1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t["topk_ids"].long(), out.logits.topk(5, -1).indices)


def test_fp16_overflow_is_an_error_not_inf():
    from pipeline.capture.representations import to_storage
    from pipeline.capture.targets import CaptureOverflowError, HostBatch

    def stored(x, dtype):  # through the host pipeline: the check is raised when the batch is handed over
        host = HostBatch(torch.device("cpu"))
        to_storage(host, "hidden_states", x, dtype, "hidden state")
        return host.close().result().hidden_states

    x = torch.tensor([1.0, 7.0e4])
    with pytest.raises(CaptureOverflowError, match="magnitude 7e\\+04 overflows float16.*bfloat16"):
        stored(x, "float16")
    assert np.isfinite(stored(torch.tensor([1.0, 6.0e4]), "float16")).all()
    bits = stored(x, "bfloat16")
    back = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()
    torch.testing.assert_close(back, x, rtol=1e-2, atol=0)


def test_softcap_and_logit_scaling_follow_the_config():
    from pipeline.models import TeacherSpec, output_logits

    head = torch.nn.Linear(4, 6, bias=False)
    h = torch.randn(3, 4)
    z = head(h)

    class M:
        def get_output_embeddings(self):
            return head

    base = dict(model_type="x", vocab_size=6, hidden_size=4, num_layers=1, num_heads=1, max_positions=8)
    spec = TeacherSpec(**base, logit_softcap=2.0, logit_scale=None, logits_divisor=None)
    torch.testing.assert_close(output_logits(M(), spec)(h), torch.tanh(z / 2) * 2)
    spec = TeacherSpec(**base, logit_softcap=None, logit_scale=0.5, logits_divisor=4.0)
    torch.testing.assert_close(output_logits(M(), spec)(h), z * 0.5 / 4)
