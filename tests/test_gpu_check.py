"""`make gpu-check` (benchmarks/gpu_check.py): its whole flow at tiny shapes on the CPU (--cpu-smoke; its multi-GPU
part on 2 CPU ranks), every stage in one table and the float64 comparison passed; that comparison failing targets one position off; and, with no CUDA
device, nothing measured and exit status 3."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
NO_CUDA = "gpu-check: no CUDA device visible (torch.cuda.is_available() is False); nothing measured"
STAGES = ["device", "random teacher: build", "random teacher: bare forward", "random teacher: capture top-K",
          "random teacher: capture top-K + 3 hidden", "random teacher: float64 check",
          "student: cache with final hidden", "student step: CE", "student step: cached KD (kd_forward)",
          "student step: full-vocabulary KD (kd_full_forward)", "students x2: ddp", "students x2: fsdp",
          "capture x2: tensor parallel (tp_size 2)", "capture: device_map over 2", "SmolLM2: teacher",
          "SmolLM2: bare forward",
          "SmolLM2: capture top-K", "SmolLM2: capture top-K + 3 hidden", "SmolLM2: float64 check", "torchrun smoke"]


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)


def table(stdout: str) -> dict[str, tuple[str, str]]:
    """{stage: (status, result)} from the markdown table the check prints."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| stage |")]
    return {cells[0][2:]: (cells[1], cells[2]) for cells in (line.split(" | ") for line in lines)}


@pytest.mark.slow  # the whole flow, the real SmolLM2 teacher when converted, and a torchrun launch (~1 min)
def test_cpu_smoke_reports_every_stage_and_passes_the_float64_check(tmp_path):
    out = tmp_path / "check.json"
    res = gpu_check("--cpu-smoke", "--out", str(out), "--workdir", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = table(res.stdout)
    assert list(rows) == STAGES
    assert rows["random teacher: float64 check"][0] == "PASS", rows["random teacher: float64 check"]
    smollm2 = rows["SmolLM2: float64 check"][0]
    assert smollm2 == ("PASS" if (ROOT / "data/teachers/SmolLM2-135M-Instruct/model.safetensors").is_file()
                       else "not run"), rows["SmolLM2: float64 check"]
    assert rows["torchrun smoke"][0] == "PASS"
    assert "MiB per rank over 2 ranks" in rows["students x2: fsdp"][1] and "x ddp's memory" in rows["students x2: fsdp"][1]
    assert "tokens/s" in rows["capture x2: tensor parallel (tp_size 2)"][1]
    assert "tensor parallel:" in rows["capture: device_map over 2"][1]
    assert all(status in ("ok", "PASS", "not run") for status, _ in rows.values()), rows
    report = json.loads(out.read_text())["gpu_check"]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"gpu_check": report}  # the JSON line, as written
    assert report["ok"] and [s["stage"] for s in report["stages"]] == STAGES
    check = next(s for s in report["stages"] if s["stage"] == "random teacher: float64 check")["figures"]
    assert check["topk_logprob_max_error"] < 0.01 and check["top1_agreement"] >= 0.99
    assert list(tmp_path.iterdir()) == [out]  # the scratch folder (teachers, caches) is gone


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the check would measure it")
def test_without_cuda_it_says_so_measures_nothing_and_exits_3(tmp_path):
    res = gpu_check("--out", str(tmp_path / "check.json"))
    assert res.returncode == 3, res.stderr[-3000:]
    assert NO_CUDA in res.stderr
    assert not (tmp_path / "check.json").exists()


def test_the_float64_check_fails_targets_one_position_off(tmp_path):
    import zarr

    from pipeline.capture.run import run_capture
    from pipeline.format import Cache
    from pipeline.format.specs import numcodecs_quiet

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    sizes = check.CPU_SMOKE
    teacher = check.build_teacher(check.TINY, sizes.dtype, "cpu", tmp_path / "tokenizer", tmp_path / "teacher").value
    bench = check.Bench("tiny", teacher, sizes, tmp_path, peak=None)
    root = Path(run_capture(bench.config("topk"), log=lambda m: None, progress=False).root)
    assert check.float64_check(bench, root).passed
    part = Cache(root).parts("train")[0].path
    for field in ("topk_ids", "topk_logprobs"):
        with numcodecs_quiet():
            stored = zarr.open_array(str(root / part / field), mode="r+")
        stored[:] = np.roll(stored[:], 1, axis=1)  # each position holds its predecessor's targets
    shifted = check.float64_check(bench, root)
    assert not shifted.passed and shifted.figures["top1_agreement"] < 0.5, shifted.result


def test_the_multi_gpu_part_says_it_is_skipped_with_one_gpu(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    monkeypatch.setattr(check.multi, "ranks_for", lambda device: 1)
    report = check.Report()
    check.multi_stages(report, None, None, check.GPU, tmp_path)
    assert [(r.stage, r.status) for r in report.rows] == [("multi-GPU", "not run")]
    assert "1 GPU visible" in report.rows[0].result and "needs 2 or more" in report.rows[0].result
    assert not report.failed
