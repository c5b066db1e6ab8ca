"""The memory plan for model sizes users distill, from configs alone (the meta device: nothing is allocated, no
weights downloaded): the plan of an 8B Llama-3-shaped student on 8 x 80 GB GPUs, and a "what fits where" table
of Llama-3-shaped students (1B, 3B, 8B; vocabulary 128,256) x GPUs of 80 GB, each cell the first layout the plan
says fits: ddp, fsdp, or fsdp with activation checkpointing (on one GPU: with or without checkpointing); and the
device memory estimate of a 70B Llama-3-shaped teacher's capture (`teacher.tp_size` 1, 2, 4 and 8).

    python benchmarks/plan_examples.py [--rows 2] [--positions 4096]

The same arithmetic as `distill student --dry-run` (pipeline/train/memory_plan.py), which plans a real run from its
settings and cache; this script only stands the configs in for the checkpoints. Rows per rank, bf16 autocast (a
GPU's precision = "auto"), the default logit_block_mib.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from pipeline.student_config import StudentRunConfig  # noqa: E402
from pipeline.train.memory_plan import GIB, Batch, Plan, StudentShape  # noqa: E402

LLAMA3 = {  # the published shapes (config.json of meta-llama/Llama-3.2-1B, -3.2-3B, -3.1-8B)
    "1B": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, tie_word_embeddings=True),
    "3B": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
               intermediate_size=8192, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, tie_word_embeddings=False),
}


def shape(name: str) -> StudentShape:
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128256, **LLAMA3[name]))
    return StudentShape.from_model(f"llama3-{name}", model, classifier=False)


def first_fit(s: StudentShape, batch: Batch, gpus: int, gib: float) -> str:
    layouts = (("ddp", False), ("ddp", True)) if gpus == 1 else (("ddp", False), ("fsdp", False), ("fsdp", True))
    for parallel, ck in layouts:  # one process trains either layout alike: ddp stands for both
        plan = Plan([s], batch, gpus, ck, int(gib * GIB), "cuda")
        if plan.fits(parallel):
            return f"{parallel}{' + ckpt' if ck else ''} ({plan.total(parallel) / GIB:,.0f} GiB)"
    return "does not fit"


def capture_estimate(tp: int) -> list[str]:
    """The capture's per-rank device estimate (`capture/memory.py`) for Llama-3.1-70B's shape in bfloat16,
    batches of 8 x 4,096 positions, the last hidden layer captured, over `tp` ranks per teacher."""
    from pipeline.capture.memory import parameter_count, working_set
    from pipeline.config import TeacherCacheConfig
    from pipeline.models import TeacherSpec

    config = LlamaConfig(vocab_size=128256, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, intermediate_size=28672, tie_word_embeddings=False)
    cfg = TeacherCacheConfig.model_validate({
        "teacher": {"model": "llama-3.1-70b", "dtype": "bfloat16", "tp_size": tp},
        "data": {"source": "text", "seq_len": 4096}, "capture": {"batch_size": 8, "hidden_layers": [-1]},
        "output": {"dir": "unused"}})
    ws = working_set(cfg, TeacherSpec.from_config(config), parameter_count(config), 1, 0, 0)
    weights = ws.weights / tp
    return [f"tp_size {tp}: {(weights + ws.batch) / GIB:,.1f} GiB per rank (weights {weights / GIB:,.1f}, a batch "
            f"{ws.batch / GIB:,.1f} GiB)"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--gib", type=float, default=80)
    args = p.parse_args()
    default_blocks = StudentRunConfig.model_fields["logit_block_mib"].default
    batch = Batch(args.rows, args.positions, True, default_blocks, False)
    s8 = shape("8B")
    print("\n".join(Plan([s8], batch, 8, False, int(args.gib * GIB), "cuda").lines("fsdp")))
    print()
    gpus = (1, 2, 4, 8)
    print(f"what fits where: rows {args.rows} x {args.positions} positions per rank, GPUs of {args.gib:g} GiB")
    print(f"{'student':<10}{'parameters':>11}" + "".join(f"{f'{g} GPU' + 's' * (g > 1):>28}" for g in gpus))
    for name in LLAMA3:
        s = shape(name)
        print(f"{name:<10}{s.params / 1e9:>10.2f}B" + "".join(f"{first_fit(s, batch, g, args.gib):>28}" for g in gpus))
    print()
    print("a 70B Llama-3-shaped teacher's capture (bfloat16, batches of 8 x 4,096, the last hidden layer captured):")
    for tp in (1, 2, 4, 8):
        print("\n".join(capture_estimate(tp)))


if __name__ == "__main__":
    main()
