"""Which student layer learns from which cached teacher layer, and the pieces in between.

Layer maps (validated against what the cache holds; a missing teacher layer is refused by name):
- "uniform" (TinyBERT): each cached teacher layer t of n_t is matched by relative depth,
  student layer round(t * n_s / n_t) for hidden states (indices as in output_hidden_states,
  0 = embeddings) and round((t + 1) * n_s / n_t) - 1 for attention (decoder layer indices);
- "last_k": the last k student layers against the k cached teacher layers, in order;
- explicit [[student, teacher], ...] pairs.
Projections: when widths differ, a bias-free Linear(d_s, d_t) per mapped pair, Xavier-uniform
initialised; trained with the student (own parameter group), kept in the checkpoint and never
exported with the model. Heads: "group" averages the teacher's heads into as many groups as the
student has heads (needs divisibility); "mean" averages all heads on both sides.
"""

from __future__ import annotations

import torch

from ..errors import StudentError


def _resolve(kind, cached: list[int], n_s: int, n_t: int, attention: bool, what: str, name: str) -> list[tuple[int, int]]:
    """[(student index, position of the teacher layer in the cached list)]."""
    if not cached:
        raise StudentError(f"student {name!r}: {what} distillation needs teacher {what} in the cache; it holds none "
                           f"(capture.{'attention_layers' if attention else 'hidden_layers'} was empty)")
    n_student = n_s if attention else n_s + 1
    if kind == "uniform":
        pairs = []
        for j, t in enumerate(cached):
            s = round((t + 1) * n_s / n_t) - 1 if attention else round(t * n_s / n_t)
            pairs.append((max(0, min(s, n_student - 1)), j))
    elif kind == "last_k":
        k = min(len(cached), n_student)
        pairs = [(n_student - k + i, len(cached) - k + i) for i in range(k)]
    else:
        pairs = []
        for s, t in kind:
            s_res = s + n_student if s < 0 else s
            if not 0 <= s_res < n_student:
                raise StudentError(f"student {name!r}: {what} map names student layer {s}, which does not exist "
                                   f"(0..{n_student - 1})")
            t_res = t + (n_t if attention else n_t + 1) if t < 0 else t
            if t_res not in cached:
                raise StudentError(f"student {name!r}: {what} map names teacher layer {t}, which the cache does not "
                                   f"hold (cached: {cached})")
            pairs.append((s_res, cached.index(t_res)))
    return pairs


def hidden_pairs(spec, manifest, n_student_layers: int) -> list[tuple[int, int]]:
    return _resolve(spec.hidden_map, list(manifest.capture.hidden_layers), n_student_layers,
                    manifest.teacher.num_layers, False, "hidden-state", spec.name)


def attention_pairs(spec, manifest, n_student_layers: int) -> list[tuple[int, int]]:
    return _resolve(spec.attention_map, list(manifest.capture.attention_layers), n_student_layers,
                    manifest.teacher.num_layers, True, "attention", spec.name)


def map_heads(a_t: torch.Tensor, a_s: torch.Tensor, how: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H_t, L, L), (B, H_s, L, L) -> a pair with equal head counts."""
    h_t, h_s = a_t.shape[1], a_s.shape[1]
    if how == "mean" or h_t == 1:
        return a_t.mean(1, keepdim=True), a_s.mean(1, keepdim=True)
    if h_t == h_s:
        return a_t, a_s
    if h_t % h_s:
        raise StudentError(f"student {name!r}: {h_t} cached teacher heads do not split into {h_s} student groups; "
                           "use attention_heads = \"mean\"")
    B, _, L, _ = a_t.shape
    return a_t.reshape(B, h_s, h_t // h_s, L, L).mean(2), a_s


def make_projections(pairs: list[tuple[int, int]], d_s: int, d_t: int) -> torch.nn.ModuleList:
    """One bias-free Linear(d_s, d_t) per mapped pair when widths differ (Xavier-uniform), else none."""
    if d_s == d_t:
        return torch.nn.ModuleList()
    mods = torch.nn.ModuleList(torch.nn.Linear(d_s, d_t, bias=False) for _ in pairs)
    for m in mods:
        torch.nn.init.xavier_uniform_(m.weight)
    return mods


def decode_hidden(t: torch.Tensor, encoding: str | None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Cached hidden states (float16, float32, uint16 bfloat16 bits, or int8 with a per-position `scale`
    of the shape of t less its last axis) -> float32."""
    if encoding == "bfloat16-bits":
        return t.view(torch.int16).view(torch.bfloat16).float()
    if encoding == "int8-scaled":
        if scale is None:
            raise ValueError("int8 hidden states need their hidden_scale field")
        return t.float() * scale.float()[..., None]
    return t.float()
