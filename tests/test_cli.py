"""The `distill` CLI end to end on a tiny teacher: build, inspect, verify, and its failure exits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_student_from_the_cli(config_file, tmp_path):
    assert distill("teacher-cache", "--config", str(config_file)).returncode == 0
    f = tmp_path / "student.toml"
    f.write_text(f"""
cache = "{tmp_path / 'cache'}"
output_dir = "{tmp_path / 'students'}"
batch_size = 4
max_steps = 3
eval_every = 3
device = "cpu"
[[students]]
name = "tiny"
losses = {{ kd_forward = 1.0 }}
  [students.arch]
  num_layers = 1
  hidden_size = 16
  num_heads = 2
""")
    res = distill("student", "--config", str(f), "-s", "students.0.lr=0.002")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(tmp_path / "students" / "tiny" / "model")
    assert "best at step 3: NLL" in res.stderr
    bad = distill("student", "--config", str(f), "-s", f"cache={tmp_path / 'nowhere'}")
    assert bad.returncode == 2 and "not a teacher cache" in bad.stderr
    bad = distill("student", "--config", str(f), "-s", "students.0.losses={kd_sideways=1.0}")
    assert bad.returncode == 2 and "unknown loss terms ['kd_sideways']" in bad.stderr


@pytest.mark.parametrize("cmd", [[], ["teacher-cache"], ["inspect"], ["verify"], ["convert-teacher"], ["student"]])
def test_help_for_every_command(cmd):
    res = distill(*cmd, "--help")
    assert res.returncode == 0 and "Usage" in res.stdout
