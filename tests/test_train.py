"""Stage 2: the reader, student checks, the trainer (one read, resume, early stop), save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import capture, make_llama, settings
from conftest import STUDENT_ARCH as ARCH
from conftest import student_run as run_cfg
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.format import Cache, CacheError
from pipeline.train.dataset import CacheBatches, make_loader
from pipeline.train.batch_order import batch_plan
from pipeline.errors import StudentError
from pipeline.train.metrics import evaluate
from pipeline.train.recipe import train_students
from pipeline.train.terms import fields_for



@pytest.fixture(scope="module")
def cache_dir(llama_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "cache"
    capture(settings(llama_dir, corpus, out, data={"max_tokens": 4000, "validation_fraction": 0.15},
                     capture={"top_k": 16, "temperatures": [2.0], "rows_per_shard": 8, "rows_per_chunk": 4}))
    return out


def _train(cfg, **kw):
    return train_students(cfg, log=lambda m: None, progress=False, **kw)


# ---------------------------------------------------------------------------------------------- reader


def test_batch_plan_is_deterministic_and_covers_every_row():
    shards = [np.arange(s, min(s + 8, 30)) for s in range(0, 30, 8)]
    a = batch_plan(shards, 4, 2, seed=1, epoch=0, shuffle=True)
    b = batch_plan(shards, 4, 2, seed=1, epoch=0, shuffle=True)
    c = batch_plan(shards, 4, 2, seed=1, epoch=1, shuffle=True)
    assert [x.rows.tolist() for x in a] == [x.rows.tolist() for x in b]
    assert [x.rows.tolist() for x in a] != [x.rows.tolist() for x in c]
    assert sorted(np.concatenate([x.rows for x in a]).tolist()) == list(range(30))
    assert [x.index for x in a] == list(range(len(a)))
    for x in a:  # a batch draws from at most two shards of one worker
        assert len(set((x.rows // 8).tolist())) <= 2


@pytest.mark.parametrize("workers", [0, 2])
def test_reader_batches_match_the_cache_and_resume(cache_dir, workers):
    c = Cache(cache_dir)
    ds = CacheBatches(cache_dir, "train", ["topk_ids", "logsumexp_tempered"], 4, seed=3, num_workers=workers)
    got = list(make_loader(ds))
    assert [b["batch_index"] for b in got] == list(range(len(ds)))  # the loader yields the plan's order
    rows = c.rows("train")
    ids = np.stack(rows.column("input_ids").to_numpy(zero_copy_only=False))
    topk = c.array("train", "topk_ids")[:]
    for b in got:
        r = b["row"].numpy()
        np.testing.assert_array_equal(b["input_ids"].numpy(), ids[r])
        np.testing.assert_array_equal(b["topk_ids"].numpy(), topk[r])
        assert b["logsumexp_tempered"].dtype == torch.float32
    for start in (3, 4, len(got) - 1):
        ds.start = start
        again = list(make_loader(ds))
        assert [b["row"].tolist() for b in again] == [b["row"].tolist() for b in got[start:]]


def test_reader_subset_by_key_and_unknown_field(cache_dir):
    keys = Cache(cache_dir).rows("train").column("key").to_pylist()
    pick = keys[5:12][::-1]
    ds = CacheBatches(cache_dir, "train", ["logsumexp"], 3, shuffle=False, keys=pick)
    seen = [r for b in make_loader(ds) for r in b["row"].tolist()]
    assert sorted(seen) == list(range(5, 12))
    with pytest.raises(CacheError, match="no field hidden_states"):
        CacheBatches(cache_dir, "train", ["hidden_states"], 3)
    with pytest.raises(CacheError, match="keys are not in"):
        CacheBatches(cache_dir, "train", ["logsumexp"], 3, keys=["0" * 32])


def test_loss_needing_a_missing_field_is_refused(cache_dir):
    from pipeline.format import Manifest

    document = json.loads((cache_dir / "manifest.json").read_text())
    spec = run_cfg(cache_dir, "x").students[0]
    assert fields_for(spec, Manifest.from_dict(document)) == ["topk_ids", "topk_logprobs", "logsumexp"]
    del document["fields"]["topk_logprobs"]
    manifest = Manifest.from_dict(document)
    with pytest.raises(StudentError, match="loss kd_forward needs field 'topk_logprobs'"):
        fields_for(spec, manifest)
    ce_only = spec.model_copy(update={"losses": {"ce": 1.0}})
    assert fields_for(ce_only, manifest) == []


# ---------------------------------------------------------------------------------------------- students


def test_two_students_one_read_and_outputs(cache_dir, tmp_path, monkeypatch):
    reads = []
    real_iter = CacheBatches.__iter__

    def counting(self):
        for b in real_iter(self):
            if self.split == "train":
                reads.append(b["batch_index"])
            yield b

    monkeypatch.setattr(CacheBatches, "__iter__", counting)
    students = [
        {"name": "kd", "arch": ARCH, "losses": {"kd_forward": 1.0}, "lr": 3e-3},
        {"name": "ce-wide", "arch": {**ARCH, "hidden_size": 48, "intermediate_size": 96}, "losses": {"ce": 1.0},
         "lr": 1e-3, "temperature": 2.0},
    ]
    reports = _train(run_cfg(cache_dir, tmp_path, students, max_steps=5))
    assert len(reads) == 5  # five batches read for five steps of two students
    assert [r["name"] for r in reports] == ["kd", "ce-wide"]
    for name in ("kd", "ce-wide"):
        out = tmp_path / name
        assert (out / "model" / "model.safetensors").is_file() and (out / "curves.png").stat().st_size > 1000
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert {r["split"] for r in recs} == {"train", "validation"}
        rep = json.loads((out / "report.json").read_text())
        assert rep["steps"] == 5 and rep["tokens_seen"] > 0 and "nll" in rep["final"]


def test_saved_student_loads_with_plain_transformers_and_generates(cache_dir, tmp_path):
    _train(run_cfg(cache_dir, tmp_path, max_steps=3, eval_every=3))
    d = tmp_path / "s" / "model"
    model = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    enc = tok("def f(x):", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5
    state = torch.load(tmp_path / "s" / "checkpoint" / "state.pt", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_student_with_another_tokenizer_and_id_terms_is_refused(cache_dir, tmp_path, tokenizer_dir):
    """A pretrained student with its own tokenizer is a cross-tokenizer student (tests/test_cross_tokenizer.py);
    terms that compare token ids are refused for it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["other text entirely " * 50], trainers.BpeTrainer(vocab_size=300, special_tokens=["<e>"]))
    other = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<e>")
    d = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(d)
    other.save_pretrained(d)
    cfg = run_cfg(cache_dir, tmp_path / "o", [{"name": "p", "pretrained": str(d)}])
    with pytest.raises(StudentError, match=r"has another tokenizer than the cache: kd_forward compares the teacher's "
                                           r"token ids with the student's; across tokenizers a student trains with ce, "):
        _train(cfg)


