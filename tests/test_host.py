"""The capture's host side: writer threads (several shards in flight, the same bytes, bounded memory, errors
surfaced) and the hidden-state codecs (shuffle + zstd by default, the older zstd layout still finished and
grown in its own codec)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from conftest import all_files, capture, settings
from pipeline.errors import CaptureError
from pipeline.format.reader import Cache
from pipeline.format.verify import verify

FULL = {"top_k": 8, "hidden_layers": [1, -1], "samples": 4, "final_hidden": True, "temperatures": [2.0],
        "rows_per_shard": 4, "rows_per_chunk": 2, "batch_size": 3}


def test_writer_threads_write_the_bytes_of_in_line_writes(llama_dir, corpus, tmp_path):
    """Three writers, several shards in flight, give every file of in-line writing, byte for byte."""
    capture(settings(llama_dir, corpus, tmp_path / "inline", capture={**FULL, "writers": 0}))
    capture(settings(llama_dir, corpus, tmp_path / "pool", capture={**FULL, "writers": 3}))
    a, b = Cache(tmp_path / "inline"), Cache(tmp_path / "pool")
    assert a.manifest.splits["train"].shards >= 6  # enough shards for three in flight
    assert all_files(a) == all_files(b)
    assert verify(tmp_path / "pool") == []
    timing = b.manifest.document["stats"]["timing"]
    assert timing["writer_wait_seconds"] >= 0 and b.manifest.stats.writer_wait_seconds == timing["writer_wait_seconds"]
    assert a.manifest.stats.writer_wait_seconds == 0.0  # in line: the loop never waits for a writer


class _Rows:
    def __init__(self, n, L=4):
        self.input_ids = np.zeros((n, L), np.int32)
        self.lengths = np.full(n, L, np.int32)
        self.position_ids = self.labels = None

    def __len__(self):
        return len(self.lengths)


class _Split:
    def __init__(self, n):
        self.rows = _Rows(n)

    def read(self, a, b):
        r = _Rows(b - a)
        return r


class _Prepared:
    def __init__(self, n):
        self.splits = {"train": _Split(n)}


class _Computer:
    def submit(self, ids, lengths, pos, seed):
        from pipeline.capture.targets import Done, TeacherTargets

        B, L = ids.shape
        return Done(TeacherTargets(topk_ids=np.zeros((B, L, 2), np.int32), topk_logprobs=np.zeros((B, L, 2), np.float16),
                                   logsumexp=np.zeros((B, L), np.float32), target_logprob=np.zeros((B, L), np.float32)))


class _SlowWriter:
    """Records how many shards are being written at once; fails on shard `fail`."""

    def __init__(self, delay=0.05, fail=None):
        self.parts = {"train": {"row_start": 0}}
        self.delay, self.fail = delay, fail
        self.now = self.most = 0
        self.done, self.stats = [], []
        self.lock = threading.Lock()

    def write_shard(self, split, index, targets, stats):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(self.delay)
        with self.lock:
            self.now -= 1
        if index == self.fail:
            raise OSError(28, "No space left on device")
        self.done.append(index)
        self.stats.append(stats)
        return {}


class _Bar:
    def update(self, n):
        pass


def _run(writer, writers, shards=8):
    from pipeline.capture.shards import run_shards

    todo = [("train", i, 2 * i, 2 * i + 2) for i in range(shards)]
    run_shards(_Computer(), _Prepared(2 * shards), todo, writer, 2, _Bar(), writers)


@pytest.mark.parametrize("writers", [1, 2, 4])
def test_shards_in_flight_are_bounded_by_the_writers(writers):
    """A loop far faster than its writers keeps at most `writers` shards in flight (host memory is bounded) and
    records the time it waited for them."""
    w = _SlowWriter()
    _run(w, writers)
    assert sorted(w.done) == list(range(8))
    assert w.most == writers  # as many in flight as writers, never more
    assert sum(s["writer_wait_seconds"] for s in w.stats) > 0.02 * (8 - writers) / writers


def test_a_failing_write_stops_the_capture_with_a_clear_error():
    w = _SlowWriter(delay=0.01, fail=2)
    with pytest.raises(CaptureError, match="No space left on device.*committed shards are kept"):
        _run(w, 2, shards=12)
    assert 2 not in w.done and len(w.done) < 11  # the loop stopped soon after the failure


def test_host_batch_hands_over_pinned_copies_in_order():
    """The CPU path of HostBatch: tensors, bfloat16 as bits, the queued checks raised at result()."""
    from pipeline.capture.targets import HostBatch

    h = HostBatch(torch.device("cpu"))
    h.put("logsumexp", torch.arange(6, dtype=torch.float32).reshape(2, 3))
    h.put("final_hidden", torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16))
    t = h.close().result()
    assert t.logsumexp.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert t.final_hidden.dtype == np.uint16
    assert torch.from_numpy(t.final_hidden.view(np.int16)).view(torch.bfloat16).tolist() == [[1.5, -2.0]]


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_hidden_codecs_store_the_same_values(llama_dir, corpus, tmp_path, codec):
    """shuffle-zstd (the default), zstd and none decode to the same hidden states; the zarr metadata names the
    shuffle, and `none` stores the raw bytes."""
    cap = {"top_k": 4, "hidden_layers": [1, -1], "final_hidden": True}
    capture(settings(llama_dir, corpus, tmp_path / "default", capture=cap))
    capture(settings(llama_dir, corpus, tmp_path / codec, capture={**cap, "hidden_codec": codec}))
    a, b = Cache(tmp_path / "default"), Cache(tmp_path / codec)
    assert a.manifest.capture.hidden_codec == "shuffle-zstd" and b.manifest.capture.hidden_codec == codec
    assert a.manifest.fields["hidden_states"].codec == "shuffle-zstd"
    for field in ("hidden_states", "final_hidden"):
        np.testing.assert_array_equal(a.array("train", field)[:], b.array("train", field)[:])
        names = [c.to_dict()["name"] for c in a.array("train", field).metadata.codecs[0].codecs]
        assert "numcodecs.shuffle" in names and "zstd" in names
    if codec == "none":
        field = b.array("train", "hidden_states")
        assert [c.to_dict()["name"] for c in field.metadata.codecs[0].codecs] == ["bytes"]
    assert verify(tmp_path / codec) == []


def test_a_cache_of_the_older_hidden_codec_is_done_and_grows_in_it(llama_dir, corpus, tmp_path):
    """A cache written with zstd hidden states (every cache before this codec choice) is finished for a rerun
    with today's default, and an append to it keeps zstd (one codec per field in the manifest)."""
    out = tmp_path / "c"
    cfg = settings(llama_dir, corpus, out, capture={"top_k": 4, "hidden_layers": [1], "hidden_codec": "zstd"},
                   data={"max_tokens": 1500})
    first = capture(cfg)
    del cfg["capture"]["hidden_codec"]
    again = capture(cfg)
    assert again.computed_shards == 0 and again.manifest.digest == first.manifest.digest
    cfg["data"]["max_tokens"] = 3000
    cfg["output"]["mode"] = "append"
    grown = capture(cfg)
    assert grown.manifest.capture.hidden_codec == "zstd" and len(Cache(out).parts("train")) == 2
    assert verify(out) == []


