"""Stage 2: train one or more students from finished caches; the teacher is never loaded.

`Recipe` is the run, read top to bottom in the order it happens: `setup` builds everything before the loop
(the sources, the held-out sets, the students, their resumed state, trackers, the training stream), `train`
runs the loop (`micro_step`: every active student's forward and backward on one batch, the mutual term
between them; `optimizer_step`; `validate`: all students in one read of the validation batches, early
stopping; `checkpoint`), and `finish` evaluates the best models on the test splits and writes the reports.
Loss terms come from the registry in `terms`; this module never names one. Its parts live beside it:
`sources` (a run's caches, checked against each other), `students` (a student ready to train), `step` (a
student's forward pass and terms), `mixing` (the training stream), `heldout` (validation and test sets),
`checkpoint` (run state, identity, atomic saves), `report`.

One process or many: under `torchrun` each student is wrapped in DistributedDataParallel (the only
place that knows about it is `_wrap`), each rank reads only its own share of the global batch
sequence (`mixing.SourceMix`), gradients are averaged, evaluation sums are added over ranks, and
rank 0 alone writes checkpoints, metrics, plots and models. N ranks with `grad_accum` A see the
batches one process sees with grad_accum N x A, so they reach the same weights to float tolerance.

Per student: AdamW, linear warmup then cosine decay, gradient clipping; bf16 autocast on GPU, fp32
on CPU (`precision`); logits made a block of positions at a time (`logit_block_mib`); no dropout.
Checkpoints hold model, optimiser, scheduler, projections, each rank's RNG state and the data position,
so a killed run resumes to the same result, on the same number of ranks or on any number that keeps
ranks x grad_accum.

Output per student, in `output_dir/<name>/`: `model/` (plain transformers model + tokenizer,
replaced atomically), `checkpoint/state.pt`, `metrics.jsonl`, `curves.png`, `report.json`.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

import torch

from .. import distributed
from ..errors import StudentError
from ..student_config import StudentRunConfig
from . import checkpoint as ckpt
from . import parallel, terms
from .batch_order import rows_scheme
from .dataset import CacheBatches, check_window
from .heldout import HeldOut
from .metrics import LOWER_IS_BETTER
from .memory_plan import Plan, plan_run
from .mixing import SourceMix
from .report import student_report, write_report
from .signal import TeacherSignal
from .sources import Inputs, open_inputs
from .step import autocast_on, forward, mutual_terms
from .build import build
from .students import Student, make_optimizer
from .tracking import Trackers


class Recipe:
    """One training run of every configured student (see the module docstring)."""

    def __init__(self, cfg: StudentRunConfig, log: Callable[[str], None] = print, progress: bool = True,
                 after_step: Callable[[int], None] | None = None):
        self.cfg, self.after_step = cfg, after_step
        self.ranks = distributed.setup()
        self.main = self.ranks.main
        self.log = log if self.main else (lambda m: None)
        self.progress = progress and self.main
        self.state = ckpt.RunState()
        # built by setup, before the loop
        self.inputs: Inputs | None = None
        self.plan: Plan | None = None  # the memory plan, before any weight loads
        self.heldout: HeldOut | None = None
        self.students: list[Student] = []
        self.cross_stats: dict[str, dict] = {}  # student -> its cross-tokenizer statistics
        self.trackers: Trackers | None = None  # report_to (rank 0)
        self.stream: SourceMix | None = None
        self._tokens_pending = 0
        self._steps_since_log = 0

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        """Each phase runs on every rank with no collective inside; an error on any rank is raised on all
        of them (`all_agree`), so no rank is left waiting in a collective the others never reach."""
        distributed.all_agree(self._open)
        self._choose_layout()  # collective: every rank the same
        distributed.all_agree(self._build)
        for st in self.students:  # DDP broadcasts rank 0's weights (identical: same seed); FSDP shards them
            self._parallelize(st)
        have = distributed.all_gather([(st.out / ckpt.STATE).exists() for st in self.students])
        if any(h != have[0] for h in have):
            raise StudentError(f"the ranks see different checkpoints under {self.cfg.output_dir} ({have}): "
                               "output_dir must be on storage every rank shares")
        shards = distributed.all_agree(lambda: self._resume(have[0]))
        for st, folder in zip(self.students, shards or []):  # collective: every rank reads its shards
            parallel.load_sharded_state(st.module, st.opt, folder)
        if self.main and self.cfg.report_to:
            self.trackers = Trackers(self.cfg.report_to, {st.name: st.out for st in self.students},
                                     self.cfg.model_dump(mode="json"), self.cfg.wandb_project, self.state.step)
        distributed.all_agree(self._data)

    def _open(self) -> None:
        """The settings checked, the caches' manifests and tokenizers read, the memory planned: no weight, no
        batch."""
        cfg = self.cfg
        for s in cfg.students:  # before any cache is opened: a misspelt loss fails at once
            terms.check_losses(s)
        check_student_folders(Path(cfg.output_dir), [s.name for s in cfg.students])
        self.inputs = i = open_inputs(cfg)
        self.plan = plan_run(cfg, i.first.manifest, i.student_tokenizers, i.device)

    def _choose_layout(self) -> None:
        """parallel = "auto" resolved by the memory plan (fsdp when any rank's device cannot hold a replica), and
        the run refused when its layout cannot fit (`memory_plan.Plan.check`); a resumed run keeps the layout of its
        checkpoints."""
        chosen = self.plan.resolve(self.cfg.parallel)
        saved = {ckpt.saved_layout(Path(self.cfg.output_dir) / s.name) for s in self.cfg.students} - {None}
        if self.cfg.parallel == "auto" and len(saved) == 1:  # a resumed run keeps the layout its checkpoints have
            chosen = saved.pop()
            self.log(f"parallel = 'auto': {chosen}, the layout of the checkpoints it resumes")
        elif self.cfg.parallel == "auto":
            if self.ranks.active:
                chosen = "fsdp" if "fsdp" in distributed.all_gather(chosen) else chosen
            self.log(f"parallel = 'auto': {chosen} (the memory plan: {self.plan.total('ddp') / 2**30:,.1f} GiB per "
                     f"rank for a replica, {self.plan.total('fsdp') / 2**30:,.1f} GiB sharded)")
        if chosen != self.cfg.parallel:
            self.cfg = self.cfg.model_copy(update={"parallel": chosen})
        distributed.all_agree(lambda: self.plan.check(chosen))

    def _build(self) -> None:
        cfg, i = self.cfg, self.inputs
        self.heldout = HeldOut(cfg, i.sources, i.heads, i.dims, i.device, i.tokenizer, self.log)
        if not self.heldout.val_sources:
            self.log("no cache of this run has a validation split: no evaluation, no early stopping")
        for spec in cfg.students:
            tokenizer, cross = i.student_tokenizers[spec.name]
            st, stats = build(spec, cfg, i.sources, i.tokenizer, tokenizer, cross, i.device, self.log)
            if stats is not None:
                self.cross_stats[spec.name] = stats
            self.students.append(st)

    def _data(self) -> None:
        cfg, r, i = self.cfg, self.ranks, self.inputs
        trim = i.task != "causal-lm"  # one example per padded row: batches end at their longest row
        scheme = rows_scheme(cfg.shuffle_window)  # a resumed run keeps the scheme its state recorded
        self.stream = SourceMix({n: (CacheBatches(c, "train", i.fields, cfg.batch_size, seed=cfg.seed, shuffle=True,
                                                  num_workers=cfg.num_workers, trim=trim, scheme=scheme), w)
                                 for n, (c, w) in i.sources.items()},
                                cfg.seed, self.state.stream, rank=r.rank, world=r.world)
        self.state.stream = self.stream.state
        check_window([ds for ds, _ in self.stream.sources.values()], cfg.shuffle_window, cfg.num_workers, self.log)
        self.heldout.prepare()

    def _parallelize(self, st: Student) -> None:
        """The one place that knows how a student is spread over ranks (`parallel.parallelize`); a sharded student's
        optimiser is made over its sharded parameters."""
        dev = self.inputs.device
        # a student whose terms never read its logits leaves the head (and layers past the mapped ones) unused
        unused = "logits" not in terms.student_needs(st.spec)
        st.engine = parallel.parallelize(st.module, self.cfg.parallel, dev, autocast_on(dev, self.cfg.precision),
                                         unused)
        if parallel.sharded(st.engine):
            st.opt, st.sched = make_optimizer(st.module.parameters(), st.spec, self.cfg.max_steps)

    def _save_model(self, st: Student) -> None:
        """The student's model/ folder (rank 0 writes it; under fsdp every rank writes its shards)."""
        if parallel.sharded(st.engine):
            parallel.save_model_sharded(st.model, st.tokenizer, st.out / "model", self.main)
        elif self.main:
            ckpt.save_model_atomically(st.model, st.tokenizer, st.out / "model")

    def _resume(self, have: list[bool]) -> list[Path] | None:
        """Each student's checkpoint, when there are: the run state and what state.pt holds, and (parallel = fsdp)
        the folders of their sharded state, which every rank then reads."""
        if not any(have):
            if self.main:
                for st in self.students:
                    (st.out / "metrics.jsonl").unlink(missing_ok=True)
            return None
        if not all(have):
            raise StudentError("some students of this run have checkpoints and others do not: "
                               f"{[st.name for st, h in zip(self.students, have) if not h]} lack one")
        loaded = [ckpt.load_state(st, self.inputs.sources, self.ranks) for st in self.students]
        states = [s for s, _, _ in loaded]
        if any(s != states[0] for s in states):
            raise StudentError("the students' checkpoints are at different steps; cannot resume them together")
        self.state = states[0]
        self.log(f"resuming at step {self.state.step}")
        for name, train_grew in loaded[0][1].items():
            self.log(f"source {name!r}: the cache grew since the checkpoint; the best model and early stopping start "
                     "over")
            if train_grew:  # its next epoch, whose order covers the new shards, starts now
                pos = self.state.stream["sources"][name]
                pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0
                self.log(f"source {name!r}: training goes on with epoch {pos['epoch']} over all "
                         f"{self.inputs.sources[name][0].manifest.splits['train'].rows} train rows")
        if self.main:
            for st in self.students:
                ckpt.truncate_metrics(st.out / "metrics.jsonl", self.state.step)
        shards = [folder for _, _, folder in loaded]
        return shards if all(f is not None for f in shards) else None

    # -- train ------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        """The whole run: setup, the loop, finish; its students' reports."""
        try:
            self.setup()
            self._loop()
            return self.finish()
        finally:  # a run cut short ends its trackers' runs too (W&B marks them finished, TensorBoard flushes)
            if self.trackers is not None:
                self.trackers.close()

    def _loop(self) -> None:
        from tqdm.auto import tqdm

        cfg, run = self.cfg, self.state
        per_step = cfg.grad_accum * self.ranks.world  # global micro-batches per optimiser step
        ckpt_every = cfg.checkpoint_every or cfg.eval_every
        bar = tqdm(total=cfg.max_steps, initial=run.step, desc="students", unit="step", disable=not self.progress)
        t_start = time.perf_counter() - run.seconds
        tokens_at_log, t_at_log = run.tokens, time.perf_counter()
        batches = iter(self.stream)
        while run.step < cfg.max_steps and not all(st.stopped for st in self.students):
            for micro in range(cfg.grad_accum):
                source, batch = next(batches)
                self.micro_step(batch, last=micro == cfg.grad_accum - 1, source=source)
            self.stream.skip_to((run.step + 1) * per_step)  # past the other ranks' share of this step
            self.optimizer_step()
            run.step += 1
            self._steps_since_log += 1
            step = run.step
            run.seconds = time.perf_counter() - t_start
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                self._sync_tokens()
                now = time.perf_counter()
                bar.set_postfix(tokens_per_s=f"{(run.tokens - tokens_at_log) / max(now - t_at_log, 1e-9):,.0f}")
                tokens_at_log, t_at_log = run.tokens, now
                self.log_train(step)
            if self.heldout.val_sets and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                self.validate(step)
            if step % ckpt_every == 0 or step == cfg.max_steps:
                self.checkpoint()
            if self.after_step is not None:
                self.after_step(step)
        bar.close()

    def micro_step(self, batch: dict, last: bool, source: str | None = None) -> None:
        """Forward and backward of every active student on one batch of `source` (default: the first); gradients
        are averaged over ranks only on the last micro-batch of a step."""
        cfg, i = self.cfg, self.inputs
        device = i.device
        active = [st for st in self.students if not st.stopped]
        mutual = cfg.mutual_weight > 0 and len(active) > 1
        source = source if source is not None else next(iter(i.sources))
        sig = TeacherSignal(batch, device, i.sources[source][0].manifest.capture, i.heads.get(source), i.task,
                            dims=i.dims[source])
        with contextlib.ExitStack() as stack:
            for st in active:
                stack.enter_context(distributed.maybe_no_sync(st.engine, not last))
            values, logits, masks = {}, {}, None
            for st in active:
                view = st.rows[(source, "train")].batch(batch["row"]) if st.cross else None
                out = forward(st.engine, st.wiring, batch, device, want_logits=mutual or "logits" in
                              terms.student_needs(st.spec), view=view,
                              block_mib=0 if mutual else cfg.logit_block_mib,  # mutual: every student's logits
                              precision=cfg.precision)
                mine = sig.aligned(view["align"], i.dims[source]) if st.cross else sig
                values[st.name] = terms.compute(st.spec, out, mine, st.wiring)
                if st.cross:  # logged, not trained on: the share of its real positions with a teacher partner
                    values[st.name]["aligned_share"] = (out.masks.rep.sum() / out.masks.real.sum().clamp(min=1)
                                                        ).detach()
                masks = out.masks
                if mutual:
                    logits[st.name] = out.logits
                else:
                    (values[st.name]["total"] / cfg.grad_accum).backward()
            if mutual:  # every student's graph is alive at once: memory grows with the number of students
                self._mutual_backward(active, values, logits, masks)
        for st in active:  # detached sums on the device: read at log steps only, no sync per micro-batch
            for k, v in values[st.name].items():
                d = v.detach() / self.cfg.grad_accum
                st.running[k] = st.running[k] + d if k in st.running else d
        self._tokens_pending += int(batch["length"].sum())  # a CPU tensor: no device sync

    def _mutual_backward(self, active: list[Student], values: dict, logits: dict, masks) -> None:
        cfg = self.cfg
        mt = mutual_terms(logits, masks.kd, self.inputs.first.manifest.teacher.vocab_size, cfg.mutual_temperature,
                          classes=self.inputs.task != "causal-lm")
        for st in active:
            v = values[st.name]
            v["mutual"] = mt[st.name]  # x T^2 already (losses.full_forward_kl, losses.class_divergence)
            v["total"] = v["total"] + cfg.mutual_weight * v["mutual"]
            (v["total"] / cfg.grad_accum).backward()

    def optimizer_step(self) -> None:
        for st in self.students:
            if st.stopped:
                continue
            if st.spec.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(st.module.parameters(), st.spec.grad_clip)
            st.opt.step()
            st.sched.step()
            st.opt.zero_grad(set_to_none=True)

    def _sync_tokens(self) -> None:
        pending = distributed.sum_(torch.tensor([self._tokens_pending], dtype=torch.int64))
        self.state.tokens += int(pending[0])
        self._tokens_pending = 0

    def record(self, st: Student, rec: dict) -> None:
        """One metrics record of a student: its metrics.jsonl, and each tracker of report_to."""
        ckpt.append_jsonl(st.out / "metrics.jsonl", rec)
        if self.trackers is not None:
            self.trackers.log(st.name, rec)

    def log_train(self, step: int) -> None:
        """Each active student's mean terms since the last log, averaged over ranks: one sync."""
        n = max(self._steps_since_log, 1)  # steps accumulated since the last log (fewer after a resume)
        self._steps_since_log = 0
        active = [st for st in self.students if not st.stopped and st.running]
        keys = [(st, k) for st in active for k in st.running]
        if keys:
            flat = torch.stack([st.running[k].float() for st, k in keys]).cpu()
            flat = distributed.sum_(flat) / self.ranks.world
            values = dict(zip([(st.name, k) for st, k in keys], flat.tolist()))
        for st in active:
            vals = {k: values[(st.name, k)] / n for k in st.running}
            rec = {"split": "train", "step": step, "loss": vals.pop("total", 0.0), **vals,
                   "lr": st.sched.get_last_lr()[0], "tokens": self.state.tokens, "seconds": self.state.seconds}
            if self.main:
                self.record(st, rec)
            st.running = {}

    def validate(self, step: int) -> None:
        """Every active student on every source's validation rows (one read per evaluation); the best model of each
        is saved, and a student with no improvement for `patience` evaluations stops."""
        cfg = self.cfg
        active = [st for st in self.students if not st.stopped]
        if not active or not self.heldout.val_sets:
            return
        with parallel.gathered([st.engine for st in active]):
            results = self.heldout.validate(active, self._by_name())
        key = cfg.early_stopping_metric
        for st in active:
            m, per_source = results[st.name]
            if self.main and len(per_source) > 1:
                for n, x in per_source.items():
                    self.record(st, {"split": "validation", "source": n, "step": step, **x})
            if self.main:
                self.record(st, {"split": "validation", "step": step,
                                 **{k: v for k, v in m.items() if k != "sources"}})
            if st.observe(m, step, key, LOWER_IS_BETTER[key], cfg.patience):
                self._save_model(st)
            elif st.stopped:
                self.log(f"student {st.name}: early stop at step {step} (best {key} {st.best:.4f} at step "
                         f"{st.best_step})")

    def _by_name(self) -> dict[str, Student]:
        return {st.name: st for st in self.students}

    def checkpoint(self) -> None:
        """Rank 0 writes each student's state; every rank's RNG state goes with it."""
        self._sync_tokens()
        rng = distributed.all_gather(ckpt.rng_state())
        folders = {}
        if self.cfg.parallel == "fsdp":  # every rank writes its shards, before state.pt names them
            for st in self.students:
                folders[st.name] = ckpt.sharded_folder(self.state.step)
                parallel.save_sharded_state(st.module, st.opt, st.out / folders[st.name])
            distributed.barrier()
        if not self.main:
            return
        for st in self.students:
            ckpt.save_state(st, self.state, rng, self.ranks.world, folders.get(st.name))

    # -- finish -----------------------------------------------------------------------------
    def finish(self) -> list[dict]:
        """A last validation where the loop's last step had none, the last checkpoint, the best models on the test
        splits, and each student's report (written by rank 0, returned on every rank)."""
        run, has_val = self.state, bool(self.heldout.val_sets)
        if any(has_val and st.last_eval.get("step") != run.step and not st.stopped for st in self.students):
            self.validate(run.step)
        if not has_val:
            for st in self.students:
                self._save_model(st)
        self.checkpoint()
        with parallel.gathered([st.engine for st in self.students]):  # a student without a saved model: its own
            tested = self.heldout.test_best(self.students, self._by_name())
        reports = []
        for st in self.students:
            if st.name in tested and self.main:
                self.record(st, {"split": "test", "step": run.step, "best_step": st.best_step,
                                 **{k: v for k, v in tested[st.name].items() if k != "sources"}})
            extra = {}
            if st.name in self.cross_stats:
                extra["cross_tokenizer"] = self.cross_stats[st.name]
            if self.heldout.teacher:
                extra["teacher_validation"] = self.heldout.teacher
            if st.name in tested:
                extra["test"] = tested[st.name]
            report = student_report(st, run, self.cfg, self.inputs.sources, self.inputs.task, self.ranks.world,
                                    self.inputs.device.type, extra)
            reports.append(report)
            if self.main:
                write_report(st, report, tested.get(st.name), self.log)
        return reports


def check_student_folders(out: Path, students: list[str]) -> None:
    """`output_dir` and each student's folder in it must be directories, or creatable as ones: the nearest
    existing ancestor of each is a directory."""
    for folder in [out] + [out / name for name in students]:
        at = folder
        while not at.exists() and at != at.parent:
            at = at.parent
        if not at.is_dir():
            raise StudentError(f"output_dir {out}: {at} is a file, not a directory; choose a directory for the "
                               "students")


def train_students(cfg: StudentRunConfig, log: Callable[[str], None] = print, progress: bool = True,
                   after_step: Callable[[int], None] | None = None) -> list[dict]:
    """Train every student of `cfg` (one process, or one rank of a torchrun launch); their reports."""
    return Recipe(cfg, log, progress, after_step).train()
