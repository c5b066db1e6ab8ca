"""The teacher cache on disk: layout, writer, reader and verification (FORMAT.md is the spec).

    CACHE/
      manifest.json          written last, atomically: a cache without it is unfinished
      _capture/              only while a capture runs or after it was killed
        plan.json              the settings the partial cache was started with
        commits/<split>-<shard>.json   one per committed shard (files, sizes, sha256)
      tokenizer/             the teacher's tokenizer (save_pretrained: JSON and text files)
      <split>/               "train", "validation"
        rows.parquet           key, input_ids, length per row (row order = array order)
        zarr.json              a Zarr v3 group; one array per field, sharded along rows
        <field>/zarr.json, <field>/c/<shard>/0/...

The one writer holds an exclusive flock on CACHE itself. A shard (`rows_per_shard` rows of every field) is written at once, checksummed and then
committed by an atomic rename of its record; a shard without a record is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .storage import Storage, StorageError, fetch_verified, stream_digest

FORMAT_NAME = "teacher-cache"
FORMAT_VERSION = "1.1"
MANIFEST = "manifest.json"
WORK_DIR = "_capture"
TOKENIZER_DIR = "tokenizer"


class CacheError(RuntimeError):
    """A cache that cannot be read or written as asked; the message says what and where."""


@dataclass(frozen=True)
class FieldSpec:
    """One dense per-row field: a Zarr array of shape (rows, *tail)."""

    name: str
    dims: tuple[str, ...]  # names of all axes, "row" first
    tail: tuple[int, ...]  # shape after the row axis
    dtype: str  # numpy dtype as stored
    description: str
    encoding: str | None = None  # "bfloat16-bits": uint16 holding bfloat16 bit patterns

    @property
    def bytes_per_row(self) -> int:
        return int(np.prod(self.tail)) * np.dtype(self.dtype).itemsize

    def to_dict(self, split_rows: dict[str, int], chunk_rows: int, shard_rows: int) -> dict:
        d = {
            "path": "{split}/" + self.name,
            "format": "zarr-v3",
            "dtype": self.dtype,
            "dims": list(self.dims),
            "shape": {s: [n, *self.tail] for s, n in split_rows.items()},
            "chunk_rows": chunk_rows,
            "shard_rows": shard_rows,
            "description": self.description,
        }
        if self.encoding:
            d["encoding"] = self.encoding
        return d


def field_specs(*, seq_len: int, top_k: int, n_temperatures: int, hidden: tuple[int, int] | None,
                hidden_dtype: str, attention: tuple[int, int] | None) -> list[FieldSpec]:
    """The dense fields a capture writes; `hidden` = (n_layers, width), `attention` = (n_layers, heads kept)."""
    L, K = seq_len, top_k
    specs = [
        FieldSpec("topk_ids", ("row", "position", "k"), (L, K), "int32",
                  "ids of the K most likely next tokens, most likely first"),
        FieldSpec("topk_logprobs", ("row", "position", "k"), (L, K), "float16",
                  "teacher log-probabilities of topk_ids at T=1"),
        FieldSpec("logsumexp", ("row", "position"), (L,), "float32",
                  "logsumexp of the teacher logits at T=1: log p(i) = z_i - logsumexp"),
        FieldSpec("target_logprob", ("row", "position"), (L,), "float32",
                  "teacher log-probability of the actual next token; NaN where there is none"),
    ]
    if n_temperatures:
        specs.append(FieldSpec("logsumexp_tempered", ("row", "temperature", "position"), (n_temperatures, L),
                               "float32", "logsumexp(z / T) per extra temperature: log p_T(i) = z_i / T - value"))
    if hidden:
        n, d = hidden
        bits = hidden_dtype == "bfloat16"
        specs.append(FieldSpec("hidden_states", ("row", "layer", "position", "hidden"), (n, L, d),
                               "uint16" if bits else "float16", "hidden states of the selected layers",
                               "bfloat16-bits" if bits else None))
    if attention:
        n, h = attention
        specs.append(FieldSpec("attentions", ("row", "layer", "head", "query", "key"), (n, h, L, L), "float16",
                               "attention probabilities of the selected layers (and heads)"))
    return specs


# ---------------------------------------------------------------------------------------------
# small file helpers


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the vocabulary, added tokens and special tokens: equal iff tokenisation agrees."""
    payload = {
        "vocab": sorted(tok.get_vocab().items()),
        "added": sorted((str(k), str(v)) for k, v in tok.added_tokens_decoder.items()),
        "special": sorted((k, str(v)) for k, v in tok.special_tokens_map.items()),
        "class": type(tok).__name__,
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def manifest_digest(manifest: dict) -> str:
    return sha256_bytes(canonical({k: v for k, v in manifest.items() if k != "digest"}).encode())


def shard_file(split: str, field: FieldSpec, shard: int) -> str:
    return "/".join([split, field.name, "c", str(shard)] + ["0"] * len(field.tail))


def shard_ranges(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_rows, n_rows)) for s in range(0, n_rows, shard_rows)]


