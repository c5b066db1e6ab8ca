"""Stage 2: train one or more students from a finished cache; the teacher is never loaded.

One pass over the cache feeds every student: each batch is read once and each active student
takes a forward/backward step on it. Per student: AdamW, linear warmup then cosine decay, gradient
clipping, the run's gradient accumulation; bf16 autocast on GPU, fp32 on CPU. Every `eval_every`
steps each student is evaluated on the cache's validation split against the cached teacher
outputs (NLL/perplexity, top-1 agreement, KL with the tail, ECE); the best model so far is saved
with `save_pretrained`; early stopping on a chosen metric. Checkpoints hold model, optimiser,
scheduler and the data position, so a killed run resumes to the same result.

Output per student, in `output_dir/<name>/`: `model/` (plain transformers model + tokenizer),
`checkpoint/state.pt`, `metrics.jsonl`, `curves.png`, `report.json`.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import attention as attn_mod
from . import losses as L
from ..format.cache import Cache
from ..config import StudentConfig, StudentRunConfig
from .reader import CacheBatches, make_loader
from .representation import attention_pairs, decode_hidden, hidden_pairs, make_projections, map_heads
from .students import StudentError, build_student, count_parameters

KD_TERMS = {"kd_forward", "kd_forward_renorm", "kd_reverse", "kd_jsd", "mse_logprobs", "mse_logits"}
TOPK_FIELDS = ["topk_ids", "topk_logprobs", "logsumexp"]
LOWER_IS_BETTER = {"nll": True, "kl": True, "top1_agreement": False}
ECE_BINS = 15


# ---------------------------------------------------------------------------------------------
# what each student needs from the cache


def _temperature_index(spec: StudentConfig, manifest: dict) -> int | None:
    temps = manifest["capture"]["temperatures"]
    return temps.index(spec.temperature) if spec.temperature in temps else None


FIELD_OF_TERM = {"hidden_mse": "hidden_states", "hidden_cosine": "hidden_states", "attn_kl": "attentions",
                 "attn_mse": "attentions", "nll_match": "target_logprob"}


def fields_for(spec: StudentConfig, manifest: dict) -> list[str]:
    """The cache fields this student's losses read; refuses a loss whose field the cache lacks."""
    need: list[tuple[str, str]] = []  # (loss term, field)
    for term, w in spec.losses.items():
        if w == 0:
            continue
        if term in KD_TERMS:
            need += [(term, f) for f in TOPK_FIELDS]
            if spec.temperature != 1.0 and _temperature_index(spec, manifest) is not None:
                need.append((term, "logsumexp_tempered"))
        elif term in FIELD_OF_TERM:
            need.append((term, FIELD_OF_TERM[term]))
    have = set(manifest["fields"])
    for term, f in need:
        if f not in have:
            raise StudentError(f"student {spec.name!r}: loss {term} needs field {f!r}, which the cache does not "
                               f"hold (captured: {', '.join(sorted(have))})")
    return list(dict.fromkeys(f for _, f in need))


@dataclass
class Rep:
    """A student's representation-distillation wiring (empty when it uses none)."""

    hidden: list[tuple[int, int]] = field(default_factory=list)  # (student hidden index, cached position)
    attention: list[tuple[int, int]] = field(default_factory=list)  # (student layer, cached position)
    projections: torch.nn.ModuleList = field(default_factory=torch.nn.ModuleList)
    hidden_encoding: str | None = None


def build_rep(spec: StudentConfig, model, manifest: dict, device) -> Rep:
    rep = Rep()
    n_s = model.config.num_hidden_layers
    if any(spec.losses.get(t) for t in ("hidden_mse", "hidden_cosine")):
        rep.hidden = hidden_pairs(spec, manifest, n_s)
        d_s = model.config.hidden_size
        rep.projections = make_projections(rep.hidden, d_s, manifest["teacher"]["hidden_size"]).to(device)
        rep.hidden_encoding = manifest["fields"]["hidden_states"].get("encoding")
    if any(spec.losses.get(t) for t in ("attn_kl", "attn_mse")):
        rep.attention = attention_pairs(spec, manifest, n_s)
        attn_mod.enable(model)  # eager attention on the mapped layers only, sdpa elsewhere
    return rep


# ---------------------------------------------------------------------------------------------
# one step's losses


