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
from itertools import chain
from pathlib import Path
from typing import Callable

from ..errors import CacheError
from .layout import HEAD_FILE, MANIFEST, file_digest
from .manifest import Manifest, manifest_digest
from .reader import Cache, read_manifest
from .storage import Storage, fetch_verified
from .verify import verify

PULL_MARKER = ".pull.json"  # in DEST while a pull is under way


def _read_pinned(source: Storage, where: str) -> tuple[Manifest, bytes]:
    """The source's manifest and its bytes as read once: the version pushed or pulled, even if the source
    grows meanwhile."""
    manifest = read_manifest(source)
    raw = source.read_bytes(MANIFEST)
    if json.loads(raw).get("digest") != manifest.digest:
        raise CacheError(f"{where} changed while it was being read (an append finished?); rerun")
    return manifest, raw


def push(src: str | Path, dest: str, force: bool = False, log: Callable[[str], None] = print) -> dict:
    source = Storage(src)
    manifest, raw = _read_pinned(source, str(src))
    problems = verify(source)
    if problems:
        raise CacheError(f"{src} does not verify, so it is not pushed: " + "; ".join(problems[:3]))
    target = Storage(dest)
    if target.exists(MANIFEST):
        _make_room(target, manifest, dest, force, log)
    t0 = time.perf_counter()
    sent = skipped = sent_bytes = 0
    for rel, dig, _ in Cache(source).iter_files():  # streamed: the shard indexes a row group at a time
        if target.exists(rel) and target.digest(rel) == dig.to_dict():
            skipped += 1
            continue
        target.copy_from(source, rel)
        if target.size(rel) != dig.bytes:
            raise CacheError(f"push to {dest}: {rel} has the wrong size after upload; rerun to retry")
        sent += 1
        sent_bytes += dig.bytes
    target.write_bytes(MANIFEST, raw)
    seconds = time.perf_counter() - t0
    log(f"pushed {src} -> {dest}: {sent} files ({sent_bytes / 2**20:.1f} MiB) sent, {skipped} already there, "
        f"{seconds:.1f}s")
    return {"sent": sent, "skipped": skipped, "bytes": sent_bytes, "seconds": seconds}


def _make_room(target: Storage, manifest: Manifest, dest: str, force: bool, log) -> None:
    """A cache at the push's destination: an earlier version of this one is grown in place; another one is
    replaced only with `force` (its manifest removed first, so readers never see a mix)."""
    try:
        theirs = json.loads(target.read_bytes(MANIFEST)).get("digest")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        theirs = None
    if theirs is not None and manifest.descends_from(theirs) is not None:
        log(f"{dest} holds an earlier version of this cache; sending what it grew by")  # its files stay valid
    elif theirs != manifest.digest:
        if not force:
            raise CacheError(f"{dest} holds another cache (digest {str(theirs)[:16]}...); pass --force to "
                             "replace it")
        log(f"replacing the cache at {dest}")
        target.remove(MANIFEST)  # readers see no cache while it is rewritten


def _selection(manifest: Manifest, fields: list[str] | None, splits: list[str] | None
               ) -> tuple[list[str], list[str]]:
    dense = manifest.dense_fields
    if fields is not None:
        unknown = [f for f in fields if f not in manifest.fields]
        if unknown:
            raise CacheError(f"--fields names {', '.join(unknown)}, which the cache does not hold "
                             f"(fields: {', '.join(manifest.fields)})")
    if splits is not None:
        unknown = [s for s in splits if s not in manifest.splits]
        if unknown:
            raise CacheError(f"--splits names {', '.join(unknown)}, which the cache does not hold "
                             f"(splits: {', '.join(manifest.splits)})")
    keep_fields = dense if fields is None else [f for f in dense if f in fields]
    keep_splits = list(manifest.splits) if splits is None else [s for s in manifest.splits if s in splits]
    return keep_fields, keep_splits


def subset_manifest(manifest: Manifest, fields: list[str], splits: list[str], source: str) -> Manifest:
    """The manifest of the part of a cache holding only these dense fields and splits."""
    def wanted(rel: str) -> bool:
        split, field = manifest.file_owner(rel)
        if split is None:  # tokenizer/ and other cache-wide files; the LM head only for its final hidden states
            return rel != HEAD_FILE or "final_hidden" in fields
        return split in splits and (field is None or field in fields)  # a part's rows and group, or a kept field

    sub = manifest.to_dict()
    sub["fields"] = {k: v for k, v in sub["fields"].items() if not manifest.fields[k].dense or k in fields}
    sub["splits"] = {s: v for s, v in sub["splits"].items() if s in splits}
    if "shards" in sub:  # written before 3.0: the manifest lists the shards
        sub["shards"] = [{**sh, "files": {r: d for r, d in sh["files"].items() if wanted(r)}}
                         for sh in sub["shards"] if sh["split"] in splits]
    else:  # the kept parts' indexes, whole: they also list the fields left behind, which `fields` omits
        sub["shard_index"] = {p: e for p, e in sub["shard_index"].items() if manifest.file_owner(e["path"])[0] in splits}
    sub["metadata_files"] = {r: d for r, d in sub["metadata_files"].items() if wanted(r)}
    sub["subset"] = {"of_digest": manifest.digest, "source": source, "fields": fields, "splits": splits}
    sub.pop("digest", None)
    sub["digest"] = manifest_digest(sub)
    return Manifest.from_dict(sub)


