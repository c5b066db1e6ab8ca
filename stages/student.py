"""Stage 2 command: train students from a finished teacher cache (the teacher is never loaded).

    distill student --config data/configs/student.toml [-s max_steps=400 -s students.0.lr=5e-4 ...]
"""

from __future__ import annotations

import typer

from pipeline.config import load_config
from pipeline.student_config import StudentRunConfig
from stages.options import ConfigOpt, SetOpt


def student(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Train, evaluate and save one or more students from a teacher cache (one read feeds all)."""
    from pipeline.train.recipe import train_students

    cfg = load_config(StudentRunConfig, config, set_ or [])
    reports = train_students(cfg, log=lambda m: typer.echo(m, err=True))
    from pipeline.distributed import ranks

    if ranks().main:
        for r in reports:
            typer.echo(f"{cfg.output_dir}/{r['name']}/model")