@dataclass
class Masks:
    """Which positions of a batch count for what, and how the student attends."""

    real: torch.Tensor  # (B, L) a real token: representation terms (hidden states, attention maps)
    kd: torch.Tensor  # (B, L) real and trained (loss_mask): KD terms, top-1 agreement, KL
    ce: torch.Tensor  # (B, L) trained with a real next token: CE, NLL, calibration
    forward: dict  # attention_mask or position_ids for the student's forward pass


def batch_masks(batch: dict, device) -> Masks:
    ids = batch["input_ids"]
    pos = torch.arange(ids.shape[1], device=device)
    length = batch["length"].to(device)
    real = pos[None] < length[:, None]  # (B, L)
    has_next = pos[None] < (length[:, None] - 1)  # (B, L)
    trained = batch.get("loss_mask")
    kd, ce = (real, has_next) if trained is None else (real & trained.to(device), has_next & trained.to(device))
    # use_cache=False: training needs no KV cache, and transformers ignores packed position_ids when one exists
    if "position_ids" in batch:  # documents kept apart, as the teacher saw them; padding is its own segment
        forward = {"position_ids": batch["position_ids"].to(device), "use_cache": False}
    else:
        forward = {"attention_mask": None if bool(real.all()) else real.long(), "use_cache": False}
    return Masks(real, kd, ce, forward)


def student_losses(model, batch: dict, spec: StudentConfig, t_index: int | None, device,
                   rep: Rep | None = None, keep_logits: bool = False) -> dict[str, torch.Tensor]:
    """Named loss terms (unweighted) and 'total' (weighted sum) for one batch."""
    rep = rep or Rep()
    ids = batch["input_ids"].to(device)
    masks = batch_masks(batch, device)
    valid, has_next = masks.kd, masks.ce
    recorder = attn_mod.AttentionRecorder([s for s, _ in rep.attention], None, "none") if rep.attention else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), \
            attn_mod.recording(recorder):
        out = model(input_ids=ids, output_hidden_states=bool(rep.hidden), **masks.forward)
    logits = out.logits  # (B, L, V)
    terms: dict[str, torch.Tensor] = {}
    T = spec.temperature
    lse1 = L.logsumexp_t(logits, 1.0) if ({"ce", "nll_match"} & set(spec.losses) or T == 1.0) else None
    if {"ce", "nll_match"} & set(spec.losses):
        s_tgt = L.next_token_logprobs(logits, ids, lse1)  # (B, L) student log p(next)
        if "ce" in spec.losses:
            terms["ce"] = L.cross_entropy(s_tgt, has_next)
        if "nll_match" in spec.losses:
            t_tgt = batch["target_logprob"].to(device)
            terms["nll_match"] = L.nll_match(s_tgt, t_tgt, has_next & torch.isfinite(t_tgt))
    if rep.hidden:
        h_t_all = batch["hidden_states"].to(device)  # (B, n_cached, L, d_t) stored dtype
        parts_mse, parts_cos = [], []
        for i, (s_idx, j) in enumerate(rep.hidden):
            h_s = out.hidden_states[s_idx].float()
            if len(rep.projections):
                h_s = rep.projections[i](h_s)
            h_t = decode_hidden(h_t_all[:, j], rep.hidden_encoding)
            parts_mse.append(L.hidden_mse(h_s, h_t, masks.real) if "hidden_mse" in spec.losses else None)
            parts_cos.append(L.hidden_cosine(h_s, h_t, masks.real) if "hidden_cosine" in spec.losses else None)
        if "hidden_mse" in spec.losses:
            terms["hidden_mse"] = torch.stack(parts_mse).mean()
        if "hidden_cosine" in spec.losses:
            terms["hidden_cosine"] = torch.stack(parts_cos).mean()
    if rep.attention:
        a_all = batch["attentions"].to(device)  # (B, n_cached, H_t, L, L)
        kl, mse = [], []
        for s_idx, j in rep.attention:
            a_t, a_s = map_heads(a_all[:, j].float(), recorder.maps[s_idx].float(), spec.attention_heads, spec.name)
            if "attn_kl" in spec.losses:
                kl.append(L.attention_kl(a_t, a_s, masks.real))
            if "attn_mse" in spec.losses:
                mse.append(L.attention_mse(a_t, a_s, masks.real))
        if kl:
            terms["attn_kl"] = torch.stack(kl).mean()
        if mse:
            terms["attn_mse"] = torch.stack(mse).mean()
    kd = [t for t in spec.losses if t in KD_TERMS]
    if kd:
        topk_ids = batch["topk_ids"].to(device).long()
        t_lse = batch["logsumexp"].to(device)
        t_lse_T = batch["logsumexp_tempered"][:, t_index].to(device) if t_index is not None else None
        lseT = lse1 if T == 1.0 else L.logsumexp_t(logits, T)
        s_lp, s_tail = L.student_topk_logprobs(logits, topk_ids, T, lse=lseT)
        t_lp, t_tail = L.teacher_topk_logprobs(batch["topk_logprobs"].to(device), t_lse, T, t_lse_T)
        for name in kd:
            if name == "kd_forward":
                terms[name] = L.forward_kl(t_lp, t_tail, s_lp, s_tail, valid, T)
            elif name == "kd_forward_renorm":
                terms[name] = L.forward_kl_renormalized(t_lp, s_lp, valid, T)
            elif name == "kd_reverse":
                terms[name] = L.reverse_kl(t_lp, t_tail, s_lp, s_tail, valid, T)
            elif name == "kd_jsd":
                terms[name] = L.jsd(t_lp, t_tail, s_lp, s_tail, valid, spec.jsd_beta, T)
            elif name == "mse_logprobs":
                terms[name] = L.mse_logprobs(t_lp, s_lp, valid)
            elif name == "mse_logits":
                t_logits = batch["topk_logprobs"].to(device) + t_lse[..., None]
                terms[name] = L.mse_logits(t_logits, logits.gather(-1, topk_ids).float(), valid)
    terms["total"] = sum(spec.losses[k] * v for k, v in terms.items())
    if keep_logits:
        terms["logits"] = logits  # for the mutual term; not part of total
    return terms


