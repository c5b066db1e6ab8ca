"""The teacher's LM head, loaded from a cache captured with `capture.final_hidden`.

With the teacher's final (normed) hidden state per position in the cache and its head here, the
teacher's full distribution is recomputed exactly, block by block, during training: the teacher's
body is never loaded. The logits are those of `pipeline.models.output_logits`: the head's product in
the dtype the teacher computed with (the head is stored in it: a bf16 teacher's logits carry bf16's
rounding, in the capture's logsumexp and here alike), then float32 and `finish_logits` with the logit
scale, divisor and final softcap the manifest records.
"""

from __future__ import annotations

import torch

from ..errors import CacheError
from ..format.layout import HEAD_FILE
from ..format.manifest import Teacher
from ..format.reader import Cache
from ..models import finish_logits
from .representation import decode_hidden


class TeacherHead:
    """hidden (P, d) -> the teacher's logits (P, V) float32: the product in the head's own dtype (the teacher's), as
    the capture computed it, then float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, teacher: Teacher, encoding: str | None = None):
        self.weight = weight  # (V, d), in the dtype the teacher computed with
        self.bias = bias
        self.scale, self.divisor, self.softcap = teacher.logit_scale, teacher.logits_divisor, teacher.logit_softcap
        self.encoding = encoding  # of the cached final_hidden field

    @classmethod
    def from_cache(cls, cache: Cache, device) -> "TeacherHead":
        from safetensors.torch import load_file

        m = cache.manifest
        if "final_hidden" not in m.fields:
            raise CacheError(f"{cache.root}: no final hidden states (capture.final_hidden was off)")
        if HEAD_FILE not in cache.manifest.metadata_files:
            raise CacheError(f"{cache.root}: the manifest lists no {HEAD_FILE} (a partial pull without it?)")
        tensors = load_file(str(cache.local_file(HEAD_FILE)), device=str(device))
        if tensors["weight"].shape != (m.teacher.vocab_size, m.teacher.hidden_size):
            raise CacheError(f"{cache.root}/{HEAD_FILE}: weight has shape {tuple(tensors['weight'].shape)}, the "
                             f"manifest says ({m.teacher.vocab_size}, {m.teacher.hidden_size})")
        return cls(tensors["weight"], tensors.get("bias"), m.teacher, m.fields["final_hidden"].encoding)

    def decode(self, cached: torch.Tensor) -> torch.Tensor:
        """The cached final_hidden field (float16, float32 or bfloat16 bits) as float32."""
        return decode_hidden(cached, self.encoding)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(h.to(self.weight.dtype), self.weight, self.bias)
        return finish_logits(logits if logits.dtype == torch.float64 else logits.float(), self.scale, self.divisor,
                             self.softcap)
