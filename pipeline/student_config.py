"""Typed settings of `distill student`: the students (shape, losses, optimiser), the caches they train from
(`sources`, mixed by weight) and the run (batches, evaluation, early stopping, output). Loaded like every
settings file by `pipeline.config.load_config`; the strict base, the teacher's `Task` and the reader's
default shuffle window come from `pipeline.config`.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import Field, model_validator

from .config import DEFAULT_SHUFFLE_WINDOW, Strict, Task

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


class SourceConfig(Strict):
    """One of the caches a run trains from, mixed with the others by weight."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="the source's name in metrics and reports")
    cache: str = Field(description="its finished cache: a directory or URL")
    weight: float = Field(1.0, gt=0, description="share of training batches drawn from this cache")


class StudentRunConfig(Strict):
    """All settings of `distill student`: one read of the cache feeds every student."""

    cache: str | None = Field(None, description="a finished teacher cache")
    sources: list[SourceConfig] = Field(default_factory=list, description="or several caches mixed by weight, one "
                                                                         "[[sources]] table each")
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
    parallel: Literal["ddp", "fsdp", "auto"] = Field(
        "ddp", description="how each student is spread over the ranks of a torchrun launch: ddp (a whole replica per "
                           "rank, gradients averaged), fsdp (torch's FSDP2: each decoder layer and the rest of the "
                           "student sharded, so parameters, gradients and optimizer state are divided over the ranks; "
                           "checkpoints sharded, resumable on another number of ranks), or auto (fsdp when the memory "
                           "plan says a whole replica does not fit a rank's device, else ddp; distill student "
                           "--dry-run prints the plan); one process trains either alike")
    activation_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward pass instead of keeping them "
                           "(less memory, about one more forward pass of compute)")
    logit_block_mib: float = Field(
        64, ge=0, description="a student's logits and every term that reads them are computed a block of positions "
                              "at a time, fused with its LM head (each block's gradients made in the forward pass, "
                              "nothing made twice), each block's float32 logits at most this size: no (batch, "
                              "seq_len, vocab) tensor; 0: materialised whole (mutual learning always is)")
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
                    "many shards' rows, so a cache whose rows arrive grouped (by file, by label, by origin) still gives "
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

    @model_validator(mode="before")
    @classmethod
    def _old_sources_key(cls, raw):
        """Settings written before the key was renamed say `tasks` for the weighted caches: read as `sources`."""
        if isinstance(raw, dict) and "tasks" in raw:
            if "sources" in raw:
                raise ValueError("give the weighted caches as sources only (tasks is its old name)")
            warnings.warn("the settings key `tasks` (the weighted caches of a run) is now `sources`; read as "
                          "`sources` (rename it: [[tasks]] -> [[sources]])", FutureWarning, stacklevel=2)
            raw = {("sources" if k == "tasks" else k): v for k, v in raw.items()}
        return raw

    @model_validator(mode="after")
    def _unique_names(self) -> "StudentRunConfig":
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"student names must be unique: {names}")
        if (self.cache is None) == (not self.sources):
            raise ValueError("give exactly one of cache or sources")
        sources = [t.name for t in self.sources]
        if len(set(sources)) != len(sources):
            raise ValueError(f"source names must be unique: {sources}")
        if self.mutual_weight > 0 and len(self.students) < 2:
            raise ValueError("mutual_weight needs at least two students")
        return self

    def source_list(self) -> list[SourceConfig]:
        """The run's caches: `sources`, or the one `cache` as a source named "default"."""
        return self.sources or [SourceConfig(name="default", cache=self.cache)]
