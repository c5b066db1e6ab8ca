"""Stage 2: train one or more students from finished caches; the teacher is never loaded.

`Recipe` is the run, in the order it happens: `setup` (caches, students, resume, data),
`micro_step` (every active student's forward and backward on one batch, the mutual term between
them), `optimizer_step`, `evaluate` (all students in one read of the validation batches),
`checkpoint`, `report`. Loss terms come from the registry in `terms`; this module never names one.

One process or many: under `torchrun` each student is wrapped in DistributedDataParallel (the only
place that knows about it is `_wrap`), each rank reads only its own share of the global batch
sequence (`reader.TaskStream`), gradients are averaged, evaluation sums are added over ranks, and
rank 0 alone writes checkpoints, metrics, plots and models. N ranks with `grad_accum` A see the
batches one process sees with grad_accum N x A, so they reach the same weights to float tolerance.

Per student: AdamW, linear warmup then cosine decay, gradient clipping; bf16 autocast on GPU, fp32
on CPU; no dropout. Checkpoints hold model, optimiser, scheduler, projections, each rank's RNG
state and the data position, so a killed run resumes to the same result, on the same number of
ranks or on any number that keeps ranks x grad_accum.

Output per student, in `output_dir/<name>/`: `model/` (plain transformers model + tokenizer,
replaced atomically), `checkpoint/state.pt`, `metrics.jsonl`, `curves.png`, `report.json`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import attention as attn_mod
from .. import distributed
from ..config import StudentConfig, StudentRunConfig
from ..format.cache import Cache, row_column
from . import losses as L
from . import terms as T
from .evaluate import LOWER_IS_BETTER, Reading, entity_scheme, evaluate_all, metrics_for, teacher_metrics
from .head import TeacherHead
from .reader import CacheBatches, TaskStream, make_loader
from .representation import attention_pairs, hidden_pairs, make_projections
from .students import StudentError, build_student, count_parameters, describe_tokenizer_difference, student_tokenizer

# ---------------------------------------------------------------------------------------------
# one student


class StudentModule(torch.nn.Module):
    """Everything a student trains: the model and its hidden-state projections. Its forward pass
    returns exactly what the step's loss uses (logits only when a term or the mutual term reads
    them, the projected hidden states, the recorded attention maps), so that DDP, which finds the
    parameters that get no gradient by walking back from the outputs, sees the truth."""

    def __init__(self, model, wiring: T.Wiring):
        super().__init__()
        self.model, self.projections = model, wiring.projections
        self.hidden_indices = [s for s, _ in wiring.hidden]
        self.attention_layers = [s for s, _ in wiring.attention]

    def forward(self, input_ids, want_logits: bool = True, **kw):
        recorder = attn_mod.AttentionRecorder(self.attention_layers, None, "none") if self.attention_layers else None
        with attn_mod.recording(recorder):
            out = self.model(input_ids=input_ids, output_hidden_states=bool(self.hidden_indices), **kw)
        hidden = [out.hidden_states[s].float() for s in self.hidden_indices]
        if len(self.projections):
            hidden = [p(h) for p, h in zip(self.projections, hidden)]
        return (out.logits if want_logits else None), hidden, (recorder.maps if recorder else {})


def build_wiring(spec: StudentConfig, model, manifest: dict, device, vocab_map=None, cross: bool = False) -> T.Wiring:
    needs = T.student_needs(spec)
    w = T.Wiring(cross=cross, vocab_map=vocab_map)
    n_s = model.config.num_hidden_layers
    if "hidden_states" in needs:
        w.hidden = hidden_pairs(spec, manifest, n_s)
        w.projections = make_projections(w.hidden, model.config.hidden_size, manifest["teacher"]["hidden_size"]).to(device)
        w.hidden_encoding = manifest["fields"]["hidden_states"].get("encoding")
    if "attentions" in needs:
        w.attention = attention_pairs(spec, manifest, n_s)
        w.bidirectional = bool((manifest.get("task") or {}).get("bidirectional"))
        attn_mod.enable(model)  # eager attention on the mapped layers only, sdpa elsewhere
    return w


def forward(engine, wiring: T.Wiring, batch: dict, device, want_logits: bool = True,
            view: dict | None = None) -> T.StudentOutput:
    """A student's forward pass on a batch (through DDP when wrapped), with what its terms need; `view`: a
    cross-tokenizer student's own rows for the batch (`crosstok.StudentRows.batch`)."""
    src = view if view is not None else batch
    ids = src["input_ids"].to(device, non_blocking=True)
    masks = T.aligned_masks(view, device) if view is not None else T.batch_masks(batch, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits, hidden, maps = engine(ids, want_logits=want_logits, **masks.forward)
    return T.StudentOutput(logits, ids, masks, hidden, maps)


def step_losses(model, batch: dict, spec: StudentConfig, manifest: dict, device,
                wiring: T.Wiring | None = None, head=None) -> dict[str, torch.Tensor]:
    """One batch's terms and total for a bare model (benchmarks, tests): the recipe's computation."""
    wiring = wiring or T.Wiring()
    out = forward(StudentModule(model, wiring), wiring, batch, device)
    sig = T.TeacherSignal(batch, device, manifest["capture"]["temperatures"], manifest["capture"], head,
                          T.task_of(manifest))
    return T.compute(spec, out, sig, wiring)


@dataclass
class Student:
    spec: StudentConfig
    model: torch.nn.Module  # the transformers model (saved, evaluated)
    module: StudentModule  # model + projections (trained)
    engine: torch.nn.Module  # module, or DDP(module)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    out: Path
    wiring: T.Wiring
    identity: dict = field(default_factory=dict)
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped: bool = False
    last_eval: dict = field(default_factory=dict)
    best_eval: dict = field(default_factory=dict)
    running: dict = field(default_factory=dict)  # term -> detached tensor sum since the last log
    tokenizer: object = None  # what its saved model carries: its own, or the cache's
    rows: dict = field(default_factory=dict)  # a cross-tokenizer student's re-tokenised splits: (task, split) -> rows

    @property
    def cross(self) -> bool:
        return self.wiring.cross

    @property
    def name(self) -> str:
        return self.spec.name


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params, spec: StudentConfig, total: int):
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": spec.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=spec.lr, betas=spec.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, spec.warmup_steps, total, spec.min_lr_ratio))
    return opt, sched


