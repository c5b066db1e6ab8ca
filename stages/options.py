"""Command-line options shared by the stage commands: a settings file and `-s key=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML settings file")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="override a setting: -s section.key=value, -s students.0.lr=5e-4 "
                                     "(repeatable; values are TOML)"),
]
