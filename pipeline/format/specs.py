"""Field specs: the dense per-row fields a capture writes, their shapes, dtypes and codecs.

`field_specs` says which fields a capture of given settings writes; a `FieldSpec` describes one
(its manifest entry, its zarr codecs). The codecs' levels are measured choices (see `TOPK_LEVELS`).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


@contextmanager
def numcodecs_quiet():
    """zarr-python warns on every open of a numcodecs-coded array (the pcodec fields) that other Zarr
    implementations may not read it; docs/format.md says once what reads them. Silenced around our own opens."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")
        yield


@dataclass(frozen=True)
class FieldSpec:
    """One dense per-row field: a Zarr array of shape (rows, *tail)."""

    name: str
    dims: tuple[str, ...]  # names of all axes, "row" first
    tail: tuple[int, ...]  # shape after the row axis
    dtype: str  # numpy dtype as stored
    description: str
    encoding: str | None = None  # "bfloat16-bits": uint16 holding bfloat16 bit patterns; "int8-scaled"
    codec: str = "zstd"  # "zstd"; "shuffle-zstd" (byte shuffle, then zstd); "none"; or "pcodec" (numcodecs'
    # PCodec at `level`: lossless, numeric)
    level: int | None = None  # the codec's level; None: the capture's compression_level

    @property
    def bytes_per_row(self) -> int:
        return int(np.prod(self.tail)) * np.dtype(self.dtype).itemsize

    def to_dict(self, split_rows: dict[str, int], chunk_rows: int, shard_rows: int) -> dict:
        d = {
            "path": "{part}/" + self.name,
            "format": "zarr-v3",
            "dtype": self.dtype,
            "dims": list(self.dims),
            "shape": {s: [n, *self.tail] for s, n in split_rows.items()},
            "chunk_rows": chunk_rows,
            "shard_rows": shard_rows,
            "description": self.description,
        }
        if self.encoding:
            d["encoding"] = self.encoding
        if self.codec != "zstd":
            d["codec"] = self.codec
        return d

    def compressors(self, zstd_level: int) -> dict:
        """create_array keywords: the field's codecs."""
        from zarr.codecs import ZstdCodec

        if self.codec == "pcodec":
            try:
                from zarr.codecs.numcodecs import PCodec  # zarr >= 3.1.3
            except ImportError:
                from numcodecs.zarr3 import PCodec

            return {"serializer": PCodec(level=self.level if self.level is not None else 8), "compressors": None}
        if self.codec == "none":
            return {"compressors": None}
        level = self.level if self.level is not None else zstd_level
        if self.codec == "shuffle-zstd":
            try:
                from zarr.codecs.numcodecs import Shuffle  # zarr >= 3.1.3
            except ImportError:
                from numcodecs.zarr3 import Shuffle

            return {"compressors": [Shuffle(elementsize=np.dtype(self.dtype).itemsize), ZstdCodec(level=level)]}
        return {"compressors": [ZstdCodec(level=level)] if level else None}


# pcodec levels of the top-K fields, measured per core on the default cache's own arrays (docs/real-shapes.md,
# "Codecs per field"): the ids at 8 (1.17x; level 12 is 10% smaller but ten times slower, which caps a writer core
# at ~55k tokens/s at K = 64: a quarter of one GPU's output for a 1B teacher), the sorted log-probs at 8 (pcodec's
# delta modes; 12 gains nothing)
TOPK_LEVELS = {"topk_ids": 8, "topk_logprobs": 8, "sample_ids": 8, "sample_counts": 8, "sample_logprobs": 8}
# hidden states (float16, bfloat16 bits, int8) are nearly incompressible (zstd alone: 1.08x on SmolLM2's): a byte
# shuffle groups their exponent bytes, which zstd at level 1 takes to 1.15x (docs/real-shapes.md, "Codecs per field")
HIDDEN_LEVEL = 1
ID_DTYPE_LIMIT = 65536  # vocabularies up to this size store ids as uint16


def id_dtype(vocab_size: int) -> str:
    """The narrowest integer type that holds every id of a vocabulary (LM-head rows, padding included)."""
    return "uint16" if vocab_size <= ID_DTYPE_LIMIT else "int32"


