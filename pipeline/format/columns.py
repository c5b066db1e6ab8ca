"""The columns of a part's rows.parquet: the table a writer stores (`rows_table`), the manifest entries that
describe them (`row_fields`), and the key under which a Parquet file of token-id rows made by `distill generate`
names its generation (`GENERATION_KEY`: the capture that scores such rows records it as their lineage).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .layout import IGNORE_INDEX

GENERATION_KEY = b"distill.generation"  # Parquet schema metadata of `distill generate` output: who sampled the rows


def rows_table(rows) -> pa.Table:
    """Rows as `rows.parquet` holds them: key, input_ids, length, and loss_mask / position_ids / labels when present."""
    L = rows.input_ids.shape[1]

    def fixed(a: np.ndarray, typ) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), type=typ), L)

    cols = {
        "key": pa.array(rows.keys, type=pa.string()),
        "input_ids": fixed(rows.input_ids, pa.int32()),
        "length": pa.array(rows.lengths, type=pa.int32()),
    }
    if rows.loss_mask is not None:
        cols["loss_mask"] = fixed(rows.loss_mask, pa.uint8())
    if rows.position_ids is not None:
        cols["position_ids"] = fixed(rows.position_ids, pa.int32())
    if getattr(rows, "labels", None) is not None:  # classification: a class id per row, or per position (-100: none)
        labels = rows.labels.astype(np.int32)
        cols["labels"] = fixed(labels, pa.int32()) if labels.ndim == 2 else pa.array(labels, type=pa.int32())
    return pa.table(cols)


def row_fields(columns: list[str], split_rows: dict[str, int], L: int, labels: bool | None = None) -> dict:
    """The manifest entries of rows.parquet's columns: key, input_ids, length, and those of `columns` among
    loss_mask, labels (per position when `labels` is true, else per row) and position_ids."""
    def row_field(column: str, dtype: str, per_position: bool, description: str) -> dict:
        return {"path": "{part}/rows.parquet", "format": "parquet", "column": column, "dtype": dtype,
                "dims": ["row", "position"] if per_position else ["row"],
                "shape": {s: [n, L] if per_position else [n] for s, n in split_rows.items()},
                "description": description}

    fields = {"input_ids": row_field("input_ids", "int32", True, "token ids; positions >= length are padding"),
              "length": row_field("length", "int32", False, "real tokens in the row (the mask is position < length)"),
              "key": row_field("key", "string", False, "blake2b-128 hex of the row's real token ids as little-endian "
                                                       "int32")}
    if "loss_mask" in columns:
        fields["loss_mask"] = row_field("loss_mask", "uint8", True, "1 where the targets at position t train (the "
                                        "token t+1 they predict is an assistant/response token); 0 elsewhere")
    if "labels" in columns:
        fields["labels"] = row_field("labels", "int32", labels, f"gold class id of each word's first token; "
                                     f"{IGNORE_INDEX} elsewhere" if labels else "gold class id per row")
    if "position_ids" in columns:
        fields["position_ids"] = row_field("position_ids", "int32", True, "0 where a document starts, +1 per token "
                                           "within it; padding is a segment of its own. Attention is causal "
                                           "within a segment only")
    return fields
