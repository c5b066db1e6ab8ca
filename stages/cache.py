"""Commands on a finished cache, wherever it lives: what it holds (`inspect`), whether it is intact (`verify`).

    distill inspect data/caches/smollm2-stdlib [--json]
    distill verify  s3://team-bucket/caches/smollm2-stdlib
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import numpy as np
import typer

from pipeline.errors import DistillError
from pipeline.format import FORMAT_NAME, Cache, Manifest, row_column
from pipeline.format import verify as verify_cache
from pipeline.format.reader import read_document

INSPECT_ROWS = 1024  # the first rows of each split checked for the BOS convention


def inspect(
    cache: Annotated[str, typer.Argument(help="cache directory or URL (s3://, https://, ...)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the whole manifest")] = False,
) -> None:
    """Show what a finished cache holds: teacher, data, fields, sizes, statistics."""
    c = Cache(cache)
    if as_json:  # the document as stored (an older cache's own layout, its digest intact)
        typer.echo(json.dumps(read_document(c.storage), indent=2, sort_keys=True))
        return
    for line in describe(c.manifest, str(c.root)):
        typer.echo(line)
    if not c.manifest.task.classifier:
        _warn_missing_bos(c)


def describe(m: Manifest, where: str) -> list[str]:
    """The manifest in lines: identity, data, rows, what was captured, fields with their sizes, statistics."""
    t, p = m.teacher, m.preparation
    d = m.dataset
    lines = [f"cache        {where}  ({FORMAT_NAME} {m.recorded_version})",
             f"teacher      {t.model}  {t.model_type}, vocab {t.vocab_size}, {t.num_layers} layers, "
             f"{t.num_heads} heads, width {t.hidden_size}, {t.dtype} on {t.device_type}",
             f"             weights sha256 {t.weights_sha256}",
             f"tokenizer    {m.tokenizer.class_name}  fingerprint {m.tokenizer.fingerprint[:16]}...",
             f"dataset      {d['source']} split={d['split']} column="
             f"{d.get('columns', {}).get('token ids') or d['text_column']}  "
             f"{d['statistics']['documents']} documents, {len(d['data_files'])} files",
             f"rows         seq_len {p.seq_len}, {'packed' if p.packing else 'one document per row'}; "
             + ", ".join(f"{s.name}: {s.rows} rows / {s.tokens:,} tokens / {s.shards} shards"
                         for s in m.splits.values())]
    lines.append(_row_convention(m))
    if m.imported:
        i = m.imported
        lines.append(f"imported     {i.layout} layout; log-probs normalised over "
                     f"{'the whole vocabulary' if i.tail_known else 'the K ids given (renormalised: the tail is unknown)'}"
                     f" at temperature {i.temperature}; logsumexp {'given' if i.logsumexp else 'not given'}; teacher "
                     f"log-prob of the tokens {'given' if i.target_logprob else 'not known'}; positions held "
                     f"{i.entries[0]}..{i.entries[1]} entries, mean mass of the {i.top_k} kept {i.mean_mass:.4f}")
        if i.compression:
            from pipeline.format.distillkit import Compression

            lines.append(f"  compressed {Compression.from_dict(dict(i.compression)).describe()}; of the {i.top_k} "
                         f"kept, {i.exact_entries} exact" + (" (the rest lossy)" if i.lossy else ""))
        for split, share in (i.alignment or {}).items():
            lines.append(f"  alignment  {split}: predicted token among a position's entries {share['0']:.1%} "
                         f"(token before {share['-1']:.1%}, token after {share['+1']:.1%})"
                         + ("; NOT CHECKED (imported with --skip-alignment-check)" if i.alignment_checked is False
                            else ""))
    gen = d.get("generation")
    if gen:  # rows sampled by a model (distill generate): who, with what, in which round
        g, sp = gen.get("generator", {}), gen.get("sampling", {})
        lines.append(f"generated    by {g.get('model')} (weights sha256 {str(g.get('weights_sha256'))[:16]}..., "
                     f"{g.get('dtype')})" + (f", on-policy round {gen['round']}" if gen.get("round") is not None else "")
                     + f"; temperature {sp.get('temperature')}, top_p {sp.get('top_p')}, seed {sp.get('seed')}, "
                     f"max_new_tokens {sp.get('max_new_tokens')}")
    for g in m.grown:
        lines.append(f"grown        #{g.number}: +" + ", ".join(f"{k} {v}" for k, v in g.rows.items())
                     + f" rows ({g.tokens:,} tokens) from {g.dataset['source']} {len(g.dataset['data_files'])} "
                     f"files, {g.duplicate_rows_skipped} rows already cached skipped; parent {g.parent_digest[:16]}")
    lines.append(_captured(m))
    return lines + _fields(m) + [_stats(m)]


def _row_convention(m: Manifest) -> str:
    p, task = m.preparation, m.task
    if task.classifier:
        return (f"task         {task.type}: {len(task.labels)} labels {list(task.labels)} (column "
                f"{task.label_column!r}); one example per row with the tokenizer's special tokens, padded with id "
                f"{task.pad_token_id}")
    if m.imported:
        return f"row start    as imported (no BOS or EOS added); document mask {p.document_mask}"
    bos = p.bos
    return (f"row start    {'BOS (id %s)' % bos['token_id'] if bos and bos['applied'] else 'no BOS'}"
            + (f"; tokenizer adds BOS: {bos['tokenizer_adds_bos']}, data.bos = {bos['setting']!r}" if bos else
               " (cache made before BOS conventions were recorded)")
            + f"; data {p.format}" + (f", template {p.chat_template['source']} "
                                      f"sha256 {p.chat_template['sha256'][:12]}" if p.chat_template else "")
            + f"; loss mask {p.loss_mask}; document mask {p.document_mask}")


def _captured(m: Manifest) -> str:
    cap = m.capture
    layers = (f"hidden layers {list(cap.hidden_layers) or '-'} ({cap.hidden_dtype}), attention layers "
              f"{list(cap.attention_layers) or '-'}")
    if m.task.classifier:
        return (f"captured     every class's log-prob {'per token' if m.task.per_token else 'per row'}, "
                f"temperatures {list(cap.temperatures_all)}, {layers}")
    return (f"captured     top-{cap.top_k}, temperatures {list(cap.temperatures_all)}, {layers}"
            + (f"; sampled targets: {cap.samples} draws at T={cap.sample_temperature}" if cap.samples else "")
            + (f"; final hidden state ({cap.value('final_hidden_dtype')}) + LM head: exact full-vocabulary KD"
               if cap.final_hidden else "")
            + f"; top-K codec {cap.topk_codec}" + _precision(m))


def _precision(m: Manifest) -> str:
    """The log-probs' error bound and what it cost, for a bounded-error cache."""
    bound, kl = m.capture.logprob_precision, m.stats.logprob_kl
    if bound is None:
        return ""
    return (f"; log-probs rounded within {bound:g}/sqrt(p) nats, KL(exact || stored) per position mean "
            f"{kl['mean']:.2e}, max {kl['max']:.2e} over {kl['positions']:,} positions" if kl else
            f"; log-probs rounded within {bound:g}/sqrt(p) nats")


