"""Checks of a capture's settings, before any work: against the teacher's architecture and task, the
output location and its disk; and, once the teacher is loaded, whether it keeps packed documents apart
and whether it is in distribution on the first rows. Each failure names the setting to change.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .. import models
from ..config import TeacherCacheConfig
from ..errors import CaptureError
from ..format.specs import FieldSpec
from ..format.storage import Storage, StorageError

DISK_MARGIN_BYTES = 64 << 20


def _resolve_layers(indices: list[int], n: int, what: str, allowed: str) -> list[int]:
    out = []
    for i in indices:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise CaptureError(f"{what} {i} does not exist: the teacher has {allowed}")
        if j in out:
            raise CaptureError(f"{what} {i} is listed twice")
        out.append(j)
    return out


def check_task(cfg: TeacherCacheConfig, model_config) -> models.LabelSet | None:
    """teacher.task against the checkpoint: its head must be the task's (a classifier's trained head, not one
    transformers would initialise at random), a decoder classifier must know its padding id. Returns the
    classifier's labels (None for a causal LM)."""
    task, saved = cfg.teacher.task, models.checkpoint_task(model_config)
    arch = ", ".join(getattr(model_config, "architectures", None) or []) or "checkpoint without recorded architecture"
    if task == "causal-lm" and saved not in (None, task):
        raise CaptureError(f"teacher {cfg.teacher.model!r} is a {arch} (a {saved} checkpoint): set "
                           f"teacher.task = {saved!r}")
    if task != "causal-lm" and saved != task:  # a base model, a masked LM, another head: a random classifier
        raise CaptureError(f"teacher.task = {task!r}, but {cfg.teacher.model!r} is a {arch}, not a {task} "
                           f"checkpoint: its {task} head would be initialised at random; fine-tune a {task} model "
                           "first")
    if task == "causal-lm":
        return None
    labels = models.LabelSet.from_config(model_config)
    if len(labels.names) < 2:
        raise CaptureError(f"teacher {cfg.teacher.model!r} has {len(labels.names)} labels (config.num_labels): "
                           "a classifier needs at least 2")
    if task == "sequence-classification" and models.config_pad_id(model_config) is None:
        raise CaptureError(f"teacher {cfg.teacher.model!r} has no pad_token_id in its config: transformers refuses "
                           "batches of more than one row without it (a decoder classifier pools each row at its last "
                           "token that is not padding, found by that id); set config.pad_token_id when saving it")
    return labels


def check_settings(cfg: TeacherCacheConfig, spec: models.TeacherSpec, tokenizer) -> tuple[list[int], list[int]]:
    """Settings against the teacher's architecture; returns resolved (hidden, attention) layers."""
    c = cfg.capture
    if cfg.teacher.task == "causal-lm" and c.top_k > spec.vocab_size:
        raise CaptureError(f"capture.top_k={c.top_k} is larger than the teacher's vocabulary ({spec.vocab_size})")
    if spec.max_positions is not None and cfg.data.seq_len > spec.max_positions:
        raise CaptureError(f"data.seq_len={cfg.data.seq_len} exceeds the teacher's {spec.max_positions} positions")
    if len(tokenizer) > spec.vocab_size:
        raise CaptureError(f"the tokenizer has {len(tokenizer)} tokens but the teacher's head only {spec.vocab_size}")
    n_hs = spec.num_layers + 1
    hidden = _resolve_layers(c.hidden_layers, n_hs, "capture.hidden_layers index",
                             f"{n_hs} hidden states (0 = embeddings .. {n_hs - 1} = final, or -{n_hs}..-1)")
    attn = _resolve_layers(c.attention_layers, spec.num_layers, "capture.attention_layers index",
                           f"{spec.num_layers} layers (0..{spec.num_layers - 1}, or -{spec.num_layers}..-1)")
    if c.attention_heads is not None:
        if not attn:
            raise CaptureError("capture.attention_heads is set but capture.attention_layers is empty")
        bad = [h for h in c.attention_heads if not 0 <= h < spec.num_heads]
        if bad or not c.attention_heads:
            raise CaptureError(f"capture.attention_heads {bad or '[]'} invalid: the teacher has heads "
                               f"0..{spec.num_heads - 1}")
    if c.topk_codec == "pcodec":
        try:
            import numcodecs.pcodec  # noqa: F401  (needs the pcodec package: numcodecs[pcodec])
        except ImportError:
            raise CaptureError("capture.topk_codec='pcodec' needs the pcodec package (pip install 'numcodecs[pcodec]'),"
                               " which is not installed; install it or set capture.topk_codec='zstd'") from None
    return hidden, attn


def check_output_dir(st: Storage) -> None:
    """The output location takes a write (on object storage: a probe object, removed again)."""
    try:
        if st.is_local:
            st.local_path().mkdir(parents=True, exist_ok=True)
        st.write_bytes(".write-test", b"")
        st.remove(".write-test")
    except (OSError, StorageError) as e:
        raise CaptureError(f"output directory {st.location} is not writable: {getattr(e, 'strerror', None) or e}") from None


