"""Experiment tracking beside metrics.jsonl: `report_to = ["tensorboard", "wandb"]`.

Every record a student run appends to a student's metrics.jsonl (train, validation per task and
combined, test) goes to each tracker too, as the same scalars: tag `<split>/<key>` (validation per
task: `validation/<task>/<key>`), at the record's optimiser step. Each student is its own run (its own
TensorBoard folder, `<output_dir>/<name>/tensorboard`; its own W&B run named after it), holding the run's
settings and the student's. metrics.jsonl and curves.png stay as they are: they are what resuming and the
reports read.

A resumed run starts each tracker at the checkpoint's step: TensorBoard drops the events at and after it
(`purge_step`), W&B continues the run of the same id (stored in the student's folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import StudentError

NOT_SCALARS = {"split", "step", "task"}


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: `<split>[/<task>]/<key>` -> value (numbers only)."""
    prefix = record["split"] + (f"/{record['task']}" if "task" in record else "")
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The trackers of one student run (rank 0 only): one writer per student per tracker."""

    def __init__(self, report_to: list[str], students: dict[str, Path], settings: dict, project: str | None,
                 resume_step: int = 0):
        self.tb, self.wandb = {}, {}
        if "tensorboard" in report_to:
            SummaryWriter = _needed("tensorboard", "torch.utils.tensorboard", "pip install tensorboard").SummaryWriter
            for name, out in students.items():
                # resumed at step S: events after S (from the run that was cut short) are dropped
                w = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
                w.add_text("settings", "```\n" + json.dumps(settings_of(settings, name), indent=2) + "\n```",
                           global_step=resume_step)
                self.tb[name] = w
        if "wandb" in report_to:
            wandb = _needed("wandb", "wandb", "pip install wandb (WANDB_MODE=offline runs without an account)")
            for name, out in students.items():
                self.wandb[name] = wandb.init(project=project or "distill", name=name, dir=str(out),
                                              id=_run_id(out), resume="allow", config=settings_of(settings, name),
                                              reinit="create_new")

    def log(self, name: str, record: dict) -> None:
        values, step = scalars(record), int(record["step"])
        if name in self.tb:
            for tag, v in values.items():
                self.tb[name].add_scalar(tag, v, global_step=step)
            self.tb[name].flush()
        if name in self.wandb:
            self.wandb[name].log(values, step=step)

    def close(self) -> None:
        for w in self.tb.values():
            w.close()
        for run in self.wandb.values():
            run.finish()
        self.tb, self.wandb = {}, {}


def _needed(tracker: str, module: str, install: str):
    """The module a tracker writes through, or a clear error naming the package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise StudentError(f"report_to has {tracker!r}, which needs the {tracker} package: {install}") from e


def settings_of(settings: dict, name: str) -> dict:
    """The run's settings with this student's own table in place of the list of students."""
    mine = next((s for s in settings.get("students", []) if s.get("name") == name), {})
    return {**{k: v for k, v in settings.items() if k != "students"}, "student": mine}


def _run_id(out: Path) -> str:
    """The W&B run id of a student folder: made once, kept, so a resumed run continues the same W&B run."""
    path = out / "wandb-run-id"
    if path.is_file():
        return path.read_text().strip()
    out.mkdir(parents=True, exist_ok=True)
    run_id = os.urandom(8).hex()
    path.write_text(run_id + "\n")
    return run_id