def _fields(m: Manifest) -> list[str]:
    per_tok, first = m.stats.bytes_per_token, next(iter(m.splits))
    lines = ["fields:"]
    for name, f in m.fields.items():
        size = per_tok.get(name, per_tok.get("rows.parquet") if not f.dense else None)
        extra = f"{size:9.1f} B/token" if size is not None and f.dense else " " * 16
        lines.append(f"  {name:20s} {f.format:8s} {f.dtype:8s} {str(list(f.shape[first])):22s} {extra}  "
                     f"{f.description}")
    lines.append(f"  rows.parquet (input_ids, length, key) {per_tok['rows.parquet']:.1f} B/token")
    if "lm_head.safetensors" in per_tok:
        head = per_tok["lm_head.safetensors"]
        lines.append(f"  lm_head.safetensors  {head * m.stats.tokens / 2**20:,.1f} MiB once per cache "
                     f"({head:.1f} B/token at this size)")
    dense_total = sum(v for k, v in per_tok.items() if k not in ("rows.parquet", "lm_head.safetensors"))
    lines.append(f"  total per token      {dense_total + per_tok['rows.parquet']:.1f} B/token (dense fields and rows)")
    return lines


def _stats(m: Manifest) -> str:
    st = m.stats
    quality = ("teacher accuracy on the gold labels: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                                   st.teacher_accuracy.items())
               if m.task.classifier else f"mean top-{m.capture.top_k} mass {st.mean_topk_mass:.4f}")
    if m.imported:  # stats count every token; a row's last position and untrained ones hold no target
        quality = f"mean top-{m.capture.top_k} mass {m.imported.mean_mass:.4f} at the trained positions"
    return (f"stats        {st.tokens:,} tokens, {st.bytes_on_disk / 2**20:,.1f} MiB on disk "
            f"({st.bytes_on_disk / max(st.tokens, 1):,.1f} B/token), {quality}, "
            f"{st.tokens_per_second:,.0f} tokens/s ({st.seconds:.1f} s)")