def mutual_terms(logits: dict[str, torch.Tensor], mask: torch.Tensor, vocab: int, temperature: float,
                 classes: bool = False) -> dict[str, torch.Tensor]:
    """Deep mutual learning: for each student, mean over the others of KL(other || self) on the
    shared vocabulary (or the classes), the other's prediction taken as a fixed target (detached)."""
    def kl(other, mine):
        if classes:
            t_lp = torch.log_softmax(other.detach().float() / temperature, dim=-1)
            return L.class_divergence(t_lp, mine, mask, temperature)
        return L.full_forward_kl(other.detach()[..., :vocab], mine, mask, temperature)

    out = {}
    for name, mine in logits.items():
        others = [kl(o, mine) for n, o in logits.items() if n != name]
        out[name] = torch.stack(others).mean()
    return out


# ---------------------------------------------------------------------------------------------
# caches and resumption


def open_tasks(cfg: StudentRunConfig) -> dict[str, tuple[Cache, float]]:
    """Every task's cache, checked to share one tokenizer (and, for the students' terms, one capture)."""
    tasks = {t.name: (Cache(t.cache, storage_options=cfg.storage_options), t.weight) for t in cfg.task_list()}
    first_name, (first, _) = next(iter(tasks.items()))
    keys = set().union(*(T.capture_keys(s) for s in cfg.students))
    for name, (c, _) in tasks.items():  # one kind of teacher per run: the students have one head
        theirs, ours = c.manifest.get("task") or {}, first.manifest.get("task") or {}
        if T.task_of(c.manifest) != T.task_of(first.manifest) or theirs.get("labels") != ours.get("labels") or \
                theirs.get("pad_token_id") != ours.get("pad_token_id"):
            raise StudentError(f"task {name!r} ({c.root}) holds a {T.task_of(c.manifest)} teacher's targets"
                               + (f" with labels {theirs['labels']} (padding {theirs['pad_token_id']})"
                                  if theirs else "")
                               + f", task {first_name!r} a {T.task_of(first.manifest)} teacher's"
                               + (f" with labels {ours['labels']} (padding {ours['pad_token_id']})" if ours else "")
                               + "; the caches of one run must share the task, its labels and the id their rows "
                                 "are padded with (a decoder classifier pools at the last token that is not it)")
    for name, (c, _) in tasks.items():
        if c.manifest["tokenizer"]["fingerprint"] != first.manifest["tokenizer"]["fingerprint"]:
            raise StudentError(f"task {name!r} ({c.root}) was made with another tokenizer than task {first_name!r} "
                               f"({first.root}); tasks of one run must share a tokenizer")
        for key in sorted(keys):
            if c.manifest["capture"].get(key) != first.manifest["capture"].get(key):
                raise StudentError(f"task {name!r}: capture.{key} {c.manifest['capture'].get(key)} differs from task "
                                   f"{first_name!r}'s {first.manifest['capture'].get(key)}")
    for name, (c, _) in tasks.items():  # the student attends as the teacher did when it made the targets
        made_with = bool(c.manifest["preparation"].get("document_mask", False))
        if cfg.document_mask is not None and cfg.document_mask != made_with:
            raise StudentError(f"document_mask = {cfg.document_mask} asked for, but task {name!r} ({c.root}) was "
                               f"captured with document_mask = {made_with}: its targets were made with "
                               f"{'block-diagonal' if made_with else 'plain causal'} attention over packed rows, "
                               "and a student must train with the same masking")
    for s in cfg.students:  # a tempered KD target is read at one index for every task: it must mean one T
        if s.temperature == 1.0 or not T.reads_tempered(s):
            continue
        where = {name: T.tempered_index(s, c.manifest) for name, (c, _) in tasks.items()}
        if len(set(where.values())) > 1:
            caps = "; ".join(f"{n}: {c.manifest['capture']['temperatures']}" for n, (c, _) in tasks.items())
            raise StudentError(f"student {s.name!r}: temperature {s.temperature} is not captured alike by every "
                               f"task (extra temperatures {caps}); capture the same temperatures in every cache")
    return tasks


