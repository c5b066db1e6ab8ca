"""Reading the rows of batches from a cache split with bounded memory.

Per-row columns come from the parts' rows.parquet, a row group at a time (row groups hold whole shards); the
rows of the shards asked for are kept, `hold_shards` shards of them, and the last row group read, so a
shuffle window of shards scattered over the split reads each row group once per shard. Dense fields come from
the Zarr arrays a chunk (`rows_per_chunk` rows) at a time: the chunks a batch needs that are not held are read
in one selection per part and field, and `hold_shards` shards' worth of chunks are kept. A reader that will
read every row of its shards (`whole_shards`: a worker of a single process) reads a shard's chunks all at once,
in one call; a DDP rank, which reads only its own batches, decompresses only the chunks of its own rows.
Either way each chunk is read once while its shard is held: the batch plan's shuffle window
(`batch_order.EpochPlan`) sets `hold_shards`.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pyarrow.parquet as pq

from ..format.layout import ROWS_FILE, row_values
from ..format.reader import Cache, damaged

class SplitReader:
    """The rows of one split for batches: `columns(rows, names)` and `dense(rows, fields)`, any rows in any order,
    `hold_shards` shards of each kept."""

    def __init__(self, cache: Cache, split: str, whole_shards: bool = False, hold_shards: int = 2):
        self.cache, self.split, self.whole_shards, self.hold_shards = cache, split, whole_shards, hold_shards
        self.parts = cache.parts(split)
        self.part_starts = np.asarray([p.row_start for p in self.parts] + [cache.manifest.splits[split].rows])
        capture = cache.manifest.capture
        self.chunk_rows, self.shard_rows = capture.rows_per_chunk, capture.rows_per_shard
        self._files: dict[int, tuple[pq.ParquetFile, np.ndarray]] = {}
        self._last_group: tuple | None = None  # ((part, row group, names), {column: array}) of the last read
        self._shards: OrderedDict = OrderedDict()  # (part, shard, names) -> {column: array} of its rows
        self._arrays: dict[tuple[int, str], object] = {}
        self._chunks: OrderedDict = OrderedDict()  # (part, field, chunk) -> array
        self.chunks_read = 0  # chunks decompressed so far (for tests and benchmarks)

    def _part_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.part_starts, rows, side="right") - 1

    # -- rows.parquet ---------------------------------------------------------------------------
    def _file(self, p: int):
        if p not in self._files:
            rel = f"{self.parts[p].path}/{ROWS_FILE}"
            with damaged(self.cache, rel):
                f = pq.ParquetFile(str(self.cache.local_file(rel)))
            sizes = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
            self._files[p] = (f, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        return self._files[p]

    def _group(self, p: int, g: int, names: list[str], dtypes: dict) -> dict:
        key = (p, g, tuple(names))
        if self._last_group is None or self._last_group[0] != key:
            with damaged(self.cache, f"{self.parts[p].path}/{ROWS_FILE}"):
                t = self._file(p)[0].read_row_group(g, columns=names)
            self._last_group = (key, {n: row_values(t, n, dtypes[n]) for n in names})
        return self._last_group[1]

    def _shard(self, p: int, shard: int, names: list[str], dtypes: dict) -> dict:
        """The per-row columns of shard `shard` of part `p` (its rows, in order)."""
        key = (p, shard, tuple(names))
        if key not in self._shards:
            cum = self._file(p)[1]
            a = shard * self.shard_rows
            b = min(a + self.shard_rows, int(cum[-1]))
            g = int(np.searchsorted(cum, a, side="right") - 1)  # row groups hold whole shards
            data = self._group(p, g, names, dtypes)
            self._shards[key] = {n: data[n][a - cum[g]: b - cum[g]].copy() for n in names}  # not a view of the group
            while len(self._shards) > self.hold_shards:
                self._shards.popitem(last=False)
        self._shards.move_to_end(key)
        return self._shards[key]

    def columns(self, rows: np.ndarray, dtypes: dict) -> dict[str, np.ndarray]:
        """Per-row columns ({name: dtype}) of `rows` (split row numbers), in the order given."""
        names = list(dtypes)
        parts = self._part_of(rows)
        local = rows - self.part_starts[parts]
        shards = local // self.shard_rows
        gathered = {n: [] for n in names}
        where: list[np.ndarray] = []
        for p, shard in sorted({(int(p), int(s)) for p, s in zip(parts, shards)}):
            sel = np.nonzero((parts == p) & (shards == shard))[0]
            data = self._shard(p, shard, names, dtypes)
            for n in names:
                gathered[n].append(data[n][local[sel] - shard * self.shard_rows])
            where.append(sel)
        order = np.argsort(np.concatenate(where), kind="stable")
        return {n: np.concatenate(gathered[n])[order] for n in names}

    # -- dense fields ---------------------------------------------------------------------------
    def _array(self, p: int, field: str):
        if (p, field) not in self._arrays:
            a = self.cache.array_part(self.split, self.parts[p].path, field)
            self._arrays[(p, field)] = a
        return self._arrays[(p, field)]

    def dense(self, rows: np.ndarray, fields: list[str]) -> dict[str, np.ndarray]:
        """Dense fields of `rows`, in the order given, read a chunk at a time (see the module docstring)."""
        parts = self._part_of(rows)
        local = rows - self.part_starts[parts]
        chunk = local // self.chunk_rows
        need = {(int(p), int(c)) for p, c in zip(parts, chunk)}
        per_shard = self.shard_rows // self.chunk_rows
        wanted = need | ({(p, c // per_shard * per_shard + i) for p, c in need for i in range(per_shard)
                          if (c // per_shard * per_shard + i) * self.chunk_rows < self.parts[p].rows}
                         if self.whole_shards else set())  # (a part's last shard may be short)
        held = max(self.hold_shards * per_shard, len(wanted)) * len(fields)
        out = {}
        for f in fields:
            missing = [(p, c) for p, c in sorted(wanted) if (p, f, c) not in self._chunks]
            for p in sorted({p for p, _ in missing}):
                self._read_chunks(p, f, [c for q, c in missing if q == p])
            blocks = {}
            for p, c in need:
                key = (p, f, c)
                self._chunks.move_to_end(key)
                blocks[(p, c)] = self._chunks[key]
            out[f] = np.stack([blocks[(int(p), int(c))][int(r) - int(c) * self.chunk_rows]
                               for p, c, r in zip(parts, chunk, local)])
        while len(self._chunks) > held:
            self._chunks.popitem(last=False)
        return out

    def _read_chunks(self, p: int, field: str, chunks: list[int]) -> None:
        arr = self._array(p, field)
        n = arr.shape[0]
        spans = [(c * self.chunk_rows, min((c + 1) * self.chunk_rows, n)) for c in chunks]
        if len(spans) == 1 or all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)):
            data = arr[spans[0][0]:spans[-1][1]]  # contiguous: one slice
        else:
            idx = np.concatenate([np.arange(a, b) for a, b in spans])
            data = arr.get_orthogonal_selection((idx,) + (slice(None),) * (arr.ndim - 1))
        at = 0
        for c, (a, b) in zip(chunks, spans):
            self._chunks[(p, field, c)] = data[at:at + b - a]
            at += b - a
        self.chunks_read += len(chunks)
