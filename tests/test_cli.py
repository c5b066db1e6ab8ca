"""The `distill` CLI end to end on a tiny teacher: build, inspect, verify, train, push, ls, pull, and its failure
exits (one `error:` line, exit 2, no traceback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here runs the CLI in subprocesses

REPO = Path(__file__).resolve().parents[1]


def distill(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True)


@pytest.fixture
def config_file(llama_dir, corpus, tmp_path) -> Path:
    f = tmp_path / "cache.toml"
    f.write_text(f"""
[teacher]
model = "{llama_dir}"
[data]
source = "json"
data_files = ["{corpus}"]
seq_len = 32
max_tokens = 2000
shuffle_seed = 1
[capture]
top_k = 8
temperatures = [2.0]
hidden_layers = [-1]
attention_layers = [0]
rows_per_shard = 8
rows_per_chunk = 4
[output]
dir = "{tmp_path / 'cache'}"
""")
    return f


def test_build_inspect_verify(config_file, tmp_path):
    res = distill("teacher-cache", "--config", str(config_file), "-s", "capture.top_k=6")
    assert res.returncode == 0, res.stderr
    cache = tmp_path / "cache"
    assert res.stdout.strip() == str(cache)
    assert "estimated size" in res.stderr and "bytes/token" in res.stderr
    ins = distill("inspect", str(cache))
    assert ins.returncode == 0, ins.stderr
    assert "top-6" in ins.stdout and "topk_ids" in ins.stdout and "B/token" in ins.stdout
    assert "attentions" in ins.stdout and "[-1]" not in ins.stdout  # layers shown resolved
    js = distill("inspect", str(cache), "--json")
    assert '"top_k": 6' in js.stdout and '"shuffle_seed": 1' in js.stdout
    ok = distill("verify", str(cache))
    assert ok.returncode == 0 and "OK" in ok.stdout
    shard = next((cache / "train" / "topk_ids" / "c").rglob("0"))
    f = shard if shard.is_file() else next(p for p in shard.rglob("*") if p.is_file())
    data = bytearray(f.read_bytes())
    data[10] ^= 0x40
    f.write_bytes(bytes(data))
    bad = distill("verify", str(cache))
    assert bad.returncode == 1
    assert "CORRUPT shard train/0" in bad.stderr and "topk_ids" in bad.stderr


@pytest.mark.parametrize("override,message", [
    ("capture.top_k=100000", "error: capture.top_k=100000 is larger than the teacher's vocabulary"),
    ("capture.nonsense=1", "capture.nonsense: unknown key"),
    ("data.text_column=body", "error: text column 'body' not in"),
    ("capture.logprob_precision=0.2", "capture.logprob_precision: Input should be less than or equal to 0.05"),
    ("capture.logprob_precision=0", "capture.logprob_precision: Input should be greater than 0"),
])
def test_bad_input_exits_2_with_message(config_file, override, message):
    res = distill("teacher-cache", "--config", str(config_file), "-s", override)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_unfinished_cache_is_refused_by_readers(tmp_path):
    (tmp_path / "c" / "_capture").mkdir(parents=True)
    for cmd in ("inspect", "verify"):
        res = distill(cmd, str(tmp_path / "c"))
        assert res.returncode == 2 and "unfinished cache" in res.stderr


def _student_toml(tmp_path: Path, max_steps: int) -> Path:
    """A student run on the test cache at tmp_path/cache: one tiny arch student, KD only."""
    f = tmp_path / "student.toml"
    f.write_text(f"""
cache = "{tmp_path / 'cache'}"
output_dir = "{tmp_path / 'students'}"
batch_size = 4
max_steps = {max_steps}
eval_every = {max_steps}
device = "cpu"
[[students]]
name = "tiny"
losses = {{ kd_forward = 1.0 }}
  [students.arch]
  num_layers = 1
  hidden_size = 16
  num_heads = 2
