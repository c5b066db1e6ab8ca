"""Typed settings for the pipeline, loaded from a TOML file plus `key=value` overrides.

Every section is a pydantic model with `extra="forbid"`: an unknown key (in the file or
on the command line) is an error that names it. Overrides use dotted paths, e.g.
`capture.top_k=32` or `data.data_files=["a.txt","b.txt"]`; values are parsed as TOML
literals and fall back to plain strings (`teacher.model=gpt2`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .overrides import merge_overrides


class Strict(BaseModel):
    """The base of every settings model: unknown keys are refused, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


LOCAL_LOADERS = {"text", "json", "parquet", "arrow", "csv"}  # datasets loaders that read data.data_files
DEFAULT_SHUFFLE_WINDOW = 16  # shards a student's reader shuffles together (stage 2); the capture warns against it
Task = Literal["causal-lm", "sequence-classification", "token-classification"]


class TeacherConfig(Strict):
    model: str = Field(description="Hugging Face id, local directory (safetensors), or path to a .gguf file")
    gguf_file: str | None = Field(None, description="GGUF file name inside `model` (a folder or hub id)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="teacher compute dtype")
    device: str = Field("auto", description="'auto' (this rank's GPU when present, else cpu), 'cpu', 'cuda', "
                                            "'cuda:1', ...")
    device_map: str | dict[str, int | str] | None = Field(
        None, description="place one teacher over several devices (accelerate): 'auto', 'balanced', "
                          "'sequential' or an explicit {module: device} map; one rank per node")
    tp_size: int = Field(
        1, ge=1, description="tensor parallelism under torchrun: the ranks form groups of tp_size, each group loads "
                             "one teacher split over its devices (transformers' tp_plan) and computes its share of "
                             "the shards; world size = groups x tp_size. For teachers larger than one device that "
                             "have a tensor-parallel plan; device_map covers the others")
    trust_remote_code: bool = Field(False, description="run model code from the hub; off unless asked for")
    task: Task = Field("causal-lm", description="what the teacher predicts: the next token (causal-lm), one class per "
                                               "row (sequence-classification) or one class per word "
                                               "(token-classification)")


class DataConfig(Strict):
    source: str = Field(
        description="a datasets hub id, or a loader for local files: 'text', 'json', 'parquet', 'arrow'"
    )
    data_files: list[str] | dict[str, list[str]] = Field(
        default_factory=list,
        description="local files or globs for a loader source; '{stdlib}' expands to Python's standard library; "
                    "a table {train = [...], test = [...]} names the files of each dataset split",
    )
    exclude: list[str] = Field(default_factory=list, description="glob patterns (on file names) to leave out")
    config_name: str | None = Field(None, description="dataset configuration name (hub datasets)")
    split: str = Field("train", description="the dataset split to read")
    text_column: str = Field("text", description="column holding the text (token-classification: a list of words)")
    label_column: str = Field("label", description="classification tasks: the gold label column (class names or ids; "
                                                   "token-classification: one per word)")
    splits: dict[str, str] = Field(
        default_factory=dict, description="more cache splits read from the dataset's own splits: {validation = "
                                          "\"validation\", test = \"test\"}; a 'validation' entry replaces "
                                          "validation_fraction")
    sample_by: Literal["document", "line", "paragraph"] = Field(
        "document", description="text loader only: one example per file, line or paragraph"
    )
    seq_len: int = Field(256, gt=1, description="tokens per row")
    packing: bool = Field(
        True, description="join documents with EOS into full rows; false: one document per row, padded"
    )
    add_special_tokens: bool = Field(False, description="let the tokenizer add BOS/EOS of its own")
    bos: Literal["auto"] | bool = Field(
        "auto", description="rows begin with the teacher's BOS token: 'auto' when its tokenizer adds one "
                            "(as tokenizer('x') does), true/false to force it")
    format: Literal["text", "messages", "prompt_response", "tokens"] = Field(
        "text", description="'text': a text column; 'messages': a column of [{role, content}] conversations; "
                            "'prompt_response': prompt and response columns; both rendered with the chat template; "
                            "'tokens': rows given as token ids (ids_column), one per row, taken exactly as they are "
                            "(no BOS or EOS added): `distill generate` output, or any pre-tokenised data")
    ids_column: str = Field("input_ids", description="format='tokens': the column of token-id lists")
    completion_column: str = Field("completion_start", description="format='tokens', loss_mask='assistant': the "
                                                                   "column of each row's first completion token index")
    key_columns: list[str] = Field(
        default_factory=list, description="format='tokens': columns whose values join the token ids in a row's content "
                                          "key, so rows of equal tokens but other values stay distinct rows (the "
                                          "on-policy loop keys each sampled completion by prompt_index and sample: "
                                          "two identical draws are two rows, trained and evaluated as drawn)")
    messages_column: str = Field("messages", description="format='messages': the conversations column")
    prompt_column: str = Field("prompt", description="format='prompt_response': the prompt (user turn) column")
    response_column: str = Field("response", description="format='prompt_response': the response column")
    chat_template: str | None = Field(
        None, description="a Jinja chat template (or a path to a file holding one); None: the tokenizer's own")
    loss_mask: Literal["all", "assistant"] = Field(
        "all", description="'all': every real position trains; 'assistant': only positions that predict an "
                           "assistant (or response, or format='tokens': completion) token, stored with the rows")
    document_mask: bool = Field(
        False, description="packed rows: each document attends only to itself (block-diagonal causal attention, "
                           "positions restarting per document), at capture and in training")
    shuffle_seed: int | None = Field(None, description="shuffle documents with this seed before the caps apply")
    max_documents: int | None = Field(None, gt=0, description="read at most this many documents")
    max_tokens: int | None = Field(None, gt=0, description="stop after this many tokens (before splitting)")
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of rows, chosen by content key")

    @model_validator(mode="before")
    @classmethod
    def _tokens_unpacked(cls, raw):  # rows given as token ids are kept as given: packing is off unless asked for
        return {**raw, "packing": False} if isinstance(raw, dict) and raw.get("format") == "tokens" and \
            "packing" not in raw else raw

    @model_validator(mode="after")
    def _format_rules(self) -> "DataConfig":
        if self.loss_mask == "assistant" and self.format == "text":
            raise ValueError("loss_mask='assistant' needs chat data or completions (data.format 'messages', "
                             "'prompt_response' or 'tokens')")
        if self.chat_template is not None and self.format in ("text", "tokens"):
            raise ValueError(f"chat_template is set but data.format is {self.format!r} (nothing is rendered with it)")
        if self.format == "tokens" and self.packing:
            raise ValueError("data.format = 'tokens' keeps each row as given: data.packing must be false")
        if self.key_columns and self.format != "tokens":
            raise ValueError("key_columns key rows given as token ids (one per row): it needs data.format = 'tokens'")
        if self.document_mask and not self.packing:
            raise ValueError("document_mask separates the documents of packed rows: it needs packing = true")
        bad = [k for k in self.splits if k not in ("validation", "test")]
        if bad:
            raise ValueError(f"splits: cache split names are 'validation' and 'test' (train is data.split), not {bad}")
        if self.splits and self.source in LOCAL_LOADERS and \
                not isinstance(self.data_files, dict):
            raise ValueError("splits reads more dataset splits: with local files, data_files must name each split's "
                             "files, e.g. {train = [...], test = [...]}")
        if isinstance(self.data_files, dict):
            if self.split not in self.data_files:
                raise ValueError(f"data_files names files per split but not for data.split {self.split!r}")
            missing = [v for v in self.splits.values() if v not in self.data_files]
            if missing:
                raise ValueError(f"data_files names no files for the dataset splits {missing} (in data.splits)")
        return self


class CaptureConfig(Strict):
    top_k: int = Field(64, gt=0, description="teacher log-probs kept per position")
    temperatures: list[float] = Field(
        default_factory=list, description="extra temperatures whose logsumexp is stored (T=1 always is)"
    )
    hidden_layers: list[int] = Field(
        default_factory=list, description="indices as in output_hidden_states (0 = embeddings; negatives allowed)"
    )
    hidden_dtype: Literal["float16", "bfloat16", "int8"] = Field(
        "float16", description="int8: hidden states quantised per position (max |h| / 127), half of float16's bytes")
    attention_layers: list[int] = Field(default_factory=list, description="decoder layer indices (negatives allowed)")
    attention_heads: list[int] | None = Field(None, description="keep only these heads (None: all)")
    attention_head_reduce: Literal["none", "mean"] = Field("none", description="'mean' averages the kept heads")
    batch_size: int = Field(8, gt=0, description="rows per teacher forward pass (part of the cache's settings: the "
                                                 "sampled targets are seeded per batch)")
    rows_per_shard: int = Field(64, gt=0, description="rows written (and committed) together")
    rows_per_chunk: int = Field(8, gt=0, description="rows a reader decompresses together")
    position_chunk: int = Field(128, gt=0, description="positions per LM-head block (bounds peak memory)")
    attention_budget_gib: float = Field(
        8.0, gt=0, description="attention maps grow with seq_len^2: a capture whose maps (the mapped layers' eager "
                               "scores and the recorded maps of a batch) exceed this is refused before the teacher "
                               "loads; not part of the cache's settings")
    compression_level: int = Field(3, ge=0, le=22, description="zstd level for dense fields; 0 = uncompressed")
    hidden_codec: Literal["shuffle-zstd", "zstd", "none"] = Field(
        "shuffle-zstd", description="codec of hidden_states and final_hidden: shuffle-zstd (byte shuffle, then zstd "
                                    "level 1: 1.15x), zstd (compression_level, no shuffle: 1.08x, the layout before), "
                                    "none (about twice the writer throughput of shuffle-zstd)")
    writers: int | None = Field(None, ge=0, le=64, description="threads writing shards while the teacher computes "
                                "(0: in line; unset: up to 4 with a GPU, 1 on a CPU with a spare core); the bytes are the same")
    topk_codec: Literal["pcodec", "zstd"] = Field(
        "pcodec", description="codec of the top-K and sampled fields: pcodec (lossless, 30% smaller, needs "
                              "numcodecs[pcodec] to read) or zstd (int32 ids, the 1.2 layout)")
    topk_ids_encoding: Literal["frequency-codes", "ids"] = Field(
        "frequency-codes", description="how topk_ids are stored: frequency-codes (each id's place in the part's "
        "tokens by frequency: about 8% fewer bytes at pcodec's speed; format 4.0) or ids (as before 4.0)")
    logprob_precision: float | None = Field(
        None, gt=0, le=0.05, description="bounded-error top-K log-probs (unset: exact float16): an entry of "
        "probability p is stored within this / sqrt(p) nats, the most likely one carrying the others' change of mass; "
        "0.005 stores them in about 40% of the bytes at a mean KL(exact || stored) near 1e-4 nats per position. The "
        "bound and the measured KL go into the manifest")
    samples: int = Field(0, ge=0, le=65535, description="sampled targets: draws per position from the proposal "
                                                        "(0 = off); stored as distinct ids, counts and log-probs")
    sample_temperature: float = Field(1.0, gt=0, description="proposal q = softmax(z / this): 1.0 or one of "
                                                             "temperatures (its logsumexp is stored)")
    sample_seed: int = Field(0, ge=0, description="seed of the draws (with the split and the batch's first row)")
    final_hidden: bool = Field(False, description="store the teacher's final hidden state per position and its LM "
                                                  "head once: exact full-vocabulary KD without the teacher")
    final_hidden_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="storage dtype of final_hidden; bfloat16 for teachers whose states overflow float16")

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
    def _sample_temperature_stored(self) -> "CaptureConfig":
        if self.samples and self.sample_temperature != 1.0 and self.sample_temperature not in self.temperatures:
            raise ValueError(f"sample_temperature {self.sample_temperature} must be 1.0 or one of temperatures "
                             f"{self.temperatures} (the estimator needs its logsumexp)")
        return self

    @model_validator(mode="after")
    def _chunks_divide_shards(self) -> "CaptureConfig":
        if self.rows_per_shard % self.rows_per_chunk:
            raise ValueError(
                f"rows_per_shard ({self.rows_per_shard}) must be a multiple of rows_per_chunk ({self.rows_per_chunk})"
            )
        return self


