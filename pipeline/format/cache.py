"""The teacher cache on disk: layout, writer, reader and verification (FORMAT.md is the spec).

    CACHE/
      manifest.json          written last, atomically: a cache without it is unfinished
      _capture/              only while a capture runs or after it was killed
        plan.json              the settings the partial cache was started with
        commits/<split>-<shard>.json   one per committed shard (files, sizes, sha256)
      tokenizer/             the teacher's tokenizer (save_pretrained: JSON and text files)
      <split>/               "train", "validation": the split's first part
        rows.parquet           key, input_ids, length per row (row order = array order)
        zarr.json              a Zarr v3 group; one array per field, sharded along rows
        <field>/zarr.json, <field>/c/<shard>/0/...
        grow-NNNN/             a part each append added, laid out like the split folder

CACHE is a local path or any fsspec URL; every byte goes through `Storage`. A shard (`rows_per_shard`
rows of every field) is written at once, checksummed (on object storage: read back) and then
committed by writing its record (on local disk: renamed into place); a shard without a record is
redone. On local disk the one writer holds an exclusive flock on CACHE itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .storage import Storage, StorageError, fetch_verified, stream_digest

# zarr-python warns on every open of a numcodecs-coded array that other Zarr implementations may not read
# it; FORMAT.md says what reads the pcodec fields, once
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

FORMAT_NAME = "teacher-cache"
FORMAT_VERSION = "1.3"
GROWN_FORMAT_VERSION = "2.0"  # a cache with more than one part: a 1.x reader would see its first part only
READABLE_MAJORS = ("1", "2")
MANIFEST = "manifest.json"
WORK_DIR = "_capture"
TOKENIZER_DIR = "tokenizer"
HEAD_FILE = "lm_head.safetensors"  # capture.final_hidden: the teacher's LM head, once per cache


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
    encoding: str | None = None  # "bfloat16-bits": uint16 holding bfloat16 bit patterns; "int8-scaled"
    codec: str = "zstd"  # "zstd", or "pcodec" (numcodecs' PCodec at `level`: lossless, numeric)
    level: int | None = None  # the codec's level; None: the capture's compression_level

    @property
    def bytes_per_row(self) -> int:
        return int(np.prod(self.tail)) * np.dtype(self.dtype).itemsize

    def to_dict(self, split_rows: dict[str, int], chunk_rows: int, shard_rows: int) -> dict:
        d = {
            "path": "{part}/" + self.name,
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
        if self.codec != "zstd":
            d["codec"] = self.codec
        return d

    def compressors(self, zstd_level: int) -> dict:
        """create_array keywords: the field's codecs."""
        from zarr.codecs import ZstdCodec

        if self.codec == "pcodec":
            try:
                from zarr.codecs.numcodecs import PCodec  # zarr >= 3.1.3
            except ImportError:
                from numcodecs.zarr3 import PCodec

            return {"serializer": PCodec(level=self.level if self.level is not None else 8), "compressors": None}
        level = self.level if self.level is not None else zstd_level
        return {"compressors": [ZstdCodec(level=level)] if level else None}


# pcodec levels of the top-K fields, measured on the default cache (README, "Cache size"): the ids at 12
# (entropy coding of 16/32-bit symbols; 8 gives 108 B/token, 12 gives 98-101), the sorted log-probs at 8
# (pcodec's delta modes; 12 gains nothing)
TOPK_LEVELS = {"topk_ids": 12, "topk_logprobs": 8, "sample_ids": 12, "sample_counts": 8, "sample_logprobs": 8}
ID_DTYPE_LIMIT = 65536  # vocabularies up to this size store ids as uint16


def id_dtype(vocab_size: int) -> str:
    """The narrowest integer type that holds every id of a vocabulary (LM-head rows, padding included)."""
    return "uint16" if vocab_size <= ID_DTYPE_LIMIT else "int32"