# ---------------------------------------------------------------------------------------------
# evaluation against the cached teacher


@torch.no_grad()
def evaluate(model, loader, device) -> dict[str, float]:
    """NLL/perplexity on true next tokens, top-1 agreement with the teacher, KL(teacher || student)
    over the cached top-K + tail, and expected calibration error (15 equal-width bins)."""
    model.eval()
    s = {"nll": 0.0, "n_next": 0, "agree": 0.0, "kl": 0.0, "n_valid": 0}
    bins_n = torch.zeros(ECE_BINS, dtype=torch.float64)
    bins_conf = torch.zeros(ECE_BINS, dtype=torch.float64)
    bins_acc = torch.zeros(ECE_BINS, dtype=torch.float64)
    for batch in loader:
        ids = batch["input_ids"].to(device)
        masks = batch_masks(batch, device)
        valid, has_next = masks.kd, masks.ce
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids, **masks.forward).logits
        lse = L.logsumexp_t(logits)
        nxt = torch.roll(ids, -1, dims=1)
        tgt_lp = L.next_token_logprobs(logits, ids, lse)
        s["nll"] += float(-(tgt_lp[has_next]).sum())
        s["n_next"] += int(has_next.sum())
        top_val, top_id = logits.max(-1)
        topk_ids = batch["topk_ids"].to(device).long()
        s["agree"] += float((top_id == topk_ids[..., 0])[valid].sum())
        s_lp, s_tail = L.student_topk_logprobs(logits, topk_ids, 1.0, lse=lse)
        t_lp, t_tail = L.teacher_topk_logprobs(batch["topk_logprobs"].to(device), batch["logsumexp"].to(device))
        s["kl"] += float(L.forward_kl(t_lp, t_tail, s_lp, s_tail, valid) * valid.sum())
        s["n_valid"] += int(valid.sum())
        conf = torch.exp(top_val.float() - lse)[has_next].double().cpu()
        correct = (top_id == nxt)[has_next].double().cpu()
        b = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1)
        bins_n += torch.bincount(b, minlength=ECE_BINS).double()
        bins_conf += torch.bincount(b, weights=conf, minlength=ECE_BINS)
        bins_acc += torch.bincount(b, weights=correct, minlength=ECE_BINS)
    model.train()
    n = max(s["n_next"], 1)
    ece = float((bins_acc - bins_conf).abs().sum() / max(bins_n.sum(), 1))
    nll = s["nll"] / n
    return {"nll": nll, "ppl": math.exp(min(nll, 50)), "top1_agreement": s["agree"] / max(s["n_valid"], 1),
            "kl": s["kl"] / max(s["n_valid"], 1), "ece": ece, "tokens": s["n_next"]}


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class _Student:
    spec: StudentConfig
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    out: Path
    t_index: int | None
    rep: Rep = field(default_factory=Rep)
    identity: dict = field(default_factory=dict)
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped: bool = False
    last_eval: dict = field(default_factory=dict)
    best_eval: dict = field(default_factory=dict)
    running: dict = field(default_factory=dict)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model, spec: StudentConfig, total: int, extra: list | None = None):
    params = list(model.parameters()) + list(extra or [])
    decay = [p for p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in params if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=spec.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, spec.warmup_steps, total, spec.min_lr_ratio))
    return opt, sched


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def resume_identity(st: _Student, cfg: StudentRunConfig, tasks: dict) -> dict:
    """What must not change between a run and its resumption, except that a cache may have grown
    (its new manifest descends from the checkpoint's) and max_steps may be raised: see `grown_tasks`."""
    return {"student": st.spec.model_dump(mode="json"),
            "cache_digests": {name: c.manifest["digest"] for name, (c, _) in tasks.items()},
            **cfg.model_dump(mode="json", include={"batch_size", "grad_accum", "max_steps", "seed", "num_workers",
                                                   "tasks", "cache", "mutual_weight", "mutual_temperature"})}


