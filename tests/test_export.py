"""`distill export --format axolotl` and `Cache.to_dataset`: what `datasets` loads equals the cache, shifted to the
position of the token each target predicts (axolotl's convention), masks included; nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.errors import DistillError
from pipeline.format import Cache, row_column
from pipeline.format.export import export


def test_the_axolotl_layout_loads_with_datasets_and_equals_the_cache(assistant_cache, tmp_path):
    import datasets

    c = Cache(str(assistant_cache))
    export(c, tmp_path / "x", log=lambda m: None)
    record = json.loads((tmp_path / "x" / "distill_export.json").read_text())
    assert record["cache_digest"] == c.manifest.digest and record["rows"]["train"] == c.manifest.splits["train"].rows
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "x" / "train" / "*.parquet"), split="train")
    t = c.rows("train")
    ids, mask, lengths = row_column(t, "input_ids", np.int64), row_column(t, "loss_mask", bool), \
        t.column("length").to_numpy()
    top_ids, top_lp = c.array("train", "topk_ids")[:], c.array("train", "topk_logprobs")[:].astype(np.float32)
    lse, target = c.array("train", "logsumexp")[:], c.array("train", "target_logprob")[:]
    assert len(ds) == len(ids) and ds["key"] == t.column("key").to_pylist()
    K, checked = c.manifest.capture.top_k, 0
    for i, row in enumerate(ds):
        n = lengths[i]
        assert row["input_ids"] == ids[i, :n].tolist() and row["attention_mask"] == [1] * n
        want_labels = [-100] + [int(x) if m else -100 for x, m in zip(ids[i, 1:n], mask[i, : n - 1])]
        assert row["labels"] == want_labels
        assert row["target_token_ids"][0] == list(range(K)) and row["target_mask"][0] == [0] * K
        np.testing.assert_array_equal(np.asarray(row["target_token_ids"][1:]), top_ids[i, : n - 1])
        np.testing.assert_array_equal(np.asarray(row["target_logprobs"][1:], np.float32), top_lp[i, : n - 1])
        np.testing.assert_array_equal(np.asarray(row["target_logsumexp"][1:], np.float32), lse[i, : n - 1])
        assert [m[0] for m in row["target_mask"]] == [int(x != -100) for x in want_labels]
        for t_ in range(1, n):  # the target at t is the teacher's distribution of token t itself
            hit = np.flatnonzero(np.asarray(row["target_token_ids"][t_]) == ids[i, t_])
            if len(hit):
                assert row["target_logprobs"][t_][hit[0]] == pytest.approx(target[i, t_ - 1], abs=2e-3)
                checked += 1
    assert checked > 20  # (top-8 of a random-init teacher: the true token is in it at a few percent of positions)


def test_to_dataset_gives_rows_with_their_fields(assistant_cache):
    c = Cache(str(assistant_cache))
    ds = c.to_dataset("train", ["topk_ids", "logsumexp"])
    t = c.rows("train")
    lengths = t.column("length").to_numpy()
    assert len(ds) == len(lengths) and set(ds.column_names) == {"input_ids", "key", "loss_mask", "topk_ids",
                                                               "logsumexp"}
    row = ds[3]
    n = lengths[3]
    assert len(row["input_ids"]) == n == len(row["topk_ids"])
    np.testing.assert_array_equal(np.asarray(row["topk_ids"]), c.array("train", "topk_ids")[3, :n])
    with pytest.raises(DistillError, match="no dense field"):
        c.to_dataset("train", ["hidden_states"])


def test_export_refuses_a_path_that_exists_and_leaves_nothing_half_written(assistant_cache, tmp_path, monkeypatch):
    from pipeline.format import export as module

    (tmp_path / "taken").mkdir()
    with pytest.raises(DistillError, match="exists"):
        export(Cache(str(assistant_cache)), tmp_path / "taken", log=lambda m: None)

    def broken(cache, split):
        yield from []
        raise OSError("disk full")
    monkeypatch.setattr(module, "axolotl_rows", broken)
    with pytest.raises(OSError):
        export(Cache(str(assistant_cache)), tmp_path / "half", log=lambda m: None)
    assert list(tmp_path.iterdir()) == [tmp_path / "taken"]


@pytest.mark.slow
def test_export_on_the_command_line(assistant_cache, tmp_path):
    distill = str(__import__("pathlib").Path(sys.executable).with_name("distill"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([distill, "export", str(assistant_cache), str(tmp_path / "x"), "--split", "validation"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["distill_export.json", "validation"]
    res = subprocess.run([distill, "export", str(assistant_cache), str(tmp_path / "x")], capture_output=True, text=True,
                         env=env)
    assert res.returncode == 2 and "exists" in res.stderr


def test_document_boundaries_travel_through_export_import_and_the_dataset_views(llama_dir, corpus, tmp_path):
    """A cache whose teacher kept packed documents apart (document_mask): the export carries the position ids,
    the import reads them back (document_mask recorded, the same ids stored), and `to_dataset` and `CacheDataset`
    give them to a user's loop, so a student after the round trip attends as the teacher did."""
    from conftest import capture, settings
    from pipeline.capture.importer import ImportSettings, run_import
    from pipeline.train.hf import CacheDataset, collate

    capture(settings(llama_dir, corpus, tmp_path / "c", data={"document_mask": True, "max_tokens": 1500}))
    c = Cache(str(tmp_path / "c"))
    assert c.manifest.preparation.document_mask
    export(c, tmp_path / "x", log=lambda m: None)
    assert json.loads((tmp_path / "x" / "distill_export.json").read_text())["document_mask"] is True
    t = c.rows("train")
    pos, lengths = row_column(t, "position_ids", np.int64), t.column("length").to_numpy()
    assert (pos[:, 1:] == 0).any()  # rows that hold several documents
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "x" / "train" / "*.parquet"), split="train")
    for i, row in enumerate(ds):
        assert row["position_ids"] == pos[i, : lengths[i]].tolist()
    # the random teacher does not predict the text: the alignment check has nothing to go on (tested in test_import)
    back = run_import(ImportSettings(source=str(tmp_path / "x"), out=str(tmp_path / "back"), teacher=str(llama_dir),
                                     check_alignment=False), log=lambda m: None)
    m = back.manifest
    assert m.preparation.document_mask is True and "position_ids" in m.fields
    b = back.rows("train")
    assert b.column("key").to_pylist() == t.column("key").to_pylist()
    np.testing.assert_array_equal(row_column(b, "position_ids", np.int64), pos)  # the padding a segment of its own
    view = c.to_dataset("train", ["logsumexp"])
    assert [r["position_ids"] for r in view] == [pos[i, :n].tolist() for i, n in enumerate(lengths)]
    rows = CacheDataset(back, "train", {"kd_forward": 1.0})
    np.testing.assert_array_equal(collate([rows[0], rows[1]])["position_ids"].numpy(), pos[:2])


def test_position_ids_that_do_not_count_up_are_refused(llama_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.capture.importer import ImportSettings, run_import

    K = 4
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    pos = [[0, 1, 0, 1, 3], [0, 1, 2]]
    table = pa.table({"input_ids": rows, "position_ids": pos,
                      "target_token_ids": [[list(range(K))] * len(r) for r in rows],
                      "target_logprobs": [[[float("-inf")] * K] + [[-2.0] * K] * (len(r) - 1) for r in rows]})
    pq.write_table(table, tmp_path / "p.parquet")
    with pytest.raises(DistillError, match=r"row 0 position 4: position id 3"):
        run_import(ImportSettings(source=str(tmp_path / "p.parquet"), out=str(tmp_path / "c"), teacher=str(llama_dir),
                                  check_alignment=False), log=lambda m: None)
