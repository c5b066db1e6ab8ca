"""Writing a cache: its arrays, shard by shard, each committed once its files are on storage.

A shard (`rows_per_shard` rows of every field) is written at once, checksummed (on object storage:
read back) and then committed by writing its record (on local disk: renamed into place); a shard
without a record is redone. `finalize` streams the records into each written part's shard index
(`index.py`) and its statistics (`tally.py`), and writes `manifest.json` last: a cache without it is
unfinished.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CacheError
from . import idcodes
from .index import INDEX_FILE, IndexWriter, field_of, index_path, legacy_part
from .layout import HEAD_FILE, MANIFEST, ROWS_FILE, TOKENIZER_DIR, WORK_DIR, shard_ranges, sync_file, write_json
from .manifest import FORMAT_NAME, Manifest, manifest_digest
from .shards import ShardEncoder
from .specs import FieldSpec, numcodecs_quiet
from .storage import Storage
from .tally import Tally


COMMITS = f"{WORK_DIR}/commits"


def commit_path(split: str, index: int) -> str:
    return f"{COMMITS}/{split}-{index:05d}.json"


def committed_shards(root: Path | Storage) -> set[tuple[str, int]]:
    """The (split, shard index) an unfinished capture at `root` committed, from the records' names alone."""
    st = root if isinstance(root, Storage) else Storage(root)
    out = set()
    for rel in st.glob(f"{COMMITS}/*.json"):
        split, _, number = rel.rsplit("/", 1)[-1][: -len(".json")].rpartition("-")
        if number.isdigit():
            out.add((split, int(number)))
    return out


def zarr_store(st: Storage, rel: str):
    """The zarr store a writer uses for a folder of the cache: a LocalStore on local disk, else an FsspecStore."""
    from zarr.storage import FsspecStore, LocalStore

    if st.is_local:
        return LocalStore(st.local_path(rel))
    return FsspecStore.from_url(st.location + "/" + rel, storage_options=st.options or None)