# ---------------------------------------------------------------------------------------------
# writing


def read_commits(root: Path) -> dict[tuple[str, int], dict]:
    """The commit records of an unfinished capture at `root`: {(split, shard index): record}."""
    out = {}
    for p in sorted((root / WORK_DIR / "commits").glob("*.json")):
        rec = json.loads(p.read_text())
        out[(rec["split"], rec["index"])] = rec
    return out


def write_rows(path: Path, rows) -> None:
    """`rows.parquet` of one split: key, input_ids, length, and loss_mask / position_ids when present."""
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
    pq.write_table(pa.table(cols), path, compression="zstd")


def row_column(table: pa.Table, name: str, dtype) -> np.ndarray:
    """A fixed-size-list column of rows.parquet as an (N, L) array."""
    col = table.column(name).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(len(col), -1)


class CacheWriter:
    """Creates a cache's arrays, writes and commits shards, and finalizes the manifest.

    `plan` holds every setting and identity that determines the cache's bytes; resuming
    with a different plan is refused by the caller before a writer is made.
    """

    def __init__(self, root: Path, plan: dict, specs: list[FieldSpec], split_rows: dict[str, int]):
        self.root = root
        self.plan = plan
        self.specs = specs
        self.split_rows = split_rows
        self.chunk_rows = plan["capture"]["rows_per_chunk"]
        self.shard_rows = plan["capture"]["rows_per_shard"]
        self.level = plan["capture"]["compression_level"]
        self.work = root / WORK_DIR
        (self.work / "commits").mkdir(parents=True, exist_ok=True)
        self._arrays: dict[tuple[str, str], object] = {}

    # -- setup ------------------------------------------------------------------------------
    def create_arrays(self) -> None:
        """Create (or open, when resuming) every split's group and arrays."""
        import zarr
        from zarr.codecs import ZstdCodec

        for split, n in self.split_rows.items():
            group_path = self.root / split
            if (group_path / "zarr.json").exists():
                group = zarr.open_group(str(group_path), mode="r+")
            else:
                group = zarr.create_group(str(group_path), attributes={"split": split, "format": FORMAT_NAME})
            for spec in self.specs:
                if (group_path / spec.name / "zarr.json").exists():
                    arr = group[spec.name]
                else:
                    arr = group.create_array(
                        spec.name,
                        shape=(n, *spec.tail),
                        dtype=spec.dtype,
                        chunks=(self.chunk_rows, *spec.tail),
                        shards=(self.shard_rows, *spec.tail),
                        compressors=[ZstdCodec(level=self.level)] if self.level else None,
                        fill_value=0,
                        dimension_names=spec.dims,
                        attributes={"description": spec.description, **({"encoding": spec.encoding}
                                                                         if spec.encoding else {})},
                        config={"write_empty_chunks": True},
                    )
                self._arrays[(split, spec.name)] = arr

    def committed(self) -> dict[tuple[str, int], dict]:
        return read_commits(self.root)

    # -- shards -----------------------------------------------------------------------------
    def write_shard(self, split: str, index: int, targets, stats: dict) -> dict:
        """Write one shard of every field, checksum its files, commit it. Returns the record."""
        start, end = shard_ranges(self.split_rows[split], self.shard_rows)[index]
        fields = targets.fields()
        for spec in self.specs:
            data = fields[spec.name]
            if data.shape != (end - start, *spec.tail):
                raise CacheError(f"shard {split}/{index}: {spec.name} has shape {data.shape}, "
                                 f"expected {(end - start, *spec.tail)}")
            self._arrays[(split, spec.name)][start:end] = data.view(spec.dtype)
        files = {}
        for spec in self.specs:
            rel = shard_file(split, spec, index)
            path = self.root / rel
            if not path.is_file():
                raise CacheError(f"shard {split}/{index}: zarr wrote no file at {rel} (layout changed?)")
            files[rel] = file_digest(path)
            sync_file(path)
        for d in {(self.root / shard_file(split, spec, index)).parent for spec in self.specs}:
            sync_file(d)  # the directory entries too, before the commit record says the shard is there
        rec = {"split": split, "index": index, "row_start": start, "row_end": end, "files": files, **stats}
        atomic_write_json(self.work / "commits" / f"{split}-{index:05d}.json", rec)
        return rec

    # -- the end ----------------------------------------------------------------------------
    def finalize(self, stats: dict) -> dict:
        """Check every shard is committed, write manifest.json, drop the work folder."""
        commits = self.committed()
        missing = [(s, i) for s, n in self.split_rows.items()
                   for i in range(len(shard_ranges(n, self.shard_rows))) if (s, i) not in commits]
        if missing:
            raise CacheError(f"cannot finalize {self.root}: shards not committed: {missing}")
        shards = [{k: commits[key][k] for k in ("split", "index", "row_start", "row_end", "files")}
                  for key in sorted(commits, key=lambda k: (list(self.split_rows).index(k[0]), k[1]))]
        meta = {}
        for p in sorted((self.root / TOKENIZER_DIR).rglob("*")):
            if p.is_file():
                meta[p.relative_to(self.root).as_posix()] = file_digest(p)
        for split in self.split_rows:
            for p in sorted((self.root / split).rglob("zarr.json")) + [self.root / split / "rows.parquet"]:
                meta[p.relative_to(self.root).as_posix()] = file_digest(p)
        manifest = {**self.plan, "shards": shards, "metadata_files": meta, "stats": stats}
        manifest["digest"] = manifest_digest(manifest)
        atomic_write_json(self.root / MANIFEST, manifest)
        shutil.rmtree(self.work, ignore_errors=True)
        return manifest


