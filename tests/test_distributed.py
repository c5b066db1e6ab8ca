"""Both stages under torchrun: 2 ranks with gloo on CPU, tiny models, the real command line.

- capture: 2 ranks write the same bytes as 1 process (every file; the manifest but for its timing),
  also when a rank is killed mid-capture and the job is rerun (on 2 ranks, or on 1);
- students: 2 DDP ranks, and 2 FSDP ranks (sharded students, sharded checkpoints), reach the weights and metrics
  of 1 process with the same global batch (two students, mutual learning, a hidden-state term through projections,
  two sources), and a 2-rank run killed after a step resumes (DDP on 2 ranks or 1; FSDP on 1) to the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import STUDENT_ARCH as ARCH
from conftest import capture, settings, write_toml

from pipeline.student_config import StudentRunConfig
from pipeline.format import verify
from pipeline.train.recipe import train_students

ROOT = Path(__file__).resolve().parents[1]
DISTILL = str(Path(sys.executable).with_name("distill"))
ENTRY = str(ROOT / "tests" / "dist_entry.py")


pytestmark = pytest.mark.slow  # torchrun with 2 processes

def torchrun(nproc: int, *args: str, env: dict | None = None, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N ...` with one thread per rank (ranks x threads = cores)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    res = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)
    if expect_ok and res.returncode != 0:
        raise AssertionError(f"torchrun failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return res


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def same_cache(a: Path, b: Path) -> None:
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    for rel in fa:
        if rel != "manifest.json":
            assert fa[rel] == fb[rel], rel
    ma, mb = json.loads(fa["manifest.json"]), json.loads(fb["manifest.json"])
    for m in (ma, mb):  # timing and the digest over it are the only differences allowed
        del m["stats"]["timing"], m["digest"]
    assert ma == mb


def _capture_cfg(llama_dir, corpus, out: Path) -> dict:
    return settings(llama_dir, corpus, out, data={"max_tokens": 3000},
                    capture={"top_k": 8, "temperatures": [2.0], "hidden_layers": [-1], "attention_layers": [0],
                             "rows_per_shard": 4, "rows_per_chunk": 2})


@pytest.fixture(scope="module")
def one_rank(llama_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "cache"
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same per-process numerics as each rank's
    try:
        capture(_capture_cfg(llama_dir, corpus, out))
    finally:
        torch.set_num_threads(torch_threads)
    return out


def test_two_rank_capture_writes_the_bytes_of_one(one_rank, llama_dir, corpus, tmp_path):
    """...each rank tokenising about half the documents (in blocks of 8 here), the rows still those of one rank."""
    out = tmp_path / "two"
    cfg = write_toml(tmp_path / "c.toml", _capture_cfg(llama_dir, corpus, out))
    res = torchrun(2, ENTRY, "teacher-cache", "-c", str(cfg),
                   env={"DISTILL_TEST_COUNT_DOCS": str(tmp_path / "docs"), "DISTILL_TEST_DOC_BATCH": "8"})
    assert res.stdout.strip().splitlines() == [str(out)]  # rank 0 alone prints the result
    assert "2 ranks share" in res.stderr
    docs = [json.loads((tmp_path / "docs" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert min(docs) >= 0.4 * sum(docs) and sum(docs) >= 32, docs
    m = json.loads((out / "manifest.json").read_text())
    assert sum(s["shards"] for s in m["splits"].values()) >= 6 and verify(out) == []
    same_cache(one_rank, out)


@pytest.mark.parametrize("rerun_ranks", [2, 1])
def test_killed_rank_loses_only_its_uncommitted_shards(one_rank, llama_dir, corpus, tmp_path, rerun_ranks):
    out = tmp_path / "killed"
    cfg = write_toml(tmp_path / "c.toml", _capture_cfg(llama_dir, corpus, out))
    res = torchrun(2, ENTRY, "teacher-cache", "-c", str(cfg), expect_ok=False,
                   env={"DISTILL_TEST_KILL_RANK": "1", "DISTILL_TEST_KILL_AFTER_SHARDS": "1"})
    assert res.returncode != 0 and not (out / "manifest.json").exists()
    commits = list((out / "_capture" / "commits").glob("*.json"))
    total = sum(s["shards"] for s in json.loads((one_rank / "manifest.json").read_text())["splits"].values())
    assert 1 <= len(commits) < total  # the dead rank's committed shard is kept, the rest is left to do
    res = torchrun(rerun_ranks, "--no-python", DISTILL, "teacher-cache", "-c", str(cfg))
    assert f"resuming: {len(commits)} shards already committed" in res.stderr
    same_cache(one_rank, out)


def test_a_second_launch_on_the_same_cache_is_refused(one_rank, llama_dir, corpus, tmp_path):
    from pipeline.capture.output import writer_lock

    out = tmp_path / "locked"
    out.mkdir()
    cfg = write_toml(tmp_path / "c.toml", _capture_cfg(llama_dir, corpus, out))
    with writer_lock(out):  # another capture holds the cache
        res = torchrun(2, "--no-python", DISTILL, "teacher-cache", "-c", str(cfg), expect_ok=False)
    assert res.returncode != 0
    assert res.stderr.count("another capture is writing") == 2  # rank 0's refusal reaches every rank


# ---------------------------------------------------------------------------------------------- students



def _student_cfg(cache: Path, out: Path, **kw) -> dict:
    students = [
        {"name": "kd", "arch": ARCH, "losses": {"kd_forward": 0.5, "ce": 0.5, "hidden_mse": 0.1}, "lr": 3e-3,
         "warmup_steps": 2, "temperature": 2.0},
        {"name": "ce", "arch": {**ARCH, "hidden_size": 16, "intermediate_size": 32}, "losses": {"ce": 1.0},
         "lr": 3e-3, "warmup_steps": 2},
    ]
    return {"sources": [{"name": "a", "cache": str(cache), "weight": 2.0}, {"name": "b", "cache": str(cache)}],
            "output_dir": str(out), "students": students, "batch_size": 2, "max_steps": 6, "eval_every": 3,
            "log_every": 2, "checkpoint_every": 2, "mutual_weight": 0.3, "num_workers": 2, "device": "cpu", **kw}


def _weights(out: Path, name: str) -> dict:
    return torch.load(out / name / "checkpoint" / "state.pt", weights_only=True)


def _metrics(out: Path, name: str) -> list[dict]:
    recs = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in ("seconds", "lr")}
            for r in recs]


@pytest.fixture(scope="module")
def one_process(one_rank, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-ref")
    cfg = StudentRunConfig.model_validate(_student_cfg(one_rank, out, grad_accum=2))  # 2 micro-batches of 2 rows
    train_students(cfg, log=lambda m: None, progress=False)
    return out


def _same_students(a: Path, b: Path) -> None:
    for name in ("kd", "ce"):
        wa, wb = _weights(a, name), _weights(b, name)
        assert wa["run"]["step"] == wb["run"]["step"] == 6 and wa["run"]["tokens"] == wb["run"]["tokens"]
        assert wa["run"]["stream"] == wb["run"]["stream"]
        for k in wa["model"]:
            torch.testing.assert_close(wa["model"][k], wb["model"][k], rtol=1e-4, atol=1e-5)
        for k in wa["projections"]:
            torch.testing.assert_close(wa["projections"][k], wb["projections"][k], rtol=1e-4, atol=1e-5)
        ma, mb = _metrics(a, name), _metrics(b, name)
        assert len(ma) == len(mb) and {r["split"] for r in ma} == {"train", "validation"}
        for ra, rb in zip(ma, mb):
            assert ra.keys() == rb.keys()
            for k in ra:
                assert ra[k] == pytest.approx(rb[k], abs=1.5e-4), (name, ra["step"], k)


def test_ddp_students_match_one_process_with_the_same_global_batch(one_process, one_rank, tmp_path):
    out = tmp_path / "ddp"
    cfg = write_toml(tmp_path / "s.toml", _student_cfg(one_rank, out, grad_accum=1))  # 2 ranks x 2 rows
    res = torchrun(2, "--no-python", DISTILL, "student", "-c", str(cfg))
    assert res.stdout.strip().splitlines() == [f"{out}/kd/model", f"{out}/ce/model"]
    assert json.loads((out / "kd" / "report.json").read_text())["ranks"] == 2
    _same_students(one_process, out)


@pytest.mark.parametrize("resume_ranks", [2, 1])
def test_ddp_run_killed_after_a_step_resumes(one_process, one_rank, tmp_path, resume_ranks):
    """Killed after step 3 (its validation records written, its checkpoint not): resumed from step 2
    on 2 ranks, or on 1 process with grad_accum 2 (the same micro-batches per step)."""
    out = tmp_path / "ddp-killed"
    cfg = write_toml(tmp_path / "s.toml", _student_cfg(one_rank, out, grad_accum=1))
    res = torchrun(2, ENTRY, "student", "-c", str(cfg), expect_ok=False,
                   env={"DISTILL_TEST_KILL_RANK": "0", "DISTILL_TEST_KILL_AFTER_STEP": "3"})
    assert res.returncode != 0 and _weights(out, "kd")["run"]["step"] == 2
    assert any(r["step"] == 3 for r in _metrics(out, "kd"))  # written after the checkpoint: cut on resume
    if resume_ranks == 2:
        res = torchrun(2, "--no-python", DISTILL, "student", "-c", str(cfg))
        assert "resuming at step 2" in res.stderr
    else:
        train_students(StudentRunConfig.model_validate(_student_cfg(one_rank, out, grad_accum=2)),
                       log=lambda m: None, progress=False)
    _same_students(one_process, out)


def _sharded_weights(out: Path, name: str, tmp: Path) -> dict:
    """A parallel = fsdp student's checkpoint as state.pt's keys of a ddp one: its sharded state read back whole."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    state = _weights(out, name)
    assert len(list((out / name / "checkpoint" / state["sharded"]).glob("*.distcp"))) == state["world_size"]
    whole = tmp / f"{name}-whole.pt"
    dcp_to_torch_save(out / name / "checkpoint" / state["sharded"], whole)
    module = torch.load(whole, weights_only=False)["model"]
    state["model"] = {k.removeprefix("model."): v for k, v in module.items() if k.startswith("model.")}
    state["projections"] = {k.removeprefix("projections."): v for k, v in module.items()
                            if k.startswith("projections.")}
    return state


