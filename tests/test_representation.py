"""Intermediate-layer distillation: hidden-state and attention losses, maps, projections,
teacher-initialised students, the self-supervised term, and a run that uses them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import capture, settings
from transformers import AutoModelForCausalLM

from pipeline.train import losses
from pipeline.student_config import StudentConfig, StudentRunConfig
from pipeline.train.representation import _resolve, make_projections, map_heads
from pipeline.errors import StudentError
from pipeline.train.recipe import train_students

B, L, D = 2, 6, 5


def _mask():
    m = torch.ones(B, L, dtype=torch.bool)
    m[1, 4:] = False
    return m


def _attn(seed, H=4):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, H, L, L, generator=g, dtype=torch.float64)
    z = z.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(z, -1)


def test_hidden_losses_match_reference_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    hs, ht = (torch.randn(B, L, D, generator=g, dtype=torch.float64) for _ in range(2))
    m = _mask()
    ref_mse = sum(((hs[b, t] - ht[b, t]) ** 2).mean() for b in range(B) for t in range(L) if m[b, t]) / m.sum()
    torch.testing.assert_close(losses.hidden_mse(hs, ht, m), ref_mse)
    cos = lambda a, b: (a @ b) / (a.norm() * b.norm())  # noqa: E731
    ref_cos = sum(1 - cos(hs[b, t], ht[b, t]) for b in range(B) for t in range(L) if m[b, t]) / m.sum()
    torch.testing.assert_close(losses.hidden_cosine(hs, ht, m), ref_cos)
    x = hs.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h: losses.hidden_mse(h, ht, m), (x,))
    assert torch.autograd.gradcheck(lambda h: losses.hidden_cosine(h, ht, m), (x,))


def test_attention_losses_match_reference_and_ignore_masked_pairs():
    at, as_ = _attn(1), _attn(2)
    m = _mask()
    kl_rows, sq = [], []
    for b in range(B):
        for h in range(4):
            for q in range(L):
                if not m[b, q]:
                    continue
                ks = [k for k in range(q + 1) if m[b, k]]
                kl_rows.append(sum(at[b, h, q, k] * (at[b, h, q, k].log() - as_[b, h, q, k].log()) for k in ks))
                sq += [(as_[b, h, q, k] - at[b, h, q, k]) ** 2 for k in ks]
    torch.testing.assert_close(losses.attention_kl(at, as_, m), torch.stack(kl_rows).mean())
    torch.testing.assert_close(losses.attention_mse(at, as_, m), torch.stack(sq).mean())
    noisy = as_.clone()
    noisy[..., ~torch.ones(L, L, dtype=torch.bool).tril()] = 0.7  # above the diagonal
    noisy[1, :, 4:] = 0.3  # padded queries
    torch.testing.assert_close(losses.attention_kl(at, noisy, m), losses.attention_kl(at, as_, m))
    torch.testing.assert_close(losses.attention_mse(at, noisy, m), losses.attention_mse(at, as_, m))
    x = as_.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: losses.attention_kl(at, a, m), (x,))
    assert torch.autograd.gradcheck(lambda a: losses.attention_mse(at, a, m), (x,))


def test_nll_match_reference_and_nan_teacher_positions():
    g = torch.Generator().manual_seed(3)
    s, t = (-torch.rand(B, L, generator=g, dtype=torch.float64) * 5 for _ in range(2))
    t[0, -1] = float("nan")
    m = _mask() & torch.isfinite(t)
    ref = sum((s[b, i] - t[b, i]) ** 2 for b in range(B) for i in range(L) if m[b, i]) / m.sum()
    torch.testing.assert_close(losses.nll_match(s, t, m), ref)
    x = s.clone().requires_grad_(True)
    losses.nll_match(x, t, m).backward()
    assert torch.isfinite(x.grad).all()


def test_layer_maps_and_refusals():
    # teacher of 12 layers; hidden states cached at 4, 8, 12; student of 3 layers
    assert _resolve("uniform", [4, 8, 12], 3, 12, False, "hidden-state", "s") == [(1, 0), (2, 1), (3, 2)]
    assert _resolve("last_k", [4, 8, 12], 1, 12, False, "hidden-state", "s") == [(0, 1), (1, 2)]
    assert _resolve("last_k", [4, 8, 12], 3, 12, False, "hidden-state", "s") == [(1, 0), (2, 1), (3, 2)]
    assert _resolve([[0, 8], [-1, -1]], [4, 8, 12], 3, 12, False, "hidden-state", "s") == [(0, 1), (3, 2)]
    # attention: decoder layers 5 and 11 of 12, student of 2 layers
    assert _resolve("uniform", [5, 11], 2, 12, True, "attention", "s") == [(0, 0), (1, 1)]
    with pytest.raises(StudentError, match=r"names teacher layer 6, which the cache does not hold \(cached: \[4, 8, 12\]\)"):
        _resolve([[1, 6]], [4, 8, 12], 3, 12, False, "hidden-state", "s")
    with pytest.raises(StudentError, match="names student layer 7, which does not exist"):
        _resolve([[7, 4]], [4, 8, 12], 3, 12, False, "hidden-state", "s")
    with pytest.raises(StudentError, match="needs teacher attention in the cache; it holds none"):
        _resolve("uniform", [], 3, 12, True, "attention", "s")


def test_projection_shapes_and_head_mapping():
    proj = make_projections([(1, 0), (2, 1)], 16, 32)
    assert len(proj) == 2 and proj[0].weight.shape == (32, 16) and proj[0].bias is None
    assert len(make_projections([(1, 0)], 32, 32)) == 0
    at, as_ = _attn(1, H=4), _attn(2, H=2)
    gt, gs = map_heads(at, as_, "group", "s")
    torch.testing.assert_close(gt, at.reshape(B, 2, 2, L, L).mean(2))
    assert gs is as_
    mt, ms = map_heads(at, as_, "mean", "s")
    assert mt.shape == ms.shape == (B, 1, L, L)
    with pytest.raises(StudentError, match="4 cached teacher heads do not split into 3 student groups"):
        map_heads(at, _attn(2, H=3), "group", "s")


@pytest.fixture(scope="module")
def sharp_teacher(llama_dir, tmp_path_factory):
    """The tiny teacher with sharpened attention (random init attends almost uniformly)."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    out = tmp_path_factory.mktemp("sharp")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rich_cache(sharp_teacher, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "cache"
    capture(settings(sharp_teacher, corpus, out, data={"max_tokens": 3000, "validation_fraction": 0.15},
                     capture={"top_k": 16, "hidden_layers": [1, 3], "attention_layers": [0, 2],
                              "rows_per_shard": 8, "rows_per_chunk": 4}))
    return out


