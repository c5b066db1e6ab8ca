"""Stage 2 command: train students from a finished teacher cache (the teacher is never loaded).

    distill student --config data/configs/student.toml [-s max_steps=400 -s students.0.lr=5e-4 ...]
    distill student --config data/configs/student.toml --dry-run [--ranks 8 --device-gib 80]
"""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from pipeline.config import load_config
from pipeline.student_config import StudentRunConfig
from stages.options import ConfigOpt, SetOpt


def student(config: ConfigOpt = None, set_: SetOpt = None,
            dry_run: Annotated[bool, typer.Option("--dry-run", help=(
                "print each student's memory per rank under ddp and fsdp (weights, gradients, optimizer state, "
                "buffers, activations with and without checkpointing, logits), read no weight or batch, train "
                "nothing; exits non-zero when the run would not fit"))] = False,
            ranks: Annotated[Optional[int], typer.Option("--ranks", min=1, help=(
                "--dry-run: plan for this many ranks (default: this launch's)"))] = None,
            device_gib: Annotated[Optional[float], typer.Option("--device-gib", min=0.001, help=(
                "--dry-run: plan for devices of this much memory per rank (default: this rank's device)"))] = None
            ) -> None:
    """Train, evaluate and save one or more students from a teacher cache (one read feeds all)."""
    cfg = load_config(StudentRunConfig, config, set_ or [])
    if dry_run:
        from pipeline.train.memory_plan import dry_run as plan_only

        plan, chosen = plan_only(cfg, ranks, device_gib)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, printed once
            typer.echo("\n".join(plan.lines(chosen)))
        plan.check(chosen)
        return
    if ranks is not None or device_gib is not None:
        raise typer.BadParameter("--ranks and --device-gib plan another launch: give them with --dry-run")
    from pipeline.train.recipe import train_students

    reports = train_students(cfg, log=lambda m: typer.echo(m, err=True))
    from pipeline.distributed import ranks as launch

    if launch().main:
        for r in reports:
            typer.echo(f"{cfg.output_dir}/{r['name']}/model")
