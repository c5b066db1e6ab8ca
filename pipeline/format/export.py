"""A cache's top-K targets as a Parquet dataset other tools read: `distill export CACHE OUT`.

`--format axolotl` writes the pre-tokenised columns axolotl's KD trainer consumes (its
`integrations/kd`, checked against commit 08a734b of axolotl-ai-cloud/axolotl: `ChatTemplateStrategyWithKDv2`
produces them, `AxolotlKDTrainer.compute_loss` reads them). One row per cache row, its real positions only:

    input_ids         (n,)    the row's token ids
    attention_mask    (n,)    ones
    labels            (n,)    the token where it trains (the cache's loss mask), -100 elsewhere and at 0
    target_token_ids  (n, K)  the teacher's top-K ids for predicting token t (row 0: 0..K-1, masked)
    target_logprobs   (n, K)  their log-probabilities, normalised over the whole vocabulary (row 0: -inf)
    target_mask       (n, K)  1 where labels[t] trains
    target_logsumexp  (n,)    logsumexp of the teacher's logits at T = 1 for predicting token t (row 0: NaN):
                              logit = logprob + logsumexp; tail mass = 1 - sum(exp(target_logprobs))
    target_label_logprob (n,) the teacher's log-prob of token t itself (row 0: NaN), when the cache has it
    position_ids      (n,)    0 where a document starts, +1 per token: the documents of a packed row that the teacher
                              kept apart (document_mask), as packed-sequence trainers read them; when the cache has them
    key               ()      the cache row's content key

axolotl aligns targets with the token they predict and shifts in the trainer (`target[..., 1:, :]`
against `logits[:, :-1]`); the cache stores them at the position that predicts, so row t of the export
is the cache's position t - 1. Nothing exact is lost: the log-probs are the cache's (float16 widened
to float32), normalised over the full vocabulary, and the logsumexp column keeps the logits.

`--format distillkit` writes what DistillKit's vLLM capture writes (see `distillkit.py`): per split folder,
`data_<i>.parquet` files and the `compression_config.yaml` that says how to read them, under lossless settings
(every one of the K log-probs a float32, so the cache's float16 values come back unchanged; ids in
ceil(log2 vocab) bits). One row per cache row, its real positions only, position t holding the distribution that
predicts token t + 1, as in the cache and in DistillKit:

    input_ids            (n,)          uint64   the row's token ids
    compressed_logprobs  (n - 1, 4K)   uint8    the top-K log-probs, float32 little-endian, most likely first
    bytepacked_indices   (n - 1, B)    uint8    their ids, bit-packed
    loss_mask            (n - 1,)      uint8    1 where the position trains (when the cache has a loss mask)
    target_logsumexp     (n - 1,)      float32  the logsumexp at T = 1 (logit = log-prob + logsumexp)
    position_ids         (n - 1,)      int32    document_mask caches: 0 where a document starts, +1 per token

The extras are per position, so DistillKit's packing (which concatenates every column and cuts input_ids to the
positions) keeps them in step; its trainer reads only the three columns it knows. A row's last position is not in
the layout (it predicts a token the row does not hold).

The export is written to OUT.partial-<pid> and renamed to OUT once complete: a folder at OUT is always
whole. Memory holds one shard's rows.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CacheError, StorageError
from . import distillkit
from .layout import row_column

FORMATS = ("axolotl", "distillkit")
EXPORT_RECORD = "distill_export.json"
IGNORE = -100


def axolotl_rows(cache, split: str):
    """The export's rows of one split, as Arrow tables of up to one shard each."""
    _causal_lm(cache, "axolotl")
    m = cache.manifest
    have_mask, have_label = "loss_mask" in m.fields, "target_logprob" in m.fields
    have_positions = "position_ids" in m.fields
    columns = ["input_ids", "length", "key"] + (["loss_mask"] if have_mask else []) + \
        (["position_ids"] if have_positions else [])
    K = m.capture.top_k
    for part, rows, start in cache.shard_rows(split, columns):
        ids, lengths = row_column(rows, "input_ids", np.int64), rows.column("length").to_numpy()
        mask = row_column(rows, "loss_mask", bool) if have_mask else None
        positions = row_column(rows, "position_ids", np.int32) if have_positions else None
        a, b = start, start + rows.num_rows
        top_ids = np.asarray(cache.array_part(split, part, "topk_ids")[a:b], np.int64)
        top_lp = np.asarray(cache.array_part(split, part, "topk_logprobs")[a:b], np.float32)
        lse = np.asarray(cache.array_part(split, part, "logsumexp")[a:b], np.float32)
        label = np.asarray(cache.array_part(split, part, "target_logprob")[a:b], np.float32) if have_label else None
        out = {k: [] for k in ("input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs",
                               "target_mask", "target_logsumexp", "target_label_logprob", "position_ids")}
        for i, n in enumerate(lengths):
            trains = np.zeros(n, bool)  # label t trains iff the cache's position t - 1 does
            trains[1:] = mask[i, : n - 1] if mask is not None else True
            labels = np.where(trains, ids[i, :n], IGNORE)
            t_ids = np.concatenate([np.arange(K)[None], top_ids[i, : n - 1]])
            t_lp = np.concatenate([np.full((1, K), -np.inf, np.float32), top_lp[i, : n - 1]])
            out["input_ids"].append(ids[i, :n].tolist())
            out["attention_mask"].append([1] * int(n))
            out["labels"].append(labels.tolist())
            out["target_token_ids"].append(t_ids.tolist())
            out["target_logprobs"].append(t_lp.tolist())
            out["target_mask"].append(np.repeat(trains[:, None], K, 1).astype(np.int8).tolist())
            out["target_logsumexp"].append(np.concatenate([[np.nan], lse[i, : n - 1]]).astype(np.float32).tolist())
            if label is not None:
                out["target_label_logprob"].append(np.concatenate([[np.nan], label[i, : n - 1]]).astype(np.float32)
                                                   .tolist())
            if positions is not None:
                out["position_ids"].append(positions[i, :n].tolist())
        extra = {"target_label_logprob": pa.array(out["target_label_logprob"], pa.list_(pa.float32()))} \
            if label is not None else {}
        if positions is not None:
            extra["position_ids"] = pa.array(out["position_ids"], pa.list_(pa.int32()))
        yield pa.table({**{k: out[k] for k in ("input_ids", "attention_mask", "labels")},
                        "target_token_ids": pa.array(out["target_token_ids"], pa.list_(pa.list_(pa.int32()))),
                        "target_logprobs": pa.array(out["target_logprobs"], pa.list_(pa.list_(pa.float32()))),
                        "target_mask": pa.array(out["target_mask"], pa.list_(pa.list_(pa.int8()))),
                        "target_logsumexp": pa.array(out["target_logsumexp"], pa.list_(pa.float32())),
                        **extra, "key": rows.column("key")})


