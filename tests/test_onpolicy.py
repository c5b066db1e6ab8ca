"""On-policy distillation: `distill generate` (seeded, resumable token ids), scoring pre-tokenised rows with the
capture (data.format = "tokens"), the rounds of `distill onpolicy` (resumable at every step, each round a plain
`distill student` run), continuous re-distillation, and the refusals of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import STUDENT_ARCH, capture, settings, student_run
from pipeline.onpolicy.settings import GenerateConfig, OnPolicyConfig
from pipeline.errors import DistillError
from pipeline.format import Cache
from pipeline.format.layout import row_column
from pipeline.onpolicy.generate import run_generate


def gen_cfg(model, prompts_file, out, **sections) -> GenerateConfig:
    cfg = {"generator": {"model": str(model)},
           "prompts": {"source": "json", "data_files": [str(prompts_file)], "seq_len": 40, "max_documents": 14},
           "sampling": {"max_new_tokens": 12, "batch_size": 4, "rows_per_part": 8, "prompt_tokens": 20, "seed": 3},
           "output": {"dir": str(out)}}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return GenerateConfig.model_validate(cfg)


def samples(folder) -> list[dict]:
    rows = []
    for f in sorted(folder.glob("part-*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def test_generate_is_seeded_and_resumes_to_the_same_tokens(llama_dir, corpus, tmp_path):
    a = run_generate(gen_cfg(llama_dir, corpus, tmp_path / "a"), progress=False)
    assert a.rows == 14 and a.computed_parts == 2
    rows = samples(tmp_path / "a")
    assert [r["prompt_index"] for r in rows] == list(range(14))
    for r in rows:
        assert len(r["input_ids"]) == r["length"] <= 40 and 0 < r["completion_start"] <= 20
        assert 0 < r["length"] - r["completion_start"] <= 12
    # the same settings, another folder: the same tokens
    run_generate(gen_cfg(llama_dir, corpus, tmp_path / "b"), progress=False)
    assert samples(tmp_path / "b") == rows
    # another seed: other tokens
    run_generate(gen_cfg(llama_dir, corpus, tmp_path / "c", sampling={"seed": 4}), progress=False)
    assert samples(tmp_path / "c") != rows

    # killed after its first part: the rerun writes the second alone, and the tokens are the same
    def kill(p):
        if p == 0:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_generate(gen_cfg(llama_dir, corpus, tmp_path / "d"), progress=False, after_part=kill)
    assert sorted(f.name for f in (tmp_path / "d").glob("part-*")) == ["part-00000.parquet"]
    d = run_generate(gen_cfg(llama_dir, corpus, tmp_path / "d"), progress=False)
    assert (d.resumed_parts, d.computed_parts) == (1, 1)
    assert samples(tmp_path / "d") == rows
    record = json.loads((tmp_path / "d" / "generation.json").read_text())
    assert record["status"] == "finished" and record["statistics"]["rows"] == 14
    assert record["generator"]["weights_sha256"] and record["tokenizer"]["fingerprint"]
    # finished: nothing to do; other settings in the same folder: refused
    assert run_generate(gen_cfg(llama_dir, corpus, tmp_path / "d"), progress=False).computed_parts == 0
    with pytest.raises(DistillError, match="other settings"):
        run_generate(gen_cfg(llama_dir, corpus, tmp_path / "d", sampling={"top_p": 0.9}), progress=False)


def test_scored_rows_carry_exactly_the_sampled_ids_and_a_completion_mask(llama_dir, corpus, tmp_path):
    run_generate(gen_cfg(llama_dir, corpus, tmp_path / "s", round=2), progress=False)
    sampled = {tuple(r["input_ids"]): r["completion_start"] for r in samples(tmp_path / "s")}
    cfg = settings(llama_dir, corpus, tmp_path / "cache",
                   data={"source": "parquet", "data_files": [str(tmp_path / "s" / "part-*.parquet")], "format": "tokens",
                         "loss_mask": "assistant", "seq_len": 40, "max_tokens": None, "validation_fraction": 0.0})
    capture(cfg)
    c = Cache(str(tmp_path / "cache"))
    gen = c.manifest.dataset["generation"]
    assert gen["round"] == 2 and gen["generator"]["model"] == str(llama_dir)
    from stages.cache import describe
    assert any(x.startswith("generated    by") and "on-policy round 2" in x for x in describe(c.manifest, "here"))
    t = c.rows("train")
    ids, mask, lengths = row_column(t, "input_ids", np.int64), row_column(t, "loss_mask", np.uint8), \
        t.column("length").to_numpy()
    assert len(lengths) == len(sampled)
    for row, m, n in zip(ids, mask, lengths):
        start = sampled[tuple(row[:n].tolist())]  # exactly a sampled row
        want = np.zeros(len(row), np.uint8)
        want[start - 1: n - 1] = 1  # positions that predict a completion token
        assert m.tolist() == want.tolist()
    # the targets are the teacher's at those ids: target_logprob against the teacher's own forward pass
    from transformers import AutoModelForCausalLM
    teacher = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()
    lp = np.asarray(c.array("train", "target_logprob")[:4], np.float64)
    with torch.no_grad():
        for i in range(4):
            x = torch.as_tensor(ids[i][: lengths[i]])[None]
            ref = torch.log_softmax(teacher(x).logits[0], -1)
            want = ref[torch.arange(lengths[i] - 1), x[0, 1:]].numpy()
            np.testing.assert_allclose(lp[i, : lengths[i] - 1], want, atol=2e-5)


@pytest.fixture(scope="module")
def offline(llama_dir, corpus, tmp_path_factory):
    """An offline cache of the tiny teacher, and a student trained on it (the on-policy loop's start)."""
    from pipeline.train.recipe import train_students

    root = tmp_path_factory.mktemp("offline")
    capture(settings(llama_dir, corpus, root / "cache", capture={"top_k": 8, "batch_size": 4, "rows_per_shard": 8,
                                                                   "rows_per_chunk": 2}))
    train_students(student_run(root / "cache", root / "students", max_steps=4, eval_every=4), log=lambda m: None,
                   progress=False)
    return root


def held_out_prompts(corpus, folder):
    """The corpus's last 40 documents as a file of their own: prompts the loop's training prompts (the first 10)
    do not hold."""
    held = folder / "held-out-prompts.jsonl"
    if not held.exists():
        held.parent.mkdir(parents=True, exist_ok=True)
        held.write_text("\n".join(corpus.read_text().splitlines()[-40:]) + "\n")
    return held


def loop_cfg(llama_dir, corpus, base, out, **kw) -> OnPolicyConfig:
    prompts = {"source": "json", "data_files": [str(corpus)], "seq_len": 40, "max_documents": 10}
    held = held_out_prompts(corpus, base)
    cfg = {"dir": str(out), "rounds": 2, "start": str(base / "students" / "s" / "model"),
           "teacher": {"model": str(llama_dir)}, "prompts": prompts,
           "eval_prompts": {**prompts, "data_files": [str(held)], "shuffle_seed": 5, "max_documents": 4},
           "sampling": {"max_new_tokens": 10, "batch_size": 4, "rows_per_part": 4, "prompt_tokens": 16},
           "offline": [{"name": "offline", "cache": str(base / "cache"), "weight": 1.0}],
           "student": {"name": "op", "losses": {"kd_reverse": 1.0, "kd_forward": 0.5}, "lr": 2e-3, "warmup_steps": 1},
           "train": {"batch_size": 4, "max_steps": 3, "eval_every": 3, "log_every": 1, "device": "cpu"}, **kw}
    return OnPolicyConfig.model_validate(cfg)


def weights(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


def test_onpolicy_rounds_resume_after_a_kill_at_every_step(llama_dir, corpus, offline, tmp_path):
    from pipeline.onpolicy.loop import run_onpolicy

    whole = run_onpolicy(loop_cfg(llama_dir, corpus, offline, tmp_path / "whole"), progress=False, log=lambda m: None)
    assert sorted(whole["rounds"]) == ["1", "2"]
    r1, r2 = whole["rounds"]["1"], whole["rounds"]["2"]
    assert r1["generator"].endswith("s/model") and r2["generator"] == r1["model"] and r1["model"].endswith("op/model")
    for r in (r1, r2):
        assert r["status"] == "finished" and set(r["seconds"]) == {"generate", "score", "train", "evaluate"}
        assert r["samples_teacher_nll"]["teacher_nll"] > 0 and r["eval"]["tokens"] > 0
    c2 = Cache(str(tmp_path / "whole" / "caches" / "round-002"))
    assert c2.manifest.dataset["generation"]["round"] == 2
    assert c2.manifest.dataset["generation"]["generator"]["model"] == r1["model"]
    assert set(r2["student"]["sources"]) == {"offline", "round-001", "round-002"}

    # a kill after each step (and one inside each step) resumes to the same students
    kills = [("after", (1, "generate")), ("after", (1, "score")), ("train_step", 2), ("after", (1, "train")),
             ("generate_part", 1), ("after", (2, "train")), ("after", (2, "evaluate"))]  # in the order they come
    out = tmp_path / "killed"
    for hook, at in kills:
        def stop(*args, at=at):
            if (args if len(args) > 1 else args[0]) == at:
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            run_onpolicy(loop_cfg(llama_dir, corpus, offline, out), progress=False, log=lambda m: None,
                         hooks={hook: stop})
    done = run_onpolicy(loop_cfg(llama_dir, corpus, offline, out), progress=False, log=lambda m: None)
    assert done["rounds"]["2"]["status"] == "finished"
    for r in ("round-001", "round-002"):
        for k in ("samples",):
            assert samples(out / r / k) == samples(tmp_path / "whole" / r / k)
        a, b = weights(out / r / "students" / "op" / "model"), weights(tmp_path / "whole" / r / "students" / "op" /
                                                                        "model")
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert done["rounds"]["2"]["eval"] == whole["rounds"]["2"]["eval"]


def test_a_round_is_a_plain_student_run(llama_dir, corpus, offline, tmp_path):
    """Round 2's student equals `distill student` run with the student.toml the round wrote."""
    from pipeline.config import load_config
    from pipeline.student_config import StudentRunConfig
    from pipeline.onpolicy.loop import run_onpolicy
    from pipeline.train.recipe import train_students

    said = []
    cfg = loop_cfg(llama_dir, corpus, offline, tmp_path / "run", eval_prompts=None)
    cfg = cfg.model_copy(update={"student": {**cfg.student, "losses": {"kd_reverse": 1.0, "ce": 0.2}}})
    run_onpolicy(cfg, progress=False, log=said.append)
    assert any(m.startswith("warning: student.losses has ce") for m in said)
    toml = tmp_path / "run" / "round-002" / "student.toml"
    plain = load_config(StudentRunConfig, toml, [f"output_dir={tmp_path / 'plain'}"])
    assert [t.name for t in plain.sources] == ["offline", "round-001", "round-002"]
    assert plain.students[0].pretrained.endswith("round-001/students/op/model") and plain.students[0].name == "op"
    train_students(plain, log=lambda m: None, progress=False)
    a, b = weights(tmp_path / "plain" / "op" / "model"), weights(tmp_path / "run" / "round-002" / "students" / "op" /
                                                                  "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_chat_prompts_are_rendered_with_the_generation_prompt(chat_llama_dir, conversations, tmp_path):
    """prompt_response prompts: the user turn, rendered as the template renders it before an answer."""
    from transformers import AutoTokenizer

    cfg = gen_cfg(chat_llama_dir, conversations, tmp_path / "s",
                  prompts={"format": "prompt_response", "seq_len": 200, "max_documents": 3},
                  sampling={"prompt_tokens": None})
    run_generate(cfg, progress=False)
    tok = AutoTokenizer.from_pretrained(chat_llama_dir)
    rows = samples(tmp_path / "s")
    first = json.loads(conversations.read_text().splitlines()[0])
    want = tok.apply_chat_template([{"role": "user", "content": first["prompt"]}], tokenize=False,
                                   add_generation_prompt=True)
    assert rows[0]["input_ids"][: rows[0]["completion_start"]] == tok(want, add_special_tokens=False)["input_ids"]


def test_bad_input_is_refused_before_any_sampling(llama_dir, bos_llama_dir, chat_llama_dir, corpus, conversations,
                                                  tokenizer_dir, offline, tmp_path):
    from conftest import make_classifier, make_llama
    from pipeline.onpolicy.loop import run_onpolicy

    # prompts that leave no room for max_new_tokens
    with pytest.raises(DistillError, match="leave no room for sampling.max_new_tokens = 12 within prompts.seq_len = 20"):
        run_generate(gen_cfg(llama_dir, corpus, tmp_path / "long", prompts={"seq_len": 20},
                             sampling={"prompt_tokens": None}), progress=False)
    assert not list((tmp_path / "long").glob("part-*")) if (tmp_path / "long").exists() else True
    skipped = run_generate(gen_cfg(llama_dir, corpus, tmp_path / "skip", prompts={"seq_len": 60},
                                   sampling={"prompt_tokens": None, "long_prompts": "skip"}), progress=False)
    assert 0 < skipped.rows < 14 and skipped.plan["prompts"]["skipped_long"] == 14 - skipped.rows
    # a chat prompt that does not end in a user turn
    with pytest.raises(DistillError, match="must end in a user turn"):
        run_generate(gen_cfg(chat_llama_dir, conversations, tmp_path / "chat",
                             prompts={"format": "messages", "seq_len": 256}), progress=False)
    # a checkpoint that is not a causal LM
    clf = make_classifier(tokenizer_dir, tmp_path / "clf", "llama", "sequence", ["a", "b"])
    with pytest.raises(DistillError, match="not a causal LM"):
        run_generate(gen_cfg(clf, corpus, tmp_path / "clf-out"), progress=False)
    # a generator whose tokenizer is not the teacher's: refused by generate, the loop and the capture
    with pytest.raises(DistillError, match="cross-tokenizer on-policy"):
        run_generate(gen_cfg(bos_llama_dir, corpus, tmp_path / "x", teacher={"model": str(llama_dir)}),
                     progress=False)
    with pytest.raises(DistillError, match="cross-tokenizer on-policy"):
        run_onpolicy(loop_cfg(llama_dir, corpus, offline, tmp_path / "loop", start=str(bos_llama_dir)),
                     progress=False, log=lambda m: None)
    assert not (tmp_path / "loop" / "round-001").exists()
    run_generate(gen_cfg(bos_llama_dir, corpus, tmp_path / "bos"), progress=False)
    with pytest.raises(DistillError, match="cross-tokenizer on-policy"):
        capture(settings(llama_dir, corpus, tmp_path / "c", data={
            "source": "parquet", "data_files": [str(tmp_path / "bos" / "part-*.parquet")], "format": "tokens",
            "seq_len": 40, "max_tokens": None}))
    # a round whose cache was made by another teacher (same tokenizer, other weights)
    other = make_llama(tokenizer_dir, tmp_path / "other-teacher", seed=7)
    run_onpolicy(loop_cfg(llama_dir, corpus, offline, tmp_path / "run", rounds=1, eval_prompts=None),
                 progress=False, log=lambda m: None)
    with pytest.raises(DistillError, match="round 1's cache .* made by another teacher"):
        run_onpolicy(loop_cfg(other, corpus, offline, tmp_path / "run", rounds=2, eval_prompts=None, offline=[],
                              capture={"top_k": 8}), progress=False, log=lambda m: None)
    assert not (tmp_path / "run" / "round-002").exists()
    # settings the loop sets itself, and a term whose field the rounds' caches will not hold
    with pytest.raises(Exception, match="student.from_teacher"):
        loop_cfg(llama_dir, corpus, offline, tmp_path / "y", student={"from_teacher": 2})
    with pytest.raises(DistillError, match="hidden_mse reads"):
        run_onpolicy(loop_cfg(llama_dir, corpus, offline, tmp_path / "z",
                              student={"losses": {"kd_forward": 1.0, "hidden_mse": 1.0}}),
                     progress=False, log=lambda m: None)


def _ranks_of_sampled(model_dir, rows) -> list[int]:
    """Rank of each sampled token in the model's own next-token distribution over the tokenizer's ids (0 = its
    argmax; the head's padding rows are never sampled)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    out = []
    with torch.no_grad():
        for r in rows:
            x = torch.as_tensor(r["input_ids"])[None]
            logits = model(x).logits[0]
            for t in range(r["completion_start"], r["length"]):
                z = logits[t - 1, :vocab]
                out.append(int((z > z[x[0, t]]).sum()))
    return out


def test_the_samples_follow_the_settings_not_the_checkpoints_sampling_defaults(llama_dir, corpus, tmp_path):
    """A checkpoint whose generation_config.json asks for top_k = 1, top_p = 0.1 and a repetition penalty does not
    change what is sampled: at temperature 1 tokens far down the distribution are drawn (transformers' own default
    of top_k = 50 would forbid ranks >= 50), and greedy decoding picks the argmax at every step."""
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"top_k": 1, "top_p": 0.1, "repetition_penalty": 1.5,
                                                               "do_sample": True}))
    run_generate(gen_cfg(model, corpus, tmp_path / "t1"), progress=False)
    ranks = _ranks_of_sampled(model, samples(tmp_path / "t1"))
    assert len(ranks) > 100 and max(ranks) >= 50 and np.mean(np.asarray(ranks) > 0) > 0.5
    run_generate(gen_cfg(model, corpus, tmp_path / "greedy", sampling={"temperature": 0}), progress=False)
    assert set(_ranks_of_sampled(model, samples(tmp_path / "greedy"))) == {0}


@pytest.mark.parametrize("rows, message", [
    ({"input_ids": [[5, 6, 7], [5, 9999, 7]], "completion_start": [1, 1]}, "row 1: token id 9999 is outside"),
    ({"input_ids": [[5] * 50], "completion_start": [1]}, "row 0: 50 token ids, more than data.seq_len = 40"),
    ({"input_ids": [[5, 6, 7]], "completion_start": [0]}, "completion_start = 0 is not a position"),
    ({"input_ids": [[[5, 6]]], "completion_start": [1]}, "row 0: column 'input_ids' must hold flat lists"),
])
def test_bad_token_rows_are_refused_by_row(llama_dir, corpus, tmp_path, rows, message):
    import pyarrow as pa

    pq.write_table(pa.table(rows), tmp_path / "rows.parquet")
    with pytest.raises(DistillError, match=message):
        capture(settings(llama_dir, corpus, tmp_path / "c", data={
            "source": "parquet", "data_files": [str(tmp_path / "rows.parquet")], "format": "tokens",
            "loss_mask": "assistant", "seq_len": 40, "max_tokens": None}))
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_every_draw_is_a_row_and_eval_prompts_must_be_held_out(llama_dir, corpus, offline, tmp_path):
    """Identical completions of one prompt (short, at a low temperature, several samples per prompt) are each
    scored, trained on and evaluated, as drawn: the round's cache holds a row per draw, and the teacher NLL is
    their mean. eval_prompts that repeat a training prompt are refused before any sampling."""
    from pipeline.onpolicy.loop import run_onpolicy, teacher_nll

    cfg = loop_cfg(llama_dir, corpus, offline, tmp_path / "run", rounds=1,
                   sampling={"max_new_tokens": 2, "batch_size": 4, "rows_per_part": 8, "prompt_tokens": 16,
                             "samples_per_prompt": 4, "temperature": 0.01})
    report = run_onpolicy(cfg, progress=False, log=lambda m: None)
    drawn = samples(tmp_path / "run" / "round-001" / "samples")
    c = Cache(str(tmp_path / "run" / "caches" / "round-001"))
    assert c.manifest.splits["train"].rows == len(drawn) == 40  # 10 prompts x 4 samples: every draw a row
    assert report["rounds"]["1"]["identical_samples"] > 5  # and many of them the same tokens
    assert c.manifest.preparation.raw["key_columns"] == ["prompt_index", "sample"]
    # the teacher NLL of the round is the mean over the draws, repeats counted as often as drawn
    from transformers import AutoModelForCausalLM
    teacher = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for r in drawn:
            x = torch.as_tensor(r["input_ids"])[None]
            lp = torch.log_softmax(teacher(x).logits[0], -1)
            for t in range(r["completion_start"], r["length"]):
                total -= float(lp[t - 1, x[0, t]])
                n += 1
    got = teacher_nll(c)
    assert got["tokens"] == n and got["teacher_nll"] == pytest.approx(total / n, rel=1e-5)
    # a cache of the same rows without key_columns keeps each token sequence once: the bias this removes
    plain = settings(llama_dir, corpus, tmp_path / "plain", data={
        "source": "parquet", "data_files": [str(tmp_path / "run" / "round-001" / "samples" / "part-*.parquet")],
        "format": "tokens", "loss_mask": "assistant", "seq_len": 40, "max_tokens": None, "validation_fraction": 0.0})
    capture(plain)
    assert Cache(str(tmp_path / "plain")).manifest.splits["train"].rows == 40 - report["rounds"]["1"]["identical_samples"]
    # held-out prompts that are training prompts
    with pytest.raises(DistillError, match=r"eval_prompts share 4 of their 4 prompts with prompts"):
        run_onpolicy(loop_cfg(llama_dir, corpus, offline, tmp_path / "leak",
                              eval_prompts={"source": "json", "data_files": [str(corpus)], "seq_len": 40,
                                            "max_documents": 4}), progress=False, log=lambda m: None)
    assert not (tmp_path / "leak" / "round-001").exists()


def test_key_columns_need_rows_given_as_tokens(corpus):
    from pipeline.config import DataConfig

    with pytest.raises(Exception, match="key_columns key rows given as token ids"):
        DataConfig(source="json", data_files=[str(corpus)], key_columns=["source"])