# ------------------------------------------------------------------------------------------- device memory


def test_attention_maps_beyond_the_budget_are_refused_before_the_teacher_loads(llama_dir, corpus, tmp_path,
                                                                               monkeypatch):
    from pipeline import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the teacher was loaded"))
    cfg = settings(llama_dir, corpus, tmp_path / "c", data={"seq_len": 128},
                   capture={"attention_layers": [-1], "attention_budget_gib": 0.001})
    with pytest.raises(CaptureError, match=r"attention maps at data.seq_len=128.*grow with seq_len\^2.*"
                                           r"capture.attention_budget_gib=0.001"):
        capture(cfg)
    assert not (tmp_path / "c" / "manifest.json").exists()
    cfg["capture"]["attention_budget_gib"] = 1.0  # the same capture within the budget runs
    monkeypatch.undo()
    assert capture(cfg).manifest.fields["attentions"]


def test_a_working_set_beyond_the_device_is_refused_naming_the_settings(llama_dir, corpus, tmp_path, monkeypatch):
    from pipeline import models
    from pipeline.capture import memory

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the teacher was loaded"))
    monkeypatch.setattr(memory, "device_memory", lambda device: 2**20)  # a 1 MiB device
    with pytest.raises(CaptureError, match=r"needs about .* GiB on its device.*of the 0.0 GiB of cpu memory.*"
                                           r"capture.batch_size"):
        capture(settings(llama_dir, corpus, tmp_path / "c", capture={"hidden_layers": [-1]}))