def _run(cache, out, students, **kw):
    cfg = StudentRunConfig.model_validate({"cache": str(cache), "output_dir": str(out), "students": students,
                                           "batch_size": 4, "max_steps": 12, "eval_every": 12, "log_every": 1,
                                           "device": "cpu", **kw})
    return train_students(cfg, log=lambda m: None, progress=False)


@pytest.mark.slow
def test_student_learns_hidden_states_and_attention(rich_cache, tmp_path):
    arch = {"num_layers": 2, "hidden_size": 16, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 32}
    students = [{"name": "rep", "arch": arch, "lr": 5e-3, "warmup_steps": 0,
                 "losses": {"kd_forward": 1.0, "hidden_mse": 1.0, "attn_kl": 1.0, "nll_match": 0.1}}]
    _run(rich_cache, tmp_path, students, max_steps=30)
    recs = [json.loads(x) for x in (tmp_path / "rep" / "metrics.jsonl").read_text().splitlines()
            if '"train"' in x]
    terms = ("hidden_mse", "attn_kl", "nll_match", "kd_forward")
    first = {k: sum(r[k] for r in recs[:3]) / 3 for k in terms}  # smooth the noise of single steps
    last = {k: sum(r[k] for r in recs[-3:]) / 3 for k in terms}
    assert first["attn_kl"] > 0.05  # the teacher's attention is far from the student's at the start
    for term in terms:
        assert last[term] < first[term], term
    state = torch.load(tmp_path / "rep" / "checkpoint" / "state.pt", weights_only=True)
    assert set(state["projections"]) == {"0.weight", "1.weight"}  # 16 -> 32 for both mapped layers
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "rep" / "model")
    assert not any("projection" in k for k in exported.state_dict())


