"""DistillKit's offline format: `distill import` reads files written by an independent implementation of DistillKit's
compression (this file's `write_distillkit`, written from its published algorithm with torch's own float casts and
Python bit strings, sharing no code with `pipeline.format.distillkit`), and `distill export --format distillkit`
writes files that implementation's reading of the bytes and our import both take back unchanged."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.capture.importer import ImportSettings, run_import
from pipeline.errors import DataError
from pipeline.format import Cache, row_column, verify
from pipeline.format.export import export
from pipeline.train.terms import TERMS, on_import
from test_import import cli, sampled_rows

TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _bits(values, width: int) -> str:
    return "".join(format(int(v), f"0{width}b") for v in values)


def _to_bytes(bitstring: str) -> list[int]:
    bitstring += "0" * (-len(bitstring) % 8)
    return [int(bitstring[i:i + 8], 2) for i in range(0, len(bitstring), 8)]


def _float_bytes(values, dtype: str) -> list[int]:
    if not len(values):
        return []
    t = torch.tensor(np.asarray(values, np.float64)).to(TORCH[dtype]).contiguous()
    return list(t.view(torch.uint8).numpy().tobytes())


def compress_position(ids, lps, cfg: dict) -> tuple[list[int], list[int]]:
    """One position's k (id, log-prob) pairs as DistillKit's (compressed_logprobs, bytepacked_indices) bytes."""
    order = np.argsort(-np.asarray(lps), kind="stable")
    ids, lp = np.asarray(ids)[order], torch.tensor(np.asarray(lps)[order], dtype=torch.float32)
    k, exact_k = cfg["k"], cfg["exact_k"]
    v = torch.cat([lp[:1], lp[1:] - lp[:-1]]) if cfg["delta_encoding"] else lp
    out = _float_bytes(v[:exact_k].numpy(), cfg["exact_dtype"])
    y = v[exact_k:].double().numpy()
    m = k - exact_k
    terms = cfg.get("polynomial_terms") or []
    t = np.linspace(0, 1, m) if cfg.get("normalize_t") else np.arange(m, dtype=np.float64)
    X = np.stack([np.sqrt(t) if p == "sqrt" else t ** p for p in terms], -1) if terms else np.zeros((m, 0))
    coeffs = np.linalg.lstsq(X, y, rcond=None)[0] if terms else np.zeros(0)
    coeffs_t = torch.tensor(coeffs).to(TORCH[cfg["term_dtype"]])
    out += _float_bytes(coeffs_t.double().numpy(), cfg["term_dtype"])
    X_t = torch.tensor(X).to(TORCH[cfg["term_dtype"]])
    residual = torch.tensor(y).float() - (X_t * coeffs_t).sum(-1).float() if terms else torch.tensor(y).float()
    at = 0
    for b in cfg["residual_bins"]:
        r = residual[at: at + b["num_elements"]]
        at += b["num_elements"]
        bits = b["element_bits"]
        maxabs = float(r.abs().max())
        scale = torch.tensor(maxabs / 2 ** (bits - 1) if maxabs else 1.0).to(TORCH[b["scale_dtype"]])
        q = torch.clamp(torch.round(r / scale.float()), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + 2 ** (bits - 1)
        out += _float_bytes([float(scale)], b["scale_dtype"]) + _to_bytes(_bits(q.long().tolist(), bits))
    width = math.ceil(math.log2(cfg["d"]))
    return out, _to_bytes(_bits(ids.tolist(), width))


def write_distillkit(folder, rows: list[list[int]], lps: list[np.ndarray], cfg: dict, packed: bool = False,
                     **extra) -> None:
    """A DistillKit capture of `rows` (each position's top k from the float64 log-softmax `lps`): T tokens, T - 1
    positions, or DistillKit's packing of them (rows joined, tokens cut to the positions, segment ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compression_config.yaml").write_text(yaml.safe_dump(cfg))
    recs = []
    for r, lp in zip(rows, lps):
        top = np.argsort(-lp[: len(r) - 1], -1, kind="stable")[:, : cfg["k"]]
        enc = [compress_position(top[t], lp[t, top[t]], cfg) for t in range(len(r) - 1)]
        recs.append({"input_ids": r, "compressed_logprobs": [e[0] for e in enc],
                     "bytepacked_indices": [e[1] for e in enc]})
    if packed:  # DistillKit's pack step: input_ids cut to the positions, rows joined, attention_mask segment ids
        joined = {"input_ids": [], "compressed_logprobs": [], "bytepacked_indices": [], "attention_mask": []}
        for i, rec in enumerate(recs):
            n = len(rec["compressed_logprobs"])
            joined["input_ids"] += rec["input_ids"][:n]
            joined["compressed_logprobs"] += rec["compressed_logprobs"]
            joined["bytepacked_indices"] += rec["bytepacked_indices"]
            joined["attention_mask"] += [i + 1] * n
        recs = [joined]
    typ = pa.list_(pa.list_(pa.uint8()))
    table = pa.table({"input_ids": pa.array([r["input_ids"] for r in recs], pa.list_(pa.uint64())),
                      "compressed_logprobs": pa.array([r["compressed_logprobs"] for r in recs], typ),
                      "bytepacked_indices": pa.array([r["bytepacked_indices"] for r in recs], typ),
                      **({"attention_mask": pa.array([r["attention_mask"] for r in recs], pa.list_(pa.int8()))}
                         if packed else {}), **extra})
    pq.write_table(table, folder / "data_0.parquet")


def read_distillkit(folder) -> list[dict]:
    """This file's own reading of DistillKit files under lossless settings: per row, its ids and log-probs."""
    cfg = yaml.safe_load((folder / "compression_config.yaml").read_text())
    assert cfg["exact_k"] == cfg["k"] and not cfg["delta_encoding"] and cfg["exact_dtype"] == "float32"
    width = math.ceil(math.log2(cfg["d"]))
    out = []
    for f in sorted(folder.glob("data_*.parquet")):
        for rec in pq.read_table(f).to_pylist():
            ids = [[int("".join(format(b, "08b") for b in pos)[i * width:(i + 1) * width], 2) for i in range(cfg["k"])]
                   for pos in rec["bytepacked_indices"]]
            lps = [np.frombuffer(bytes(pos), "<f4").tolist() for pos in rec["compressed_logprobs"]]
            out.append({**rec, "ids": ids, "lps": lps})
    return out


LOSSY = {"d": 512, "k": 16, "exact_k": 4, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, 2],
         "term_dtype": "float32", "residual_bins": [{"scale_dtype": "float16", "element_bits": 8, "num_elements": 12}],
         "delta_encoding": True, "error_diffusion": False, "normalize_t": True}