def grown_tasks(old: dict, new: dict, tasks: dict) -> dict[str, bool] | None:
    """{task: whether its train split grew} for the tasks whose cache grew since the checkpoint with
    identity `old`, when that and a raised max_steps are the only differences from `new`; None when
    the run cannot continue from `old`."""
    if "cache_digest" in old:  # a checkpoint from before multi-cache identities: its first task's digest
        old = {k: v for k, v in old.items() if k != "cache_digest"} | {
            "cache_digests": {next(iter(tasks)): old["cache_digest"]}}
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


def save_checkpoint(st: _Student, run: dict) -> None:
    path = st.out / "checkpoint" / "state.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": st.model.state_dict(), "optimizer": st.opt.state_dict(), "scheduler": st.sched.state_dict(),
                "run": run, "best": st.best, "best_step": st.best_step, "bad_evals": st.bad_evals,
                "stopped": st.stopped, "last_eval": st.last_eval, "best_eval": st.best_eval,
                "identity": st.identity, "projections": st.rep.projections.state_dict()}, tmp)
    os.replace(tmp, path)


def _load_checkpoint(st: _Student, tasks: dict) -> tuple[dict, dict[str, bool]]:
    """The run state of a student's checkpoint and the tasks whose cache grew since it was written
    ({task: whether its train split grew})."""
    path = st.out / "checkpoint" / "state.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    old, new = state.get("identity") or {}, st.identity
    grew = grown_tasks(old, new, tasks)
    if grew is None:
        diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise StudentError(f"{path} was written by a run with other settings ({', '.join(diffs)} differ); "
                           "resume with the same settings (a cache that grew by appends and a larger max_steps are "
                           "fine), or choose another output_dir")
    st.model.load_state_dict(state["model"])
    st.rep.projections.load_state_dict(state["projections"])
    st.opt.load_state_dict(state["optimizer"])
    st.sched.load_state_dict(state["scheduler"])
    st.best, st.best_step, st.bad_evals = state["best"], state["best_step"], state["bad_evals"]
    st.stopped, st.last_eval, st.best_eval = state["stopped"], state["last_eval"], state["best_eval"]
    if grew:  # the validation split may have grown too: earlier losses are not comparable, early stopping restarts
        st.best, st.best_step, st.bad_evals, st.stopped, st.best_eval = None, None, 0, False, {}
    return state["run"], grew


def _save_model(st: _Student, tokenizer) -> None:
    d = st.out / "model"
    st.model.save_pretrained(d)
    tokenizer.save_pretrained(d)


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


CAPTURE_KEYS_USED_BY = {  # capture settings that must agree across the caches of one run, and the terms reading them
    "hidden_layers": ("hidden_mse", "hidden_cosine"), "hidden_dtype": ("hidden_mse", "hidden_cosine"),
    "attention_layers": ("attn_kl", "attn_mse"), "attention_heads_stored": ("attn_kl", "attn_mse"),
}