def test_missing_field_refused_before_training(llama_dir, corpus, tmp_path):
    plain = tmp_path / "plain"
    capture(settings(llama_dir, corpus, plain, data={"max_tokens": 800}))
    arch = {"num_layers": 1, "hidden_size": 16, "num_heads": 2}
    with pytest.raises(StudentError, match="loss hidden_mse needs field 'hidden_states'"):
        _run(plain, tmp_path / "o", [{"name": "h", "arch": arch, "losses": {"hidden_mse": 1.0}}])
    with pytest.raises(StudentError, match="loss attn_kl needs field 'attentions'"):
        _run(plain, tmp_path / "o", [{"name": "a", "arch": arch, "losses": {"attn_kl": 1.0}}])
    assert not (tmp_path / "o" / "h" / "checkpoint").exists()


def test_teacher_initialised_student_equals_chosen_layers(rich_cache, sharp_teacher, tmp_path):
    from pipeline.format import Cache
    from pipeline.train.student_init import build_student

    c = Cache(rich_cache)
    spec = StudentConfig(name="t", from_teacher=[0, 2], losses={"kd_forward": 1.0})
    student = build_student(spec, c.manifest, c.tokenizer(), torch.device("cpu"))
    teacher = AutoModelForCausalLM.from_pretrained(sharp_teacher)
    ts, ss = teacher.state_dict(), student.state_dict()
    assert student.config.num_hidden_layers == 2 and student.config.distill_init["layers"] == [0, 2]
    for k, v in ss.items():
        tk = k.replace("layers.1.", "layers.2.")
        torch.testing.assert_close(v, ts[tk], rtol=0, atol=0)
    every = build_student(StudentConfig(name="e", from_teacher=2, losses={"ce": 1.0}), c.manifest, c.tokenizer(),
                          torch.device("cpu"))
    assert every.config.distill_init["layers"] == [0, 2]
    with pytest.raises(StudentError, match=r"from_teacher layers \[0, 5\] invalid for a teacher of 3 layers"):
        build_student(StudentConfig(name="x", from_teacher=[0, 5], losses={"ce": 1.0}), c.manifest, c.tokenizer(),
                      torch.device("cpu"))
    rep = _run(rich_cache, tmp_path, [{"name": "t", "from_teacher": [0, 2], "losses": {"kd_forward": 1.0}}],
               max_steps=2)
    saved = json.loads((tmp_path / "t" / "model" / "config.json").read_text())
    assert saved["distill_init"]["layers"] == [0, 2] and rep[0]["steps"] == 2


# ---------------------------------------------------------------------------------------------- multi-task, mutual


def test_source_mix_draws_follow_weights_and_resume_mid_sequence():
    from pipeline.train.mixing import SourceMix

    def stream(seed):
        return SourceMix({"a": (None, 3.0), "b": (None, 1.0)}, seed=seed)

    draws = [stream(5).choose(m) for m in range(20000)]
    assert 0.73 < draws.count("a") / 20000 < 0.77  # weight 3 : 1, within ~5 standard deviations
    late = stream(5)  # a fresh stream asked from draw 9000 on (as after a resume) continues the same sequence
    assert [late.choose(m) for m in range(9000, 9100)] == draws[9000:9100]
    other = [stream(6).choose(m) for m in range(200)]
    assert other != draws[:200]  # the seed decides the sequence
    runs = max(len(r) for r in "".join(d[0] for d in draws).split("b"))
    assert runs < 60  # independent draws, not blocks of one task


