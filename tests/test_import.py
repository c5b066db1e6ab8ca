"""`distill import`: another tool's top-K log-probs as a cache. Our own export comes back equal; vLLM-shaped
prompt_logprobs (Parquet structs, a Parquet map, JSON Lines) equal the teacher's float64 forward pass; what the
source did not give is recorded and decides which loss terms are exact; bad input is refused before anything is
written, and a crash leaves nothing that looks finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.capture import importer
from pipeline.capture.importer import ImportSettings, run_import
from pipeline.errors import CacheError, DataError, StorageError, StudentError
from pipeline.format import Cache, row_column, verify
from pipeline.format.export import export
from pipeline.train.terms import TERMS, fields_for, on_import
from test_share import s3  # noqa: F401  (the fixture: a moto S3 server on localhost)

K = 8


def sampled_rows(model, lengths, seed: int = 0) -> list[list[int]]:
    """Rows the teacher wrote itself (a random first token, then draws from its float64 distribution): rows it
    predicts, as a real teacher predicts real text, so that the import's alignment check has a signal."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = [int(torch.randint(2, 400, (1,), generator=g))]
        with torch.no_grad():
            for _ in range(n - 1):
                p = torch.softmax(model(torch.tensor([ids])).logits[0, -1], -1)
                ids.append(int(torch.multinomial(p, 1, generator=g)))
        rows.append(ids)
    return rows


@pytest.fixture(scope="module")
def teacher_model(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def teacher_rows(teacher_model):
    """Token rows of different lengths, sampled from the tiny teacher, and its float64 log-softmax over them."""
    rows = sampled_rows(teacher_model, (17, 40, 9, 40, 25))
    rows[3] = rows[1]  # a duplicate row: kept once
    with torch.no_grad():
        lps = [torch.log_softmax(teacher_model(torch.tensor([r])).logits[0], -1).numpy() for r in rows]
    return rows, lps


def vllm_positions(row: list[int], lp: np.ndarray, k: int = K) -> list:
    """vLLM's prompt_logprobs of a row: None, then per token t its top k entries plus token t itself when outside them
    (lp[t - 1] is the distribution that predicts token t)."""
    out = [None]
    for t in range(1, len(row)):
        dist = lp[t - 1]
        order = np.argsort(-dist, kind="stable")
        ranks = {int(i): r + 1 for r, i in enumerate(order)}
        entries = {int(i): (float(dist[i]), ranks[int(i)]) for i in order[:k]}
        entries.setdefault(row[t], (float(dist[row[t]]), ranks[row[t]]))
        out.append(entries)
    return out


def write_vllm(rows, lps, path, kind: str) -> None:
    recs = [(r, vllm_positions(r, lp)) for r, lp in zip(rows, lps)]
    if kind == "jsonl":  # json.dumps of vLLM's dicts of Logprob: keys become strings
        with open(path, "w") as f:
            for r, pos in recs:
                f.write(json.dumps({"prompt_token_ids": r, "prompt_logprobs": [
                    None if p is None else {str(i): {"logprob": v, "rank": rk, "decoded_token": "x"}
                                            for i, (v, rk) in p.items()} for p in pos]}) + "\n")
        return
    if kind == "structs":
        col = [[None if p is None else [{"token_id": i, "logprob": v, "rank": rk} for i, (v, rk) in p.items()]
                for p in pos] for _, pos in recs]
        typ = pa.list_(pa.list_(pa.struct([("token_id", pa.int64()), ("logprob", pa.float32()),
                                           ("rank", pa.int64())])))
    else:  # a map token id -> log-prob
        col = [[None if p is None else [(i, v) for i, (v, _) in p.items()] for p in pos] for _, pos in recs]
        typ = pa.list_(pa.map_(pa.int64(), pa.float64()))
    pq.write_table(pa.table({"prompt_token_ids": [r for r, _ in recs], "prompt_logprobs": pa.array(col, typ)}), path)


def axolotl_table(rows, lps, k: int = K, renormalise: bool = False, **extra) -> pa.Table:
    """The axolotl KD layout of rows from their log-softmax: target t = the top k of the distribution of token t."""
    ids, lp = [], []
    for r, d in zip(rows, lps):
        top = np.argsort(-d, axis=-1, kind="stable")[:, :k]
        vals = np.take_along_axis(d, top, -1)
        if renormalise:
            vals = vals - np.log(np.exp(vals).sum(-1, keepdims=True))
        ids.append([list(range(k))] + top[: len(r) - 1].tolist())  # position 0 predicts nothing: -inf, as axolotl
        lp.append([[float("-inf")] * k] + vals[: len(r) - 1].tolist())
    cols = {"input_ids": rows, "target_token_ids": ids, "target_logprobs": lp}
    return pa.table({**cols, **extra})


def cli(*args: str) -> subprocess.CompletedProcess:
    """`distill ARGS` in a process of its own, offline."""
    return subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)


