"""Students against the cached teacher on held-out rows: one read of the validation batches per
evaluation, whatever the number of students, split over ranks and summed.

Metrics: NLL and perplexity of the true next token, NLL per character of text (comparable across
tokenizers: the NLL of the predicted tokens over the characters they hold), top-1 agreement with
the teacher, KL(teacher || student) and expected calibration error (15 equal-width confidence bins).
A student with another tokenizer than the cache's is read on its own re-tokenised rows (`Reading`):
its agreement and KL are taken at the positions aligned with the teacher's, through the vocabulary
map (`kd_mapped`'s KL), and `aligned_share` and `mapped_mass` (the teacher's top-K mass its
vocabulary map carries) are reported beside them. KL is exact over the
whole vocabulary when the cache holds the teacher's final hidden states and LM head
(`capture.final_hidden`, `head` given), else over the cached top-K + exact tail bucket (a lower
bound of the full KL). Every rank adds its batches into float64 sums; one all-reduce per evaluation
gives every rank the same metrics, so early-stopping decisions agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from .. import distributed
from ..format.layout import row_column
from ..format.manifest import Task
from ..models import TeacherSpec
from . import losses
from .signal import TeacherSignal, aligned_masks, batch_masks

ECE_BINS = 15
LOWER_IS_BETTER = {"nll": True, "kl": True, "top1_agreement": False, "ece": True, "accuracy": False, "macro_f1": False,
                   "entity_f1": False}
CAUSAL_METRICS = ("nll", "kl", "top1_agreement", "ece")
_SUMS = ("nll", "n_next", "agree", "kl", "n_valid", "chars", "n_real", "n_aligned", "mapped_mass")


@dataclass
class Reading:
    """How a student reads a split's batches: the cache's own tokens (`rows` None; `chars`: characters per
    cached token, (N, L), for NLL per character), or its re-tokenised rows and vocabulary map."""

    chars: np.ndarray | None = None
    rows: object = None  # retokenized.StudentRows
    vocab_map: object = None  # vocab_map.VocabMap
    dims: dict | None = None  # the cache's field dims (manifest), to take its fields at aligned positions


EVAL_BLOCK_MIB = 64  # float32 logits of one block of positions during evaluation (see `_logit_blocks`)


@torch.no_grad()
def _accumulate(model, batch: dict, device, head=None, reading: Reading | None = None, autocast: bool = False
                ) -> torch.Tensor:
    reading = reading or Reading()
    chars = None
    if reading.rows is not None:  # another tokenizer: its own rows, the teacher at the aligned positions
        view = reading.rows.batch(batch["row"])
        ids = view["input_ids"].to(device)
        masks = aligned_masks(view, device)
        chars = view["chars"].to(device)
        sig = TeacherSignal(batch, device).aligned(view["align"], reading.dims)
    else:
        ids = batch["input_ids"].to(device)
        masks = batch_masks(batch, device)
        if reading.chars is not None:
            chars = torch.from_numpy(reading.chars[batch["row"].numpy(), : ids.shape[1]]).to(device)
        sig = TeacherSignal(batch, device)
    topk_ids = sig.topk_ids  # (B, L, K): every teacher quantity here has positions on its axis 1
    t_lp, t_tail = sig.topk(1.0)
    mapped = reading.vocab_map.ids.to(device)[topk_ids] if reading.rows is not None else None  # -1: none
    t_hidden = head.decode(batch["final_hidden"].to(device)) \
        if head is not None and mapped is None and "final_hidden" in batch else None
    targets = Targets(next_ids=torch.roll(ids, -1, dims=1), topk_ids=topk_ids, logprobs=t_lp, log_tail=t_tail,
                      mapped=mapped, hidden=t_hidden,
                      next_chars=torch.roll(chars, -1, dims=1) if chars is not None else None)
    total = None
    for a, b, logits in _logit_blocks(model, ids, masks.forward, device, autocast):
        blk = _block_sums(logits, masks.block(a, b), targets.block(a, b), head)
        total = blk if total is None else total + blk
    return total.cpu()  # one device-to-host copy per batch


@dataclass(frozen=True)
class Targets:
    """What a batch's positions are scored against, each (B, L, ...) with positions on axis 1: the next token, the
    teacher's top-K ids, log-probs and tail, a cross-tokenizer student's ids for them (`mapped`, -1: none), the
    teacher's final hidden state (exact KL through its head), and the characters of the next token."""

    next_ids: torch.Tensor
    topk_ids: torch.Tensor
    logprobs: torch.Tensor
    log_tail: torch.Tensor
    mapped: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    next_chars: torch.Tensor | None = None

    def block(self, a: int, b: int) -> "Targets":
        """Positions a..b of every row."""
        return Targets(**{f.name: None if (v := getattr(self, f.name)) is None else v[:, a:b] for f in fields(self)})


