"""The memory plan (`distill student --dry-run`) against what a run takes, on this machine's CPU ranks (gloo).

    python benchmarks/bench_memory_plan.py [--cases ddp-8,fsdp-16,...] [--steps 2]

Each case trains one student of the default cache's family and vocabulary (SmolLM2's 49,152 tokens, tied
embeddings, kd_forward + ce, AdamW) for `--steps` steps and an evaluation, on 1 process or 2 torchrun ranks
(one thread each). Each case prints the plan's peak per rank for the layout the run used; the peak of the
tensors the training loop held (its steps and evaluations) as torch's tracker counts them
(`torch.distributed._tools.mem_tracker`: the CPU counterpart of torch.cuda.max_memory_allocated); and the
rank's peak RSS (ru_maxrss) less its RSS before the run was set up (the Python, torch and library baseline),
which adds the cache reader's batches, the held-out sets and what the allocator keeps. The worst rank of each
case is shown. Figures only. Needs the default cache (make teacher-cache).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CACHE = REPO / "data" / "caches" / "smollm2-stdlib"

# name: (ranks, parallel, layers, width, batch_size, extra run settings)
CASES = {
    "ddp-8": (1, "ddp", 8, 512, 2, {}),
    "ddp-8-blocks": (1, "ddp", 8, 512, 2, {"logit_block_mib": 16}),
    "ddp-8-b8": (1, "ddp", 8, 512, 8, {"logit_block_mib": 64}),
    "ddp-8-b8-ckpt": (1, "ddp", 8, 512, 8, {"logit_block_mib": 64, "activation_checkpointing": True}),
    "ddp-8-accum2": (1, "ddp", 8, 512, 4, {"grad_accum": 2}),
    "ddp-16-x2": (2, "ddp", 16, 512, 2, {}),
    "fsdp-16-x2": (2, "fsdp", 16, 512, 2, {}),
    "fsdp-16-x2-b8": (2, "fsdp", 16, 512, 8, {"logit_block_mib": 64}),
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    """One rank: set up, train and evaluate the student, then report its memory and the plan's."""
    import importlib

    import torch

    from pipeline.student_config import StudentRunConfig
    from pipeline.train.recipe import Recipe

    for module in ("transformers", "transformers.models.llama.modeling_llama", "pyarrow", "zarr", "datasets"):
        importlib.import_module(module)  # in the baseline, not the run
    torch.set_num_threads(1)
    ranks, parallel, layers, width, batch, extra = CASES[args.case]
    cfg = StudentRunConfig.model_validate({
        "cache": str(CACHE), "output_dir": args.out, "parallel": parallel, "batch_size": batch,
        "max_steps": args.steps, "eval_every": args.steps, "eval_rows": 8, "log_every": args.steps, "num_workers": 0,
        "shuffle_window": 1, "device": "cpu", **extra,
        "students": [{"name": "s", "losses": {"kd_forward": 0.5, "ce": 0.5}, "lr": 1e-3,
                      "arch": {"num_layers": layers, "hidden_size": width, "num_heads": 8, "num_kv_heads": 4}}]})
    before = _rss_mib()
    recipe = Recipe(cfg, log=lambda m: None, progress=False)
    t0 = time.perf_counter()
    recipe.setup()
    st = recipe.students[0]
    tracker = _tracker(st)
    tops, depth = {id(st.module), id(st.model), id(st.model.base_model), id(st.engine)}, [0]

    def enter(module, args):  # the tracker follows one call of each module: it starts over at each outermost
        if id(module) in tops:  # call (a step's forward, an evaluation's); its peak runs through them all
            if not depth[0]:
                tracker.reset_mod_stats()
            depth[0] += 1

    def leave(module, args, out):
        if id(module) in tops:
            depth[0] -= 1

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)]
    with tracker:  # every tensor the loop allocates (steps, evaluation), by kind
        recipe._loop()
    for h in hooks:
        h.remove()
    report = recipe.finish()[0]
    peak = tracker.get_tracker_snapshot("peak")
    rank = int(os.environ.get("RANK", 0))
    Path(args.out, f"memory-{rank}.json").write_text(json.dumps(
        {"rank": rank, "baseline_mib": before, "peak_mib": _rss_mib(), "seconds": time.perf_counter() - t0,
         "tensors_mib": max(v["Total"] for v in peak.values()) / 2**20,
         "parameters": report["parameters"], "planned_mib": recipe.plan.total(recipe.cfg.parallel) / 2**20,
         "seq_len": recipe.plan.batch.positions}))


def _tracker(student):
    """torch's tensor-level memory tracker over the student's module and optimiser (the FSDP2 one when sharded)."""
    from pipeline.train import parallel

    if parallel.sharded(student.engine):
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        return FSDPMemTracker(student.engine, student.opt)
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(student.module, student.opt)
    return tracker


def run(case: str, steps: int) -> list[dict]:
    ranks = CASES[case][0]
    with tempfile.TemporaryDirectory(prefix=f"bench-plan-{case}-") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               __file__, "--worker", "--case", case, "--out", out, "--steps", str(steps)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return [json.loads(Path(out, f"memory-{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--case")
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not (CACHE / "manifest.json").exists():
        sys.exit(f"{CACHE} is missing: run make teacher-cache first")
    print(f"{'case':<16} {'ranks':>5} {'parallel':>8} {'params':>8} {'batch':>9} {'planned MiB':>12} "
          f"{'tensors MiB':>12} {'plan/tensors':>13} {'RSS MiB':>8} {'plan/RSS':>9} {'wall s':>7}")
    for case in args.cases.split(","):
        ranks, parallel, _, _, batch, extra = CASES[case]
        reports = run(case, args.steps)
        worst = max(reports, key=lambda r: r["tensors_mib"])
        took = worst["peak_mib"] - worst["baseline_mib"]
        plan = worst["planned_mib"]
        print(f"{case:<16} {ranks:>5} {parallel:>8} {worst['parameters'] / 1e6:>7.1f}M "
              f"{str(batch) + ' x ' + str(worst['seq_len']):>9} {plan:>12,.0f} {worst['tensors_mib']:>12,.0f} "
              f"{plan / worst['tensors_mib']:>13.2f} {took:>8,.0f} {plan / took:>9.2f} "
              f"{max(r['seconds'] for r in reports):>7.1f}")

if __name__ == "__main__":
    main()
