"""The caches of a student run (its sources, mixed by weight), opened and checked against each other and the
students before any model is built, and `Inputs`, what the run is built from (`open_inputs`). The checks: one
kind of teacher, one tokenizer, the capture settings the students' terms depend on, the masking the teacher
attended with, the temperatures the students read, and an early-stopping metric the teacher's task has.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .. import distributed
from ..errors import StudentError
from ..format.manifest import Task
from ..format.reader import Cache
from ..student_config import StudentRunConfig
from . import terms
from .head import TeacherHead
from .metrics import entity_scheme, metrics_for
from .student_init import student_tokenizer

Sources = dict[str, tuple[Cache, float]]  # source name -> (its cache, its weight)


@dataclass(frozen=True)
class Inputs:
    """What a run is built from, fixed before its loop: its sources (caches and weights; the first one's
    tokenizer is the run's), the device, the teacher's task, each source's field dims, the cache fields the
    students read, the teacher's LM head of each source that captured `final_hidden`, and each student's
    tokenizer (whether it differs from the cache's)."""

    sources: Sources
    device: torch.device
    task: str
    dims: dict[str, dict[str, list[str]]]
    fields: list[str]
    heads: dict[str, TeacherHead]
    tokenizer: object
    student_tokenizers: dict[str, tuple[object, bool]]

    @property
    def first(self):
        """The first source's cache, which describes the teacher."""
        return next(iter(self.sources.values()))[0]


def open_inputs(cfg: StudentRunConfig) -> Inputs:
    """The sources opened and checked against each other and the students, the device, what the students read."""
    sources = open_sources(cfg)
    cache = next(iter(sources.values()))[0]
    tokenizer = cache.tokenizer()
    try:
        device = distributed.device_for(cfg.device)
    except ValueError as e:
        raise StudentError(str(e)) from None
    check_metric(cfg, cache.manifest.task)
    student_tokenizers = {s.name: student_tokenizer(s, cache.manifest, tokenizer) for s in cfg.students}
    crossing = [n for n, (_, cross) in student_tokenizers.items() if cross]
    if crossing and cfg.mutual_weight > 0:
        raise StudentError(f"mutual_weight > 0 compares the students' distributions over one vocabulary, but "
                           f"{', '.join(crossing)} {'has' if len(crossing) == 1 else 'have'} another tokenizer "
                           "than the cache's")
    fields = sorted({f for c, _ in sources.values() for s in cfg.students
                     for f in terms.fields_for(s, c.manifest, student_tokenizers[s.name][1])})
    heads = {n: TeacherHead.from_cache(c, device) for n, (c, _) in sources.items()  # exact full-vocabulary terms
             if "final_hidden" in c.manifest.fields}
    warn_uncaptured_temperatures(cfg, cache)
    return Inputs(sources=sources, device=device, task=cache.manifest.task.type,
                  dims={n: {f: list(spec.dims) for f, spec in c.manifest.fields.items()} for n, (c, _) in sources.items()},
                  fields=fields, heads=heads, tokenizer=tokenizer, student_tokenizers=student_tokenizers)


def open_sources(cfg: StudentRunConfig) -> Sources:
    """Every source's cache, checked to share one teacher task, one tokenizer and (for the students' terms) one
    capture."""
    sources = {t.name: (Cache(t.cache, storage_options=cfg.storage_options), t.weight) for t in cfg.source_list()}
    check_same_task(sources)
    check_same_tokenizer_and_capture(sources, set().union(*(terms.capture_keys(s) for s in cfg.students)))
    check_document_masking(sources, cfg.document_mask)
    check_temperatures(sources, cfg)
    return sources


def check_same_task(sources: Sources) -> None:
    """One kind of teacher per run: the students have one head (the task, its labels, the padding id a decoder
    classifier pools at)."""
    first_name, (first, _) = next(iter(sources.items()))
    ours = first.manifest.task
    for name, (c, _) in sources.items():
        theirs = c.manifest.task
        if (theirs.type, theirs.labels, theirs.pad_token_id) == (ours.type, ours.labels, ours.pad_token_id):
            continue
        raise StudentError(f"source {name!r} ({c.root}) holds a {theirs.type} teacher's targets"
                           + (f" with labels {list(theirs.labels)} (padding {theirs.pad_token_id})"
                              if theirs.classifier else "")
                           + f", source {first_name!r} a {ours.type} teacher's"
                           + (f" with labels {list(ours.labels)} (padding {ours.pad_token_id})"
                              if ours.classifier else "")
                           + "; the caches of one run must share the task, its labels and the id their rows "
                             "are padded with (a decoder classifier pools at the last token that is not it)")


def check_same_tokenizer_and_capture(sources: Sources, keys: set[str]) -> None:
    first_name, (first, _) = next(iter(sources.items()))
    for name, (c, _) in sources.items():
        if c.manifest.tokenizer.fingerprint != first.manifest.tokenizer.fingerprint:
            raise StudentError(f"source {name!r} ({c.root}) was made with another tokenizer than source {first_name!r} "
                               f"({first.root}); sources of one run must share a tokenizer")
        mine, theirs = (m.imported.temperature if m.imported else 1.0 for m in (c.manifest, first.manifest))
        if mine != theirs:
            raise StudentError(f"source {name!r} ({c.root}) holds the teacher's distribution at temperature {mine}, source "
                               f"{first_name!r} at {theirs}: the sources of one run must share it (an imported cache "
                               "records its source's temperature)")
        for key in sorted(keys):
            mine, theirs = c.manifest.capture.value(key), first.manifest.capture.value(key)
            if mine != theirs:
                raise StudentError(f"source {name!r}: capture.{key} {mine} differs from source {first_name!r}'s {theirs}")


def check_document_masking(sources: Sources, asked: bool | None) -> None:
    """The student attends as the teacher did when it made the targets."""
    for name, (c, _) in sources.items():
        made_with = c.manifest.preparation.document_mask
        if asked is not None and asked != made_with:
            raise StudentError(f"document_mask = {asked} asked for, but source {name!r} ({c.root}) was "
                               f"captured with document_mask = {made_with}: its targets were made with "
                               f"{'block-diagonal' if made_with else 'plain causal'} attention over packed rows, "
                               "and a student must train with the same masking")


def check_temperatures(sources: Sources, cfg: StudentRunConfig) -> None:
    """A tempered KD target is read at one index for every source: it must mean one temperature."""
    for s in cfg.students:
        if s.temperature == 1.0 or not terms.reads_tempered(s):
            continue
        where = {name: c.manifest.capture.tempered_index(s.temperature) for name, (c, _) in sources.items()}
        if len(set(where.values())) > 1:
            caps = "; ".join(f"{n}: {list(c.manifest.capture.temperatures)}" for n, (c, _) in sources.items())
            raise StudentError(f"student {s.name!r}: temperature {s.temperature} is not captured alike by every "
                               f"source (extra temperatures {caps}); capture the same temperatures in every cache")


def check_metric(cfg: StudentRunConfig, task: Task) -> None:
    """The early-stopping metric is one the teacher's task has (entity F1 needs entity tags)."""
    allowed, metric = metrics_for(task.type), cfg.early_stopping_metric
    if metric not in allowed:
        raise StudentError(f"early_stopping_metric = {metric!r} is not a metric of a {task.type} "
                           f"cache (its metrics: {', '.join(allowed)})")
    if metric == "entity_f1" and not entity_scheme(list(task.labels)):
        raise StudentError(f"early_stopping_metric = 'entity_f1', but the cache's labels "
                           f"{list(task.labels)} are not entity tags (O, B-<type>, I-<type>, ...)")


def warn_uncaptured_temperatures(cfg: StudentRunConfig, cache: Cache) -> None:
    """A student whose tempered terms read a temperature its cache did not capture learns an approximated tail."""
    manifest = cache.manifest
    for s in cfg.students:
        if s.temperature != 1.0 and terms.reads_tempered(s) and \
                manifest.capture.tempered_index(s.temperature) is None and manifest.task.type == "causal-lm":
            # a classifier's distributions are exact at any temperature
            warnings.warn(f"student {s.name!r}: temperature {s.temperature} was not captured in {cache.root} "
                          f"(captured: {list(manifest.capture.temperatures_all)}); the teacher's tail is "
                          "approximated")
