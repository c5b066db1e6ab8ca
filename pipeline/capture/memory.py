"""A capture's device memory, estimated before the teacher loads: its weights, one batch's working set, and the
attention maps it records, each refused with the setting to change when it cannot fit.

The estimate is an upper bound of what the capture holds at once on the teacher's device (bytes):
- weights: the parameters (counted on the meta device: nothing is allocated) in the teacher's dtype;
- layer: one decoder layer's transient activations for the batch: the residual stream, the normed input,
  q/k/v/o and the MLP's up, gate and activation, B x L x (6 d + 3 ff) values;
- hidden_states: the selected layers' outputs, recorded by hooks (`representations.HiddenStates`), and their stack;
- attention: with attention maps captured, the mapped layers run eager attention: B x H x L^2 scores in
  float32 and their probabilities in the teacher's dtype, for one layer at a time; the recorded maps of every
  mapped layer (float16, B x n x H_kept x L^2) are held until the batch is written;
- lm_head: `position_chunk` positions of float32 logits, three buffers (logits, top-K, exp).
Attention without maps (sdpa) and the KV cache (off) add nothing that grows with L^2.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import distributed
from ..config import TeacherCacheConfig
from ..errors import CaptureError

HEADROOM = 0.9  # of a device's memory the estimate may take: the allocator's fragmentation and the runtime's own


@dataclass(frozen=True)
class WorkingSet:
    """Bytes a capture holds at once on its device, by part (see the module's docstring)."""

    weights: int
    layer: int
    hidden_states: int
    attention: int
    attention_maps: int
    lm_head: int

    @property
    def batch(self) -> int:
        """One batch's working set beside the weights."""
        return self.layer + self.hidden_states + self.attention + self.attention_maps + self.lm_head

    @property
    def total(self) -> int:
        return self.weights + self.batch

    def lines(self) -> list[str]:
        gib = 2**30
        parts = ", ".join(f"{k} {getattr(self, k) / gib:,.2f}" for k in ("weights", "layer", "hidden_states",
                                                                          "attention", "attention_maps", "lm_head"))
        return [f"device memory estimate: {self.total / gib:,.2f} GiB ({parts} GiB)"]


def parameter_count(model_config, task: str = "causal-lm") -> int:
    """The teacher's parameters, counted on the meta device (no memory, no weights read)."""
    import torch

    from ..models import auto_class

    with torch.device("meta"):
        model = auto_class(task).from_config(model_config)
    return sum(p.numel() for p in model.parameters())


def working_set(cfg: TeacherCacheConfig, spec, params: int, n_hidden: int, n_attention: int,
                heads_stored: int) -> WorkingSet:
    """The estimate for batches of capture.batch_size rows of data.seq_len positions."""
    import torch

    c, B, L = cfg.capture, cfg.capture.batch_size, cfg.data.seq_len
    s = getattr(torch, cfg.teacher.dtype).itemsize
    d, H = spec.hidden_size, spec.num_heads
    ff = spec.intermediate_size or 4 * d
    hidden = 2 * n_hidden * B * L * d * s
    attention = B * H * L * L * (4 + s) if n_attention else 0
    maps = n_attention * B * heads_stored * L * L * 2 * 2  # float16, recorded and stacked
    head = 3 * min(c.position_chunk, B * L) * spec.vocab_size * 4
    return WorkingSet(weights=params * s, layer=B * L * (6 * d + 3 * ff) * s, hidden_states=hidden,
                      attention=attention, attention_maps=maps, lm_head=head)


def device_memory(device) -> int | None:
    """Bytes of memory of the teacher's device: a GPU's total, or the host's available memory (MemAvailable: free
    plus what the kernel can reclaim, such as the page cache); None: unknown."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    return distributed.host_memory_available()


def check_memory(cfg: TeacherCacheConfig, ws: WorkingSet, device, shards: int = 1) -> None:
    """Refuse attention maps beyond capture.attention_budget_gib and a working set beyond the device's memory
    (weights divided over `shards` devices under a device_map), naming what to change."""
    gib = 2**30
    c, L = cfg.capture, cfg.data.seq_len
    att = ws.attention + ws.attention_maps
    if att > c.attention_budget_gib * gib:
        raise CaptureError(
            f"attention maps at data.seq_len={L}: {att / gib:,.1f} GiB per batch of {c.batch_size} rows (eager scores "
            f"{ws.attention / gib:,.1f} GiB, recorded maps {ws.attention_maps / gib:,.1f} GiB; they grow with "
            f"seq_len^2), over capture.attention_budget_gib={c.attention_budget_gib:g}. Lower capture.batch_size or "
            "data.seq_len, keep fewer heads (capture.attention_heads, or attention_head_reduce='mean'), capture fewer "
            "capture.attention_layers, or raise capture.attention_budget_gib")
    have = device_memory(device)
    if have is None:
        return
    weights = ws.weights / max(1, shards)
    need = weights + ws.batch
    if need > HEADROOM * have:
        where = f"{device.type} memory ({'total' if device.type == 'cuda' else 'available'})"
        raise CaptureError(
            f"the capture needs about {need / gib:,.1f} GiB on its device (weights {weights / gib:,.1f}"
            f" GiB, a batch {ws.batch / gib:,.1f} GiB: " + ", ".join(
                f"{k} {getattr(ws, k) / gib:,.1f}" for k in ("layer", "hidden_states", "attention", "attention_maps",
                                                              "lm_head") if getattr(ws, k)) +
            f" GiB), more than {HEADROOM:.0%} of the {have / gib:,.1f} GiB of {where}. Lower capture.batch_size or "
            "data.seq_len (or capture.position_chunk for the LM head), capture fewer hidden_layers or attention_layers, "
            "or spread the teacher over devices (teacher.device_map)")