def _open_tasks(cfg: StudentRunConfig) -> dict[str, tuple[Cache, float]]:
    """Every task's cache, checked to share one tokenizer (and, for representation terms, one capture)."""
    tasks = {t.name: (Cache(t.cache, storage_options=cfg.storage_options), t.weight) for t in cfg.task_list()}
    first_name, (first, _) = next(iter(tasks.items()))
    for name, (c, _) in tasks.items():
        if c.manifest["tokenizer"]["fingerprint"] != first.manifest["tokenizer"]["fingerprint"]:
            raise StudentError(f"task {name!r} ({c.root}) was made with another tokenizer than task {first_name!r} "
                               f"({first.root}); tasks of one run must share a tokenizer")
        for key, uses in CAPTURE_KEYS_USED_BY.items():
            if any(s.losses.get(u) for s in cfg.students for u in uses) and \
                    c.manifest["capture"][key] != first.manifest["capture"][key]:
                raise StudentError(f"task {name!r}: capture.{key} {c.manifest['capture'][key]} differs from task "
                                   f"{first_name!r}'s {first.manifest['capture'][key]}")
    for name, (c, _) in tasks.items():  # the student attends as the teacher did when it made the targets
        made_with = bool(c.manifest["preparation"].get("document_mask", False))
        if cfg.document_mask is not None and cfg.document_mask != made_with:
            raise StudentError(f"document_mask = {cfg.document_mask} asked for, but task {name!r} ({c.root}) was "
                               f"captured with document_mask = {made_with}: its targets were made with "
                               f"{'block-diagonal' if made_with else 'plain causal'} attention over packed rows, "
                               "and a student must train with the same masking")
    for s in cfg.students:  # a tempered KD target is read at one index for every task: it must mean one T
        if s.temperature == 1.0 or not any(t in KD_TERMS for t in s.losses):
            continue
        where = {name: _temperature_index(s, c.manifest) for name, (c, _) in tasks.items()}
        if len(set(where.values())) > 1:
            caps = "; ".join(f"{n}: {c.manifest['capture']['temperatures']}" for n, (c, _) in tasks.items())
            raise StudentError(f"student {s.name!r}: temperature {s.temperature} is not captured alike by every "
                               f"task (extra temperatures {caps}); capture the same temperatures in every cache")
    return tasks


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


def mutual_terms(logits: dict[str, torch.Tensor], masks: torch.Tensor, vocab: int, temperature: float
                 ) -> dict[str, torch.Tensor]:
    """Deep mutual learning: for each student, mean over the others of KL(other || self) on the
    shared vocabulary, the other's prediction taken as a fixed target (detached)."""
    out = {}
    for name, mine in logits.items():
        others = [L.full_forward_kl(o.detach()[..., :vocab], mine, masks, temperature)
                  for n, o in logits.items() if n != name]
        out[name] = torch.stack(others).mean()
    return out