def test_padded_student_vocabulary_trains_and_smaller_is_refused(cache_dir, tmp_path, tokenizer_dir):
    padded = make_llama(tokenizer_dir, tmp_path / "padded", vocab=576, hidden=16, layers=1, heads=2, kv_heads=1)
    reports = _train(run_cfg(cache_dir, tmp_path / "o", [{"name": "p", "pretrained": str(padded)}], max_steps=2))
    assert reports[0]["steps"] == 2
    small = make_llama(tokenizer_dir, tmp_path / "small", vocab=450, hidden=16, layers=1, heads=2, kv_heads=1)
    with pytest.raises(StudentError, match=r"450 rows, fewer than the cache's vocabulary \(512\)"):
        _train(run_cfg(cache_dir, tmp_path / "o2", [{"name": "p", "pretrained": str(small)}]))


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(cache_dir, tmp_path):
    full = run_cfg(cache_dir, tmp_path / "full", max_steps=8, eval_every=4, checkpoint_every=2, num_workers=1)
    _train(full)

    class Killed(Exception):
        pass

    def kill_at_5(step):
        if step == 5:
            raise Killed

    part = run_cfg(cache_dir, tmp_path / "part", max_steps=8, eval_every=4, checkpoint_every=2, num_workers=1)
    with pytest.raises(Killed):
        _train(part, after_step=kill_at_5)
    _train(part)  # resumes from the step-4 checkpoint
    a = torch.load(tmp_path / "full" / "s" / "checkpoint" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "s" / "checkpoint" / "state.pt", weights_only=True)
    assert a["run"]["step"] == b["run"]["step"] == 8 and a["run"]["tokens"] == b["run"]["tokens"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)


