"""Cache reliability: content keys, resume after a crash, verify, locking, refusing reuse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import capture, settings, shard_files

from pipeline.format import Cache, CacheError, CacheWriter, verify
from pipeline.errors import CaptureError
from pipeline.capture.rows import content_key, is_validation

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _comparable_manifest(raw: bytes) -> dict:
    m = json.loads(raw)
    m.pop("digest")
    m["stats"].pop("timing")
    return m


def _assert_same_cache(a: Path, b: Path) -> None:
    ta, tb = _tree(a), _tree(b)
    assert sorted(ta) == sorted(tb)
    for rel in ta:
        if rel == "manifest.json":
            assert _comparable_manifest(ta[rel]) == _comparable_manifest(tb[rel])
        else:
            assert ta[rel] == tb[rel], f"{rel} differs"


def test_rows_carry_content_keys_and_split_by_key(llama_dir, corpus, tmp_path):
    capture(settings(llama_dir, corpus, tmp_path / "c", capture={"attention_layers": [0]}))
    c = Cache(tmp_path / "c")
    all_keys = []
    for split in c.splits:
        rows = c.rows(split)
        ids = np.stack(rows.column("input_ids").to_numpy(zero_copy_only=False))
        lengths = rows.column("length").to_numpy()
        keys = rows.column("key").to_pylist()
        assert keys == [content_key(r[:n]) for r, n in zip(ids, lengths)]
        assert all(is_validation(k, 0.2) == (split == "validation") for k in keys)
        # targets are aligned with rows: the stored log-prob of the true next token is at row i
        tl = c.array(split, "target_logprob")
        assert tl.shape == (len(keys), 32)
        all_keys += keys
        assert c.manifest.splits[split].rows == len(keys)
    assert len(set(all_keys)) == len(all_keys)
    assert set(c.splits) == {"train", "validation"}


def test_row_keys_follow_rows_not_position(llama_dir, corpus, tmp_path):
    """A smaller capture of the same corpus holds a prefix of the rows, with the same keys and targets."""
    capture(settings(llama_dir, corpus, tmp_path / "big", data={"max_tokens": 2000}))
    capture(settings(llama_dir, corpus, tmp_path / "small", data={"max_tokens": 1000}))
    big, small = Cache(tmp_path / "big"), Cache(tmp_path / "small")
    bk = {k: i for i, k in enumerate(big.rows("train").column("key").to_pylist())}
    sk = small.rows("train").column("key").to_pylist()
    shared = [(i, bk[k]) for i, k in enumerate(sk) if k in bk]
    assert len(shared) >= len(sk) - 1  # all but possibly the padded tail row
    si, bi = map(list, zip(*shared))
    np.testing.assert_array_equal(small.array("train", "topk_ids")[:][si], big.array("train", "topk_ids")[:][bi])


def test_resume_after_crash_mid_shard_gives_identical_bytes(llama_dir, corpus, tmp_path, monkeypatch):
    cfg_a = settings(llama_dir, corpus, tmp_path / "a", capture={"hidden_layers": [-1], "attention_layers": [0]})
    capture(cfg_a)
    cfg_b = settings(llama_dir, corpus, tmp_path / "b", capture={"hidden_layers": [-1], "attention_layers": [0]})
    real = CacheWriter.write_shard

    def crashing(self, split, index, targets, stats):
        if (split, index) == ("train", 2):
            first = self.specs[0]  # half a shard on disk, never committed
            start = index * self.shard_rows
            self._arrays[(split, first.name)][start : start + len(targets.topk_ids)] = targets.topk_ids
            raise RuntimeError("simulated crash")
        return real(self, split, index, targets, stats)

    monkeypatch.setattr(CacheWriter, "write_shard", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        capture(cfg_b)
    assert not (tmp_path / "b" / "manifest.json").exists()
    with pytest.raises(CacheError, match="unfinished cache"):
        Cache(tmp_path / "b")
    monkeypatch.setattr(CacheWriter, "write_shard", real)
    res = capture(cfg_b)
    assert res.resumed_shards == 2 and res.computed_shards > 0
    _assert_same_cache(tmp_path / "a", tmp_path / "b")
    assert verify(tmp_path / "b") == []


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_to_identical_cache(llama_dir, corpus, tmp_path):
    """A real SIGKILL of the CLI mid-capture; the same command again finishes the same cache."""
    common = ["-s", f"teacher.model={llama_dir}", "-s", "data.source=json", "-s", f"data.data_files=['{corpus}']",
              "-s", "data.seq_len=32", "-s", "capture.top_k=8", "-s", "capture.batch_size=1",
              "-s", "capture.rows_per_shard=4", "-s", "capture.rows_per_chunk=2", "-s", "capture.attention_layers=[0,1,2]",
              "-s", "capture.hidden_layers=[0,1,2,3]"]
    cmd = [sys.executable, "-m", "stages.cli", "teacher-cache", *common]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(cmd + ["-s", f"output.dir={tmp_path / 'ref'}"], env=env, check=True, capture_output=True,
                   cwd=REPO)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["-s", f"output.dir={out}"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    commits = out / "_capture" / "commits"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(commits.glob("*.json"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_committed = len(list(commits.glob("*.json")))
    assert not (out / "manifest.json").exists(), "capture finished before it could be killed"
    assert n_committed >= 3
    done = subprocess.run(cmd + ["-s", f"output.dir={out}"], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    _assert_same_cache(tmp_path / "ref", out)


def test_verify_names_flipped_byte_and_missing_file(llama_dir, corpus, tmp_path):
    capture(settings(llama_dir, corpus, tmp_path / "c"))
    root = tmp_path / "c"
    assert verify(root) == []
    shards = shard_files(root)
    victim = shards[("train", 1)]["files"]["topk_logprobs"]
    data = bytearray((root / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / victim).write_bytes(bytes(data))
    gone = shards[("train", 3)]["files"]["logsumexp"]
    (root / gone).unlink()
    problems = verify(root)
    assert len(problems) == 2
    assert any("shard train/1" in p and victim in p and "checksum" in p for p in problems)
    assert any(gone in p and "missing" in p for p in problems)
    # a subset checks only what it names: the damaged shard 1 is outside shards 2-3, the missing file inside
    assert [p for p in verify(root, shards=[2, 3]) if "missing" in p] and not any(
        victim in p for p in verify(root, shards=[2, 3]))
    assert verify(root, fields=["target_logprob"]) == []


def test_verify_catches_edited_manifest_and_metadata(llama_dir, corpus, tmp_path):
    capture(settings(llama_dir, corpus, tmp_path / "c"))
    root = tmp_path / "c"
    meta = root / "train" / "topk_ids" / "zarr.json"
    meta.write_text(meta.read_text().replace('"fill_value": 0', '"fill_value": 1'))
    mpath = root / "manifest.json"
    m = json.loads(mpath.read_text())
    m["capture"]["top_k"] = 9
    mpath.write_text(json.dumps(m))
    problems = verify(root)
    assert "manifest.json: contents do not match its digest (the manifest was edited or damaged)" in problems
    assert any("metadata" in p and "train/topk_ids/zarr.json" in p for p in problems)
    assert len(problems) == 2, problems  # the edited manifest and the edited array metadata, nothing else


def test_second_writer_is_refused(llama_dir, corpus, tmp_path):
    from pipeline.capture.output import writer_lock

    out = tmp_path / "c"
    out.mkdir()
    with writer_lock(out):  # another capture holds it (flock conflicts across open files, as across processes)
        with pytest.raises(CaptureError, match="another capture is writing"):
            capture(settings(llama_dir, corpus, out))
    capture(settings(llama_dir, corpus, out))  # released: now it runs
    assert verify(out) == []


def test_finished_cache_same_settings_is_a_no_op_other_settings_refused(llama_dir, corpus, tmp_path):
    out = tmp_path / "c"
    capture(settings(llama_dir, corpus, out))
    before = _tree(out)
    again = capture(settings(llama_dir, corpus, out))
    assert again.computed_shards == 0
    assert _tree(out) == before
    with pytest.raises(CaptureError, match=r"other settings.*\n.*capture.top_k: 8 -> 4"):
        capture(settings(llama_dir, corpus, out, capture={"top_k": 4}))
    assert _tree(out) == before
    res = capture(settings(llama_dir, corpus, out, capture={"top_k": 4}, output={"overwrite": True}))
    assert res.manifest.capture.top_k == 4 and verify(out) == []


def test_unfinished_capture_with_other_settings_is_refused(llama_dir, corpus, tmp_path, monkeypatch):
    out = tmp_path / "c"

    def boom(self, *a, **k):
        raise RuntimeError("crash")

    monkeypatch.setattr(CacheWriter, "write_shard", boom)
    with pytest.raises(RuntimeError):
        capture(settings(llama_dir, corpus, out))
    monkeypatch.undo()
    with pytest.raises(CaptureError, match="unfinished capture with other settings"):
        capture(settings(llama_dir, corpus, out, data={"seq_len": 16}))


def test_reader_refuses_foreign_and_newer_caches(tmp_path):
    with pytest.raises(CacheError, match="not a teacher cache"):
        Cache(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "teacher-cache", "format_version": "5.0"}))
    with pytest.raises(CacheError, match=r"format version 5.0 is not readable by this version \(reads 1.x, 2.x, 3.x, 4.x\)"):
        Cache(tmp_path)


def test_no_pickle_anywhere_in_a_cache(llama_dir, corpus, tmp_path):
    capture(settings(llama_dir, corpus, tmp_path / "c", capture={"hidden_layers": [1]}))
    for p in (tmp_path / "c").rglob("*"):
        if p.is_file():
            head = p.read_bytes()[:2]
            assert head != b"\x80\x04" and head != b"\x80\x05", f"{p} looks like a pickle"
    m = Cache(tmp_path / "c").manifest
    assert {f.format for f in m.fields.values()} == {"zarr-v3", "parquet"}


def test_shard_files_follow_the_zarr_layout(llama_dir, corpus, tmp_path):
    """The object of shard i of a field is the key zarr's own metadata gives its chunk (i, 0, ...): what docs/format.md
    promises and what a reader without this project opens."""
    import zarr

    from pipeline.format.layout import shard_ranges

    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    capture(settings(llama_dir, corpus, tmp_path / "c", capture={"hidden_layers": [-1]}))
    m = Cache(tmp_path / "c").manifest
    shards = shard_files(tmp_path / "c")
    assert len(shards) == m.n_shards and [sh["rows"] for (s, _), sh in sorted(shards.items()) if s == "train"] \
        == m.shard_ranges("train")
    for (split, index), sh in shards.items():
        assert set(sh["files"]) == set(m.dense_fields)
        for field in m.dense_fields:
            arr = zarr.open_array(str(tmp_path / "c" / sh["part"] / field), mode="r")
            tail = "/".join(["0"] * (arr.ndim - 1))
            assert sh["files"][field] == f"{sh['part']}/{field}/c/{index - m.shard_start(split, sh['part'])}/{tail}"


def test_local_parquet_and_text_sources_give_the_same_rows(tokenizer_dir, corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from pipeline.config import DataConfig
    from pipeline.capture.rows import prepare

    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    pq.write_table(pa.table({"content": docs}), tmp_path / "docs.parquet")
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:04d}.txt").write_text(d)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = {"seq_len": 32, "max_tokens": 1500}
    ref = prepare(DataConfig(source="json", data_files=[str(corpus)], **common), tok)
    par = prepare(DataConfig(source="parquet", data_files=[str(tmp_path / "docs.parquet")], text_column="content",
                             **common), tok)
    txt = prepare(DataConfig(source="text", data_files=[str(tmp_path / "txt" / "*.txt")], **common), tok)
    for other in (par, txt):
        for split in ref.splits:
            assert other.splits[split].keys == ref.splits[split].keys
    shuffled = prepare(DataConfig(source="json", data_files=[str(corpus)], shuffle_seed=3, **common), tok)
    again = prepare(DataConfig(source="json", data_files=[str(corpus)], shuffle_seed=3, **common), tok)
    assert shuffled.splits["train"].keys == again.splits["train"].keys != ref.splits["train"].keys


def _disk_full_at(shard: int):
    """CacheWriter.write_shard as on a disk that fills up when shard `shard` is written."""
    import errno

    real = CacheWriter.write_shard

    def write_shard(self, split, index, targets, stats):
        if index == shard:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, split, index, targets, stats)

    return write_shard


def test_disk_full_mid_capture_keeps_committed_shards(llama_dir, corpus, tmp_path, monkeypatch):
    out = tmp_path / "c"
    real = CacheWriter.write_shard
    monkeypatch.setattr(CacheWriter, "write_shard", _disk_full_at(1))
    with pytest.raises(CaptureError, match="No space left on device.*rerun the same command to resume"):
        capture(settings(llama_dir, corpus, out))
    assert len(list((out / "_capture" / "commits").glob("*.json"))) >= 1
    monkeypatch.setattr(CacheWriter, "write_shard", real)
    assert capture(settings(llama_dir, corpus, out)).resumed_shards >= 1
    assert verify(out) == []


def test_resume_after_a_full_disk_needs_room_for_what_is_left_and_sweeps_temporaries(llama_dir, corpus, tmp_path,
                                                                                     monkeypatch):
    from pipeline.capture import output as output_mod

    out = tmp_path / "c"
    real_write, real_check = CacheWriter.write_shard, output_mod.check_disk
    asked = []
    monkeypatch.setattr(output_mod, "check_disk", lambda where, need: asked.append(need) or real_check(where, need))
    monkeypatch.setattr(CacheWriter, "write_shard", _disk_full_at(2))
    with pytest.raises(CaptureError, match="No space left on device"):
        capture(settings(llama_dir, corpus, out))
    commits = [json.loads(p.read_text()) for p in (out / "_capture" / "commits").glob("*.json")]
    done = sum(r["row_end"] - r["row_start"] for r in commits)
    (out / "train" / "stray.tmp").write_bytes(b"left by a kill")
    (out / "train" / "logsumexp" / "c" / "9.0b1c.partial").write_bytes(b"half a shard")
    monkeypatch.setattr(CacheWriter, "write_shard", real_write)
    capture(settings(llama_dir, corpus, out))
    total = sum(v.rows for v in Cache(out).manifest.splits.values())
    assert asked[1] == pytest.approx(asked[0] * (total - done) / total, rel=1e-6) and asked[1] < asked[0]
    assert verify(out) == []  # the temporaries are gone (verify reports files the manifest does not list)


def test_cache_carries_its_tokenizer(llama_dir, corpus, tmp_path):
    from transformers import AutoTokenizer

    capture(settings(llama_dir, corpus, tmp_path / "c"))
    c = Cache(tmp_path / "c")
    tok = c.tokenizer()
    rows = c.rows("train")
    first = rows.column("input_ids")[0].as_py()[: rows.column("length")[0].as_py()]
    assert tok.decode(first) == AutoTokenizer.from_pretrained(llama_dir).decode(first)
    assert any(k.startswith("tokenizer/") for k in c.manifest.metadata_files)
    victim = tmp_path / "c" / "tokenizer" / "tokenizer.json"
    victim.write_text(victim.read_text().replace('"<|pad|>"', '"<|PAD|>"'))
    assert any("tokenizer/tokenizer.json" in p for p in verify(tmp_path / "c"))
    with pytest.raises(CacheError, match="does not match the manifest"):
        c.tokenizer()


def test_a_capture_given_its_loaded_teacher_loads_nothing_and_writes_the_same_bytes(llama_dir, corpus, tmp_path,
                                                                                   monkeypatch):
    """run_capture(model=...) (benchmarks, notebooks) uses the model it is given, and reports its shard loop's
    seconds."""
    import torch

    from pipeline import models
    from pipeline.capture.run import run_capture
    from pipeline.config import TeacherCacheConfig

    capture(settings(llama_dir, corpus, tmp_path / "ref"))
    cfg = TeacherCacheConfig.model_validate(settings(llama_dir, corpus, tmp_path / "given"))
    model = models.load_model(cfg.teacher, torch.device("cpu"))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the teacher was loaded again"))
    res = run_capture(cfg, log=lambda m: None, progress=False, model=model)
    assert res.computed_shards > 0 and res.shard_seconds > 0
    _assert_same_cache(tmp_path / "ref", tmp_path / "given")
