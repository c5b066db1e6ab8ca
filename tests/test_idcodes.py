"""Frequency codes for the top-K ids (format 4.0): what is stored, what readers get, and where the id order goes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import capture, settings

from pipeline.errors import CacheError
from pipeline.format import Cache, idcodes, pull, verify


def test_the_order_puts_frequent_tokens_first_and_round_trips():
    order = idcodes.fit_order([np.array([5, 5, 5, 2, 2, 9]), np.array([2, 7])], vocab=10)
    assert order.tolist()[:4] == [2, 5, 7, 9] and sorted(order.tolist()) == list(range(10))  # ties, unseen: by id
    codes = idcodes.codes_of(order, np.uint16)
    ids = np.random.default_rng(0).integers(0, 10, (3, 4, 5)).astype(np.uint16)
    assert (order[codes[ids]] == ids).all() and codes[2] == 0
    data = idcodes.order_bytes(order)
    assert (idcodes.read_order(data, 10, "x") == order).all()
    with pytest.raises(CacheError, match="does not hold each of the 11 ids once"):
        idcodes.read_order(data, 11, "x")
    bad = order.copy()
    bad[0] = bad[1]
    with pytest.raises(CacheError, match="x: the id order does not hold each of the 10 ids once"):
        idcodes.read_order(idcodes.order_bytes(bad), 10, "x")


@pytest.fixture(scope="module")
def two_caches(llama_dir, corpus, tmp_path_factory):
    """The same capture with frequency codes (the default) and with plain ids."""
    root = tmp_path_factory.mktemp("idcodes")
    coded = capture(settings(llama_dir, corpus, root / "coded"))
    plain = capture(settings(llama_dir, corpus, root / "plain", capture={"topk_ids_encoding": "ids"}))
    return root, coded.manifest, plain.manifest


def test_codes_are_stored_and_readers_get_the_ids(two_caches):
    import zarr

    root, coded, plain = two_caches
    assert coded.fields["topk_ids"].encoding == "frequency-codes" and plain.fields["topk_ids"].encoding is None
    assert coded.capture.topk_ids_encoding == "frequency-codes" and plain.capture.topk_ids_encoding == "ids"
    a, b = Cache(root / "coded"), Cache(root / "plain")
    for split in coded.splits:
        ids = np.asarray(b.array(split, "topk_ids")[:])
        np.testing.assert_array_equal(np.asarray(a.array(split, "topk_ids")[:]), ids)
        rows = np.asarray(a.rows(split, ["input_ids"]).column("input_ids").to_pylist())
        lengths = np.asarray(a.rows(split, ["length"]).column("length"))
        real = rows[np.arange(rows.shape[1])[None, :] < lengths[:, None]]
        order = idcodes.fit_order([real], coded.teacher.vocab_size)  # from the split's own tokens
        stored = zarr.open_array(str(root / "coded" / split / "topk_ids"), mode="r")[:]
        np.testing.assert_array_equal(stored, idcodes.codes_of(order, stored.dtype)[ids])
        assert not np.array_equal(stored, ids)
        assert f"{split}/topk_ids/id_order.parquet" in coded.metadata_files
        sel = np.array([3, 0, 1])  # the reader's other way in: rows picked out of order
        np.testing.assert_array_equal(a.array(split, "topk_ids").get_orthogonal_selection((sel,)), ids[sel])
    assert verify(root / "coded") == []


def test_a_damaged_order_is_named_by_verify(two_caches, tmp_path):
    import shutil

    root, coded, _ = two_caches
    copy = tmp_path / "c"
    shutil.copytree(root / "coded", copy)
    rel = "train/topk_ids/id_order.parquet"
    order = idcodes.read_order((copy / rel).read_bytes(), coded.teacher.vocab_size, rel)
    order[[0, 1]] = order[[1, 0]]  # still every id once: only the checksum can tell
    (copy / rel).write_bytes(idcodes.order_bytes(order))
    assert any(f"{rel} checksum mismatch" in p for p in verify(copy))
    (copy / rel).unlink()
    with pytest.raises(CacheError, match="the id order of topk_ids is missing"):
        Cache(copy).array("train", "topk_ids")


def test_a_pull_of_the_ids_brings_the_order_and_one_without_them_does_not(two_caches, tmp_path):
    root, coded, _ = two_caches
    pull(str(root / "coded"), tmp_path / "ids", fields=["topk_ids", "topk_logprobs"], log=lambda m: None)
    pull(str(root / "coded"), tmp_path / "lse", fields=["logsumexp"], log=lambda m: None)
    assert (tmp_path / "ids" / "train" / "topk_ids" / "id_order.parquet").is_file()
    assert not (tmp_path / "lse" / "train" / "topk_ids").exists()
    assert verify(tmp_path / "ids") == [] and verify(tmp_path / "lse") == []
    np.testing.assert_array_equal(np.asarray(Cache(tmp_path / "ids").array("validation", "topk_ids")[:]),
                                  np.asarray(Cache(root / "coded").array("validation", "topk_ids")[:]))


def test_a_rerun_with_codes_finds_a_cache_of_plain_ids_finished(two_caches, llama_dir, corpus):
    from pipeline.capture.run import run_capture
    from pipeline.config import TeacherCacheConfig

    root, _, plain = two_caches
    res = run_capture(TeacherCacheConfig.model_validate(settings(llama_dir, corpus, root / "plain")),
                      log=lambda m: None, progress=False)
    assert res.computed_shards == 0 and res.manifest.digest == plain.digest
