"""Batches that mix however the data arrives: a cache written class by class trains a student as well as the same
data shuffled, because the reader shuffles a window of shards, not one shard; the capture warns when rows arrive in
long runs of one label or one source file."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import classification_settings, make_classifier, settings

from pipeline.capture.dryrun import dry_run
from pipeline.capture.run import run_capture
from pipeline.config import TeacherCacheConfig
from pipeline.student_config import StudentRunConfig
from pipeline.format import Cache
from pipeline.format.layout import row_values
from pipeline.train.dataset import CacheBatches, make_loader
from pipeline.train.recipe import train_students

LABELS = ["def", "import", "class", "return"]
WORDS = "the a value of in to is for and list name file data path object self".split()


@pytest.fixture(scope="module")
def by_class(tmp_path_factory, tokenizer_dir):
    """A 4-class dataset written class by class (its label a word among the first four), a random classifier as
    its teacher, and caches of it captured as it arrives and shuffled (shuffle_seed)."""
    root = tmp_path_factory.mktemp("by_class")
    rng = random.Random(0)
    data = root / "by_class.jsonl"
    with open(data, "w") as f:
        for label in LABELS:
            for i in range(60):
                words = [rng.choice(WORDS) for _ in range(10)]
                words.insert(rng.randrange(0, 4), label)
                f.write(json.dumps({"text": " ".join(words) + f" {i}", "label": label}) + "\n")
    teacher = make_classifier(tokenizer_dir, root / "teacher", "bert", "sequence", LABELS)
    caches, logs = {}, {}
    for name, seed in (("grouped", None), ("shuffled", 0)):
        cfg = classification_settings(teacher, data, root / name, "sequence",
                                      data={"max_documents": None, "shuffle_seed": seed},
                                      capture={"rows_per_shard": 8, "rows_per_chunk": 4})
        logs[name] = []
        run_capture(TeacherCacheConfig.model_validate(cfg), log=logs[name].append, progress=False)
        caches[name] = root / name
    return caches, logs, cfg


def accuracy(cache, out, seed: int, **kw) -> float:
    cfg = StudentRunConfig.model_validate({
        "cache": str(cache), "output_dir": str(out), "device": "cpu", "seed": seed, "batch_size": 8,
        "max_steps": 150, "eval_every": 150, "early_stopping_metric": "accuracy",
        "students": [{"name": "s", "arch": {"num_layers": 1, "hidden_size": 32, "num_heads": 2,
                                            "intermediate_size": 64},
                      "losses": {"ce": 1.0}, "lr": 1e-2, "warmup_steps": 2, "seed": seed}], **kw})
    return train_students(cfg, log=lambda m: None, progress=False)[0]["final"]["accuracy"]


def labels_per_batch(cache, **kw) -> float:
    """The mean number of distinct gold labels in an epoch's training batches of 8."""
    c = Cache(cache)
    labels = row_values(c.rows("train"), "labels", np.int64)
    batches = make_loader(CacheBatches(c, "train", [], 8, seed=0, **kw))
    return float(np.mean([len(set(labels[b["row"].numpy()].tolist())) for b in batches]))


def test_the_capture_warns_of_rows_in_runs_of_one_label(by_class):
    caches, logs, _ = by_class
    warned = [line for line in logs["grouped"] if "long runs of one label" in line]
    assert len(warned) == 1 and "data.shuffle_seed is not set" in warned[0] and "4 runs" in warned[0]
    assert not [line for line in logs["shuffled"] if "long runs" in line]
    labels = row_values(Cache(caches["grouped"]).rows("train"), "labels", np.int64)
    assert (np.diff(labels) != 0).sum() == 3  # the cache holds the rows as they came: class after class


def test_batches_of_a_grouped_cache_mix_the_window(by_class):
    caches, _, _ = by_class
    assert labels_per_batch(caches["grouped"], scheme="per-shard") < 1.6  # one shard: about one label per batch
    assert labels_per_batch(caches["grouped"]) > 2.8  # a window of shards: a sample of every class
    assert labels_per_batch(caches["shuffled"]) > 2.8


@pytest.mark.slow
def test_a_cache_written_class_by_class_trains_as_well_as_shuffled(by_class, tmp_path):
    caches, _, _ = by_class
    got = {name: np.mean([accuracy(caches[name], tmp_path / f"{name}-{s}", s) for s in (0, 1)])
           for name in ("grouped", "shuffled")}
    assert got["shuffled"] > 0.9
    assert got["grouped"] >= got["shuffled"] - 0.1, got  # within the seeds' noise
    # the order before: batches from one shard at a time, one class at a time (measured: 0.26 for both seeds)
    one_shard = np.mean([accuracy(caches["grouped"], tmp_path / f"one-{s}", s, shuffle_window=1) for s in (0, 1)])
    assert one_shard < got["shuffled"] - 0.3, (one_shard, got)


