"""Frequency codes for the top-K ids (format 4.0, `capture.topk_ids_encoding = "frequency-codes"`).

pcodec stores an integer in fewer bits the more often values near it occur, and a vocabulary's ids are in the
tokenizer's order, not in the order of how often a teacher ranks them. A part's `topk_ids` therefore hold codes:
the code of an id is its place in the part's id order, the vocabulary sorted by how often each token occurs in the
part's own rows (`input_ids`, most frequent first, ties and unseen tokens by id). On the default cache that takes
the ids from 108.5 to 100 B/token at pcodec's same speed (docs/real-shapes.md, "The top-K ids and log-probs").

The order is a Parquet file beside the field's metadata, `<part>/topk_ids/id_order.parquet`: one int32 column
`id`, row c holding the id of code c, every id of the vocabulary once. Reading: `ids = id_order[codes]`. The
order is fitted on the rows, which every rank of a capture prepares identically before any teacher output exists,
so every rank encodes with the same order, and a resumed capture with the one it wrote.
"""

from __future__ import annotations

import io
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CacheError

ENCODING = "frequency-codes"
ORDER_FILE = "id_order.parquet"


def order_path(part: str, field: str = "topk_ids") -> str:
    return f"{part}/{field}/{ORDER_FILE}"


def fit_order(token_blocks: Iterable[np.ndarray], vocab: int) -> np.ndarray:
    """The id order of a part from its rows' real tokens (an iterable of 1-D id arrays): (vocab,) int32."""
    counts = np.zeros(vocab, np.int64)
    for ids in token_blocks:
        counts += np.bincount(np.asarray(ids, np.int64), minlength=vocab)[:vocab]
    return np.argsort(-counts, kind="stable").astype(np.int32)


def order_bytes(order: np.ndarray) -> bytes:
    """The Parquet file of an id order."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": pa.array(order, pa.int32())}), buf, compression="zstd", use_dictionary=False,
                   column_encoding={"id": "DELTA_BINARY_PACKED"})  # the unseen ids ascend: 10 KB, not 118 (V = 49,152)
    return buf.getvalue()


def read_order(data: bytes, vocab: int, where: str) -> np.ndarray:
    """An id order from its file's bytes, checked to hold every id of the vocabulary once."""
    try:
        order = pq.read_table(io.BytesIO(data), columns=["id"]).column("id").to_numpy()
    except (pa.ArrowInvalid, KeyError) as e:
        raise CacheError(f"{where}: not an id order ({e})") from e
    if len(order) != vocab or not np.array_equal(np.sort(order), np.arange(vocab)):
        raise CacheError(f"{where}: the id order does not hold each of the {vocab} ids once")
    return order.astype(np.int64)


def codes_of(order: np.ndarray, dtype) -> np.ndarray:
    """The code of each id (the inverse of `order`), in the field's dtype: `codes_of(order)[ids]` encodes."""
    codes = np.empty(len(order), dtype)
    codes[order] = np.arange(len(order), dtype=dtype)
    return codes


class CodedIds:
    """A field of frequency codes read as ids: `shape`, `dtype`, `ndim`, slicing and orthogonal selection, as the
    zarr array underneath, each value mapped through the part's id order."""

    def __init__(self, array, order: np.ndarray):
        self.array, self.order = array, order.astype(array.dtype)
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        return self.order[np.asarray(self.array[key])]

    def get_orthogonal_selection(self, selection):
        return self.order[np.asarray(self.array.get_orthogonal_selection(selection))]
