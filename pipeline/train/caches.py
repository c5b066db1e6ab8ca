"""The caches of a student run ("tasks", mixed by weight), opened and checked against each other and the
students before any model is built: one kind of teacher, one tokenizer, the capture settings the students'
terms depend on, the masking the teacher attended with, and the temperatures the students read.
"""

from __future__ import annotations

from ..config import StudentRunConfig
from ..errors import StudentError
from ..format.reader import Cache
from . import terms

Tasks = dict[str, tuple[Cache, float]]  # task name -> (its cache, its weight)


def open_tasks(cfg: StudentRunConfig) -> Tasks:
    """Every task's cache, checked to share one teacher task, one tokenizer and (for the students' terms) one
    capture."""
    tasks = {t.name: (Cache(t.cache, storage_options=cfg.storage_options), t.weight) for t in cfg.task_list()}
    check_same_task(tasks)
    check_same_tokenizer_and_capture(tasks, set().union(*(terms.capture_keys(s) for s in cfg.students)))
    check_document_masking(tasks, cfg.document_mask)
    check_temperatures(tasks, cfg)
    return tasks


def check_same_task(tasks: Tasks) -> None:
    """One kind of teacher per run: the students have one head (the task, its labels, the padding id a decoder
    classifier pools at)."""
    first_name, (first, _) = next(iter(tasks.items()))
    ours = first.manifest.task
    for name, (c, _) in tasks.items():
        theirs = c.manifest.task
        if (theirs.type, theirs.labels, theirs.pad_token_id) == (ours.type, ours.labels, ours.pad_token_id):
            continue
        raise StudentError(f"task {name!r} ({c.root}) holds a {theirs.type} teacher's targets"
                           + (f" with labels {list(theirs.labels)} (padding {theirs.pad_token_id})"
                              if theirs.classifier else "")
                           + f", task {first_name!r} a {ours.type} teacher's"
                           + (f" with labels {list(ours.labels)} (padding {ours.pad_token_id})"
                              if ours.classifier else "")
                           + "; the caches of one run must share the task, its labels and the id their rows "
                             "are padded with (a decoder classifier pools at the last token that is not it)")


def check_same_tokenizer_and_capture(tasks: Tasks, keys: set[str]) -> None:
    first_name, (first, _) = next(iter(tasks.items()))
    for name, (c, _) in tasks.items():
        if c.manifest.tokenizer.fingerprint != first.manifest.tokenizer.fingerprint:
            raise StudentError(f"task {name!r} ({c.root}) was made with another tokenizer than task {first_name!r} "
                               f"({first.root}); tasks of one run must share a tokenizer")
        mine, theirs = (m.imported.temperature if m.imported else 1.0 for m in (c.manifest, first.manifest))
        if mine != theirs:
            raise StudentError(f"task {name!r} ({c.root}) holds the teacher's distribution at temperature {mine}, task "
                               f"{first_name!r} at {theirs}: the tasks of one run must share it (an imported cache "
                               "records its source's temperature)")
        for key in sorted(keys):
            mine, theirs = c.manifest.capture.value(key), first.manifest.capture.value(key)
            if mine != theirs:
                raise StudentError(f"task {name!r}: capture.{key} {mine} differs from task {first_name!r}'s {theirs}")


def check_document_masking(tasks: Tasks, asked: bool | None) -> None:
    """The student attends as the teacher did when it made the targets."""
    for name, (c, _) in tasks.items():
        made_with = c.manifest.preparation.document_mask
        if asked is not None and asked != made_with:
            raise StudentError(f"document_mask = {asked} asked for, but task {name!r} ({c.root}) was "
                               f"captured with document_mask = {made_with}: its targets were made with "
                               f"{'block-diagonal' if made_with else 'plain causal'} attention over packed rows, "
                               "and a student must train with the same masking")


def check_temperatures(tasks: Tasks, cfg: StudentRunConfig) -> None:
    """A tempered KD target is read at one index for every task: it must mean one temperature."""
    for s in cfg.students:
        if s.temperature == 1.0 or not terms.reads_tempered(s):
            continue
        where = {name: c.manifest.capture.tempered_index(s.temperature) for name, (c, _) in tasks.items()}
        if len(set(where.values())) > 1:
            caps = "; ".join(f"{n}: {list(c.manifest.capture.temperatures)}" for n, (c, _) in tasks.items())
            raise StudentError(f"student {s.name!r}: temperature {s.temperature} is not captured alike by every "
                               f"task (extra temperatures {caps}); capture the same temperatures in every cache")