class OutputConfig(Strict):
    dir: str = Field(description="cache directory to write: a local path, or any fsspec URL (s3://bucket/prefix, ...)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for a URL dir")
    overwrite: bool = Field(False, description="replace a finished cache whose settings differ")
    mode: Literal["create", "append"] = Field(
        "create", description="create: write (or resume) a cache; append: add the rows of new documents to the finished "
        "cache at dir, made with the same teacher, tokenizer and settings (rows already in it are skipped)")

    @model_validator(mode="after")
    def _append_never_overwrites(self):
        if self.mode == "append" and self.overwrite:
            raise ValueError("output.mode=append adds to a cache and never replaces it: drop output.overwrite")
        return self


class TeacherCacheConfig(Strict):
    """All settings of `distill teacher-cache`."""

    teacher: TeacherConfig
    data: DataConfig
    capture: CaptureConfig = CaptureConfig()
    output: OutputConfig

    @model_validator(mode="before")
    @classmethod
    def _classification_rows(cls, raw):
        """A classification teacher reads one example per row: packing is off unless asked for (then refused)."""
        if isinstance(raw, dict) and isinstance(raw.get("teacher"), dict) and isinstance(raw.get("data"), dict):
            task = raw["teacher"].get("task", "causal-lm")
            if task != "causal-lm" and "packing" not in raw["data"]:
                raw = {**raw, "data": {**raw["data"], "packing": False}}
        return raw

    @model_validator(mode="after")
    def _task_rules(self) -> "TeacherCacheConfig":
        task, d, c = self.teacher.task, self.data, self.capture
        if task == "causal-lm":
            return self
        if d.packing:
            raise ValueError(f"teacher.task = {task!r} labels one example per row: data.packing must be false")
        if d.format != "text" or d.loss_mask != "all":
            raise ValueError(f"teacher.task = {task!r} reads a text column and labels (data.format = 'text', "
                             "loss_mask = 'all')")
        lm_only = [k for k, on in (("samples", c.samples), ("final_hidden", c.final_hidden),
                                   ("logprob_precision", c.logprob_precision is not None)) if on]
        if lm_only:
            raise ValueError(f"capture.{', '.join(lm_only)}: next-token target modes, not for teacher.task = {task!r} "
                             "(its class distribution is stored whole)")
        return self


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
        raise ConfigError("invalid settings:\n" + describe_invalid(e)) from None


def describe_invalid(e: ValidationError) -> str:
    """A pydantic validation error as lines of `  key.path: what is wrong` (an unknown key named as one)."""
    return "\n".join(f"  {'.'.join(str(x) for x in err['loc'])}: "
                     f"{'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}" for err in e.errors())