def no_cache(path) -> None:
    assert not (path / "manifest.json").exists()
    with pytest.raises(CacheError):
        Cache(str(path)).manifest


# ---------------------------------------------------------------------------------------------


def test_our_export_imports_back_equal(assistant_cache, bos_llama_dir, tmp_path):
    c = Cache(str(assistant_cache))
    export(c, tmp_path / "x", log=lambda m: None)
    # the tiny random teacher does not predict the chat text: its alignment cannot be told (tested apart, below)
    out = run_import(ImportSettings(source=str(tmp_path / "x"), out=str(tmp_path / "back"), teacher=str(bos_llama_dir),
                                    check_alignment=False), log=lambda m: None)
    m = out.manifest
    assert verify(str(tmp_path / "back")) == []
    assert m.imported.normalised == "vocabulary" and m.imported.logsumexp and m.imported.target_logprob
    assert m.tokenizer.fingerprint == c.manifest.tokenizer.fingerprint and m.capture.top_k == c.manifest.capture.top_k
    assert m.teacher.weights_sha256 is None and m.teacher.vocab_size == c.manifest.teacher.vocab_size
    trained = 0
    for split in c.splits:
        a, b = c.rows(split), out.rows(split)
        assert a.column("key").to_pylist() == b.column("key").to_pylist()
        n = a.column("length").to_numpy()
        mask_a, mask_b = row_column(a, "loss_mask", bool), row_column(b, "loss_mask", bool)
        np.testing.assert_array_equal(row_column(a, "input_ids", np.int64), row_column(b, "input_ids", np.int64))
        last = np.arange(mask_a.shape[1])[None] >= (n[:, None] - 1)
        np.testing.assert_array_equal(mask_b, mask_a & ~last)  # the row's last target is not in the layout
        trained += mask_b.sum()
        for f in ("topk_ids", "topk_logprobs", "logsumexp", "target_logprob"):
            x, y = np.asarray(c.array(split, f)[:]), np.asarray(out.array(split, f)[:])
            np.testing.assert_array_equal(x[mask_b], y[mask_b], err_msg=f)
    assert trained > 100
    assert all(on_import(t, m)[0] == "exact" for t in TERMS.values() if set(t.causal.fields) <= set(m.fields))
    # the losses a student trains with are the same on both, the original's last positions left out
    from pipeline.train.hf import CacheDataset, collate

    losses = {"kd_forward": 0.5, "kd_reverse": 0.25, "ce": 0.5, "nll_match": 0.1}
    from transformers import AutoConfig

    torch.manual_seed(1)  # a student that is not the teacher
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(bos_llama_dir)).to(torch.float64)
    got = []
    for cache in (c, out):
        ds = CacheDataset(cache, "train", losses)
        batch = collate([ds[i] for i in range(8)])
        last = torch.arange(batch["loss_mask"].shape[1])[None] >= batch["length"][:, None] - 1
        batch["loss_mask"] = batch["loss_mask"] & ~last
        with torch.no_grad():
            got.append(ds.loss(model, batch))
    for k, v in got[0].items():
        assert float(got[1][k]) == pytest.approx(float(v), rel=1e-12), k
    # terms that read the logsumexp, at a temperature: finite gradients (nothing NaN sits under a mask)
    assert on_import(TERMS["kd_forward"], m, temperature=2.0)[0] == "approximate"  # T = 2 was not captured
    model.zero_grad()
    with pytest.warns(UserWarning, match="not captured"):  # when the loss is set up, and when it is computed
        ds = CacheDataset(out, "train", {"kd_forward": 1.0, "mse_logits": 1.0, "kd_reverse": 1.0}, temperature=2.0)
        ds.loss(model, collate([ds[i] for i in range(8)]))["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    lse = np.asarray(out.array("train", "logsumexp")[:])
    assert np.isfinite(lse).all()


@pytest.mark.parametrize("kind", ["structs", "map", "jsonl"])
def test_vllm_prompt_logprobs_equal_the_teachers_forward_pass(kind, teacher_rows, llama_dir, tmp_path):
    rows, lps = teacher_rows
    (tmp_path / "src").mkdir()
    src = tmp_path / "src" / ("part.jsonl" if kind == "jsonl" else "part.parquet")
    write_vllm(rows, lps, src, kind)
    logs = []
    c = run_import(ImportSettings(source=str(src), out=str(tmp_path / "c"), teacher=str(llama_dir)), log=logs.append)
    m = c.manifest
    assert verify(str(tmp_path / "c")) == []
    i = m.imported
    assert (i.layout, i.normalised, i.logsumexp, i.target_logprob, i.top_k) == ("vllm", "vocabulary", False, True, K)
    assert i.entries == (K, K + 1)  # vLLM adds the prompt token when it is outside the top K
    assert m.splits["train"].rows == 4 and "1 duplicates dropped" in logs[0]
    t = c.rows("train")
    keys, ids = t.column("key").to_pylist(), row_column(t, "input_ids", np.int64)
    top_ids, top_lp = c.array("train", "topk_ids")[:], c.array("train", "topk_logprobs")[:]
    target, lse = c.array("train", "target_logprob")[:], c.array("train", "logsumexp")[:]
    mask = row_column(t, "loss_mask", bool)
    seen = set()
    for r, lp in zip(rows, lps):
        j = next(j for j in range(len(keys)) if ids[j, : len(r)].tolist() == r and t.column("length")[j].as_py() ==
                 len(r))
        seen.add(j)
        n = len(r)
        assert mask[j, : n - 1].all() and not mask[j, n - 1:].any()
        want = np.argsort(-lp[: n - 1], axis=-1, kind="stable")[:, :K]
        np.testing.assert_array_equal(top_ids[j, : n - 1], want)
        np.testing.assert_allclose(top_lp[j, : n - 1].astype(np.float64), np.take_along_axis(lp[: n - 1], want, -1),
                                   rtol=1e-3, atol=1e-3)  # float16
        np.testing.assert_allclose(target[j, : n - 1], lp[np.arange(n - 1), r[1:]], rtol=1e-6, atol=1e-6)
        assert np.isnan(lse[j, : n - 1]).all() and lse[j, n - 1] == 0  # not given: never made up; 0 untrained
    assert len(seen) == 4
    status = {n: on_import(t_, m)[0] for n, t_ in TERMS.items()}
    assert status["kd_forward"] == status["kd_reverse"] == status["ce"] == status["nll_match"] == "exact"
    assert status["mse_logits"] == status["kd_full_forward"] == "unavailable"
    assert on_import(TERMS["kd_forward"], m, temperature=2.0)[0] == "unavailable"


def student(**kw):
    from pipeline.student_config import StudentConfig

    return StudentConfig(name="s", arch={"num_layers": 1, "hidden_size": 16, "num_heads": 2}, **kw)


def test_renormalised_log_probs_are_flagged_and_decide_the_terms(teacher_rows, llama_dir, tmp_path):
    rows, lps = teacher_rows
    pq.write_table(axolotl_table(rows, lps, renormalise=True), tmp_path / "renorm.parquet")
    c = run_import(ImportSettings(source=str(tmp_path / "renorm.parquet"), out=str(tmp_path / "c"),
                                  teacher=str(llama_dir)),
                   log=lambda m: None)
    m = c.manifest
    assert m.imported.normalised == "top-k" and not m.imported.target_logprob and "target_logprob" not in m.fields
    assert on_import(TERMS["kd_forward_renorm"], m)[0] == "exact"
    assert on_import(TERMS["kd_forward"], m)[0] == "approximate"
    with pytest.warns(UserWarning, match="kd_forward is approximate"):
        fields_for(student(losses={"kd_forward": 1.0}), m)
    with pytest.raises(StudentError, match="nll_match cannot be computed"):
        fields_for(student(losses={"ce": 1.0, "nll_match": 1.0}), m)
    with pytest.raises(StudentError, match="logsumexp"):
        fields_for(student(losses={"kd_forward": 1.0}, temperature=2.0), m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fields_for(student(losses={"ce": 0.5, "kd_forward_renorm": 0.5}), m)


def test_a_mask_makes_ragged_entries_importable_and_the_rest_goes_to_the_tail(teacher_rows, llama_dir, tmp_path):
    rows, lps = teacher_rows
    t = axolotl_table(rows, lps, k=K + 2)
    masks = [[[1] * (K + 2) if p % 3 else [1] * K + [0, 0] for p in range(len(r))] for r in rows]
    masks[0][0] = [0] * (K + 2)
    lp = t.column("target_logprobs").to_pylist()
    lp[1][4][0], lp[1][5][K + 1] = -1e9, float("-inf")  # a masked logit's value: probability 0, dropped
    t = t.set_column(2, "target_logprobs", pa.array(lp))
    pq.write_table(t.append_column("target_mask", pa.array(masks, pa.list_(pa.list_(pa.int8())))), tmp_path / "a.parquet")
    c = run_import(ImportSettings(source=str(tmp_path / "a.parquet"), out=str(tmp_path / "c"),
                                  teacher=str(llama_dir)), log=lambda m: None)
    assert c.manifest.capture.top_k == K and c.manifest.imported.entries == (K, K + 2)
    mask = row_column(c.rows("train"), "loss_mask", bool)
    assert np.isfinite(c.array("train", "topk_logprobs")[:][mask]).all()
    r, lp = rows[0], lps[0]
    np.testing.assert_array_equal(c.array("train", "topk_ids")[0, : len(r) - 1],
                                  np.argsort(-lp[: len(r) - 1], -1, kind="stable")[:, :K])


def test_bad_sources_are_refused_before_anything_is_written(teacher_rows, llama_dir, tmp_path):
    rows, lps = teacher_rows

    def refused(table: pa.Table, match: str, exc=DataError, **kw):
        name = f"s{len(list(tmp_path.glob('s*.parquet')))}"
        pq.write_table(table, tmp_path / f"{name}.parquet")
        out = tmp_path / f"{name}-out"
        with pytest.raises(exc, match=match):
            run_import(ImportSettings(source=str(tmp_path / f"{name}.parquet"), out=str(out),
                                      teacher=str(llama_dir), **kw),
                       log=lambda m: None)
        assert not out.exists() or not any(out.iterdir())

    good = axolotl_table(rows, lps)
    lp = good.column("target_logprobs").to_pylist()
    lp[1][3] = [v + 0.7 for v in lp[1][3]]
    refused(good.set_column(2, "target_logprobs", pa.array(lp)), r"row 1 position 3: .* sum to .* > 1")
    ids = good.column("target_token_ids").to_pylist()
    ids[2][4][0] = 600
    refused(good.set_column(1, "target_token_ids", pa.array(ids)), r"row 2 position 4: target id 600 is outside")
    ids[2][4][0], ids[2][4][1] = 7, 7
    refused(good.set_column(1, "target_token_ids", pa.array(ids)), r"row 2 position 4: target id 7 appears twice")
    tokens = good.column("input_ids").to_pylist()
    tokens[0][5] = 512
    refused(good.set_column(0, "input_ids", pa.array(tokens)), "token id 512 is outside")
    ragged_ids, ragged_lp = good.column("target_token_ids").to_pylist(), good.column("target_logprobs").to_pylist()
    ragged_ids[0][2], ragged_lp[0][2] = ragged_ids[0][2][:5], ragged_lp[0][2][:5]
    refused(good.set_column(1, "target_token_ids", pa.array(ragged_ids)).set_column(2, "target_logprobs",
                                                                                  pa.array(ragged_lp)),
            "ragged top-K needs a mask")
    refused(good, "temperature 2.0 without their logsumexp", temperature=2.0)
    refused(good, "top_k 9", top_k=9)
    refused(good, "rows are imported whole", seq_len=20)
    uneven = good.column("target_logprobs").to_pylist()
    uneven[3][2] = uneven[3][2][:-1]
    refused(good.set_column(2, "target_logprobs", pa.array(uneven)),
            "target_token_ids and target_logprobs differ in length at .* row 3 position 2")
    short = good.column("target_logprobs").to_pylist()
    short[1] = short[1][:-1]
    refused(good.set_column(2, "target_logprobs", pa.array(short)), "row 1: target_logprobs has 39 positions, input_ids 40")
    refused(pa.table({"input_ids": rows}), "neither axolotl's KD layout")
    refused(good.append_column("attention_mask", pa.array([[1] * (len(r) - 2) + [0, 0] for r in rows])),
            "hold padding")
    masks = [[[1] * K for _ in r] for r in rows]
    masks[1][2] = [1] * (K - 1)
    refused(good.append_column("target_mask", pa.array(masks)), "target_mask and target_token_ids differ in length at "
            ".* row 1 position 2")
    refused(good, "top_k 0", top_k=0)
    empty = good.to_pylist()
    empty[2] = {"input_ids": [], "target_token_ids": [], "target_logprobs": []}
    refused(pa.Table.from_pylist(empty, schema=good.schema), "row 2: no tokens")


def test_temperature_needs_the_logsumexp_and_is_recorded(teacher_rows, llama_dir, tmp_path):
    rows, lps = teacher_rows
    lse = [[float("nan")] + [0.0] * (len(r) - 1) for r in rows]
    pq.write_table(axolotl_table(rows, lps, target_logsumexp=lse), tmp_path / "t.parquet")
    c = run_import(ImportSettings(source=str(tmp_path / "t.parquet"), out=str(tmp_path / "c"),
                                  teacher=str(llama_dir), temperature=2.0),
                   log=lambda m: None)
    m = c.manifest
    assert m.imported.temperature == 2.0 and m.imported.logsumexp
    assert "target_logprob" not in m.fields  # the teacher's NLL is a temperature-1 figure
    assert on_import(TERMS["kd_forward"], m) == ("approximate", "the source's log-probs are the teacher's at "
                                                 "temperature 2.0: the student trains against that distribution")
    assert on_import(TERMS["ce"], m)[0] == "exact"
    # a run may not mix it with a temperature-1 cache
    pq.write_table(axolotl_table(rows, lps, target_logsumexp=lse), tmp_path / "one.parquet")
    one = run_import(ImportSettings(source=str(tmp_path / "one.parquet"), out=str(tmp_path / "c1"),
                                    teacher=str(llama_dir)),
                     log=lambda m: None)
    from pipeline.train.sources import check_same_tokenizer_and_capture

    with pytest.raises(StudentError, match="temperature 1.0, source 'a' at 2.0"):
        check_same_tokenizer_and_capture({"a": (c, None), "b": (one, None)}, set())


def test_an_occupied_output_is_refused_and_a_crash_leaves_no_finished_cache(teacher_rows, llama_dir, tmp_path,
                                                                          monkeypatch):
    rows, lps = teacher_rows
    pq.write_table(axolotl_table(rows * 20, lps * 20), tmp_path / "a.parquet")  # duplicates: 4 distinct rows
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match="not empty"):
        run_import(ImportSettings(source=str(tmp_path / "a.parquet"), out=str(tmp_path / "busy"),
                                  teacher=str(llama_dir)))
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"

    many = [r + [7] * i for i in range(1, 9) for r in rows[:3]]  # 24 distinct rows, 3 shards of 8
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        many_lps = [torch.log_softmax(model(torch.tensor([r])).logits[0], -1).numpy() for r in many]
    pq.write_table(axolotl_table(many, many_lps), tmp_path / "many.parquet")
    real = importer.CacheWriter.write_shard
    calls = []

    def crash(self, split, index, targets, stats):
        calls.append(index)
        if index == 1:
            raise KeyboardInterrupt
        return real(self, split, index, targets, stats)

    monkeypatch.setattr(importer.CacheWriter, "write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        run_import(ImportSettings(source=str(tmp_path / "many.parquet"), out=str(tmp_path / "cut"),
                                  teacher=str(llama_dir),
                                  rows_per_shard=8), log=lambda m: None)
    assert calls == [0, 1]
    no_cache(tmp_path / "cut")
    monkeypatch.setattr(importer.CacheWriter, "write_shard", real)
    with pytest.raises(StorageError, match="not empty"):
        run_import(ImportSettings(source=str(tmp_path / "many.parquet"), out=str(tmp_path / "cut"),
                                  teacher=str(llama_dir)))
    c = run_import(ImportSettings(source=str(tmp_path / "many.parquet"), out=str(tmp_path / "cut"),
                                  teacher=str(llama_dir),
                                  rows_per_shard=8, overwrite=True), log=lambda m: None)
    assert c.manifest.splits["train"].rows == 24 and c.manifest.splits["train"].shards == 3
    assert verify(str(tmp_path / "cut")) == []