INDEX_BYTES_PER_FILE = 160  # a shard index row, uncompressed: path, sha256, numbers


def estimate_bytes(specs: list[FieldSpec], seq_len: int, data=None, shard_rows: int | None = None) -> dict[str, float]:
    """Uncompressed bytes per token per field (an upper bound: zstd only shrinks them), and of the shard index."""
    est = {s.name: s.bytes_per_row / seq_len for s in specs}
    est["rows.parquet"] = 4 + 24 / seq_len  # input_ids, length, key
    if data is not None:
        est["rows.parquet"] += (data.loss_mask != "all") * 1 + data.document_mask * 4  # loss_mask, position_ids
    if shard_rows is not None:
        est["shards.parquet"] = INDEX_BYTES_PER_FILE * len(specs) / (shard_rows * seq_len)
    return est


def check_disk(out: Path, need: int) -> None:
    free = shutil.disk_usage(out).free
    if free < need + DISK_MARGIN_BYTES:
        raise CaptureError(f"not enough disk at {out}: the cache needs up to {need / 2**20:.1f} MiB "
                           f"(+{DISK_MARGIN_BYTES >> 20} MiB margin), {free / 2**20:.1f} MiB free")


def check_teacher_document_masking(computer, spec, dtype: str) -> None:
    from ..attention import DocumentMaskError, check_document_masking

    def run(ids, pos):
        return computer.base(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state

    try:
        check_document_masking(run, spec.vocab_size, computer.device, f"teacher {spec.model_type!r}",
                               rel_tol=1e-3 if dtype == "float32" else 5e-2)
    except DocumentMaskError as e:
        raise CaptureError(str(e)) from None


NEAR_UNIFORM = 0.9  # a teacher NLL above this share of log(V) is close to a uniform guess


BOS_GAIN_NATS = 0.05  # the other BOS choice must beat the rows' by this much (and 2%) to be flagged


def first_rows_check(computer, rows, tokenizer, convention: dict, spec, n_rows: int = 2
                     ) -> list[str]:
    """Is the teacher in distribution on the rows it is about to label? Its mean NLL on the first
    rows, against a uniform guess (log V) and, when its tokenizer has a BOS token, against the same
    rows with the other BOS choice (the same tokens predicted). Returns log lines, warnings first."""
    import math

    k = min(n_rows, len(rows))
    ids, lens = rows.input_ids[:k], rows.lengths[:k]
    bos = tokenizer.bos_token_id
    applied = convention["bos"]["applied"]
    L = ids.shape[1]
    lines, note = [], ""
    if bos is None or L <= 2:
        nll = float(np.nanmean(-computer(ids, lens).target_logprob))
    else:  # the rows' content with and without a leading BOS; the prepared rows are one of the two
        content = np.zeros_like(ids)
        m = lens - 1 if applied else lens.copy()
        for i in range(k):
            row = ids[i, 1 : lens[i]] if applied else ids[i, : lens[i]]
            content[i, : len(row)] = row
        with_bos = np.concatenate([np.full((k, 1), bos, dtype=ids.dtype), content[:, :-1]], 1)
        lp_with = computer(with_bos, np.minimum(m + 1, L).astype(np.int32)).target_logprob
        lp_without = computer(content, m.astype(np.int32)).target_logprob
        nll = float(np.nanmean(-(lp_with if applied else lp_without)))
        a, b = lp_with[:, 1 : L - 1], lp_without[:, : L - 2]  # both predict content[1 : L - 1]
        both = np.isfinite(a) & np.isfinite(b)
        if both.any():
            nll_with, nll_without = float(-a[both].mean()), float(-b[both].mean())
            ours, other = (nll_with, nll_without) if applied else (nll_without, nll_with)
            note = f"; on the same tokens {nll_with:.3f} with BOS, {nll_without:.3f} without"
            if other < ours - max(BOS_GAIN_NATS, 0.02 * ours):
                lines.append(f"warning: the teacher predicts the first rows better {'without' if applied else 'with'} "
                             f"a leading BOS ({other:.3f} vs {ours:.3f} nats/token as prepared): the rows may not be "
                             f"what it expects; see data.bos (now {convention['bos']['setting']!r})")
    log_v = math.log(spec.vocab_size)
    if nll > NEAR_UNIFORM * log_v:
        lines.insert(0, f"warning: the teacher's NLL on the first {k} rows is {nll:.3f} nats/token, close to a "
                        f"uniform guess over its vocabulary (log V = {log_v:.3f}): check that the teacher, its "
                        "tokenizer and the data belong together")
    lines.append(f"first-rows check: teacher NLL {nll:.3f} nats/token on {k} rows{note}")
    return lines
