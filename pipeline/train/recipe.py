"""Stage 2: train one or more students from finished caches; the teacher is never loaded.

`Recipe` is the run, in the order it happens: `setup` (caches, students, resume, data), then `train`:
`micro_step` (every active student's forward and backward on one batch, the mutual term between
them), `optimizer_step`, `evaluate` (all students in one read of the validation batches, early
stopping), `checkpoint`; then `finish` (test split, reports). Loss terms come from the registry in
`terms`; this module never names one. Its parts live beside it: `caches` (the checks across a run's
caches), `build` (a student ready to train), `step` (one student's module, forward pass and optimiser),
`checkpoint` (identity, state, atomic saves), `validation` (held-out batches and readings), `report`.

One process or many: under `torchrun` each student is wrapped in DistributedDataParallel (the only
place that knows about it is `_wrap`), each rank reads only its own share of the global batch
sequence (`reader.TaskStream`), gradients are averaged, evaluation sums are added over ranks, and
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
import json
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from .. import distributed, models
from ..config import StudentConfig, StudentRunConfig
from ..errors import StudentError
from . import checkpoint as ckpt
from . import terms
from .build import build
from .caches import open_tasks
from .evaluate import LOWER_IS_BETTER, entity_scheme, metrics_for
from .head import TeacherHead
from .batches import rows_scheme
from .reader import CacheBatches, TaskStream, check_window
from .report import describe, plot_curves, student_report
from .signal import TeacherSignal
from .step import Student, StudentModule, forward, mutual_terms
from .tracking import Trackers
from .students import student_tokenizer
from .validation import Evaluator, combine


class Recipe:
    """One training run of every configured student (see the module docstring)."""

    def __init__(self, cfg: StudentRunConfig, log: Callable[[str], None] = print, progress: bool = True,
                 after_step: Callable[[int], None] | None = None):
        self.cfg, self.after_step = cfg, after_step
        self.ranks = distributed.setup()
        self.main = self.ranks.main
        self.log = log if self.main else (lambda m: None)
        self.progress = progress and self.main
        self.students: list[Student] = []
        self.run = {"step": 0, "tokens": 0, "seconds": 0.0, "stream": None}
        self._tokens_pending = 0
        self._steps_since_log = 0
        self.cross_stats: dict[str, dict] = {}
        self.trackers: Trackers | None = None  # report_to (rank 0)

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        """Each phase runs on every rank with no collective inside; an error on any rank is raised on all
        of them (`all_agree`), so no rank is left waiting in a collective the others never reach."""
        distributed.all_agree(self._setup)
        have = distributed.all_gather([(st.out / ckpt.STATE).exists() for st in self.students])
        if any(h != have[0] for h in have):
            raise StudentError(f"the ranks see different checkpoints under {self.cfg.output_dir} ({have}): "
                               "output_dir must be on storage every rank shares")
        distributed.all_agree(lambda: self._resume(have[0]))
        if self.main and self.cfg.report_to:
            self.trackers = Trackers(self.cfg.report_to, {st.name: st.out for st in self.students},
                                     self.cfg.model_dump(mode="json"), self.cfg.wandb_project, self.run["step"])
        for st in self.students:  # DDP broadcasts rank 0's weights: after resuming, identical anyway
            st.engine = self._wrap(st.module, st.spec)
        distributed.all_agree(self._data)

    def _setup(self) -> None:
        cfg = self.cfg
        for s in cfg.students:  # before any cache is opened: a misspelt loss fails at once
            terms.check_losses(s)
        check_student_folders(Path(cfg.output_dir), [s.name for s in cfg.students])
        self.tasks = open_tasks(cfg)
        self.cache = next(iter(self.tasks.values()))[0]
        self.manifest = self.cache.manifest
        self.tokenizer = self.cache.tokenizer()
        try:
            self.device = distributed.device_for(cfg.device)
        except ValueError as e:
            raise StudentError(str(e)) from None
        self.task = self.manifest.task.type  # one for every cache of the run (open_tasks)
        self.dims = {n: {f: list(spec.dims) for f, spec in c.manifest.fields.items()} for n, (c, _) in self.tasks.items()}
        self._check_metric()
        self.student_tokenizers = {s.name: student_tokenizer(s, self.manifest, self.tokenizer) for s in cfg.students}
        crossing = [n for n, (_, cross) in self.student_tokenizers.items() if cross]
        if crossing and cfg.mutual_weight > 0:
            raise StudentError(f"mutual_weight > 0 compares the students' distributions over one vocabulary, but "
                               f"{', '.join(crossing)} {'has' if len(crossing) == 1 else 'have'} another tokenizer "
                               "than the cache's")
        self.fields = sorted({f for c, _ in self.tasks.values() for s in cfg.students
                              for f in terms.fields_for(s, c.manifest, self.student_tokenizers[s.name][1])})
        # the teacher's LM head, for the full-vocabulary terms and an exact validation KL
        self.heads = {n: TeacherHead.from_cache(c, self.device) for n, (c, _) in self.tasks.items()
                      if "final_hidden" in c.manifest.fields}
        self._warn_uncaptured_temperatures()
        self.evaluator = Evaluator(cfg, self.tasks, self.heads, self.dims, self.device, self.tokenizer, self.log)
        if not self.evaluator.val_tasks:
            self.log("no cache of this run has a validation split: no evaluation, no early stopping")
        for spec in cfg.students:
            self.students.append(self._build(spec))

    def _check_metric(self) -> None:
        allowed, metric = metrics_for(self.task), self.cfg.early_stopping_metric
        if metric not in allowed:
            raise StudentError(f"early_stopping_metric = {metric!r} is not a metric of a {self.task} "
                               f"cache (its metrics: {', '.join(allowed)})")
        if metric == "entity_f1" and not entity_scheme(list(self.manifest.task.labels)):
            raise StudentError(f"early_stopping_metric = 'entity_f1', but the cache's labels "
                               f"{list(self.manifest.task.labels)} are not entity tags (O, B-<type>, I-<type>, ...)")

    def _warn_uncaptured_temperatures(self) -> None:
        for s in self.cfg.students:
            if s.temperature != 1.0 and terms.reads_tempered(s) and \
                    self.manifest.capture.tempered_index(s.temperature) is None and self.task == "causal-lm":
                # a classifier's distributions are exact at any temperature
                warnings.warn(f"student {s.name!r}: temperature {s.temperature} was not captured in {self.cache.root} "
                              f"(captured: {list(self.manifest.capture.temperatures_all)}); the teacher's tail is "
                              "approximated")

    def _data(self) -> None:
        cfg, r = self.cfg, self.ranks
        trim = self.task != "causal-lm"  # one example per padded row: batches end at their longest row
        scheme = rows_scheme(cfg.shuffle_window)  # a resumed run keeps the scheme its state recorded
        self.stream = TaskStream({n: (CacheBatches(c, "train", self.fields, cfg.batch_size, seed=cfg.seed, shuffle=True,
                                                   num_workers=cfg.num_workers, trim=trim, scheme=scheme), w)
                                  for n, (c, w) in self.tasks.items()},
                                 cfg.seed, self.run["stream"], rank=r.rank, world=r.world)
        self.run["stream"] = self.stream.state
        check_window(self.stream, cfg.shuffle_window, cfg.num_workers, self.log)
        self.evaluator.prepare()

    def _build(self, spec: StudentConfig) -> Student:
        tokenizer, cross = self.student_tokenizers[spec.name]
        st, stats = build(spec, self.cfg, self.tasks, self.tokenizer, tokenizer, cross, self.device, self.log)
        if stats is not None:
            self.cross_stats[spec.name] = stats
        return st

    def _wrap(self, module: StudentModule, spec: StudentConfig) -> torch.nn.Module:
        """The one place that knows about DDP: a student trained on several ranks averages its gradients."""
        if not self.ranks.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        dev = self.device
        # a student whose terms never read its logits leaves the head (and layers past the mapped ones) unused
        unused = "logits" not in terms.student_needs(spec)
        return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                       broadcast_buffers=False, find_unused_parameters=unused)

    def _resume(self, have: list[bool]) -> None:
        if not any(have):
            if self.main:
                for st in self.students:
                    (st.out / "metrics.jsonl").unlink(missing_ok=True)
            return
        if not all(have):
            raise StudentError("some students of this run have checkpoints and others do not: "
                               f"{[st.name for st, h in zip(self.students, have) if not h]} lack one")
        loaded = [ckpt.load_state(st, self.tasks, self.ranks) for st in self.students]
        runs = [r for r, _ in loaded]
        if any(r != runs[0] for r in runs):
            raise StudentError("the students' checkpoints are at different steps; cannot resume them together")
        self.run = runs[0]
        self.log(f"resuming at step {self.run['step']}")
        for name, train_grew in loaded[0][1].items():
            self.log(f"task {name!r}: the cache grew since the checkpoint; the best model and early stopping start over")
            if train_grew:  # its next epoch, whose order covers the new shards, starts now
                pos = self.run["stream"]["tasks"][name]
                pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0
                self.log(f"task {name!r}: training goes on with epoch {pos['epoch']} over all "
                         f"{self.tasks[name][0].manifest.splits['train'].rows} train rows")
        if self.main:
            for st in self.students:
                ckpt.truncate_metrics(st.out / "metrics.jsonl", self.run["step"])

    # -- training ---------------------------------------------------------------------------
    def micro_step(self, batch: dict, last: bool, task: str | None = None) -> None:
        """Forward and backward of every active student on one batch; gradients are averaged over
        ranks only on the last micro-batch of a step."""
        cfg, device = self.cfg, self.device
        active = [st for st in self.students if not st.stopped]
        mutual = cfg.mutual_weight > 0 and len(active) > 1
        task = task if task is not None else next(iter(self.tasks))
        sig = TeacherSignal(batch, device, self.tasks[task][0].manifest.capture, self.heads.get(task), self.task,
                            dims=self.dims[task])
        with contextlib.ExitStack() as stack:
            for st in active:
                stack.enter_context(distributed.maybe_no_sync(st.engine, not last))
            values, logits, masks = {}, {}, None
            for st in active:
                view = st.rows[(task, "train")].batch(batch["row"]) if st.cross else None
                out = forward(st.engine, st.wiring, batch, device, want_logits=mutual or "logits" in
                              terms.student_needs(st.spec), view=view,
                              block_mib=0 if mutual else cfg.logit_block_mib,  # mutual: every student's logits
                              precision=cfg.precision)
                mine = sig.aligned(view["align"], self.dims[task]) if st.cross else sig
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
        mt = mutual_terms(logits, masks.kd, self.manifest.teacher.vocab_size, cfg.mutual_temperature,
                          classes=self.task != "causal-lm")
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
        self.run["tokens"] += int(pending[0])
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
                   "lr": st.sched.get_last_lr()[0], "tokens": self.run["tokens"], "seconds": self.run["seconds"]}
            if self.main:
                self.record(st, rec)
            st.running = {}

    def evaluate(self, step: int) -> None:
        """Every active student on every task's validation rows (one read per evaluation); the best model of each
        is saved, and a student with no improvement for `patience` evaluations stops."""
        cfg, sets = self.cfg, self.evaluator.val_sets
        active = [st for st in self.students if not st.stopped]
        if not active or not sets:
            return
        per_task = self.evaluator.run({st.name: st.model for st in active}, sets, self._by_name())
        for st in active:
            mine = {n: m[st.name] for n, m in per_task.items()}
            m = combine(mine, sets)
            if self.main and len(mine) > 1:
                for n, x in mine.items():
                    self.record(st, {"split": "validation", "task": n, "step": step, **x})
            st.last_eval = {**m, "step": step}
            if self.main:
                self.record(st, {"split": "validation", "step": step,
                                                             **{k: v for k, v in m.items() if k != "tasks"}})
            key = cfg.early_stopping_metric
            better = st.best is None or (m[key] < st.best if LOWER_IS_BETTER[key] else m[key] > st.best)
            if better:
                st.best, st.best_step, st.bad_evals, st.best_eval = m[key], step, 0, st.last_eval
                if self.main:
                    ckpt.save_model_atomically(st.model, st.tokenizer, st.out / "model")
            else:
                st.bad_evals += 1
                if cfg.patience is not None and st.bad_evals >= cfg.patience:
                    st.stopped = True
                    self.log(f"student {st.name}: early stop at step {step} (best {key} {st.best:.4f} at step "
                             f"{st.best_step})")

    def _by_name(self) -> dict[str, Student]:
        return {st.name: st for st in self.students}

    def test(self) -> dict[str, dict]:
        """Each student's best model (as saved) on the caches' test splits: {student: metrics}, written to its
        metrics.jsonl. The saved model is read back on every rank, so every rank evaluates the same weights."""
        if not self.evaluator.test_tasks:
            return {}
        sets = self.evaluator.test_sets()
        out = {}
        for st in self.students:  # one at a time: a best model beside the training ones, then freed
            saved = st.out / "model"
            model = models.auto_class(self.task).from_pretrained(saved, dtype=torch.float32).to(self.device) \
                if (saved / "config.json").exists() else st.model
            per_task = self.evaluator.run({st.name: model}, sets, self._by_name(), "test")
            del model
            out[st.name] = combine({n: m[st.name] for n, m in per_task.items()}, sets)
            if self.main:
                self.record(st, {"split": "test", "step": self.run["step"],
                                                             "best_step": st.best_step,
                                                             **{k: v for k, v in out[st.name].items() if k != "tasks"}})
        return out

    def checkpoint(self) -> None:
        """Rank 0 writes each student's state; every rank's RNG state goes with it."""
        self._sync_tokens()
        rng = distributed.all_gather(ckpt.rng_state())
        if not self.main:
            return
        for st in self.students:
            ckpt.save_state(st, self.run, rng, self.ranks.world)

    # -- the run ----------------------------------------------------------------------------
    def train(self) -> list[dict]:
        try:
            return self._train()
        finally:  # a run cut short ends its trackers' runs too (W&B marks them finished, TensorBoard flushes)
            if self.trackers is not None:
                self.trackers.close()

    def _train(self) -> list[dict]:
        from tqdm.auto import tqdm

        self.setup()
        cfg, run = self.cfg, self.run
        per_step = cfg.grad_accum * self.ranks.world  # global micro-batches per optimiser step
        ckpt_every = cfg.checkpoint_every or cfg.eval_every
        bar = tqdm(total=cfg.max_steps, initial=run["step"], desc="students", unit="step", disable=not self.progress)
        t_start = time.perf_counter() - run["seconds"]
        tokens_at_log, t_at_log = run["tokens"], time.perf_counter()
        batches = iter(self.stream)
        while run["step"] < cfg.max_steps and not all(st.stopped for st in self.students):
            for micro in range(cfg.grad_accum):
                task, batch = next(batches)
                self.micro_step(batch, last=micro == cfg.grad_accum - 1, task=task)
            self.stream.skip_to((run["step"] + 1) * per_step)  # past the other ranks' share of this step
            self.optimizer_step()
            run["step"] += 1
            self._steps_since_log += 1
            step = run["step"]
            run["seconds"] = time.perf_counter() - t_start
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                self._sync_tokens()
                now = time.perf_counter()
                bar.set_postfix(tokens_per_s=f"{(run['tokens'] - tokens_at_log) / max(now - t_at_log, 1e-9):,.0f}")
                tokens_at_log, t_at_log = run["tokens"], now
                self.log_train(step)
            if self.evaluator.val_sets and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                self.evaluate(step)
            if step % ckpt_every == 0 or step == cfg.max_steps:
                self.checkpoint()
            if self.after_step is not None:
                self.after_step(step)
        bar.close()
        return self.finish()

    def finish(self) -> list[dict]:
        run, has_val = self.run, bool(self.evaluator.val_sets)
        if any(has_val and st.last_eval.get("step") != run["step"] and not st.stopped for st in self.students):
            self.evaluate(run["step"])
        if not has_val and self.main:
            for st in self.students:
                ckpt.save_model_atomically(st.model, st.tokenizer, st.out / "model")
        self.checkpoint()
        tested = self.test()
        reports = []
        for st in self.students:
            extra = {}
            if st.name in self.cross_stats:
                extra["cross_tokenizer"] = self.cross_stats[st.name]
            if self.evaluator.teacher:
                extra["teacher_validation"] = self.evaluator.teacher
            if st.name in tested:
                extra["test"] = tested[st.name]
            report = student_report(st, run, self.cfg, self.tasks, self.task, self.ranks.world, self.device.type,
                                    extra)
            reports.append(report)
            if self.main:
                self._write_report(st, report, tested.get(st.name))
        return reports

    def _write_report(self, st: Student, report: dict, tested: dict | None) -> None:
        tmp = st.out / "report.json.tmp"  # whole or absent: an on-policy loop takes a report as a finished run
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, st.out / "report.json")
        plot_curves(st.out / "metrics.jsonl", st.out / "curves.png", f"{st.name}: {st.spec.losses}")
        if st.best_eval:
            self.log(f"student {st.name}: best at step {st.best_step}: {describe(st.best_eval)} -> {st.out / 'model'}")
        if tested is not None:
            self.log(f"student {st.name}: test: {describe(tested)}")


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