def _same_sharded_students(reference: Path, out: Path, tmp: Path) -> None:
    """The fsdp run's students equal the one-process ones: weights (tied head and embeddings once), metrics, and the
    model/ folder written from the shards loads as a plain transformers model with the same weights."""
    from transformers import AutoModelForCausalLM

    for name in ("kd", "ce"):
        a, b = _weights(reference, name), _sharded_weights(out, name, tmp)
        assert {k: v for k, v in a["run"].items() if k != "seconds"} == \
            {k: v for k, v in b["run"].items() if k != "seconds"} and "model" not in _weights(out, name)
        for part in ("model", "projections"):
            assert set(a[part]) <= set(b[part])
            for k in a[part]:
                torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-4, atol=1e-5)
        ma, mb = _metrics(reference, name), _metrics(out, name)
        assert len(ma) == len(mb)
        for ra, rb in zip(ma, mb):
            assert ra.keys() == rb.keys() and all(ra[k] == pytest.approx(rb[k], abs=1.5e-4) for k in ra)
        saved = AutoModelForCausalLM.from_pretrained(out / name / "model").state_dict()
        best = AutoModelForCausalLM.from_pretrained(reference / name / "model").state_dict()
        for k in best:
            torch.testing.assert_close(saved[k], best[k], rtol=1e-4, atol=1e-5)
        assert not (out / name / "model" / "sharded").exists()