def field_specs(*, seq_len: int, top_k: int, n_temperatures: int, hidden: tuple[int, int] | None,
                hidden_dtype: str, attention: tuple[int, int] | None, vocab_size: int | None = None,
                topk_codec: str = "zstd", samples: int = 0, final_hidden: tuple[int, str] | None = None,
                classes: int | None = None, per_token: bool = False) -> list[FieldSpec]:
    """The dense fields a capture writes; `hidden` = (n_layers, width), `attention` = (n_layers, heads kept),
    `final_hidden` = (width, dtype). `topk_codec` "zstd" with `vocab_size` None writes the 1.2 layout
    (int32 ids, zstd); "pcodec" writes ids in the narrowest type and the K-wide fields with pcodec.
    `classes` C: a classification teacher's fields instead of the next-token ones, per row or (`per_token`)
    per position."""
    L, K = seq_len, top_k
    pc = topk_codec == "pcodec"
    ids = id_dtype(vocab_size) if (pc and vocab_size) else "int32"

    def wide(name, dtype, desc, n):
        return FieldSpec(name, ("row", "position", "k" if name.startswith("topk") else "slot"), (L, n), dtype, desc,
                         codec="pcodec" if pc else "zstd", level=TOPK_LEVELS[name] if pc else None)

    if classes:
        pos_dims, pos_tail, where = (("position",), (L,), "per position") if per_token else ((), (), "per row")
        specs = [
            FieldSpec("class_logprobs", ("row", *pos_dims, "class"), (*pos_tail, classes), "float32",
                      f"teacher log-probabilities of every class at T=1, {where} (class ids as in the manifest's task)"),
            FieldSpec("class_logsumexp", ("row", *pos_dims), pos_tail, "float32",
                      f"logsumexp of the teacher's class logits at T=1, {where}: logit = log p + logsumexp"),
        ]
        if n_temperatures:
            specs.append(FieldSpec("class_logsumexp_tempered", ("row", "temperature", *pos_dims),
                                   (n_temperatures, *pos_tail), "float32",
                                   "logsumexp(z / T) of the class logits per extra temperature"))
        return specs + _representation_specs(L, hidden, hidden_dtype, attention)

    specs = [
        wide("topk_ids", ids, "ids of the K most likely next tokens, most likely first", K),
        wide("topk_logprobs", "float16", "teacher log-probabilities of topk_ids at T=1", K),
        FieldSpec("logsumexp", ("row", "position"), (L,), "float32",
                  "logsumexp of the teacher logits at T=1: log p(i) = z_i - logsumexp"),
        FieldSpec("target_logprob", ("row", "position"), (L,), "float32",
                  "teacher log-probability of the actual next token; NaN where there is none"),
    ]
    if n_temperatures:
        specs.append(FieldSpec("logsumexp_tempered", ("row", "temperature", "position"), (n_temperatures, L),
                               "float32", "logsumexp(z / T) per extra temperature: log p_T(i) = z_i / T - value"))
    if samples:
        specs += [
            wide("sample_ids", ids,
                 "distinct ids drawn from the proposal, ascending; slots past the distinct ones hold 0", samples),
            wide("sample_counts", "uint16",
                 "times each id was drawn (they sum to capture.samples); 0 marks an empty slot", samples),
            wide("sample_logprobs", "float16", "teacher log-probabilities of sample_ids at T=1", samples),
        ]
    hidden_specs = _representation_specs(L, hidden, hidden_dtype, None)
    specs += hidden_specs
    if final_hidden:
        d, dtype = final_hidden
        specs.append(FieldSpec("final_hidden", ("row", "position", "hidden"), (L, d),
                               "uint16" if dtype == "bfloat16" else dtype,
                               "the teacher's last hidden state (after the final norm): logits = lm_head(value)",
                               "bfloat16-bits" if dtype == "bfloat16" else None))
    return specs + _representation_specs(L, None, hidden_dtype, attention)