def resume_identity(spec: StudentConfig, cfg: StudentRunConfig, tasks: dict, world: int) -> dict:
    """What must not change between a run and its resumption, except that a cache may have grown
    (its new manifest descends from the checkpoint's) and max_steps may be raised: see `grown_tasks`.
    The number of ranks may change when ranks x grad_accum (micro-batches per step) does not."""
    return {"student": spec.model_dump(mode="json"),
            "cache_digests": {name: c.manifest["digest"] for name, (c, _) in tasks.items()},
            "micro_batches_per_step": cfg.grad_accum * world,
            **cfg.model_dump(mode="json", include={"batch_size", "max_steps", "seed", "num_workers", "tasks", "cache",
                                                   "mutual_weight", "mutual_temperature"})}


def _upgrade_identity(old: dict, tasks: dict) -> dict:
    """An identity written by an earlier version, in today's keys."""
    old = dict(old)
    if "cache_digest" in old:  # before multi-cache identities: its first task's digest
        old["cache_digests"] = {next(iter(tasks)): old.pop("cache_digest")}
    if "grad_accum" in old:  # before DDP: one process
        old["micro_batches_per_step"] = old.pop("grad_accum")
    if isinstance(old.get("student"), dict):  # settings added since, at the value every earlier run had
        old["student"] = {"allow_biased_kd": False, "task": None, "tokenizer": None, **old["student"]}
    return old


def grown_tasks(old: dict, new: dict, tasks: dict) -> dict[str, bool] | None:
    """{task: whether its train split grew} for the tasks whose cache grew since the checkpoint with
    identity `old`, when that and a raised max_steps are the only differences from `new`; None when
    the run cannot continue from `old`."""
    old = _upgrade_identity(old, tasks)
    if old == new:
        return {}
    if {k: v for k, v in old.items() if k not in ("cache_digests", "max_steps")} != \
            {k: v for k, v in new.items() if k not in ("cache_digests", "max_steps")}:
        return None
    if old.get("max_steps", 0) > new["max_steps"] or set(old.get("cache_digests", {})) != set(new["cache_digests"]):
        return None
    grew = {}
    for name, digest in old["cache_digests"].items():
        if digest != new["cache_digests"][name]:
            records = tasks[name][0].manifest.get("grown", [])
            since = [i for i, g in enumerate(records) if g["parent_digest"] == digest]
            if not since:
                return None
            grew[name] = any(g["rows"].get("train") for g in records[since[0]:])
    return grew