def test_the_command_imports_splits_and_says_which_terms_are_exact(assistant_cache, bos_llama_dir, tmp_path):
    export(Cache(str(assistant_cache)), tmp_path / "x", log=lambda m: None)
    run = cli("import", tmp_path / "x", tmp_path / "c", "--teacher", bos_llama_dir, "--skip-alignment-check")
    assert run.returncode == 0, run.stderr
    assert "NOT CHECKED" in run.stdout
    assert "imported     axolotl layout; log-probs normalised over the whole vocabulary" in run.stdout
    exact = next(line for line in run.stdout.splitlines() if line.startswith("exact"))
    assert "kd_forward" in exact and "nll_match" in exact
    assert set(Cache(str(tmp_path / "c")).splits) == set(Cache(str(assistant_cache)).splits)
    bad = cli("import", tmp_path / "x", tmp_path / "c", "--teacher", bos_llama_dir)
    assert bad.returncode == 2 and "error:" in bad.stderr and "holds a cache" in bad.stderr



@pytest.mark.slow
def test_a_source_and_a_cache_in_a_bucket(assistant_cache, bos_llama_dir, s3, tmp_path):
    """Both ends on S3 (moto on localhost, through s3fs as a user's bucket): the same cache as from local disk."""
    import s3fs

    fs = s3fs.S3FileSystem()
    if not fs.exists("imports"):
        fs.mkdir("imports")
    export(Cache(str(assistant_cache)), tmp_path / "x", log=lambda m: None)
    fs.put(str(tmp_path / "x"), "imports/src", recursive=True)
    remote = run_import(ImportSettings(source="s3://imports/src", out="s3://imports/cache", teacher=str(bos_llama_dir),
                                       check_alignment=False), log=lambda m: None)
    local = run_import(ImportSettings(source=str(tmp_path / "x"), out=str(tmp_path / "local"),
                                      teacher=str(bos_llama_dir),
                                      check_alignment=False), log=lambda m: None)
    assert verify("s3://imports/cache") == []
    assert remote.manifest.splits == local.manifest.splits
    for split in local.splits:
        assert remote.rows(split).equals(local.rows(split))
        for f in ("topk_ids", "topk_logprobs", "logsumexp", "target_logprob"):
            np.testing.assert_array_equal(remote.array(split, f)[:], local.array(split, f)[:])


