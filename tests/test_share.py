"""Sharing caches through real servers on localhost: an S3-compatible server (moto, used through s3fs
exactly as a bucket would be) and a plain HTTP server."""

from __future__ import annotations

import functools
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import all_files, capture, settings
from conftest import STUDENT_ARCH as ARCH

from pipeline.format import Cache, CacheError, verify
from pipeline.format.share import list_caches, pull, push
from pipeline.format.storage import Storage, StorageError
from pipeline.student_config import StudentRunConfig
from pipeline.train.recipe import train_students

pytestmark = pytest.mark.slow  # local S3 and HTTP servers

REPO = Path(__file__).resolve().parents[1]
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on localhost; the environment points s3fs at it, as AWS_ENDPOINT_URL would a user's."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if not fs.exists("team"):  # moto's buckets live in the process: another module's server may have made it
        fs.mkdir("team")
    yield env
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def local_cache(llama_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("share") / "cache"
    capture(settings(llama_dir, corpus, out, data={"max_tokens": 2500, "validation_fraction": 0.2},
                     capture={"top_k": 8, "hidden_layers": [-1], "rows_per_shard": 8, "rows_per_chunk": 4}))
    return out


def distill(*args, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], env=env, capture_output=True, text=True)


def _flip_last_byte(st: Storage, rel: str) -> None:
    data = bytearray(st.read_bytes(rel))
    data[-1] ^= 0xFF
    st.write_bytes(rel, bytes(data))


def test_push_ls_pull_part_verify_and_train_from_the_bucket(local_cache, s3, tmp_path, monkeypatch):
    url = "s3://team/caches/tiny"
    res = distill("push", str(local_cache), url)
    assert res.returncode == 0, res.stderr
    manifest = Cache(local_cache).manifest
    # listed, with what it holds
    (line,) = list_caches("s3://team/caches")
    assert line["location"] == url and line["digest"] == manifest.digest and "hidden_states" in line["fields"]
    res = distill("ls", "s3://team/caches")
    assert res.returncode == 0 and manifest.digest[:16] in res.stdout and "teacher" in res.stdout
    assert verify(url) == []
    # a rerun sends nothing: every object is already there with the right checksum
    assert push(local_cache, url, log=lambda m: None)["sent"] == 0
    # a student that needs top-K targets pulls only those, and only the train split
    dest = tmp_path / "part"
    stats = pull(url, dest, fields=["topk_ids", "topk_logprobs", "logsumexp"], splits=["train"], log=lambda m: None)
    part = Cache(dest)
    assert part.manifest.document["subset"] == {"of_digest": manifest.digest, "source": url,
                                       "fields": ["logsumexp", "topk_ids", "topk_logprobs"], "splits": ["train"]}
    assert not (dest / "train" / "hidden_states").exists() and not (dest / "validation").exists()
    assert verify(dest) == [] and distill("inspect", str(dest)).returncode == 0
    whole = sum(d.bytes for d in all_files(local_cache).values())
    assert stats["bytes"] < whole
    np.testing.assert_array_equal(part.array("train", "topk_ids")[:], Cache(local_cache).array("train", "topk_ids")[:])
    with pytest.raises(CacheError, match="no dense field 'hidden_states'"):
        part.array("train", "hidden_states")
    # a student reads the bucket directly, through a verified local mirror
    from pipeline.student_config import StudentRunConfig
    from pipeline.train.recipe import train_students

    monkeypatch.setenv("TEACHER_CACHE_MIRROR", str(tmp_path / "mirror"))
    cfg = StudentRunConfig.model_validate({"cache": url, "output_dir": str(tmp_path / "students"), "batch_size": 4,
                                           "max_steps": 3, "eval_every": 3, "device": "cpu",
                                           "students": [{"name": "s", "arch": ARCH, "losses": {"kd_forward": 1.0}}]})
    (report,) = train_students(cfg, log=lambda m: None, progress=False)
    assert report["steps"] == 3 and np.isfinite(report["final"]["nll"])
    assert any((tmp_path / "mirror").rglob("rows.parquet"))
    # a flipped byte in the bucket is caught by verify, naming the file
    victim = next(r for r in all_files(local_cache) if "/logsumexp/c/" in r)
    _flip_last_byte(Storage(url), victim)
    problems = verify(url)
    assert len(problems) == 1 and victim in problems[0]
    res = distill("verify", url)
    assert res.returncode == 1 and victim in res.stderr


