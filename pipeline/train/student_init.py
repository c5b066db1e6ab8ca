"""A student's model: built from a shape in the teacher's family, from a checkpoint or from the teacher's own
layers, and checked against the cache.

The teacher is never loaded: the family, vocabulary and special tokens come from the cache's
manifest and its tokenizer, or from the student's own tokenizer (`students[].tokenizer`, or its
pretrained checkpoint's): a student whose tokenizer differs from the cache's is a cross-tokenizer
student (`crosstok`), trained with the terms defined across tokenizers. A student whose embedding
matrix is padded beyond its vocabulary is fine: the padded ids are part of its tail.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from .. import attention, models
from ..config import TeacherConfig
from ..student_config import StudentConfig
from ..errors import StudentError, TeacherError
from ..format.layout import tokenizer_fingerprint
from ..format.manifest import Manifest


def describe_tokenizer_difference(ours, theirs) -> str:
    """A short human account of how two tokenizers differ."""
    va, vb = ours.get_vocab(), theirs.get_vocab()
    if len(va) != len(vb):
        return f"vocabulary sizes differ ({len(vb)} vs the cache's {len(va)})"
    moved = [(t, vb.get(t), i) for t, i in va.items() if vb.get(t) != i]
    if moved:
        t, j, i = sorted(moved, key=lambda x: x[2])[0]
        return f"{len(moved)} tokens have other ids (e.g. {t!r}: {j} vs the cache's {i})"
    sa, sb = ours.special_tokens_map, theirs.special_tokens_map
    if sa != sb:
        keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
        return "special tokens differ: " + ", ".join(f"{k} {sb.get(k)!r} vs {sa.get(k)!r}" for k in keys)
    return "added tokens or tokenizer class differ"


def label_settings(manifest: Manifest) -> dict:
    """A classifier student's config settings: the cache's labels, and the id its rows are padded with (a decoder
    classifier pools each row at its last token that is not padding)."""
    task = manifest.task
    if not task.classifier:
        return {}
    names = list(task.labels)
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)},
            "pad_token_id": task.pad_token_id}


def check_task(spec: StudentConfig, manifest: Manifest, config=None, source: str | None = None) -> None:
    """Refuse a student of another task than the cache's (its `task` setting, or what its checkpoint was saved
    for) and a classifier checkpoint trained on other labels."""
    task = manifest.task.type
    if spec.task is not None and spec.task != task:
        raise StudentError(f"student {spec.name!r}: task {spec.task!r}, but the cache holds a {task} teacher's targets")
    if config is None:
        return
    saved = models.checkpoint_task(config)
    if saved is not None and saved != task and not (task != "causal-lm" and saved == "causal-lm"):
        raise StudentError(f"student {spec.name!r}: {source} is a {saved} checkpoint "
                           f"({', '.join(config.architectures)}), the cache a {task} teacher's")
    if task != "causal-lm" and saved == task:
        theirs = models.LabelSet.from_config(config)
        if not theirs.generic and tuple(theirs.names) != manifest.task.labels:
            raise StudentError(f"student {spec.name!r}: {source} classifies into {theirs.names}, the cache's teacher "
                               f"into {list(manifest.task.labels)}; a student must predict the cache's labels, in its "
                               "order")


def student_tokenizer(spec: StudentConfig, manifest: Manifest, cache_tokenizer):
    """(tokenizer, cross): the student's tokenizer (its `tokenizer` setting, else its pretrained checkpoint's, else
    the cache's) and whether it differs from the cache's, which makes the student a cross-tokenizer one."""
    from transformers import AutoTokenizer

    if spec.pretrained is not None and models.missing_local_path(spec.pretrained) is not None:
        raise StudentError(f"student {spec.name!r}: pretrained path {models.missing_local_path(spec.pretrained)} "
                           "does not exist")
    src = spec.tokenizer
    if src is None and spec.pretrained is not None:
        local = Path(spec.pretrained)
        if not local.is_dir() or any((local / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                     "tokenizer.model")):
            src = spec.pretrained  # a bare local checkpoint is read with the cache's tokenizer
    if src is None:
        return cache_tokenizer, False
    if spec.tokenizer is not None and models.missing_local_path(str(Path(src).expanduser())) is not None:
        raise StudentError(f"student {spec.name!r}: tokenizer {src!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(src).expanduser()) if spec.tokenizer else src)
    except (OSError, ValueError) as e:
        raise StudentError(f"student {spec.name!r}: cannot load the tokenizer of {src}: {e}") from e
    if tokenizer_fingerprint(tok) == manifest.tokenizer.fingerprint:
        return cache_tokenizer, False
    return tok, True


def build_student(spec: StudentConfig, manifest: Manifest, tokenizer, device: torch.device, cross: bool = False):
    """A model of the cache's task ready to train (a causal LM with vocabulary >= the teacher's, or a classifier
    with the teacher's labels); teacher weights never read except by from_teacher. `tokenizer`: the student's
    (`student_tokenizer`), another than the cache's when `cross`."""
    task = manifest.task.type
    check_task(spec, manifest)
    if cross and task != "causal-lm":
        raise StudentError(f"student {spec.name!r} has another tokenizer than the cache: cross-tokenizer "
                           f"distillation is for causal-LM caches, this one holds a {task} teacher's targets")
    if spec.from_teacher is not None:
        return init_from_teacher(spec, manifest).to(device)
    vocab = len(tokenizer) if cross else manifest.teacher.vocab_size
    if spec.pretrained is not None:
        model = _pretrained(spec, manifest)
    else:
        model = from_arch(spec, manifest, tokenizer, vocab)
    if task != "causal-lm":
        return disable_dropout(model).to(device)
    check_output_rows(model, vocab, f"student {spec.name!r}", "its tokenizer's" if cross else "the cache's")
    return disable_dropout(model).to(device)