LOSSLESS = {"d": 512, "k": 16, "exact_k": 16, "exact_dtype": "float32", "polynomial_terms": None,
            "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "error_diffusion": False,
            "normalize_t": False}


@pytest.fixture(scope="module")
def source(llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()
    rows = sampled_rows(model, (30, 41, 25, 36, 50, 28), seed=5)
    with torch.no_grad():
        lps = [torch.log_softmax(model(torch.tensor([r])).logits[0], -1).numpy() for r in rows]
    return rows, lps


def _matched(c: Cache, rows):
    """{index of the source row: index of the cache row}."""
    t = c.rows("train")
    ids, lengths = row_column(t, "input_ids", np.int64), t.column("length").to_numpy()
    return {i: next(j for j in range(len(lengths)) if lengths[j] == len(r) and ids[j, : len(r)].tolist() == r)
            for i, r in enumerate(rows)}


@pytest.mark.parametrize("settings", ["lossless", "lossy"])
def test_a_distillkit_capture_imports_to_the_teachers_top_k(settings, source, llama_dir, tmp_path):
    rows, lps = source
    cfg = LOSSLESS if settings == "lossless" else LOSSY
    write_distillkit(tmp_path / "dk", rows, lps, cfg)
    logs = []
    c = run_import(ImportSettings(source=str(tmp_path / "dk"), out=str(tmp_path / "c"),
                                  teacher=str(llama_dir)), log=logs.append)
    assert verify(str(tmp_path / "c")) == []
    i = c.manifest.imported
    assert i.layout == "distillkit" and i.top_k == 16 and i.normalised == "vocabulary" and not i.logsumexp
    assert i.compression["exact_k"] == cfg["exact_k"] and i.alignment["train"]["0"] > 0.6
    top_ids, top_lp = c.array("train", "topk_ids")[:], c.array("train", "topk_logprobs")[:].astype(np.float64)
    mask = row_column(c.rows("train"), "loss_mask", bool)
    for s, j in _matched(c, rows).items():
        n, lp = len(rows[s]), lps[s]
        assert mask[j, : n - 1].all() and not mask[j, n - 1:].any()  # position t predicts token t + 1
        want = np.argsort(-lp[: n - 1], -1, kind="stable")[:, :16]
        np.testing.assert_array_equal(top_ids[j, : n - 1], want)  # the ids are exact
        truth = np.take_along_axis(lp[: n - 1], want, -1)
        err = np.abs(top_lp[j, : n - 1] - truth)
        if settings == "lossless":  # float32 in the file: the cache's float16 of the teacher's value
            np.testing.assert_array_equal(top_lp[j, : n - 1], truth.astype(np.float16).astype(np.float64))
        else:  # bfloat16 deltas, then a 3-term fit with 8-bit residuals: within the compression's own error
            assert err[:, :4].max() < 2 ** -7 * (np.abs(truth[:, :4]) + np.abs(truth[:, :1])).max() + 1e-3
            assert err.mean() < 0.05 and err.max() < 0.5, (err.mean(), err.max())
    exact = {n: on_import(t, c.manifest)[0] for n, t in TERMS.items()}
    if settings == "lossless":
        assert i.exact_entries == 16 and not i.lossy and exact["kd_forward"] == "exact"
    else:
        assert i.exact_entries == 0 and i.lossy and exact["kd_forward"] == "approximate"
        assert "approximated the rest" in on_import(TERMS["kd_forward"], c.manifest)[1]
        assert exact["ce"] == "exact"


def test_a_packed_distillkit_dataset_keeps_its_documents_apart(source, llama_dir, tmp_path):
    rows, lps = source
    write_distillkit(tmp_path / "dk", rows[:3], lps[:3], LOSSLESS, packed=True)
    c = run_import(ImportSettings(source=str(tmp_path / "dk"), out=str(tmp_path / "c"),
                                  teacher=str(llama_dir)), log=lambda m: None)
    m = c.manifest
    assert m.preparation.document_mask and m.splits["train"].rows == 1
    t = c.rows("train")
    pos, mask = row_column(t, "position_ids", np.int64)[0], row_column(t, "loss_mask", bool)[0]
    n = [len(r) - 1 for r in rows[:3]]  # tokens each document keeps after packing
    want = np.concatenate([np.arange(k) for k in n])
    np.testing.assert_array_equal(pos[: sum(n)], want)
    # position p predicts token p + 1; the last position of a document predicts the end the packing cut, not the
    # next document's first token: untrained
    ends = np.cumsum(n) - 1
    assert not mask[ends].any() and mask[: ends[0]].all()
    top = c.array("train", "topk_ids")[0]
    np.testing.assert_array_equal(top[: n[0] - 1], np.argsort(-lps[0][: n[0] - 1], -1, kind="stable")[:, :16])
    second = np.argsort(-lps[1][: n[1] - 1], -1, kind="stable")[:, :16]
    np.testing.assert_array_equal(top[n[0]: n[0] + n[1] - 1], second)


def test_distillkit_sources_that_do_not_fit_are_refused(source, llama_dir, tmp_path):
    rows, lps = source
    write_distillkit(tmp_path / "dk", rows[:2], lps[:2], LOSSLESS)
    (tmp_path / "dk" / "compression_config.yaml").unlink()
    with pytest.raises(DataError, match="no record of their compression"):
        run_import(ImportSettings(source=str(tmp_path / "dk"), out=str(tmp_path / "c"),
                                  teacher=str(llama_dir)), log=lambda m: None)
    (tmp_path / "dk" / "compression_config.yaml").write_text(yaml.safe_dump({**LOSSLESS, "k": 12, "exact_k": 12}))
    with pytest.raises(DataError, match=r"row 0 position 0: 64 log-prob and 18 index bytes, .* make 48 and 14"):
        run_import(ImportSettings(source=str(tmp_path / "dk"), out=str(tmp_path / "c"),
                                  teacher=str(llama_dir)), log=lambda m: None)
    (tmp_path / "dk" / "compression_config.yaml").write_text(yaml.safe_dump({**LOSSLESS, "exact_dtype": "int8"}))
    with pytest.raises(DataError, match="exact_dtype 'int8'"):
        run_import(ImportSettings(source=str(tmp_path / "dk"), out=str(tmp_path / "c"),
                                  teacher=str(llama_dir)), log=lambda m: None)
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_the_distillkit_export_reads_back_unchanged(assistant_cache, bos_llama_dir, tmp_path):
    c = Cache(str(assistant_cache))
    export(c, tmp_path / "x", fmt="distillkit", log=lambda m: None)
    record = json.loads((tmp_path / "x" / "distill_export.json").read_text())
    assert record["format"] == "distillkit"
    t = c.rows("train")
    ids, lengths, mask = row_column(t, "input_ids", np.int64), t.column("length").to_numpy(), \
        row_column(t, "loss_mask", np.uint8)
    top_ids, top_lp = c.array("train", "topk_ids")[:], c.array("train", "topk_logprobs")[:]
    got = read_distillkit(tmp_path / "x" / "train")  # this file's own reading of the bytes
    assert len(got) == len(lengths)
    for i, rec in enumerate(got):
        n = lengths[i]
        assert rec["input_ids"] == ids[i, :n].tolist() and len(rec["ids"]) == n - 1
        np.testing.assert_array_equal(np.asarray(rec["ids"]), top_ids[i, : n - 1])
        np.testing.assert_array_equal(np.asarray(rec["lps"], np.float32), top_lp[i, : n - 1].astype(np.float32))
        assert rec["loss_mask"] == mask[i, : n - 1].tolist()
    # and our import takes it back (the tiny random teacher does not predict the chat text: no alignment to check)
    run = cli("import", tmp_path / "x", tmp_path / "back", "--teacher", bos_llama_dir, "--skip-alignment-check")
    assert run.returncode == 0, run.stderr
    assert "compressed ranks 1..8 stored as float32" in run.stdout
    back = Cache(str(tmp_path / "back"))
    assert back.manifest.imported.exact_entries == back.manifest.capture.top_k
    for split in c.splits:
        a, b = c.rows(split), back.rows(split)
        assert a.column("key").to_pylist() == b.column("key").to_pylist()
        m_b = row_column(b, "loss_mask", bool)
        for f in ("topk_ids", "topk_logprobs", "logsumexp"):
            np.testing.assert_array_equal(np.asarray(c.array(split, f)[:])[m_b], np.asarray(back.array(split, f)[:])[m_b])


def test_a_document_masked_export_packed_by_distillkit_keeps_every_boundary(llama_dir, corpus, tmp_path):
    """A document_mask cache exported in DistillKit's layout and packed as DistillKit's pack step does (rows cut to
    their positions and joined, segment ids in attention_mask, every per-position column joined alike): the import
    keeps the boundaries of both kinds, the segments' and the documents' inside each exported row."""
    from conftest import capture, settings

    capture(settings(llama_dir, corpus, tmp_path / "c", data={"document_mask": True, "max_tokens": 1500}))
    c = Cache(str(tmp_path / "c"))
    export(c, tmp_path / "x", fmt="distillkit", splits=["train"], log=lambda m: None)
    rows = pq.read_table(tmp_path / "x" / "train" / "data_0.parquet").to_pylist()[:3]
    cols = ("compressed_logprobs", "bytepacked_indices", "target_logsumexp", "position_ids")  # (no loss mask)
    assert "loss_mask" not in rows[0]
    packed = {k: [] for k in ("input_ids", "attention_mask", *cols)}
    for i, r in enumerate(rows):  # DistillKit's pack_pass, one packed row of three
        n = len(r["compressed_logprobs"])
        packed["input_ids"] += r["input_ids"][:n]
        packed["attention_mask"] += [i + 1] * n
        for k in cols:
            packed[k] += r[k]
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "compression_config.yaml").write_text(
        (tmp_path / "x" / "train" / "compression_config.yaml").read_text())
    pq.write_table(pa.Table.from_pylist([packed], schema=pa.schema(
        [("input_ids", pa.list_(pa.uint64())), ("attention_mask", pa.list_(pa.int8())),
         ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))), ("bytepacked_indices", pa.list_(pa.list_(pa.uint8()))),
         ("target_logsumexp", pa.list_(pa.float32())),
         ("position_ids", pa.list_(pa.int32()))])), tmp_path / "packed" / "data_0.parquet")
    back = run_import(ImportSettings(source=str(tmp_path / "packed"), out=str(tmp_path / "back"),
                                     teacher=str(llama_dir),
                                     check_alignment=False), log=lambda m: None)  # a random teacher: no signal
    t = back.rows("train")
    pos, mask = row_column(t, "position_ids", np.int64)[0], row_column(t, "loss_mask", bool)[0]
    n = [len(r["compressed_logprobs"]) for r in rows]
    want = np.concatenate([r["position_ids"] for r in rows])
    np.testing.assert_array_equal(pos[: sum(n)], want)  # every document of every exported row restarts
    assert (want[1:] == 0).sum() > len(rows) - 1  # documents inside the exported rows, not only the segments
    ends = np.cumsum(n)[:-1] - 1  # the position before a later segment predicts a token packing cut: untrained
    assert not mask[ends].any()
    assert mask[: n[0] - 1].all() and mask[n[0]: n[0] + n[1] - 1].all()  # the rest of each segment trains