# ---------------------------------------------------------------------------------------------
# reading


def read_manifest(root: str | Path | Storage) -> dict:
    """The manifest of a finished cache (local path, URL or Storage); refuses unfinished, foreign or
    newer-format caches."""
    st = root if isinstance(root, Storage) else Storage(root)
    where = st.location
    if not st.exists(MANIFEST):
        if st.has(WORK_DIR):
            raise CacheError(f"{where} is an unfinished cache (no {MANIFEST}; a capture is running or was "
                             "interrupted: rerun the same teacher-cache command to resume)")
        raise CacheError(f"{where} is not a teacher cache (no {MANIFEST})")
    try:
        manifest = json.loads(st.read_bytes(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{where}/{MANIFEST} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise CacheError(f"{where}/{MANIFEST}: format is {fmt!r}, not {FORMAT_NAME!r}")
    major = str(manifest.get("format_version", "")).split(".")[0]
    if major != FORMAT_VERSION.split(".")[0]:
        raise CacheError(f"{where}/{MANIFEST}: format version {manifest.get('format_version')} is not readable by "
                         f"this version (reads {FORMAT_VERSION.split('.')[0]}.x)")
    return manifest


def manifest_files(manifest: dict) -> dict[str, dict]:
    """Every file a finished cache holds but its manifest: {relative path: {bytes, sha256}}."""
    files = dict(manifest["metadata_files"])
    for sh in manifest["shards"]:
        files.update(sh["files"])
    return files


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
            return key in cache.files or await super().exists(key)

    cache.mirror.mkdir(parents=True, exist_ok=True)
    return MirrorStore(cache.mirror, read_only=True)


class Cache:
    """Read access to a finished cache on local disk or at any fsspec URL.

    A remote cache is read through a local mirror folder (`mirror`, default `default_mirror`):
    each file is fetched the first time it is needed and its sha256 checked against the manifest
    as it arrives, so every shard a student reads is verified once, and read from disk after.
    """

    def __init__(self, root: str | Path | Storage, mirror: str | Path | None = None):
        self.storage = root if isinstance(root, Storage) else Storage(root)
        self.remote = not self.storage.is_local
        self.root: Path | str = self.storage.location if self.remote else self.storage.local_path()
        self.manifest = read_manifest(self.storage)
        self.files = manifest_files(self.manifest)
        self.mirror = Path(mirror) if mirror else default_mirror(self.storage.location, self.manifest["digest"])

    def __getstate__(self):  # DataLoader workers: the fsspec filesystem is rebuilt from the location
        return {k: v for k, v in self.__dict__.items() if k != "storage"} | {"location": self.storage.location}

    def __setstate__(self, state):
        self.storage = Storage(state.pop("location"))
        self.__dict__.update(state)

    def local_file(self, rel: str, missing_ok: bool = False) -> Path | None:
        """A local path holding `rel`: the file itself on local disk, else the mirror's verified copy."""
        if not self.remote:
            return self.storage.local_path(rel)
        dest = self.mirror / rel
        if not dest.exists():
            if rel not in self.files:
                if missing_ok:
                    return None
                raise CacheError(f"{self.root}: {rel} is not a file of this cache")
            fetch_verified(self.storage, rel, self.files[rel], dest)
        return dest

    def tokenizer(self):
        """The tokenizer the rows were made with, from the cache itself; checked against the manifest."""
        from transformers import AutoTokenizer

        for rel in self.files:
            if rel.startswith(TOKENIZER_DIR + "/"):
                self.local_file(rel)
        folder = self.local_file(TOKENIZER_DIR) if not self.remote else self.mirror / TOKENIZER_DIR
        tok = AutoTokenizer.from_pretrained(folder)
        if tokenizer_fingerprint(tok) != self.manifest["tokenizer"]["fingerprint"]:
            raise CacheError(f"{self.root}/{TOKENIZER_DIR}: tokenizer does not match the manifest's fingerprint")
        return tok

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def rows(self, split: str, columns: list[str] | None = None, max_rows: int | None = None) -> pa.Table:
        """The split's rows.parquet (or some columns of its first `max_rows` rows)."""
        self._check_split(split)
        path = self.local_file(f"{split}/rows.parquet")
        if max_rows is None:
            return pq.read_table(path, columns=columns)
        batches = pq.ParquetFile(path).iter_batches(batch_size=max_rows, columns=columns)
        return pa.Table.from_batches([next(batches)])

    def array(self, split: str, field: str):
        import zarr

        self._check_split(split)
        if field not in self.manifest["fields"] or self.manifest["fields"][field]["format"] != "zarr-v3":
            raise CacheError(f"{self.root}: no dense field {field!r} (has: {', '.join(self.dense_fields)})")
        if not self.remote:
            return zarr.open_array(str(self.storage.local_path(f"{split}/{field}")), mode="r")
        return zarr.open_array(store=_mirror_store(self), path=f"{split}/{field}", mode="r")

    @property
    def dense_fields(self) -> list[str]:
        return [k for k, v in self.manifest["fields"].items() if v["format"] == "zarr-v3"]

    def _check_split(self, split: str) -> None:
        if split not in self.manifest["splits"]:
            raise CacheError(f"{self.root}: no split {split!r} (has: {', '.join(self.splits)})")


def verify(root: str | Path | Storage) -> list[str]:
    """Recompute every checksum (streamed) wherever the cache lives; one line per problem: a changed,
    missing or unlisted file, or an edited manifest (empty: the cache is intact)."""
    st = root if isinstance(root, Storage) else Storage(root)
    manifest = read_manifest(st)
    problems = []
    if manifest.get("digest") != manifest_digest(manifest):
        problems.append(f"{MANIFEST}: contents do not match its digest (the manifest was edited or damaged)")
    expected: dict[str, tuple[str, dict]] = {}
    for sh in manifest["shards"]:
        for rel, dig in sh["files"].items():
            expected[rel] = (f"shard {sh['split']}/{sh['index']} (rows {sh['row_start']}-{sh['row_end']})", dig)
    for rel, dig in manifest["metadata_files"].items():
        expected[rel] = ("metadata", dig)
    try:
        present = st.files()
    except StorageError:  # a web server without directory listings: check the listed files one by one
        present = None
    bad_shards: dict[str, list[str]] = {}
    for rel, (owner, dig) in expected.items():
        if present is not None and rel not in present or present is None and not st.exists(rel):
            bad_shards.setdefault(owner, []).append(f"{rel} missing")
            continue
        size = None if present is None else present[rel]
        got = st.digest(rel) if size in (None, dig["bytes"]) else {"bytes": size}
        if got != dig:
            what = "size" if got["bytes"] != dig["bytes"] else "checksum"
            bad_shards.setdefault(owner, []).append(f"{rel} {what} mismatch")
    for owner, items in bad_shards.items():
        problems.append(f"{owner}: " + "; ".join(items))
    for rel in sorted(set(present or ()) - set(expected) - {MANIFEST}):
        problems.append(f"{rel}: a file the manifest does not list")
    return problems