""")
    return f


def test_student_from_the_cli(config_file, tmp_path):
    assert distill("teacher-cache", "--config", str(config_file)).returncode == 0
    f = _student_toml(tmp_path, max_steps=3)
    res = distill("student", "--config", str(f), "-s", "students.0.lr=0.002")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(tmp_path / "students" / "tiny" / "model")
    assert "best at step 3: NLL" in res.stderr
    bad = distill("student", "--config", str(f), "-s", f"cache={tmp_path / 'nowhere'}")
    assert bad.returncode == 2 and "not a teacher cache" in bad.stderr
    bad = distill("student", "--config", str(f), "-s", "students.0.losses={kd_sideways=1.0}")
    assert bad.returncode == 2 and "unknown loss terms ['kd_sideways']" in bad.stderr


def _commands():
    from stages.cli import app

    return [(c.name, c.callback) for c in app.registered_commands]


def test_the_top_level_help_lists_every_command():
    res = distill("--help")
    assert res.returncode == 0 and "Usage" in res.stdout
    listed = set(re.findall(r"^│ (\S+) ", res.stdout, flags=re.M))
    assert {name for name, _ in _commands()} <= listed and len(_commands()) == 13


@pytest.mark.parametrize("name,callback", _commands(), ids=[name for name, _ in _commands()])
def test_help_for_every_command(name, callback):
    """Every registered command (none left out: the list is the app's) prints its usage and its own description."""
    from typer.testing import CliRunner

    from stages.cli import app

    res = CliRunner().invoke(app, [name, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "Usage: " in res.output and f" {name} [OPTIONS]" in res.output
    first = " ".join(callback.__doc__.split("\n\n")[0].split())  # the docstring's first paragraph
    assert " ".join(first.split()[:6]) in " ".join(res.output.split())


def test_push_ls_pull_from_the_cli(config_file, tmp_path):
    """The sharing commands end to end on local folders (the bucket and web-server paths are test_share's)."""
    import json

    assert distill("teacher-cache", "--config", str(config_file)).returncode == 0
    cache, pub = tmp_path / "cache", tmp_path / "published"
    res = distill("push", str(cache), str(pub / "c1"))
    assert res.returncode == 0 and res.stdout.strip() == str(pub / "c1"), res.stderr
    assert "pushed" in res.stderr
    res = distill("ls", str(pub), "--json")
    (line,) = [json.loads(x) for x in res.stdout.splitlines()]
    assert res.returncode == 0 and line["location"] == str(pub / "c1") and "topk_ids" in line["fields"]
    res = distill("ls", str(pub))
    assert res.returncode == 0 and line["digest"][:16] in res.stdout and "K=8" in res.stdout
    res = distill("pull", str(pub / "c1"), str(tmp_path / "part"), "--fields", "topk_ids", "--splits", "train")
    assert res.returncode == 0 and "fetched and verified" in res.stderr, res.stderr
    ok = distill("verify", str(tmp_path / "part"))
    assert ok.returncode == 0 and "OK" in ok.stdout
    part = json.loads(distill("inspect", str(tmp_path / "part"), "--json").stdout)
    assert part["subset"]["fields"] == ["topk_ids"] and part["subset"]["splits"] == ["train"]
    assert [k for k, f in part["fields"].items() if f["format"] == "zarr-v3"] == ["topk_ids"]
    assert list(part["splits"]) == ["train"] and not (tmp_path / "part" / "train" / "attentions").exists()
    again = distill("pull", str(pub / "c1"), str(tmp_path / "part"), "--fields", "topk_ids", "--splits", "train")
    assert again.returncode == 0 and "already holds this pull" in again.stderr
    bad = distill("pull", str(pub / "c1"), str(tmp_path / "part2"), "--fields", "no_such_field")
    assert bad.returncode == 2 and "--fields names no_such_field" in bad.stderr


def test_ls_of_a_root_that_does_not_exist_says_so(tmp_path):
    res = distill("ls", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and f"error: {tmp_path / 'nowhere'} does not exist" in res.stderr, res.stderr
    (tmp_path / "empty").mkdir()
    res = distill("ls", str(tmp_path / "empty"))  # an existing root without caches: nothing to list, no error
    assert res.returncode == 0 and res.stdout == "" and "no finished caches" in res.stderr


def test_pull_from_a_server_that_refuses_the_connection_names_the_failure(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = distill("pull", f"http://127.0.0.1:{port}/caches/c", str(tmp_path / "p"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "cannot reach" in res.stderr and "Cannot connect" in res.stderr, res.stderr
    assert "not a teacher cache" not in res.stderr


def test_student_refusals_name_the_bad_path(config_file, tmp_path):
    assert distill("teacher-cache", "--config", str(config_file)).returncode == 0
    f = _student_toml(tmp_path, max_steps=1)
    (tmp_path / "a-file").write_text("not a folder")
    res = distill("student", "--config", str(f), "-s", f"output_dir={tmp_path / 'a-file'}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"output_dir {tmp_path / 'a-file'}" in res.stderr and "is a file, not a directory" in res.stderr
    f2 = tmp_path / "pretrained.toml"
    f2.write_text(f.read_text().replace('  [students.arch]\n  num_layers = 1\n  hidden_size = 16\n  num_heads = 2\n',
                                        'pretrained = "./no/such/checkpoint"\n'))
    res = distill("student", "--config", str(f2))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "pretrained path no/such/checkpoint does not exist" in res.stderr, res.stderr
    assert "Repo id" not in res.stderr