def test_fsdp_students_match_one_process_and_resume_on_one(one_process, one_rank, tmp_path):
    """parallel = fsdp on 2 ranks (every decoder layer and the rest of each student sharded: two students, mutual
    learning, a hidden-state term through projections, blockwise logit terms, two sources) reaches the weights and
    metrics of one process with the same global batch; killed after step 3, its sharded checkpoint of step 2
    resumes on one process (the shards of 2 ranks read back whole) to the same result."""
    out = tmp_path / "fsdp"
    cfg = write_toml(tmp_path / "s.toml", _student_cfg(one_rank, out, grad_accum=1, parallel="fsdp"))
    res = torchrun(2, "--no-python", DISTILL, "student", "-c", str(cfg))
    assert res.stdout.strip().splitlines() == [f"{out}/kd/model", f"{out}/ce/model"]
    _same_sharded_students(one_process, out, tmp_path)
    killed = tmp_path / "fsdp-killed"
    cfg = write_toml(tmp_path / "k.toml", _student_cfg(one_rank, killed, grad_accum=1, parallel="fsdp"))
    res = torchrun(2, ENTRY, "student", "-c", str(cfg), expect_ok=False,
                   env={"DISTILL_TEST_KILL_RANK": "0", "DISTILL_TEST_KILL_AFTER_STEP": "3"})
    assert res.returncode != 0 and _weights(killed, "kd")["run"]["step"] == 2
    logs = []
    train_students(StudentRunConfig.model_validate(_student_cfg(one_rank, killed, grad_accum=2, parallel="fsdp")),
                   log=logs.append, progress=False)
    assert "resuming at step 2" in logs
    _same_sharded_students(one_process, killed, tmp_path)
    with pytest.raises(Exception, match=r"other settings \(parallel differ\)"):  # a ddp run cannot take it over
        train_students(StudentRunConfig.model_validate(_student_cfg(one_rank, killed, grad_accum=2, max_steps=8)),
                       log=lambda m: None, progress=False)