def _causal_lm(cache, fmt: str) -> None:
    m = cache.manifest
    if m.task.classifier:
        raise CacheError(f"{cache.root}: a {m.task.type} teacher's cache has class targets, not next-token top-K: "
                         f"the {fmt} layout is for causal LM caches")


def distillkit_rows(cache, split: str, c: distillkit.Compression):
    """The DistillKit export's rows of one split (see the module doc), as Arrow tables of up to one shard each."""
    _causal_lm(cache, "distillkit")
    m = cache.manifest
    have_mask, have_positions = "loss_mask" in m.fields, "position_ids" in m.fields
    columns = ["input_ids", "length"] + (["loss_mask"] if have_mask else []) + \
        (["position_ids"] if have_positions else [])
    for part, rows, start in cache.shard_rows(split, columns):
        ids, lengths = row_column(rows, "input_ids", np.int64), rows.column("length").to_numpy().astype(np.int64)
        a, b = start, start + rows.num_rows
        top_ids = np.asarray(cache.array_part(split, part, "topk_ids")[a:b], np.int64)
        top_lp = np.asarray(cache.array_part(split, part, "topk_logprobs")[a:b], np.float32)
        lse = np.asarray(cache.array_part(split, part, "logsumexp")[a:b], np.float32)
        real = np.arange(ids.shape[1])[None] < (lengths[:, None] - 1)  # (R, L): the positions written
        lp_bytes, idx_bytes = distillkit.encode_exact(c, top_ids[real], top_lp[real])
        per_row = np.maximum(lengths - 1, 0)
        offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)

        def per_position(values: np.ndarray, typ) -> pa.Array:
            return pa.ListArray.from_arrays(offsets, pa.array(values[real], typ))

        def per_position_bytes(data: np.ndarray) -> pa.Array:
            inner = pa.ListArray.from_arrays(np.arange(0, data.size + 1, data.shape[1], dtype=np.int32),
                                             pa.array(data.reshape(-1), pa.uint8()))
            return pa.ListArray.from_arrays(offsets, inner)

        table = {"input_ids": pa.array([ids[i, :n] for i, n in enumerate(lengths)], pa.list_(pa.uint64())),
                 "compressed_logprobs": per_position_bytes(lp_bytes),
                 "bytepacked_indices": per_position_bytes(idx_bytes)}
        if have_mask:
            table["loss_mask"] = per_position(row_column(rows, "loss_mask", np.uint8), pa.uint8())
        table["target_logsumexp"] = per_position(lse, pa.float32())
        if have_positions:
            table["position_ids"] = per_position(row_column(rows, "position_ids", np.int32), pa.int32())
        yield pa.table(table)