def _digest(parts: list) -> dict:
    """{"bytes", "sha256"} of the concatenation of `parts`, without concatenating them."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return {"bytes": sum(memoryview(p).nbytes for p in parts), "sha256": h.hexdigest()}


class CacheWriter:
    """Creates a cache's arrays, writes and commits shards, and finalizes the manifest.

    `plan` holds every setting and identity that determines the cache's bytes (the manifest less
    shards, metadata_files and stats); resuming with a different plan is refused by the caller
    before a writer is made. The writer fills the last part of each split in `split_rows`: the
    split's folder for a new cache, a new `<split>/grow-NNNN` folder when `base` (the finished
    manifest being grown) is given. Nothing `base` lists is touched, so its readers keep reading
    it until the new manifest replaces it.
    """

    def __init__(self, root: Path | Storage, plan: Manifest, specs: list[FieldSpec], split_rows: dict[str, int],
                 base: Manifest | None = None, layout: dict | None = None,
                 fit_order: Callable[[str], np.ndarray] | None = None):
        self.st = root if isinstance(root, Storage) else Storage(root)
        self.layout = layout  # how the ranks that wrote it were laid out, recorded with the timing (not the data)
        self.root = self.st.location
        self.plan = plan
        self.specs = specs
        self.split_rows = split_rows
        self.base = base
        self.chunk_rows = plan.capture.rows_per_chunk
        self.shard_rows = plan.capture.rows_per_shard
        self.level = plan.capture.compression_level
        self.parts = {}  # split -> the part written: {path, row_start, shard_start}
        for split in split_rows:
            parts = plan.parts(split)
            self.parts[split] = {"path": parts[-1].path, "row_start": parts[-1].row_start,
                                 "shard_start": sum(p.shards for p in parts[:-1])}
        self._arrays: dict[tuple[str, str], object] = {}
        self._encoders: dict[tuple[str, str], ShardEncoder | None] = {}
        # frequency codes (idcodes): the writer that lays the cache out fits a split's id order (`fit_order`, on the
        # prepared rows) when the part has none yet; every writer reads it back from the cache: the code of each id
        self.fit_order = fit_order
        self._codes: dict[str, np.ndarray] = {}

    # -- setup ------------------------------------------------------------------------------
    def create_arrays(self) -> None:
        """Create (or open, when resuming) every written part's group and arrays."""
        import zarr

        for split, n in self.split_rows.items():
            part = self.parts[split]["path"]
            store = zarr_store(self.st, part)
            with numcodecs_quiet():
                if self.st.exists(f"{part}/zarr.json"):
                    group = zarr.open_group(store, mode="r+")
                else:
                    group = zarr.create_group(store, attributes={"split": split, "format": FORMAT_NAME})
                for spec in self.specs:
                    exists = self.st.exists(f"{part}/{spec.name}/zarr.json")
                    self._arrays[(split, spec.name)] = group[spec.name] if exists else self._create(group, spec, n)
                    if spec.encoding == idcodes.ENCODING:
                        self._codes[split] = self._id_codes(split, part, spec)

    def _id_codes(self, split: str, part: str, spec: FieldSpec) -> np.ndarray:
        """The code of each id in a part: its id order written (once, by the writer given it) and read back."""
        rel = idcodes.order_path(part, spec.name)
        vocab = None
        if not self.st.exists(rel):  # fitted once: a resumed capture reads the order it wrote
            if self.fit_order is None:
                raise CacheError(f"{self.root}: {rel} is missing (the capture that laid the cache out writes it)")
            order = self.fit_order(split)
            vocab = len(order)
            self.st.write_bytes(rel, [idcodes.order_bytes(order)])
        order = idcodes.read_order(self.st.read_bytes(rel), vocab or self.plan.teacher.vocab_size, f"{self.root}/{rel}")
        return idcodes.codes_of(order, np.dtype(spec.dtype))

    def _create(self, group, spec: FieldSpec, n: int):
        return group.create_array(
            spec.name,
            shape=(n, *spec.tail),
            dtype=spec.dtype,
            chunks=(self.chunk_rows, *spec.tail),
            shards=(self.shard_rows, *spec.tail),
            **spec.compressors(self.level),
            fill_value=0,
            dimension_names=spec.dims,
            attributes={"description": spec.description, **({"encoding": spec.encoding} if spec.encoding else {})},
            config={"write_empty_chunks": True},
        )

    def committed(self) -> set[tuple[str, int]]:
        """(split, shard index within the written part) of the shards committed so far (the records' names)."""
        return {(s, g - self.parts[s]["shard_start"]) for s, g in committed_shards(self.st)
                if s in self.parts and g >= self.parts[s]["shard_start"]}

    def commit_records(self, split: str | None = None):
        """The commit records of the written parts (of one split), in shard order, read one at a time."""
        for s in ([split] if split else self.split_rows):
            for i in range(len(shard_ranges(self.split_rows[s], self.shard_rows))):
                yield json.loads(self.st.read_bytes(commit_path(s, self.parts[s]["shard_start"] + i)))

    def shard_file(self, split: str, field: str, index: int) -> str:
        """The object holding shard `index` (within the written part) of a field: its key from the array's metadata."""
        arr = self._arrays[(split, field)]
        return f"{self.parts[split]['path']}/{field}/" + arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))

    # -- shards -----------------------------------------------------------------------------
    def write_shard(self, split: str, index: int, targets, stats: dict) -> dict:
        """Write shard `index` (within the part) of every field, checksum its files, commit it. A field whose
        layout `ShardEncoder` knows is encoded here and stored as one object (on local disk: written under a
        temporary name, fsynced, renamed; checksummed from the bytes written); any other goes through zarr."""
        part = self.parts[split]
        start, end = shard_ranges(self.split_rows[split], self.shard_rows)[index]
        fields = targets.fields()
        files = {}
        for spec in self.specs:
            data = self._checked(spec, fields[spec.name], split, index, end - start)
            if spec.encoding == idcodes.ENCODING:
                data = self._codes[split][data]
            rel = self.shard_file(split, spec.name, index)
            encoder = self._encoder(split, spec.name)
            if encoder is not None:
                parts = encoder.encode(data)
                self.st.write_bytes(rel, parts)  # on local disk: fsynced
                # on object storage: read back, so that the upload is checked too
                files[rel] = _digest(parts) if self.st.is_local else self.st.digest(rel)
                continue
            self._arrays[(split, spec.name)][start:end] = data
            if not self.st.exists(rel):
                raise CacheError(f"shard {split}/{index}: zarr wrote no file at {rel} (layout changed?)")
            files[rel] = self.st.digest(rel)  # on object storage: read back, so the upload is checked too
            if self.st.is_local:
                sync_file(self.st.local_path(rel))
        if self.st.is_local:
            for d in {self.st.local_path(rel).parent for rel in files}:
                sync_file(d)  # the directory entries too, before the commit record says the shard is there
        g = part["shard_start"] + index  # shards and rows are numbered across a split's parts
        rec = {"split": split, "part": part["path"], "index": g, "row_start": part["row_start"] + start,
               "row_end": part["row_start"] + end, "files": files, **stats}
        write_json(self.st, commit_path(split, g), rec)
        return rec

    def _encoder(self, split: str, field: str) -> ShardEncoder | None:
        key = (split, field)
        if key not in self._encoders:
            self._encoders[key] = ShardEncoder.of(self._arrays[key])
        return self._encoders[key]

    @staticmethod
    def _checked(spec: FieldSpec, data: np.ndarray, split: str, index: int, rows: int) -> np.ndarray:
        """`data` in the field's dtype, refused when its shape is wrong or its values do not fit."""
        if data.shape != (rows, *spec.tail):
            raise CacheError(f"shard {split}/{index}: {spec.name} has shape {data.shape}, "
                             f"expected {(rows, *spec.tail)}")
        if data.dtype == np.dtype(spec.dtype):
            return data
        info = np.iinfo(spec.dtype) if np.dtype(spec.dtype).kind in "iu" else None  # ids and counts narrowed
        if info is None or data.size and (data.min() < info.min or data.max() > info.max):
            raise CacheError(f"shard {split}/{index}: {spec.name} holds {data.dtype} values that "
                             f"{spec.dtype} cannot store")
        return data.astype(spec.dtype)

    # -- the end ----------------------------------------------------------------------------
    def finalize(self) -> Manifest:
        """Check every shard is committed, write each written part's shard index (and, for a base written before
        3.0, its parts' indexes), then manifest.json (replacing `base`'s), and drop the work folder. The
        statistics are tallied from the commit records as they are read for the index (`Tally`), and from the
        sizes of the files written beside the shards: the records are read once."""
        commits = self.committed()
        missing = [(s, i) for s, n in self.split_rows.items()
                   for i in range(len(shard_ranges(n, self.shard_rows))) if (s, i) not in commits]
        if missing:
            raise CacheError(f"cannot finalize {self.root}: shards not committed: {missing[:20]}")
        tally = Tally(self.plan, self.base)
        index = {part: e.to_dict() for part, e in self.base.shard_index.items()} if self.base else {}
        if self.base is not None and self.base.legacy_shards is not None:
            for split, parts in ((s, self.base.parts(s)) for s in self.base.splits):
                for p in parts:
                    index[p.path] = self._write_index(split, p.path, legacy_part(self.base.legacy_shards, p.path))
        for split, part in self.parts.items():
            index[part["path"]] = self._write_index(split, part["path"], self.commit_records(split), tally.add)
        meta = {rel: d.to_dict() for rel, d in self.base.metadata_files.items()} if self.base else {}
        for rel in self._metadata_written():
            meta[rel] = self.st.digest(rel)
        document = {**self.plan.to_dict(), "shard_index": dict(sorted(index.items())), "metadata_files": meta,
                    "stats": tally.result(*self._sizes(), layout=self.layout, field_files=self._order_sizes())}
        document["digest"] = manifest_digest(document)
        write_json(self.st, MANIFEST, document)
        self.st.remove_tree(WORK_DIR)
        return Manifest.from_dict(document)

    def _sizes(self) -> tuple[list[int], int | None]:
        """The bytes of each written part's rows.parquet, and of the LM head file when this (new) cache stores one."""
        rows = [self.st.size(f"{part['path']}/{ROWS_FILE}") for part in self.parts.values()]
        head = self.st.size(HEAD_FILE) if self.base is None and self.st.exists(HEAD_FILE) else None
        return rows, head

    def _order_sizes(self) -> dict[str, int]:
        """The bytes of the id orders this capture wrote, per field (counted with the field's shards)."""
        out: dict[str, int] = {}
        for spec in (s for s in self.specs if s.encoding == idcodes.ENCODING):
            for part in self.parts.values():
                out[spec.name] = out.get(spec.name, 0) + self.st.size(idcodes.order_path(part["path"], spec.name))
        return out

    def _write_index(self, split: str, part: str, records, seen=None) -> dict:
        """A part's shard index from its shards' commit records (in shard order, each also handed to `seen`),
        put in place; its manifest entry."""
        rel = index_path(part)
        with tempfile.TemporaryDirectory() as tmp:
            w = IndexWriter(Path(tmp) / INDEX_FILE)
            try:
                for rec in records:
                    if seen is not None:
                        seen(rec)
                    files = {}
                    for path, d in rec["files"].items():
                        field = field_of(path, part)
                        files[field] = (path, d["bytes"], d["sha256"])
                    w.add(split, part, rec["index"], rec["row_start"], rec["row_end"], files)
            finally:
                w.close()
            self.st.upload(Path(tmp) / INDEX_FILE, rel)
        if self.st.is_local:
            sync_file(self.st.local_path(rel))
        return {"path": rel, **self.st.digest(rel), **w.summary()}

    def _metadata_written(self) -> list[str]:
        """The metadata files this capture wrote (groups, rows, array metadata; tokenizer and head for a new
        cache), synced to disk (files, then folders) before the manifest that lists them."""
        written = [] if self.base else sorted(r for r in self.st.files()
                                              if r.startswith(TOKENIZER_DIR + "/") or r == HEAD_FILE)
        for split in self.split_rows:
            folder = self.parts[split]["path"]
            written += [f"{folder}/zarr.json", f"{folder}/{ROWS_FILE}"] + [f"{folder}/{spec.name}/zarr.json"
                                                                           for spec in self.specs]
            written += [idcodes.order_path(folder, s.name) for s in self.specs if s.encoding == idcodes.ENCODING]
        if self.st.is_local:
            for rel in written:
                sync_file(self.st.local_path(rel))
            for d in {self.st.local_path(rel).parent for rel in written}:
                sync_file(d)  # everything the manifest lists is on disk before the manifest is
        return written
