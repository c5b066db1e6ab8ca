"""The shard index: which file holds each shard of each field, with its size and sha256, in one Parquet file
per part (`<part>/shards.parquet`, format 3.0) instead of the manifest. The manifest names each index file
with its checksum (`shard_index`), so the manifest stays small however many shards a cache has, an append
adds index files without rewriting old ones, and readers open an index lazily: a lookup reads one row group.

Rows are ordered by (shard index, field); row groups hold `GROUP_ROWS` rows, so the row-group statistics of
`index` find a shard's files without reading the rest. A cache written before 3.0 lists its shards in the
manifest (`shards`); `ShardIndex.legacy` serves those through the same interface.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CacheError
from .records import FileDigest

INDEX_FILE = "shards.parquet"
GROUP_ROWS = 8192
SCHEMA = pa.schema([("split", pa.string()), ("part", pa.string()), ("index", pa.int64()),
                    ("row_start", pa.int64()), ("row_end", pa.int64()), ("field", pa.string()),
                    ("path", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string())])
_CHUNK_KEY = re.compile(r"^c[/.](\d+)(?:[/.]|$)")  # zarr v3's default chunk key: c/<shard>/0/... (or c.<shard>...)


def index_path(part: str) -> str:
    return f"{part}/{INDEX_FILE}"


class IndexWriter:
    """Writes one part's index as its shards' records arrive (in shard order), a row group at a time; memory
    holds one row group. `summary()` is what the manifest records of it."""

    def __init__(self, path: Path):
        self.path = path
        self._writer = pq.ParquetWriter(str(path), SCHEMA, compression="zstd")
        self._rows: list[dict] = []
        self.shards = self.files = 0
        self.field_bytes: dict[str, int] = {}

    def add(self, split: str, part: str, index: int, row_start: int, row_end: int,
            files: dict[str, tuple[str, int, str]]) -> None:
        """One shard: `files` maps each field to (path, bytes, sha256)."""
        self.shards += 1
        for field in sorted(files):
            rel, size, sha = files[field]
            self._rows.append({"split": split, "part": part, "index": index, "row_start": row_start,
                               "row_end": row_end, "field": field, "path": rel, "bytes": size, "sha256": sha})
            self.field_bytes[field] = self.field_bytes.get(field, 0) + size
            self.files += 1
        if len(self._rows) >= GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=SCHEMA), row_group_size=GROUP_ROWS)
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def summary(self) -> dict:
        return {"shards": self.shards, "files": self.files, "field_bytes": dict(sorted(self.field_bytes.items()))}


def field_of(rel: str, part: str) -> str | None:
    """The field folder a path under `part` lies in (None: a file of the part itself)."""
    rest = rel[len(part) + 1:].split("/")
    return rest[0] if len(rest) > 1 else None


def shard_of(rel: str, part: str) -> int | None:
    """The shard number within its part of a shard file's path (None: not a chunk key)."""
    field = field_of(rel, part)
    if field is None:
        return None
    m = _CHUNK_KEY.match(rel[len(part) + len(field) + 2:])
    return None if m is None else int(m.group(1))


def legacy_part(shards: Iterable[dict], part: str) -> Iterator[dict]:
    """The shards of one part from a pre-3.0 manifest's shard list (a 1.0/1.1 shard names no part: its split's)."""
    return (sh for sh in shards if sh.get("part", sh["split"]) == part)


def with_shard(rel: str, part: str, n: int) -> str:
    """The path of shard `n` of the field a shard file `rel` of `part` belongs to (its chunk key renumbered)."""
    head = f"{part}/{field_of(rel, part)}/"
    return head + _CHUNK_KEY.sub(lambda m: m.group(0).replace(m.group(1), str(n), 1), rel[len(head):], count=1)


