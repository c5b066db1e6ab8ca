"""Caches of any size: streamed preparation (the same rows as the in-memory preparation it replaced, row groups
aligned with shards, an on-disk key set), a reader that holds a few row groups and chunks, and a batch plan
computed from one integer per shard."""

from __future__ import annotations

import gc
import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import capture, settings, write_toml
from transformers import AutoTokenizer

from pipeline.capture.documents import RowConvention, load_documents, token_documents
from pipeline.capture.rowfiles import KeyStore, group_rows
from pipeline.capture.rows import content_key, is_validation, prepare, tokenizer_pad_id
from pipeline.config import DataConfig
from pipeline.format import Cache
from pipeline.train.batch_order import EpochPlan, batch_plan
from pipeline.train.split_reader import SplitReader
from pipeline.train.dataset import CacheBatches, make_loader
from pipeline.train.mixing import SourceMix, upgrade_state


def data_cfg(path, **kw) -> DataConfig:
    base = {"source": "json", "data_files": [str(path)], "seq_len": 32, "max_tokens": 6000}
    return DataConfig.model_validate({**base, **kw})


# ---------------------------------------------------------------------------------------------- preparation


def reference_splits(cfg: DataConfig, tok) -> dict[str, dict]:
    """The in-memory preparation this project used before it streamed (kept here as the reference): every row in
    Python lists, packed by the same rules, deduplicated by key, split by key, the smallest key to validation
    when none falls there."""
    conv = RowConvention.resolve(cfg, tok)
    ds, _ = load_documents(cfg)
    L, bos, pad = cfg.seq_len, conv.bos_token_id, tokenizer_pad_id(tok)
    want_mask, want_pos = cfg.loss_mask == "assistant", cfg.document_mask
    rows: list[tuple] = []
    toks: list[int] = []
    flags: list[int] = []
    starts: list[bool] = []
    budget = cfg.max_tokens if cfg.max_tokens is not None else float("inf")
    read = 0

    def add(t, f, s, nxt):
        n = len(t)
        ids = t + [pad] * (L - n)
        mask = (list(f[1:n]) + [nxt] + [0] * (L - n)) if want_mask else None
        pos, p = [], 0
        for i in range(n):
            p = 0 if (i == 0 or s[i]) else p + 1
            pos.append(p)
        rows.append((ids, n, mask, (pos + list(range(L - n))) if want_pos else None))

    def cut(final):
        while toks:
            insert = bos is not None and not starts[0]
            take = L - insert
            if len(toks) <= take and not final:
                return
            nxt = flags[take] if len(toks) > take else 0
            add([bos] * insert + toks[:take], [0] * insert + flags[:take], [True] * insert + starts[:take], nxt)
            del toks[:take], flags[:take], starts[:take]

    for ids, f, _ in token_documents(ds, tok, cfg, conv):
        if read >= budget:
            break
        ids = ids.tolist()
        f = f.tolist() if f is not None else [1] * len(ids)
        if cfg.packing:
            take = int(min(len(ids), budget - read))
            toks += ids[:take]
            flags += f[:take]
            starts += [True] + [False] * (take - 1)
            read += take
            cut(False)
        else:
            nxt = f[L] if len(ids) > L else 0
            ids, f = ids[:L], f[:L]
            take = int(min(len(ids), budget - read))
            if take < len(ids):
                nxt = f[take]
            read += take
            add(ids[:take], f[:take], [True] + [False] * (take - 1), nxt)
    if cfg.packing:
        cut(True)
    keyed, seen = [], set()
    for r in rows:
        k = content_key(np.asarray(r[0][: r[1]]))
        if k not in seen:
            seen.add(k)
            keyed.append((k, r))
    val = [x for x in keyed if is_validation(x[0], cfg.validation_fraction)]
    if not val and len(keyed) > 1:
        val = [min(keyed, key=lambda x: x[0])]
    vkeys = {k for k, _ in val}
    out = {"train": [x for x in keyed if x[0] not in vkeys], "validation": val}
    return {s: {"keys": [k for k, _ in xs], "input_ids": np.asarray([r[0] for _, r in xs]),
                "lengths": np.asarray([r[1] for _, r in xs]),
                "loss_mask": np.asarray([r[2] for _, r in xs]) if want_mask else None,
                "position_ids": np.asarray([r[3] for _, r in xs]) if want_pos else None}
            for s, xs in out.items() if xs}