def test_the_working_set_estimate_counts_what_the_capture_holds(llama_dir, tmp_path):
    """The parts of the estimate from the teacher's own numbers: its parameters (counted on the meta device equal
    the loaded model's), and attention's L^2 terms."""
    import transformers

    from pipeline import models
    from pipeline.capture.memory import parameter_count, working_set
    from pipeline.config import TeacherCacheConfig

    config = transformers.AutoConfig.from_pretrained(llama_dir)
    real = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    assert parameter_count(config) == sum(p.numel() for p in real.parameters())
    spec = models.TeacherSpec.from_config(config)
    cfg = TeacherCacheConfig.model_validate(settings(llama_dir, tmp_path, tmp_path / "c", data={"seq_len": 64},
                                                     capture={"batch_size": 3, "attention_layers": [0, 1]}))
    ws = working_set(cfg, spec, 1000, n_hidden=0, n_attention=2, heads_stored=spec.num_heads)
    assert ws.weights == 4000 and ws.hidden_states == 0
    assert ws.attention == 3 * spec.num_heads * 64 * 64 * (4 + 4)
    assert ws.attention_maps == 2 * 3 * spec.num_heads * 64 * 64 * 2 * 2
    longer = working_set(cfg.model_copy(update={"data": cfg.data.model_copy(update={"seq_len": 128})}), spec, 1000,
                         0, 2, spec.num_heads)
    assert longer.attention == 4 * ws.attention and longer.layer == 2 * ws.layer


# ------------------------------------------------------------------------------------------- shards encoded here


@pytest.mark.parametrize("codec,dtype", [("pcodec", "uint16"), ("pcodec", "int32"), ("pcodec", "float16"),
                                         ("zstd", "float32"), ("zstd", "int8"), ("shuffle-zstd", "float16"),
                                         ("shuffle-zstd", "uint16"), ("none", "float16"), ("zstd0", "float32")])
@pytest.mark.parametrize("rows", [8, 5, 2])  # a whole shard, a short last shard, one chunk
def test_a_shard_encoded_here_is_byte_for_byte_zarrs(tmp_path, codec, dtype, rows):
    """ShardEncoder's bytes equal the shard zarr-python writes for the same rows, for every layout a CacheWriter
    creates (a last shard shorter than the others included), and zarr reads them back."""
    import zarr

    from pipeline.format.shards import ShardEncoder
    from pipeline.format.specs import FieldSpec

    tail = (3, 5)
    spec = FieldSpec("f", ("row", "a", "b"), tail, dtype, "x", codec="zstd" if codec == "zstd0" else codec,
                     level=0 if codec == "zstd0" else (1 if codec != "pcodec" else 8))
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((8 + rows, *tail)) * 40).astype(dtype)

    def make(path):
        return zarr.create_array(str(path), shape=(8 + rows, *tail), dtype=dtype, chunks=(2, *tail), shards=(8, *tail),
                                 **spec.compressors(3), fill_value=0, config={"write_empty_chunks": True})

    theirs = make(tmp_path / "zarr")
    theirs[8:] = data[8:]
    mine = make(tmp_path / "mine")
    enc = ShardEncoder.of(mine)
    assert enc is not None
    blob = b"".join(enc.encode(data[8:]))
    key = theirs.metadata.encode_chunk_key((1, 0, 0))
    assert blob == (tmp_path / "zarr" / key).read_bytes()
    (tmp_path / "mine" / key).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "mine" / key).write_bytes(blob)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "mine"), mode="r")[8:], data[8:])