def test_activation_checkpointing_trains_the_same_weights(cache_dir, tmp_path):
    """Each decoder layer recomputed in the backward pass: the same gradients, so the same weights."""
    _train(run_cfg(cache_dir, tmp_path / "kept", max_steps=3))
    _train(run_cfg(cache_dir, tmp_path / "recomputed", max_steps=3, activation_checkpointing=True))
    a = torch.load(tmp_path / "kept" / "s" / "checkpoint" / "state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "recomputed" / "s" / "checkpoint" / "state.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and any(not torch.equal(v, torch.zeros_like(v)) for v in a.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_validation_loss_falls_and_eval_matches_reference(cache_dir, tmp_path):
    from pipeline.train.student_init import build_student

    cfg = run_cfg(cache_dir, tmp_path, max_steps=40, eval_every=10)
    cache = Cache(cache_dir)
    untrained = build_student(cfg.students[0], cache.manifest, cache.tokenizer(), torch.device("cpu"))
    val = CacheBatches(cache_dir, "validation", ["topk_ids", "topk_logprobs", "logsumexp"], 4, shuffle=False)
    before = evaluate(untrained, make_loader(val), torch.device("cpu"))
    # the evaluation's NLL and top-1 agreement against a direct computation
    nll, n, agree, nv = 0.0, 0, 0, 0
    with torch.no_grad():
        for b in make_loader(val):
            logits = untrained(b["input_ids"]).logits.double()
            lp = torch.log_softmax(logits, -1)
            pos = torch.arange(logits.shape[1])
            has_next = pos[None] < b["length"][:, None] - 1
            tgt = lp[:, :-1].gather(-1, b["input_ids"][:, 1:, None])[..., 0]
            nll -= float(tgt[has_next[:, :-1]].sum())
            n += int(has_next.sum())
            valid = pos[None] < b["length"][:, None]
            agree += int((logits.argmax(-1) == b["topk_ids"][..., 0])[valid].sum())
            nv += int(valid.sum())
    assert before["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert before["top1_agreement"] == pytest.approx(agree / nv)
    assert 0 <= before["ece"] <= 1 and before["kl"] > 0
    report = _train(cfg)[0]
    evals = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
             if '"validation"' in x]
    assert [e["step"] for e in evals] == [10, 20, 30, 40]
    assert report["final"]["nll"] < before["nll"] - 0.5
    assert evals[-1]["nll"] < evals[0]["nll"]
    assert report["final"]["kl"] < before["kl"]


def test_early_stopping_keeps_the_best_weights_in_model_dir(cache_dir, tmp_path, monkeypatch):
    """Scripted validation NLLs (best at the second evaluation, then worse) drive early stopping; the
    weights are real: model/ must hold the student as it was at the best step, not at the last."""
    import pipeline.train.recipe as recipe
    import pipeline.train.heldout as heldout

    script = iter([5.0, 4.0, 4.5, 4.6, 4.7, 4.8])

    def scripted(models, batches, device, head=None, task=None, readings=None, precision="auto", counted=None):
        nll = next(script)
        return {n: {"nll": nll, "ppl": float(np.exp(nll)), "top1_agreement": 0.1, "kl": 1.0, "ece": 0.1, "tokens": 1}
                for n in models}

    monkeypatch.setattr(heldout, "evaluate_all", scripted)
    weights_at = {}
    cfg = run_cfg(cache_dir, tmp_path, max_steps=30, eval_every=2, patience=2)
    run = recipe.Recipe(cfg, log=lambda m: None, progress=False)
    run.after_step = lambda step: weights_at.__setitem__(
        step, {k: v.clone() for k, v in run.students[0].model.state_dict().items()})
    rep = run.train()[0]
    assert rep["stopped_early"] and rep["steps"] == 8 and rep["best_step"] == 4
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "s" / "model").state_dict()
    for k, v in saved.items():
        torch.testing.assert_close(v, weights_at[4][k], rtol=0, atol=0)
    assert any(not torch.equal(saved[k], weights_at[8][k]) for k in saved)  # the last step's weights differ


def test_resume_with_other_settings_is_refused(cache_dir, tmp_path):
    _train(run_cfg(cache_dir, tmp_path, max_steps=2, eval_every=2))
    students = [{"name": "s", "arch": ARCH, "losses": {"kd_forward": 0.5, "ce": 0.5}, "lr": 1e-2, "warmup_steps": 2}]
    with pytest.raises(StudentError, match=r"other settings \(student differ\)"):
        _train(run_cfg(cache_dir, tmp_path, students, max_steps=2, eval_every=2))
    with pytest.raises(StudentError, match=r"other settings \(batch_size differ\)"):
        _train(run_cfg(cache_dir, tmp_path, max_steps=2, eval_every=2, batch_size=3))


@pytest.mark.parametrize("changed", [{"early_stopping_metric": "top1_agreement"}, {"eval_rows": 2}, {"patience": 1},
                                     {"eval_every": 1}, {"shuffle_window": 4}])
def test_a_resume_that_changes_what_best_means_is_refused_by_name(changed, cache_dir, tmp_path):
    """The best value so far is an NLL over these rows, evaluated every so many steps with this patience: a
    resumed run with another metric, other rows or another rhythm would compare the incomparable."""
    _train(run_cfg(cache_dir, tmp_path, max_steps=2, eval_every=2))
    (key, value), = changed.items()
    why = r"\)" if key == "shuffle_window" else rf": {key} = .* there, {value!r} here, which decide the best model"
    with pytest.raises(StudentError, match=rf"other settings \({key} differ{why}"):  # (the window: the data order)
        _train(run_cfg(cache_dir, tmp_path, max_steps=4, **{"eval_every": 2, **changed}))
    # an identity written before these keys were recorded resumes (their values cannot be known)
    state_path = tmp_path / "s" / "checkpoint" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    for k in ("early_stopping_metric", "eval_rows", "eval_every", "patience", "shuffle_window"):
        state["identity"].pop(k)
    torch.save(state, state_path)
    assert _train(run_cfg(cache_dir, tmp_path, max_steps=4, eval_every=2))[0]["steps"] == 4


def test_an_output_folder_that_is_a_file_is_refused_before_any_work(cache_dir, tmp_path):
    """Was: NotADirectoryError / FileExistsError tracebacks from mkdir, after the caches were opened."""
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(StudentError, match=r"a-file is a file, not a directory"):
        _train(run_cfg(cache_dir, tmp_path / "a-file" / "below", max_steps=1))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "s").write_text("a file where the student's folder goes")
    with pytest.raises(StudentError, match=r"out/s is a file, not a directory"):
        _train(run_cfg(cache_dir, tmp_path / "out", max_steps=1))