def test_an_fsdp_checkpoint_of_one_process_resumes_sharded_on_two_ranks(one_process, one_rank, tmp_path):
    """parallel = fsdp on one process writes the same sharded checkpoint layout (one shard); stopped after step 3,
    its checkpoint of step 2 is read by 2 ranks, each taking its half, and the run ends at the uninterrupted
    weights."""
    class Stop(Exception):
        pass

    def stop_at_3(step):
        if step == 3:
            raise Stop

    out = tmp_path / "fsdp-grown"
    with pytest.raises(Stop):
        train_students(StudentRunConfig.model_validate(_student_cfg(one_rank, out, grad_accum=2, parallel="fsdp")),
                       log=lambda m: None, progress=False, after_step=stop_at_3)
    assert _weights(out, "kd")["run"]["step"] == 2 and _weights(out, "kd")["world_size"] == 1
    cfg = write_toml(tmp_path / "s.toml", _student_cfg(one_rank, out, grad_accum=1, parallel="fsdp"))
    res = torchrun(2, "--no-python", DISTILL, "student", "-c", str(cfg))
    assert "resuming at step 2" in res.stderr
    _same_sharded_students(one_process, out, tmp_path)


def test_ddp_students_with_representation_terms_only(one_rank, tmp_path):
    """A student whose loss never reads its logits (the head and the layers past the mapped one get
    no gradient) trains under DDP as in one process."""
    students = [{"name": "attn", "arch": ARCH, "losses": {"attn_kl": 1.0}, "lr": 3e-3},
                {"name": "hid", "arch": ARCH, "losses": {"hidden_mse": 1.0}, "hidden_map": [[1, -1]], "lr": 3e-3}]
    base = {"cache": str(one_rank), "students": students, "batch_size": 2, "max_steps": 3, "eval_every": 3,
            "log_every": 1, "device": "cpu"}
    train_students(StudentRunConfig.model_validate({**base, "output_dir": str(tmp_path / "one"), "grad_accum": 2}),
                   log=lambda m: None, progress=False)
    cfg = write_toml(tmp_path / "s.toml", {**base, "output_dir": str(tmp_path / "two")})
    torchrun(2, "--no-python", DISTILL, "student", "-c", str(cfg))
    for name in ("attn", "hid"):
        a, b = _weights(tmp_path / "one", name), _weights(tmp_path / "two", name)
        assert a["run"]["step"] == b["run"]["step"] == 3
        for k in a["model"]:
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)


def test_teacher_placed_by_a_device_map_writes_the_same_cache(one_rank, llama_dir, corpus, tmp_path, monkeypatch):
    """teacher.device_map goes to transformers/accelerate's placement (here every module on the CPU, the
    one device this machine has, so nothing is dispatched over devices): the targets are the plain
    load's, byte for byte. Placement over several GPUs needs a machine with them."""
    from pipeline.errors import CaptureError

    out = tmp_path / "mapped"
    cfg = _capture_cfg(llama_dir, corpus, out)
    cfg["teacher"] = {**cfg["teacher"], "device_map": {"model.embed_tokens": "cpu", "model.layers": "cpu",
                                                       "model.norm": "cpu", "model.rotary_emb": "cpu",
                                                       "lm_head": "cpu"}}
    from pipeline import models as teacher_mod

    placed, real_load = [], teacher_mod._from_pretrained

    def load(auto_cls, c, **kw):  # what transformers is asked for (one device here: no multi-device dispatch)
        placed.append(kw.get("device_map"))
        return real_load(auto_cls, c, **kw)

    monkeypatch.setattr(teacher_mod, "_from_pretrained", load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capture(cfg)
    finally:
        torch.set_num_threads(threads)
    assert cfg["teacher"]["device_map"] in placed  # the map went to from_pretrained
    same_cache(one_rank, out)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # several ranks on one node would each claim every device
    with pytest.raises(CaptureError, match="one rank per node"):
        capture(_capture_cfg(llama_dir, corpus, tmp_path / "refused") | {"teacher": cfg["teacher"]})
