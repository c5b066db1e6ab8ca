"""Step 2, capture: one teacher forward pass -> a `TeacherTargets` batch.

The full (B, L, V) logits are never held: the decoder's last hidden state is pushed
through the LM head in blocks of `position_chunk` positions, and each block yields its
top-K, logsumexp (T=1 and any extra temperatures) and the log-prob of the true next
token in one go (and, with `samples`, the draws of the sampled targets: a second block, the
proposal's probabilities). Peak memory is one or two (position_chunk, V) float32 blocks plus the model.
Hidden states and attention maps are recorded by `representations.py`; each batch goes to the host through a
`HostBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import attention
from ..errors import CaptureOverflowError
from ..models import TeacherSpec, output_logits
from . import precision
from .representations import HiddenStates, add_representations, to_storage

@dataclass
class TeacherTargets:
    """Teacher outputs for B rows of L positions; the one type the writer and readers share.

    Positions at or past a row's length (padding) hold zeros; `target_logprob` is NaN where
    there is no next token (the last real position, and padding).
    """

    topk_ids: np.ndarray | None = None  # (B, L, K) int32 (written in the field's dtype), descending log-prob
    topk_logprobs: np.ndarray | None = None  # (B, L, K) float16, log p at T=1
    logsumexp: np.ndarray | None = None  # (B, L) float32, of the logits at T=1
    target_logprob: np.ndarray | None = None  # (B, L) float32, log p(next token)
    logsumexp_tempered: np.ndarray | None = None  # (B, n_T, L) float32, logsumexp(z / T)
    hidden_states: np.ndarray | None = None  # (B, n_hidden, L, d) float16 or bfloat16 (stored as uint16 bits)
    attentions: np.ndarray | None = None  # (B, n_attn, H_kept, L, L) float16
    hidden_scale: np.ndarray | None = None  # (B, n_hidden, L) float32: int8 hidden_states times this
    sample_ids: np.ndarray | None = None  # (B, L, N) distinct drawn ids, ascending, then 0 in empty slots
    sample_counts: np.ndarray | None = None  # (B, L, N) draws of each id; 0 marks an empty slot
    sample_logprobs: np.ndarray | None = None  # (B, L, N) float16 teacher log p at T=1 of sample_ids
    final_hidden: np.ndarray | None = None  # (B, L, d) the LM head's input (float16/float32, or bfloat16 bits)
    logprob_kl: np.ndarray | None = None  # (B, L) float32 KL(exact || stored) of rounded log-probs; a statistic
    # classification teachers: every class, (B, C) per row or (B, L, C) per token (zeros at padding)
    class_logprobs: np.ndarray | None = None  # float32 log p at T=1
    class_logsumexp: np.ndarray | None = None  # (B,) or (B, L) float32 logsumexp of the logits at T=1
    class_logsumexp_tempered: np.ndarray | None = None  # (B, n_T) or (B, n_T, L) float32 logsumexp(z / T)

    def fields(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @staticmethod
    def concat(parts: list["TeacherTargets"]) -> "TeacherTargets":
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return TeacherTargets(
            **{k: (np.concatenate([getattr(p, k) for p in parts]) if v is not None else None)
               for k, v in first.__dict__.items()}
        )


def logit_targets(
    hidden: torch.Tensor,  # (B, L, d) last hidden state (after the final norm)
    head,  # hidden (P, d) -> logits (P, V) float32
    next_ids: torch.Tensor,  # (B, L) int64, -1 where there is no next token
    k: int,
    temperatures: list[float],
    position_chunk: int,
    samples: int = 0,
    sample_temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Per position: top-K ids and log-probs, logsumexp at T=1 and at `temperatures`, log p of the next
    token, and with `samples` N: N draws from q = softmax(z / sample_temperature) as distinct ids
    (ascending), their counts and their log p at T=1 (empty slots: id 0, count 0, log p 0)."""
    B, L, d = hidden.shape
    flat = hidden.reshape(B * L, d)
    nxt = next_ids.reshape(B * L)
    out_ids, out_lp, out_lse, out_tgt, out_lse_t = [], [], [], [], []
    out_sid, out_scount, out_slp = [], [], []
    for s in range(0, B * L, position_chunk):
        z = head(flat[s : s + position_chunk])  # (P, V) float32, the only (P, V) buffer
        vals, ids = torch.topk(z, k, dim=-1)  # (P, K), descending
        if samples:
            sid, scount, sz = draw_samples(z, samples, sample_temperature, generator)
        n = nxt[s : s + position_chunk]
        z_tgt = z.gather(1, n.clamp(min=0)[:, None])[:, 0]  # (P,)
        m = vals[:, :1]  # (P, 1) the row max: the logsumexp shift, for free from top-k
        z.sub_(m)  # z - max <= 0, in place
        if temperatures:  # logsumexp(z / T) = max / T + log sum exp((z - max) / T)
            out_lse_t.append(torch.stack([m[:, 0] / t + (z / t).exp_().sum(-1).log() for t in temperatures]))
        lse = m[:, 0] + z.exp_().sum(-1).log()  # (P,) same maths as torch.logsumexp, no second buffer
        tgt = z_tgt - lse
        out_tgt.append(torch.where(n >= 0, tgt, torch.full_like(tgt, float("nan"))))
        out_ids.append(ids.to(torch.int32))
        out_lp.append(vals - lse[:, None])
        out_lse.append(lse)
        if samples:
            out_sid.append(sid)
            out_scount.append(scount)
            out_slp.append(torch.where(scount > 0, sz - lse[:, None], 0.0))
    res = {
        "topk_ids": torch.cat(out_ids).reshape(B, L, k),
        "topk_logprobs": torch.cat(out_lp).reshape(B, L, k),
        "logsumexp": torch.cat(out_lse).reshape(B, L),
        "target_logprob": torch.cat(out_tgt).reshape(B, L),
    }
    if temperatures:
        res["logsumexp_tempered"] = torch.cat(out_lse_t, dim=1).reshape(len(temperatures), B, L).transpose(0, 1)
    if samples:
        res["sample_ids"] = torch.cat(out_sid).reshape(B, L, samples)
        res["sample_counts"] = torch.cat(out_scount).reshape(B, L, samples)
        res["sample_logprobs"] = torch.cat(out_slp).reshape(B, L, samples)
    return res


