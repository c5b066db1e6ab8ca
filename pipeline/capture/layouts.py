"""The columns of each layout `distill import` reads, as `Block`s (`imported.py` finds and reads the files).

One row is one sequence; the target at input position t is the distribution that predicts token t (position 0 has
none), the alignment the axolotl and vLLM layouts use (DistillKit's is moved to it):

- `axolotl`: the columns axolotl's KD integration reads: `input_ids` (n,), `target_token_ids` (n, K),
  `target_logprobs` (n, K) and optionally `target_mask` (n, K) (1: a real entry) and `labels` (n,) (-100: not
  trained). `distill export` adds `target_logsumexp` (n,) and `target_label_logprob` (n,), read when present.
- `vllm`: what vLLM returns for a prompt with `prompt_logprobs = K`: `prompt_token_ids` (n,) and
  `prompt_logprobs` (n,), per position null (position 0) or its entries, as a list of structs
  `{token_id, logprob, ...}` or a map token id -> log-prob (or -> `{logprob, rank, decoded_token}`); a JSON object
  keyed by token id reads the same. vLLM adds the prompt token itself when it is outside the top K, so a
  position holds K or K + 1 entries. An optional `labels` column (-100: not trained) masks positions.
- `distillkit`: DistillKit's compressed files (`pipeline.format.distillkit`): `input_ids`, `compressed_logprobs`
  and `bytepacked_indices`, its position j predicting token j + 1.

Any layout may carry `position_ids` (n,): 0 where a packed document starts, +1 per token.

A `Block` is a batch of rows as flat arrays (tokens, and per position its entries), so the importer's checks and
its selection of the top K run on arrays, not per entry in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError
from ..format import distillkit
from ..format.distillkit import Compression
from ..format.layout import IGNORE_INDEX

@dataclass
class Block:
    """Rows of a source as flat arrays. Row r's tokens are tokens[starts[r]:starts[r + 1]]; position p (an index
    into tokens) has entries e_ids/e_lp[entry_starts[p]:entry_starts[p + 1]], those with e_valid set real."""

    file: str
    layout: str  # "axolotl" or "vllm"
    first_row: int  # the file's row number of this block's first row
    starts: np.ndarray  # (R + 1,) int64
    tokens: np.ndarray  # (T,) int64
    trained: np.ndarray  # (T,) bool: the labels (and target mask) train the target at this position
    entry_starts: np.ndarray  # (T + 1,) int64
    e_ids: np.ndarray  # (E,) int64
    e_lp: np.ndarray  # (E,) float64
    e_valid: np.ndarray  # (E,) bool
    masked: bool  # the layout says which entries are real (a target mask, or vLLM's per-position entries)
    lse: np.ndarray | None = None  # (T,) float64 logsumexp at each position (target_logsumexp), when given
    label_lp: np.ndarray | None = None  # (T,) float64 log-prob of the token at each position, when given
    positions: np.ndarray | None = None  # (T,) position ids: 0 where a document starts (packed rows), when given
    compression: Compression | None = None  # the distillkit layout: how its log-probs were compressed

    @property
    def rows(self) -> int:
        return len(self.starts) - 1

    def where(self, position: int) -> str:
        """'FILE row R position P' of a flat position index."""
        return position_name(self.file, self.first_row, self.starts, position)


def position_name(file: str, first_row: int, starts: np.ndarray, position: int) -> str:
    """'FILE row R position P' of a flat position index of rows starting at `starts`."""
    r = int(np.searchsorted(starts, position, side="right") - 1)
    return f"{file} row {first_row + r} position {position - int(starts[r])}"


def detect_layout(names: list[str], where: str) -> str:
    if {"target_token_ids", "target_logprobs"} <= set(names):
        return "axolotl"
    if "prompt_logprobs" in names:
        return "vllm"
    if {"compressed_logprobs", "bytepacked_indices"} <= set(names):
        return "distillkit"
    raise DataError(f"{where}: columns {names} are neither axolotl's KD layout (input_ids, target_token_ids, "
                    "target_logprobs), vLLM's (prompt_token_ids, prompt_logprobs) nor DistillKit's (input_ids, "
                    "compressed_logprobs, bytepacked_indices)")


def to_block(table: pa.Table, layout: str, file: str, first_row: int, compression: Compression | None = None) -> Block:
    """A table of the source as a `Block`; refuses rows whose columns disagree in length, and padded rows."""
    names = table.column_names
    if layout == "distillkit":
        return _distillkit_block(table, file, first_row, compression)
    if "attention_mask" in names:
        _, att = _lists(table.column("attention_mask"), column="attention_mask")
        if (att == 0).any():
            raise DataError(f"{file}: rows from row {first_row} hold padding (attention_mask 0): strip it before "
                            "importing, a row's tokens are all real")
    if layout == "axolotl":
        missing = [c for c in ("input_ids", "target_token_ids", "target_logprobs") if c not in names]
        if missing:
            raise DataError(f"{file}: the axolotl layout needs columns {missing}")
        tok = table.column("input_ids")
        ids = table.column("target_token_ids")
        starts, tokens = _lists(tok, column="input_ids")
        _same_lengths(file, first_row, starts, _offsets(ids, "target_token_ids"), "target_token_ids", "input_ids")
        _same_lengths(file, first_row, starts, _offsets(table.column("target_logprobs"), "target_logprobs"), "target_logprobs",
                      "input_ids")
        entry_starts, e_ids = _lists(pc.list_flatten(ids), column="target_token_ids")
        entry_lp, e_lp = _lists(pc.list_flatten(table.column("target_logprobs")), np.float64, "target_logprobs")
        _same_entries(file, first_row, starts, entry_starts, entry_lp, "target_token_ids and target_logprobs")
        masked = "target_mask" in names
        e_valid = np.ones(len(e_ids), bool)
        if masked:
            mask = table.column("target_mask")
            _same_lengths(file, first_row, starts, _offsets(mask, "target_mask"), "target_mask", "input_ids")
            mask_starts, e_mask = _lists(pc.list_flatten(mask), column="target_mask")
            _same_entries(file, first_row, starts, entry_starts, mask_starts, "target_mask and target_token_ids")
            e_valid = e_mask.astype(bool)
        trained = _trained(table, starts, file, first_row)
        block = Block(file, layout, first_row, starts, tokens, trained, entry_starts, e_ids, e_lp, e_valid, masked,
                      positions=_positions(table, starts, file, first_row))
        for column, attr in (("target_logsumexp", "lse"), ("target_label_logprob", "label_lp")):
            if column in names:
                s, v = _lists(table.column(column), np.float64, column)
                _same_lengths(file, first_row, starts, s, column, "input_ids")
                setattr(block, attr, v)
        return block
    if "prompt_token_ids" not in names:
        raise DataError(f"{file}: the vllm layout needs a prompt_token_ids column beside prompt_logprobs")
    starts, tokens = _lists(table.column("prompt_token_ids"), column="prompt_token_ids")
    col = table.column("prompt_logprobs")
    _same_lengths(file, first_row, starts, _offsets(col, "prompt_logprobs"), "prompt_logprobs", "prompt_token_ids")
    per_position = pc.list_flatten(col).combine_chunks() if isinstance(col, pa.ChunkedArray) else pc.list_flatten(col)
    if pa.types.is_map(per_position.type):  # token id -> log-prob: its entries as a list of {key, value}
        per_position = pa.ListArray.from_arrays(per_position.offsets, per_position.values,
                                                mask=per_position.is_null())
    entry_starts = _offsets(per_position, "prompt_logprobs")
    entries = pc.list_flatten(per_position)
    e_ids, e_lp = _vllm_entries(entries, file)
    trained = _trained(table, starts, file, first_row)
    return Block(file, layout, first_row, starts, tokens, trained, entry_starts, e_ids, e_lp, np.ones(len(e_ids), bool),
                 True, positions=_positions(table, starts, file, first_row))


def _distillkit_block(table: pa.Table, file: str, first_row: int, c: Compression) -> Block:
    """DistillKit's rows (see `pipeline.format.distillkit`) in the layout of the others: its position j, which
    predicts token j + 1, becomes position j + 1. A capture's row has one position fewer than tokens; a packed
    row (DistillKit's pack step cut the tokens to the positions) as many, and its last position, which predicts
    a token the row no longer holds, is dropped. `distill export --format distillkit` adds `loss_mask` and
    `target_logsumexp` per position, and `position_ids`: read when present."""
    names = table.column_names
    missing = [col for col in distillkit.COLUMNS if col not in names]
    if missing:
        raise DataError(f"{file}: the distillkit layout needs columns {missing}")
    starts, tokens = _lists(table.column("input_ids"), column="input_ids")
    lp_col, idx_col = table.column("compressed_logprobs"), table.column("bytepacked_indices")
    pos_starts = _offsets(lp_col, "compressed_logprobs")
    _same_lengths(file, first_row, pos_starts, _offsets(idx_col, "bytepacked_indices"), "bytepacked_indices",
                  "compressed_logprobs")
    n, m = np.diff(starts), np.diff(pos_starts)
    wrong = np.flatnonzero((m != n) & (m != n - 1))
    if len(wrong):
        r = int(wrong[0])
        raise DataError(f"{file} row {first_row + r}: {int(m[r])} compressed positions for {int(n[r])} tokens "
                        "(DistillKit writes one position fewer than tokens, or as many after packing)")
    ids, lp = _decoded(lp_col, idx_col, c, file, first_row, pos_starts)
    # source position j of row r -> position j + 1 of the row's tokens (the last of a packed row has none)
    row_of = np.repeat(np.arange(len(n)), m)
    j = np.arange(int(pos_starts[-1])) - pos_starts[row_of]
    keep = j < n[row_of] - 1
    dest = starts[row_of[keep]] + j[keep] + 1
    T = len(tokens)
    count = np.zeros(T, np.int64)
    count[dest] = c.k
    order = np.argsort(dest, kind="stable")
    trained = _trained(table, starts, file, first_row)
    per_position = {}
    for column in ("loss_mask", "target_logsumexp"):
        if column in names:
            s, v = _lists(table.column(column), np.float64, column)
            _same_lengths(file, first_row, pos_starts, s, column, "compressed_logprobs")
            per_position[column] = np.full(T, np.nan)
            per_position[column][dest] = v[keep]
    if "loss_mask" in per_position:
        trained &= per_position["loss_mask"] == 1
    positions = _distillkit_positions(table, file, first_row, starts, pos_starts, row_of, j)
    trained, positions = _packed_documents(table, file, first_row, starts, trained, positions)
    return Block(file, "distillkit", first_row, starts, tokens, trained, np.concatenate([[0], np.cumsum(count)]),
                 ids[keep][order].reshape(-1), lp[keep][order].reshape(-1), np.ones(int(count.sum()), bool), False,
                 lse=per_position.get("target_logsumexp"), positions=positions, compression=c)


def _decoded(lp_col, idx_col, c: Compression, file: str, first_row: int, pos_starts: np.ndarray):
    """(P, k) ids and log-probs of every position of DistillKit's columns; bytes that do not fit `c` refused."""
    rows_lp, lp_bytes = _lists(pc.list_flatten(lp_col), np.uint8, "compressed_logprobs")
    rows_idx, idx_bytes = _lists(pc.list_flatten(idx_col), np.uint8, "bytepacked_indices")
    n_lp, n_idx = np.diff(rows_lp), np.diff(rows_idx)
    bad = np.flatnonzero((n_lp != c.logprob_bytes) | (n_idx != c.index_bytes))
    if len(bad):
        b = int(bad[0])
        raise DataError(f"{position_name(file, first_row, pos_starts, b)}: {int(n_lp[b])} log-prob and "
                        f"{int(n_idx[b])} index bytes, where the compression settings ({c.k} ids of {c.bits} bits, "
                        f"{c.describe()}) make {c.logprob_bytes} and {c.index_bytes}: the files and "
                        f"{distillkit.CONFIG_FILE} do not belong together")
    P = int(pos_starts[-1])
    return distillkit.decode(c, lp_bytes.reshape(P, c.logprob_bytes), idx_bytes.reshape(P, c.index_bytes))


def _distillkit_positions(table: pa.Table, file: str, first_row: int, starts, pos_starts, row_of, j):
    """`position_ids` per token, or per position (as the DistillKit export writes them, in step with DistillKit's
    packing): a capture's last token, which is no position, continues its document."""
    if "position_ids" not in table.column_names:
        return None
    s, v = _lists(table.column("position_ids"), column="position_ids")
    if np.array_equal(s, starts):
        return _checked_positions(v, starts, file, first_row)
    _same_lengths(file, first_row, pos_starts, s, "position_ids", "compressed_logprobs (or input_ids)")
    n, m = np.diff(starts), np.diff(pos_starts)
    positions = np.zeros(int(starts[-1]), np.int64)
    positions[starts[row_of] + j] = v
    last = starts[1:][(m == n - 1) & (n > 1)] - 1
    positions[last] = positions[last - 1] + 1
    return _checked_positions(positions, starts, file, first_row)


def _packed_documents(table: pa.Table, file: str, first_row: int, starts, trained, positions):
    """DistillKit's packing writes segment ids (1, 2, ...) in `attention_mask`: they become position ids, and the
    first token of each later document is not trained (the position before it predicts the end of the document
    before, the token packing cut). (trained, positions)."""
    if "attention_mask" not in table.column_names:
        return trained, positions
    _, seg = _lists(table.column("attention_mask"), column="attention_mask")
    if (seg == 0).any():
        raise DataError(f"{file}: rows from row {first_row} hold padding (attention_mask 0): strip it before "
                        "importing, a row's tokens are all real")
    n = np.diff(starts)
    first = starts[:-1][n > 0]
    new_doc = np.zeros(len(seg), bool)
    new_doc[1:] = seg[1:] != seg[:-1]
    new_doc[first] = False
    if not new_doc.any():
        return trained, positions
    # a document starts where the segment changes, and where given position ids restart inside a segment (a
    # document_mask cache exported, then packed by DistillKit: its rows' own documents)
    doc_start = new_doc | (positions == 0 if positions is not None else False)
    doc_start[first] = True
    idx = np.arange(len(seg))
    return trained & ~new_doc, idx - np.maximum.accumulate(np.where(doc_start, idx, 0))


def _vllm_entries(entries: pa.ChunkedArray | pa.Array, file: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and log-probs of vLLM entries: structs {token_id, logprob, ...} or a map's {key, value}."""
    arr = entries.combine_chunks() if isinstance(entries, pa.ChunkedArray) else entries
    if len(arr) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    typ = arr.type
    if not pa.types.is_struct(typ):
        raise DataError(f"{file}: prompt_logprobs entries are {typ}, not structs {{token_id, logprob}} or a map")
    names = [typ.field(i).name for i in range(typ.num_fields)]
    if "token_id" in names and "logprob" in names:
        return (_numpy(arr.field("token_id"), np.int64, "prompt_logprobs token_id"),
                _numpy(arr.field("logprob"), np.float64, "prompt_logprobs logprob"))
    if names == ["key", "value"]:
        value = arr.field("value")
        lp = value.field("logprob") if pa.types.is_struct(value.type) else value
        return _numpy(arr.field("key"), np.int64, "prompt_logprobs keys"), _numpy(lp, np.float64, "prompt_logprobs values")
    raise DataError(f"{file}: prompt_logprobs entries have fields {names}; expected token_id and logprob")


def _trained(table: pa.Table, starts: np.ndarray, file: str, first_row: int) -> np.ndarray:
    """Per position: its label trains (no labels column: every position)."""
    if "labels" not in table.column_names:
        return np.ones(int(starts[-1]), bool)
    s, labels = _lists(table.column("labels"), column="labels")
    _same_lengths(file, first_row, starts, s, "labels", "the token ids")
    return labels != IGNORE_INDEX


def _positions(table: pa.Table, starts: np.ndarray, file: str, first_row: int) -> np.ndarray | None:
    """Per position its position id (`position_ids`: 0 where a document of a packed row starts, +1 per token, as
    packed-sequence trainers and `distill export` write them), checked; None without the column."""
    if "position_ids" not in table.column_names:
        return None
    s, pos = _lists(table.column("position_ids"), column="position_ids")
    _same_lengths(file, first_row, starts, s, "position_ids", "the token ids")
    return _checked_positions(pos, starts, file, first_row)


def _checked_positions(pos: np.ndarray, starts: np.ndarray, file: str, first_row: int) -> np.ndarray:
    follows = np.ones(len(pos), bool)
    follows[1:] = pos[1:] == pos[:-1] + 1
    first = np.zeros(len(pos), bool)
    first[starts[:-1][np.diff(starts) > 0]] = True
    bad = np.flatnonzero(((pos != 0) & ~follows) | (first & (pos != 0)))
    if len(bad):
        where = position_name(file, first_row, starts, int(bad[0]))
        raise DataError(f"{where}: position id {int(pos[bad[0]])}; position ids start at 0 in every row and either "
                        "restart at 0 (a new document) or count up by one")
    return pos


def _same_lengths(file: str, first_row: int, starts, other, column: str, base: str) -> None:
    if not np.array_equal(starts, other):
        r = int(np.argmax(np.diff(starts) != np.diff(other)))
        raise DataError(f"{file} row {first_row + r}: {column} has {int(other[r + 1] - other[r])} positions, "
                        f"{base} {int(starts[r + 1] - starts[r])}")


def _same_entries(file: str, first_row: int, starts, entry_starts, other, columns: str) -> None:
    """Refuse a per-position list column whose lengths differ from target_token_ids' (`entry_starts`) somewhere;
    `columns` names the two."""
    if not np.array_equal(entry_starts, other):
        bad = int(np.argmax(np.diff(entry_starts) != np.diff(other)))
        raise DataError(f"{file}: {columns} differ in length at " + position_name(file, first_row, starts, bad))


def _offsets(arr, column: str = "a column") -> np.ndarray:
    """(N + 1,) offsets of a list column (null lists: empty)."""
    if not pa.types.is_list(arr.type) and not pa.types.is_large_list(arr.type):
        raise DataError(f"{column} holds {arr.type} values where a list per row (or per position) is expected")
    lengths = pc.fill_null(pc.list_value_length(arr), 0)
    lengths = lengths.combine_chunks() if isinstance(lengths, pa.ChunkedArray) else lengths
    return np.concatenate([[0], np.cumsum(lengths.to_numpy(zero_copy_only=False), dtype=np.int64)])


def _lists(arr, dtype=np.int64, column: str = "a column") -> tuple[np.ndarray, np.ndarray]:
    """(offsets, flat values) of a list column."""
    return _offsets(arr, column), _numpy(pc.list_flatten(arr), dtype, column)


def _numpy(arr, dtype, column: str = "a column") -> np.ndarray:
    """The values of a flat column as `dtype`: integers where ids (or masks) are expected, numbers for log-probs."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    integer = np.issubdtype(dtype, np.integer)
    if not (pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type)
            or (not integer and pa.types.is_floating(arr.type)) or pa.types.is_null(arr.type)):
        raise DataError(f"{column} holds {arr.type} values, where {'integers' if integer else 'numbers'} are "
                        "expected")
    if arr.null_count:
        raise DataError(f"{column}: {arr.null_count} null values among {len(arr)} where ids and log-probs are expected "
                        "(only vLLM's first position may be null)")
    return arr.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
