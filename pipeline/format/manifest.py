"""`Manifest`: the one type through which a cache's manifest (or a capture's plan) is read.

A manifest is a JSON document (docs/format.md, "manifest.json"). `Manifest.from_dict` takes any layout
this version reads (1.0 to 3.0) and describes it as this version writes it (`migrate`): the bytes
on disk are the same, only the description changes, so no reader needs to know the older layouts. Since
3.0 the shards' files are listed in one index file per part (`index.py`), named by `shard_index`; an
older manifest lists them itself (`shards`), and `legacy_shards` hands that list to the index reader.
The typed accessors (`teacher`, `task`, `capture`, `splits`, `parts`, `fields`, `shards`, `stats`,
...) are the vocabulary every module uses; `to_dict` gives the document back.

A capture's plan is a manifest without `shard_index`, `metadata_files`, `stats` and `digest`
(`finished` is False). Nothing here imports torch or transformers.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Mapping

from ..errors import CacheError
from .records import (Capture, Field, FileDigest, Growth, Imported, IndexFile, Part, Preparation, Split, Stats,
                      Subset, Task, Teacher, Tokenizer, record)

FORMAT_NAME = "teacher-cache"
FORMAT_VERSION = "4.0"  # 4.0: topk_ids as frequency codes (a 3.x reader would read codes as ids: it must refuse),
# and bounded-error log-probs (capture.logprob_precision, stats.logprob_kl); 3.0: the shard index
READABLE_MAJORS = ("1", "2", "3", "4")
FINISHED_ONLY = ("shards", "shard_index", "metadata_files", "stats", "digest")  # what a plan lacks

# capture settings added since 1.3, as every earlier cache was made
LEGACY_CAPTURE = {"samples": 0, "sample_temperature": 1.0, "sample_seed": 0, "final_hidden": False,
                  "final_hidden_dtype": "float16", "topk_codec": "zstd", "hidden_codec": "zstd",
                  "logprob_precision": None, "topk_ids_encoding": "ids"}


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def manifest_digest(document: Mapping) -> str:
    """sha256 of the canonical JSON of a manifest document without its `digest`."""
    return hashlib.sha256(canonical({k: v for k, v in document.items() if k != "digest"}).encode()).hexdigest()


def migrate(document: dict) -> dict:
    """A 1.0-2.0 manifest or plan described as this version writes it (1.2: one part per split, field paths per
    part; 1.3: capture modes and codecs, off in earlier ones; 3.0: the shard index, where an older manifest
    keeps its `shards` list)."""
    out = dict(document)
    if isinstance(out.get("capture"), dict):
        out["capture"] = {**LEGACY_CAPTURE, **out["capture"]}
    if out.get("format_version") in ("1.0", "1.1"):
        out["fields"] = {k: {**f, "path": f["path"].replace("{split}", "{part}")} for k, f in out["fields"].items()}
        out["splits"] = {s: {**v, "parts": [{"path": s, "row_start": 0, "rows": v["rows"], "tokens": v["tokens"],
                                              "shards": v["shards"]}]} for s, v in out["splits"].items()}
    if out.get("format_version") != FORMAT_VERSION:
        out["format_version"] = FORMAT_VERSION
    return out


# ---------------------------------------------------------------------------------------------
# the manifest


@dataclass(frozen=True, eq=False)
class Manifest:
    """A finished cache's manifest, or a capture's plan; build with `from_dict`."""

    document: Mapping  # the migrated document: nobody changes it (to_dict returns a copy to edit)
    recorded_version: str  # the format version the document was written with

    @classmethod
    def from_dict(cls, document: Mapping, where: str = "manifest") -> "Manifest":
        """Any layout this version reads, described as it writes it; refuses foreign or newer documents. The
        document is kept as it is, not copied (a large cache's manifest is large): hand over one that nobody
        changes afterwards, and edit `to_dict()`'s copy instead."""
        if not isinstance(document, Mapping) or document.get("format") != FORMAT_NAME:
            fmt = document.get("format") if isinstance(document, Mapping) else None
            raise CacheError(f"{where}: format is {fmt!r}, not {FORMAT_NAME!r}")
        version = str(document.get("format_version", ""))
        if version.split(".")[0] not in READABLE_MAJORS:
            raise CacheError(f"{where}: format version {version or None} is not readable by this version (reads "
                             f"{', '.join(m + '.x' for m in READABLE_MAJORS)})")
        return cls(MappingProxyType(migrate(dict(document))), version)

    def to_dict(self) -> dict:
        return copy.deepcopy(dict(self.document))

    def plan(self) -> dict:
        """The document less what only a finished cache has (shards, metadata_files, stats, digest)."""
        return {k: copy.deepcopy(v) for k, v in self.document.items() if k not in FINISHED_ONLY}

    def __eq__(self, other) -> bool:
        return isinstance(other, Manifest) and dict(self.document) == dict(other.document)

    def __reduce__(self):  # pickled as its plain document (ranks hand manifests to each other)
        return _restored, (dict(self.document), self.recorded_version)

    __hash__ = None

    # -- identity ------------------------------------------------------------------------------
    @property
    def format_version(self) -> str:
        return self.document["format_version"]

    @property
    def digest(self) -> str | None:
        return self.document.get("digest")

    @property
    def finished(self) -> bool:
        return "digest" in self.document

    @cached_property
    def teacher(self) -> Teacher:
        return record(Teacher, self.document["teacher"])

    @cached_property
    def tokenizer(self) -> Tokenizer:
        t = self.document["tokenizer"]
        return record(Tokenizer, {**t, "class_name": t.get("class")})

    @cached_property
    def task(self) -> Task:
        t = self.document.get("task")
        if not t:
            return Task()
        return record(Task, {**t, "labels": tuple(t["labels"])})

    @cached_property
    def capture(self) -> Capture:
        c = self.document["capture"]
        return record(Capture, {**c, "temperatures": tuple(c["temperatures"]),
                                 "hidden_layers": tuple(c["hidden_layers"]),
                                 "attention_layers": tuple(c["attention_layers"])},
                       raw=dict(c))

    @cached_property
    def preparation(self) -> Preparation:
        return record(Preparation, self.document["preparation"], raw=dict(self.document["preparation"]))

    @cached_property
    def imported(self) -> Imported | None:
        """What `distill import` knew of the source (None: the teacher's own capture)."""
        i = self.document.get("imported")
        return None if not i else record(Imported, {**i, "entries": tuple(i.get("entries", (0, 0)))})

    @property
    def dataset(self) -> Mapping:
        return self.document["dataset"]

    @property
    def software(self) -> Mapping:
        return self.document.get("software", {})

    # -- rows -----------------------------------------------------------------------------------
    @cached_property
    def splits(self) -> dict[str, Split]:
        return {name: Split(name, s["rows"], s["tokens"], s["shards"], tuple(record(Part, p) for p in s["parts"]))
                for name, s in self.document["splits"].items()}

    def split(self, name: str, where: str = "cache") -> Split:
        if name not in self.splits:
            raise CacheError(f"{where}: no split {name!r} (has: {', '.join(self.splits)})")
        return self.splits[name]

    def parts(self, split: str) -> tuple[Part, ...]:
        """A split's parts in row order: its rows are their rows one after the other."""
        return self.split(split).parts

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.splits.values())

    @cached_property
    def fields(self) -> dict[str, Field]:
        return {name: record(Field, {**f, "dims": tuple(f["dims"]),
                                      "shape": {s: tuple(v) for s, v in f["shape"].items()}}, name=name)
                for name, f in self.document["fields"].items()}

    @property
    def dense_fields(self) -> list[str]:
        return [name for name, f in self.fields.items() if f.dense]

    @property
    def legacy_shards(self) -> list | None:
        """The shard list of a manifest written before 3.0 (None: a 3.0 cache, whose parts have index files)."""
        return self.document.get("shards")

    @cached_property
    def shard_index(self) -> dict[str, IndexFile]:
        """{part path: its index file} of a 3.0 cache (empty for an older one or a plan)."""
        return {part: record(IndexFile, {**e, "field_bytes": dict(e.get("field_bytes", {}))}, part=part)
                for part, e in self.document.get("shard_index", {}).items()}

    def shard_start(self, split: str, part: str) -> int:
        """The number, within its split, of a part's first shard."""
        start = 0
        for p in self.parts(split):
            if p.path == part:
                return start
            start += p.shards
        raise CacheError(f"split {split!r} has no part {part!r}")

    def shard_ranges(self, split: str) -> list[tuple[int, int]]:
        """(row_start, row_end) of each shard of a split, in row order (rows numbered across parts): each part's
        rows cut every rows_per_shard rows."""
        n = self.capture.rows_per_shard
        return [(p.row_start + a, p.row_start + min(a + n, p.rows)) for p in self.parts(split)
                for a in range(0, p.rows, n)]

    @property
    def n_shards(self) -> int:
        return sum(s.shards for s in self.splits.values())

    @cached_property
    def metadata_files(self) -> dict[str, FileDigest]:
        return {rel: record(FileDigest, d) for rel, d in self.document.get("metadata_files", {}).items()}

    def data_bytes(self, fields: list[str] | None = None) -> int:
        """Bytes of the shard files (of `fields`: default the dense fields it holds), from the manifest alone."""
        fields = self.dense_fields if fields is None else fields
        if self.legacy_shards is not None:
            return sum(d["bytes"] for sh in self.legacy_shards for rel, d in sh["files"].items()
                       if self.file_owner(rel)[1] in fields)
        return sum(b for e in self.shard_index.values() for f, b in e.field_bytes.items() if f in fields)

    @property
    def bytes(self) -> int:
        """Every file of the finished cache but the manifest."""
        return (sum(d.bytes for d in self.metadata_files.values()) + sum(e.bytes for e in self.shard_index.values())
                + self.data_bytes())

    def locate(self, rel: str) -> tuple[str | None, Part | None, str | None]:
        """(split, part, dense field) a cache file belongs to: (None, None, None) for cache-wide files
        (tokenizer/), (split, part, None) for a part's rows.parquet, shard index and group metadata."""
        for split in self.splits.values():
            for p in sorted(split.parts, key=lambda p: -len(p.path)):
                if rel.startswith(p.path + "/"):
                    rest = rel[len(p.path) + 1:].split("/")
                    return split.name, p, (rest[0] if len(rest) > 1 else None)
        return None, None, None

    def file_owner(self, rel: str) -> tuple[str | None, str | None]:
        """(split, dense field) a cache file belongs to (see `locate`)."""
        split, _, field = self.locate(rel)
        return split, field

    # -- history and statistics ----------------------------------------------------------------
    @cached_property
    def grown(self) -> tuple[Growth, ...]:
        return tuple(record(Growth, {**g, "parts": tuple(g.get("parts", ()))}) for g in self.document.get("grown", ()))

    @cached_property
    def subset(self) -> Subset | None:
        s = self.document.get("subset")
        return None if not s else Subset(s["of_digest"], s["source"], tuple(s["fields"]), tuple(s["splits"]))

    def descends_from(self, digest: str) -> int | None:
        """The index in `grown` of the append that grew the cache of `digest` (None: not an ancestor)."""
        return next((i for i, g in enumerate(self.grown) if g.parent_digest == digest), None)

    @cached_property
    def stats(self) -> Stats:
        s = self.document["stats"]
        timing = s.get("timing", {})
        return Stats(s["tokens"], s["rows"], s["bytes_on_disk"], s.get("bytes_per_token", {}),
                     timing.get("seconds", 0.0), timing.get("tokens_per_second", 0.0), timing.get("finished_at"),
                     s.get("mean_topk_mass"), s.get("teacher_accuracy"), s.get("teacher_correct_labelled"),
                     timing.get("writer_wait_seconds", 0.0), s.get("logprob_kl"))


def _restored(document: dict, recorded_version: str) -> Manifest:
    return Manifest(MappingProxyType(document), recorded_version)