def pull(url: str, dest: str | Path, fields: list[str] | None = None, splits: list[str] | None = None,
         log: Callable[[str], None] = print) -> dict:
    source = Storage(url)
    manifest, raw = _read_pinned(source, url)
    keep_fields, keep_splits = _selection(manifest, fields, splits)
    whole = keep_splits == list(manifest.splits) and keep_fields == manifest.dense_fields
    target = subset_manifest(manifest, keep_fields, keep_splits, url) if not whole else manifest
    out = Path(dest)
    request = {"source_digest": manifest.digest, "fields": keep_fields, "splits": keep_splits}
    marker = out / PULL_MARKER
    if (out / MANIFEST).exists():
        mine = read_manifest(out)
        if mine.digest == target.digest:
            log(f"{out} already holds this pull; nothing to do")
            return {"fetched": 0, "skipped": 0, "bytes": 0, "seconds": 0.0}
        raise CacheError(f"{out} holds another cache (digest {mine.digest[:16]}...); pull into an empty directory")
    if out.exists() and any(out.iterdir()):
        if not marker.exists() or json.loads(marker.read_text()) != request:
            raise CacheError(f"{out} is not empty and holds no unfinished pull of this selection; choose an empty "
                             "directory")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(request))
    t0 = time.perf_counter()
    fetched = skipped = fetched_bytes = 0
    src = Cache(source, mirror=out)  # the kept parts' shard indexes are fetched (verified) into DEST itself
    files = chain(target.metadata_files.items(), ((rel, d) for rel, d, _ in src.iter_files(keep_fields, keep_splits,
                                                                                            metadata=False)))
    for rel, dig in files:
        local = out / rel
        if local.is_file() and file_digest(local) == dig.to_dict():
            skipped += 1
            continue
        fetch_verified(source, rel, dig.to_dict(), local)
        fetched += 1
        fetched_bytes += dig.bytes
    Storage(out).write_bytes(MANIFEST, json.dumps(target.to_dict(), indent=2, sort_keys=True).encode() + b"\n"
                             if not whole else raw)
    marker.unlink()
    seconds = time.perf_counter() - t0
    log(f"pulled {url} -> {out}: {fetched} files ({fetched_bytes / 2**20:.1f} MiB) fetched and verified, "
        f"{skipped} already there, {seconds:.1f}s" + ("" if whole else f"; fields {', '.join(keep_fields)}, "
                                                                        f"splits {', '.join(keep_splits)}"))
    return {"fetched": fetched, "skipped": skipped, "bytes": fetched_bytes, "seconds": seconds}


def list_caches(root: str) -> list[dict]:
    """Every finished cache at ROOT or one or two levels below it, summarised. A ROOT that does not
    exist (or cannot be reached) is an error, not an empty list."""
    st = Storage(root)
    found = ([MANIFEST] if st.exists(MANIFEST) else []) + st.glob(f"*/{MANIFEST}") + st.glob(f"*/*/{MANIFEST}")
    if not found and not st.has(""):
        raise CacheError(f"{st.location} does not exist")
    out = []
    for rel in found:
        where = st.location + ("/" + rel[: -len(MANIFEST) - 1] if rel != MANIFEST else "")
        try:
            m = read_manifest(Storage(where))
        except CacheError:
            continue  # not a cache of this format: not listed
        out.append(summary(m, where))
    return out


def summary(m: Manifest, where: str) -> dict:
    """What `ls` says of one cache."""
    size = m.bytes
    return {
        "location": where, "teacher": m.teacher.model, "weights_sha256": m.teacher.weights_sha256,
        "dataset": m.dataset["source"], "dataset_fingerprint": m.dataset.get("datasets_fingerprint"),
        "splits": {s.name: {"rows": s.rows, "tokens": s.tokens} for s in m.splits.values()},
        "fields": m.dense_fields, "top_k": m.capture.top_k, "temperatures": list(m.capture.temperatures_all),
        "bytes": size, "bytes_per_token": size / max(m.tokens, 1), "format_version": m.recorded_version,
        "finished_at": m.stats.finished_at, "digest": m.digest,
        "subset_of": m.subset.of_digest if m.subset else None,
        "appends": len(m.grown),
        "parent_digest": m.grown[-1].parent_digest if m.grown else None,
    }
