"""Rows on disk while they are prepared: each split's rows go to a Parquet file as they are made (`RowFileWriter`,
row groups aligned with the cache's shards), and the content keys seen so far go to an on-disk set (`KeyStore`),
so preparing a corpus holds one block of documents and one row group in memory, whatever its size.

The Parquet file is the split's `rows.parquet` as the cache stores it; a capture reads a shard's rows back
from it (`RowFile.read`), and rank 0 uploads it whole.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..format.layout import row_column, row_values
from ..format.columns import rows_table

ROW_GROUP_ROWS = 2048  # about; rounded to a whole number of shards


@dataclass
class Rows:
    """Token rows (a block of a split, or a shard's). Positions >= lengths[i] are padding."""

    input_ids: np.ndarray  # (N, L) int32
    lengths: np.ndarray  # (N,) int32
    keys: list[str]  # (N,) 32 hex chars
    loss_mask: np.ndarray | None = None  # (N, L) uint8: 1 where the prediction of token t+1 trains
    position_ids: np.ndarray | None = None  # (N, L) int32: restart at 0 per document (document_mask)
    labels: np.ndarray | None = None  # classification: (N,) class ids, or (N, L) per token with IGNORE_INDEX elsewhere

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def real_tokens(self) -> np.ndarray:
        """The ids of every row's real positions, row after row (1-D)."""
        return self.input_ids[np.arange(self.input_ids.shape[1])[None, :] < self.lengths[:, None]]

    def take(self, idx) -> "Rows":
        idx = np.asarray(idx, dtype=np.int64)
        return Rows(self.input_ids[idx], self.lengths[idx], [self.keys[i] for i in idx],
                    None if self.loss_mask is None else self.loss_mask[idx],
                    None if self.position_ids is None else self.position_ids[idx],
                    None if self.labels is None else self.labels[idx])

    @classmethod
    def concat(cls, blocks: list["Rows"]) -> "Rows":
        if len(blocks) == 1:
            return blocks[0]

        def cat(name):
            values = [getattr(b, name) for b in blocks]
            return None if values[0] is None else np.concatenate(values)

        return cls(cat("input_ids"), cat("lengths"), [k for b in blocks for k in b.keys], cat("loss_mask"),
                   cat("position_ids"), cat("labels"))

    @classmethod
    def from_table(cls, t: pa.Table) -> "Rows":
        names = t.column_names
        return cls(row_column(t, "input_ids", np.int32), t.column("length").to_numpy().astype(np.int32),
                   t.column("key").to_pylist(),
                   row_column(t, "loss_mask", np.uint8) if "loss_mask" in names else None,
                   row_column(t, "position_ids", np.int32) if "position_ids" in names else None,
                   row_values(t, "labels", np.int32) if "labels" in names else None)


def group_rows(shard_rows: int) -> int:
    """Rows per Parquet row group: a whole number of shards, about ROW_GROUP_ROWS."""
    return shard_rows * max(1, round(ROW_GROUP_ROWS / shard_rows))


@dataclass
class RowFile:
    """One split's prepared rows: a Parquet file (None when the split has no row) and what is known of it."""

    path: Path | None
    rows: int
    tokens: int
    keys_sha256: str  # sha256 of the keys in order: ranks compare it
    shard_tokens: np.ndarray  # tokens of each shard (rows_per_shard rows)
    schema: pa.Schema | None = None  # the file's columns and their types (None: no row)
    _file: pq.ParquetFile | None = field(default=None, repr=False)
    _group: tuple[int, Rows] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.rows

    @property
    def n_tokens(self) -> int:
        return self.tokens

    def _parquet(self) -> pq.ParquetFile:
        if self._file is None:
            self._file = pq.ParquetFile(str(self.path))
        return self._file

    def read(self, a: int, b: int) -> Rows:
        """Rows a..b, from the row groups that hold them (the last one read is kept for the next call)."""
        f = self._parquet()
        blocks, start = [], 0
        for g in range(f.metadata.num_row_groups):
            n = f.metadata.row_group(g).num_rows
            if start < b and start + n > a:
                if self._group is None or self._group[0] != g:
                    self._group = (g, Rows.from_table(f.read_row_group(g)))
                rows = self._group[1]
                blocks.append(rows.take(np.arange(max(a, start) - start, min(b, start + n) - start)))
            start += n
            if start >= b:
                break
        return Rows.concat(blocks)

    @property
    def keys(self) -> list[str]:
        """Every key of the split, in order (the whole column: for checks and small corpora)."""
        return [] if self.path is None else pq.read_table(str(self.path), columns=["key"]).column("key").to_pylist()

    def iter_blocks(self):
        """The rows a row group at a time."""
        if self.path is None:
            return
        f = self._parquet()
        for g in range(f.metadata.num_row_groups):
            yield Rows.from_table(f.read_row_group(g))


class RowFileWriter:
    """Appends rows to one split's Parquet file in row groups of exactly `group` rows (the last one shorter)."""

    def __init__(self, path: Path, shard_rows: int):
        self.path, self.shard_rows, self.group = path, shard_rows, group_rows(shard_rows)
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[Rows] = []
        self._pending_rows = 0
        self.rows = self.tokens = 0
        self._keys = hashlib.sha256()
        self._shard_tokens: list[int] = []
        self._schema: pa.Schema | None = None

    def add(self, rows: Rows) -> None:
        if not len(rows):
            return
        self._keys.update("".join(rows.keys).encode())
        for n in rows.lengths.tolist():  # tokens per shard, as the rows pass
            if self.rows % self.shard_rows == 0:
                self._shard_tokens.append(0)
            self._shard_tokens[-1] += int(n)
            self.rows += 1
        self.tokens += rows.n_tokens
        self._pending.append(rows)
        self._pending_rows += len(rows)
        while self._pending_rows >= self.group:
            block = Rows.concat(self._pending)
            self._write(block.take(np.arange(self.group)))
            rest = block.take(np.arange(self.group, len(block)))
            self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)

    def _write(self, rows: Rows) -> None:
        table = rows_table(rows)
        if self._writer is None:
            self._writer = pq.ParquetWriter(str(self.path), table.schema, compression="zstd")
            self._schema = table.schema
        self._writer.write_table(table, row_group_size=self.group)

    def close(self) -> RowFile:
        if self._pending_rows:
            self._write(Rows.concat(self._pending))
            self._pending, self._pending_rows = [], 0
        if self._writer is not None:
            self._writer.close()
        return RowFile(self.path if self._writer is not None else None, self.rows, self.tokens,
                       self._keys.hexdigest(), np.asarray(self._shard_tokens, dtype=np.int64), self._schema)


