"""The frozen records a manifest is made of: what `Manifest`'s typed accessors return, and what a plan is built
from (`plans.py`). Most are read from their part of the manifest document by `record`, which takes the keys the
record declares (absent ones take their defaults: keys older layouts lack) and ignores the others; those a plan
is built from are written back by their `to_dict`. All of them pickle (ranks pass them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields as dataclass_fields
from typing import Any, Mapping


def record(cls, d: Mapping, **extra):
    """A frozen record from the keys of `d` that `cls` declares (absent ones take their defaults)."""
    names = {f.name for f in dataclass_fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names}, **extra)


# ---------------------------------------------------------------------------------------------
# the records a manifest is made of


@dataclass(frozen=True)
class FileDigest:
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class Teacher:
    """Who made the targets: identity and the architecture facts the readers need."""

    model: str
    model_type: str
    vocab_size: int  # rows of the LM head, padding included
    hidden_size: int
    num_layers: int
    num_heads: int
    weights_sha256: str | None = None
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str | None = None
    device_type: str | None = None
    max_positions: int | None = None
    logit_softcap: float | None = None
    logit_scale: float | None = None
    logits_divisor: float | None = None
    intermediate_size: int | None = None  # recorded since 1.2


@dataclass(frozen=True)
class Tokenizer:
    fingerprint: str
    class_name: str | None = None  # "class" in the document
    size: int | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "class": self.class_name, "size": self.size,
                "eos_token_id": self.eos_token_id, "bos_token_id": self.bos_token_id, "pad_token_id": self.pad_token_id}


@dataclass(frozen=True)
class Task:
    """What the teacher predicts: `causal-lm`, or a classifier's classes (`labels` by id)."""

    type: str = "causal-lm"
    labels: tuple[str, ...] = ()
    label_column: str | None = None
    pad_token_id: int | None = None
    ignore_index: int | None = None
    bidirectional: bool = False  # an encoder: attention maps cover every real key

    @property
    def classifier(self) -> bool:
        return self.type != "causal-lm"

    @property
    def per_token(self) -> bool:
        return self.type == "token-classification"

    def to_dict(self) -> dict:
        return {"type": self.type, "labels": list(self.labels), "label2id": {n: i for i, n in enumerate(self.labels)},
                "label_column": self.label_column, "pad_token_id": self.pad_token_id,
                "ignore_index": self.ignore_index, "bidirectional": self.bidirectional}


@dataclass(frozen=True)
class Capture:
    """What was captured, with the settings whose values the readers depend on (`value` reads any other)."""

    top_k: int
    temperatures: tuple[float, ...]  # besides 1.0, in logsumexp_tempered's order
    hidden_layers: tuple[int, ...]
    hidden_dtype: str
    attention_layers: tuple[int, ...]
    rows_per_shard: int
    rows_per_chunk: int
    compression_level: int
    samples: int = 0
    sample_temperature: float = 1.0
    final_hidden: bool = False
    topk_codec: str = "zstd"
    hidden_codec: str = "zstd"
    logprob_precision: float | None = None  # bounded-error top-K log-probs (None: exact float16)
    topk_ids_encoding: str = "ids"  # "frequency-codes": topk_ids hold codes, mapped through each part's id order
    attention_heads_stored: int | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # every recorded capture setting

    @property
    def temperatures_all(self) -> tuple[float, ...]:
        return (1.0, *self.temperatures)

    def value(self, key: str) -> Any:
        """A capture setting by its name in the manifest (None where the cache does not record it)."""
        return self.raw.get(key)

    def tempered_index(self, temperature: float) -> int | None:
        """Where `temperature`'s logsumexp sits in logsumexp_tempered (None: not captured)."""
        return self.temperatures.index(temperature) if temperature in self.temperatures else None


@dataclass(frozen=True)
class Imported:
    """What a cache made by `distill import` knew of its source: the targets' normalisation, whether the logsumexp
    and the log-prob of each trained token were given, the temperature of the log-probs."""

    layout: str  # "axolotl", "vllm" or "distillkit"
    source: str
    normalised: str  # "vocabulary": over every token (the tail is 1 - sum); "top-k": renormalised over the ids given
    logsumexp: bool  # given (else the logsumexp field holds NaN)
    target_logprob: bool  # the teacher's log-prob of every trained token was known (else the field is absent)
    temperature: float = 1.0  # the log-probs are the teacher's at this temperature
    top_k: int = 0
    entries: tuple[int, int] = (0, 0)  # entries a trained position held in the source (least, most)
    mean_mass: float | None = None  # mean summed probability of the K kept entries at a trained position
    # split -> {"-1", "0", "+1": share of trained positions whose token at that shift is among their entries}
    alignment: Mapping | None = None  # (recorded since the alignment check)
    alignment_checked: bool | None = None  # False: imported with the check skipped (None: before the check)
    compression: Mapping | None = None  # a DistillKit source: its compression settings, as its files recorded them
    exact_entries: int | None = None  # of the K entries, the leading ones a DistillKit source stored exactly

    @property
    def lossy(self) -> bool:
        """Some kept log-probs are a compression's approximation of the teacher's (DistillKit's fitted tail, or
        values rounded beyond float16)."""
        return self.compression is not None and (self.exact_entries or 0) < self.top_k

    @property
    def tail_known(self) -> bool:
        return self.normalised == "vocabulary"


