"""Reading another tool's top-K log-prob dataset for `distill import` (`importer.py` writes the cache).

A source is a local folder or URL holding Parquet (`*.parquet`) or JSON Lines (`*.jsonl`) files: its
subfolders are its splits when it has any (as `distill export` writes them), else its files are one split.
`blocks` yields each file's rows as `layouts.Block`s (the columns of the axolotl, vLLM and DistillKit layouts are
read in `layouts.py`). Every read goes through `reading`, which turns a malformed file (a truncated Parquet file,
a JSON line that is not an object, a string where ids are) into one `DataError` naming the file and its line or
rows.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataError, DistillError
from ..format import distillkit
from ..format.distillkit import Compression
from ..format.storage import Storage
from .layouts import Block, detect_layout, to_block

__all__ = ["Block", "EXTENSIONS", "LAYOUTS", "blocks", "reading", "source_splits"]

LAYOUTS = ("axolotl", "vllm", "distillkit")
EXTENSIONS = (".parquet", ".jsonl")
BATCH_ROWS = 64


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


def compression_of(st: Storage, rel: str) -> Compression:
    """The DistillKit settings of data file `rel`: the compression_config.yaml in its folder, else in a folder above
    it within the source (DistillKit writes it beside its files; its training YAML's logprob_compressor section
    saved as that file reads the same)."""
    import yaml

    parts = rel.split("/")[:-1]
    for depth in range(len(parts), -1, -1):
        where = "/".join(parts[:depth] + [distillkit.CONFIG_FILE])
        if st.exists(where):
            try:
                with reading(f"{st.location}/{where}"):
                    raw = yaml.safe_load(st.read_bytes(where))
            except yaml.YAMLError as e:
                raise DataError(f"{st.location}/{where}: not YAML ({str(e).splitlines()[0]})") from None
            try:
                return Compression.from_dict(raw)
            except distillkit.CompressionError as e:
                raise DataError(f"{st.location}/{where}: {e}") from None
    raise DataError(f"{st.location}/{rel}: DistillKit's files hold no record of their compression: put the "
                    f"{distillkit.CONFIG_FILE} its capture wrote (or the logprob_compressor section of its training "
                    "settings, as YAML) beside them")


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


def blocks(st: Storage, files: list[str], layout: str | None):
    """Every row of a split's files as `Block`s, and the layout (detected from the first file when None)."""
    for rel in files:
        name = f"{st.location}/{rel}"
        row, compression = 0, None
        batches = tables(st, rel)
        while True:
            with reading(name, f" (after row {row - 1})" if row else ""):
                table = next(batches, None)
            if table is None:
                break
            layout = layout or detect_layout(table.column_names, name)
            if layout == "distillkit" and compression is None:
                compression = compression_of(st, rel)
            try:
                with reading(name, f" (rows {row}..{row + table.num_rows - 1})"):
                    block = to_block(table, layout, name, row, compression)
            except DataError as e:  # name the file where the message does not
                raise e if str(e).startswith(name) else DataError(f"{name} (rows from {row}): {e}") from None
            yield block
            row += table.num_rows