def check_output_rows(model, vocab: int, who: str, whose: str = "the cache's") -> None:
    """A causal LM's output layer must have a row for every id of the vocabulary it is compared in (the teacher's
    top-K ids are gathered from its logits: a missing row is an out-of-range gather, a device-side assert on
    CUDA)."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab:
        ids = "its" if whose == "its tokenizer's" else "the teacher's"
        raise StudentError(f"{who}: its output layer has {rows} rows, fewer than {whose} vocabulary ({vocab}); "
                           f"{ids} ids would not exist in it")


def _pretrained(spec: StudentConfig, manifest: Manifest):
    """A student from a checkpoint (hub id or local folder), checked to be of the cache's task and labels."""
    from transformers import AutoConfig

    src = spec.pretrained
    missing = models.missing_local_path(src)
    if missing is not None:
        raise StudentError(f"student {spec.name!r}: pretrained path {missing} does not exist")
    try:
        config = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise StudentError(f"student {spec.name!r}: cannot load {src}: {e}") from e
    check_task(spec, manifest, config, src)
    try:
        return models.auto_class(manifest.task.type).from_pretrained(src, dtype=torch.float32,
                                                                     **label_settings(manifest))
    except (OSError, ValueError) as e:
        raise StudentError(f"student {spec.name!r}: cannot load {src}: {e}") from e


def from_arch(spec: StudentConfig, manifest: Manifest, tokenizer, vocab: int):
    """A random-initialised model of the teacher's family with the shape `spec.arch`."""
    from transformers import AutoConfig

    a, t = spec.arch, manifest.teacher
    kwargs = dict(vocab_size=vocab, hidden_size=a.hidden_size, num_hidden_layers=a.num_layers,
                  num_attention_heads=a.num_heads, tie_word_embeddings=a.tie_word_embeddings,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                  pad_token_id=tokenizer.pad_token_id) | label_settings(manifest)
    cfg = AutoConfig.for_model(t.model_type, **kwargs)
    if a.num_kv_heads is not None:
        if not hasattr(cfg, "num_key_value_heads"):
            raise StudentError(f"student {spec.name!r}: the {t.model_type} family has no num_kv_heads")
        cfg.num_key_value_heads = a.num_kv_heads
    ffn = a.intermediate_size or derived_ffn_width(t, cfg, a.hidden_size)
    if ffn is not None:
        cfg.__setattr__("n_inner" if hasattr(cfg, "n_inner") else "intermediate_size", ffn)
    if t.max_positions and hasattr(cfg, "max_position_embeddings"):
        cfg.max_position_embeddings = t.max_positions
    elif t.max_positions and hasattr(cfg, "n_positions"):
        cfg.n_positions = t.max_positions
    torch.manual_seed(spec.seed)
    return models.auto_class(manifest.task.type).from_config(cfg, dtype=torch.float32)


DROPOUT_SETTINGS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
                    "activation_dropout", "summary_first_dropout", "classifier_dropout")


def disable_dropout(model):
    """Every student trains without dropout, whatever its source (arch, pretrained, from_teacher): the
    targets are soft already, and a step without randomness is what makes a resumed run reproduce an
    uninterrupted one. Both the config (what `save_pretrained` writes) and the live modules change."""
    for name in DROPOUT_SETTINGS:
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, 0.0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "dropout", "dropout_p"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    return model