def test_a_model_written_from_shards_is_split_into_files_and_loads_back(tokenizer_dir, tmp_path, monkeypatch):
    """parallel = fsdp writes model/ from each rank's shards (here one process's): safetensors files of at most
    MODEL_FILE_BYTES each, an index, the config, the tokenizer; the tied head stored once; plain transformers loads
    it back to the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.train import parallel

    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    monkeypatch.setattr(parallel, "MODEL_FILE_BYTES", 20_000)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    parallel.save_model_sharded(model, tokenizer, tmp_path / "model", main=True)
    files = sorted((tmp_path / "model").glob("*.safetensors"))
    assert len(files) > 2 and all(f.stat().st_size <= 20_000 + 4096 for f in files)  # + each file's header
    index = json.loads((tmp_path / "model" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index and "model.embed_tokens.weight" in index
    assert not (tmp_path / "model" / "sharded").exists() and (tmp_path / "model" / "tokenizer_config.json").exists()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_sharded_students_evaluate_as_many_batches_on_every_rank(cache_dir, parallel, monkeypatch):
    """Each rank evaluates its share of the validation batches. A sharded student's every forward gathers its layers
    with every rank, so under fsdp each rank runs as many batches (a short share is padded with a batch that is run
    and not counted; an uneven count would leave one rank waiting for the others forever); under ddp nothing is
    padded."""
    from pipeline import distributed
    from pipeline.train.heldout import HeldOut
    from pipeline.train.sources import open_sources

    cfg = run_cfg(cache_dir, "x", batch_size=1, parallel=parallel)
    sources = open_sources(cfg)
    c = sources["default"][0]
    n = len(CacheBatches(c, "validation", ["logsumexp"], 1, shuffle=False))
    world = next(w for w in (3, 4, 5, 7) if n % w)  # ranks that cannot share these batches evenly
    shares = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "ranks", lambda rank=rank: distributed.Ranks(rank=rank, world=world))
        shares.append(HeldOut(cfg, sources, {}, {}, torch.device("cpu"), None, print).eval_set("default", c,
                                                                                             "validation"))
    assert sum(ds.counted for ds in shares) == n
    assert sorted(j for ds in shares for j in ds.indices[: ds.counted]) == list(range(n))
    lengths = {len(ds.indices) for ds in shares}
    assert lengths == ({-(-n // world)} if parallel == "fsdp" else {n // world, n // world + 1})


def test_fsdp_refuses_a_student_whose_decoder_layers_it_cannot_find():
    """parallel = fsdp shards by decoder layer: a model without exactly one list of num_hidden_layers modules is
    refused by name, with the setting to use instead."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.train.parallel import decoder_layers

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2))
    assert decoder_layers(model) is model.model.layers
    model.config.num_hidden_layers = 3  # no list of 3 modules
    with pytest.raises(StudentError, match=r"LlamaForCausalLM has 0 lists of 3 modules, not one: train it with "
                                           r"parallel = 'ddp'"):
        decoder_layers(model)
