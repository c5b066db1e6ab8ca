"""Settings of `distill generate` and `distill onpolicy` (pydantic, unknown keys rejected, as in `pipeline.config`),
and `dump_toml`, which writes settings back as a TOML file that `load_config` reads (the loop writes each round's
`distill student` settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from ..config import CaptureConfig, DataConfig, Strict, TeacherConfig, describe_invalid
from ..student_config import SourceConfig, StudentRunConfig


class SamplingConfig(Strict):
    """How `distill generate` samples completions."""

    max_new_tokens: int = Field(128, gt=0, description="tokens sampled per completion at most (it ends earlier at "
                                                        "the model's end-of-sequence token, which it keeps)")
    temperature: float = Field(1.0, ge=0, description="softmax temperature of the sampling; 0: greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the smallest set of tokens whose "
                                                      "probability reaches this (1: the whole distribution)")
    seed: int = Field(0, ge=0, description="the draws: the same seed, batch_size, model, dtype and device give the "
                                           "same tokens (each batch is seeded from it and its position)")
    samples_per_prompt: int = Field(1, gt=0, description="completions sampled for each prompt")
    batch_size: int = Field(8, gt=0, description="completions sampled together (part of what fixes the tokens)")
    rows_per_part: int = Field(64, gt=0, description="completions written (and committed) together: the unit a "
                                                     "resumed generation redoes")
    prompt_tokens: int | None = Field(None, gt=0, description="text prompts: keep each prompt's first this many "
                                                              "tokens (a document's opening as a prompt)")
    long_prompts: Literal["refuse", "skip"] = Field(
        "refuse", description="prompts that leave no room for max_new_tokens within prompts.seq_len: refuse the "
                              "run before any sampling (naming them), or skip them and count them")

    @model_validator(mode="after")
    def _greedy_once(self) -> "SamplingConfig":
        if self.temperature == 0 and self.samples_per_prompt > 1:
            raise ValueError("temperature = 0 is greedy decoding: every sample of a prompt would be the same; set "
                             "samples_per_prompt = 1 or a temperature > 0")
        return self


class GeneratorConfig(TeacherConfig):
    """The model that samples: a student's saved `model/` folder or any causal LM the teacher loader accepts."""

    task: Literal["causal-lm"] = Field("causal-lm", description="only causal LMs sample completions")
    tp_size: Literal[1] = Field(1, description="the generator runs whole on each rank (data parallel); tensor "
                                               "parallelism is the capture's (teacher.tp_size)")


class SamplesOutputConfig(Strict):
    dir: str = Field(description="a local folder: Parquet parts of token ids and generation.json")
    overwrite: bool = Field(False, description="replace samples made with other settings")


class GenerateConfig(Strict):
    """All settings of `distill generate`."""

    generator: GeneratorConfig = Field(description="the model that samples (its keys are the teacher's)")
    prompts: DataConfig = Field(description="the prompts: format 'text' (the text is the prompt), 'messages' "
                                            "(conversations ending in a user turn), 'prompt_response' (the prompt "
                                            "column) or 'tokens'; seq_len bounds prompt + completion")
    sampling: SamplingConfig = Field(SamplingConfig(), description="how completions are sampled")
    output: SamplesOutputConfig = Field(description="where the samples go")
    teacher: TeacherConfig | None = Field(None, description="the teacher that will score the samples: its tokenizer "
                                                            "must be the generator's (checked before sampling)")
    round: int | None = Field(None, ge=0, description="the on-policy round these samples belong to (lineage)")

    @model_validator(mode="after")
    def _prompt_rules(self) -> "GenerateConfig":
        if self.prompts.loss_mask != "all" or self.prompts.document_mask:
            raise ValueError("prompts: loss_mask and document_mask are for rows a teacher scores, not prompts")
        return self


