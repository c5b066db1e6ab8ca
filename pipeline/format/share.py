"""Sharing caches: publish (`push`), fetch all or part (`pull`), and find (`ls`), on any storage.

- push: a finished cache that verifies is copied to a URL, data first and `manifest.json` last, so a
  reader never sees a half-published cache. A rerun skips objects already there with the right
  size and sha256 (resumable). A different cache at the URL is replaced only when asked (its
  manifest is removed first).
- pull: every file, or only the named fields and splits, each checked against the manifest's
  sha256 as it arrives; a rerun resumes. The result is itself a cache whose manifest says which
  fields and splits it holds (`subset`) and which cache it came from.
- ls: one line (or one JSON object) per finished cache under a root.
No torch, no transformers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from .cache import (HEAD_FILE, MANIFEST, CacheError, file_digest, file_owner, manifest_digest, manifest_files,
                     read_manifest, verify)
from .storage import Storage, fetch_verified

PULL_MARKER = ".pull.json"  # in DEST while a pull is under way


def push(src: str | Path, dest: str, force: bool = False, log: Callable[[str], None] = print) -> dict:
    source = Storage(src)
    manifest = read_manifest(source)
    raw = source.read_bytes(MANIFEST)  # the version pushed: the source may grow meanwhile
    if json.loads(raw).get("digest") != manifest["digest"]:
        raise CacheError(f"{src} changed while it was being read (an append finished?); rerun")
    problems = verify(source)
    if problems:
        raise CacheError(f"{src} does not verify, so it is not pushed: " + "; ".join(problems[:3]))
    target = Storage(dest)
    if target.exists(MANIFEST):
        try:
            theirs = json.loads(target.read_bytes(MANIFEST)).get("digest")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            theirs = None
        parents = [g["parent_digest"] for g in manifest.get("grown", [])]
        if theirs in parents:
            log(f"{dest} holds an earlier version of this cache; sending what it grew by")  # its files stay valid
        elif theirs != manifest["digest"]:
            if not force:
                raise CacheError(f"{dest} holds another cache (digest {str(theirs)[:16]}...); pass --force to "
                                 "replace it")
            log(f"replacing the cache at {dest}")
            target.remove(MANIFEST)  # readers see no cache while it is rewritten
    files = manifest_files(manifest)
    present = target.files()
    t0 = time.perf_counter()
    sent = skipped = sent_bytes = 0
    for rel, dig in files.items():
        if present.get(rel) == dig["bytes"] and target.digest(rel) == dig:
            skipped += 1
            continue
        target.copy_from(source, rel)
        sent += 1
        sent_bytes += dig["bytes"]
    after = target.files()
    wrong = [rel for rel, dig in files.items() if after.get(rel) != dig["bytes"]]
    if wrong:
        raise CacheError(f"push to {dest}: {len(wrong)} objects have the wrong size after upload (first: {wrong[0]}); "
                         "rerun to retry")
    target.write_bytes(MANIFEST, raw)
    seconds = time.perf_counter() - t0
    log(f"pushed {src} -> {dest}: {sent} files ({sent_bytes / 2**20:.1f} MiB) sent, {skipped} already there, "
        f"{seconds:.1f}s")
    return {"sent": sent, "skipped": skipped, "bytes": sent_bytes, "seconds": seconds}


def _selection(manifest: dict, fields: list[str] | None, splits: list[str] | None) -> tuple[list[str], list[str]]:
    dense = [k for k, v in manifest["fields"].items() if v["format"] == "zarr-v3"]
    if fields is not None:
        unknown = [f for f in fields if f not in manifest["fields"]]
        if unknown:
            raise CacheError(f"--fields names {', '.join(unknown)}, which the cache does not hold "
                             f"(fields: {', '.join(manifest['fields'])})")
    if splits is not None:
        unknown = [s for s in splits if s not in manifest["splits"]]
        if unknown:
            raise CacheError(f"--splits names {', '.join(unknown)}, which the cache does not hold "
                             f"(splits: {', '.join(manifest['splits'])})")
    keep_fields = dense if fields is None else [f for f in dense if f in fields]
    keep_splits = list(manifest["splits"]) if splits is None else [s for s in manifest["splits"] if s in splits]
    return keep_fields, keep_splits


def subset_manifest(manifest: dict, fields: list[str], splits: list[str], source: str) -> dict:
    """The manifest of the part of a cache holding only these dense fields and splits."""
    def wanted(rel: str) -> bool:
        split, field = file_owner(manifest, rel)
        if split is None:  # tokenizer/ and other cache-wide files; the LM head only for its final hidden states
            return rel != HEAD_FILE or "final_hidden" in fields
        return split in splits and (field is None or field in fields)  # a part's rows and group, or a kept field

    sub = dict(manifest)
    sub["fields"] = {k: v for k, v in manifest["fields"].items() if v["format"] != "zarr-v3" or k in fields}
    sub["splits"] = {s: v for s, v in manifest["splits"].items() if s in splits}
    sub["shards"] = [{**sh, "files": {r: d for r, d in sh["files"].items() if wanted(r)}}
                     for sh in manifest["shards"] if sh["split"] in splits]
    sub["metadata_files"] = {r: d for r, d in manifest["metadata_files"].items() if wanted(r)}
    sub["subset"] = {"of_digest": manifest["digest"], "source": source, "fields": fields, "splits": splits}
    sub.pop("digest", None)
    sub["digest"] = manifest_digest(sub)
    return sub


def pull(url: str, dest: str | Path, fields: list[str] | None = None, splits: list[str] | None = None,
         log: Callable[[str], None] = print) -> dict:
    source = Storage(url)
    manifest = read_manifest(source)
    raw = source.read_bytes(MANIFEST)  # the version pulled, written at the end: the source may grow meanwhile
    if json.loads(raw).get("digest") != manifest["digest"]:
        raise CacheError(f"{url} changed while it was being read (an append finished?); rerun")
    keep_fields, keep_splits = _selection(manifest, fields, splits)
    whole = keep_splits == list(manifest["splits"]) and \
        keep_fields == [k for k, v in manifest["fields"].items() if v["format"] == "zarr-v3"]
    target = subset_manifest(manifest, keep_fields, keep_splits, url) if not whole else manifest
    out = Path(dest)
    request = {"source_digest": manifest["digest"], "fields": keep_fields, "splits": keep_splits}
    marker = out / PULL_MARKER
    if (out / MANIFEST).exists():
        mine = read_manifest(out)
        if mine["digest"] == target["digest"]:
            log(f"{out} already holds this pull; nothing to do")
            return {"fetched": 0, "skipped": len(manifest_files(mine)), "bytes": 0, "seconds": 0.0}
        raise CacheError(f"{out} holds another cache (digest {mine['digest'][:16]}...); pull into an empty directory")
    if out.exists() and any(out.iterdir()):
        if not marker.exists() or json.loads(marker.read_text()) != request:
            raise CacheError(f"{out} is not empty and holds no unfinished pull of this selection; choose an empty "
                             "directory")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(request))
    t0 = time.perf_counter()
    fetched = skipped = fetched_bytes = 0
    for rel, dig in manifest_files(target).items():
        local = out / rel
        if local.is_file() and file_digest(local) == {"bytes": dig["bytes"], "sha256": dig["sha256"]}:
            skipped += 1
            continue
        fetch_verified(source, rel, dig, local)
        fetched += 1
        fetched_bytes += dig["bytes"]
    Storage(out).write_bytes(MANIFEST, json.dumps(target, indent=2, sort_keys=True).encode() + b"\n"
                             if not whole else raw)
    marker.unlink()
    seconds = time.perf_counter() - t0
    log(f"pulled {url} -> {out}: {fetched} files ({fetched_bytes / 2**20:.1f} MiB) fetched and verified, "
        f"{skipped} already there, {seconds:.1f}s" + ("" if whole else f"; fields {', '.join(keep_fields)}, "
                                                                        f"splits {', '.join(keep_splits)}"))
    return {"fetched": fetched, "skipped": skipped, "bytes": fetched_bytes, "seconds": seconds}


def list_caches(root: str) -> list[dict]:
    """Every finished cache at ROOT or one or two levels below it, summarised."""
    st = Storage(root)
    found = ([MANIFEST] if st.exists(MANIFEST) else []) + st.glob(f"*/{MANIFEST}") + st.glob(f"*/*/{MANIFEST}")
    out = []
    for rel in found:
        where = st.location + ("/" + rel[: -len(MANIFEST) - 1] if rel != MANIFEST else "")
        try:
            m = read_manifest(Storage(where))
        except CacheError:
            continue  # not a cache of this format: not listed
        tokens = sum(v["tokens"] for v in m["splits"].values())
        size = sum(d["bytes"] for d in manifest_files(m).values())
        t = m["teacher"]
        out.append({
            "location": where, "teacher": t["model"], "weights_sha256": t.get("weights_sha256"),
            "dataset": m["dataset"]["source"], "dataset_fingerprint": m["dataset"].get("datasets_fingerprint"),
            "splits": {s: {"rows": v["rows"], "tokens": v["tokens"]} for s, v in m["splits"].items()},
            "fields": [k for k, v in m["fields"].items() if v["format"] == "zarr-v3"],
            "top_k": m["capture"]["top_k"], "temperatures": m["capture"]["temperatures_all"],
            "bytes": size, "bytes_per_token": size / max(tokens, 1), "format_version": m["format_version"],
            "finished_at": m["stats"]["timing"].get("finished_at"), "digest": m["digest"],
            "subset_of": m.get("subset", {}).get("of_digest"),
            "appends": len(m.get("grown", [])),
            "parent_digest": m["grown"][-1]["parent_digest"] if m.get("grown") else None,
        })
    return out