def test_an_interrupted_push_is_invisible_and_a_rerun_completes_it(local_cache, s3):
    url = "s3://team/caches/interrupted"
    src = Storage(local_cache)
    files = list(all_files(local_cache))
    dst = Storage(url)
    for rel in files[: len(files) // 2]:  # what a push killed half way leaves: data, no manifest
        dst.copy_from(src, rel)
    with pytest.raises(CacheError, match="is not a teacher cache"):
        Cache(url)
    stats = push(local_cache, url, log=lambda m: None)
    assert stats["skipped"] == len(files) // 2 and stats["sent"] == len(files) - len(files) // 2
    assert verify(url) == []


def test_push_refuses_to_replace_another_cache_unless_forced(local_cache, llama_dir, corpus, s3, tmp_path):
    other = tmp_path / "other"
    capture(settings(llama_dir, corpus, other, capture={"top_k": 4}))
    url = "s3://team/caches/taken"
    push(local_cache, url, log=lambda m: None)
    with pytest.raises(CacheError, match="holds another cache"):
        push(other, url, log=lambda m: None)
    push(other, url, force=True, log=lambda m: None)
    assert Cache(url).manifest.digest == Cache(other).manifest.digest


def test_pull_refusals(local_cache, llama_dir, corpus, tmp_path):
    with pytest.raises(CacheError, match="--fields names attentions, which the cache does not hold"):
        pull(str(local_cache), tmp_path / "a", fields=["topk_ids", "attentions"], log=lambda m: None)
    with pytest.raises(CacheError, match="--splits names test"):
        pull(str(local_cache), tmp_path / "a", splits=["test"], log=lambda m: None)
    other = tmp_path / "other"
    capture(settings(llama_dir, corpus, other, capture={"top_k": 4}))
    with pytest.raises(CacheError, match="holds another cache"):
        pull(str(local_cache), other, log=lambda m: None)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="is not empty"):
        pull(str(local_cache), junk, log=lambda m: None)


def test_a_whole_pull_is_the_same_cache_and_resumes(local_cache, tmp_path):
    dest = tmp_path / "copy"
    pull(str(local_cache), dest, log=lambda m: None)
    assert Cache(dest).manifest == Cache(local_cache).manifest and verify(dest) == []
    again = pull(str(local_cache), dest, log=lambda m: None)
    assert again["fetched"] == 0