def test_ids_beyond_65535_keep_their_values(bigvocab_dir, tmp_path):
    """A 70,000-row LM head: ids are stored as int32, and ids past the tokenizer's length but inside the head are
    accepted (the vocabulary is the config's vocab_size)."""
    rng = np.random.default_rng(3)
    rows, ids, lps = [], [], []
    for n in (12, 30):
        rows.append(rng.integers(0, 400, size=n).tolist())
        top = np.stack([rng.choice(np.arange(60_000, 70_000), size=K, replace=False) for _ in range(n)])
        p = np.sort(rng.dirichlet(np.ones(K), size=n), axis=-1)[:, ::-1] * 0.5
        p[0] = 0  # position 0 predicts no token: -inf
        ids.append(top.tolist())
        lps.append(np.log(p).tolist())
    pq.write_table(pa.table({"input_ids": rows, "target_token_ids": ids, "target_logprobs": lps}), tmp_path / "b.parquet")
    c = run_import(ImportSettings(source=str(tmp_path / "b.parquet"), out=str(tmp_path / "c"),
                                  teacher=str(bigvocab_dir),
                                  check_alignment=False), log=lambda m: None)  # random ids: nothing to align
    assert c.manifest.fields["topk_ids"].dtype == "int32" and c.manifest.teacher.vocab_size == 70_000
    t = c.rows("train")
    for j, n in enumerate(t.column("length").to_pylist()):
        i = [len(r) for r in rows].index(n)
        np.testing.assert_array_equal(c.array("train", "topk_ids")[j, : n - 1], np.asarray(ids[i])[1:])