def _warn_missing_bos(c: Cache) -> None:
    """The first rows of each split against the BOS convention of the cache's tokenizer (to stderr)."""
    from pipeline.capture.documents import missing_bos_warning

    tok = c.tokenizer()
    for split in c.splits:
        rows = c.rows(split, columns=["input_ids", "length"], max_rows=INSPECT_ROWS)
        first = row_column(rows, "input_ids", np.int64)[:, 0]
        warning = missing_bos_warning(tok, first, rows.column("length").to_numpy(),
                                      f"split {split} (first {len(first)} rows)")
        if warning:
            typer.echo(warning, err=True)


def verify(cache: Annotated[str, typer.Argument(help="cache directory or URL (s3://, https://, ...)")],
           fields: Annotated[Optional[str], typer.Option(help="check only these dense fields (comma-separated)")] = None,
           splits: Annotated[Optional[str], typer.Option(help="check only these splits (comma-separated)")] = None,
           shards: Annotated[Optional[str], typer.Option(
               help="check only these shard numbers within each split: 3,7,10-19")] = None) -> None:
    """Recompute every checksum (or those of some fields, splits, shards), streamed; name each corrupt or missing
    file, shard index or unlisted file; exit 1 if any."""
    counts: dict = {}
    problems = verify_cache(cache, fields=_names(fields), splits=_names(splits), shards=_numbers(shards),
                            counts=counts)
    if problems:
        for line in problems:
            typer.echo(f"CORRUPT {line}", err=True)
        typer.echo(f"{cache}: {len(problems)} problem(s)", err=True)
        raise typer.Exit(1)
    subset = fields or splits or shards
    typer.echo(f"{cache}: OK ({counts['shards']} shards, {counts['files']} files verified"
               + (", a subset: unlisted files not scanned)" if subset else ")"))