class KeyStore:
    """Content keys seen so far, per scope (a split of the dataset, or the cache an append grows), in SQLite on
    disk: memory is SQLite's page cache, not the number of rows."""

    SCOPES = {"main": 0, "validation": 1, "test": 2, "cache": 3}

    def __init__(self, path: Path):
        self.db = sqlite3.connect(str(path))
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-65536;"
                              "CREATE TABLE IF NOT EXISTS k (key BLOB, scope INTEGER, PRIMARY KEY (key, scope))"
                              " WITHOUT ROWID;")

    def add(self, key: str, scope: str) -> bool:
        """Record `key` in `scope`; whether it is new there."""
        cur = self.db.execute("INSERT OR IGNORE INTO k VALUES (?, ?)", (bytes.fromhex(key), self.SCOPES[scope]))
        return cur.rowcount == 1

    def has(self, key: str, scopes: tuple[str, ...]) -> bool:
        if not scopes:
            return False
        q = ",".join("?" * len(scopes))
        return self.db.execute(f"SELECT 1 FROM k WHERE key = ? AND scope IN ({q}) LIMIT 1",
                               (bytes.fromhex(key), *(self.SCOPES[s] for s in scopes))).fetchone() is not None

    def load(self, keys, scope: str) -> int:
        """Record many keys (an iterable of lists) in `scope`; how many."""
        n = 0
        for block in keys:
            self.db.executemany("INSERT OR IGNORE INTO k VALUES (?, ?)",
                                ((bytes.fromhex(k), self.SCOPES[scope]) for k in block))
            n += len(block)
        return n

    def close(self) -> None:
        self.db.close()