def _representation_specs(L: int, hidden: tuple[int, int] | None, hidden_dtype: str,
                          attention: tuple[int, int] | None) -> list[FieldSpec]:
    specs = []
    if hidden:
        n, d = hidden
        bits, q8 = hidden_dtype == "bfloat16", hidden_dtype == "int8"
        specs.append(FieldSpec("hidden_states", ("row", "layer", "position", "hidden"), (n, L, d),
                               "uint16" if bits else "int8" if q8 else "float16", "hidden states of the selected layers",
                               "bfloat16-bits" if bits else "int8-scaled" if q8 else None))
        if q8:
            specs.append(FieldSpec("hidden_scale", ("row", "layer", "position"), (n, L), "float32",
                                   "per-position scale of hidden_states: value = int8 * scale (max |h| / 127)"))
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


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def manifest_digest(manifest: dict) -> str:
    return sha256_bytes(canonical({k: v for k, v in manifest.items() if k != "digest"}).encode())


# capture settings 1.3 added, as every earlier cache was made
LEGACY_CAPTURE = {"samples": 0, "sample_temperature": 1.0, "sample_seed": 0, "final_hidden": False,
                  "final_hidden_dtype": "float16", "topk_codec": "zstd"}


def current_layout(plan: dict) -> dict:
    """A 1.0-1.2 manifest or plan (or a 2.0 one grown before 1.3) described as this version writes it
    (1.2: one part per split, field paths per part; 1.3: capture modes and codecs, off in earlier ones).
    The bytes on disk are the same; only the description changed."""
    out = dict(plan)
    if isinstance(out.get("capture"), dict):
        out["capture"] = {**LEGACY_CAPTURE, **out["capture"]}
    if out.get("format_version") in ("1.0", "1.1"):
        out["fields"] = {k: {**f, "path": f["path"].replace("{split}", "{part}")} for k, f in out["fields"].items()}
        out["splits"] = {s: {**v, "parts": [{"path": s, "row_start": 0, "rows": v["rows"], "tokens": v["tokens"],
                                              "shards": v["shards"]}]} for s, v in out["splits"].items()}
    if out.get("format_version") in ("1.0", "1.1", "1.2"):
        out["format_version"] = FORMAT_VERSION
    return out


def manifest_plan(manifest: dict) -> dict:
    """The plan a finished cache was written from: its manifest less shards, metadata_files, stats, digest."""
    return {k: v for k, v in manifest.items() if k not in ("shards", "metadata_files", "stats", "digest")}


def shard_file(part: str, field: FieldSpec, shard: int) -> str:
    """The file of shard `shard` (counted within the part) of one field."""
    return "/".join([part, field.name, "c", str(shard)] + ["0"] * len(field.tail))


GROW_DIR = "grow-"


def part_path(split: str, number: int) -> str:
    """Where part `number` of a split lives: the split's folder for the first, a subfolder for each append."""
    return split if number == 0 else f"{split}/{GROW_DIR}{number:04d}"


def split_parts(manifest: dict, split: str) -> list[dict]:
    """A split's parts in row order, each {"path", "rows", "row_start", ...}. A split's rows are its parts'
    rows one after the other; a cache never grown (and any 1.0/1.1 cache) has one part, the split's folder."""
    info = manifest["splits"][split]
    parts = info.get("parts") or [{"path": split, "rows": info["rows"], "row_start": 0}]
    return [dict(p) for p in parts]


def split_shards(manifest: dict, split: str) -> list[tuple[int, int]]:
    """(row_start, row_end) of each shard of a split, in row order (rows numbered across parts)."""
    return sorted((sh["row_start"], sh["row_end"]) for sh in manifest["shards"] if sh["split"] == split)


def file_owner(manifest: dict, rel: str) -> tuple[str | None, str | None]:
    """(split, dense field) a cache file belongs to: (None, None) for cache-wide files (tokenizer/),
    (split, None) for a part's rows.parquet and group metadata."""
    for split in manifest["splits"]:
        for p in sorted(split_parts(manifest, split), key=lambda p: -len(p["path"])):
            if rel.startswith(p["path"] + "/"):
                rest = rel[len(p["path"]) + 1:].split("/")
                return split, (rest[0] if len(rest) > 1 else None)
    return None, None


