"""Reading a finished cache on local disk or at any fsspec URL: its manifest, rows and dense fields.

A remote cache is read through a local mirror folder: each file is fetched the first time it is
needed and its sha256 checked against the manifest (or the shard index the manifest names) as it
arrives, so every shard a student reads is verified once, and read from disk after. Nothing here
holds a list of every shard: a part's shard index is opened when a file of that part is first looked
up, and a lookup reads one of its row groups.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CacheError
from . import idcodes
from .index import ShardIndex
from .layout import MANIFEST, ROWS_FILE, TOKENIZER_DIR, WORK_DIR, file_digest, tokenizer_fingerprint
from .manifest import Manifest, Part
from .records import FileDigest
from .specs import numcodecs_quiet
from .storage import Storage, fetch_verified


@contextmanager
def damaged(cache: "Cache", rel: str):
    """A file of the cache that pyarrow cannot read (truncated, overwritten) as a CacheError naming it."""
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        raise CacheError(f"{cache.root}/{rel} cannot be read ({type(e).__name__}: {e}); the cache is damaged: "
                         "`distill verify` names what changed") from e


def read_document(st: Storage) -> dict:
    """The manifest of a finished cache as stored (JSON); refuses unfinished and unreadable ones."""
    where = st.location
    if not st.exists(MANIFEST):
        if st.has(WORK_DIR):
            raise CacheError(f"{where} is an unfinished cache (no {MANIFEST}; a capture is running or was "
                             "interrupted: rerun the same teacher-cache command to resume)")
        raise CacheError(f"{where} is not a teacher cache (no {MANIFEST})")
    try:
        return json.loads(st.read_bytes(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{where}/{MANIFEST} is not valid JSON: {e}") from e


def read_manifest(root: str | Path | Storage) -> Manifest:
    """The manifest of a finished cache (local path, URL or Storage); refuses unfinished, foreign or
    newer-format caches."""
    st = root if isinstance(root, Storage) else Storage(root)
    return Manifest.from_dict(read_document(st), f"{st.location}/{MANIFEST}")


def default_mirror(location: str, digest: str) -> Path:
    """Where a remote cache's files are kept once fetched: $TEACHER_CACHE_MIRROR or
    ~/.cache/teacher-cache-distill, one folder per (location, manifest digest)."""
    base = Path(os.environ.get("TEACHER_CACHE_MIRROR") or Path.home() / ".cache" / "teacher-cache-distill")
    return base / f"{hashlib.sha256(location.encode()).hexdigest()[:16]}-{digest[:16]}"


def _mirror_store(cache: "Cache"):
    """A read-only zarr LocalStore over the mirror that fetches (and verifies) a file on its first access."""
    import asyncio

    from zarr.storage import LocalStore

    class MirrorStore(LocalStore):
        async def get(self, key, prototype=None, byte_range=None):
            await asyncio.to_thread(cache.local_file, key, True)
            return await super().get(key, prototype, byte_range)

        async def get_partial_values(self, prototype, key_ranges):
            key_ranges = list(key_ranges)
            for key in {k for k, _ in key_ranges}:
                await asyncio.to_thread(cache.local_file, key, True)
            return await super().get_partial_values(prototype, key_ranges)

        async def exists(self, key):
            return cache.file_digest(key) is not None or await super().exists(key)

    cache.mirror.mkdir(parents=True, exist_ok=True)
    return MirrorStore(cache.mirror, read_only=True)


class PartsArray:
    """The arrays of a split's parts as one array along rows: `shape`, `dtype`, and reading with a row
    index or slice (step 1) first, then any index for the other axes (`a[10:20]`, `a[:]`, `a[3, :, 0]`)."""

    def __init__(self, arrays: list):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [a.shape[0] for a in arrays])
        self.shape = (int(self.starts[-1]), *arrays[0].shape[1:])
        self.dtype = arrays[0].dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(first, (int, np.integer)):
            i = range(self.shape[0])[first]
            p = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.arrays[p][(i - int(self.starts[p]), *rest)]
        if not isinstance(first, slice) or first.step not in (None, 1):
            raise TypeError("PartsArray reads a row index or a row slice with step 1")
        lo, hi, _ = first.indices(self.shape[0])
        out = []
        for p, a in enumerate(self.arrays):
            s, e = max(lo, int(self.starts[p])), min(hi, int(self.starts[p + 1]))
            if s < e:
                out.append(a[(slice(s - int(self.starts[p]), e - int(self.starts[p])), *rest)])
        if not out:
            return self.arrays[0][(slice(0, 0), *rest)]
        return out[0] if len(out) == 1 else np.concatenate(out)


class Cache:
    """Read access to a finished cache on local disk or at any fsspec URL (see the module docstring);
    `mirror`: where a remote cache's files are kept (default `default_mirror`)."""

    def __init__(self, root: str | Path | Storage, mirror: str | Path | None = None,
                 storage_options: dict | None = None):
        self._storage = root if isinstance(root, Storage) else Storage(root, storage_options)
        self._pid = os.getpid()
        self.remote = not self.storage.is_local
        self.root: Path | str = self.storage.where
        self.manifest = read_manifest(self.storage)
        self._indexes: dict[str, ShardIndex] = {}
        self._index_lock = threading.RLock()  # zarr's reads look files up from several threads at once
        self._orders: dict[str, np.ndarray] = {}  # frequency codes: each part's id order, read once
        self.mirror = Path(mirror) if mirror else default_mirror(self.storage.location, self.manifest.digest)

    @property
    def storage(self) -> Storage:
        """The cache's storage; a forked or spawned DataLoader worker gets a filesystem instance of its own."""
        if self._pid != os.getpid():
            self._storage = Storage(self._storage.location, self._storage.options, fresh=True)
            self._pid = os.getpid()
        return self._storage

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_storage", "_indexes", "_index_lock", "_orders")} | {
            "location": self._storage.location, "storage_options": self._storage.options, "_pid": None}

    def __setstate__(self, state):
        self._storage = Storage(state.pop("location"), state.pop("storage_options"), fresh=True)
        self.__dict__.update(state)
        self._indexes = {}
        self._index_lock = threading.RLock()
        self._orders = {}
        self._pid = os.getpid()

    def local_file(self, rel: str, missing_ok: bool = False) -> Path | None:
        """A local path holding `rel`: the file itself on local disk, else the mirror's verified copy."""
        if not self.remote:
            return self.storage.local_path(rel)
        dest = self.mirror / rel
        if not dest.exists():
            digest = self.file_digest(rel)
            if digest is None:
                if missing_ok:
                    return None
                raise CacheError(f"{self.root}: {rel} is not a file of this cache")
            fetch_verified(self.storage, rel, digest.to_dict(), dest)
        return dest

    # -- the files and their checksums ---------------------------------------------------------
    def index(self, split: str, part: str) -> ShardIndex:
        """A part's shard index (opened once; for a remote cache fetched into the mirror and verified)."""
        with self._index_lock:
            return self._open_index(split, part)

    def _open_index(self, split: str, part: str) -> ShardIndex:
        if part not in self._indexes:
            m = self.manifest
            start = m.shard_start(split, part)
            if m.legacy_shards is not None:
                self._indexes[part] = ShardIndex.legacy(part, start, m.legacy_shards)
            else:
                if part not in m.shard_index:
                    raise CacheError(f"{self.root}: the manifest names no shard index for {part!r}")
                entry = m.shard_index[part]
                path = self.local_file(entry.path)  # a remote one is checked as it arrives; a local one here
                if not self.remote and (not path.is_file() or file_digest(path) != entry.digest().to_dict()):
                    raise CacheError(f"{self.root}/{entry.path}: the shard index is missing or fails its checksum "
                                     "(run `distill verify`)")
                self._indexes[part] = ShardIndex(part, start, path)
        return self._indexes[part]

    def file_digest(self, rel: str) -> FileDigest | None:
        """The size and sha256 the cache records for one of its files (None: not a file of this cache)."""
        m = self.manifest
        if rel in m.metadata_files:
            return m.metadata_files[rel]
        entry = next((e for e in m.shard_index.values() if e.path == rel), None)
        if entry is not None:
            return entry.digest()
        split, part, field = m.locate(rel)
        if field not in m.dense_fields:
            return None
        return self.index(split, part.path).lookup(rel)

    def iter_files(self, fields: list[str] | None = None, splits: list[str] | None = None,
                   shards: list[int] | None = None, metadata: bool = True) -> Iterator[tuple[str, FileDigest, str]]:
        """Every file of the cache but the manifest (or those of some dense fields, splits, shard numbers) as
        (path, digest, owner), streamed: the metadata files (unless `metadata` is False) and indexes, then each
        part's shards in order."""
        m = self.manifest
        fields = m.dense_fields if fields is None else [f for f in m.dense_fields if f in fields]
        splits = list(m.splits) if splits is None else splits
        if shards is None and metadata:
            for rel, d in m.metadata_files.items():
                split, field = m.file_owner(rel)
                if (split is None or split in splits) and (field is None or field in fields):
                    yield rel, d, "metadata"
        for split in splits:
            for p in m.parts(split):
                if p.path in m.shard_index and shards is None:
                    yield m.shard_index[p.path].path, m.shard_index[p.path].digest(), "shard index"
                for batch in self.index(split, p.path).batches(fields, shards):
                    t = batch.to_pydict()
                    for i, a, b, rel, size, sha in zip(t["index"], t["row_start"], t["row_end"], t["path"],
                                                       t["bytes"], t["sha256"]):
                        yield rel, FileDigest(size, sha), f"shard {split}/{i} (rows {a}-{b})"

    def tokenizer(self):
        """The tokenizer the rows were made with, from the cache itself; checked against the manifest."""
        from transformers import AutoTokenizer

        for rel in self.manifest.metadata_files:
            if rel.startswith(TOKENIZER_DIR + "/"):
                self.local_file(rel)
        folder = self.local_file(TOKENIZER_DIR) if not self.remote else self.mirror / TOKENIZER_DIR
        tok = AutoTokenizer.from_pretrained(folder)
        if tokenizer_fingerprint(tok) != self.manifest.tokenizer.fingerprint:
            raise CacheError(f"{self.root}/{TOKENIZER_DIR}: tokenizer does not match the manifest's fingerprint")
        return tok

    @property
    def splits(self) -> list[str]:
        return list(self.manifest.splits)

    def parts(self, split: str) -> tuple[Part, ...]:
        return self.manifest.split(split, str(self.root)).parts

    def shard_ranges(self, split: str) -> list[tuple[int, int]]:
        """(row_start, row_end) of each shard of the split, rows numbered across its parts."""
        self.parts(split)
        return self.manifest.shard_ranges(split)

    def rows(self, split: str, columns: list[str] | None = None, max_rows: int | None = None) -> pa.Table:
        """The split's rows (every part's rows.parquet, in order), or some columns of its first `max_rows`."""
        tables, left = [], max_rows
        for part in self.parts(split):
            rel = f"{part.path}/{ROWS_FILE}"
            path = self.local_file(rel)
            with damaged(self, rel):
                if left is None:
                    tables.append(pq.read_table(path, columns=columns))
                    continue
                batches = pq.ParquetFile(path).iter_batches(batch_size=left, columns=columns)
                tables.append(pa.Table.from_batches([next(batches)]))
            left -= tables[-1].num_rows
            if left <= 0:
                break
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)

    def shard_rows(self, split: str, columns: list[str]):
        """(part, one shard's rows as an Arrow table, its first row within the part), shard after shard: a split's
        rows.parquet columns read without holding the split."""
        step = self.manifest.capture.value("rows_per_shard")
        for part in self.parts(split):
            rel = f"{part.path}/{ROWS_FILE}"
            start = 0
            with damaged(self, rel):
                # pre_buffer off: with it the reader keeps what it fetched until the file ends (memory would grow
                # with the split)
                f = pq.ParquetFile(self.local_file(rel), pre_buffer=False)
                for batch in f.iter_batches(batch_size=step, columns=columns):
                    yield part.path, pa.Table.from_batches([batch]), start
                    start += batch.num_rows

    def to_dataset(self, split: str, fields: list[str] | None = None):
        """The split as a `datasets.Dataset` (input_ids, key, loss mask, `fields`): see `export.to_dataset`."""
        from .export import to_dataset

        return to_dataset(self, split, fields)

    def array(self, split: str, field: str):
        """A dense field of a split: a zarr array (a `PartsArray` over them when the cache grew)."""

        arrays = [self.array_part(split, p.path, field) for p in self.parts(split)]
        return arrays[0] if len(arrays) == 1 else PartsArray(arrays)

    def array_part(self, split: str, part: str, field: str):
        """A dense field of one part of a split: a zarr array (opened lazily: nothing is read until sliced); a field
        of frequency codes reads as the ids (`idcodes.CodedIds`)."""
        import zarr

        if field not in self.manifest.dense_fields:
            raise CacheError(f"{self.root}: no dense field {field!r} (has: {', '.join(self.dense_fields)})")
        with numcodecs_quiet():
            if not self.remote:
                arr = zarr.open_array(str(self.storage.local_path(f"{part}/{field}")), mode="r")
            else:
                arr = zarr.open_array(store=_mirror_store(self), path=f"{part}/{field}", mode="r")
        if self.manifest.fields[field].encoding != idcodes.ENCODING:
            return arr
        rel = idcodes.order_path(part, field)
        if rel not in self._orders:  # read once per part
            path = self.local_file(rel)
            if not path.is_file():
                raise CacheError(f"{self.root}/{rel}: the id order of {field} is missing (run `distill verify`)")
            self._orders[rel] = idcodes.read_order(path.read_bytes(), self.manifest.teacher.vocab_size,
                                                   f"{self.root}/{rel}")
        return idcodes.CodedIds(arr, self._orders[rel])

    @property
    def dense_fields(self) -> list[str]:
        return self.manifest.dense_fields
