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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> dict:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": sha256_bytes(data)}


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
        out = {}
        for p in sorted((self.work / "commits").glob("*.json")):
            rec = json.loads(p.read_text())
            out[(rec["split"], rec["index"])] = rec
        return out

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


def read_manifest(root: str | Path) -> dict:
    """The manifest of a finished cache; refuses unfinished, foreign or newer-format caches."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        if (root / WORK_DIR).is_dir():
            raise CacheError(f"{root} is an unfinished cache (no {MANIFEST}; a capture is running or was "
                             "interrupted: rerun the same teacher-cache command to resume)")
        raise CacheError(f"{root} is not a teacher cache (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{path}: format is {manifest.get('format')!r}, not {FORMAT_NAME!r}")
    major = str(manifest.get("format_version", "")).split(".")[0]
    if major != FORMAT_VERSION.split(".")[0]:
        raise CacheError(f"{path}: format version {manifest.get('format_version')} is not readable by this "
                         f"version (reads {FORMAT_VERSION.split('.')[0]}.x)")
    return manifest


class Cache:
    """Read access to a finished cache."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)

    def tokenizer(self):
        """The tokenizer the rows were made with, from the cache itself; checked against the manifest."""
        from transformers import AutoTokenizer

        from .teacher import tokenizer_fingerprint

        tok = AutoTokenizer.from_pretrained(self.root / TOKENIZER_DIR)
        if tokenizer_fingerprint(tok) != self.manifest["tokenizer"]["fingerprint"]:
            raise CacheError(f"{self.root / TOKENIZER_DIR}: tokenizer does not match the manifest's fingerprint")
        return tok

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def rows(self, split: str) -> pa.Table:
        self._check_split(split)
        return pq.read_table(self.root / split / "rows.parquet")

    def array(self, split: str, field: str):
        import zarr

        self._check_split(split)
        if field not in self.manifest["fields"] or self.manifest["fields"][field]["format"] != "zarr-v3":
            raise CacheError(f"{self.root}: no dense field {field!r} (has: {', '.join(self.dense_fields)})")
        return zarr.open_array(str(self.root / split / field), mode="r")

    @property
    def dense_fields(self) -> list[str]:
        return [k for k, v in self.manifest["fields"].items() if v["format"] == "zarr-v3"]

    def _check_split(self, split: str) -> None:
        if split not in self.manifest["splits"]:
            raise CacheError(f"{self.root}: no split {split!r} (has: {', '.join(self.splits)})")


def verify(root: str | Path) -> list[str]:
    """Recompute every checksum; returns one line per problem (empty: the cache is intact)."""
    root = Path(root)
    manifest = read_manifest(root)
    problems = []
    if manifest.get("digest") != manifest_digest(manifest):
        problems.append(f"{MANIFEST}: contents do not match its digest (the manifest was edited or damaged)")
    expected: dict[str, tuple[str, dict]] = {}
    for sh in manifest["shards"]:
        for rel, dig in sh["files"].items():
            expected[rel] = (f"shard {sh['split']}/{sh['index']} (rows {sh['row_start']}-{sh['row_end']})", dig)
    for rel, dig in manifest["metadata_files"].items():
        expected[rel] = ("metadata", dig)
    bad_shards: dict[str, list[str]] = {}
    for rel, (owner, dig) in expected.items():
        p = root / rel
        if not p.is_file():
            bad_shards.setdefault(owner, []).append(f"{rel} missing")
            continue
        got = file_digest(p)
        if got != dig:
            what = "size" if got["bytes"] != dig["bytes"] else "checksum"
            bad_shards.setdefault(owner, []).append(f"{rel} {what} mismatch")
    for owner, items in bad_shards.items():
        problems.append(f"{owner}: " + "; ".join(items))
    return problems
