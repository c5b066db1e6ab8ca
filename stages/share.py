"""Sharing commands: publish a cache, pull all or part of one, list the caches under a root.

    distill push data/caches/smollm2-stdlib s3://team-bucket/caches/smollm2-stdlib
    distill pull s3://team-bucket/caches/smollm2-stdlib data/caches/k64 --fields topk_ids,topk_logprobs,logsumexp
    distill ls s3://team-bucket/caches [--json]

URLs are anything fsspec opens (s3://, gs://, https:// read-only, hf://, memory://, file://); S3
endpoints and credentials come the usual way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws, ...).
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def push(
    cache: Annotated[str, typer.Argument(help="a finished cache (directory or URL)")],
    url: Annotated[str, typer.Argument(help="where to publish it (s3://bucket/prefix, a directory, ...)")],
    force: Annotated[bool, typer.Option("--force", help="replace a different cache at URL")] = False,
) -> None:
    """Publish a verified cache: data first, manifest last; a rerun resumes."""
    from pipeline.format.share import push as do_push

    do_push(cache, url, force=force, log=lambda m: typer.echo(m, err=True))
    typer.echo(url)


def pull(
    url: Annotated[str, typer.Argument(help="the cache to fetch (URL or directory)")],
    dest: Annotated[str, typer.Argument(help="an empty local directory (or one holding this pull, to resume)")],
    fields: Annotated[Optional[str], typer.Option(help="dense fields to fetch, comma-separated (default: all)")] = None,
    splits: Annotated[Optional[str], typer.Option(help="splits to fetch, comma-separated (default: all)")] = None,
) -> None:
    """Fetch a cache, or only some fields and splits, verifying every file as it arrives."""
    from pipeline.format.share import pull as do_pull

    do_pull(url, dest, _names(fields), _names(splits), log=lambda m: typer.echo(m, err=True))
    typer.echo(dest)


def ls(
    root: Annotated[str, typer.Argument(help="a directory or URL holding caches")],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per cache")] = False,
) -> None:
    """One line per finished cache under ROOT: teacher, data, tokens, fields, size, digest."""
    from pipeline.format.share import list_caches

    found = list_caches(root)  # a ROOT that does not exist is an error (exit 2)
    if not found:
        typer.echo(f"no finished caches under {root}", err=True)
    for c in found:
        if as_json:
            typer.echo(json.dumps(c, sort_keys=True))
            continue
        tokens = sum(s["tokens"] for s in c["splits"].values())
        typer.echo(f"{c['location']}  teacher {c['teacher']} ({str(c['weights_sha256'])[:12]})  data "
                   f"{c['dataset']} ({str(c['dataset_fingerprint'])[:12]})  "
                   + ",".join(f"{k}:{v['tokens']}" for k, v in c["splits"].items())
                   + f" tokens  fields {','.join(c['fields'])}  K={c['top_k']} T={c['temperatures']}  "
                   f"{c['bytes'] / 2**20:.1f} MiB ({c['bytes'] / max(tokens, 1):.1f} B/token)  v{c['format_version']}  "
                   f"{c['finished_at']}  digest {c['digest'][:16]}"
                   + (f"  subset of {c['subset_of'][:16]}" if c["subset_of"] else "")
                   + (f"  grown x{c['appends']} (parent {c['parent_digest'][:16]})" if c["appends"] else ""))
