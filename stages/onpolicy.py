"""On-policy and continuous distillation commands.

    distill generate  -c data/configs/generate.toml         # a model samples completions (token ids)
    distill onpolicy  -c data/configs/onpolicy.toml         # rounds of generate -> score -> train
    distill redistill --cache-config data/configs/teacher_cache.toml \\
                      --student-config data/configs/student.toml --data 'new/*.txt' --out data/students/v2
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.config import TeacherCacheConfig, load_config
from pipeline.student_config import StudentRunConfig
from pipeline.onpolicy.settings import GenerateConfig, OnPolicyConfig
from stages.options import ConfigOpt, SetOpt


def generate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Sample completions for prompts with a model (a student's model/ or any causal LM); write their token ids."""
    from pipeline.distributed import ranks
    from pipeline.onpolicy.generate import run_generate

    cfg = load_config(GenerateConfig, config, set_ or [])
    res = run_generate(cfg, log=lambda m: typer.echo(m, err=True))
    if ranks().main:
        typer.echo(str(res.dir))


def onpolicy(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run (or resume) rounds of on-policy distillation: the student samples, the teacher scores, the student trains."""
    import json

    from pipeline.distributed import ranks
    from pipeline.onpolicy.loop import run_onpolicy

    cfg = load_config(OnPolicyConfig, config, set_ or [])
    report = run_onpolicy(cfg, log=lambda m: typer.echo(m, err=True))
    if ranks().main:
        for r, e in sorted(report["rounds"].items(), key=lambda kv: int(kv[0])):
            ev = e.get("eval", {}).get("teacher_nll")
            typer.echo(json.dumps({"round": int(r), "model": e.get("model"),
                                   "samples_teacher_nll": e["samples_teacher_nll"]["teacher_nll"],
                                   "eval_teacher_nll": ev, "seconds": e.get("seconds")}))


def redistill(
    cache_config: Annotated[Path, typer.Option("--cache-config", help="the teacher-cache settings the cache was made "
                                                                     "with")],
    student_config: Annotated[Path, typer.Option("--student-config", help="the distill student settings of the "
                                                                         "students to continue")],
    data: Annotated[list[str], typer.Option("--data", help="the new documents: files or globs (repeatable)")],
    out: Annotated[Path, typer.Option("--out", help="where the continued students go")],
    previous: Annotated[Optional[Path], typer.Option("--from", help="the students to continue (default: the student "
                                                                    "settings' output_dir)")] = None,
    set_: SetOpt = None,
) -> None:
    """New data arrived: append it to the cache, then continue the students from their last models on it."""
    from pipeline.distributed import ranks
    from pipeline.onpolicy.loop import redistill as run

    ccfg = load_config(TeacherCacheConfig, cache_config, [])
    scfg = load_config(StudentRunConfig, student_config, set_ or [])
    reports = run(ccfg, scfg, data, out, previous, log=lambda m: typer.echo(m, err=True))
    if ranks().main:
        for r in reports:
            typer.echo(f"{out}/{r['name']}/model")