def test_the_dry_run_warns_of_files_read_in_order(llama_dir, corpus, tmp_path):
    lines = corpus.read_text().splitlines()
    files = []
    for i in range(2):  # two sources, each a file of its own documents
        files.append(tmp_path / f"source-{i}.jsonl")
        files[-1].write_text("\n".join(lines[i::2]) + "\n")
    cfg = settings(llama_dir, corpus, tmp_path / "c", data={"data_files": [str(f) for f in files]},
                   capture={"rows_per_shard": 2, "rows_per_chunk": 2})
    res = dry_run(TeacherCacheConfig.model_validate(cfg), log=lambda m: None)
    assert res.grouped is not None and "long runs of one source file (2 files read in order" in res.grouped
    assert res.lines[-1] == res.grouped
    cfg["data"]["shuffle_seed"] = 0
    assert dry_run(TeacherCacheConfig.model_validate(cfg), log=lambda m: None).grouped is None


def _per_shard_reference(sizes, bs, nw, seed, epoch, drop_last):
    """The per-shard order as it was before shuffle windows (kept here as the reference): each worker's shards
    one after the other, each permuted by a generator of its own, cut into batches, taken round robin."""
    order = np.random.default_rng([seed, epoch]).permutation(len(sizes))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    per_worker = []
    for w in range(max(nw, 1)):
        rows = [np.random.default_rng([seed, epoch, 2, int(s)]).permutation(np.arange(starts[s], starts[s + 1]))
                for s in order[w::max(nw, 1)]]
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        cut = [rows[a:a + bs] for a in range(0, len(rows), bs)]
        per_worker.append([c for c in cut if len(c) == bs or not drop_last])
    out = []
    for j in range(max(len(b) for b in per_worker)):
        out += [b[j] for b in per_worker if j < len(b)]
    return out


@pytest.mark.parametrize("workers,drop_last", [(0, False), (2, False), (3, True)])
def test_a_window_of_one_is_the_per_shard_order_and_wider_windows_cover_each_row_once(workers, drop_last):
    from pipeline.train.batch_order import EpochPlan

    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 9, size=23)
    ranges = np.stack([np.concatenate([[0], np.cumsum(sizes)[:-1]]), np.cumsum(sizes)], 1)
    one = EpochPlan(5, workers, 7, 2, True, drop_last, ranges, window=1)
    want = _per_shard_reference(sizes, 5, workers, 7, 2, drop_last)
    assert len(one) == len(want) and all(np.array_equal(one[k].rows, w) for k, w in enumerate(want))
    for window in (2, 3, 16):
        plan = EpochPlan(5, workers, 7, 2, True, drop_last, ranges, window=window)
        rows = np.concatenate([plan[k].rows for k in range(len(plan))])
        assert len(np.unique(rows)) == len(rows)  # no row twice
        assert drop_last or sorted(rows.tolist()) == list(range(int(sizes.sum())))  # every row once
        again = EpochPlan(5, workers, 7, 2, True, drop_last, ranges, window=window)
        assert all(np.array_equal(plan[k].rows, again[k].rows) for k in range(len(plan)))  # deterministic
        for w in range(max(workers, 1)):  # a worker's batches from k on are the plan's
            got = list(plan.worker_batches(w, 3))
            assert all(np.array_equal(b.rows, plan[b.index].rows) for b in got)
    # a subset by key, with a window: each kept row once
    subsets = [np.arange(a, b)[::2] for a, b in ranges if len(np.arange(a, b)[::2])]
    plan = EpochPlan(4, workers, 0, 0, True, False, subsets=subsets, window=3)
    rows = np.concatenate([plan[k].rows for k in range(len(plan))])
    assert sorted(rows.tolist()) == sorted(np.concatenate(subsets).tolist())


def test_a_window_the_host_cannot_hold_is_refused(by_class, tmp_path, monkeypatch):
    from pipeline import distributed
    from pipeline.errors import StudentError

    caches, _, _ = by_class
    said = []
    monkeypatch.setattr(distributed, "host_memory_available", lambda: 2**14)  # a host with 16 KiB free
    monkeypatch.setattr("pipeline.train.memory_plan.device_capacity", lambda device: None)  # the students' own plan
    with pytest.raises(StudentError, match=r"shuffle_window = 16 holds about .* GiB .* more than half .* lower shuffle_window"):
        train_students(StudentRunConfig.model_validate({
            "cache": str(caches["grouped"]), "output_dir": str(tmp_path / "s"), "device": "cpu", "max_steps": 1,
            "students": [{"name": "s", "arch": {"num_layers": 1, "hidden_size": 16, "num_heads": 2},
                          "losses": {"ce": 1.0}}]}), log=said.append, progress=False)
    assert any(line.startswith("reader: shuffle window of 16 shards, about") for line in said)