def test_a_compression_config_that_is_not_yaml_is_one_error(source, llama_dir, tmp_path):
    rows, lps = source
    write_distillkit(tmp_path / "dk", rows[:2], lps[:2], LOSSLESS)
    (tmp_path / "dk" / "compression_config.yaml").write_text("d: [1, 2\n")
    with pytest.raises(DataError, match="compression_config.yaml: not YAML"):
        run_import(ImportSettings(source=str(tmp_path / "dk"), out=str(tmp_path / "c"),
                                  teacher=str(llama_dir)), log=lambda m: None)


def test_distillkit_rows_and_files_that_disagree_are_refused(source, llama_dir, tmp_path):
    rows, lps = source
    write_distillkit(tmp_path / "dk", rows[:2], lps[:2], LOSSLESS)
    t = pq.read_table(tmp_path / "dk" / "data_0.parquet")
    ids = t.column("input_ids").to_pylist()
    ids[1] = ids[1] + [5, 6]  # two tokens more than its positions allow
    pq.write_table(t.set_column(0, "input_ids", pa.array(ids, pa.list_(pa.uint64()))), tmp_path / "dk" / "data_0.parquet")
    with pytest.raises(DataError, match=r"row 1: \d+ compressed positions for \d+ tokens"):
        run_import(ImportSettings(source=str(tmp_path / "dk"), out=str(tmp_path / "c"),
                                  teacher=str(llama_dir)), log=lambda m: None)
    # two split folders of one source, compressed differently
    write_distillkit(tmp_path / "two" / "train", rows[:2], lps[:2], LOSSLESS)
    write_distillkit(tmp_path / "two" / "validation", rows[2:4], lps[2:4], LOSSY)
    with pytest.raises(DataError, match="compressed with other settings than the files before it"):
        run_import(ImportSettings(source=str(tmp_path / "two"), out=str(tmp_path / "c2"),
                                  teacher=str(llama_dir)), log=lambda m: None)
    assert not (tmp_path / "c" / "manifest.json").exists() and not (tmp_path / "c2" / "manifest.json").exists()