def _logit_blocks(model, ids: torch.Tensor, forward: dict, device, autocast: bool):
    """(a, b, the model's logits at positions a..b of every row), blocks of at most EVAL_BLOCK_MIB of float32
    logits made from its last hidden state through its head (a linear head without bias; else the logits are made
    whole and sliced)."""
    from .step import StudentHead, block_positions

    L = ids.shape[1]
    P = block_positions(model, ids.shape[0], EVAL_BLOCK_MIB)
    whole = not 0 < P < L  # one block holds every position (or the head cannot be split off): the model's own logits
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = (model if whole else model.base_model)(input_ids=ids, **forward)
    if whole:
        yield 0, L, out.logits
        return
    last = out.last_hidden_state
    weight = model.get_output_embeddings().weight
    head = StudentHead(TeacherSpec.from_config(model.config), autocast)
    for a in range(0, L, P):
        yield a, min(L, a + P), head(last[:, a : a + P], weight)


def _block_sums(logits, masks, targets: Targets, head) -> torch.Tensor:
    """The evaluation sums (`_SUMS`, then the ECE bins) over one block of positions."""
    valid, has_next = masks.kd, masks.ce
    nxt, topk_ids, t_lp, t_tail = targets.next_ids, targets.topk_ids, targets.logprobs, targets.log_tail
    mapped, t_hidden, n_chars = targets.mapped, targets.hidden, targets.next_chars
    lse = losses.logsumexp_t(logits)
    tgt_lp = losses.next_token_logprobs(logits, None, lse, next_ids=nxt)
    top_val, top_id = logits.max(-1)
    mass = n_aligned = torch.tensor(float("nan"), dtype=torch.float64)  # NaN: not a cross-tokenizer student
    if mapped is not None:
        s_lp = losses.upcast(logits.gather(-1, mapped.clamp(min=0))) - lse[..., None]
        kl = losses.mapped_forward_kl(t_lp, t_tail, mapped, s_lp, valid) * valid.sum()
        agree = (top_id == mapped[..., 0])[valid].double().sum()
        mass = torch.where(mapped >= 0, t_lp.exp(), 0.0).sum(-1)[valid].double().sum()
        n_aligned = masks.rep.sum().double()
    else:
        if t_hidden is not None:
            kl = losses.full_divergence(head, t_hidden, logits, valid) * valid.sum()
        else:
            s_lp, s_tail = losses.student_topk_logprobs(logits, topk_ids, 1.0, lse=lse)
            kl = losses.forward_kl(t_lp, t_tail, s_lp, s_tail, valid) * valid.sum()
        agree = (top_id == topk_ids[..., 0])[valid].double().sum()
    conf = torch.exp(top_val.float() - lse)[has_next].double()
    correct = (top_id == nxt)[has_next].double()
    b = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1)
    chars = n_chars[has_next].double().sum() if n_chars is not None else torch.tensor(float("nan"), dtype=torch.float64)
    dev = logits.device
    sums = torch.stack([-(tgt_lp[has_next]).double().sum(), has_next.sum().double(), agree, kl.double(),
                        valid.sum().double(), chars.to(dev), masks.real.sum().double(),
                        n_aligned.to(dev), mass.to(dev)])
    bins = torch.cat([torch.bincount(b, minlength=ECE_BINS).double(),
                      torch.bincount(b, weights=conf, minlength=ECE_BINS),
                      torch.bincount(b, weights=correct, minlength=ECE_BINS)])
    return torch.cat([sums, bins])


def _metrics(acc: torch.Tensor) -> dict[str, float]:
    s = dict(zip(_SUMS, acc[: len(_SUMS)].tolist()))
    n_bins, conf, correct = acc[len(_SUMS):].reshape(3, ECE_BINS)
    n = max(s["n_next"], 1)
    nll = s["nll"] / n
    out = {"nll": nll, "ppl": math.exp(min(nll, 50)), "top1_agreement": s["agree"] / max(s["n_valid"], 1),
           "kl": s["kl"] / max(s["n_valid"], 1), "ece": float((correct - conf).abs().sum() / max(n_bins.sum(), 1)),
           "tokens": int(s["n_next"])}
    if math.isfinite(s["chars"]):
        out["nll_per_char"] = s["nll"] / max(s["chars"], 1)
        out["chars"] = int(s["chars"])
    if math.isfinite(s["n_aligned"]):  # a student with another tokenizer
        out["aligned_share"] = s["n_aligned"] / max(s["n_real"], 1)
        out["mapped_mass"] = s["mapped_mass"] / max(s["n_valid"], 1)
    return out


