"""The multi-GPU part of the GPU check (`gpu_check.py`), run when two or more GPUs are visible (all of them), and in
`--cpu-smoke` on 2 CPU ranks (gloo) so that its code runs without a GPU; with one GPU its row says it is skipped.

  students x N: ddp / fsdp     `torchrun --nproc_per_node N` of a student run on the random teacher's cache, once
                               per layout: each rank's step time (the run's own seconds over its steps) and peak
                               device memory (torch.cuda.max_memory_allocated; on CPU ranks the peak RSS); fsdp's
                               memory against ddp's
  capture x N: tensor parallel `torchrun --nproc_per_node N distill teacher-cache` on the random teacher, with
                               teacher.tp_size the largest divisor of N that divides its heads and key-value heads
                               (N itself for 2, 4 or 8 GPUs): tokens/s (the manifest's)
  capture: device_map over N   one rank placing the same teacher over the N devices (teacher.device_map = "auto"):
                               tokens/s; tensor parallel against it
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ranks_for(device: str) -> int:
    """How many ranks the multi-GPU part runs: every visible GPU; 2 CPU ranks for the CPU smoke run."""
    import torch

    return torch.cuda.device_count() if device == "cuda" else 2


def settings_args(settings: dict) -> list[str]:
    """`-s key=value` options of the command line for `settings` (JSON scalars and lists of strings are TOML)."""
    return [a for key, value in settings.items() for a in ("-s", f"{key}={json.dumps(value)}")]


def torchrun(n: int, args: list[str], timeout: int = 1200) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"torchrun of {n} ranks failed (exit {res.returncode}): {last[:300]}")
    return res


def student_layout(parallel: str, cache: Path, arch: dict, batch: int, steps: int, device: str, work: Path,
                   ddp: dict | None = None) -> tuple[str, dict]:
    """(its row's text, its figures) for a student run of `steps` steps under `parallel` on every rank."""
    n = ranks_for(device)
    out = Path(tempfile.mkdtemp(prefix=f"students-{parallel}-", dir=work))
    settings = {"cache": str(cache), "output_dir": str(out), "parallel": parallel, "batch_size": batch,
                "max_steps": steps, "eval_every": steps, "eval_rows": batch, "log_every": steps, "device": device,
                "students": [{"name": "s", "arch": arch, "losses": {"kd_forward": 0.5, "ce": 0.5},
                              "warmup_steps": 0}]}
    (out / "settings.json").write_text(json.dumps(settings))
    torchrun(n, [__file__, "--student-worker", str(out)])
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(n)]
    ms = max(r["seconds"] for r in ranks) / steps * 1000
    peak = max(r["peak_mib"] for r in ranks)
    figures = {"ranks": n, "ms_per_step": ms, "peak_mib_per_rank": peak, "memory": ranks[0]["memory"]}
    vs = f", {peak / ddp['peak_mib_per_rank']:.2f}x ddp's memory, {ms / ddp['ms_per_step']:.2f}x its step time" \
        if ddp else ""
    return (f"{ms:,.0f} ms/step, peak {ranks[0]['memory']} {peak:,.0f} MiB per rank over {n} ranks{vs}", figures)


def student_worker(out: Path) -> None:
    """One rank of `student_layout`: the run, then this rank's seconds and peak memory."""
    import torch

    from pipeline.student_config import StudentRunConfig
    from pipeline.train.recipe import Recipe

    cfg = StudentRunConfig.model_validate(json.loads((out / "settings.json").read_text()))
    recipe = Recipe(cfg, log=lambda m: None, progress=False)
    recipe.setup()
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    import time

    t0 = time.perf_counter()
    recipe._loop()
    seconds = time.perf_counter() - t0
    recipe.finish()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank-{rank}.json").write_text(json.dumps({"seconds": seconds, "peak_mib": peak,
                                                       "memory": "allocated" if cuda else "RSS"}))


def capture_layout(teacher: Path, settings: dict, tp: int | None, ranks: int, work: Path) -> tuple[str, dict]:
    """(its row's text, its figures) for a capture of the random teacher: `ranks` ranks in groups of `tp`
    (tensor parallel), or (tp None) one rank with a device map over every device."""
    out = Path(tempfile.mkdtemp(prefix="capture-tp-" if tp else "capture-map-", dir=work)) / "cache"
    extra = {"teacher.tp_size": tp} if tp else {"teacher.device_map": "auto"}
    args = ["-m", "stages.cli", "teacher-cache",
            *settings_args({**settings, "teacher.model": str(teacher), "output.dir": str(out), **extra})]
    torchrun(ranks if tp else 1, args)
    manifest = json.loads((out / "manifest.json").read_text())
    rate = manifest["stats"]["timing"]["tokens_per_second"]
    return (f"{rate:,.0f} tokens/s ({manifest['stats']['tokens']:,} tokens)", {"tokens_per_second": rate})


def main() -> None:
    """A rank of `student_layout` (`--student-worker FOLDER`, as torchrun starts it); on its own, this part runs
    inside the GPU check (make gpu-check)."""
    if sys.argv[1:2] != ["--student-worker"] or len(sys.argv) != 3:
        sys.exit("gpu_check_multi.py is the multi-GPU part of benchmarks/gpu_check.py: run make gpu-check")
    sys.path.insert(0, str(REPO))
    student_worker(Path(sys.argv[2]))


if __name__ == "__main__":
    main()