@dataclass(frozen=True)
class Preparation:
    """How rows were made (the typed part; `raw` holds every recorded key)."""

    seq_len: int
    packing: bool = True
    loss_mask: str = "all"  # recorded since 1.1
    document_mask: bool = False  # recorded since 1.1
    format: str = "text"
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # every recorded preparation setting

    @property
    def bos(self) -> Mapping | None:
        return self.raw.get("bos")

    @property
    def chat_template(self) -> Mapping | None:
        return self.raw.get("chat_template")


@dataclass(frozen=True)
class Part:
    """The rows one capture (or append) added to a split: a folder of its own."""

    path: str
    row_start: int
    rows: int
    tokens: int
    shards: int

    def to_dict(self) -> dict:
        return {"path": self.path, "row_start": self.row_start, "rows": self.rows, "tokens": self.tokens,
                "shards": self.shards}


@dataclass(frozen=True)
class Split:
    name: str
    rows: int
    tokens: int
    shards: int
    parts: tuple[Part, ...]

    @classmethod
    def of(cls, name: str, parts: tuple[Part, ...]) -> "Split":
        """A split of `parts`, its counts their sums."""
        return cls(name, sum(p.rows for p in parts), sum(p.tokens for p in parts), sum(p.shards for p in parts),
                   tuple(parts))

    def to_dict(self) -> dict:
        return {"rows": self.rows, "tokens": self.tokens, "shards": self.shards,
                "parts": [p.to_dict() for p in self.parts]}


@dataclass(frozen=True)
class Field:
    """A per-row field: a Zarr array per part (`dense`) or a column of the parts' rows.parquet."""

    name: str
    path: str
    format: str
    dtype: str
    dims: tuple[str, ...]
    shape: Mapping[str, tuple[int, ...]]  # per split, over all its parts
    description: str = ""
    encoding: str | None = None
    codec: str = "zstd"
    column: str | None = None

    @property
    def dense(self) -> bool:
        return self.format == "zarr-v3"

    @property
    def position_axes(self) -> tuple[int, ...]:
        """The axes (row first) that run over positions: position, query, key."""
        return tuple(i for i, d in enumerate(self.dims) if d in ("position", "query", "key"))


@dataclass(frozen=True)
class IndexFile:
    """A part's shard index (format 3.0): the file, and what it lists."""

    part: str
    path: str
    bytes: int
    sha256: str
    shards: int
    files: int
    field_bytes: Mapping[str, int]  # bytes of each field's shard files

    def digest(self) -> FileDigest:
        return FileDigest(self.bytes, self.sha256)

    def to_dict(self) -> dict:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256, "shards": self.shards,
                "files": self.files, "field_bytes": dict(self.field_bytes)}


@dataclass(frozen=True)
class Growth:
    """One append: the cache it grew (`parent_digest`) and what it added."""

    number: int
    parent_digest: str
    rows: Mapping[str, int]
    tokens: int
    duplicate_rows_skipped: int
    dataset: Mapping
    parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Subset:
    """A partial pull: the cache it came from and what of it it holds."""

    of_digest: str
    source: str
    fields: tuple[str, ...]
    splits: tuple[str, ...]


@dataclass(frozen=True)
class Stats:
    tokens: int
    rows: int
    bytes_on_disk: int
    bytes_per_token: Mapping[str, float]
    seconds: float
    tokens_per_second: float
    finished_at: str | None
    mean_topk_mass: float | None = None  # a causal LM's
    teacher_accuracy: Mapping[str, float] | None = None  # a classifier's, per split
    teacher_correct_labelled: Mapping[str, list[int]] | None = None  # its counts behind teacher_accuracy
    writer_wait_seconds: float = 0.0  # of `seconds`, how long the teacher's loop waited for a free writer
    logprob_kl: Mapping[str, float] | None = None  # bounded-error log-probs: KL(exact || stored) per position
    # ({"mean", "max", "positions"})