def train_students(cfg: StudentRunConfig, log: Callable[[str], None] = print, progress: bool = True,
                   after_step: Callable[[int], None] | None = None) -> list[dict]:
    from tqdm.auto import tqdm

    from .reader import TaskStream
    from ..capture.teacher import resolve_device

    tasks = _open_tasks(cfg)
    cache = next(iter(tasks.values()))[0]
    manifest = cache.manifest
    tokenizer = cache.tokenizer()
    device = resolve_device(cfg.device)
    fields = sorted({f for c, _ in tasks.values() for s in cfg.students for f in fields_for(s, c.manifest)})
    for s in cfg.students:
        if s.temperature != 1.0 and _temperature_index(s, manifest) is None and any(t in KD_TERMS for t in s.losses):
            warnings.warn(f"student {s.name!r}: temperature {s.temperature} was not captured in {cache.root} "
                          f"(captured: {manifest['capture']['temperatures_all']}); the teacher's tail is approximated")
    val_tasks = {n: (c, w) for n, (c, w) in tasks.items() if "validation" in c.splits}
    if not val_tasks:
        log("no cache of this run has a validation split: no evaluation, no early stopping")

    students: list[_Student] = []
    for spec in cfg.students:
        model = build_student(spec, manifest, tokenizer, device)
        rows = model.get_output_embeddings().weight.shape[0]
        for name, (c, _) in tasks.items():
            if rows < c.manifest["teacher"]["vocab_size"]:
                raise StudentError(f"student {spec.name!r}: {rows} output rows < task {name!r}'s vocabulary "
                                   f"({c.manifest['teacher']['vocab_size']})")
        if any(c.manifest["preparation"].get("document_mask") for c, _ in tasks.values()):
            check_student_document_masking(model, spec.name, device)
        model.train()
        rep = build_rep(spec, model, manifest, device)
        opt, sched = _optimizer(model, spec, cfg.max_steps, list(rep.projections.parameters()))
        out = Path(cfg.output_dir) / spec.name
        out.mkdir(parents=True, exist_ok=True)
        st = _Student(spec, model, opt, sched, out, _temperature_index(spec, manifest), rep)
        st.identity = resume_identity(st, cfg, tasks)
        students.append(st)
        log(f"student {spec.name}: {count_parameters(model) / 1e6:.2f}M parameters, losses {spec.losses}, "
            f"T={spec.temperature}")

    run = {"step": 0, "tokens": 0, "seconds": 0.0, "stream": None}
    have = [(st.out / "checkpoint" / "state.pt").exists() for st in students]
    if any(have):
        if not all(have):
            raise StudentError("some students of this run have checkpoints and others do not: "
                               f"{[st.spec.name for st, h in zip(students, have) if not h]} lack one")
        loaded = [_load_checkpoint(st, tasks) for st in students]
        runs = [r for r, _ in loaded]
        if any(r != runs[0] for r in runs):
            raise StudentError("the students' checkpoints are at different steps; cannot resume them together")
        run = runs[0]
        log(f"resuming at step {run['step']}")
        for name, train_grew in loaded[0][1].items():
            log(f"task {name!r}: the cache grew since the checkpoint; the best model and early stopping start over")
            if train_grew:  # its next epoch, whose order covers the new shards, starts now
                pos = run["stream"]["tasks"][name]
                pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0
                log(f"task {name!r}: training goes on with epoch {pos['epoch']} over all "
                    f"{tasks[name][0].manifest['splits']['train']['rows']} train rows")
    else:
        for st in students:
            (st.out / "metrics.jsonl").unlink(missing_ok=True)

    stream = TaskStream({n: (CacheBatches(c, "train", fields, cfg.batch_size, seed=cfg.seed, shuffle=True,
                                          num_workers=cfg.num_workers), w) for n, (c, w) in tasks.items()},
                        cfg.seed, run["stream"])
    run["stream"] = stream.state
    val_sets = {}
    for n, (c, w) in val_tasks.items():
        keys = None if cfg.eval_rows is None else c.rows("validation").column("key").to_pylist()[: cfg.eval_rows]
        val_sets[n] = (CacheBatches(c, "validation", TOPK_FIELDS, cfg.batch_size, shuffle=False, keys=keys), w)

    def do_eval(st: _Student, step: int) -> None:
        per_task = {n: evaluate(st.model, make_loader(ds), device) for n, (ds, _) in val_sets.items()}
        if len(per_task) == 1:
            m = next(iter(per_task.values()))
        else:
            total_w = sum(w for _, w in val_sets.values())
            m = {k: sum(per_task[n][k] * w for n, (_, w) in val_sets.items()) / total_w
                 for k in ("nll", "top1_agreement", "kl", "ece")}
            m["ppl"] = math.exp(min(m["nll"], 50))
            m["tokens"] = sum(x["tokens"] for x in per_task.values())
            for n, x in per_task.items():
                _append_jsonl(st.out / "metrics.jsonl", {"split": "validation", "task": n, "step": step, **x})
            m["tasks"] = per_task
        st.last_eval = {**m, "step": step}
        _append_jsonl(st.out / "metrics.jsonl", {"split": "validation", "step": step,
                                                 **{k: v for k, v in m.items() if k != "tasks"}})
        key = cfg.early_stopping_metric
        better = st.best is None or (m[key] < st.best if LOWER_IS_BETTER[key] else m[key] > st.best)
        if better:
            st.best, st.best_step, st.bad_evals, st.best_eval = m[key], step, 0, st.last_eval
            _save_model(st, tokenizer)
        else:
            st.bad_evals += 1
            if cfg.patience is not None and st.bad_evals >= cfg.patience:
                st.stopped = True
                log(f"student {st.spec.name}: early stop at step {step} (best {key} {st.best:.4f} at step "
                    f"{st.best_step})")

    ckpt_every = cfg.checkpoint_every or cfg.eval_every
    bar = tqdm(total=cfg.max_steps, initial=run["step"], desc="students", unit="step", disable=not progress)
    t_start = time.perf_counter() - run["seconds"]
    micro = 0
    tokens_at_log, t_at_log = run["tokens"], time.perf_counter()
    vocab = manifest["teacher"]["vocab_size"]
    batches = iter(stream)
    while run["step"] < cfg.max_steps and not all(st.stopped for st in students):
        task, batch = next(batches)
        active = [st for st in students if not st.stopped]
        mutual = cfg.mutual_weight > 0 and len(active) > 1
        all_terms = {}
        for st in active:
            terms = student_losses(st.model, batch, st.spec, st.t_index, device, st.rep, keep_logits=mutual)
            if not mutual:
                (terms["total"] / cfg.grad_accum).backward()
            all_terms[st.spec.name] = terms
        if mutual:  # every student's graph is alive at once: memory grows with the number of students
            mt = mutual_terms({n: t.pop("logits") for n, t in all_terms.items()}, batch_masks(batch, device).kd, vocab,
                              cfg.mutual_temperature)
            for st in active:
                terms = all_terms[st.spec.name]
                terms["mutual"] = mt[st.spec.name] * cfg.mutual_temperature**2
                terms["total"] = terms["total"] + cfg.mutual_weight * terms["mutual"]
                (terms["total"] / cfg.grad_accum).backward()
        for st in active:
            for k, v in all_terms[st.spec.name].items():
                st.running[k] = st.running.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        run["tokens"] += int(batch["length"].sum())
        micro += 1
        if micro < cfg.grad_accum:
            continue
        micro = 0
        for st in active:
            if st.spec.grad_clip is not None:
                params = list(st.model.parameters()) + list(st.rep.projections.parameters())
                torch.nn.utils.clip_grad_norm_(params, st.spec.grad_clip)
            st.opt.step()
            st.sched.step()
            st.opt.zero_grad(set_to_none=True)
        run["step"] += 1
        step = run["step"]
        run["seconds"] = time.perf_counter() - t_start
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            bar.set_postfix(tokens_per_s=f"{(run['tokens'] - tokens_at_log) / max(now - t_at_log, 1e-9):,.0f}")
            tokens_at_log, t_at_log = run["tokens"], now
        for st in active:
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                rec = {"split": "train", "step": step, "loss": st.running.get("total", 0.0) / n,
                       **{k: v / n for k, v in st.running.items() if k != "total"},
                       "lr": st.sched.get_last_lr()[0], "tokens": run["tokens"], "seconds": run["seconds"]}
                _append_jsonl(st.out / "metrics.jsonl", rec)
                st.running = {}
            if val_sets and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                do_eval(st, step)
        if step % ckpt_every == 0 or step == cfg.max_steps:
            for st in students:
                save_checkpoint(st, run)
        if after_step is not None:
            after_step(step)
    bar.close()

    reports = []
    for st in students:
        if not val_sets:
            _save_model(st, tokenizer)
        elif st.last_eval.get("step") != run["step"] and not st.stopped:
            do_eval(st, run["step"])
        save_checkpoint(st, run)
        report = {"name": st.spec.name, "parameters": count_parameters(st.model), "steps": run["step"],
                  "tokens_seen": run["tokens"], "wall_seconds": run["seconds"], "stopped_early": st.stopped,
                  "best_step": st.best_step, "metric": cfg.early_stopping_metric, "final": st.best_eval,
                  "last_eval": st.last_eval, "losses": st.spec.losses, "temperature": st.spec.temperature,
                  "tasks": {n: {"cache": str(c.root), "cache_digest": c.manifest["digest"], "weight": w}
                            for n, (c, w) in tasks.items()},
                  "mutual_weight": cfg.mutual_weight, "device": device.type,
                  "init": getattr(st.model.config, "distill_init", None)}
        (st.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_curves(st.out / "metrics.jsonl", st.out / "curves.png", f"{st.spec.name}: {st.spec.losses}")
        reports.append(report)
        if st.best_eval:
            log(f"student {st.spec.name}: best at step {st.best_step}: NLL {st.best_eval['nll']:.4f} "
                f"(ppl {st.best_eval['ppl']:.1f}), top-1 agreement {st.best_eval['top1_agreement']:.3f}, "
                f"KL {st.best_eval['kl']:.4f}, ECE {st.best_eval['ece']:.4f} -> {st.out / 'model'}")
    return reports