def test_a_row_in_two_splits_is_kept_in_the_held_out_one(teacher_rows, llama_dir, tmp_path):
    rows, lps = teacher_rows
    (tmp_path / "src" / "train").mkdir(parents=True)
    (tmp_path / "src" / "validation").mkdir()
    pq.write_table(axolotl_table(rows, lps), tmp_path / "src" / "train" / "a.parquet")  # 4 distinct rows
    pq.write_table(axolotl_table(rows[:1], lps[:1]), tmp_path / "src" / "validation" / "a.parquet")
    c = run_import(ImportSettings(source=str(tmp_path / "src"), out=str(tmp_path / "c"),
                                  teacher=str(llama_dir)), log=lambda m: None)
    assert c.manifest.splits["validation"].rows == 1 and c.manifest.splits["train"].rows == 3
    assert not set(c.rows("train").column("key").to_pylist()) & set(c.rows("validation").column("key").to_pylist())
    with pytest.raises(StorageError, match="overlap"):
        run_import(ImportSettings(source=str(tmp_path / "src"), out=str(tmp_path / "src" / "cache"),
                                  teacher=str(llama_dir),
                                  overwrite=True))
    assert (tmp_path / "src" / "train" / "a.parquet").exists()


def test_the_on_policy_loop_takes_an_imported_cache_of_its_own_teacher_only(teacher_rows, llama_dir, tmp_path):
    from types import SimpleNamespace

    from pipeline.onpolicy.loop import _check_cache_teacher

    rows, lps = teacher_rows
    pq.write_table(axolotl_table(rows, lps), tmp_path / "a.parquet")
    c = run_import(ImportSettings(source=str(tmp_path / "a.parquet"), out=str(tmp_path / "c"),
                                  teacher=str(llama_dir)), log=lambda m: None)
    fp = c.manifest.tokenizer.fingerprint
    _check_cache_teacher(c, "offline cache", fp, "ab" * 32, SimpleNamespace(teacher=SimpleNamespace(model=str(llama_dir))))
    with pytest.raises(CacheError, match="imported with the teacher named"):
        _check_cache_teacher(c, "offline cache", fp, "ab" * 32, SimpleNamespace(teacher=SimpleNamespace(model="other")))


