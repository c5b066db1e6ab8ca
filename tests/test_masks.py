"""Caches of chat data and of document-masked packed rows, against the teacher's own forward pass, and
students that train under the same masks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import capture, settings
from conftest import STUDENT_ARCH as ARCH
from transformers import AutoModelForCausalLM

from pipeline.format import Cache, row_column
from pipeline.student_config import StudentRunConfig
from pipeline.train.dataset import CacheBatches, make_loader
from pipeline.errors import StudentError
from pipeline.train.metrics import evaluate
from pipeline.train.recipe import train_students
from pipeline.train.step import step_losses
from pipeline.train.signal import batch_masks

REPO = Path(__file__).resolve().parents[1]


def _split(root, split="train"):
    c = Cache(root)
    rows = c.rows(split)
    ids = row_column(rows, "input_ids", np.int64)
    lengths = rows.column("length").to_numpy()
    return c, rows, ids, lengths, {f: c.array(split, f)[:] for f in c.dense_fields}


def _segments(pos: np.ndarray, n: int) -> list[tuple[int, int]]:
    starts = list(np.flatnonzero(pos[:n] == 0)) + [n]
    return list(zip(starts[:-1], starts[1:]))


# ------------------------------------------------------------------------------------------ capture


@pytest.mark.parametrize("teacher", ["bos_llama_dir", "gpt2_dir"])
def test_document_masked_targets_equal_each_document_run_alone(teacher, corpus, tmp_path, request):
    model_dir = request.getfixturevalue(teacher)
    llama = teacher == "bos_llama_dir"
    cap = {"top_k": 8, "hidden_layers": [-1]} | ({"attention_layers": [0]} if llama else {})
    capture(settings(model_dir, corpus, tmp_path / "c", data={"document_mask": True, "max_tokens": 1500},
                     capture=cap))
    c, rows, ids, lengths, f = _split(tmp_path / "c")
    pos = row_column(rows, "position_ids", np.int64)
    assert c.manifest.preparation.document_mask is True and "position_ids" in c.manifest.fields
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager").eval()
    checked = 0
    for i, n in enumerate(lengths):
        for a, b in _segments(pos[i], n):
            with torch.no_grad():
                out = ref(torch.from_numpy(ids[i : i + 1, a:b]), output_hidden_states=True, output_attentions=llama)
            logp = torch.log_softmax(out.logits[0], -1)  # (b - a, V) float64
            np.testing.assert_allclose(f["logsumexp"][i, a:b], torch.logsumexp(out.logits[0], -1).numpy(),
                                       rtol=1e-5, atol=1e-4)
            at_ids = logp.gather(-1, torch.from_numpy(f["topk_ids"][i, a:b].astype(np.int64))).numpy()
            np.testing.assert_allclose(f["topk_logprobs"][i, a:b].astype(np.float64), at_ids, atol=2e-3, rtol=2e-3)
            nxt = ids[i, a + 1 : min(b + 1, n)]  # the row's next tokens, the next document's first one included
            np.testing.assert_allclose(f["target_logprob"][i, a : a + len(nxt)],
                                       logp[np.arange(len(nxt)), torch.from_numpy(nxt)].numpy(), rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(f["hidden_states"][i, 0, a:b].astype(np.float64),
                                       out.hidden_states[-1][0].numpy(), rtol=5e-3, atol=5e-3)
            if llama:  # attention maps: the document alone's, and nothing across documents
                att = f["attentions"][i, 0].astype(np.float64)  # (H, L, L)
                np.testing.assert_allclose(att[:, a:b, a:b], out.attentions[0][0].numpy(), atol=2e-3)
                assert (att[:, a:b, :a] == 0).all()
            checked += 1
    assert checked > len(lengths), "expected rows holding several documents"


@pytest.mark.slow
def test_bos_teacher_cache_records_its_convention_and_inspect_warns_when_rows_lack_it(bos_llama_dir, corpus,
                                                                                      tmp_path):
    capture(settings(bos_llama_dir, corpus, tmp_path / "auto"))
    capture(settings(bos_llama_dir, corpus, tmp_path / "off", data={"bos": False}))
    bos = Cache(tmp_path / "auto").manifest.preparation.bos
    assert bos == {"setting": "auto", "tokenizer_adds_bos": True, "applied": True, "token_id": 2}
    assert Cache(tmp_path / "off").manifest.preparation.bos["applied"] is False
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    res = {name: subprocess.run([sys.executable, "-m", "stages.cli", "inspect", str(tmp_path / name)], env=env,
                                capture_output=True, text=True) for name in ("auto", "off")}
    assert res["auto"].returncode == 0 and "warning" not in res["auto"].stderr
    assert "row start    BOS (id 2)" in res["auto"].stdout
    assert res["off"].returncode == 0
    assert "puts BOS (id 2) first, but" in res["off"].stderr and "do not start with it" in res["off"].stderr


def test_first_rows_check_reports_the_teachers_nll(bos_llama_dir, corpus, tmp_path):
    from pipeline.capture.run import run_capture
    from pipeline.config import TeacherCacheConfig

    lines = []
    run_capture(TeacherCacheConfig.model_validate(settings(bos_llama_dir, corpus, tmp_path / "c")), log=lines.append,
                progress=False)
    check = [x for x in lines if x.startswith("first-rows check")]
    assert check and "with BOS" in check[0]
    # a random-init teacher is close to a uniform guess: that is said loudly
    assert any(x.startswith("warning: the teacher's NLL on the first") for x in lines)


class _FakeComputer:
    """target log-prob of token t+1: -1 when the row starts with BOS, -3 otherwise, minus 0.01 * its id."""

    def __init__(self, bos: int):
        self.bos = bos

    def __call__(self, ids, lengths, position_ids=None):
        nxt = np.roll(ids, -1, axis=1).astype(np.float64)
        lp = np.where(ids[:, :1] == self.bos, -1.0, -3.0) - 0.01 * nxt
        lp[np.arange(ids.shape[1])[None] >= lengths[:, None] - 1] = np.nan
        return type("T", (), {"target_logprob": lp})()


def test_first_rows_check_warns_when_the_other_bos_choice_is_better():
    from pipeline.capture.checks import first_rows_check
    from pipeline.capture.rows import Rows
    from pipeline.models import TeacherSpec

    spec = TeacherSpec("llama", 1000, 8, 1, 1, None, None, None, None)
    tok = type("Tok", (), {"bos_token_id": 7})()
    ids = np.tile(np.arange(10, 26, dtype=np.int32), (3, 1))
    rows = Rows(ids, np.full(3, 16, dtype=np.int32), ["a", "b", "c"])
    without = {"bos": {"applied": False, "setting": False}}
    # both variants predict the same tokens, ids 11..24: mean id 17.5
    lines = first_rows_check(_FakeComputer(7), rows, tok, without, spec)
    assert lines[0].startswith("warning: the teacher predicts the first rows better with a leading BOS (1.175 vs 3.175")
    with_bos = Rows(np.concatenate([np.full((3, 1), 7, np.int32), ids[:, :-1]], 1), rows.lengths, rows.keys)
    lines = first_rows_check(_FakeComputer(7), with_bos, tok, {"bos": {"applied": True, "setting": "auto"}}, spec)
    assert not any(x.startswith("warning") for x in lines) and "1.175 with BOS, 3.175 without" in lines[-1]


def test_a_model_that_attends_across_documents_is_refused():
    from pipeline.attention import DocumentMaskError, check_document_masking

    emb = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))

    def leaky(ids, pos):  # a running mean over the whole row, blind to position ids
        x = emb[ids]
        return x.cumsum(1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]

    with pytest.raises(DocumentMaskError, match="does not keep packed documents apart"):
        check_document_masking(leaky, 50, "cpu", "toy model")

    def per_document(ids, pos):
        if pos is None:
            return leaky(ids, None)
        starts = [int(i) for i in torch.nonzero(pos[0] == 0).flatten()] + [ids.shape[1]]
        return torch.cat([leaky(ids[:, a:b], None) for a, b in zip(starts[:-1], starts[1:])], 1)

    check_document_masking(per_document, 50, "cpu", "toy model")  # no error

    def slightly_leaky(ids, pos):  # 0.1% of the previous documents' mean leaks in: refused at any tolerance
        return per_document(ids, pos) + 1e-3 * leaky(ids, None)

    with pytest.raises(DocumentMaskError):
        check_document_masking(slightly_leaky, 50, "cpu", "toy model", rel_tol=5e-2)


# ------------------------------------------------------------------------------------------ students


@pytest.fixture(scope="module")
def chat_cache(chat_llama_dir, conversations, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "cache"
    capture(settings(chat_llama_dir, conversations, out,
                     data={"format": "messages", "loss_mask": "assistant", "document_mask": True, "seq_len": 128,
                           "max_tokens": 4000, "validation_fraction": 0.2},
                     capture={"top_k": 8, "rows_per_shard": 8, "rows_per_chunk": 4}))
    return out


def _student(cache_root, **kw):
    from pipeline.student_config import StudentConfig
    from pipeline.train.student_init import build_student

    c = Cache(cache_root)
    spec = StudentConfig.model_validate({"name": "s", "arch": ARCH, **kw})
    return spec, build_student(spec, c.manifest, c.tokenizer(), torch.device("cpu")), c


def _first_batch(root, fields=("topk_ids", "topk_logprobs", "logsumexp", "target_logprob")):
    ds = CacheBatches(root, "train", list(fields), 4, shuffle=False)
    return next(iter(make_loader(ds)))


def _loss_and_grads(model, batch, spec, manifest):
    model.zero_grad()
    terms = step_losses(model, batch, spec, manifest, torch.device("cpu"))
    terms["total"].backward()
    return {k: float(v.detach()) for k, v in terms.items()}, [p.grad.clone() for p in model.parameters()]


def test_students_ignore_targets_where_the_loss_mask_is_off(chat_cache):
    spec, model, c = _student(chat_cache, losses={"kd_forward": 1.0, "kd_reverse": 0.5, "ce": 0.5,
                                                  "nll_match": 0.2, "mse_logits": 0.1})
    batch = _first_batch(chat_cache)
    masks = batch_masks(batch, torch.device("cpu"))
    off = masks.real & ~masks.kd
    assert off.any() and masks.kd.any() and (masks.kd != masks.real).any()
    base, grads = _loss_and_grads(model, batch, spec, c.manifest)

    g = torch.Generator().manual_seed(1)

    def scramble(where):
        b = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
        b["topk_ids"][where] = torch.randint(0, 400, b["topk_ids"][where].shape, generator=g, dtype=torch.int32)
        b["topk_logprobs"][where] = -10 * torch.rand(b["topk_logprobs"][where].shape, generator=g)
        b["logsumexp"][where] = 5 * torch.rand(b["logsumexp"][where].shape, generator=g)
        b["target_logprob"][where] = -torch.rand(b["target_logprob"][where].shape, generator=g)
        return b

    same, grads_same = _loss_and_grads(model, scramble(off), spec, c.manifest)
    assert same == base
    for a, b in zip(grads, grads_same):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    changed, _ = _loss_and_grads(model, scramble(masks.kd), spec, c.manifest)  # the same scramble where it trains: it counts
    assert all(changed[k] != base[k] for k in ("kd_forward", "kd_reverse", "nll_match", "mse_logits"))
    # CE is the mean over the trained positions with a next token, and only those
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch["input_ids"], **masks.forward).logits.double(), -1)
        nxt = torch.roll(batch["input_ids"], -1, 1)
        ce = -logp.gather(-1, nxt[..., None])[..., 0][masks.ce].mean()
    assert base["ce"] == pytest.approx(float(ce), rel=1e-5)


def test_student_attends_like_the_teacher_did_under_document_masks(chat_cache):
    spec, model, c = _student(chat_cache, losses={"kd_forward": 1.0})
    batch = _first_batch(chat_cache)
    masks = batch_masks(batch, torch.device("cpu"))
    assert "position_ids" in masks.forward and "attention_mask" not in masks.forward
    model.eval()
    segments = 0
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], **masks.forward).logits
        for i, n in enumerate(batch["length"].tolist()):
            for a, b in _segments(batch["position_ids"][i].numpy(), n):
                alone = model(input_ids=batch["input_ids"][i : i + 1, a:b]).logits[0]
                torch.testing.assert_close(packed[i, a:b], alone, rtol=1e-4, atol=1e-4)
                segments += 1
    assert segments > len(batch["length"]), "expected rows holding several conversations"


def test_evaluation_counts_trained_positions_only(chat_cache):
    spec, model, c = _student(chat_cache, losses={"kd_forward": 1.0})
    ds = CacheBatches(chat_cache, "validation", ["topk_ids", "topk_logprobs", "logsumexp"], 4, shuffle=False)
    m = evaluate(model, make_loader(ds), torch.device("cpu"))
    rows = c.rows("validation")
    mask = row_column(rows, "loss_mask", bool)
    lengths = rows.column("length").to_numpy()
    has_next = np.arange(mask.shape[1])[None] < (lengths[:, None] - 1)
    assert m["tokens"] == int((mask & has_next).sum()) < int(has_next.sum())


def _twin_with_scrambled_targets(src: Path, dest: Path, where: str) -> None:
    """A copy of a chat cache whose train targets are replaced by noise where the loss mask is off (`where` =
    "off") or on ("on"), at real positions; everything else byte for byte the same."""
    import shutil

    import zarr

    shutil.copytree(src, dest)
    rows = Cache(dest).rows("train")
    mask = row_column(rows, "loss_mask", bool)
    real = np.arange(mask.shape[1])[None] < rows.column("length").to_numpy()[:, None]
    pick = real & (~mask if where == "off" else mask)
    assert pick.any()
    rng = np.random.default_rng(0)
    for field, noise in (("topk_logprobs", lambda n: -10 * rng.random(n)), ("logsumexp", lambda n: 5 * rng.random(n))):
        arr = zarr.open_array(str(dest / "train" / field), mode="r+")
        data = arr[:]
        data[pick] = noise(data[pick].shape).astype(data.dtype)
        arr[:] = data


def test_a_student_run_learns_only_where_the_loss_mask_is_on(chat_cache, tmp_path):
    """The whole recipe (reader, terms, evaluation), not one batch: a run on a cache whose targets are noise
    wherever the mask is off ends with the very same weights and metrics; noise where it is on changes them."""
    def run(root, out):
        cfg = StudentRunConfig.model_validate({
            "cache": str(root), "output_dir": str(out), "batch_size": 4, "max_steps": 4, "eval_every": 2,
            "device": "cpu", "students": [{"name": "s", "arch": ARCH, "losses": {"kd_forward": 0.5, "ce": 0.5}}]})
        report = train_students(cfg, log=lambda m: None, progress=False)[0]
        weights = AutoModelForCausalLM.from_pretrained(out / "s" / "model").state_dict()
        return report, weights

    ref, w_ref = run(chat_cache, tmp_path / "ref")
    _twin_with_scrambled_targets(chat_cache, tmp_path / "off", "off")
    off, w_off = run(tmp_path / "off", tmp_path / "o1")
    _twin_with_scrambled_targets(chat_cache, tmp_path / "on", "on")
    on, w_on = run(tmp_path / "on", tmp_path / "o2")
    assert off["final"] == ref["final"]
    assert all(torch.equal(w_ref[k], w_off[k]) for k in w_ref)
    assert on["final"]["kl"] != ref["final"]["kl"]  # validation reads the same (unscrambled) split
    assert any(not torch.equal(w_ref[k], w_on[k]) for k in w_ref)


def test_student_runs_refuse_other_masking_than_the_caches(chat_cache, corpus, llama_dir, tmp_path):
    def cfg(root, **kw):
        return StudentRunConfig.model_validate({
            "cache": str(root), "output_dir": str(tmp_path / "out"), "batch_size": 4, "max_steps": 4,
            "eval_every": 2, "device": "cpu",
            "students": [{"name": "s", "arch": ARCH, "losses": {"kd_forward": 0.5, "ce": 0.5}}], **kw})

    with pytest.raises(StudentError, match="captured with document_mask = True"):
        train_students(cfg(chat_cache, document_mask=False), log=lambda m: None, progress=False)
    plain = tmp_path / "plain"
    capture(settings(llama_dir, corpus, plain))
    with pytest.raises(StudentError, match="captured with document_mask = False"):
        train_students(cfg(plain, document_mask=True), log=lambda m: None, progress=False)