class OnPolicyConfig(Strict):
    """All settings of `distill onpolicy`: rounds of generate -> score -> train."""

    dir: str = Field(description="local folder of the run: each round's samples and student, and the loop's state")
    rounds: int = Field(3, gt=0, description="rounds of generate -> score -> train")
    start: str = Field(description="the student that samples round 1: a saved student's model/ folder (e.g. "
                                   "`distill student`'s output) or any causal LM with the teacher's tokenizer")
    teacher: TeacherConfig = Field(description="the teacher that scores every round (and made the offline caches)")
    prompts: DataConfig = Field(description="the prompts each round samples completions for (as in `distill "
                                            "generate`); seq_len is the scored rows' length")
    sampling: SamplingConfig = Field(SamplingConfig(), description="round r samples with seed sampling.seed + r")
    capture: CaptureConfig | None = Field(
        None, description="how the teacher scores the samples; None: the target settings of the first offline cache "
                          "(top_k, temperatures, samples, final_hidden, codecs), no hidden states or attention")
    eval_prompts: DataConfig | None = Field(
        None, description="held-out prompts: after each round the student samples them (one fixed seed for every "
                          "round) and the teacher's NLL per completion token is recorded in the run's report")
    cache_dir: str | None = Field(None, description="where the rounds' caches go (a folder or fsspec URL, e.g. "
                                                    "s3://bucket/run); None: dir/caches")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for cache_dir and "
                                                                               "the offline caches")
    offline: list[SourceConfig] = Field(default_factory=list, description="offline caches mixed into every round's "
                                      "training, with their weights ([[offline]] tables: name, cache, weight)")
    onpolicy_weight: float = Field(1.0, gt=0, description="share of training batches from the on-policy caches "
                                                          "(against the offline sources' weights)")
    history: Literal["all", "latest"] = Field(
        "all", description="which rounds' caches a round trains on: all so far (sharing onpolicy_weight equally) or "
                           "only its own")
    student: dict[str, Any] = Field(
        default_factory=dict, description="the student's settings as in a [[students]] table (name, losses, lr, ...) "
                                          "without arch/pretrained/from_teacher: each round starts from the previous "
                                          "round's model (round 1: start)")
    train: dict[str, Any] = Field(
        default_factory=dict, description="the run's settings as in `distill student` (max_steps per round, "
                                          "batch_size, eval_every, ...) without cache, sources, students, output_dir")

    @model_validator(mode="after")
    def _parts(self) -> "OnPolicyConfig":
        for prompts in (self.prompts, self.eval_prompts):
            if prompts is not None and (prompts.loss_mask != "all" or prompts.document_mask):
                raise ValueError("prompts: loss_mask and document_mask are for rows a teacher scores, not prompts")
        if self.eval_prompts is not None and self.eval_prompts.seq_len != self.prompts.seq_len:
            raise ValueError("eval_prompts.seq_len must be prompts.seq_len (the scored rows' length)")
        if self.capture is None and not self.offline:
            raise ValueError("give a [capture] table (how the teacher scores samples) or an offline cache to take "
                             "it from")
        for key in ("arch", "pretrained", "from_teacher"):
            if key in self.student:
                raise ValueError(f"student.{key}: an on-policy student starts from `start`, then from each round's "
                                 "model; drop it")
        for key in ("cache", "sources", "tasks", "students", "output_dir"):
            if key in self.train:
                raise ValueError(f"train.{key} is set by the loop per round; drop it")
        self.round_student_config(1, [("offline", "x", 1.0)], Path(self.dir))  # the student settings, checked now
        return self

    @property
    def student_name(self) -> str:
        return str(self.student.get("name", "student"))

    def round_student_config(self, r: int, sources: list[tuple[str, str, float]], out: Path,
                             model: str | None = None) -> "StudentRunConfig":
        """Round r's `distill student` settings: its sources (name, cache, weight), the student from `model`
        (default: start)."""
        try:
            return StudentRunConfig.model_validate({
                **self.train, "sources": [{"name": n, "cache": c, "weight": w} for n, c, w in sources],
                "output_dir": str(out), "storage_options": self.train.get("storage_options", self.storage_options),
                "students": [{"name": self.student_name, **self.student, "pretrained": model or self.start}]})
        except ValidationError as e:
            raise ValueError("student/train settings:\n" + describe_invalid(e)) from None


def dump_toml(cfg: dict) -> str:
    """Settings as TOML text that `load_config` reads back (tomli-w); None values, which TOML cannot hold, are left
    out: they are the defaults."""
    import tomli_w

    def kept(v):
        if isinstance(v, dict):
            return {k: kept(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [kept(x) for x in v]
        return v
    return tomli_w.dumps(kept(cfg))