def evaluate_all(models: dict[str, torch.nn.Module], batches, device, head=None, task: Task | None = None,
                 readings: dict[str, Reading] | None = None, precision: str = "auto", counted: int | None = None
                 ) -> dict[str, dict[str, float]]:
    """{name: metrics} for every model, reading `batches` once (this rank's share of them); the sums
    are added over ranks when run under torch.distributed. `head`: the cache's TeacherHead, for an
    exact KL from batches that hold final_hidden. `task`: the cache's task (a classifier's labels).
    `readings`: per model, how it reads the batches (default: the cache's tokens, no NLL per character).
    `precision`: as the students train (StudentRunConfig.precision). `counted`: how many of the batches count; those
    after them are run and not counted (sharded models: every rank runs as many forward passes)."""
    from .step import autocast_on

    autocast = autocast_on(device, precision)
    if task is not None and task.classifier:
        return _evaluate_classes(models, batches, device, task, autocast, counted)
    readings = readings or {}
    stacked = _sweep(models, batches, len(_SUMS) + 3 * ECE_BINS,
                     lambda name, m, b: _accumulate(m, b, device, head, readings.get(name), autocast), counted)
    return {name: _metrics(stacked[i]) for i, name in enumerate(models)}


def _sweep(models: dict, batches, size: int, sums, counted: int | None = None) -> torch.Tensor:
    """(models, size) float64: each model's `sums(name, model, batch)` added over the batches (the first `counted`
    of them; the rest are computed and dropped), in eval mode, then over ranks (one collective per evaluation)."""
    acc = torch.zeros(len(models), size, dtype=torch.float64)
    was = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        for k, batch in enumerate(batches):
            for i, (name, m) in enumerate(models.items()):
                value = sums(name, m, batch)
                if counted is None or k < counted:
                    acc[i] += value
    finally:
        for name, m in models.items():
            m.train(was[name])
    return distributed.sum_(acc) if models else acc


def evaluate(model, batches, device, head=None, task: Task | None = None, reading: Reading | None = None
             ) -> dict[str, float]:
    """One model's metrics (see `evaluate_all`)."""
    return evaluate_all({"model": model}, batches, device, head, task,
                        {"model": reading} if reading is not None else None)["model"]


# ---------------------------------------------------------------------------------------------
# classification: against the gold labels and the teacher's cached class distribution


def metrics_for(task: str) -> tuple[str, ...]:
    """The validation metrics of a task (what early_stopping_metric may name)."""
    if task == "causal-lm":
        return CAUSAL_METRICS
    return CAUSAL_METRICS + ("accuracy", "macro_f1") + (("entity_f1",) if task == "token-classification" else ())


def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", "_"
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (tag in ("B", "S") or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) of each entity in a tag sequence (IOB1, IOB2, IOE, IOBES), chunked as conlleval and
    seqeval's default mode do: an entity starts at B/S, or at I/E after O or another type."""
    out, prev_tag, prev_type, begin = set(), "O", "_", 0
    for i, t in enumerate(list(tags) + ["O"]):
        tag, type_ = _split_tag(t)
        if _ends(prev_tag, tag, prev_type, type_):
            out.add((prev_type, begin, i - 1))
        if _starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return out


def entity_scheme(labels: list[str]) -> bool:
    """Whether a label set tags entities (every label O or B-/I-/E-/S-<type>): entity F1 is defined for it."""
    return any(n != "O" for n in labels) and all(n == "O" or (len(n) > 2 and n[0] in "BIES" and n[1] == "-")
                                                  for n in labels)


_CSUMS = ("nll", "n_labelled", "correct", "agree", "kl", "n_kd", "ent_tp", "ent_pred", "ent_gold")


def _evaluate_classes(models, batches, device, task: Task, autocast: bool = False, counted: int | None = None
                      ) -> dict[str, dict[str, float]]:
    names = list(task.labels)
    C = len(names)
    tagged = task.per_token and entity_scheme(names)
    stacked = _sweep(models, batches, len(_CSUMS) + 3 * ECE_BINS + C * C,
                     lambda name, m, b: _class_sums(m, b, device, C, names if tagged else None, autocast), counted)
    return {name: _class_metrics(stacked[i], C, tagged) for i, name in enumerate(models)}


