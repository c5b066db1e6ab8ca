"""A student ready to train: its model (checked against every source of the run), a cross-tokenizer student's
rows and vocabulary map, its wiring to the cached representations, its optimiser, its output folder and the
identity its checkpoints are resumed against."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .. import distributed
from ..errors import StudentError
from ..student_config import StudentConfig, StudentRunConfig
from . import checkpoint as ckpt
from . import terms
from .retokenized import prepare_student
from .sources import Sources
from .student_init import build_student, check_student_document_masking, count_parameters, describe_tokenizer_difference
from .students import Student, StudentModule, build_wiring, make_optimizer


def build(spec: StudentConfig, cfg: StudentRunConfig, sources: Sources, cache_tokenizer, tokenizer, cross: bool, device,
          log: Callable[[str], None]) -> tuple[Student, dict | None]:
    """(the student, its cross-tokenizer statistics or None). `tokenizer`: its own (`cache_tokenizer` unless
    `cross`); `sources`: the run's caches, the first one's manifest describing the teacher."""
    ranks = distributed.ranks()
    manifest = next(iter(sources.values()))[0].manifest
    task = manifest.task.type
    model = build_student(spec, manifest, tokenizer, device, cross)
    rows = model.get_output_embeddings().weight.shape[0] if task == "causal-lm" and not cross else None
    for name, (c, _) in sources.items():
        if rows is not None and rows < c.manifest.teacher.vocab_size:
            raise StudentError(f"student {spec.name!r}: {rows} output rows < source {name!r}'s vocabulary "
                               f"({c.manifest.teacher.vocab_size})")
    if any(c.manifest.preparation.document_mask for c, _ in sources.values()):
        check_student_document_masking(model, spec.name, device)
    if cfg.activation_checkpointing:  # each decoder layer recomputed in the backward pass
        if "attentions" in terms.student_needs(spec):
            raise StudentError(f"student {spec.name!r}: activation_checkpointing would record its attention maps again "
                               "in the backward pass; train its attention terms without it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    out = Path(cfg.output_dir) / spec.name
    vocab_map, student_rows, stats = None, {}, None
    if cross:  # the teacher's vocabulary mapped into its own; every split it reads re-tokenised (once, kept)
        vocab_map, student_rows, train = prepare_student(spec.name, tokenizer, model, out / "retokenized", sources,
                                                         cache_tokenizer, manifest.teacher.vocab_size)
        log(f"student {spec.name}: its own tokenizer ({describe_tokenizer_difference(cache_tokenizer, tokenizer)}): "
            f"{train.get('aligned_share', 0):.1%} of its train positions aligned with the teacher's, "
            f"{train.get('lossless_rows', 0):.1%} of rows decoded and encoded back losslessly; teacher tokens "
            f"mapped: {vocab_map.counts}")
        stats = {"train": train, "vocab_map": vocab_map.counts}
    wiring = build_wiring(spec, model, manifest, device, vocab_map, cross)
    module = StudentModule(model, wiring)
    opt, sched = make_optimizer(module.parameters(), spec, cfg.max_steps)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.recover_model_dir(out / "model")
    st = Student(spec, model, module, module, opt, sched, out, wiring, tokenizer=tokenizer, rows=student_rows)
    st.identity = ckpt.resume_identity(spec, cfg, sources, ranks.world)
    log(f"student {spec.name}: {count_parameters(model) / 1e6:.2f}M parameters, losses {spec.losses}, "
        f"T={spec.temperature}" + (f", {cfg.parallel} over {ranks.world} ranks" if ranks.active else ""))
    return st, stats
