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
        lm_only = [k for k, on in (("samples", c.samples), ("final_hidden", c.final_hidden)) if on]
        if lm_only:
            raise ValueError(f"capture.{', '.join(lm_only)}: next-token target modes, not for teacher.task = {task!r} "
                             "(its class distribution is stored whole)")
        return self


LayerMap = Literal["uniform", "last_k"] | list[tuple[int, int]]


class StudentArch(Strict):
    """A smaller model of the teacher's family, random-initialised."""

    num_layers: int = Field(gt=0, description="decoder layers")
    hidden_size: int = Field(gt=0, description="model width")
    num_heads: int = Field(gt=0, description="attention heads (hidden_size must divide by it)")
    num_kv_heads: int | None = Field(None, gt=0, description="grouped-query attention; None = num_heads")
    intermediate_size: int | None = Field(
        None, gt=0, description="FFN width; None: the teacher's FFN/width ratio (the family's default ratio for caches "
                                "that do not record it) times hidden_size, a multiple of 8")
    tie_word_embeddings: bool = Field(True, description="share the input embeddings with the LM head")

    @model_validator(mode="after")
    def _heads_divide(self) -> "StudentArch":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        return self


class StudentConfig(Strict):
    """One student: its model, its losses, its optimiser."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="also the output folder's name")
    arch: StudentArch | None = Field(None, description="build from the teacher's family with this shape")
    pretrained: str | None = Field(None, description="or start from this checkpoint (hub id or local dir)")
    from_teacher: int | list[int] | None = Field(
        None, description="or copy the teacher's own layers: every n-th (an int) or these indices (a list)")
    task: Task | None = Field(None, description="what the student predicts; None: the cache's task (a student of "
                                                "another task than its cache's is refused)")
    tokenizer: str | None = Field(
        None, description="the student's own tokenizer (a folder or hub id) when it differs from the cache's: rows "
                          "are re-tokenised for it and positions aligned by text (docs: 'Students with another tokenizer'); "
                          "default: the tokenizer of `pretrained`, else the cache's")
    hidden_map: LayerMap = Field("uniform", description="student <-> cached teacher hidden layers")
    attention_map: LayerMap = Field("uniform", description="student <-> cached teacher attention layers")
    attention_heads: Literal["group", "mean"] = Field(
        "group", description="'group': teacher heads averaged into one group per student head; 'mean': all heads")
    losses: dict[str, float] = Field(default_factory=lambda: {"kd_forward": 1.0},
                                     description="weighted sum of named terms (the loss terms reference lists them); "
                                                 "a term with weight 0 is not computed and its fields are not read")
    temperature: float = Field(1.0, gt=0, description="KD temperature; KD terms are multiplied by T^2")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="the mixture weight of the JSD terms (0.5: symmetric)")
    allow_biased_kd: bool = Field(
        False, description="allow a student whose only distribution terms ignore the teacher's tail "
                           "(kd_forward_renorm, mse_logprobs, mse_logits) with no ce to anchor it: such students "
                           "were measured to diverge (docs: Figures, 'Which target should I pick?')")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * this")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps, then cosine decay")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay of matrices (none for vectors)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the gradient norm to this (none: no clipping)")
    seed: int = Field(0, description="initialisation of an arch student")

    @model_validator(mode="after")
    def _one_source(self) -> "StudentConfig":
        if sum(x is not None for x in (self.arch, self.pretrained, self.from_teacher)) != 1:
            raise ValueError(f"student {self.name!r}: give exactly one of arch, pretrained or from_teacher")
        if self.tokenizer is not None and self.from_teacher is not None:
            raise ValueError(f"student {self.name!r}: from_teacher copies the teacher's embeddings, which are its "
                             "tokenizer's; a student with its own tokenizer is built with arch or pretrained")
        if isinstance(self.from_teacher, int) and self.from_teacher < 1:
            raise ValueError(f"student {self.name!r}: from_teacher={self.from_teacher} must be >= 1")
        negative = [k for k, w in self.losses.items() if w < 0]
        if negative:
            raise ValueError(f"student {self.name!r}: loss weights must be >= 0 ({', '.join(negative)} < 0)")
        if not self.losses or not any(w > 0 for w in self.losses.values()):
            raise ValueError(f"student {self.name!r}: losses need at least one positive weight")
        return self


class TaskConfig(Strict):
    """One cache of a multi-task run."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="the task's name in metrics and reports")
    cache: str = Field(description="its finished cache: a directory or URL")
    weight: float = Field(1.0, gt=0, description="share of training batches drawn from this cache")