def test_a_run_of_several_sources_evaluates_each_source(llama_dir, corpus, tmp_path, rich_cache):
    import sysconfig

    other = tmp_path / "other-cache"
    capture(settings(llama_dir, corpus, other, data={"source": "text", "data_files": [
        sysconfig.get_paths()["stdlib"] + "/textwrap.py"], "max_tokens": 2000, "validation_fraction": 0.2},
        capture={"top_k": 16, "rows_per_shard": 8, "rows_per_chunk": 4}))
    cfg = StudentRunConfig.model_validate({
        "sources": [{"name": "code", "cache": str(rich_cache), "weight": 3}, {"name": "wrap", "cache": str(other)}],
        "output_dir": str(tmp_path / "o"), "batch_size": 4, "max_steps": 8, "eval_every": 4, "device": "cpu",
        "students": [{"name": "s", "arch": {"num_layers": 1, "hidden_size": 16, "num_heads": 2},
                      "losses": {"kd_forward": 1.0}}]})
    rep = train_students(cfg, log=lambda m: None, progress=False)[0]
    assert set(rep["sources"]) == {"code", "wrap"} and set(rep["final"]["sources"]) == {"code", "wrap"}
    recs = [json.loads(x) for x in (tmp_path / "o" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("source") for r in recs if r["split"] == "validation"} == {None, "code", "wrap"}
    state = torch.load(tmp_path / "o" / "s" / "checkpoint" / "state.pt", weights_only=True)["run"]["stream"]
    assert state["draws"] == 8 and sum(t["batch"] for t in state["sources"].values()) >= 8 - 2


def test_caches_with_other_tokenizers_are_refused_together(rich_cache, corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path / "t2"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(d)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(d)
    capture(settings(d, corpus, tmp_path / "c2", data={"max_tokens": 500}))
    cfg = StudentRunConfig.model_validate({
        "sources": [{"name": "a", "cache": str(rich_cache)}, {"name": "b", "cache": str(tmp_path / "c2")}],
        "output_dir": str(tmp_path / "o"), "device": "cpu",
        "students": [{"name": "s", "arch": {"num_layers": 1, "hidden_size": 16, "num_heads": 2}}]})
    with pytest.raises(StudentError, match="source 'b' .* was made with another tokenizer than source 'a'"):
        train_students(cfg, log=lambda m: None, progress=False)


@pytest.mark.slow
def test_mutual_learning_pulls_two_students_together(rich_cache, tmp_path):
    """Same students, seeds and data with and without the mutual term: with it, the two students'
    predictions end closer (KL between them on held-out rows); a zeroed or sign-flipped term fails."""
    from pipeline.format import Cache
    from pipeline.train.dataset import CacheBatches, make_loader
    from transformers import AutoModelForCausalLM

    arch = {"num_layers": 1, "hidden_size": 16, "num_heads": 2}
    students = [{"name": "a", "arch": arch, "losses": {"ce": 1.0}, "lr": 5e-3, "warmup_steps": 0, "seed": 1},
                {"name": "b", "arch": {**arch, "hidden_size": 24}, "losses": {"ce": 1.0}, "lr": 5e-3,
                 "warmup_steps": 0, "seed": 2}]

    def disagreement(out):
        a, b = (AutoModelForCausalLM.from_pretrained(out / n / "model").eval() for n in ("a", "b"))
        batch = next(iter(make_loader(CacheBatches(Cache(rich_cache), "validation", [], 8, shuffle=False))))
        with torch.no_grad():
            la, lb = (torch.log_softmax(m(input_ids=batch["input_ids"]).logits.double(), -1) for m in (a, b))
        real = torch.arange(la.shape[1])[None] < batch["length"][:, None]
        return float((lb.exp() * (lb - la)).sum(-1)[real].mean() + (la.exp() * (la - lb)).sum(-1)[real].mean())

    _run(rich_cache, tmp_path / "alone", students, max_steps=20)
    _run(rich_cache, tmp_path / "mutual", students, max_steps=20, mutual_weight=3.0)
    apart, together = disagreement(tmp_path / "alone"), disagreement(tmp_path / "mutual")
    assert together < 0.7 * apart, (together, apart)
    for name in ("a", "b"):
        recs = [json.loads(x) for x in (tmp_path / "mutual" / name / "metrics.jsonl").read_text().splitlines()
                if '"train"' in x]
        assert all(r["mutual"] > 0 for r in recs)
        assert all(r["loss"] == pytest.approx(r["ce"] + 3.0 * r["mutual"], rel=1e-4) for r in recs)
    with pytest.raises(ValueError, match="mutual_weight needs at least two students"):
        StudentRunConfig.model_validate({"cache": "c", "output_dir": "o", "mutual_weight": 1.0,
                                         "students": [{"name": "a", "arch": arch}]})


def test_sources_must_capture_a_student_temperature_alike(llama_dir, corpus, tmp_path):
    for name, temps in (("a", [2.0, 4.0]), ("b", [4.0, 2.0])):
        capture(settings(llama_dir, corpus, tmp_path / name, data={"max_tokens": 600},
                         capture={"temperatures": temps}))
    arch = {"num_layers": 1, "hidden_size": 16, "num_heads": 2}
    base = {"sources": [{"name": "a", "cache": str(tmp_path / "a")}, {"name": "b", "cache": str(tmp_path / "b")}],
            "output_dir": str(tmp_path / "o"), "device": "cpu", "max_steps": 2, "eval_every": 2}
    hot = StudentRunConfig.model_validate({**base, "students": [{"name": "s", "arch": arch, "temperature": 2.0}]})
    with pytest.raises(StudentError, match=r"temperature 2.0 is not captured alike by every source .*a: \[2.0, 4.0\]; "
                                           r"b: \[4.0, 2.0\]"):
        train_students(hot, log=lambda m: None, progress=False)
    cold = StudentRunConfig.model_validate({**base, "students": [{"name": "s", "arch": arch}]})  # T=1 reads neither
    assert train_students(cold, log=lambda m: None, progress=False)[0]["steps"] == 2


def test_settings_that_name_the_sources_tasks_are_still_read_with_a_message(tmp_path, rich_cache):
    """`tasks` was the key of a run's weighted caches before `sources`: an old settings file (and an old
    checkpoint's identity) still reads, and says the new name; both keys at once is refused."""
    from pipeline.config import ConfigError, load_config
    from pipeline.train.checkpoint import resume_identity, upgrade_identity
    from pipeline.train.sources import open_sources

    old = tmp_path / "old.toml"
    old.write_text(f'output_dir = "{tmp_path / "o"}"\n[[tasks]]\nname = "code"\ncache = "{rich_cache}"\nweight = 2.0\n'
                   '[[students]]\nname = "s"\nlosses = {ce = 1.0}\n[students.arch]\nnum_layers = 1\nhidden_size = 16\n'
                   'num_heads = 2\n')
    with pytest.warns(FutureWarning, match=r"`tasks` \(the weighted caches of a run\) is now `sources`"):
        cfg = load_config(StudentRunConfig, old)
    assert [(s.name, s.cache, s.weight) for s in cfg.sources] == [("code", str(rich_cache), 2.0)]
    with pytest.raises(ConfigError, match="as sources only"):
        load_config(StudentRunConfig, old, [f'sources=[{{name = "x", cache = "{rich_cache}"}}]'])
    sources = open_sources(cfg)
    new = resume_identity(cfg.students[0], cfg, sources, 1)
    written_before = {("tasks" if k == "sources" else k): v for k, v in new.items()}
    assert "sources" not in written_before and upgrade_identity(written_before, sources, new) == new


def test_activation_checkpointing_keeps_hidden_state_terms_and_refuses_attention_terms(rich_cache, tmp_path):
    """Hidden-state terms read the states of the recomputed layers alike; a student whose attention maps are recorded
    in its forward pass would record them again in the backward pass, and is refused before training."""
    hid = [{"name": "h", "arch": {"num_layers": 2, "hidden_size": 16, "num_heads": 2},
            "losses": {"ce": 1.0, "hidden_mse": 0.5}}]
    a = _run(rich_cache, tmp_path / "kept", hid, max_steps=2)[0]
    b = _run(rich_cache, tmp_path / "recomputed", hid, max_steps=2, activation_checkpointing=True)[0]
    assert a["final"]["nll"] == pytest.approx(b["final"]["nll"], abs=1e-5)
    attn = [{"name": "a", "arch": {"num_layers": 2, "hidden_size": 16, "num_heads": 2},
             "losses": {"ce": 1.0, "attn_kl": 0.1}}]
    with pytest.raises(StudentError, match="activation_checkpointing would record its attention maps again"):
        _run(rich_cache, tmp_path / "attn", attn, max_steps=1, activation_checkpointing=True)