# ---------------------------------------------------------------------------------------------
# trust at the edges: misaligned and malformed sources, the statistics


def shifted(table: pa.Table, by: int, mask_first: bool = False) -> pa.Table:
    """Every row's targets moved `by` positions (-1: one earlier, the mistake of a converter that stores the
    distribution where it is computed; +1: one later); with `mask_first`, a target_mask of 0 at position 0 and
    where the move left no entries."""
    cols = {c: table.column(c).to_pylist() for c in ("target_token_ids", "target_logprobs")}
    k = len(cols["target_token_ids"][0][1])
    for c, fill in (("target_token_ids", list(range(k))), ("target_logprobs", [float("-inf")] * k)):
        cols[c] = [v[1:] + [fill] if by < 0 else [fill] + v[:-1] for v in cols[c]]
    out = table.set_column(1, "target_token_ids", pa.array(cols["target_token_ids"])).set_column(
        2, "target_logprobs", pa.array(cols["target_logprobs"]))
    if mask_first:
        masks = [[[0] * k] + [[1] * k] * (len(r) - 2) + [[1 if by < 0 else 0] * k]
                 for r in table.column("input_ids").to_pylist()]
        for m in masks:
            m[-1 if by < 0 else 1] = [0] * k
        out = out.append_column("target_mask", pa.array(masks, pa.list_(pa.list_(pa.int8()))))
    return out