class ShardIndex:
    """One part's shard files, read lazily: from its index file, or (a cache written before 3.0) from the
    manifest's shard list. `shard_start`: the number of the part's first shard within its split."""

    def __init__(self, part: str, shard_start: int, path: Path | None = None, legacy: list[dict] | None = None):
        self.part, self.shard_start, self.path = part, shard_start, path
        self._legacy = legacy
        self._file: pq.ParquetFile | None = None
        self._group: tuple[int, dict[str, FileDigest]] | None = None  # the last row group looked up
        self._lock = threading.Lock()  # the reader looks files up from threads; a ParquetFile is not thread-safe

    @classmethod
    def legacy(cls, part: str, shard_start: int, shards: Iterable[dict]) -> "ShardIndex":
        return cls(part, shard_start, legacy=list(legacy_part(shards, part)))

    def _parquet(self) -> pq.ParquetFile:
        if self._file is None:
            try:
                self._file = pq.ParquetFile(str(self.path))
            except (pa.ArrowInvalid, OSError) as e:
                raise CacheError(f"shard index {self.path}: cannot be read ({e})") from e
            if not self._file.schema_arrow.equals(SCHEMA):
                raise CacheError(f"shard index {self.path}: unexpected columns {self._file.schema_arrow.names}")
        return self._file

    def batches(self, fields: Iterable[str] | None = None, shards: Iterable[int] | None = None
                ) -> Iterator[pa.RecordBatch]:
        """The index's rows (optionally of some fields, or of some shards by number within the split), one
        row group at a time."""
        keep_fields = None if fields is None else set(fields)
        keep_shards = None if shards is None else set(shards)
        for batch in self._raw_batches(keep_shards):
            if keep_fields is not None or keep_shards is not None:
                rows = batch.to_pydict()
                mask = [(keep_fields is None or f in keep_fields) and (keep_shards is None or i in keep_shards)
                        for f, i in zip(rows["field"], rows["index"])]
                batch = batch.filter(pa.array(mask, type=pa.bool_()))
            if batch.num_rows:
                yield batch

    def _raw_batches(self, shards: set[int] | None) -> Iterator[pa.RecordBatch]:
        if self._legacy is not None:
            rows = [{"split": sh["split"], "part": self.part, "index": sh["index"], "row_start": sh["row_start"],
                     "row_end": sh["row_end"], "field": field_of(rel, self.part) or "", "path": rel,
                     "bytes": d["bytes"], "sha256": d["sha256"]}
                    for sh in self._legacy for rel, d in sorted(sh["files"].items())]
            for s in range(0, len(rows), GROUP_ROWS):
                yield pa.RecordBatch.from_pylist(rows[s:s + GROUP_ROWS], schema=SCHEMA)
            return
        f = self._parquet()
        for g in range(f.metadata.num_row_groups):
            if shards is not None and not self._may_hold(g, shards):
                continue
            yield from f.read_row_group(g).to_batches()

    def _may_hold(self, group: int, shards: set[int]) -> bool:
        col = self._parquet().schema_arrow.get_field_index("index")
        st = self._parquet().metadata.row_group(group).column(col).statistics
        if st is None or not st.has_min_max:
            return True
        return any(st.min <= s <= st.max for s in shards)

    def lookup(self, rel: str) -> FileDigest | None:
        """The size and sha256 the index records for a shard file (None: it lists no such file). Thread-safe."""
        with self._lock:
            return self._lookup(rel)

    def _lookup(self, rel: str) -> FileDigest | None:
        local = shard_of(rel, self.part)
        if local is None:
            return None
        g = self.shard_start + local
        if self._legacy is not None:
            for sh in self._legacy:
                if sh["index"] == g and rel in sh["files"]:
                    return FileDigest(**sh["files"][rel])
            return None
        f = self._parquet()
        for group in range(f.metadata.num_row_groups):
            if not self._may_hold(group, {g}):
                continue
            if self._group is None or self._group[0] != group:
                t = f.read_row_group(group, columns=["path", "bytes", "sha256"]).to_pydict()
                self._group = (group, {p: FileDigest(b, s) for p, b, s in zip(t["path"], t["bytes"], t["sha256"])})
            if rel in self._group[1]:
                return self._group[1][rel]
        return None
