"""Reading another tool's top-K log-prob dataset for `distill import` (`importer.py` writes the cache).

A source is a local folder or URL holding Parquet (`*.parquet`) or JSON Lines (`*.jsonl`) files: its
subfolders are its splits when it has any (as `distill export` writes them), else its files are one split. One
row is one sequence; the target at input position t is the distribution that predicts token t (position 0 has
none), the alignment both layouts use:

- `axolotl`: the columns axolotl's KD integration reads: `input_ids` (n,), `target_token_ids` (n, K),
  `target_logprobs` (n, K) and optionally `target_mask` (n, K) (1: a real entry) and `labels` (n,) (-100: not
  trained). `distill export` adds `target_logsumexp` (n,) and `target_label_logprob` (n,), read when present.
- `vllm`: what vLLM returns for a prompt with `prompt_logprobs = K`: `prompt_token_ids` (n,) and
  `prompt_logprobs` (n,), per position null (position 0) or its entries, as a list of structs
  `{token_id, logprob, ...}` or a map token id -> log-prob (or -> `{logprob, rank, decoded_token}`); a JSON object
  keyed by token id reads the same. vLLM adds the prompt token itself when it is outside the top K, so a
  position holds K or K + 1 entries. An optional `labels` column (-100: not trained) masks positions.

`batches` yields `Block`s: a batch of rows as flat arrays (tokens, and per position its entries), so the
importer's checks and its selection of the top K run on arrays, not per entry in Python.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import DataError, DistillError
from ..format.layout import IGNORE_INDEX
from ..format.storage import Storage

LAYOUTS = ("axolotl", "vllm")
EXTENSIONS = (".parquet", ".jsonl")
BATCH_ROWS = 64


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


def source_splits(source: str, split: str | None,
                  storage_options: dict | None = None) -> tuple[Storage, dict[str, list[str]]]:
    """Where the source's files are, and {split: its data files (relative to it)}: one file given is `split`; a
    folder's subfolders are its splits (files beside them are refused), else its files are `split`."""
    if source.rstrip("/").endswith(EXTENSIONS):  # one data file
        folder, _, name = source.rstrip("/").rpartition("/")
        return Storage(folder or ".", storage_options), {split or "train": [name]}
    st = Storage(source, storage_options)
    files = sorted(rel for rel in st.files() if rel.endswith(EXTENSIONS))
    if not files:
        raise DataError(f"{source}: no {', '.join(EXTENSIONS)} files to import")
    nested = sorted({rel.split("/", 1)[0] for rel in files if "/" in rel})
    if not nested:
        return st, {split or "train": files}
    top = [rel for rel in files if "/" not in rel]
    if top:
        raise DataError(f"{source}: holds both split folders ({', '.join(nested)}) and files ({top[0]}, ...): "
                        "point at one split's folder, or keep the files in split folders")
    out = {s: [rel for rel in files if rel.split("/", 1)[0] == s] for s in nested}
    if split is None:
        return st, out
    if split not in out:
        raise DataError(f"{source} has no split folder {split!r} (has: {', '.join(out)})")
    return st, {split: out[split]}


def detect_layout(names: list[str], where: str) -> str:
    if {"target_token_ids", "target_logprobs"} <= set(names):
        return "axolotl"
    if "prompt_logprobs" in names:
        return "vllm"
    raise DataError(f"{where}: columns {names} are neither axolotl's KD layout (input_ids, target_token_ids, "
                    "target_logprobs) nor vLLM's (prompt_token_ids, prompt_logprobs)")


def tables(st: Storage, rel: str):
    """A data file's rows as Arrow tables of up to BATCH_ROWS rows (JSON Lines: vLLM's maps keyed by token id are
    read as lists of entries)."""
    name = f"{st.location}/{rel}"
    if rel.endswith(".parquet"):
        with st.open(rel) as f:
            # pre_buffer off: with it, the reader keeps every column chunk it has fetched until the file ends,
            # and memory grows with the file (benchmarks/bench_import.py measured it)
            # buffer_size: a column chunk is read a megabyte at a time, not whole (a file of one row group)
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
            for batch in pf.iter_batches(batch_size=BATCH_ROWS):
                yield pa.Table.from_batches([batch])
        return
    rows, lines = [], []
    with st.open(rel) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{name} line {i + 1}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{name} line {i + 1}: a JSON {type(row).__name__}, where each line is one row "
                                "(an object of columns)")
            if isinstance(row.get("prompt_logprobs"), list):
                with reading(name, f" line {i + 1}"):
                    row["prompt_logprobs"] = [_entries(p) for p in row["prompt_logprobs"]]
            rows.append(row)
            lines.append(i + 1)
            if len(rows) == BATCH_ROWS:
                yield _json_table(rows, lines, name)
                rows, lines = [], []
    if rows:
        yield _json_table(rows, lines, name)


def _json_table(rows: list[dict], lines: list[int], name: str) -> pa.Table:
    """JSON rows as one table; a row whose values do not fit the columns' types is named by its line."""
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        for j in range(len(rows)):  # the first row that does not convert with the ones before it
            try:
                pa.Table.from_pylist(rows[: j + 1])
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
                raise DataError(f"{name} line {lines[j]}: {_first_line(e)} (ids are integers, log-probs numbers, "
                                "in the same columns on every line)") from None
        raise


READ_FAILURES = (pa.ArrowException, OSError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                 OverflowError, UnicodeDecodeError)  # what a malformed file makes pyarrow, json and numpy raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else 'no detail'}"


@contextmanager
def reading(name: str, where: str = ""):
    """The one place a read of a source turns a malformed file into a `DataError` naming the file (and `where`:
    its rows or line); the failures the importer explains itself pass through."""
    try:
        yield
    except DistillError:
        raise
    except READ_FAILURES as e:
        raise DataError(f"{name}{where}: cannot be read as a top-K log-prob source ({_first_line(e)})") from None


def _entries(position):
    """A JSON position of vLLM's prompt_logprobs as a list of {token_id, logprob}."""
    if position is None:
        return None
    if isinstance(position, dict):
        return [{"token_id": int(k), "logprob": float(v["logprob"] if isinstance(v, dict) else v)}
                for k, v in position.items()]
    return [{"token_id": int(e["token_id"]), "logprob": float(e["logprob"])} for e in position]


def to_block(table: pa.Table, layout: str, file: str, first_row: int) -> Block:
    """A table of the source as a `Block`; refuses rows whose columns disagree in length, and padded rows."""
    names = table.column_names
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


def blocks(st: Storage, files: list[str], layout: str | None):
    """Every row of a split's files as `Block`s, and the layout (detected from the first file when None)."""
    for rel in files:
        name = f"{st.location}/{rel}"
        row = 0
        batches = tables(st, rel)
        while True:
            with reading(name, f" (after row {row - 1})" if row else ""):
                table = next(batches, None)
            if table is None:
                break
            layout = layout or detect_layout(table.column_names, name)
            try:
                with reading(name, f" (rows {row}..{row + table.num_rows - 1})"):
                    block = to_block(table, layout, name, row)
            except DataError as e:  # name the file where the message does not
                raise e if str(e).startswith(name) else DataError(f"{name} (rows from {row}): {e}") from None
            yield block
            row += table.num_rows