CASES = {
    "text": ("tokenizer_dir", "corpus", {}),
    "text-bos": ("bos_tokenizer_dir", "corpus", {}),
    "one-document-per-row": ("bos_tokenizer_dir", "corpus", {"packing": False}),
    "document-mask": ("bos_tokenizer_dir", "corpus", {"document_mask": True}),
    "chat-assistant-mask": ("chat_tokenizer_dir", "conversations", {"format": "messages", "loss_mask": "assistant",
                                                                     "max_tokens": None}),
    "prompt-response-doc-mask": ("chat_tokenizer_dir", "conversations", {
        "format": "prompt_response", "loss_mask": "assistant", "document_mask": True, "max_tokens": None}),
    "tiny-corpus": ("tokenizer_dir", "corpus", {"max_tokens": 100, "validation_fraction": 0.01}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_preparation_gives_the_rows_of_the_in_memory_one(case, request, tmp_path):
    tok_fixture, data_fixture, kw = CASES[case]
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(tok_fixture))
    cfg = data_cfg(request.getfixturevalue(data_fixture), **kw)
    ref = reference_splits(cfg, tok)
    got = prepare(cfg, tok, shard_rows=8, scratch=tmp_path / "scratch")
    assert list(got.splits) == list(ref)
    for split, want in ref.items():
        f = got.splits[split]
        rows = f.read(0, f.rows)
        assert rows.keys == want["keys"] == f.keys
        np.testing.assert_array_equal(rows.input_ids, want["input_ids"])
        np.testing.assert_array_equal(rows.lengths, want["lengths"])
        for name in ("loss_mask", "position_ids"):
            if want[name] is None:
                assert getattr(rows, name) is None
            else:
                np.testing.assert_array_equal(getattr(rows, name), want[name])
        assert f.tokens == int(want["lengths"].sum()) and f.shard_tokens.sum() == f.tokens
        meta = pq.ParquetFile(f.path).metadata  # row groups of whole shards
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        assert all(n == group_rows(8) for n in sizes[:-1]) and group_rows(8) % 8 == 0
        assert f.keys_sha256 == hashlib.sha256("".join(want["keys"]).encode()).hexdigest()


def test_preparation_holds_a_block_not_the_corpus(tokenizer_dir, corpus, tmp_path, monkeypatch):
    """Rows leave memory as they are made: the row writer never holds more than a row group's worth pending,
    and what `prepare` returns holds no row arrays (only file paths and per-shard counts)."""
    from pipeline.capture import rowfiles

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    monkeypatch.setattr(rowfiles, "ROW_GROUP_ROWS", 16)
    high = [0]
    real_add = rowfiles.RowFileWriter.add

    def watched(self, rows):
        real_add(self, rows)
        high[0] = max(high[0], self._pending_rows)

    monkeypatch.setattr(rowfiles.RowFileWriter, "add", watched)
    p = prepare(data_cfg(corpus, max_tokens=None, max_documents=400), tok, shard_rows=4, scratch=tmp_path / "s")
    assert p.splits["train"].rows > 100 and high[0] < 16
    assert not any(isinstance(v, np.ndarray) and v.size > 1000 for f in p.splits.values() for v in vars(f).values())


def test_key_store_deduplicates_on_disk(tmp_path):
    s = KeyStore(tmp_path / "k.sqlite")
    keys = [hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest() for i in range(2000)]
    assert all(s.add(k, "main") for k in keys) and not any(s.add(k, "main") for k in keys[::7])
    assert s.add(keys[0], "test") and s.has(keys[0], ("test",)) and not s.has(keys[1], ("test", "validation"))
    assert s.load([keys[:10], keys[10:20]], "cache") == 20 and s.has(keys[15], ("cache",))


def test_dry_run_prepares_and_estimates_without_weights_or_a_cache(llama_dir, corpus, tmp_path, monkeypatch):
    from pipeline import models
    from pipeline.capture.dryrun import dry_run
    from pipeline.config import TeacherCacheConfig
    from pipeline.errors import CaptureError

    def no_weights(*a, **k):
        raise AssertionError("a dry run loads no teacher weights")

    full = capture(settings(llama_dir, corpus, tmp_path / "real")).manifest
    monkeypatch.setattr(models, "load_model", no_weights)
    out = tmp_path / "out" / "cache"
    cfg = TeacherCacheConfig.model_validate(settings(llama_dir, corpus, out))
    lines = []
    res = dry_run(cfg, log=lines.append)
    assert not (tmp_path / "out").exists()  # nothing at the output
    assert res.splits == {s.name: {"rows": s.rows, "tokens": s.tokens, "shards": s.shards}
                          for s in full.splits.values()}
    assert res.estimate > full.stats.bytes_on_disk and any("GiB in all" in x for x in lines)
    from pipeline.capture import dryrun

    monkeypatch.setattr(dryrun.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(CaptureError, match="not enough disk"):
        dry_run(cfg, log=lambda m: None)


def test_dry_run_command_line(llama_dir, corpus, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cfg = write_toml(tmp_path / "c.toml", settings(llama_dir, corpus, tmp_path / "c"))
    res = subprocess.run([sys.executable, "-m", "stages.cli", "teacher-cache", "-c", str(cfg), "--dry-run"],
                         capture_output=True, text=True, cwd=repo,
                         env={**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    assert "dry run" in res.stderr and "splits: train" in res.stderr and not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------- reading


@pytest.fixture(scope="module")
def cache_dir(llama_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / "cache"
    capture(settings(llama_dir, corpus, out, data={"max_tokens": 4000, "validation_fraction": 0.15},
                     capture={"top_k": 16, "rows_per_shard": 8, "rows_per_chunk": 4}))
    return out


def test_epoch_plan_covers_every_row_once_and_answers_each_batch(tmp_path):
    ranges = np.asarray([(s, min(s + 8, 61)) for s in range(0, 61, 8)])
    for workers in (0, 1, 3):
        for drop_last in (False, True):
            plan = EpochPlan(5, workers, seed=2, epoch=1, shuffle=True, drop_last=drop_last, ranges=ranges)
            batches = [plan[k] for k in range(len(plan))]
            rows = np.concatenate([b.rows for b in batches])
            assert len(set(rows.tolist())) == len(rows)
            if not drop_last:
                assert sorted(rows.tolist()) == list(range(61))
            per_worker = [list(plan.worker_batches(w)) for w in range(max(workers, 1))]
            assert sorted((b.index for bs in per_worker for b in bs)) == list(range(len(plan)))
            for bs in per_worker:
                for b in bs:
                    assert b.rows.tolist() == plan[b.index].rows.tolist() and plan[b.index].worker == b.worker
            later = list(plan.worker_batches(per_worker[0][-1].worker, start=per_worker[0][-1].index))
            assert [b.index for b in later] == [per_worker[0][-1].index]
    a = EpochPlan(4, 2, 1, 0, True, False, ranges=ranges)
    assert [a[k].rows.tolist() for k in range(len(a))] == [EpochPlan(4, 2, 1, 0, True, False, ranges=ranges)[k]
                                                           .rows.tolist() for k in range(len(a))]
    assert [a[k].rows.tolist() for k in range(len(a))] != [EpochPlan(4, 2, 1, 1, True, False, ranges=ranges)[k]
                                                           .rows.tolist() for k in range(len(a))]


def test_a_checkpoint_of_the_earlier_row_order_resumes_in_it(cache_dir):
    """A stream state saved before per-shard row orders (no "rows" key) keeps that run's batch sequence."""
    ds = CacheBatches(cache_dir, "train", ["logsumexp"], 4, seed=3)
    old_state = {"draws": 0, "tasks": {"a": {"epoch": 0, "batch": 0}}, "scheme": "block"}
    SourceMix({"a": (ds, 1.0)}, seed=3, state=upgrade_state(old_state))  # as a checkpoint's state is read
    shards = [np.arange(a, b) for a, b in Cache(cache_dir).shard_ranges("train")]
    want = [b.rows.tolist() for b in batch_plan(shards, 4, 0, 3, 0, True)]
    assert [b["row"].tolist() for b in make_loader(ds)] == want
    fresh = CacheBatches(cache_dir, "train", ["logsumexp"], 4, seed=3)
    SourceMix({"a": (fresh, 1.0)}, seed=3)
    assert [b["row"].tolist() for b in make_loader(fresh)] != want


def test_reader_reads_only_the_chunks_of_the_rows_asked(cache_dir):
    c = Cache(cache_dir)
    reader = SplitReader(c, "train")
    m = c.manifest
    full = c.array("train", "topk_logprobs")[:]
    rows = np.asarray([3, 1, m.capture.rows_per_shard + 2])
    got = reader.dense(rows, ["topk_logprobs"])["topk_logprobs"]
    np.testing.assert_array_equal(got, full[rows])
    assert reader.chunks_read == 2  # rows 1 and 3 share a chunk; the third lies in the next shard
    again = reader.dense(np.asarray([2, 0]), ["topk_logprobs"])["topk_logprobs"]
    np.testing.assert_array_equal(again, full[[2, 0]])
    assert reader.chunks_read == 2  # held, not read again
    cols = reader.columns(rows, {"input_ids": np.int64, "length": np.int64})
    table = c.rows("train")
    np.testing.assert_array_equal(cols["length"], table.column("length").to_numpy()[rows])


def test_a_reader_worker_holds_a_few_chunks_not_the_split(cache_dir):
    """Whatever the cache's size, iterating an epoch keeps at most its shuffle window (and one shard) of chunks and
    of rows: here a window of two shards."""
    ds = CacheBatches(cache_dir, "train", ["topk_ids", "topk_logprobs"], 4, seed=0, scheme="window-2")
    seen = []
    real = SplitReader.dense

    def watched(self, rows, fields):
        out = real(self, rows, fields)
        seen.append((len(self._chunks), len(self._shards)))
        return out

    SplitReader.dense = watched
    try:
        n = sum(len(b["row"]) for b in make_loader(ds))
    finally:
        SplitReader.dense = real
    m = Cache(cache_dir).manifest
    per_shard = m.capture.rows_per_shard // m.capture.rows_per_chunk
    assert n == m.splits["train"].rows
    assert m.splits["train"].shards > 3  # more than the window holds
    assert max(c for c, _ in seen) <= 3 * per_shard * 2 and max(g for _, g in seen) <= 3
    gc.collect()


def test_manifest_size_does_not_grow_with_shards(llama_dir, corpus, tmp_path):
    small = capture(settings(llama_dir, corpus, tmp_path / "a", capture={"rows_per_shard": 16, "rows_per_chunk": 8}))
    many = capture(settings(llama_dir, corpus, tmp_path / "b", capture={"rows_per_shard": 2, "rows_per_chunk": 2}))
    assert many.manifest.n_shards >= 6 * small.manifest.n_shards
    a, b = (len((tmp_path / x / "manifest.json").read_bytes()) for x in "ab")
    assert abs(a - b) < 600, (a, b)  # the same keys; only numbers differ
    assert "shards" not in json.loads((tmp_path / "b" / "manifest.json").read_text())


def test_a_damaged_shard_index_is_named_by_verify_and_refused_by_readers(llama_dir, corpus, tmp_path):
    import shutil

    from pipeline.errors import CacheError
    from pipeline.format import push, verify

    root = tmp_path / "c"
    capture(settings(llama_dir, corpus, root, capture={"rows_per_shard": 4, "rows_per_chunk": 2}))
    stray = root / "train" / "topk_ids" / "c" / "999" / "0" / "0"  # a shard the part does not have
    stray.parent.mkdir(parents=True)
    shutil.copy(next(p for p in (root / "train" / "topk_ids" / "c").rglob("*") if p.is_file()), stray)
    problems = verify(root)
    assert len(problems) == 1 and "train/topk_ids/c/999/0/0: a file the manifest does not list" in problems[0]
    stray.unlink()
    index = root / "train" / "shards.parquet"
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index.write_bytes(bytes(data))
    problems = verify(root)
    assert any("train/shards.parquet checksum mismatch" in p for p in problems)
    with pytest.raises(CacheError, match="shard index is missing or fails its checksum"):
        Cache(root).file_digest(str(stray.relative_to(root)).replace("999", "0"))  # what remote reads and pull use
    with pytest.raises(CacheError, match="does not verify"):
        push(str(root), str(tmp_path / "published"), log=lambda m: None)
    assert verify(root, splits=["validation"]) == []  # the other split's index and files are intact


def test_one_shard_index_answers_lookups_from_many_threads(tmp_path, monkeypatch):
    """zarr reads a remote cache's chunks from several threads, each looking its file up in the same index."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.format import index as shard_index

    monkeypatch.setattr(shard_index, "GROUP_ROWS", 4)  # many row groups: lookups move between them
    writer = shard_index.IndexWriter(tmp_path / "shards.parquet")
    for n in range(64):
        writer.add("train", "train", n, 8 * n, 8 * n + 8,
                   {f: (f"train/{f}/c/{n}/0", n + len(f), f"{n:064x}") for f in ("a", "b")})
    writer.close()
    index = shard_index.ShardIndex("train", 0, tmp_path / "shards.parquet")
    asked = [f"train/{f}/c/{n}/0" for _ in range(20) for n in np.random.default_rng(0).permutation(64) for f in "ab"]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(index.lookup, asked))
    assert [(d.bytes, d.sha256) for d in got] == [(int(p.split("/")[3]) + 1, f"{int(p.split('/')[3]):064x}")
                                                  for p in asked]


@pytest.mark.parametrize("data,kw,columns", [("corpus", {}, ["text"]), ("corpus", {"max_documents": 300}, ["text"]),
                                              ("conversations", {"format": "messages"}, ["messages", "prompt"])])
def test_documents_are_read_from_the_arrow_files_in_dataset_order(request, data, kw, columns):
    """Unshuffled documents come from the dataset's Arrow files by plain reads (no memory map held), in the
    order and with the values slicing the dataset gives."""
    from pipeline.capture.documents import DOC_BATCH, document_batches

    cfg = data_cfg(request.getfixturevalue(data), **kw)
    ds, _ = load_documents(cfg)
    assert ds.cache_files  # the path under test, not the fallback
    got = list(document_batches(ds, cfg, columns))
    n = len(ds) if cfg.max_documents is None else min(len(ds), cfg.max_documents)
    assert [s for s, _ in got] == list(range(0, n, DOC_BATCH)) and (data == "conversations" or len(got) > 1)
    for start, batch in got:
        want = ds[start: min(start + DOC_BATCH, n)]
        assert all(batch[c] == want[c] for c in columns)


def test_a_truncated_rows_file_is_a_clear_error(llama_dir, corpus, tmp_path):
    from pipeline.errors import CacheError
    from pipeline.format import verify

    root = tmp_path / "c"
    capture(settings(llama_dir, corpus, root, capture={"rows_per_shard": 4, "rows_per_chunk": 2}))
    rows = root / "train" / "rows.parquet"
    rows.write_bytes(rows.read_bytes()[: rows.stat().st_size // 2])  # the last row groups and the footer gone
    with pytest.raises(CacheError, match=r"train/rows.parquet cannot be read .*distill verify"):
        next(iter(make_loader(CacheBatches(root, "train", ["topk_ids"], 2))))
    assert any("train/rows.parquet size mismatch" in p for p in verify(root))


def test_whole_shard_reads_stop_at_a_short_last_shard(llama_dir, corpus, tmp_path):
    """A split whose last shard holds fewer chunks than the others reads every batch of every epoch."""
    root = tmp_path / "c"
    capture(settings(llama_dir, corpus, root, data={"max_tokens": 1400}, capture={"rows_per_shard": 8,
                                                                                   "rows_per_chunk": 2}))
    c = Cache(root)
    assert 0 < c.manifest.splits["train"].rows % 8 <= 6  # a short last shard, with chunk slots it does not fill
    full = c.array("train", "logsumexp")[:]
    for batch_size in (1, 3):
        ds = CacheBatches(root, "train", ["logsumexp"], batch_size, seed=5)
        for epoch in (0, 1):
            ds.epoch = epoch
            seen = []
            for b in make_loader(ds):
                np.testing.assert_array_equal(b["logsumexp"].numpy(), full[b["row"].numpy()])
                seen += b["row"].tolist()
            assert sorted(seen) == list(range(len(full)))
