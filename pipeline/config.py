"""Typed settings for the pipeline, loaded from a TOML file plus `key=value` overrides.

Every section is a pydantic model with `extra="forbid"`: an unknown key (in the file or
on the command line) is an error that names it. Overrides use dotted paths, e.g.
`capture.top_k=32` or `data.data_files=["a.txt","b.txt"]`; values are parsed as TOML
literals and fall back to plain strings (`teacher.model=gpt2`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A settings file or override that cannot be used; the message says which key and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherConfig(_Strict):
    model: str = Field(description="Hugging Face id, local directory (safetensors), or path to a .gguf file")
    gguf_file: str | None = Field(None, description="GGUF file name inside `model` (a folder or hub id)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="teacher compute dtype")
    device: str = Field("auto", description="'auto' (cuda when present, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    trust_remote_code: bool = Field(False, description="run model code from the hub; off unless asked for")


class DataConfig(_Strict):
    source: str = Field(
        description="a datasets hub id, or a loader for local files: 'text', 'json', 'parquet', 'arrow'"
    )
    data_files: list[str] = Field(
        default_factory=list,
        description="local files or globs for a loader source; '{stdlib}' expands to Python's standard library",
    )
    exclude: list[str] = Field(default_factory=list, description="glob patterns (on file names) to leave out")
    config_name: str | None = Field(None, description="dataset configuration name (hub datasets)")
    split: str = Field("train", description="the dataset split to read")
    text_column: str = Field("text", description="column holding the text")
    sample_by: Literal["document", "line", "paragraph"] = Field(
        "document", description="text loader only: one example per file, line or paragraph"
    )
    seq_len: int = Field(256, gt=1, description="tokens per row")
    packing: bool = Field(
        True, description="join documents with EOS into full rows; false: one document per row, padded"
    )
    add_special_tokens: bool = Field(False, description="let the tokenizer add BOS/EOS of its own")
    shuffle_seed: int | None = Field(None, description="shuffle documents with this seed before the caps apply")
    max_documents: int | None = Field(None, gt=0, description="read at most this many documents")
    max_tokens: int | None = Field(None, gt=0, description="stop after this many tokens (before splitting)")
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of rows, chosen by content key")


class CaptureConfig(_Strict):
    top_k: int = Field(64, gt=0, description="teacher log-probs kept per position")
    temperatures: list[float] = Field(
        default_factory=list, description="extra temperatures whose logsumexp is stored (T=1 always is)"
    )
    hidden_layers: list[int] = Field(
        default_factory=list, description="indices as in output_hidden_states (0 = embeddings; negatives allowed)"
    )
    hidden_dtype: Literal["float16", "bfloat16"] = "float16"
    attention_layers: list[int] = Field(default_factory=list, description="decoder layer indices (negatives allowed)")
    attention_heads: list[int] | None = Field(None, description="keep only these heads (None: all)")
    attention_head_reduce: Literal["none", "mean"] = Field("none", description="'mean' averages the kept heads")
    batch_size: int = Field(8, gt=0)
    rows_per_shard: int = Field(64, gt=0, description="rows written (and committed) together")
    rows_per_chunk: int = Field(8, gt=0, description="rows a reader decompresses together")
    position_chunk: int = Field(128, gt=0, description="positions per LM-head block (bounds peak memory)")
    compression_level: int = Field(3, ge=0, le=22, description="zstd level for dense fields; 0 = uncompressed")

    @field_validator("temperatures")
    @classmethod
    def _positive_temperatures(cls, v: list[float]) -> list[float]:
        for t in v:
            if t <= 0:
                raise ValueError(f"temperature {t} must be > 0")
        if len(set(v)) != len(v) or 1.0 in v:
            raise ValueError("temperatures must be distinct and exclude 1.0 (always captured)")
        return v

    @model_validator(mode="after")
    def _chunks_divide_shards(self) -> "CaptureConfig":
        if self.rows_per_shard % self.rows_per_chunk:
            raise ValueError(
                f"rows_per_shard ({self.rows_per_shard}) must be a multiple of rows_per_chunk ({self.rows_per_chunk})"
            )
        return self


class OutputConfig(_Strict):
    dir: str = Field(description="cache directory to write")
    overwrite: bool = Field(False, description="replace a finished cache whose settings differ")


class TeacherCacheConfig(_Strict):
    """All settings of `distill teacher-cache`."""

    teacher: TeacherConfig
    data: DataConfig
    capture: CaptureConfig = CaptureConfig()
    output: OutputConfig


def parse_override(text: str) -> tuple[list[str], Any]:
    """'capture.top_k=32' -> (['capture', 'top_k'], 32)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. capture.top_k=32)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def merge_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a nested dict (a copy); sections are created as needed."""
    out = _deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_config(model: type[BaseModel], path: str | Path | None, overrides: list[str] = ()) -> Any:
    """Read a TOML file (optional), apply overrides, validate into `model`."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from e
    raw = merge_overrides(raw, list(overrides))
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {loc}: {msg}")
        raise ConfigError("invalid settings:\n" + "\n".join(lines)) from None
