"""What a capture knows of its teacher before loading its weights, gathered once (`describe_teacher`): its
tokenizer and the architecture facts of its config; the settings checked against them (`checks.py`); a
classifier's labels and the id its rows are padded with (`labels.Classifier`, `rows.row_pad_id`); the device
this rank runs it on; and the device memory the capture will take, checked (`memory.py`). Bad settings fail
here, in seconds, before any row is prepared or weight read.

From these facts follow the fields the capture writes (`capture_specs`), among them the attention heads
each mapped layer stores (`stored_heads`), which the manifest records and the memory estimate counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import distributed, models
from ..config import TeacherCacheConfig
from ..errors import CaptureError, TeacherError
from ..format.specs import FieldSpec, field_specs
from .checks import check_settings, check_task
from .labels import Classifier
from .memory import WorkingSet, check_memory, parameter_count, working_set
from .rows import row_pad_id
from .tensor_parallel import check_tensor_parallel


@dataclass(frozen=True)
class TeacherFacts:
    """What the capture knows of its teacher before loading its weights."""

    spec: models.TeacherSpec
    tokenizer: object
    hidden: list[int]  # resolved hidden-state indices
    attention: list[int]  # resolved attention layers
    device: object  # torch.device
    classifier: Classifier | None  # a classification teacher's labels and padding; None for a causal LM
    memory: WorkingSet | None = None  # the device memory it will take, estimated


def describe_teacher(cfg: TeacherCacheConfig) -> TeacherFacts:
    """The teacher's tokenizer, architecture and task, its settings checked: no weights loaded."""
    tokenizer = models.load_tokenizer(cfg.teacher)
    model_config = models.load_model_config(cfg.teacher)
    spec = models.TeacherSpec.from_config(model_config)
    labels = check_task(cfg, model_config)
    hidden, attn = check_settings(cfg, spec, tokenizer)
    check_tensor_parallel(cfg, model_config, spec)
    device = teacher_device(cfg)
    classifier = None if labels is None else Classifier(cfg.teacher.task, labels, row_pad_id(model_config, tokenizer),
                                                        models.bidirectional(model_config, cfg.teacher.task))
    ws = working_set(cfg, spec, parameter_count(model_config, cfg.teacher.task), len(hidden), len(attn),
                     stored_heads(cfg.capture, spec))
    check_memory(cfg, ws, device, weight_shards(cfg))
    return TeacherFacts(spec, tokenizer, hidden, attn, device, classifier, ws)


def stored_heads(capture, spec: models.TeacherSpec) -> int:
    """Attention heads stored per captured layer: the kept heads, or 1 when they are averaged."""
    if capture.attention_head_reduce == "mean":
        return 1
    return len(capture.attention_heads or range(spec.num_heads))


def capture_specs(cfg: TeacherCacheConfig, teacher: TeacherFacts) -> list[FieldSpec]:
    """The dense fields the capture of `cfg` writes with this teacher, with their shapes and codecs."""
    c, spec, classifier = cfg.capture, teacher.spec, teacher.classifier
    hidden, attn = teacher.hidden, teacher.attention
    return field_specs(
        seq_len=cfg.data.seq_len, top_k=c.top_k, n_temperatures=len(c.temperatures),
        hidden=(len(hidden), spec.hidden_size) if hidden else None, hidden_dtype=c.hidden_dtype,
        attention=(len(attn), stored_heads(c, spec)) if attn else None, vocab_size=spec.vocab_size,
        topk_codec=c.topk_codec, hidden_codec=c.hidden_codec, samples=c.samples,
        final_hidden=(spec.hidden_size, c.final_hidden_dtype) if c.final_hidden else None,
        classes=len(classifier.labels.names) if classifier else None,
        per_token=bool(classifier and classifier.per_token),
        id_codes=c.topk_ids_encoding == "frequency-codes" and classifier is None)


def weight_shards(cfg: TeacherCacheConfig) -> int:
    """Over how many devices the weights are spread: teacher.tp_size, or a teacher.device_map's devices (1
    without either)."""
    import torch

    if cfg.teacher.tp_size > 1:
        return cfg.teacher.tp_size
    dm = cfg.teacher.device_map
    if isinstance(dm, dict):
        return len(set(dm.values()))
    return max(1, torch.cuda.device_count()) if dm else 1


def teacher_device(cfg: TeacherCacheConfig):
    """The device this rank runs the teacher on (its first device under a device_map)."""
    import torch

    dm = cfg.teacher.device_map
    if dm is not None:
        if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise CaptureError("teacher.device_map places one teacher over every device of a node: launch one rank "
                               "per node (torchrun --nproc_per_node 1), not "
                               f"{os.environ['LOCAL_WORLD_SIZE']}")
        on_gpu = torch.cuda.is_available() and not (isinstance(dm, dict) and
                                                    all(str(v) in ("cpu", "disk") for v in dm.values()))
        return torch.device("cuda" if on_gpu else "cpu")  # where the layers go is accelerate's; inputs follow them
    try:  # 'auto' and 'cuda' mean this rank's GPU under torchrun
        return distributed.device_for(cfg.teacher.device)
    except ValueError as e:
        raise TeacherError(str(e)) from None