def draw_samples(z: torch.Tensor, n: int, temperature: float, generator: torch.Generator | None = None):
    """`n` draws with replacement from softmax(z / temperature) per row of z (P, V): (distinct ids ascending,
    their counts, their logits z), each (P, n), the slots past a row's distinct ids holding 0."""
    probs = torch.softmax(z / temperature, dim=-1) if temperature != 1.0 else torch.softmax(z, dim=-1)
    draws = torch.multinomial(probs, n, replacement=True, generator=generator)  # (P, n)
    del probs
    draws, _ = draws.sort(dim=-1)
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = new.long().cumsum(1) - 1  # the slot of each draw: its id's rank among the row's distinct ids
    counts = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)
    zs = z.new_zeros(draws.shape).scatter_(1, slot, z.gather(1, draws))
    return ids, counts, zs


class HostBatch:
    """One batch's targets on their way to host memory. On a GPU each tensor is copied into a pinned buffer without
    blocking and one event is recorded after the copies, so the teacher's next forward is queued at once;
    `result()` waits for that event (the batch's one sync point, taken by whoever writes the batch, never by the
    loop that runs the teacher) and returns the `TeacherTargets`. On a CPU the tensors are the results.

    Checks that need values (a hidden state overflowing float16) are queued with the copies (`check`) and raised
    by `result()`.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.tensors: dict[str, torch.Tensor] = {}
        self.checks: list[tuple[torch.Tensor, torch.Tensor, str]] = []  # (failed?, magnitude, message with {})
        self.event = None

    def _host(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return x.cpu()
        buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        buf.copy_(x, non_blocking=True)
        return buf

    def put(self, name: str, x: torch.Tensor) -> None:
        self.tensors[name] = self._host(x)

    def check(self, failed: torch.Tensor, magnitude: torch.Tensor, message: str) -> None:
        """Raise CaptureOverflowError(message.format(magnitude)) at `result()` when `failed` (0-d bools) holds."""
        self.checks.append((self._host(failed), self._host(magnitude), message))

    def close(self) -> "HostBatch":
        if self.cuda:
            self.event = torch.cuda.Event()
            self.event.record()
        return self

    def result(self) -> TeacherTargets:
        if self.event is not None:
            self.event.synchronize()
        for failed, magnitude, message in self.checks:
            if bool(failed):
                raise CaptureOverflowError(message.format(float(magnitude)))
        return TeacherTargets(**{k: _numpy(v) for k, v in self.tensors.items()})


@dataclass
class Done:
    """Targets already on the host, as a `HostBatch` hands them over."""

    targets: TeacherTargets

    def result(self) -> TeacherTargets:
        return self.targets


def _numpy(x: torch.Tensor) -> np.ndarray:
    """A host tensor as numpy (bfloat16 as its uint16 bits)."""
    return x.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else x.numpy()


class TargetComputer:
    """Runs the teacher on a batch of rows: `submit` returns its `HostBatch` (the copies to the host under way),
    calling it returns the `TeacherTargets` (numpy, on the CPU)."""

    def __init__(self, model, spec: TeacherSpec, capture, hidden_layers: list[int], attention_layers: list[int],
                 gather_heads=None):
        self.model = model
        self.gather_heads = gather_heads  # tensor parallelism: joins a layer's maps of the group's heads
        self.spec = spec
        self.cfg = capture
        self.hidden_layers = hidden_layers  # resolved, non-negative, as in output_hidden_states
        self.hidden = HiddenStates(model, spec.num_layers, hidden_layers)
        self.attention_layers = attention_layers  # resolved decoder layer indices
        self.head = output_logits(model, spec)
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        self.device = next(model.parameters()).device
        if attention_layers:
            attention.enable(model)

    def __call__(self, input_ids: np.ndarray, lengths: np.ndarray,
                 position_ids: np.ndarray | None = None, seed: list[int] | None = None) -> TeacherTargets:
        return self.submit(input_ids, lengths, position_ids, seed).result()

    def submit(self, input_ids: np.ndarray, lengths: np.ndarray,
               position_ids: np.ndarray | None = None, seed: list[int] | None = None) -> HostBatch:
        """`position_ids` (B, L): documents kept apart (restarting positions, padding a segment of its own).
        `seed` seeds the sampled targets' draws (with capture.samples): the same seed, rows and settings give
        the same draws on the same device type. Nothing here waits for the device."""
        with no_grad_for(self.model):
            return self._submit(input_ids, lengths, position_ids, seed)

    def _submit(self, input_ids: np.ndarray, lengths: np.ndarray, position_ids: np.ndarray | None,
                seed: list[int] | None) -> HostBatch:
        B, L = input_ids.shape
        ids = torch.from_numpy(input_ids).to(self.device, torch.long)  # (B, L)
        lens = torch.from_numpy(lengths).to(self.device, torch.long)
        pos = torch.arange(L, device=self.device)
        valid = pos[None, :] < lens[:, None]  # (B, L)
        mask = None if bool((lengths == L).all()) else valid.long()  # from the host's lengths: no device sync
        extra = {}
        if position_ids is not None:  # transformers reads packed documents from the restarts when mask is None
            mask = None
            extra["position_ids"] = torch.from_numpy(position_ids).to(self.device, torch.long)
        recorder = (
            attention.AttentionRecorder(self.attention_layers, self.cfg.attention_heads, self.cfg.attention_head_reduce,
                                        self.gather_heads)
            if self.attention_layers
            else None
        )
        with attention.recording(recorder), self.hidden.recording():
            out = self.base(
                input_ids=ids,
                attention_mask=mask,
                output_hidden_states=bool(self.hidden_layers) and not self.hidden.hooked,
                use_cache=False,
                **extra,
            )
        nxt = torch.full_like(ids, -1)
        nxt[:, :-1] = ids[:, 1:]
        nxt = torch.where(pos[None, :] < (lens[:, None] - 1), nxt, torch.full_like(nxt, -1))
        gen = None
        if self.cfg.samples:  # one 63-bit seed from (sample_seed, *seed)
            state = np.random.SeedSequence([self.cfg.sample_seed, *(seed or [])]).generate_state(1, np.uint64)[0]
            gen = torch.Generator(device=self.device).manual_seed(int(state >> 1))
        t = logit_targets(out.last_hidden_state, self.head, nxt, self.cfg.top_k, self.cfg.temperatures,
                          self.cfg.position_chunk, self.cfg.samples, self.cfg.sample_temperature, gen)
        v3 = valid[:, :, None]
        host = HostBatch(self.device)
        host.put("topk_ids", torch.where(v3, t["topk_ids"], 0))
        lp = t["topk_logprobs"]
        if self.cfg.logprob_precision is not None:  # bounded error: rounded, with the KL of the rounding measured
            lp, exact = precision.round_logprobs(lp, self.cfg.logprob_precision), lp
            host.put("logprob_kl", torch.where(valid, precision.stored_kl(exact, lp), 0))
        host.put("topk_logprobs", torch.where(v3, lp, 0).to(torch.float16))
        host.put("logsumexp", torch.where(valid, t["logsumexp"], 0))
        host.put("target_logprob", t["target_logprob"])
        if "logsumexp_tempered" in t:
            host.put("logsumexp_tempered", torch.where(valid[:, None], t["logsumexp_tempered"], 0))
        if self.cfg.samples:
            host.put("sample_ids", torch.where(v3, t["sample_ids"], 0))
            host.put("sample_counts", torch.where(v3, t["sample_counts"], 0))
            host.put("sample_logprobs", torch.where(v3, t["sample_logprobs"], 0).to(torch.float16))
        if self.cfg.final_hidden:
            to_storage(host, "final_hidden", torch.where(v3, out.last_hidden_state, 0), self.cfg.final_hidden_dtype,
                        "final hidden state", "final_hidden_dtype")
        add_representations(host, out, valid, recorder, self.cfg, self.hidden, self.attention_layers)
        return host.close()


def no_grad_for(model):
    """Inference mode, or plain no_grad for a teacher that transformers wrapped in FSDP2 (a tensor-parallel teacher
    in several groups: the groups are its replicas), whose parameter gathering tracks tensor versions."""
    from torch.distributed.fsdp import FSDPModule

    return torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode()


def class_targets(logits: torch.Tensor, temperatures: list[float]) -> dict[str, torch.Tensor]:
    """(..., C) class logits -> log-probs at T=1 (..., C), logsumexp at T=1 (...) and at each extra temperature
    (n_T, ...), all float32 from float32 (or float64) arithmetic: exact up to the storage rounding."""
    z = logits.float() if logits.dtype != torch.float64 else logits
    lse = torch.logsumexp(z, dim=-1)
    out = {"class_logprobs": z - lse[..., None], "class_logsumexp": lse}
    if temperatures:
        out["class_logsumexp_tempered"] = torch.stack([torch.logsumexp(z / t, dim=-1) for t in temperatures])
    return out


class ClassTargetComputer:
    """A classification teacher (sequence or token) on a batch of rows: its class distribution, exactly as the
    model's own forward pass computes it, plus hidden states and attention maps as for a causal LM."""

    def __init__(self, model, capture, hidden_layers: list[int], attention_layers: list[int], per_token: bool):
        self.model, self.cfg, self.per_token = model, capture, per_token
        self.hidden_layers, self.attention_layers = hidden_layers, attention_layers
        self.hidden = HiddenStates(model, 0, hidden_layers, hooks=False)  # a classifier's output has no last state
        self.device = next(model.parameters()).device
        if attention_layers:
            attention.enable(model)

    # the position axes of each field (after the row axis), for padding a trimmed batch back to seq_len
    POSITION_AXES = {"class_logprobs": (1,), "class_logsumexp": (1,), "class_logsumexp_tempered": (2,),
                     "hidden_states": (2,), "hidden_scale": (2,), "attentions": (3, 4)}

    def submit(self, input_ids: np.ndarray, lengths: np.ndarray, position_ids=None, seed=None) -> "Done":
        """As `TargetComputer.submit`, computed at once (a classifier's outputs are small)."""
        return Done(self(input_ids, lengths, position_ids, seed))

    def __call__(self, input_ids: np.ndarray, lengths: np.ndarray, position_ids=None, seed=None) -> TeacherTargets:
        """One example per row: the batch runs cut to its longest row (padding is masked, so the real positions
        get the same values), and the per-position fields are padded back with zeros."""
        L, n = input_ids.shape[1], max(int(lengths.max()), 1)
        res = self._compute(input_ids[:, :n], lengths)
        if n == L:
            return res
        for name, arr in res.fields().items():
            axes = self.POSITION_AXES.get(name, ()) if (self.per_token or not name.startswith("class_")) else ()
            if axes:
                width = [(0, 0)] * arr.ndim
                for a in axes:
                    width[a] = (0, L - n)
                setattr(res, name, np.pad(arr, width))
        return res

    @torch.inference_mode()
    def _compute(self, input_ids: np.ndarray, lengths: np.ndarray) -> TeacherTargets:
        B, L = input_ids.shape
        ids = torch.from_numpy(input_ids).to(self.device, torch.long)
        lens = torch.from_numpy(lengths).to(self.device, torch.long)
        valid = torch.arange(L, device=self.device)[None, :] < lens[:, None]
        recorder = (attention.AttentionRecorder(self.attention_layers, self.cfg.attention_heads,
                                                self.cfg.attention_head_reduce) if self.attention_layers else None)
        with attention.recording(recorder):
            out = self.model(input_ids=ids, attention_mask=valid.long(), output_hidden_states=bool(self.hidden_layers))
        t = class_targets(out.logits, self.cfg.temperatures)
        host = HostBatch(self.device)
        if self.per_token:
            v3 = valid[:, :, None]
            host.put("class_logprobs", torch.where(v3, t["class_logprobs"], 0))
            host.put("class_logsumexp", torch.where(valid, t["class_logsumexp"], 0))
            if "class_logsumexp_tempered" in t:
                host.put("class_logsumexp_tempered",
                         torch.where(valid[:, None], t["class_logsumexp_tempered"].transpose(0, 1), 0))
        else:
            host.put("class_logprobs", t["class_logprobs"])
            host.put("class_logsumexp", t["class_logsumexp"])
            if "class_logsumexp_tempered" in t:
                host.put("class_logsumexp_tempered", t["class_logsumexp_tempered"].transpose(0, 1))
        return add_representations(host, out, valid, recorder, self.cfg, self.hidden,
                                   self.attention_layers).close().result()
