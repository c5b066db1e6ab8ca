"""The teacher's representations a capture stores: the hidden states of the selected layers, recorded by hooks
(`HiddenStates`), and the attention maps, put onto a batch's way to the host (`targets.HostBatch`) in their
storage dtypes (float16, bfloat16, float32, or int8 with a scale per vector), with a check that none overflowed.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

HIDDEN_DTYPES = {"float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, None),
                 "float32": (torch.float32, np.float32)}


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per vector of the last axis: (q int8, scale float32) with x ~ q * scale, scale =
    max |x| / 127 (0 for an all-zero vector); the error of an element is at most scale / 2."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / 127.0
    q = torch.where(scale[..., None] > 0, x / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None], 0.0)
    return q.round_().clamp_(-127, 127).to(torch.int8), scale


def to_storage(host, name: str, x: torch.Tensor, dtype_name: str, what: str,
                setting: str = "hidden_dtype") -> None:
    """`x` in a storage dtype onto `host`, with the check that it did not overflow that dtype."""
    tdt, _ = HIDDEN_DTYPES[dtype_name]
    y = x.to(tdt)
    if tdt != torch.float32:
        host.check(torch.isinf(y).any() & ~torch.isinf(x).any(), x.abs().amax(),
                   f"{what}: a value of magnitude {{:.4g}} overflows {dtype_name}; capture with {setting}='bfloat16'")
    host.put(name, y)


class HiddenStates:
    """The hidden states of the selected indices (as in transformers' `output_hidden_states`: 0 = the first layer's
    input, i = layer i - 1's output, n_layers = the last hidden state, after the final norm), recorded by hooks on
    the decoder layers: `output_hidden_states` would keep all n_layers + 1 states of the batch alive (80 layers of a
    70B teacher: 27 times the three a capture typically keeps). Models whose decoder layers are not found (one
    ModuleList of n_layers modules) use `output_hidden_states`."""

    def __init__(self, model, n_layers: int, indices: list[int], hooks: bool = True):
        self.indices, self.n = indices, n_layers
        self.layers = None
        if hooks and indices:
            stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
            self.layers = stacks[0] if len(stacks) == 1 else None
        self.states: dict[int, torch.Tensor] = {}

    @property
    def hooked(self) -> bool:
        return self.layers is not None

    @contextlib.contextmanager
    def recording(self):
        self.states = {}
        handles = []
        if self.hooked:
            for i in self.indices:
                if i == 0:
                    handles.append(self.layers[0].register_forward_pre_hook(self._input, with_kwargs=True))
                elif i < self.n:
                    handles.append(self.layers[i - 1].register_forward_hook(
                        lambda m, a, out, i=i: self.states.__setitem__(i, out[0] if isinstance(out, tuple) else out)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _input(self, module, args, kwargs):
        self.states[0] = args[0] if args else kwargs["hidden_states"]

    def stacked(self, out) -> torch.Tensor:
        """(B, n, L, d) of the selected states, from the hooks (and the last hidden state), or from `out`."""
        if not self.hooked:
            return torch.stack([out.hidden_states[i] for i in self.indices], dim=1)
        return torch.stack([out.last_hidden_state if i == self.n else self.states[i] for i in self.indices], dim=1)


def add_representations(host, out, valid: torch.Tensor, recorder, cfg, hidden: HiddenStates,
                        attention_layers: list[int]):
    """The selected hidden states (B, n, L, d) and attention maps (B, n, H, L, L) of a forward pass `out` onto
    `host`, zero at padding, in their storage dtypes."""
    if hidden.indices:
        hs = hidden.stacked(out)  # (B, n, L, d)
        hs = torch.where(valid[:, None, :, None], hs, 0)
        if cfg.hidden_dtype == "int8":
            q, scale = quantize_int8(hs)
            host.put("hidden_states", q)
            host.put("hidden_scale", scale)
        else:
            to_storage(host, "hidden_states", hs, cfg.hidden_dtype, "hidden state")
    if recorder is not None:
        att = recorder.stacked(attention_layers)  # (B, n, H, L, L)
        vv = valid[:, None, None, :, None] & valid[:, None, None, None, :]
        host.put("attentions", torch.where(vv, att, 0).to(torch.float16))
    return host