def shard_ranges(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_rows, n_rows)) for s in range(0, n_rows, shard_rows)]


# ---------------------------------------------------------------------------------------------
# writing


def read_commits(root: Path | Storage) -> dict[tuple[str, int], dict]:
    """The commit records of an unfinished capture at `root`: {(split, shard index): record}."""
    st = root if isinstance(root, Storage) else Storage(root)
    out = {}
    for rel in st.glob(f"{WORK_DIR}/commits/*.json"):
        rec = json.loads(st.read_bytes(rel))
        out[(rec["split"], rec["index"])] = rec
    return out


def write_json(st: Storage, rel: str, obj: dict) -> None:
    """A JSON file written at once: on local disk through a temporary name, fsynced, renamed."""
    st.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def zarr_store(st: Storage, rel: str):
    """The zarr store a writer uses for a folder of the cache: a LocalStore on local disk, else an FsspecStore."""
    from zarr.storage import FsspecStore, LocalStore

    if st.is_local:
        return LocalStore(st.local_path(rel))
    return FsspecStore.from_url(st.location + "/" + rel, storage_options=st.options or None)


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
    if getattr(rows, "labels", None) is not None:  # classification: a class id per row, or per position (-100: none)
        labels = rows.labels.astype(np.int32)
        cols["labels"] = fixed(labels, pa.int32()) if labels.ndim == 2 else pa.array(labels, type=pa.int32())
    pq.write_table(pa.table(cols), path, compression="zstd")


def row_column(table: pa.Table, name: str, dtype) -> np.ndarray:
    """A fixed-size-list column of rows.parquet as an (N, L) array."""
    col = table.column(name).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(len(col), -1)