def derived_ffn_width(teacher, cfg, hidden_size: int) -> int | None:
    """An `arch` student's FFN width when none is given: the teacher's FFN/width ratio (recorded in the
    manifest since format 1.2), else the family's default ratio, times the student's width, rounded to
    a multiple of 8. None for families that derive it from the width themselves (GPT-2's n_inner)."""
    if teacher.intermediate_size and teacher.hidden_size:
        ratio = teacher.intermediate_size / teacher.hidden_size
    else:
        from transformers import AutoConfig

        default = AutoConfig.for_model(teacher.model_type)
        ffn, width = getattr(default, "intermediate_size", None), getattr(default, "hidden_size", None)
        if not (isinstance(ffn, int) and isinstance(width, int) and width):
            return None
        ratio = ffn / width
    if not hasattr(cfg, "intermediate_size") and not hasattr(cfg, "n_inner"):
        return None
    return max(8, int(round(ratio * hidden_size / 8)) * 8)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def init_from_teacher(spec: StudentConfig, manifest: Manifest):
    """DistilBERT-style: the teacher's embeddings, norms, LM head and a subset of its layers.

    The teacher's weights are read once, here, from the path the manifest records; the choice of
    layers is stored in the student's config (`distill_init`) and so travels with the saved model.
    """
    t = manifest.teacher
    layers = list(range(0, t.num_layers, spec.from_teacher)) if isinstance(spec.from_teacher, int) \
        else list(spec.from_teacher)
    bad = [i for i in layers if not 0 <= i < t.num_layers]
    if bad or not layers or len(set(layers)) != len(layers):
        raise StudentError(f"student {spec.name!r}: from_teacher layers {spec.from_teacher} invalid for a teacher of "
                           f"{t.num_layers} layers (0..{t.num_layers - 1}, distinct)")
    source = TeacherConfig(model=t.model, gguf_file=t.gguf_file, revision=t.revision, dtype="float32",
                           task=manifest.task.type)
    _check_teacher_weights(spec, t, source)
    try:
        teacher = models.load_model(source, torch.device("cpu"))
    except TeacherError as e:
        raise StudentError(f"student {spec.name!r}: from_teacher reads the teacher's weights once, at creation, "
                           f"from {t.model!r}: {e}") from e
    cfg = teacher.config.__class__.from_dict(teacher.config.to_dict())
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    cfg.distill_init = {"from_teacher": t.model, "teacher_weights_sha256": t.weights_sha256, "layers": layers}
    student = models.auto_class(manifest.task.type).from_config(cfg, dtype=torch.float32)
    student.load_state_dict(_layer_subset(student.state_dict(), teacher.state_dict(), layers))
    del teacher
    return disable_dropout(student)


def _check_teacher_weights(spec: StudentConfig, t, source: TeacherConfig) -> None:
    """The weights at the teacher's path must be the ones the cache was made with (when it records them)."""
    recorded = t.weights_sha256
    found = models.weights_fingerprint(source)
    if recorded is not None and found != recorded:
        raise StudentError(
            f"student {spec.name!r}: from_teacher copies the weights at {t.model!r}, but "
            + (f"their sha256 {found} is not the {recorded} the cache was made with (the files changed since the "
               "capture)" if found else "they cannot be hashed there any more (not a local safetensors or GGUF "
               "teacher)")
            + "; a student copied from other weights would not match the cached targets")
    if recorded is None:
        warnings.warn(f"student {spec.name!r}: the cache records no weights hash for {t.model!r} (a hub "
                      "teacher): from_teacher cannot check that these are the weights the targets came from")


def _layer_subset(student_state: dict, teacher_state: dict, layers: list[int]) -> dict:
    """The student's state from the teacher's: layer i of the student is teacher layer layers[i]."""
    pattern = re.compile(r"\.(layers|h|layer)\.(\d+)\.")  # Llama-style, GPT-2, BERT
    new = {}
    for key in student_state:
        m = pattern.search(key)
        tk = key if m is None else key[: m.start()] + f".{m[1]}.{layers[int(m[2])]}." + key[m.end():]
        new[key] = teacher_state[tk].clone()
    return new


def check_student_document_masking(model, name: str, device) -> None:
    """Refuse a student whose architecture would attend across the documents of a packed row."""
    def run(ids, pos):
        return model(input_ids=ids, position_ids=pos, use_cache=False).logits

    was_training = model.training
    model.eval()
    try:
        attention.check_document_masking(run, model.config.vocab_size, device, f"student {name!r}")
    except attention.DocumentMaskError as e:
        raise StudentError(str(e)) from None
    finally:
        model.train(was_training)