@torch.no_grad()
def _class_sums(model, batch: dict, device, C: int, tag_names: list[str] | None, autocast: bool = False
                ) -> torch.Tensor:
    masks = batch_masks(batch, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=batch["input_ids"].to(device), **masks.forward).logits
    lp = torch.log_softmax(logits.double(), dim=-1)
    labels = batch["labels"].to(device)
    lab, kd = masks.ce, masks.kd
    t_lp = batch["class_logprobs"].to(device).double()
    pred, gold, t_pred = lp.argmax(-1), labels.clamp(min=0), t_lp.argmax(-1)
    nll = -lp.gather(-1, gold[..., None])[..., 0]
    kl = losses.divergence(t_lp, lp, "forward")
    conf = lp.max(-1).values.exp()[lab]
    correct = (pred == gold)[lab].double()
    b = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1)
    tp = n_pred = n_gold = 0
    if tag_names is not None:  # entities over each row's labelled positions (each word's first token), in order
        for i in range(labels.shape[0]):
            keep = lab[i]
            g = entities([tag_names[j] for j in gold[i][keep].tolist()])
            p = entities([tag_names[j] for j in pred[i][keep].tolist()])
            tp, n_pred, n_gold = tp + len(g & p), n_pred + len(p), n_gold + len(g)
    sums = torch.tensor([nll[lab].sum().item(), lab.sum().item(), correct.sum().item(),
                         (pred == t_pred)[kd].double().sum().item(), kl[kd].sum().item(), kd.sum().item(),
                         tp, n_pred, n_gold], dtype=torch.float64)
    bins = torch.cat([torch.bincount(b, minlength=ECE_BINS).double(), torch.bincount(b, weights=conf, minlength=ECE_BINS),
                      torch.bincount(b, weights=correct, minlength=ECE_BINS)]).cpu()
    confusion = torch.bincount(gold[lab] * C + pred[lab], minlength=C * C).double().cpu()
    return torch.cat([sums, bins, confusion])


def _class_metrics(acc: torch.Tensor, C: int, tagged: bool) -> dict[str, float]:
    s = dict(zip(_CSUMS, acc[: len(_CSUMS)].tolist()))
    n_bins, conf, correct = acc[len(_CSUMS): len(_CSUMS) + 3 * ECE_BINS].reshape(3, ECE_BINS)
    cm = acc[len(_CSUMS) + 3 * ECE_BINS:].reshape(C, C)  # gold x predicted
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0  # classes that occur in the gold labels or the predictions (as sklearn)
    f1 = torch.where(support + predicted > 0, 2 * tp / (support + predicted).clamp(min=1), 0.0)
    n = max(s["n_labelled"], 1)
    out = {"nll": s["nll"] / n, "accuracy": s["correct"] / n,
           "macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
           "top1_agreement": s["agree"] / max(s["n_kd"], 1), "kl": s["kl"] / max(s["n_kd"], 1),
           "ece": float((correct - conf).abs().sum() / max(n_bins.sum(), 1)), "examples": int(s["n_labelled"])}
    if tagged:
        p = s["ent_tp"] / s["ent_pred"] if s["ent_pred"] else 0.0
        r = s["ent_tp"] / s["ent_gold"] if s["ent_gold"] else 0.0
        out |= {"entity_precision": p, "entity_recall": r, "entity_f1": 2 * p * r / (p + r) if p + r else 0.0}
    return out


def teacher_metrics(cache, split: str, chars: np.ndarray | None, rows: int | None = None) -> dict[str, float] | None:
    """The teacher's own NLL of the true next token on a split (its first `rows` rows), per token and, with the
    characters per cached token, per character: the figure students of any tokenizer are compared with. None
    when the cache did not capture target_logprob."""
    if "target_logprob" not in cache.manifest.fields:
        return None
    table = cache.rows(split, max_rows=rows)
    n = len(table)
    lp = np.asarray(cache.array(split, "target_logprob")[:n], dtype=np.float64)  # (N, L)
    lengths = table.column("length").to_numpy()
    pos = np.arange(lp.shape[1])[None]
    has_next = pos < (lengths[:, None] - 1)
    if "loss_mask" in cache.manifest.fields:
        has_next &= row_column(table, "loss_mask", np.bool_)
    has_next &= np.isfinite(lp)
    nll = -lp[has_next].sum()
    out = {"nll": nll / max(has_next.sum(), 1), "tokens": int(has_next.sum())}
    if chars is not None:
        out["nll_per_char"] = nll / max(np.roll(chars[:n], -1, axis=1)[has_next].sum(), 1)
    return out
