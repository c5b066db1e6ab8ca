"""Where things are in a cache, and the small file helpers every writer and reader shares.

    CACHE/
      manifest.json          written last, atomically: a cache without it is unfinished
      _capture/              only while a capture runs or after it was killed
        plan.json              the settings the partial cache was started with
        commits/<split>-<shard>.json   one per committed shard (files, sizes, sha256)
      tokenizer/             the teacher's tokenizer (save_pretrained: JSON and text files)
      lm_head.safetensors    capture.final_hidden: the teacher's LM head, once per cache
      <split>/               "train", "validation", "test": the split's first part
        rows.parquet           key, input_ids, length per row (row order = array order)
        zarr.json              a Zarr v3 group; one array per field, sharded along rows
        <field>/zarr.json, <field>/c/<shard>/0/...
        grow-NNNN/             a part each append added, laid out like the split folder

docs/format.md is the spec. Chunk keys come from each array's own metadata (the writer asks zarr), never
from here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from .storage import Storage, stream_digest

MANIFEST = "manifest.json"
WORK_DIR = "_capture"
PLAN_FILE = f"{WORK_DIR}/plan.json"
TOKENIZER_DIR = "tokenizer"
HEAD_FILE = "lm_head.safetensors"  # capture.final_hidden: the teacher's LM head, once per cache
GROW_DIR = "grow-"
ROWS_FILE = "rows.parquet"
IGNORE_INDEX = -100  # a label that is not one: a position (or row) without a gold class


def part_path(split: str, number: int) -> str:
    """Where part `number` of a split lives: the split's folder for the first, a subfolder for each append."""
    return split if number == 0 else f"{split}/{GROW_DIR}{number:04d}"


def shard_ranges(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_rows, n_rows)) for s in range(0, n_rows, shard_rows)]


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the vocabulary, added tokens and special tokens: equal iff tokenisation agrees."""
    payload = {
        "vocab": sorted(tok.get_vocab().items()),
        "added": sorted((str(k), str(v)) for k, v in tok.added_tokens_decoder.items()),
        "special": sorted((k, str(v)) for k, v in tok.special_tokens_map.items()),
        "class": type(tok).__name__,
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def file_digest(path: Path) -> dict:
    """{"bytes", "sha256"} of a local file, read in blocks."""
    with open(path, "rb") as f:
        return stream_digest(f)


def sync_file(path: Path) -> None:
    """fsync a file or a directory (its entries) on local disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(st: Storage, rel: str, obj: dict) -> None:
    """A JSON file written at once: on local disk through a temporary name, fsynced, renamed."""
    st.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def row_column(table: pa.Table, name: str, dtype) -> np.ndarray:
    """A fixed-size-list column of rows.parquet as an (N, L) array."""
    col = table.column(name).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(len(col), -1)


def row_values(table: pa.Table, name: str, dtype) -> np.ndarray:
    """A rows.parquet column: (N, L) for a per-position column, (N,) for a per-row one (a class label)."""
    if pa.types.is_fixed_size_list(table.schema.field(name).type):
        return row_column(table, name, dtype)
    return table.column(name).to_numpy().astype(dtype)
