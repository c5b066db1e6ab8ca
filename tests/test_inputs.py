"""Bad input fails early, with a message naming the problem, before any weights are loaded."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest
from conftest import capture, settings

from pipeline import models
from pipeline.capture import checks
from pipeline.errors import CaptureError
from pipeline.config import ConfigError, TeacherCacheConfig, load_config, merge_overrides
from pipeline.errors import DataError
from pipeline.errors import TeacherError


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Every refusal here must come before the teacher's weights are read."""

    def refuse(*a, **k):
        raise AssertionError("teacher weights were loaded before the bad input was noticed")

    monkeypatch.setattr(models, "load_model", refuse)


def _run(cfg):
    return capture(cfg)


def test_missing_data_file(llama_dir, tmp_path):
    cfg = settings(llama_dir, tmp_path / "nope.jsonl", tmp_path / "c")
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        _run(cfg)


def test_glob_matching_nothing(llama_dir, tmp_path):
    cfg = settings(llama_dir, tmp_path / "*.jsonl", tmp_path / "c")
    with pytest.raises(DataError, match=r"matches no file"):
        _run(cfg)


def test_missing_text_column(llama_dir, corpus, tmp_path):
    cfg = settings(llama_dir, corpus, tmp_path / "c", data={"text_column": "body"})
    with pytest.raises(DataError, match=r"text column 'body' not in .*columns: .*text"):
        _run(cfg)


def test_empty_dataset(llama_dir, tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n".join(json.dumps({"text": "   "}) for _ in range(3)) + "\n")
    with pytest.raises(DataError, match="no tokens"):
        _run(settings(llama_dir, f, tmp_path / "c"))
    g = tmp_path / "zero.jsonl"
    g.write_text("")
    with pytest.raises(DataError, match=r"cannot load dataset 'json' .*zero.jsonl"):
        _run(settings(llama_dir, g, tmp_path / "c"))


def test_top_k_larger_than_vocabulary(llama_dir, corpus, tmp_path):
    with pytest.raises(CaptureError, match=r"top_k=513 is larger than the teacher's vocabulary \(512\)"):
        _run(settings(llama_dir, corpus, tmp_path / "c", capture={"top_k": 513}))


def test_seq_len_beyond_positions(gpt2_dir, corpus, tmp_path):
    with pytest.raises(CaptureError, match=r"seq_len=200 exceeds the teacher's 128 positions"):
        _run(settings(gpt2_dir, corpus, tmp_path / "c", data={"seq_len": 200}))


@pytest.mark.parametrize("section,value,pattern", [
    ("hidden_layers", [4], r"hidden_layers index 4 does not exist: the teacher has 4 hidden states"),
    ("hidden_layers", [-5], r"hidden_layers index -5 does not exist"),
    ("attention_layers", [3], r"attention_layers index 3 does not exist: the teacher has 3 layers"),
    ("attention_layers", [1, -2], r"attention_layers index -2 is listed twice"),
])
def test_layer_that_does_not_exist(llama_dir, corpus, tmp_path, section, value, pattern):
    with pytest.raises(CaptureError, match=pattern):
        _run(settings(llama_dir, corpus, tmp_path / "c", capture={section: value}))


def test_head_that_does_not_exist(llama_dir, corpus, tmp_path):
    with pytest.raises(CaptureError, match=r"attention_heads \[7\] invalid: the teacher has heads 0..3"):
        _run(settings(llama_dir, corpus, tmp_path / "c", capture={"attention_layers": [0], "attention_heads": [1, 7]}))


def test_unwritable_output(llama_dir, corpus, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CaptureError, match=r"output directory .*a-file/cache is not writable"):
        _run(settings(llama_dir, corpus, blocker / "cache"))


def test_not_enough_disk(llama_dir, corpus, tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(CaptureError, match=r"not enough disk .* needs up to [\d.]+ MiB .* 1.0 MiB free"):
        _run(settings(llama_dir, corpus, tmp_path / "c"))
    assert not (tmp_path / "c" / "_capture").exists()  # refused before anything was written


def test_output_dir_holding_other_files(llama_dir, corpus, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(CaptureError, match="is not empty and is not a cache"):
        _run(settings(llama_dir, corpus, tmp_path / "c"))
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


def test_missing_teacher(corpus, tmp_path):
    with pytest.raises(TeacherError, match=r"teacher path .*no-such-model does not exist"):
        _run(settings(tmp_path / "no-such-model", corpus, tmp_path / "c"))


def test_unknown_config_keys_are_errors(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[teacher]\nmodel = "x"\n[data]\nsource = "text"\n[output]\ndir = "o"\n[capture]\ntopk = 3\n')
    with pytest.raises(ConfigError, match=r"capture.topk: unknown key"):
        load_config(TeacherCacheConfig, f)
    with pytest.raises(ConfigError, match=r"capture.top_k: Input should be greater than 0"):
        load_config(TeacherCacheConfig, None, ["teacher.model=x", "data.source=text", "output.dir=o",
                                               "capture.top_k=0"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(TeacherCacheConfig, None, ["capture.top_k"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TeacherCacheConfig, tmp_path / "missing.toml")


def test_overrides_parse_toml_values_and_fall_back_to_strings():
    raw = merge_overrides({"capture": {"top_k": 8}}, [
        "capture.top_k=32", "capture.temperatures=[2.0, 4.0]", "teacher.model=org/name", "capture.hidden_layers=[-1]",
        "output.overwrite=true"])
    assert raw == {"capture": {"top_k": 32, "temperatures": [2.0, 4.0], "hidden_layers": [-1]},
                   "teacher": {"model": "org/name"}, "output": {"overwrite": True}}


@pytest.mark.parametrize("capture_cfg,pattern", [
    ({"temperatures": [1.0]}, "exclude 1.0"),
    ({"temperatures": [-2.0]}, "must be > 0"),
    ({"rows_per_shard": 10, "rows_per_chunk": 4}, "multiple of rows_per_chunk"),
])
def test_capture_settings_validated(capture_cfg, pattern):
    base = {"teacher": {"model": "m"}, "data": {"source": "text"}, "output": {"dir": "o"}}
    with pytest.raises(ConfigError, match=pattern):
        load_config(TeacherCacheConfig, None, [f"capture.{k}={json.dumps(v)}" for k, v in capture_cfg.items()]
                    + [f"{s}.{k}={json.dumps(v)}" for s, d in base.items() for k, v in d.items()])