def test_a_source_shifted_by_one_position_is_refused_and_the_aligned_one_recorded(teacher_model, llama_dir,
                                                                                    tmp_path):
    rows = sampled_rows(teacher_model, (30, 41, 25, 36, 50, 28), seed=1)
    with torch.no_grad():
        lps = [torch.log_softmax(teacher_model(torch.tensor([r])).logits[0], -1).numpy() for r in rows]
    good = axolotl_table(rows, lps)
    pq.write_table(good, tmp_path / "good.parquet")
    logs = []
    c = run_import(ImportSettings(source=str(tmp_path / "good.parquet"), out=str(tmp_path / "c"),
                                  teacher=str(llama_dir)), log=logs.append)
    share = c.manifest.imported.alignment["train"]
    assert share["0"] > 0.6 and share["-1"] < 0.25 and share["+1"] < 0.25, share
    assert c.manifest.imported.alignment_checked is True
    assert any("the token a position predicts is among its entries at" in line for line in logs)

    def refused(table, match, name):
        pq.write_table(table, tmp_path / f"{name}.parquet")
        with pytest.raises(DataError, match=match):
            run_import(ImportSettings(source=str(tmp_path / f"{name}.parquet"), out=str(tmp_path / f"{name}-out"),
                                      teacher=str(llama_dir)), log=lambda m: None)
        assert not (tmp_path / f"{name}-out" / "manifest.json").exists()

    # one position early with position 0 masked (the export, shifted): the shares name the shift
    refused(shifted(good, -1, mask_first=True), r"split train: the targets do not line up .* shift \+1: [6-9]\d\.\d%"
            r".*move every position's targets one position later", "early")
    # one position early, position 0 left real: refused at the first row, before any statistics
    refused(shifted(good, -1), r"row 0 position 0: real target entries at a row's first position", "early0")
    refused(shifted(good, +1), r"shift -1: [6-9]\d\.\d%.*predict token t - 1", "late")
    # the statistics are measured and recorded even when the check is skipped
    pq.write_table(shifted(good, +1, mask_first=True), tmp_path / "late2.parquet")
    c = run_import(ImportSettings(source=str(tmp_path / "late2.parquet"), out=str(tmp_path / "late2-out"),
                                  teacher=str(llama_dir),
                                  check_alignment=False), log=lambda m: None)
    assert c.manifest.imported.alignment_checked is False and c.manifest.imported.alignment["train"]["-1"] > 0.6


