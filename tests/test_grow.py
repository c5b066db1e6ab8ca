"""Caches that grow: output.mode=append adds the rows of new documents as new parts, skips rows the
cache holds, refuses another teacher or other settings, survives a crash, and a student goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import all_files, as_legacy, capture, make_llama, settings

from pipeline.errors import CaptureError
from pipeline.student_config import StudentRunConfig
from pipeline.format import FORMAT_VERSION, Cache, CacheError, CacheWriter, verify
from pipeline.format.share import pull
from pipeline.train.dataset import CacheBatches, make_loader
from pipeline.train.recipe import train_students

REPO = Path(__file__).resolve().parents[1]
DATA = {"packing": False, "max_tokens": None, "validation_fraction": 0.2}
CAPTURE = {"top_k": 8, "temperatures": [2.0], "hidden_layers": [-1], "rows_per_shard": 8, "rows_per_chunk": 4}
FIELDS = ["topk_ids", "topk_logprobs", "logsumexp", "target_logprob", "logsumexp_tempered", "hidden_states"]


@pytest.fixture(scope="module")
def corpora(corpus, tmp_path_factory):
    """Three document sets: old, new (overlapping old by 10 documents) and all of them."""
    lines = [ln for ln in corpus.read_text().splitlines() if len(json.loads(ln)["text"]) > 40][:70]
    d = tmp_path_factory.mktemp("corpora")
    out = {}
    for name, sel in (("old", lines[:40]), ("new", lines[30:70]), ("all", lines[:70])):
        (d / f"{name}.jsonl").write_text("\n".join(sel) + "\n")
        out[name] = d / f"{name}.jsonl"
    return out


def grow_cfg(model, docs, out, mode="create", **capture_kw):
    cfg = settings(model, docs, out, data=DATA, capture={**CAPTURE, **capture_kw})
    cfg["output"]["mode"] = mode
    return cfg


@pytest.fixture(scope="module")
def grown(llama_dir, corpora, tmp_path_factory):
    """A cache captured from the old documents, a copy grown by the new ones, and a fresh capture of all."""
    d = tmp_path_factory.mktemp("grow")
    capture(grow_cfg(llama_dir, corpora["old"], d / "base"))
    subprocess.run(["cp", "-r", str(d / "base"), str(d / "grown")], check=True)
    capture(grow_cfg(llama_dir, corpora["new"], d / "grown", mode="append"))
    capture(grow_cfg(llama_dir, corpora["all"], d / "all"))
    return d


def _by_key(c: Cache, split: str) -> dict[str, dict[str, np.ndarray]]:
    keys = c.rows(split).column("key").to_pylist()
    arrays = {f: c.array(split, f)[:] for f in FIELDS}
    return {k: {f: a[i] for f, a in arrays.items()} for i, k in enumerate(keys)}


def test_append_adds_new_rows_as_new_parts_equal_to_a_fresh_capture(grown):
    base, g, whole = Cache(grown / "base"), Cache(grown / "grown"), Cache(grown / "all")
    m = g.manifest
    assert verify(grown / "grown") == []
    rec = m.document["grown"][0]
    assert rec["parent_digest"] == base.manifest.digest and rec["number"] == 1
    for split in whole.splits:  # the same rows as capturing everything at once, none twice
        keys = g.rows(split).column("key").to_pylist()
        assert len(keys) == len(set(keys)) == m.splits[split].rows == len(g.array(split, "topk_ids"))
        assert set(keys) == set(whole.rows(split).column("key").to_pylist())
        assert [p.path for p in m.splits[split].parts] == [split, f"{split}/grow-0001"]
        assert sorted(r for r, _ in g.shard_ranges(split)) == [r for r, _ in g.shard_ranges(split)]
    # the 10 shared documents were skipped, not captured again
    assert rec["duplicate_rows_skipped"] >= 10
    assert sum(base.manifest.splits[s].rows for s in base.splits) + sum(rec["rows"].values()) == \
        sum(whole.manifest.splits[s].rows for s in whole.splits)
    assert m.stats.tokens == sum(v.tokens for v in m.splits.values()) == \
        sum(v.tokens for v in whole.manifest.splits.values())
    # every row's targets are the fresh capture's
    for split in whole.splits:
        ours, ref = _by_key(g, split), _by_key(whole, split)
        for k, fields in ours.items():
            np.testing.assert_array_equal(fields["topk_ids"], ref[k]["topk_ids"])
            for f in FIELDS[1:]:
                np.testing.assert_allclose(fields[f].astype(np.float32), ref[k][f].astype(np.float32), rtol=1e-3,
                                           atol=1e-3, equal_nan=True)
    # nothing of the parent changed: every file it lists has the same bytes in the grown cache
    old_files, new_files = all_files(base), all_files(g)
    assert all(new_files[rel] == d for rel, d in old_files.items())


def test_append_of_documents_already_in_the_cache_is_a_no_op(llama_dir, corpora, grown):
    before = (grown / "grown" / "manifest.json").read_bytes()
    res = capture(grow_cfg(llama_dir, corpora["old"], grown / "grown", mode="append"))
    assert res.computed_shards == 0 and (grown / "grown" / "manifest.json").read_bytes() == before


@pytest.mark.slow
def test_grown_cache_reads_whole_through_reader_pull_and_format_md(grown, tmp_path):
    g = Cache(grown / "grown")
    ds = CacheBatches(grown / "grown", "train", ["topk_ids", "logsumexp"], batch_size=5, seed=3)
    seen, ref, lse = [], g.array("train", "topk_ids")[:], g.array("train", "logsumexp")[:]
    for b in make_loader(ds):
        rows = b["row"].numpy()
        np.testing.assert_array_equal(b["topk_ids"].numpy(), ref[rows])
        np.testing.assert_array_equal(b["logsumexp"].numpy(), lse[rows])
        seen += rows.tolist()
    assert sorted(seen) == list(range(len(ref)))  # every row of both parts, once per epoch
    pull(str(grown / "grown"), tmp_path / "p", fields=["topk_ids"], log=lambda m: None)
    part = Cache(tmp_path / "p")
    assert verify(tmp_path / "p") == [] and part.manifest.grown == g.manifest.grown
    np.testing.assert_array_equal(part.array("validation", "topk_ids")[:], g.array("validation", "topk_ids")[:])
    assert not any("hidden_states" in rel for rel in all_files(part))
    from test_format import _reader_code

    script = tmp_path / "reader.py"
    script.write_text(_reader_code())
    res = subprocess.run([sys.executable, "-I", str(script)], env={**os.environ, "CACHE": str(grown / "grown")},
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0 and f"ok train {len(ref)} rows" in res.stdout, res.stderr


@pytest.mark.slow
def test_append_with_another_teacher_or_settings_is_refused(llama_dir, tokenizer_dir, corpora, grown, tmp_path):
    before = (grown / "grown" / "manifest.json").read_bytes()
    other = make_llama(tokenizer_dir, tmp_path / "other", seed=7)
    with pytest.raises(CaptureError, match="teacher.weights_sha256"):
        capture(grow_cfg(other, corpora["new"], grown / "grown", mode="append"))
    with pytest.raises(CaptureError, match=r"capture.top_k: 8 -> 4"):
        capture(grow_cfg(llama_dir, corpora["new"], grown / "grown", mode="append", top_k=4))
    with pytest.raises(CaptureError, match="no finished cache"):
        capture(grow_cfg(llama_dir, corpora["new"], tmp_path / "nothing", mode="append"))
    assert (grown / "grown" / "manifest.json").read_bytes() == before
    # the command line: one error line naming the difference, exit 2
    cfg = grow_cfg(llama_dir, corpora["new"], grown / "grown", mode="append")
    cfg["data"]["seq_len"] = 48
    path = tmp_path / "c.toml"  # JSON scalars and lists are TOML values
    path.write_text("".join(f"[{sec}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in vals.items() if v is not None)
                            for sec, vals in cfg.items()))
    res = subprocess.run([sys.executable, "-m", "stages.cli", "teacher-cache", "--config", str(path)],
                         env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, capture_output=True,
                         text=True)
    assert res.returncode == 2 and "preparation.seq_len: 32 -> 48" in res.stderr, res.stderr


def test_interrupted_append_leaves_the_previous_version_readable_and_resumes(llama_dir, corpora, grown, tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "c"
    subprocess.run(["cp", "-r", str(grown / "base"), str(out)], check=True)
    parent = Cache(out).manifest
    real, calls = CacheWriter.write_shard, []

    def crashing(self, split, index, targets, stats):
        calls.append(index)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(self, split, index, targets, stats)

    monkeypatch.setattr(CacheWriter, "write_shard", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        capture(grow_cfg(llama_dir, corpora["new"], out, mode="append"))
    monkeypatch.setattr(CacheWriter, "write_shard", real)
    assert Cache(out).manifest == parent and verify(out) == []  # readers see the previous version, intact
    res = capture(grow_cfg(llama_dir, corpora["new"], out, mode="append"))
    assert res.resumed_shards == 1 and verify(out) == []
    ref = all_files(grown / "grown")
    assert all_files(out) == ref  # byte-identical to the uninterrupted append


def test_student_continues_on_the_grown_cache(grown, tmp_path):
    out = tmp_path / "c"
    subprocess.run(["cp", "-r", str(grown / "base"), str(out)], check=True)
    arch = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64}

    def cfg(steps):
        return StudentRunConfig.model_validate({
            "cache": str(out), "output_dir": str(tmp_path / "s"), "batch_size": 4, "max_steps": steps,
            "eval_every": 4, "log_every": 2, "device": "cpu",
            "students": [{"name": "s", "arch": arch, "losses": {"kd_forward": 1.0}, "lr": 3e-3, "warmup_steps": 1}]})

    logs: list[str] = []
    train_students(cfg(4), log=logs.append, progress=False)
    for name in ("train", "validation", "manifest.json"):  # the cache grows in place, as an append does
        subprocess.run(["rm", "-rf", str(out / name)], check=True)
        subprocess.run(["cp", "-r", str(grown / "grown" / name), str(out / name)], check=True)
    rows_seen = []
    train_students(cfg(10), log=logs.append, progress=False,
                   after_step=lambda step: rows_seen.append(step))
    assert any("resuming at step 4" in m for m in logs) and any("the cache grew" in m for m in logs), logs
    assert any("training goes on with epoch 1 over all" in m for m in logs), logs
    assert rows_seen and rows_seen[0] == 5 and rows_seen[-1] == 10
    import torch

    state = torch.load(tmp_path / "s" / "s" / "checkpoint" / "state.pt", weights_only=True)
    assert state["run"]["stream"]["sources"]["default"]["epoch"] >= 1  # a new epoch, over the grown train split
    with pytest.raises(Exception, match="other settings"):  # anything else that changed is still refused
        train_students(cfg(12).model_copy(update={"seed": 5}), log=logs.append, progress=False)


def test_parts_array_reads_like_one_array(grown):
    g = Cache(grown / "grown")
    a = g.array("train", "topk_ids")
    whole = a[:]
    n0 = g.parts("train")[0].rows
    np.testing.assert_array_equal(a[n0 - 2 : n0 + 3], whole[n0 - 2 : n0 + 3])  # across the seam
    np.testing.assert_array_equal(a[n0], whole[n0])
    np.testing.assert_array_equal(a[-1, :, 0], whole[-1, :, 0])
    np.testing.assert_array_equal(a[n0 - 1 : n0 + 1, 3], whole[n0 - 1 : n0 + 1, 3])
    assert a.shape == whole.shape and len(a) == len(whole)
    with pytest.raises(TypeError):
        a[::2]
    with pytest.raises(CacheError):
        g.array("train", "attentions")


@pytest.mark.slow
def test_ls_and_inspect_show_the_growth(grown):
    from pipeline.format.share import list_caches

    found = {Path(c["location"]).name: c for c in list_caches(str(grown))}
    assert found["grown"]["appends"] == 1 and found["base"]["appends"] == 0
    assert found["grown"]["parent_digest"] == found["base"]["digest"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "stages.cli", "inspect", str(grown / "grown")], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0 and "grown        #1: +train" in res.stdout, res.stderr
    res = subprocess.run([sys.executable, "-m", "stages.cli", "ls", str(grown)], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0 and f"grown x1 (parent {found['base']['digest'][:16]})" in res.stdout, res.stderr


def test_leftovers_of_stopped_or_abandoned_appends_are_cleared(llama_dir, corpora, grown, tmp_path):
    out = tmp_path / "c"
    subprocess.run(["cp", "-r", str(grown / "grown"), str(out)], check=True)
    m = Cache(out).manifest
    # a run stopped after writing its manifest but before removing its work folder ...
    plan = m.plan()
    (out / "_capture" / "commits").mkdir(parents=True)
    (out / "_capture" / "plan.json").write_text(json.dumps(plan))
    (out / "_capture" / "commits" / "train-00099.json").write_text("{}")
    # ... and an abandoned append's folder
    (out / "validation" / "grow-0007").mkdir()
    (out / "validation" / "grow-0007" / "rows.parquet").write_bytes(b"partial")
    res = capture(grow_cfg(llama_dir, corpora["old"], out, mode="append"))  # nothing new: a no-op that cleans up
    assert res.computed_shards == 0 and Cache(out).manifest == m
    assert not (out / "_capture").exists() and not (out / "validation" / "grow-0007").exists()
    assert verify(out) == []


def test_append_to_a_partial_pull_is_refused(llama_dir, corpora, grown, tmp_path):
    pull(str(grown / "base"), tmp_path / "p", fields=["topk_ids"], splits=["train"], log=lambda m: None)
    with pytest.raises(CaptureError, match="partial pull"):
        capture(grow_cfg(llama_dir, corpora["new"], tmp_path / "p", mode="append"))


def test_push_of_a_grown_cache_over_its_parent_sends_only_the_growth(grown, tmp_path):
    from pipeline.format.share import push

    dest = tmp_path / "published"
    push(str(grown / "base"), str(dest), log=lambda m: None)
    res = push(str(grown / "grown"), str(dest), log=lambda m: None)  # no --force: it is the same cache, grown
    new = set(all_files(grown / "grown")) - set(all_files(grown / "base"))
    assert res["sent"] == len(new) and verify(dest) == []
    assert Cache(dest).manifest.digest == Cache(grown / "grown").manifest.digest
    assert Cache(dest).manifest.format_version == FORMAT_VERSION
    with pytest.raises(CacheError, match="holds another cache"):  # the other way round is a different cache
        push(str(grown / "base"), str(dest), log=lambda m: None)


def test_a_cache_of_the_previous_format_is_done_and_grows(llama_dir, corpora, grown, tmp_path):
    """A 1.1 cache (no parts) with the same settings is finished for a rerun, and an append grows it."""
    from pipeline.format.manifest import manifest_digest

    out = tmp_path / "c"
    subprocess.run(["cp", "-r", str(grown / "base"), str(out)], check=True)
    as_legacy(out)
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = "1.1"
    for f in m["fields"].values():
        f["path"] = f["path"].replace("{part}", "{split}")
    for v in m["splits"].values():
        del v["parts"]
    for sh in m["shards"]:
        del sh["part"]
    m["digest"] = manifest_digest(m)
    (out / "manifest.json").write_text(json.dumps(m))
    res = capture(grow_cfg(llama_dir, corpora["old"], out))
    assert res.computed_shards == 0 and json.loads((out / "manifest.json").read_text()) == m
    capture(grow_cfg(llama_dir, corpora["new"], out, mode="append"))
    g = Cache(out)
    assert verify(out) == [] and g.manifest.format_version == FORMAT_VERSION and "shards" not in g.manifest.document
    assert set(g.manifest.shard_index) == {p.path for s in g.splits for p in g.parts(s)}  # the old parts indexed
    assert all_files(g) == all_files(grown / "grown")


def test_append_to_a_cache_of_the_older_codec_keeps_its_codec(llama_dir, corpora, tmp_path):
    """A cache written with zstd (every cache before 1.3) grows with zstd: the values are the same either way,
    and one field keeps one dtype across its parts."""
    capture(grow_cfg(llama_dir, corpora["old"], tmp_path / "c", topk_codec="zstd"))
    capture(grow_cfg(llama_dir, corpora["new"], tmp_path / "c", mode="append"))  # the default: pcodec
    c = Cache(tmp_path / "c")
    assert c.manifest.capture.topk_codec == "zstd" and len(c.parts("train")) == 2
    assert c.array("train", "topk_ids")[:].dtype == np.int32
    assert verify(tmp_path / "c") == []


def test_inspect_json_prints_the_manifest_as_stored(grown, tmp_path, capsys):
    """An older cache's manifest is read through today's description, but `inspect --json` shows the document
    as written (its own layout, its digest matching it)."""
    from stages.cache import inspect

    out = tmp_path / "c"
    subprocess.run(["cp", "-r", str(grown / "base"), str(out)], check=True)
    m = as_legacy(out, "1.2")
    del m["capture"]["topk_codec"]  # as a 1.2 cache was made: the 1.3 capture keys absent
    from pipeline.format.manifest import manifest_digest

    m["digest"] = manifest_digest(m)
    (out / "manifest.json").write_text(json.dumps(m))
    assert Cache(out).manifest.capture.topk_codec == "zstd" and Cache(out).manifest.format_version == FORMAT_VERSION
    assert verify(out) == [] and Cache(out).manifest.recorded_version == "1.2"  # its shards read from the manifest
    capsys.readouterr()
    inspect(str(out), as_json=True)
    assert json.loads(capsys.readouterr().out) == m