def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_model_atomically(model, tokenizer, d: Path) -> None:
    """`d` holds a complete model at every moment: written beside it, then swapped in by renames."""
    tmp, old = d.with_name(d.name + ".tmp"), d.with_name(d.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if d.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(d, old)
    os.replace(tmp, d)
    shutil.rmtree(old, ignore_errors=True)


def recover_model_dir(d: Path) -> None:
    """A run stopped between the two renames of `save_model_atomically`: the previous model is put back."""
    old = d.with_name(d.name + ".old")
    if not d.exists() and old.exists():
        os.replace(old, d)
    shutil.rmtree(d.with_name(d.name + ".tmp"), ignore_errors=True)


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps up to the checkpoint's: a resumed run writes the later ones again."""
    if not path.exists():
        return
    def kept(line: str) -> bool:
        try:
            rec = json.loads(line)
            return rec["step"] <= step and rec.get("split") != "test"  # a test record: written again at the end
        except (ValueError, KeyError):  # a line cut short by the kill
            return False

    keep = [x for x in path.read_text().splitlines() if x.strip() and kept(x)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


def check_student_document_masking(model, name: str, device) -> None:
    """Refuse a student whose architecture would attend across the documents of a packed row."""
    def run(ids, pos):
        return model(input_ids=ids, position_ids=pos, use_cache=False).logits

    was_training = model.training
    model.eval()
    try:
        attn_mod.check_document_masking(run, model.config.vocab_size, device, f"student {name!r}")
    except attn_mod.DocumentMaskError as e:
        raise StudentError(str(e)) from None
    finally:
        model.train(was_training)


def plot_curves(metrics_path: Path, out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    tr = [(r["step"], r["loss"]) for r in recs if r["split"] == "train"]
    va = [(r["step"], r["nll"]) for r in recs if r["split"] == "validation" and "task" not in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    if tr:
        ax[0].plot(*zip(*tr), label="train loss (weighted total)")
    if va:
        ax[1].plot(*zip(*va), marker="o", label="validation NLL")
    for a in ax:
        a.set_xlabel("step")
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the recipe


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
        self._chars: dict[tuple[str, str], object] = {}  # (task, split) -> characters per cached token
        self.teacher_eval: dict[str, dict] = {}  # task -> the teacher's validation NLL (per token, per character)

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        """Each phase runs on every rank with no collective inside; an error on any rank is raised on all
        of them (`all_agree`), so no rank is left waiting in a collective the others never reach."""
        distributed.all_agree(self._setup)
        have = distributed.all_gather([(st.out / "checkpoint" / "state.pt").exists() for st in self.students])
        if any(h != have[0] for h in have):
            raise StudentError(f"the ranks see different checkpoints under {self.cfg.output_dir} ({have}): "
                               "output_dir must be on storage every rank shares")
        distributed.all_agree(lambda: self._resume(have[0]))
        for st in self.students:  # DDP broadcasts rank 0's weights: after resuming, identical anyway
            st.engine = self._wrap(st.module, st.spec)
        distributed.all_agree(self._data)

    def _setup(self) -> None:
        cfg = self.cfg
        self.tasks = open_tasks(cfg)
        self.cache = next(iter(self.tasks.values()))[0]
        self.manifest = self.cache.manifest
        self.tokenizer = self.cache.tokenizer()
        try:
            self.device = distributed.device_for(cfg.device)
        except ValueError as e:
            raise StudentError(str(e)) from None
        self.task = T.task_of(self.manifest)  # one for every cache of the run (open_tasks)
        self.dims = {n: {f: spec["dims"] for f, spec in c.manifest["fields"].items()} for n, (c, _) in self.tasks.items()}
        allowed = metrics_for(self.task)
        if cfg.early_stopping_metric not in allowed:
            raise StudentError(f"early_stopping_metric = {cfg.early_stopping_metric!r} is not a metric of a {self.task} "
                               f"cache (its metrics: {', '.join(allowed)})")
        if cfg.early_stopping_metric == "entity_f1" and not entity_scheme(self.manifest["task"]["labels"]):
            raise StudentError(f"early_stopping_metric = 'entity_f1', but the cache's labels {self.manifest['task']['labels']} "
                               "are not entity tags (O, B-<type>, I-<type>, ...)")
        self.student_tokenizers = {s.name: student_tokenizer(s, self.manifest, self.tokenizer) for s in cfg.students}
        crossing = [n for n, (_, cross) in self.student_tokenizers.items() if cross]
        if crossing and cfg.mutual_weight > 0:
            raise StudentError(f"mutual_weight > 0 compares the students' distributions over one vocabulary, but "
                               f"{', '.join(crossing)} {'has' if len(crossing) == 1 else 'have'} another tokenizer "
                               "than the cache's")
        self.fields = sorted({f for c, _ in self.tasks.values() for s in cfg.students
                              for f in T.fields_for(s, c.manifest, self.student_tokenizers[s.name][1])})
        # the teacher's LM head, for the full-vocabulary terms and an exact validation KL
        self.heads = {n: TeacherHead.from_cache(c, self.device) for n, (c, _) in self.tasks.items()
                      if "final_hidden" in c.manifest["fields"]}
        for s in cfg.students:
            if s.temperature != 1.0 and T.reads_tempered(s) and T.tempered_index(s, self.manifest) is None \
                    and self.task == "causal-lm":  # a classifier's distributions are exact at any temperature
                warnings.warn(f"student {s.name!r}: temperature {s.temperature} was not captured in {self.cache.root} "
                              f"(captured: {self.manifest['capture']['temperatures_all']}); the teacher's tail is "
                              "approximated")
        self.val_tasks = {n: (c, w) for n, (c, w) in self.tasks.items() if "validation" in c.splits}
        self.test_tasks = {n: (c, w) for n, (c, w) in self.tasks.items() if "test" in c.splits}
        if not self.val_tasks:
            self.log("no cache of this run has a validation split: no evaluation, no early stopping")
        for spec in cfg.students:
            self.students.append(self._build(spec))

    def _data(self) -> None:
        cfg, r = self.cfg, self.ranks
        trim = self.task != "causal-lm"  # one example per padded row: batches end at their longest row
        self.stream = TaskStream({n: (CacheBatches(c, "train", self.fields, cfg.batch_size, seed=cfg.seed, shuffle=True,
                                                   num_workers=cfg.num_workers, trim=trim), w)
                                  for n, (c, w) in self.tasks.items()},
                                 cfg.seed, self.run["stream"], rank=r.rank, world=r.world)
        self.run["stream"] = self.stream.state
        self.val_sets = {n: (self._eval_set(n, c, "validation", cfg.eval_rows), w)
                         for n, (c, w) in self.val_tasks.items()}
        if self.task == "causal-lm":  # the teacher's own figures on the same rows, per token and per character
            for n, (c, _) in self.val_tasks.items():
                m = teacher_metrics(c, "validation", self._char_counts(n, "validation"), cfg.eval_rows)
                if m is not None:
                    self.teacher_eval[n] = m
                    self.log(f"teacher on task {n!r} validation: NLL {m['nll']:.4f} per token"
                             + (f", {m['nll_per_char']:.4f} per character" if "nll_per_char" in m else ""))

    def _eval_set(self, name: str, c: Cache, split: str, rows: int | None = None) -> CacheBatches:
        """The batches of a held-out split that this rank evaluates (the first `rows` rows, or all)."""
        r = self.ranks
        keys = None if rows is None else c.rows(split).column("key").to_pylist()[:rows]
        if self.task != "causal-lm":
            fields = ["class_logprobs"]
        else:
            fields = list(T.TOPK_FIELDS) + (list(T.FULL_FIELDS) if name in self.heads else [])
        ds = CacheBatches(c, split, fields, self.cfg.batch_size, shuffle=False, keys=keys, trim=self.task != "causal-lm")
        if r.active:  # this rank's share of the batches
            ds.indices = [j for j in range(len(ds)) if j % r.world == r.rank]
        return ds

    def _build(self, spec: StudentConfig) -> Student:
        cfg, device = self.cfg, self.device
        tokenizer, cross = self.student_tokenizers[spec.name]
        model = build_student(spec, self.manifest, tokenizer, device, cross)
        rows = model.get_output_embeddings().weight.shape[0] if self.task == "causal-lm" and not cross else None
        for name, (c, _) in self.tasks.items():
            if rows is not None and rows < c.manifest["teacher"]["vocab_size"]:
                raise StudentError(f"student {spec.name!r}: {rows} output rows < task {name!r}'s vocabulary "
                                   f"({c.manifest['teacher']['vocab_size']})")
        if any(c.manifest["preparation"].get("document_mask") for c, _ in self.tasks.values()):
            check_student_document_masking(model, spec.name, device)
        model.train()
        out = Path(cfg.output_dir) / spec.name
        vocab_map, student_rows = None, {}
        if cross:
            vocab_map, student_rows = self._cross(spec, tokenizer, model, out)
        wiring = build_wiring(spec, model, self.manifest, device, vocab_map, cross)
        module = StudentModule(model, wiring)
        opt, sched = make_optimizer(module.parameters(), spec, cfg.max_steps)
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
            recover_model_dir(out / "model")
        st = Student(spec, model, module, module, opt, sched, out, wiring, tokenizer=tokenizer, rows=student_rows)
        st.identity = resume_identity(spec, cfg, self.tasks, self.ranks.world)
        self.log(f"student {spec.name}: {count_parameters(model) / 1e6:.2f}M parameters, losses {spec.losses}, "
                 f"T={spec.temperature}" + (f", DDP over {self.ranks.world} ranks" if self.ranks.active else ""))
        return st

    def _cross(self, spec: StudentConfig, tokenizer, model, out: Path) -> tuple:
        """A student with another tokenizer: the teacher's vocabulary mapped into its own, and every split it reads
        re-tokenised (once, kept in its output folder under the cache's and both tokenizers' digests)."""
        from .crosstok import VocabMap, require_offsets, stored_rows

        require_offsets(tokenizer, f"student {spec.name!r}'s tokenizer")
        vocab_map = VocabMap.build(self.tokenizer, tokenizer, self.manifest["teacher"]["vocab_size"])
        rows, longest = {}, 0
        for name, (c, _) in self.tasks.items():
            for split in c.splits:
                rows[(name, split)] = stored_rows(c, split, tokenizer, out / "retokenized", spec.name,
                                                  self.tokenizer if c is self.cache else None)
                longest = max(longest, rows[(name, split)].input_ids.shape[1])
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if limit is not None and longest > limit:
            raise StudentError(f"student {spec.name!r}: its tokenizer writes the cache's rows in up to {longest} "
                               f"tokens, more than its {limit} positions")
        train = rows.get((next(iter(self.tasks)), "train"))
        stats = train.stats() if train is not None else {}
        self.log(f"student {spec.name}: its own tokenizer ({describe_tokenizer_difference(self.tokenizer, tokenizer)}): "
                 f"{stats.get('aligned_share', 0):.1%} of its train positions aligned with the teacher's, "
                 f"{stats.get('lossless_rows', 0):.1%} of rows decoded and encoded back losslessly; teacher tokens "
                 f"mapped: {vocab_map.counts}")
        self.cross_stats[spec.name] = {"train": stats, "vocab_map": vocab_map.counts}
        return vocab_map, rows

    def _wrap(self, module: StudentModule, spec: StudentConfig) -> torch.nn.Module:
        """The one place that knows about DDP: a student trained on several ranks averages its gradients."""
        if not self.ranks.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        dev = self.device
        # a student whose terms never read its logits leaves the head (and layers past the mapped ones) unused
        unused = "logits" not in T.student_needs(spec)
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
        loaded = [self._load(st) for st in self.students]
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
                         f"{self.tasks[name][0].manifest['splits']['train']['rows']} train rows")
        if self.main:
            for st in self.students:
                truncate_metrics(st.out / "metrics.jsonl", self.run["step"])

    def _load(self, st: Student) -> tuple[dict, dict[str, bool]]:
        path = st.out / "checkpoint" / "state.pt"
        state = torch.load(path, map_location="cpu", weights_only=True)
        old, new = state.get("identity") or {}, st.identity
        grew = grown_tasks(old, new, self.tasks)
        if grew is None:
            old = _upgrade_identity(old, self.tasks)
            diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            raise StudentError(f"{path} was written by a run with other settings ({', '.join(diffs)} differ); "
                               "resume with the same settings (a cache that grew by appends and a larger max_steps are "
                               "fine; ranks x grad_accum must stay), or choose another output_dir")
        try:
            st.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise StudentError(
                f"{path} holds weights of another shape than student {st.name!r} ({str(e).splitlines()[-1].strip()}). "
                "A checkpoint written before FFN widths followed the teacher's ratio: set "
                "students[].arch.intermediate_size to its width (Llama's default was 11008)") from None
        st.module.projections.load_state_dict(state["projections"])
        st.opt.load_state_dict(state["optimizer"])
        st.sched.load_state_dict(state["scheduler"])
        st.best, st.best_step, st.bad_evals = state["best"], state["best_step"], state["bad_evals"]
        st.stopped, st.last_eval, st.best_eval = state["stopped"], state["last_eval"], state["best_eval"]
        rng = state.get("rng") or []
        if len(rng) == self.ranks.world:
            _set_rng_state(rng[self.ranks.rank])
        if grew:  # the validation split may have grown too: earlier losses are not comparable, early stopping restarts
            st.best, st.best_step, st.bad_evals, st.stopped, st.best_eval = None, None, 0, False, {}
        return state["run"], grew

    # -- training ---------------------------------------------------------------------------
    def micro_step(self, batch: dict, last: bool, task: str | None = None) -> None:
        """Forward and backward of every active student on one batch; gradients are averaged over
        ranks only on the last micro-batch of a step."""
        cfg, device = self.cfg, self.device
        active = [st for st in self.students if not st.stopped]
        mutual = cfg.mutual_weight > 0 and len(active) > 1
        task = task if task is not None else next(iter(self.tasks))
        capture = self.tasks[task][0].manifest["capture"]
        sig = T.TeacherSignal(batch, device, capture["temperatures"], capture, self.heads.get(task), self.task)
        with contextlib.ExitStack() as stack:
            for st in active:
                stack.enter_context(distributed.maybe_no_sync(st.engine, not last))
            values, logits, masks = {}, {}, None
            for st in active:
                view = st.rows[(task, "train")].batch(batch["row"]) if st.cross else None
                out = forward(st.engine, st.wiring, batch, device, want_logits=mutual or "logits" in
                              T.student_needs(st.spec), view=view)
                mine = sig.aligned(view["align"], self.dims[task]) if st.cross else sig
                values[st.name] = T.compute(st.spec, out, mine, st.wiring)
                if st.cross:  # logged, not trained on: the share of its real positions with a teacher partner
                    values[st.name]["aligned_share"] = (out.masks.rep.sum() / out.masks.real.sum().clamp(min=1)
                                                        ).detach()
                masks = out.masks
                if mutual:
                    logits[st.name] = out.logits
                else:
                    (values[st.name]["total"] / cfg.grad_accum).backward()
            if mutual:  # every student's graph is alive at once: memory grows with the number of students
                mt = mutual_terms(logits, masks.kd, self.manifest["teacher"]["vocab_size"], cfg.mutual_temperature,
                              classes=self.task != "causal-lm")
                for st in active:
                    v = values[st.name]
                    v["mutual"] = mt[st.name]  # x T^2 already (L.full_forward_kl, L.class_divergence)
                    v["total"] = v["total"] + cfg.mutual_weight * v["mutual"]
                    (v["total"] / cfg.grad_accum).backward()
        for st in active:  # detached sums on the device: read at log steps only, no sync per micro-batch
            for k, v in values[st.name].items():
                d = v.detach() / cfg.grad_accum
                st.running[k] = st.running[k] + d if k in st.running else d
        self._tokens_pending += int(batch["length"].sum())  # a CPU tensor: no device sync

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
                _append_jsonl(st.out / "metrics.jsonl", rec)
            st.running = {}

    def evaluate(self, step: int) -> None:
        """Every active student on every task's validation rows: one read per evaluation."""
        cfg = self.cfg
        active = [st for st in self.students if not st.stopped]
        if not active or not self.val_sets:
            return
        per_task = self._evaluate_sets({st.name: st.model for st in active}, self.val_sets)
        for st in active:
            mine = {n: m[st.name] for n, m in per_task.items()}
            m = self._combine(mine, self.val_sets)
            if self.main and len(mine) > 1:
                for n, x in mine.items():
                    _append_jsonl(st.out / "metrics.jsonl", {"split": "validation", "task": n, "step": step, **x})
            st.last_eval = {**m, "step": step}
            if self.main:
                _append_jsonl(st.out / "metrics.jsonl", {"split": "validation", "step": step,
                                                         **{k: v for k, v in m.items() if k != "tasks"}})
            key = cfg.early_stopping_metric
            better = st.best is None or (m[key] < st.best if LOWER_IS_BETTER[key] else m[key] > st.best)
            if better:
                st.best, st.best_step, st.bad_evals, st.best_eval = m[key], step, 0, st.last_eval
                if self.main:
                    save_model_atomically(st.model, st.tokenizer, st.out / "model")
            else:
                st.bad_evals += 1
                if cfg.patience is not None and st.bad_evals >= cfg.patience:
                    st.stopped = True
                    self.log(f"student {st.name}: early stop at step {step} (best {key} {st.best:.4f} at step "
                             f"{st.best_step})")

    def _evaluate_sets(self, models: dict, sets: dict, split: str = "validation") -> dict[str, dict[str, dict]]:
        """{task: {student: metrics}} over the given evaluation sets (of `split`)."""
        return {n: evaluate_all(models, make_loader(ds), self.device, self.heads.get(n),
                                self.tasks[n][0].manifest.get("task"), self._readings(n, split, models))
                for n, (ds, _) in sets.items()}

    def _readings(self, task: str, split: str, models: dict) -> dict[str, Reading] | None:
        """How each student reads a held-out split: its re-tokenised rows (another tokenizer), or the cache's tokens
        with their character counts (NLL per character)."""
        if self.task != "causal-lm":
            return None
        by_name = {st.name: st for st in self.students}
        out = {}
        for name in models:
            st = by_name.get(name)
            if st is not None and st.cross:
                out[name] = Reading(rows=st.rows[(task, split)], vocab_map=st.wiring.vocab_map, dims=self.dims[task])
            else:
                out[name] = Reading(chars=self._char_counts(task, split))
        return out

    def _char_counts(self, task: str, split: str):
        """Characters per cached token of the rows of `split` that are evaluated (None: not available), once."""
        if (task, split) not in self._chars:
            from .crosstok import teacher_chars

            c = self.tasks[task][0]
            try:  # the rows evaluated: the first eval_rows of the validation split, every test row
                table = c.rows(split, max_rows=self.cfg.eval_rows if split == "validation" else None)
                self._chars[(task, split)] = teacher_chars(c.tokenizer() if c is not self.cache else self.tokenizer,
                                                           row_column(table, "input_ids", np.int64),
                                                           table.column("length").to_numpy().astype(np.int64))
            except Exception as e:  # e.g. a slow cache tokenizer: no character offsets, no NLL per character
                self.log(f"task {task!r}: no NLL per character ({e})")
                self._chars[(task, split)] = None
        return self._chars[(task, split)]

    @staticmethod
    def _combine(mine: dict[str, dict], sets: dict) -> dict:
        """One student's metrics of several tasks, weighted by task (counts added), with the per-task ones."""
        if len(mine) == 1:
            return dict(next(iter(mine.values())))
        total_w = sum(w for _, w in sets.values())
        first = next(iter(mine.values()))
        counts = ("tokens", "examples", "chars")
        m = {k: sum(mine[n][k] * w for n, (_, w) in sets.items()) / total_w for k in first if k not in counts
             and k != "ppl" and all(k in x for x in mine.values())}
        if "nll" in m and "ppl" in first:
            m["ppl"] = math.exp(min(m["nll"], 50))
        for k in counts:
            if k in first:
                m[k] = sum(x[k] for x in mine.values())
        m["tasks"] = mine
        return m

    def test(self) -> dict[str, dict]:
        """Each student's best model (as saved) on the caches' test splits: {student: metrics}, written to its
        metrics.jsonl. The saved model is read back on every rank, so every rank evaluates the same weights."""
        if not self.test_tasks:
            return {}
        from ..capture.teacher import auto_class

        sets = {n: (self._eval_set(n, c, "test"), w) for n, (c, w) in self.test_tasks.items()}
        out = {}
        for st in self.students:  # one at a time: a best model beside the training ones, then freed
            saved = st.out / "model"
            model = auto_class(self.task).from_pretrained(saved, dtype=torch.float32).to(self.device) \
                if (saved / "config.json").exists() else st.model
            per_task = self._evaluate_sets({st.name: model}, sets, "test")
            del model
            out[st.name] = self._combine({n: m[st.name] for n, m in per_task.items()}, sets)
            if self.main:
                _append_jsonl(st.out / "metrics.jsonl", {"split": "test", "step": self.run["step"],
                                                         "best_step": st.best_step,
                                                         **{k: v for k, v in out[st.name].items() if k != "tasks"}})
        return out

    def checkpoint(self) -> None:
        """Rank 0 writes each student's state; every rank's RNG state goes with it."""
        self._sync_tokens()
        rng = distributed.all_gather(_rng_state())
        if not self.main:
            return
        for st in self.students:
            path = st.out / "checkpoint" / "state.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"model": st.model.state_dict(), "optimizer": st.opt.state_dict(),
                        "scheduler": st.sched.state_dict(), "run": self.run, "best": st.best,
                        "best_step": st.best_step, "bad_evals": st.bad_evals, "stopped": st.stopped,
                        "last_eval": st.last_eval, "best_eval": st.best_eval, "identity": st.identity,
                        "projections": st.module.projections.state_dict(), "rng": rng,
                        "world_size": self.ranks.world}, tmp)
            os.replace(tmp, path)

    # -- the run ----------------------------------------------------------------------------
    def train(self) -> list[dict]:
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
            at_log = step % cfg.log_every == 0 or step == cfg.max_steps
            if at_log:
                self._sync_tokens()
                now = time.perf_counter()
                bar.set_postfix(tokens_per_s=f"{(run['tokens'] - tokens_at_log) / max(now - t_at_log, 1e-9):,.0f}")
                tokens_at_log, t_at_log = run["tokens"], now
                self.log_train(step)
            if self.val_sets and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                self.evaluate(step)
            if step % ckpt_every == 0 or step == cfg.max_steps:
                self.checkpoint()
            if self.after_step is not None:
                self.after_step(step)
        bar.close()
        return self.finish()

    def finish(self) -> list[dict]:
        cfg, run = self.cfg, self.run
        pending = [st for st in self.students if self.val_sets and st.last_eval.get("step") != run["step"]
                   and not st.stopped]
        if pending:
            self.evaluate(run["step"])
        if not self.val_sets and self.main:
            for st in self.students:
                save_model_atomically(st.model, st.tokenizer, st.out / "model")
        self.checkpoint()
        tested = self.test()
        reports = []
        for st in self.students:
            report = {"name": st.name, "parameters": count_parameters(st.model), "steps": run["step"],
                      "tokens_seen": run["tokens"], "wall_seconds": run["seconds"], "stopped_early": st.stopped,
                      "best_step": st.best_step, "metric": cfg.early_stopping_metric, "final": st.best_eval,
                      "last_eval": st.last_eval, "losses": st.spec.losses, "temperature": st.spec.temperature,
                      "tasks": {n: {"cache": str(c.root), "cache_digest": c.manifest["digest"], "weight": w}
                                for n, (c, w) in self.tasks.items()},
                      "mutual_weight": cfg.mutual_weight, "device": self.device.type, "ranks": self.ranks.world,
                      "init": getattr(st.model.config, "distill_init", None), "task": self.task}
            if st.name in self.cross_stats:
                report["cross_tokenizer"] = self.cross_stats[st.name]
            if self.teacher_eval:
                report["teacher_validation"] = self.teacher_eval
            if st.name in tested:
                report["test"] = tested[st.name]
            reports.append(report)
            if not self.main:
                continue
            (st.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            plot_curves(st.out / "metrics.jsonl", st.out / "curves.png", f"{st.name}: {st.spec.losses}")
            if st.best_eval:
                self.log(f"student {st.name}: best at step {st.best_step}: {describe(st.best_eval)} -> {st.out / 'model'}")
            if st.name in tested:
                self.log(f"student {st.name}: test: {describe(tested[st.name])}")
        return reports


def describe(m: dict) -> str:
    """A metrics record in one line."""
    if "accuracy" in m:
        return (f"accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}"
                + (f", entity F1 {m['entity_f1']:.4f}" if "entity_f1" in m else "")
                + f", agreement with the teacher {m['top1_agreement']:.3f}, KL {m['kl']:.4f}, NLL {m['nll']:.4f}, "
                  f"ECE {m['ece']:.4f}")
    return (f"NLL {m['nll']:.4f} (ppl {m['ppl']:.1f}), top-1 agreement {m['top1_agreement']:.3f}, KL {m['kl']:.4f}, "
            f"ECE {m['ece']:.4f}")


def train_students(cfg: StudentRunConfig, log: Callable[[str], None] = print, progress: bool = True,
                   after_step: Callable[[int], None] | None = None) -> list[dict]:
    """Train every student of `cfg` (one process, or one rank of a torchrun launch); their reports."""
    return Recipe(cfg, log, progress, after_step).train()