def field_specs(*, seq_len: int, top_k: int, n_temperatures: int, hidden: tuple[int, int] | None,
                hidden_dtype: str, attention: tuple[int, int] | None, vocab_size: int | None = None,
                topk_codec: str = "zstd", samples: int = 0, final_hidden: tuple[int, str] | None = None,
                classes: int | None = None, per_token: bool = False, hidden_codec: str = "zstd",
                id_codes: bool = False) -> list[FieldSpec]:
    """The dense fields a capture writes; `hidden` = (n_layers, width), `attention` = (n_layers, heads kept),
    `final_hidden` = (width, dtype). `topk_codec` "zstd" with `vocab_size` None writes the 1.2 layout
    (int32 ids, zstd); "pcodec" writes ids in the narrowest type and the K-wide fields with pcodec.
    `classes` C: a classification teacher's fields instead of the next-token ones, per row or (`per_token`)
    per position. `hidden_codec` is the codec of hidden_states and final_hidden ("zstd" at the capture's level:
    the layout before 3.0's codec choice). `id_codes`: topk_ids hold frequency codes (`idcodes`)."""
    L, K = seq_len, top_k
    pc = topk_codec == "pcodec"
    ids = id_dtype(vocab_size) if (pc and vocab_size) else "int32"

    def wide(name, dtype, desc, n, encoding=None):
        return FieldSpec(name, ("row", "position", "k" if name.startswith("topk") else "slot"), (L, n), dtype, desc,
                         encoding, codec="pcodec" if pc else "zstd", level=TOPK_LEVELS[name] if pc else None)

    if classes:
        pos_dims, pos_tail, where = (("position",), (L,), "per position") if per_token else ((), (), "per row")
        specs = [
            FieldSpec("class_logprobs", ("row", *pos_dims, "class"), (*pos_tail, classes), "float32",
                      f"teacher log-probabilities of every class at T=1, {where} (class ids as in the manifest's task)"),
            FieldSpec("class_logsumexp", ("row", *pos_dims), pos_tail, "float32",
                      f"logsumexp of the teacher's class logits at T=1, {where}: logit = log p + logsumexp"),
        ]
        if n_temperatures:
            specs.append(FieldSpec("class_logsumexp_tempered", ("row", "temperature", *pos_dims),
                                   (n_temperatures, *pos_tail), "float32",
                                   "logsumexp(z / T) of the class logits per extra temperature"))
        return specs + _representation_specs(L, hidden, hidden_dtype, attention, hidden_codec)

    specs = [
        wide("topk_ids", ids, "ids of the K most likely next tokens, most likely first"
             + ("; stored as codes: id = the part's id_order[code]" if id_codes else ""), K,
             "frequency-codes" if id_codes else None),
        wide("topk_logprobs", "float16", "teacher log-probabilities of topk_ids at T=1", K),
        FieldSpec("logsumexp", ("row", "position"), (L,), "float32",
                  "logsumexp of the teacher logits at T=1: log p(i) = z_i - logsumexp"),
        FieldSpec("target_logprob", ("row", "position"), (L,), "float32",
                  "teacher log-probability of the actual next token; NaN where there is none"),
    ]
    if n_temperatures:
        specs.append(FieldSpec("logsumexp_tempered", ("row", "temperature", "position"), (n_temperatures, L),
                               "float32", "logsumexp(z / T) per extra temperature: log p_T(i) = z_i / T - value"))
    if samples:
        specs += [
            wide("sample_ids", ids,
                 "distinct ids drawn from the proposal, ascending; slots past the distinct ones hold 0", samples),
            wide("sample_counts", "uint16",
                 "times each id was drawn (they sum to capture.samples); 0 marks an empty slot", samples),
            wide("sample_logprobs", "float16", "teacher log-probabilities of sample_ids at T=1", samples),
        ]
    specs += _representation_specs(L, hidden, hidden_dtype, None, hidden_codec)
    if final_hidden:
        d, dtype = final_hidden
        specs.append(FieldSpec("final_hidden", ("row", "position", "hidden"), (L, d),
                               "uint16" if dtype == "bfloat16" else dtype,
                               "the teacher's last hidden state (after the final norm): logits = lm_head(value)",
                               "bfloat16-bits" if dtype == "bfloat16" else None, **_hidden_codec(hidden_codec)))
    return specs + _representation_specs(L, None, hidden_dtype, attention)


def _hidden_codec(codec: str) -> dict:
    """FieldSpec keywords of a hidden-state field's codec."""
    return {"codec": codec, "level": HIDDEN_LEVEL} if codec == "shuffle-zstd" else {"codec": codec}


def _representation_specs(L: int, hidden: tuple[int, int] | None, hidden_dtype: str,
                          attention: tuple[int, int] | None, hidden_codec: str = "zstd") -> list[FieldSpec]:
    specs = []
    if hidden:
        n, d = hidden
        bits, q8 = hidden_dtype == "bfloat16", hidden_dtype == "int8"
        specs.append(FieldSpec("hidden_states", ("row", "layer", "position", "hidden"), (n, L, d),
                               "uint16" if bits else "int8" if q8 else "float16", "hidden states of the selected layers",
                               "bfloat16-bits" if bits else "int8-scaled" if q8 else None, **_hidden_codec(hidden_codec)))
        if q8:
            specs.append(FieldSpec("hidden_scale", ("row", "layer", "position"), (n, L), "float32",
                                   "per-position scale of hidden_states: value = int8 * scale (max |h| / 127)"))
    if attention:
        n, h = attention
        specs.append(FieldSpec("attentions", ("row", "layer", "head", "query", "key"), (n, h, L, L), "float16",
                               "attention probabilities of the selected layers (and heads)"))
    return specs