def _names(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _numbers(value: str | None) -> list[int] | None:
    """'3,7,10-19' as shard numbers; anything else is a clear error."""
    if value is None:
        return None
    out = []
    for item in _names(value):
        a, _, b = item.partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            raise DistillError(f"--shards: {item!r} is not a shard number or range (e.g. 3,7,10-19)")
        out += list(range(int(a), int(b or a) + 1))
    return out


def export(
    cache: Annotated[str, typer.Argument(help="cache directory or URL")],
    out: Annotated[str, typer.Argument(help="a new folder for the Parquet dataset (refused if it exists)")],
    fmt: Annotated[str, typer.Option("--format", help="the column layout: axolotl (its KD trainer's columns, with "
                                                      "target_logsumexp kept) or distillkit (its compressed "
                                                      "files, lossless settings)")] = "axolotl",
    splits: Annotated[Optional[list[str]], typer.Option("--split", help="splits to export (repeatable; default "
                                                                        "all)")] = None,
) -> None:
    """Write a cache's top-K targets as a Parquet dataset that `datasets`, axolotl's KD trainer or DistillKit load."""
    from pipeline.format.export import export as run

    typer.echo(str(run(Cache(cache), out, fmt, splits, log=lambda m: typer.echo(m, err=True))))



def import_cache(
    source: Annotated[str, typer.Argument(help="a folder (its subfolders are splits), a .parquet or .jsonl file, or a "
                                               "URL, holding top-K log-probs in axolotl's KD layout, vLLM's "
                                               "prompt_logprobs or DistillKit's compressed files")],
    out: Annotated[str, typer.Argument(help="the new cache (a folder or URL; refused unless empty)")],
    teacher: Annotated[str, typer.Option(help="the teacher that made the log-probs: a hub id or folder whose "
                                              "config and tokenizer can be read (its weights are not loaded)")],
    tokenizer: Annotated[Optional[str], typer.Option(help="its tokenizer, when not the teacher's folder")] = None,
    layout: Annotated[Optional[str], typer.Option(help="axolotl, vllm or distillkit (default: from the "
                                                       "columns)")] = None,
    split: Annotated[Optional[str], typer.Option(help="the split a flat source becomes (default train), or the one "
                                                      "split folder to import")] = None,
    temperature: Annotated[float, typer.Option(help="the temperature the log-probs were computed at (not 1 "
                                                    "needs target_logsumexp)")] = 1.0,
    top_k: Annotated[Optional[int], typer.Option(help="entries kept per position (default: the most every trained "
                                                      "position holds; the rest go to the tail)")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="row length (default: the longest row)")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="ids allowed (default: the teacher config's vocab_size, "
                                                           "else the tokenizer's length)")] = None,
    rows_per_shard: Annotated[int, typer.Option(help="rows written and committed together")] = 64,
    overwrite: Annotated[bool, typer.Option(help="replace what OUT holds")] = False,
    skip_alignment_check: Annotated[bool, typer.Option(
        help="import even when the token each position predicts is not clearly the most frequent among its entries "
             "(a teacher that does not predict these rows); the shares are still measured and recorded")] = False,
) -> None:
    """Turn another tool's top-K log-prob dataset into a verified cache, and say which loss terms are exact on it."""
    from pipeline.capture.importer import ImportSettings

    if layout not in (None, "axolotl", "vllm", "distillkit"):
        raise DistillError(f"--layout {layout!r}: axolotl, vllm or distillkit")
    s = ImportSettings(source=source, out=out, teacher=teacher, tokenizer=tokenizer, layout=layout, split=split,
                       temperature=temperature, top_k=top_k, seq_len=seq_len, vocab_size=vocab_size,
                       rows_per_shard=rows_per_shard, overwrite=overwrite, check_alignment=not skip_alignment_check)
    import_and_report(s)


def import_and_report(s) -> None:
    """Import with the settings `s` (`ImportSettings`), verify the new cache, describe it, and print which loss
    terms are exact on it."""
    from pipeline.capture.importer import run_import
    from pipeline.train.terms import TERMS, on_import

    c = run_import(s, log=lambda m: typer.echo(m, err=True))
    problems = verify_cache(c.root)
    if problems:
        raise DistillError(f"{c.root}: the new cache does not verify: {problems[:3]}")
    for line in describe(c.manifest, str(c.root)):
        typer.echo(line)
    by = {}
    for name, term in TERMS.items():
        if term.computes(c.manifest.task.type):
            status, why = on_import(term, c.manifest)
            by.setdefault(status, []).append(name + (f" ({why})" if status == "approximate" else ""))
    for status in ("exact", "approximate", "unavailable"):
        if by.get(status):
            typer.echo(f"{status:<12} {', '.join(by[status])}")