@pytest.fixture(scope="module")
def http_root(local_cache):
    """A plain HTTP server on localhost serving the folder that holds the cache."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(local_cache.parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_read_verify_and_pull_over_http(local_cache, http_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_CACHE_MIRROR", str(tmp_path / "mirror"))
    url = f"{http_root}/{local_cache.name}"
    remote, local = Cache(url), Cache(local_cache)
    assert remote.manifest == local.manifest
    for field in ("topk_ids", "topk_logprobs", "hidden_states"):
        np.testing.assert_array_equal(remote.array("train", field)[:], local.array("train", field)[:])
    assert remote.rows("train").equals(local.rows("train"))
    assert remote.tokenizer().get_vocab() == local.tokenizer().get_vocab()
    assert verify(url) == []
    pull(url, tmp_path / "p", fields=["topk_ids"], log=lambda m: None)
    assert verify(tmp_path / "p") == []


@pytest.mark.parametrize("args,message", [
    (["inspect", "http://127.0.0.1:9/nothing"], "error: "),
    (["verify", "s3://no-such-bucket/x"], "is not a teacher cache"),
    (["pull", "s3://team/not-a-cache", "DEST"], "is not a teacher cache"),
])
def test_bad_locations_fail_in_one_line(args, message, s3, tmp_path):
    args = [str(tmp_path / "d") if a == "DEST" else a for a in args]
    res = distill(*args)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_missing_credentials_fail_in_one_line(local_cache, s3, tmp_path):
    env = {k: "" for k in S3_ENV} | {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                                       "AWS_CONFIG_FILE": str(tmp_path / "none")}
    res = distill("push", str(local_cache), "s3://team/caches/nocreds", env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "credentials" in res.stderr.lower(), res.stderr


def test_unlisted_files_are_reported(local_cache, tmp_path):
    dest = tmp_path / "copy"
    pull(str(local_cache), dest, log=lambda m: None)
    (dest / "train" / "stray.bin").write_bytes(b"x")
    assert verify(dest) == ["train/stray.bin: a file the manifest does not list"]


def test_storage_errors_name_the_location():
    with pytest.raises(StorageError, match="nosuchproto"):
        Storage("nosuchproto://x")
    assert json.loads(json.dumps({"ok": True}))


def test_storage_options_in_the_config_reach_the_bucket(local_cache, s3, tmp_path, monkeypatch):
    """Endpoint and credentials as fsspec storage options, with nothing in the environment."""
    url = "s3://team/caches/options"
    push(str(local_cache), url, log=lambda m: None)
    options = {"key": s3["AWS_ACCESS_KEY_ID"], "secret": s3["AWS_SECRET_ACCESS_KEY"],
               "client_kwargs": {"endpoint_url": s3["AWS_ENDPOINT_URL"], "region_name": "us-east-1"}}
    for k in s3:
        monkeypatch.delenv(k)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("TEACHER_CACHE_MIRROR", str(tmp_path / "mirror"))
    cfg = StudentRunConfig.model_validate({
        "cache": url, "storage_options": options, "output_dir": str(tmp_path / "s"), "batch_size": 4,
        "max_steps": 2, "eval_every": 2, "device": "cpu", "num_workers": 1,
        "students": [{"name": "s", "arch": ARCH, "losses": {"kd_forward": 1.0}}]})
    train_students(cfg, log=lambda m: None, progress=False)  # a DataLoader worker rebuilds the filesystem too
    assert (tmp_path / "s" / "s" / "model" / "config.json").exists()
    assert Cache(url, storage_options=options).manifest == Cache(local_cache).manifest
    s3fs.S3FileSystem.clear_instance_cache()


def test_capture_straight_into_the_bucket_resumes_and_grows(llama_dir, corpus, local_cache, s3, tmp_path,
                                                            monkeypatch):
    """output.dir = s3://...: every write through the storage layer; a crash resumes; an append grows it."""
    from pipeline.format import CacheWriter

    monkeypatch.setenv("TEACHER_CACHE_MIRROR", str(tmp_path / "mirror"))
    url = "s3://team/caches/direct"
    cfg = settings(llama_dir, corpus, url, data={"max_tokens": 2500, "validation_fraction": 0.2},
                   capture={"top_k": 8, "hidden_layers": [-1], "rows_per_shard": 8, "rows_per_chunk": 4})
    real, calls = CacheWriter.write_shard, []

    def crashing(self, *a):
        calls.append(a[1])
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(self, *a)

    monkeypatch.setattr(CacheWriter, "write_shard", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        capture(cfg)
    monkeypatch.setattr(CacheWriter, "write_shard", real)
    with pytest.raises(CacheError, match="unfinished"):
        Cache(url)
    assert capture(cfg).resumed_shards == 1
    assert verify(url) == []
    # the same bytes as the same capture on local disk, file by file
    assert all_files(url) == all_files(local_cache)
    more = {**cfg, "data": {**cfg["data"], "max_tokens": 3500}, "output": {"dir": url, "mode": "append"}}
    capture(more)
    grown = Cache(url)
    assert verify(url) == [] and grown.manifest.grown[0].rows["train"] > 0
    assert len(grown.array("train", "topk_ids")) == grown.manifest.splits["train"].rows == \
        grown.rows("train").num_rows
