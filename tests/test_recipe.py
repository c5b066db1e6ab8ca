"""Stage 2's recipe and term registry: the defects the restructure fixed, each with a test that
fails without its fix."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import capture, settings
from conftest import STUDENT_ARCH as ARCH
from conftest import student_run as run_cfg
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.student_config import StudentConfig
from pipeline.format import Cache, Manifest
from pipeline.train import checkpoint, recipe
from pipeline.train import terms
from pipeline.train.dataset import CacheBatches
from pipeline.errors import StudentError
from pipeline.train.student_init import build_student

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(llama_dir, tmp_path_factory):
    """A copy of the tiny teacher this module may change (the session's stays as it is)."""
    return Path(shutil.copytree(llama_dir, tmp_path_factory.mktemp("teacher") / "llama"))


@pytest.fixture(scope="module")
def cache_dir(teacher, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "cache"
    capture(settings(teacher, corpus, out, data={"max_tokens": 3000, "validation_fraction": 0.15},
                     capture={"top_k": 16, "rows_per_shard": 8, "rows_per_chunk": 4}))
    return out


def _train(cfg, **kw):
    return recipe.train_students(cfg, log=lambda m: None, progress=False, **kw)


def test_the_registry_drives_needs_fields_and_refusals(cache_dir):
    """Everything about a student's terms is derived from the registry: what its forward pass records, which
    capture settings its caches must share, which fields it reads (weight-0 terms: none of these), and which
    mixes are refused. Each property is read from the Term itself, so breaking the derivation fails here."""
    from pipeline.format import Manifest

    spec = StudentConfig(name="s", arch=ARCH, losses={"kd_jsd": 1.0, "hidden_cosine": 0.5, "attn_mse": 0.0})
    assert terms.student_needs(spec) == {"logits", "hidden_states"}  # attn_mse has weight 0: no attention maps
    assert terms.capture_keys(spec) == {"hidden_layers", "hidden_dtype"}
    document = Cache(cache_dir).manifest.to_dict()
    document["fields"]["hidden_states"] = {**document["fields"]["logsumexp"], "dims": ["row", "layer", "position",
                                                                                        "hidden"]}
    manifest = Manifest.from_dict(document)
    assert terms.fields_for(spec, manifest) == ["topk_ids", "topk_logprobs", "logsumexp", "hidden_states"]
    with pytest.raises(StudentError, match="unknown loss terms"):
        terms.check_losses(StudentConfig(name="s", arch=ARCH, losses={"kd_nonsense": 1.0}))
    tail_free = [n for n, t in terms.TERMS.items() if t.tail_free]
    anchors = [n for n, t in terms.TERMS.items() if t.anchors]
    assert set(tail_free) == {"kd_forward_renorm", "mse_logprobs", "mse_logits"} and "ce" in anchors
    for name in tail_free:  # alone: refused; with any anchoring term: accepted; or when asked for explicitly
        with pytest.raises(StudentError, match="ignores the teacher's tail"):
            terms.check_losses(StudentConfig(name="s", arch=ARCH, losses={name: 1.0}))
        for anchor in anchors:
            terms.check_losses(StudentConfig(name="s", arch=ARCH, losses={name: 1.0, anchor: 0.5}))
        terms.check_losses(StudentConfig(name="s", arch=ARCH, losses={name: 1.0}, allow_biased_kd=True))
    for name, t in terms.TERMS.items():  # a classification variant is declared on the same Term, or the term is refused
        assert t.computes("sequence-classification") == (t.classes is not None)
    with pytest.raises(ValueError, match="registered twice"):
        terms.registry(terms.TERMS["ce"], terms.TERMS["ce"])


def test_a_loss_listed_with_weight_zero_is_not_computed(cache_dir, tmp_path):
    """Was: KeyError 'topk_ids' (its fields were not read, but the term was still computed)."""
    students = [{"name": "s", "arch": ARCH, "losses": {"ce": 1.0, "kd_forward": 0.0, "hidden_mse": 0.0}}]
    rep = _train(run_cfg(cache_dir, tmp_path, students, max_steps=2, eval_every=2))[0]  # no hidden states cached
    assert rep["steps"] == 2
    recs = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert recs and all("ce" in r and "kd_forward" not in r for r in recs)


def test_arch_student_ffn_follows_the_teachers_ratio(cache_dir):
    c = Cache(cache_dir)
    t = c.manifest.teacher
    assert t.intermediate_size / t.hidden_size == 2.0  # the tiny teacher: FFN twice its width
    spec = StudentConfig(name="s", arch={"num_layers": 1, "hidden_size": 48, "num_heads": 4}, losses={"ce": 1.0})
    model = build_student(spec, c.manifest, c.tokenizer(), torch.device("cpu"))
    assert model.config.intermediate_size == 96  # was Llama's default 11,008 whatever the width
    document = c.manifest.to_dict()
    del document["teacher"]["intermediate_size"]  # a pre-1.2 manifest
    model = build_student(spec, Manifest.from_dict(document), c.tokenizer(), torch.device("cpu"))
    assert model.config.intermediate_size == 128  # Llama's default ratio 11008/4096 x 48, a multiple of 8


def test_from_teacher_refuses_weights_that_changed_since_the_capture(cache_dir, teacher):
    c = Cache(cache_dir)
    spec = StudentConfig(name="t", from_teacher=2, losses={"ce": 1.0})
    build_student(spec, c.manifest, c.tokenizer(), torch.device("cpu"))  # the same weights: fine
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    model.save_pretrained(teacher)  # the files at the manifest's path now hold other weights
    try:
        with pytest.raises(StudentError, match="is not the .* the cache was made with"):
            build_student(spec, c.manifest, c.tokenizer(), torch.device("cpu"))
    finally:
        with torch.no_grad():
            model.model.norm.weight.sub_(0.5)
        model.save_pretrained(teacher)


@pytest.mark.parametrize("source", ["pretrained", "from_teacher"])
def test_pretrained_and_from_teacher_students_resume_exactly(cache_dir, teacher, tmp_path, source):
    """Was: dropout stayed on for these students, and no RNG state was checkpointed."""
    if source == "pretrained":
        d = tmp_path / "dropout-llama"
        AutoModelForCausalLM.from_pretrained(teacher, attention_dropout=0.3).save_pretrained(d)
        AutoTokenizer.from_pretrained(teacher).save_pretrained(d)
        student = {"name": "s", "pretrained": str(d)}
    else:
        student = {"name": "s", "from_teacher": [0, 2]}
        cfg = json.loads((teacher / "config.json").read_text())
        (teacher / "config.json").write_text(json.dumps({**cfg, "attention_dropout": 0.3}))
    try:
        student |= {"losses": {"kd_forward": 1.0}, "lr": 3e-3}

        class Killed(Exception):
            pass

        def kill_at_3(step):
            if step == 3:
                raise Killed

        full = run_cfg(cache_dir, tmp_path / "full", [student], max_steps=6, eval_every=6, checkpoint_every=2)
        _train(full)
        part = run_cfg(cache_dir, tmp_path / "part", [student], max_steps=6, eval_every=6, checkpoint_every=2)
        with pytest.raises(Killed):
            _train(part, after_step=kill_at_3)
        torch.manual_seed(12345)  # a resumed process starts from another RNG state
        _train(part)
    finally:
        if source == "from_teacher":
            (teacher / "config.json").write_text(json.dumps(cfg))
    a = torch.load(tmp_path / "full" / "s" / "checkpoint" / "state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "s" / "checkpoint" / "state.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    saved = json.loads((tmp_path / "full" / "s" / "model" / "config.json").read_text())
    assert saved["attention_dropout"] == 0.0


def test_loss_values_are_read_from_the_device_at_log_steps_only(cache_dir, tmp_path, monkeypatch):
    """Was: float(v.detach()) per term per micro-batch, a device sync each; now one read per log."""
    calls = []

    def counted(name):
        real = getattr(torch.Tensor, name)

        def counting(self, *a, **k):
            if "/pipeline/" in sys._getframe(1).f_code.co_filename:  # ours, not torch's optimiser bookkeeping
                calls.append(name)
            return real(self, *a, **k)
        return counting

    for name in ("__float__", "item", "tolist"):  # every way a value leaves the device
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    students = [{"name": "s", "arch": ARCH, "losses": {"kd_forward": 0.5, "ce": 0.5, "kd_reverse": 0.1}}]
    counts = []
    for steps in (3, 9):
        calls.clear()
        _train(run_cfg(cache_dir, tmp_path / str(steps), students, max_steps=steps, eval_every=100, log_every=100,
                       grad_accum=2))
        counts.append(len(calls))
    assert counts[0] > 0, "the counter never fired: it would not see a sync either"  # the final log reads values
    assert counts[0] == counts[1], counts  # 12 more micro-batches of three terms, not one more read


def test_evaluation_reads_the_validation_rows_once_for_all_students(cache_dir, tmp_path, monkeypatch):
    reads = []
    real_iter = CacheBatches.__iter__

    def counting(self):
        if self.split == "validation":
            reads.append(1)
        yield from real_iter(self)

    monkeypatch.setattr(CacheBatches, "__iter__", counting)
    students = [{"name": n, "arch": ARCH, "losses": {"ce": 1.0}} for n in ("a", "b", "c")]
    _train(run_cfg(cache_dir, tmp_path, students, max_steps=4, eval_every=2))
    assert len(reads) == 2  # two evaluations, three students: was six reads


def test_resumed_run_writes_each_metric_once(cache_dir, tmp_path):
    class Killed(Exception):
        pass

    def kill_at_5(step):
        if step == 5:
            raise Killed

    cfg = run_cfg(cache_dir, tmp_path, max_steps=8, eval_every=4, checkpoint_every=4, log_every=1)
    with pytest.raises(Killed):
        _train(cfg, after_step=kill_at_5)  # steps 5's records are written, its checkpoint is not
    _train(cfg)
    recs = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["split"], r["step"], r.get("task")) for r in recs]
    assert len(keys) == len(set(keys))
    assert [r["step"] for r in recs if r["split"] == "train"] == list(range(1, 9))


def test_the_saved_model_is_replaced_atomically(cache_dir, tmp_path, monkeypatch):
    cfg = run_cfg(cache_dir, tmp_path, max_steps=2, eval_every=2)
    _train(cfg)
    d = tmp_path / "s" / "model"
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    real = type(AutoModelForCausalLM.from_pretrained(d)).save_pretrained

    def dies_half_way(self, path, *a, **k):
        real(self, path, *a, **k)
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(type(AutoModelForCausalLM.from_pretrained(d)), "save_pretrained", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_model_atomically(AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d), d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # the previous model, whole
    d.rename(d.with_name("model.old"))  # killed between the two renames: the next run puts it back
    checkpoint.recover_model_dir(d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_requires_python_covers_the_standard_library_the_code_imports():
    import tomllib

    need = (3, 11) if any(re.search(r"^\s*import tomllib|^\s*from tomllib", p.read_text(), re.M)
                          for p in list((ROOT / "pipeline").rglob("*.py")) + list((ROOT / "stages").rglob("*.py"))) \
        else (3, 10)
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    low = tuple(int(x) for x in re.match(r">=\s*(\d+)\.(\d+)", spec).groups())
    assert low >= need, f"requires-python {spec}, but tomllib needs {need}"


def test_masked_mean_ignores_nan_at_masked_positions():
    from pipeline.train.losses import masked_mean

    x = torch.tensor([[1.0, float("nan"), 3.0]], requires_grad=True)
    m = torch.tensor([[True, False, True]])
    v = masked_mean(x, m)
    assert float(v.detach()) == 2.0
    v.backward()
    assert torch.isfinite(x.grad).all() and x.grad.tolist() == [[0.5, 0.0, 0.5]]
    assert np.isfinite(float(masked_mean(torch.full((2, 2), float("inf")), torch.zeros(2, 2, dtype=torch.bool))))


def test_a_device_that_cannot_be_had_is_refused_clearly(cache_dir, tmp_path, monkeypatch):
    from pipeline import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(StudentError, match="torch sees no CUDA device"):
        _train(run_cfg(cache_dir, tmp_path, device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a torchrun launch that names one GPU for all
    monkeypatch.setattr(distributed, "ranks", lambda: distributed.Ranks(rank=1, world=2, local_rank=1))
    with pytest.raises(ValueError, match="names one GPU for every rank"):
        distributed.device_for("cuda:0")


def test_a_checkpoint_of_another_ffn_width_is_refused_clearly(cache_dir, tmp_path, monkeypatch):
    """A checkpoint written when an arch student without intermediate_size got another FFN width (before
    widths followed the teacher's ratio): a StudentError naming the setting, not a raw shape error."""
    from pipeline.train import student_init as students_mod

    arch = {"num_layers": 1, "hidden_size": 32, "num_heads": 4}
    cfg = run_cfg(cache_dir, tmp_path, [{"name": "s", "arch": arch, "losses": {"ce": 1.0}}], max_steps=2,
                  eval_every=2)
    _train(cfg)
    monkeypatch.setattr(students_mod, "derived_ffn_width", lambda t, c, h: 11008)
    with pytest.raises(StudentError, match="another shape .* set students\\[\\]\\.arch\\.intermediate_size"):
        _train(cfg.model_copy(update={"max_steps": 4}))


def test_capture_ranks_that_prepared_other_rows_are_refused(monkeypatch):
    from pipeline import distributed
    from pipeline.capture.plan import same_rows_on_every_rank
    from pipeline.errors import CaptureError

    monkeypatch.setattr(distributed, "ranks", lambda: distributed.Ranks(rank=0, world=2, local_rank=0))
    monkeypatch.setattr(distributed, "all_gather", lambda digest: [digest, "0" * 64])  # rank 1 saw other data
    with pytest.raises(CaptureError, match=r"ranks \[1\] prepared other rows or settings than rank 0"):
        same_rows_on_every_rank({"capture": {}}, None)
    monkeypatch.setattr(distributed, "all_gather", lambda digest: [digest, digest])
    same_rows_on_every_rank({"capture": {}}, None)  # the same: no complaint