def export(cache, out: str | Path, fmt: str = "axolotl", splits: list[str] | None = None, log=print) -> Path:
    """Write the cache's splits as Parquet datasets under `out` (`out/<split>/part-00000.parquet`, ...) with a
    record of where they came from; `out` must not exist."""
    if fmt not in FORMATS:
        raise CacheError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists():
        raise StorageError(f"{out} exists: export writes a new folder (remove it, or choose another)")
    splits = splits or cache.splits
    unknown = [s for s in splits if s not in cache.manifest.splits]
    if unknown:
        raise CacheError(f"{cache.root} has no split {unknown} (splits: {', '.join(cache.splits)})")
    m = cache.manifest
    compression = distillkit.lossless(m.teacher.vocab_size, m.capture.top_k) if fmt == "distillkit" else None
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = {}
        for split in splits:
            (tmp / split).mkdir(parents=True)
            rows = 0
            tables = axolotl_rows(cache, split) if fmt == "axolotl" else distillkit_rows(cache, split, compression)
            for i, table in enumerate(tables):
                pq.write_table(table, tmp / split / (f"part-{i:05d}.parquet" if fmt == "axolotl" else
                                                     f"data_{i}.parquet"))
                rows += table.num_rows
            counts[split] = rows
            if compression is not None:
                import yaml

                (tmp / split / distillkit.CONFIG_FILE).write_text(yaml.safe_dump(compression.to_dict()))
        layout = ("axolotl KD (integrations/kd, commit 08a734b): input_ids, attention_mask, labels, "
                  "target_token_ids, target_logprobs, target_mask; plus target_logsumexp, target_label_logprob, "
                  "position_ids (document_mask caches) and key" if fmt == "axolotl" else
                  "DistillKit (distillkit/compression, commit a61c2e7): input_ids, compressed_logprobs, "
                  f"bytepacked_indices, lossless ({distillkit.CONFIG_FILE}); plus loss_mask, target_logsumexp and "
                  "position_ids (document_mask caches) per position")
        record = {"format": fmt, "layout": layout, "document_mask": m.preparation.document_mask,
                  "cache": str(cache.root), "cache_digest": m.digest, "teacher": m.teacher.model,
                  "teacher_weights_sha256": m.teacher.weights_sha256, "tokenizer_fingerprint": m.tokenizer.fingerprint,
                  "top_k": m.capture.top_k, "rows": counts}
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{out}: " + ", ".join(f"{s} {n} rows" for s, n in counts.items()) + f" ({fmt} layout)")
    return out


def to_dataset(cache, split: str, fields: list[str] | None = None):
    """A split as a Hugging Face `datasets.Dataset` for a user's own loop: per row its `input_ids` (real positions),
    `key`, the loss mask and the position ids (document_mask) when the cache has them, and each field of `fields`
    (default: top-K ids, log-probs and logsumexp) cut to the row's real positions. Built a shard at a time
    (`Dataset.from_generator`: written to the datasets cache, so memory does not hold the split). Targets stay where
    the cache keeps them: position t predicts token t + 1."""
    import datasets

    m = cache.manifest
    fields = fields if fields is not None else [f for f in ("topk_ids", "topk_logprobs", "logsumexp") if f in m.fields]
    missing = [f for f in fields if f not in m.dense_fields]
    if missing:
        raise CacheError(f"{cache.root}: no dense field {missing} (has: {', '.join(m.dense_fields)})")
    if split not in m.splits:
        raise CacheError(f"{cache.root} has no split {split!r} (splits: {', '.join(cache.splits)})")
    columns = ["input_ids", "length", "key"] + [c for c in ("loss_mask", "position_ids") if c in m.fields]
    per_position = {f: m.fields[f].dims[1:2] == ("position",) for f in fields}

    def rows():
        for part, table, start in cache.shard_rows(split, columns):
            ids, lengths = row_column(table, "input_ids", np.int64), table.column("length").to_numpy()
            mask = row_column(table, "loss_mask", np.int8) if "loss_mask" in columns else None
            positions = row_column(table, "position_ids", np.int32) if "position_ids" in columns else None
            a, b = start, start + table.num_rows
            dense = {f: np.asarray(cache.array_part(split, part, f)[a:b]) for f in fields}
            keys = table.column("key").to_pylist()
            for i, n in enumerate(lengths):
                row = {"input_ids": ids[i, :n].tolist(), "key": keys[i]}
                if mask is not None:
                    row["loss_mask"] = mask[i, :n].tolist()
                if positions is not None:  # documents the teacher kept apart (document_mask): attend as it did
                    row["position_ids"] = positions[i, :n].tolist()
                for f in fields:
                    row[f] = (dense[f][i, :n] if per_position[f] else dense[f][i]).tolist()
                yield row
    return datasets.Dataset.from_generator(rows, gen_kwargs={}, keep_in_memory=False)