def test_the_command_refuses_a_shifted_source_with_exit_2(teacher_model, llama_dir, tmp_path):
    rows = sampled_rows(teacher_model, (30, 41, 25, 36), seed=2)
    with torch.no_grad():
        lps = [torch.log_softmax(teacher_model(torch.tensor([r])).logits[0], -1).numpy() for r in rows]
    pq.write_table(shifted(axolotl_table(rows, lps), -1, mask_first=True), tmp_path / "s.parquet")
    run = cli("import", tmp_path / "s.parquet", tmp_path / "c", "--teacher", llama_dir)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert [line for line in run.stderr.splitlines() if line.startswith("error:")][0].count("one position later") == 1
    assert not (tmp_path / "c" / "manifest.json").exists()


@pytest.mark.parametrize("kind", ["truncated parquet", "a JSON line that is not an object", "a string among the "
                                  "token ids (JSON Lines)", "strings as token ids (Parquet)", "ids as one integer"])
def test_a_malformed_source_is_one_error_naming_the_file(kind, teacher_rows, llama_dir, tmp_path):
    rows, lps = teacher_rows
    good = axolotl_table(rows, lps)
    if kind == "truncated parquet":
        pq.write_table(good, tmp_path / "full.parquet")
        src = tmp_path / "part.parquet"
        src.write_bytes((tmp_path / "full.parquet").read_bytes()[:3000])
        where = "part.parquet"
    elif "JSON" in kind:
        src = tmp_path / "part.jsonl"
        recs = good.to_pylist()
        lines = [json.dumps(r).replace("-Infinity", "-1e30") for r in recs]
        if "not an object" in kind:
            lines[2] = json.dumps([1, 2, 3])
        else:
            rec = json.loads(lines[3])
            rec["input_ids"][4] = "the"
            lines[3] = json.dumps(rec)
        src.write_text("\n".join(lines) + "\n")
        where = "part.jsonl line 3" if "not an object" in kind else "part.jsonl line 4"
    else:
        table = good.set_column(0, "input_ids", pa.array([[str(t) for t in r] for r in rows])) \
            if "strings" in kind else good.set_column(0, "input_ids", pa.array([r[0] for r in rows]))
        src = tmp_path / "part.parquet"
        pq.write_table(table, src)
        where = "part.parquet"
    with pytest.raises(DataError) as e:
        run_import(ImportSettings(source=str(src), out=str(tmp_path / "c"), teacher=str(llama_dir)), log=lambda m: None)
    assert where in str(e.value)
    assert not (tmp_path / "c" / "manifest.json").exists()
    run = cli("import", src, tmp_path / "c2", "--teacher", llama_dir)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and where in errors[0], run.stderr


def test_the_mean_mass_is_the_k_kept_entries_over_the_trained_positions(teacher_rows, llama_dir, tmp_path):
    """vLLM lists the prompt token beside the top K; labels leave positions untrained: neither counts."""
    rows, lps = teacher_rows
    (tmp_path / "src").mkdir()
    write_vllm(rows, lps, tmp_path / "src" / "a.parquet", "structs")
    t = pq.read_table(tmp_path / "src" / "a.parquet")
    labels = [[-100 if p % 4 == 1 else tok for p, tok in enumerate(r)] for r in rows]
    pq.write_table(t.append_column("labels", pa.array(labels)), tmp_path / "src" / "a.parquet")
    c = run_import(ImportSettings(source=str(tmp_path / "src" / "a.parquet"), out=str(tmp_path / "c"),
                                  teacher=str(llama_dir)),
                   log=lambda m: None)
    mass, n = 0.0, 0
    for r, lp, lab in list(zip(rows, lps, labels))[:3] + [(rows[4], lps[4], labels[4])]:  # the duplicate once
        for p in range(1, len(r)):
            if lab[p] != -100:
                mass += float(np.sort(np.exp(lp[p - 1]))[::-1][:K].sum())
                n += 1
    m = c.manifest
    assert m.imported.mean_mass == pytest.approx(mass / n, rel=1e-7)  # the source's float32 log-probs
    assert m.stats.mean_topk_mass == pytest.approx(mass / n, rel=1e-7)


def test_a_trained_position_without_a_real_entry_is_refused(teacher_rows, llama_dir, tmp_path):
    rows, lps = teacher_rows
    t = axolotl_table(rows, lps)
    lp = t.column("target_logprobs").to_pylist()
    lp[2][3] = [float("-inf")] * K  # no target, yet trained (no mask, no -100 label)
    pq.write_table(t.set_column(2, "target_logprobs", pa.array(lp)), tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"row 2 position 3: a trained position holds no real target entry"):
        run_import(ImportSettings(source=str(tmp_path / "e.parquet"), out=str(tmp_path / "c"), teacher=str(llama_dir)),
                   log=lambda m: None)
    assert not (tmp_path / "c" / "manifest.json").exists()
