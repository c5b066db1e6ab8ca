"""On-policy rounds through the real command line: `distill onpolicy` under torchrun (2 ranks, gloo) with the
rounds' caches in an S3 bucket (moto on localhost) gives the samples, caches and students of one process, and
`distill redistill` grows a cache with new documents and continues its students."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STDLIB, capture, settings, student_run, write_toml
from test_distributed import torchrun
from test_onpolicy import loop_cfg, samples, weights
from test_share import s3  # noqa: F401  (the fixture: a moto S3 server on localhost)

from pipeline.format import Cache
from pipeline.onpolicy.loop import run_onpolicy
from pipeline.train.recipe import train_students

pytestmark = pytest.mark.slow  # torchrun, a local S3 server, subprocesses
DISTILL = str(Path(sys.executable).with_name("distill"))


@pytest.fixture(scope="module")
def base(llama_dir, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("onpolicy-base")
    capture(settings(llama_dir, corpus, root / "cache"))
    train_students(student_run(root / "cache", root / "students", max_steps=4, eval_every=4), log=lambda m: None,
                   progress=False)
    return root


def test_onpolicy_under_torchrun_with_the_caches_in_a_bucket(llama_dir, corpus, base, s3, tmp_path):
    kw = dict(rounds=2, eval_prompts=None)
    one = loop_cfg(llama_dir, corpus, base, tmp_path / "one", **kw)
    one = one.model_copy(update={"train": {**one.train, "batch_size": 2, "grad_accum": 2}})
    run_onpolicy(one, progress=False, log=lambda m: None)

    import s3fs

    s3fs.S3FileSystem().mkdir("onpolicy")  # a bucket of its own: test_share lists what "team" holds
    two = loop_cfg(llama_dir, corpus, base, tmp_path / "two", cache_dir="s3://onpolicy/run", **kw).model_dump(
        mode="json")
    two["train"] = {**two["train"], "batch_size": 2}  # per rank: the same global batch as one process's
    two = {k: v for k, v in two.items() if v is not None}
    res = torchrun(2, "--no-python", DISTILL, "onpolicy", "-c", str(write_toml(tmp_path / "two.toml", two)))
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert [x["round"] for x in lines] == [1, 2]

    for r in ("round-001", "round-002"):
        assert samples(tmp_path / "two" / r / "samples") == samples(tmp_path / "one" / r / "samples")
        a, b = Cache(str(tmp_path / "one" / "caches" / r)), Cache(f"s3://onpolicy/run/{r}")
        assert b.manifest.dataset["generation"]["round"] == int(r[-1])
        for f in ("topk_ids", "topk_logprobs", "target_logprob"):
            np.testing.assert_array_equal(a.array("train", f)[:], b.array("train", f)[:])
        wa = weights(tmp_path / "one" / r / "students" / "op" / "model")
        wb = weights(tmp_path / "two" / r / "students" / "op" / "model")
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["rounds"]["2"]["cache"] == "s3://onpolicy/run/round-002"


def test_redistill_appends_new_documents_and_continues_the_students(llama_dir, corpus, base, tmp_path):
    shutil.copytree(base / "cache", tmp_path / "cache")  # the module's cache stays as it is
    shutil.copytree(base / "students", tmp_path / "students")
    cache_cfg = write_toml(tmp_path / "cache.toml", settings(llama_dir, corpus, tmp_path / "cache"))
    student = student_run(tmp_path / "cache", tmp_path / "students", max_steps=4, eval_every=4).model_dump(mode="json")
    student_cfg = write_toml(tmp_path / "student.toml", {k: v for k, v in student.items() if v is not None})
    new = tmp_path / "new.jsonl"
    new.write_text("".join(json.dumps({"text": p}) + "\n" for p in (STDLIB / "string.py").read_text().split("\n\n")
                           if p.strip()))
    before = Cache(str(tmp_path / "cache")).manifest.splits["train"].rows

    def redistill(out):
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        return subprocess.run([DISTILL, "redistill", "--cache-config", str(cache_cfg), "--student-config",
                               str(student_cfg), "--data", str(new), "--out", str(out)], capture_output=True,
                              text=True, env=env)

    res = redistill(tmp_path / "v2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == f"{tmp_path / 'v2'}/s/model"
    m = Cache(str(tmp_path / "cache")).manifest
    assert len(m.grown) == 1 and m.splits["train"].rows > before
    report = json.loads((tmp_path / "v2" / "s" / "report.json").read_text())
    assert report["sources"]["default"]["cache_digest"] == m.digest  # trained on the grown cache
    ran = tomllib.loads((tmp_path / "v2" / "student.toml").read_text())
    assert ran["students"][0]["pretrained"] == str(tmp_path / "students" / "s" / "model")
    assert "arch" not in ran["students"][0] and ran["output_dir"] == str(tmp_path / "v2")
    a, b = weights(tmp_path / "students" / "s" / "model"), weights(tmp_path / "v2" / "s" / "model")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # the same documents again: nothing to append, the students are finished
    res = redistill(tmp_path / "v2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(Cache(str(tmp_path / "cache")).manifest.grown) == 1
    # continuing into the folder of the students it continues: refused
    res = redistill(tmp_path / "students")
    assert res.returncode == 2 and "where the students to continue are" in res.stderr


def test_generate_on_the_command_line(llama_dir, corpus, tmp_path):
    from test_onpolicy import gen_cfg

    cfg = gen_cfg(llama_dir, corpus, tmp_path / "s").model_dump(mode="json")
    path = write_toml(tmp_path / "gen.toml", {k: v for k, v in cfg.items() if v is not None})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([DISTILL, "generate", "-c", str(path)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == str(tmp_path / "s") and len(samples(tmp_path / "s")) == 14
    res = subprocess.run([DISTILL, "generate", "-c", str(path), "-s", "prompts.seq_len=20", "-s",
                          "sampling.prompt_tokens=30", "-s", f"output.dir={tmp_path / 'x'}"], capture_output=True,
                         text=True, env=env)
    assert res.returncode == 2 and "leave no room for sampling.max_new_tokens" in res.stderr
    assert not (tmp_path / "x").exists()