class StudentRunConfig(Strict):
    """All settings of `distill student`: one read of the cache feeds every student."""

    cache: str | None = Field(None, description="a finished teacher cache")
    tasks: list[TaskConfig] = Field(default_factory=list, description="or several caches mixed by weight")
    mutual_weight: float = Field(0.0, ge=0, description="deep mutual learning: weight of each student's KL to "
                                                         "the others' predictions (needs >= 2 students)")
    mutual_temperature: float = Field(1.0, gt=0, description="temperature of the mutual term (x T^2 like KD)")
    students: list[StudentConfig] = Field(min_length=1, description="the students trained together, one "
                                                                   "[[students]] table each")
    output_dir: str = Field(description="each student writes to output_dir/<name>/")
    batch_size: int = Field(8, gt=0, description="rows per micro-batch (per rank under torchrun)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimiser step")
    precision: Literal["auto", "bf16-autocast", "float32"] = Field(
        "auto", description="students' forward passes: auto = bf16 autocast on a GPU, float32 on a CPU; bf16-autocast "
                            "on any device (on a CPU: matrix products in bfloat16, as on a GPU); the losses are "
                            "computed in float32 either way")
    logit_block_mib: float = Field(
        256, ge=0, description="a student's logits and every term that reads them are computed a block of positions "
                               "at a time, each block's float32 logits at most this size (forward and backward: no "
                               "(batch, seq_len, vocab) tensor); 0: materialised whole (mutual learning always is)")
    max_steps: int = Field(200, gt=0, description="optimiser steps")
    eval_every: int = Field(50, gt=0, description="optimiser steps between evaluations (and the best model's save)")
    eval_rows: int | None = Field(None, gt=0, description="validation rows per evaluation (None: all)")
    early_stopping_metric: Literal["nll", "kl", "top1_agreement", "ece", "accuracy", "macro_f1", "entity_f1"] = Field(
        "nll", description="validation metric that picks the best model; accuracy, macro_f1 (classification) and "
                           "entity_f1 (token-classification) against the gold labels")
    patience: int | None = Field(None, gt=0, description="evaluations without improvement before stopping")
    checkpoint_every: int | None = Field(None, gt=0, description="None: at every evaluation")
    num_workers: int = Field(0, ge=0, description="DataLoader workers reading the cache")
    shuffle_window: int = Field(
        DEFAULT_SHUFFLE_WINDOW, gt=0,
        description="shards whose rows are shuffled together (per DataLoader worker): a batch is a sample of this "
                    "many shards' rows, so a cache whose rows arrive grouped (by source file, label, task) still gives "
                    "mixed batches once a window spans several groups; the reader holds this many shards of the fields "
                    "it reads; 1: each shard on its own")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for remote caches, e.g. {client_kwargs = {endpoint_url = "
        "\"http://minio:9000\"}} for s3://; credentials are better left to the environment (AWS_*, ~/.aws)")
    seed: int = Field(0, description="data order")
    device: str = Field("auto", description="'auto' (this rank's GPU when present, else cpu), 'cpu', 'cuda', ...")
    log_every: int = Field(10, gt=0, description="optimiser steps between train records in metrics.jsonl")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="trackers that receive every metrics.jsonl record too, one run per student: "
                                          "tensorboard (output_dir/<name>/tensorboard), wandb (WANDB_MODE=offline works "
                                          "without an account); metrics.jsonl and curves.png are written either way")
    wandb_project: str | None = Field(None, description="report_to wandb: the project (default 'distill')")
    document_mask: bool | None = Field(
        None, description="None: attend as the cache's teacher did; true/false: require that masking (a cache made "
                          "with other masking is refused)")

    @model_validator(mode="after")
    def _unique_names(self) -> "StudentRunConfig":
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"student names must be unique: {names}")
        if (self.cache is None) == (not self.tasks):
            raise ValueError("give exactly one of cache or tasks")
        tasks = [t.name for t in self.tasks]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique: {tasks}")
        if self.mutual_weight > 0 and len(self.students) < 2:
            raise ValueError("mutual_weight needs at least two students")
        return self

    def task_list(self) -> list[TaskConfig]:
        return self.tasks or [TaskConfig(name="default", cache=self.cache)]


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