class CacheWriter:
    """Creates a cache's arrays, writes and commits shards, and finalizes the manifest.

    `plan` holds every setting and identity that determines the cache's bytes (the manifest less
    shards, metadata_files and stats); resuming with a different plan is refused by the caller
    before a writer is made. The writer fills the last part of each split in `split_rows`
    (`plan["splits"][split]["parts"][-1]`): the split's folder for a new cache, a new
    `<split>/grow-NNNN` folder when `base` (the finished manifest being grown) is given. Nothing
    `base` lists is touched, so its readers keep reading it until the new manifest replaces it.
    """

    def __init__(self, root: Path | Storage, plan: dict, specs: list[FieldSpec], split_rows: dict[str, int],
                 base: dict | None = None):
        self.st = root if isinstance(root, Storage) else Storage(root)
        self.root = self.st.location
        self.plan = plan
        self.specs = specs
        self.split_rows = split_rows
        self.base = base
        self.chunk_rows = plan["capture"]["rows_per_chunk"]
        self.shard_rows = plan["capture"]["rows_per_shard"]
        self.level = plan["capture"]["compression_level"]
        self.parts = {}
        for split in split_rows:
            parts = plan["splits"][split]["parts"]
            self.parts[split] = {**parts[-1], "shard_start": sum(p["shards"] for p in parts[:-1])}
        self._arrays: dict[tuple[str, str], object] = {}

    # -- setup ------------------------------------------------------------------------------
    def create_arrays(self) -> None:
        """Create (or open, when resuming) every written part's group and arrays."""
        import zarr

        for split, n in self.split_rows.items():
            part = self.parts[split]["path"]
            store = zarr_store(self.st, part)
            if self.st.exists(f"{part}/zarr.json"):
                group = zarr.open_group(store, mode="r+")
            else:
                group = zarr.create_group(store, attributes={"split": split, "format": FORMAT_NAME})
            for spec in self.specs:
                if self.st.exists(f"{part}/{spec.name}/zarr.json"):
                    arr = group[spec.name]
                else:
                    arr = group.create_array(
                        spec.name,
                        shape=(n, *spec.tail),
                        dtype=spec.dtype,
                        chunks=(self.chunk_rows, *spec.tail),
                        shards=(self.shard_rows, *spec.tail),
                        **spec.compressors(self.level),
                        fill_value=0,
                        dimension_names=spec.dims,
                        attributes={"description": spec.description, **({"encoding": spec.encoding}
                                                                         if spec.encoding else {})},
                        config={"write_empty_chunks": True},
                    )
                self._arrays[(split, spec.name)] = arr

    def committed(self) -> dict[tuple[str, int], dict]:
        """{(split, shard index within the written part): record} of the shards committed so far."""
        return {(s, rec["index"] - self.parts[s]["shard_start"]): rec for (s, _), rec in read_commits(self.st).items()
                if s in self.parts and rec.get("part", s) == self.parts[s]["path"]}

    # -- shards -----------------------------------------------------------------------------
    def write_shard(self, split: str, index: int, targets, stats: dict) -> dict:
        """Write shard `index` (within the part) of every field, checksum its files, commit it."""
        part = self.parts[split]
        start, end = shard_ranges(self.split_rows[split], self.shard_rows)[index]
        fields = targets.fields()
        for spec in self.specs:
            data = fields[spec.name]
            if data.shape != (end - start, *spec.tail):
                raise CacheError(f"shard {split}/{index}: {spec.name} has shape {data.shape}, "
                                 f"expected {(end - start, *spec.tail)}")
            if data.dtype != np.dtype(spec.dtype):  # ids and counts narrowed to the field's type: check the range
                info = np.iinfo(spec.dtype) if np.dtype(spec.dtype).kind in "iu" else None
                if info is None or data.size and (data.min() < info.min or data.max() > info.max):
                    raise CacheError(f"shard {split}/{index}: {spec.name} holds {data.dtype} values that "
                                     f"{spec.dtype} cannot store")
                data = data.astype(spec.dtype)
            self._arrays[(split, spec.name)][start:end] = data
        files = {}
        for spec in self.specs:
            rel = shard_file(part["path"], spec, index)
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
        write_json(self.st, f"{WORK_DIR}/commits/{split}-{g:05d}.json", rec)
        return rec

    # -- the end ----------------------------------------------------------------------------
    def finalize(self, stats: dict) -> dict:
        """Check every shard is committed, write manifest.json (replacing `base`'s), drop the work folder."""
        commits = self.committed()
        missing = [(s, i) for s, n in self.split_rows.items()
                   for i in range(len(shard_ranges(n, self.shard_rows))) if (s, i) not in commits]
        if missing:
            raise CacheError(f"cannot finalize {self.root}: shards not committed: {missing}")
        order = list(self.plan["splits"])
        shards = [{k: rec[k] for k in ("split", "part", "index", "row_start", "row_end", "files")}
                  for rec in commits.values()]
        older = [{**sh, "part": sh.get("part", sh["split"])} for sh in (self.base or {}).get("shards", [])]  # 1.0/1.1
        shards = sorted(older + shards,
                        key=lambda sh: (order.index(sh["split"]), sh["index"]))
        meta = dict(self.base["metadata_files"]) if self.base else {}
        written = [] if self.base else sorted(r for r in self.st.files()
                                              if r.startswith(TOKENIZER_DIR + "/") or r == HEAD_FILE)
        for split in self.split_rows:
            folder = self.parts[split]["path"]
            written += [f"{folder}/zarr.json", f"{folder}/rows.parquet"] + [f"{folder}/{spec.name}/zarr.json"
                                                                            for spec in self.specs]
        for rel in written:
            meta[rel] = self.st.digest(rel)
            if self.st.is_local:
                sync_file(self.st.local_path(rel))
        if self.st.is_local:
            for d in {self.st.local_path(rel).parent for rel in written}:
                sync_file(d)  # everything the manifest lists is on disk before the manifest is
        manifest = {**self.plan, "shards": shards, "metadata_files": meta, "stats": stats}
        manifest["digest"] = manifest_digest(manifest)
        write_json(self.st, MANIFEST, manifest)
        self.st.remove_tree(WORK_DIR)
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
    if major not in READABLE_MAJORS:
        raise CacheError(f"{where}/{MANIFEST}: format version {manifest.get('format_version')} is not readable by "
                         f"this version (reads {', '.join(m + '.x' for m in READABLE_MAJORS)})")
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
    """Read access to a finished cache on local disk or at any fsspec URL.

    A remote cache is read through a local mirror folder (`mirror`, default `default_mirror`):
    each file is fetched the first time it is needed and its sha256 checked against the manifest
    as it arrives, so every shard a student reads is verified once, and read from disk after.
    """

    def __init__(self, root: str | Path | Storage, mirror: str | Path | None = None,
                 storage_options: dict | None = None):
        self._storage = root if isinstance(root, Storage) else Storage(root, storage_options)
        self._pid = os.getpid()
        self.remote = not self.storage.is_local
        self.root: Path | str = self.storage.location if self.remote else self.storage.local_path()
        self.manifest = read_manifest(self.storage)
        self.files = manifest_files(self.manifest)
        self.mirror = Path(mirror) if mirror else default_mirror(self.storage.location, self.manifest["digest"])

    @property
    def storage(self) -> Storage:
        """The cache's storage; a forked or spawned DataLoader worker gets a filesystem instance of its own."""
        if self._pid != os.getpid():
            self._storage = Storage(self._storage.location, self._storage.options, fresh=True)
            self._pid = os.getpid()
        return self._storage

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_storage"} | {
            "location": self._storage.location, "storage_options": self._storage.options, "_pid": None}

    def __setstate__(self, state):
        self._storage = Storage(state.pop("location"), state.pop("storage_options"), fresh=True)
        self.__dict__.update(state)
        self._pid = os.getpid()

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

    def parts(self, split: str) -> list[dict]:
        self._check_split(split)
        return split_parts(self.manifest, split)

    def shard_ranges(self, split: str) -> list[tuple[int, int]]:
        """(row_start, row_end) of each shard of the split, rows numbered across its parts."""
        self._check_split(split)
        return split_shards(self.manifest, split)

    def rows(self, split: str, columns: list[str] | None = None, max_rows: int | None = None) -> pa.Table:
        """The split's rows (every part's rows.parquet, in order), or some columns of its first `max_rows`."""
        tables, left = [], max_rows
        for part in self.parts(split):
            path = self.local_file(f"{part['path']}/rows.parquet")
            if left is None:
                tables.append(pq.read_table(path, columns=columns))
                continue
            batches = pq.ParquetFile(path).iter_batches(batch_size=left, columns=columns)
            tables.append(pa.Table.from_batches([next(batches)]))
            left -= tables[-1].num_rows
            if left <= 0:
                break
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)

    def array(self, split: str, field: str):
        """A dense field of a split: a zarr array (a `PartsArray` over them when the cache grew)."""
        import zarr

        parts = self.parts(split)
        if field not in self.manifest["fields"] or self.manifest["fields"][field]["format"] != "zarr-v3":
            raise CacheError(f"{self.root}: no dense field {field!r} (has: {', '.join(self.dense_fields)})")
        store = None if not self.remote else _mirror_store(self)
        arrays = [zarr.open_array(str(self.storage.local_path(f"{p['path']}/{field}")), mode="r") if store is None
                  else zarr.open_array(store=store, path=f"{p['path']}/{field}", mode="r") for p in parts]
        return arrays[0] if len(arrays) == 1 else PartsArray(arrays)

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
    appending = present is not None and f"{WORK_DIR}/plan.json" in present
    for rel in sorted(set(present or ()) - set(expected) - {MANIFEST}):
        if appending and (rel.startswith(WORK_DIR + "/") or f"/{GROW_DIR}" in rel):
            continue  # an append under way: its files join the manifest when it finishes
        problems.append(f"{rel}: a file the manifest does not list")
    return problems
