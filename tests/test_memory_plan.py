"""The memory plan of a student run (`pipeline/train/memory_plan.py`, `distill student --dry-run`, parallel = "auto"):
its counts against real models (parameters, saved activations, logit blocks), its layouts against each other,
and the refusals before any weight loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import STUDENT_ARCH as ARCH
from conftest import capture, settings, student_run, write_toml
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.errors import StudentError
from pipeline.train import memory_plan as memory
from pipeline.train.memory_plan import Batch, StudentShape, activations, footprint, logit_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(llama_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "cache"
    capture(settings(llama_dir, corpus, out, data={"max_tokens": 2000}, capture={"hidden_layers": [-1]}))
    return out


def _saved_bytes(model, ids, autocast: bool) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of the base model, less the parameters and their
    bfloat16 copies (counted as weights and autocast buffers): the activations, each storage once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and tuple(t.shape) not in shapes:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.model(ids)
    return sum(seen.values())


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("width,heads,kv_heads,ffn", [(128, 4, 2, 352), (192, 6, 6, 256)])
def test_activations_per_layer_are_what_a_llama_layer_saves(width, heads, kv_heads, ffn, autocast):
    """The plan's bytes per decoder layer and token against the tensors autograd saves, counted on real CPU
    tensors: the difference between a 3-layer and a 1-layer model, divided by 2 layers."""
    rows, positions = 2, 48
    ids = torch.randint(0, 300, (rows, positions))
    saved = []
    for layers in (1, 3):
        cfg = LlamaConfig(hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, vocab_size=300)
        model = LlamaForCausalLM(cfg)
        saved.append(_saved_bytes(model, ids, autocast))
        shape = StudentShape.from_model("s", model, classifier=False)
    measured = (saved[1] - saved[0]) / 2
    b = Batch(rows, positions, autocast, 0, False)
    per_layer = (activations(replace_layers(shape, 1), b, False) - activations(replace_layers(shape, 0), b, False))
    assert per_layer == pytest.approx(measured, rel=0.03), (per_layer, measured)


def replace_layers(shape: StudentShape, n: int) -> StudentShape:
    from dataclasses import replace

    return replace(shape, layers=n)


def test_the_shape_counts_the_student_the_run_builds(cache_dir, tmp_path):
    """Parameters counted on the meta device equal the built student's (its tied head once, its hidden-state
    projections included), and the largest decoder layer is one of its layers."""
    from pipeline.train.recipe import Recipe

    narrow = {**ARCH, "hidden_size": 16}  # the teacher's 32 wide: projected
    cfg = student_run(cache_dir, tmp_path / "out", students=[{"name": "s", "arch": narrow, "losses": {
        "kd_forward": 1.0, "hidden_mse": 0.5}}], max_steps=1)
    recipe = Recipe(cfg, log=lambda m: None, progress=False)
    recipe.setup()
    st = recipe.students[0]
    shape = recipe.plan.students[0]
    assert shape.params == sum(p.numel() for p in st.module.parameters())
    assert len(st.module.projections) > 0  # counted above
    layer = st.model.model.layers[0]
    assert shape.layer_params == sum(p.numel() for p in layer.parameters())
    assert shape.vocab == st.model.get_output_embeddings().weight.shape[0] and shape.layers == ARCH["num_layers"]


@pytest.mark.parametrize("rows,block_mib", [(2, 0.05), (4, 0.01), (3, 1000)])
def test_logit_blocks_are_the_ones_the_step_makes(rows, block_mib):
    from pipeline.train.step import block_positions

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=1000))
    shape = StudentShape.from_model("s", model, classifier=False)
    positions = 64
    _, block = logit_bytes(shape, Batch(rows, positions, False, block_mib, False))
    made = block_positions(model, rows, block_mib)
    assert block == (made if made < positions else 0)


def test_fsdp_divides_the_state_and_checkpointing_keeps_layer_inputs():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, vocab_size=500))
    s = StudentShape.from_model("s", model, classifier=False)
    b = Batch(4, 128, False, 0, False)
    ddp, fsdp = footprint(s, b, "ddp", 8, False), footprint(s, b, "fsdp", 8, False)
    assert ddp.weights == 4 * s.params and ddp.optimizer == 8 * s.params and ddp.buffers == 4 * s.params
    assert fsdp.weights == 4 * -(-s.params // 8) and fsdp.optimizer == 2 * fsdp.weights
    assert fsdp.activations == ddp.activations and fsdp.logits == ddp.logits
    alone = footprint(s, b, "fsdp", 1, False)  # one process trains unwrapped: no buckets, nothing gathered
    assert alone.buffers == 0 and alone.weights == ddp.weights
    ck = footprint(s, b, "ddp", 8, True)
    assert ck.activations < ddp.activations
    assert ck.activations == activations(replace_layers(s, 0), b, False) + 512 * 4 * 64 * s.layers + (
        activations(replace_layers(s, 1), b, False) - activations(replace_layers(s, 0), b, False))


def _plan(capacity_gib: float, world: int = 2, **kw) -> memory.Plan:
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, vocab_size=500))
    s = StudentShape.from_model("s", model, classifier=False)
    return memory.Plan([s], Batch(4, 128, False, 0, False), world, False, int(capacity_gib * memory.GIB), "cuda",
                       **kw)


def test_auto_takes_ddp_when_a_replica_fits_else_fsdp_and_refusals_name_the_setting():
    roomy = _plan(80)
    assert roomy.resolve("auto") == "ddp" and roomy.resolve("fsdp") == "fsdp"
    ddp, fsdp = roomy.total("ddp"), roomy.total("fsdp")
    assert fsdp < ddp
    between = _plan((ddp + fsdp) / 2 / memory.HEADROOM / memory.GIB)
    assert between.resolve("auto") == "fsdp"
    with pytest.raises(StudentError, match=r"parallel = 'ddp' over 2 ranks.*use parallel = 'fsdp'"):
        between.check("ddp")
    between.check("fsdp")
    assert _plan((ddp + fsdp) / 2 / memory.HEADROOM / memory.GIB, world=1).resolve("auto") == "ddp"
    tiny = _plan(fsdp / 10 / memory.GIB)
    with pytest.raises(StudentError, match=r"a lower batch_size") as e:
        tiny.check("fsdp")
    assert "more ranks" in str(e.value) and "--dry-run" in str(e.value)


def test_dry_run_prints_the_plan_and_exits_non_zero_when_it_cannot_fit(cache_dir, tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    cfg = student_run(cache_dir, tmp_path / "out", students=[{"name": "s", "arch": ARCH, "losses": {
        "kd_forward": 1.0}}]).model_dump(mode="json")
    toml = write_toml(tmp_path / "s.toml", cfg)
    res = CliRunner().invoke(app, ["student", "-c", str(toml), "--dry-run", "--ranks", "4", "--device-gib", "40"])
    assert res.exit_code == 0, res.output
    for part in ("weights", "gradients", "optimizer", "activations", "with activation_checkpointing", "logits",
                 "evaluation", "peak", "4 ranks", "40.0 GiB", "parallel = 'ddp'"):
        assert part in res.output, part
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
    res = CliRunner().invoke(app, ["student", "-c", str(toml), "--ranks", "4"])  # a plan's option, no --dry-run
    assert res.exit_code == 2 and "--ranks and --device-gib plan another launch" in res.output
    assert not (tmp_path / "out").exists()
    res = subprocess.run([sys.executable, "-m", "stages.cli", "student", "-c", str(toml), "--dry-run",
                          "--device-gib", "0.001"], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert res.returncode != 0 and "does NOT fit" in res.stdout
    error = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "a lower batch_size" in error[0] and "Traceback" not in res.stderr


def test_a_run_that_cannot_fit_is_refused_before_any_weight_loads(cache_dir, tmp_path, monkeypatch):
    """The refusal comes before a student is built (no output folder) and names what to change; parallel = "auto"
    on one process trains as ddp, which its checkpoint records."""
    from pipeline.train.recipe import train_students

    built = []
    monkeypatch.setattr("pipeline.train.build.build_student", lambda *a, **k: built.append(1))
    monkeypatch.setattr(memory, "device_capacity", lambda device: 2**20)
    with pytest.raises(StudentError, match="activation_checkpointing = true|a lower batch_size"):
        train_students(student_run(cache_dir, tmp_path / "out"), log=lambda m: None, progress=False)
    assert not built and not (tmp_path / "out" / "s").exists()
    monkeypatch.undo()
    out = tmp_path / "auto"
    train_students(student_run(cache_dir, out, parallel="auto", max_steps=2, eval_every=2), log=lambda m: None,
                   progress=False)
    state = torch.load(out / "s" / "checkpoint" / "state.pt", weights_only=False)
    assert state["identity"]["parallel"] == "ddp"


def test_auto_resumes_in_the_layout_of_its_checkpoints(cache_dir, tmp_path):
    """A run stopped under fsdp (its state in sharded folders) resumes under parallel = "auto" as fsdp, whatever the
    plan would pick now (one process: ddp), instead of refusing a checkpoint of another layout."""
    from pipeline.train import checkpoint
    from pipeline.train.recipe import train_students

    out = tmp_path / "out"
    assert checkpoint.saved_layout(out / "s") is None
    train_students(student_run(cache_dir, out, parallel="fsdp", max_steps=2, eval_every=2), log=lambda m: None,
                   progress=False)
    assert checkpoint.saved_layout(out / "s") == "fsdp"
    said = []
    train_students(student_run(cache_dir, out, parallel="auto", max_steps=4, eval_every=2), log=said.append,
                   progress=False)
    assert any("parallel = 'auto': fsdp, the layout of the checkpoints it resumes" in m for m in said), said
    assert any(m.startswith("resuming at step 2") for m in said)
    state = torch.load(out / "s" / "checkpoint" / "state.pt", weights_only=False)
    assert state["identity"]["parallel"] == "fsdp" and state["run"]["step"] == 4
    ddp = tmp_path / "ddp"
    train_students(student_run(cache_dir, ddp, max_steps=2, eval_every=2), log=lambda m: None, progress=False)
    assert checkpoint.saved_layout(ddp / "s") == "ddp"
