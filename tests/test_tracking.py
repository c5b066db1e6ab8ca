"""Experiment tracking: `report_to = ["tensorboard", "wandb"]` gets every metrics.jsonl record of every student,
as the same scalars at the same steps, and a resumed run leaves no duplicate steps behind (W&B in offline mode:
a real run, no account)."""

from __future__ import annotations

import json

import pytest
from conftest import capture, settings, student_run

from pipeline.errors import DistillError
from pipeline.train.recipe import train_students
from pipeline.train.tracking import scalars


@pytest.fixture(scope="module")
def cache(llama_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracking") / "cache"
    capture(settings(llama_dir, corpus, out))
    return out


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """W&B offline, with a spy on each run's log(): what the tracker sent, in order, per run name."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sent: dict[str, list] = {}
    real_init = wandb.init

    def init(**kw):
        run = real_init(**kw)
        real_log = run.log
        sent.setdefault(kw["name"], [])

        def log(values, step=None, **more):
            sent[kw["name"]].append((step, dict(values)))
            return real_log(values, step=step, **more)
        run.log = log
        return run
    monkeypatch.setattr(wandb, "init", init)
    return sent


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(metrics_file) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for line in metrics_file.read_text().splitlines():
        rec = json.loads(line)
        for tag, v in scalars(rec).items():
            out.setdefault(tag, []).append((rec["step"], v))
    return out


def same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for tag in a:
        assert [s for s, _ in a[tag]] == [s for s, _ in b[tag]], tag
        assert [v for _, v in a[tag]] == pytest.approx([v for _, v in b[tag]], rel=1e-6), tag  # TB keeps float32


def test_every_record_reaches_tensorboard_and_wandb(cache, tmp_path, wandb_offline):
    students = [{"name": n, "arch": {"num_layers": 1, "hidden_size": 32, "num_heads": 4}, "losses": losses,
                 "lr": 3e-3, "warmup_steps": 2} for n, losses in (("kd", {"kd_forward": 1.0}), ("ce", {"ce": 1.0}))]
    cfg = student_run(cache, tmp_path / "out", students=students, report_to=["tensorboard", "wandb"],
                      wandb_project="tests")
    train_students(cfg, log=lambda m: None, progress=False)
    for name in ("kd", "ce"):
        want = expected(tmp_path / "out" / name / "metrics.jsonl")
        assert {t.split("/")[0] for t in want} == {"train", "validation"} and "train/loss" in want
        same(tensorboard_scalars(tmp_path / "out" / name / "tensorboard"), want)
        got: dict[str, list] = {}
        for step, values in wandb_offline[name]:
            for tag, v in values.items():
                got.setdefault(tag, []).append((step, v))
        same(got, want)
        assert list((tmp_path / "out" / name / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_resumed_run_leaves_one_value_per_step(cache, tmp_path, wandb_offline):
    def stop(step):
        if step == 5:  # after the checkpoint of step 3 (eval_every): steps 4 and 5 are done again
            raise KeyboardInterrupt
    cfg = student_run(cache, tmp_path / "out", report_to=["tensorboard", "wandb"])
    with pytest.raises(KeyboardInterrupt):
        train_students(cfg, log=lambda m: None, progress=False, after_step=stop)
    run_id = (tmp_path / "out" / "s" / "wandb-run-id").read_text()
    train_students(cfg, log=lambda m: None, progress=False)
    want = expected(tmp_path / "out" / "s" / "metrics.jsonl")
    assert [s for s, _ in want["train/loss"]] == [2, 4, 6]
    same(tensorboard_scalars(tmp_path / "out" / "s" / "tensorboard"), want)
    assert (tmp_path / "out" / "s" / "wandb-run-id").read_text() == run_id  # one W&B run, continued


def test_a_missing_tracker_package_is_a_clear_error(cache, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(DistillError, match="pip install tensorboard"):
        train_students(student_run(cache, tmp_path / "out", report_to=["tensorboard"]), log=lambda m: None,
                       progress=False)
