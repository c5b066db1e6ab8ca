"""Stage 1 with a tensor-parallel teacher (`teacher.tp_size`): torchrun with gloo on CPU, tiny models of two
architectures that have a tensor-parallel plan (Llama, Qwen2). The cache of 2 ranks (tp 2) and of 4 ranks (tp 2 x
dp 2) against one process: the same rows and keys, top-K sets equal up to ties at the K-th value, log-probs and
logsumexp within float tolerance, hidden states and attention maps equal; a killed rank resumes; the bad settings
are refused before any weight loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import capture, make_llama, settings, write_toml
from test_distributed import ENTRY, torchrun

from pipeline.config import TeacherCacheConfig
from pipeline.errors import CaptureError
from pipeline.format import Cache, verify

pytestmark = pytest.mark.slow  # torchrun with 2 and 4 processes

FIELDS = ("topk_ids", "topk_logprobs", "logsumexp", "target_logprob", "logsumexp_tempered", "hidden_states",
          "attentions")


def make_qwen2(tokenizer_dir, out: Path, vocab=512, seed=0) -> Path:
    from conftest import _save
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return _save(Qwen2ForCausalLM(cfg), tokenizer_dir, out)


def _cfg(model_dir, corpus, out: Path, **teacher) -> dict:
    return settings(model_dir, corpus, out, teacher=teacher, data={"max_tokens": 1500},
                    capture={"top_k": 8, "temperatures": [2.0], "hidden_layers": [-1], "attention_layers": [0],
                             "rows_per_shard": 4, "rows_per_chunk": 2})


@pytest.fixture(scope="module")
def teachers(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-teachers")
    return {"llama": make_llama(tokenizer_dir, root / "llama"), "qwen2": make_qwen2(tokenizer_dir, root / "qwen2")}


@pytest.fixture(scope="module")
def one_process(teachers, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-one")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, model in teachers.items():
            capture(_cfg(model, corpus, root / name))
    finally:
        torch.set_num_threads(torch_threads)
    return root


def same_targets(a: Path, b: Path) -> None:
    """Two caches of the same rows: keys and rows equal, the targets equal within float tolerance (tensor
    parallelism sums in another order), top-K sets equal where the K-th value is not tied."""
    ca, cb = Cache(a), Cache(b)
    assert ca.manifest.splits.keys() == cb.manifest.splits.keys()
    for split in ca.manifest.splits:
        ra, rb = ca.rows(split), cb.rows(split)
        assert ra.column("key").to_pylist() == rb.column("key").to_pylist()
        fa = {f: np.asarray(ca.array(split, f)[:]) for f in FIELDS}
        fb = {f: np.asarray(cb.array(split, f)[:]) for f in FIELDS}
        lengths = np.asarray(ra.column("length").to_pylist())
        valid = np.arange(fa["logsumexp"].shape[1])[None, :] < lengths[:, None]
        for name in ("logsumexp", "target_logprob"):
            np.testing.assert_allclose(fa[name][valid], fb[name][valid], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(fa["logsumexp_tempered"], fb["logsumexp_tempered"], atol=1e-5)
        np.testing.assert_allclose(fa["topk_logprobs"].astype(np.float32), fb["topk_logprobs"].astype(np.float32),
                                   rtol=1e-3, atol=1e-4)  # float16: an ulp apart at most
        lp = fa["topk_logprobs"].astype(np.float32)
        untied = np.abs(lp[..., -1] - lp[..., -2]) > 1e-3  # the K-th value apart from the (K-1)-th
        same = (np.sort(fa["topk_ids"], -1) == np.sort(fb["topk_ids"], -1)).all(-1)
        assert (same | ~untied | ~valid).all()
        assert same[valid].mean() > 0.95  # ties are rare
        for name in ("hidden_states", "attentions"):
            np.testing.assert_allclose(fa[name].astype(np.float32), fb[name].astype(np.float32), rtol=1e-2,
                                       atol=1e-3, err_msg=name)  # stored in 16 bits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_two_ranks_at_tp_2_capture_what_one_process_does(teachers, one_process, corpus, tmp_path, family):
    out = tmp_path / "tp2"
    cfg = write_toml(tmp_path / "c.toml", _cfg(teachers[family], corpus, out, tp_size=2))
    res = torchrun(2, ENTRY, "teacher-cache", "-c", str(cfg))
    assert "split over 2 ranks" in res.stderr
    assert verify(out) == []
    same_targets(one_process / family, out)
    layout = json.loads((out / "manifest.json").read_text())["stats"]["timing"]["layout"]
    assert layout == {"ranks": 2, "tensor_parallel": 2}


def test_four_ranks_at_tp_2_by_dp_2_and_a_killed_rank_resumes(teachers, one_process, corpus, tmp_path):
    out = tmp_path / "tp2dp2"
    cfg = write_toml(tmp_path / "c.toml", _cfg(teachers["llama"], corpus, out, tp_size=2))
    res = torchrun(4, ENTRY, "teacher-cache", "-c", str(cfg), expect_ok=False,
                   env={"DISTILL_TEST_KILL_RANK": "2", "DISTILL_TEST_KILL_AFTER_SHARDS": "1"})
    assert res.returncode != 0 and not (out / "manifest.json").exists()
    res = torchrun(4, ENTRY, "teacher-cache", "-c", str(cfg))
    assert "resuming:" in res.stderr and "2 groups share" in res.stderr
    same_targets(one_process / "llama", out)
    assert json.loads((out / "manifest.json").read_text())["stats"]["timing"]["layout"] == {
        "ranks": 4, "tensor_parallel": 2}


@pytest.mark.parametrize("teacher,world,message", [
    ({"tp_size": 3}, "3", r"does not divide the teacher's 4 attention heads"),
    ({"tp_size": 2}, "3", r"tp_size=2 does not divide the launch's 3 ranks"),
    ({"tp_size": 4}, "4", r"does not divide the teacher's 2 key-value heads"),
    ({"tp_size": 2, "device_map": "auto"}, "2", r"give one of them"),
])
def test_bad_tensor_parallel_settings_are_refused_before_loading(teachers, corpus, tmp_path, monkeypatch, teacher,
                                                                 world, message):
    from pipeline.capture.teacher import describe_teacher

    monkeypatch.setenv("WORLD_SIZE", world)
    cfg = TeacherCacheConfig.model_validate(_cfg(teachers["llama"], corpus, tmp_path / "c", **teacher))
    with pytest.raises(CaptureError, match=message):
        describe_teacher(cfg)


def test_a_family_without_a_tensor_parallel_plan_is_refused(gpt2_dir, corpus, tmp_path, monkeypatch):
    from pipeline.capture.teacher import describe_teacher

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = TeacherCacheConfig.model_validate(_cfg(gpt2_dir, corpus, tmp_path / "c", tp_size=2))
    with pytest.raises(CaptureError, match=r"no tensor-parallel plan for the gpt2 family.*device_map"):
        describe_teacher(cfg)


def test_a_classification_teacher_is_refused_under_tensor_parallelism(tokenizer_dir, corpus, tmp_path, monkeypatch):
    from conftest import make_classifier

    from pipeline.capture.teacher import describe_teacher

    monkeypatch.setenv("WORLD_SIZE", "2")
    model = make_classifier(tokenizer_dir, tmp_path / "clf", "llama", "sequence", ["a", "b"])
    cfg = TeacherCacheConfig.model_validate(_cfg(model, corpus, tmp_path / "c", tp_size=2,
                                                 task="sequence-classification"))
    with pytest.raises(CaptureError, match=r"tensor-parallel capture is for causal-LM teachers"):
        describe_teacher(cfg)


def test_a_group_with_no_shard_loads_with_the_others_and_waits(teachers, corpus, tmp_path):
    """4 ranks as 2 groups of 2 on a cache of one shard: loading the teacher is collective over every group, so the
    group with nothing to compute loads it too (and then waits), instead of leaving the other hanging."""
    out = tmp_path / "one-shard"
    cfg = settings(teachers["llama"], corpus, out, teacher={"tp_size": 2},
                   data={"max_tokens": 200, "validation_fraction": 0.0},
                   capture={"top_k": 8, "rows_per_shard": 64, "rows_per_chunk": 2})
    res = torchrun(4, ENTRY, "teacher-cache", "-c", str(write_toml(tmp_path / "c.toml", cfg)))
    assert "2 groups share 1 shards" in res.stderr
    assert verify(out) == [] and json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"] == 1


def test_the_generator_refuses_tp_size():
    """On-policy generation runs the whole model on each rank: a generator's tp_size other than 1 is refused by its
    settings, not ignored."""
    import pydantic

    from pipeline.onpolicy.settings import GeneratorConfig

    with pytest.raises(pydantic.ValidationError, match="tp_size"):
        GeneratorConfig.model_validate({"model": "some/model", "tp_size": 2})
    assert GeneratorConfig.model_validate({"model": "some/model"}).tp_size == 1
