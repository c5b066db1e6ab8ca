"""Checking a finished cache wherever it lives: the manifest's digest, each shard index's checksum, and every
file's checksum, streamed (memory does not grow with the cache: the files come from the shard indexes one
row group at a time, and on local disk the unlisted-file scan walks the folders).

A subset (`fields`, `splits`, `shards`) checks only those files and skips the unlisted-file scan.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CacheError
from .index import shard_of, with_shard
from .layout import GROW_DIR, MANIFEST, PLAN_FILE, WORK_DIR
from .manifest import Manifest, manifest_digest
from .reader import Cache, read_document
from .storage import Storage, StorageError


def verify(root: str | Path | Storage, fields: list[str] | None = None, splits: list[str] | None = None,
           shards: list[int] | None = None, counts: dict | None = None) -> list[str]:
    """Recompute every checksum (or those of some fields, splits and shard numbers); one line per problem: a
    changed, missing or unlisted file, a damaged shard index, or an edited manifest (empty: the cache is
    intact). `counts`, when given, receives how many files and shards were checked."""
    st = root if isinstance(root, Storage) else Storage(root)
    document = read_document(st)
    manifest = Manifest.from_dict(document, f"{st.location}/{MANIFEST}")
    problems = []
    if document.get("digest") != manifest_digest(document):  # the digest of the document as stored
        problems.append(f"{MANIFEST}: contents do not match its digest (the manifest was edited or damaged)")
    _check_selection(manifest, fields, splits)
    cache = Cache(st)
    bad: dict[str, list[str]] = {}
    checked, seen_shards = 0, set()
    indexes_ok = _indexes_intact(st, manifest, splits, bad)
    for rel, dig, owner in (cache.iter_files(fields, splits, shards) if indexes_ok else ()):
        checked += 1
        if owner.startswith("shard "):
            seen_shards.add(owner.split(" ")[1])
        try:
            got = st.digest(rel)
        except (StorageError, FileNotFoundError, OSError):
            bad.setdefault(owner, []).append(f"{rel} missing")
            continue
        if got != dig.to_dict():
            what = "size" if got["bytes"] != dig.bytes else "checksum"
            bad.setdefault(owner, []).append(f"{rel} {what} mismatch")
    problems += [f"{owner}: " + "; ".join(items) for owner, items in bad.items()]
    if counts is not None:
        counts.update(files=checked, shards=len(seen_shards))
    if fields is None and splits is None and shards is None and indexes_ok:
        problems += _unlisted(st, manifest, cache)
    return problems


def _check_selection(manifest: Manifest, fields, splits) -> None:
    unknown = [f for f in fields or () if f not in manifest.dense_fields]
    if unknown:
        raise CacheError(f"--fields names {', '.join(unknown)}, not a dense field of the cache "
                         f"({', '.join(manifest.dense_fields)})")
    unknown = [s for s in splits or () if s not in manifest.splits]
    if unknown:
        raise CacheError(f"--splits names {', '.join(unknown)}, not a split of the cache ({', '.join(manifest.splits)})")


def _indexes_intact(st: Storage, manifest: Manifest, splits, bad: dict) -> bool:
    """Each shard index the manifest names is there with its checksum (a damaged one is named, not read)."""
    ok = True
    for part, entry in manifest.shard_index.items():
        split, _ = manifest.file_owner(entry.path)
        if splits is not None and split not in splits:
            continue
        try:
            got = st.digest(entry.path)
        except (StorageError, FileNotFoundError, OSError):
            got = None
        if got != entry.digest().to_dict():
            bad.setdefault("shard index", []).append(f"{entry.path} {'missing' if got is None else 'checksum mismatch'}"
                                                     " (its shards cannot be checked)")
            ok = False
    return ok


def _unlisted(st: Storage, manifest: Manifest, cache: Cache) -> list[str]:
    """Files the cache does not list, found in one walk. A shard file is known by its name: the path the part's
    index gives that field's files, renumbered for a shard the part has (whether it is there with the right
    bytes is the index pass's question); every other file by the manifest."""
    appending = st.exists(PLAN_FILE)
    indexes = {e.path for e in manifest.shard_index.values()}
    examples: dict[tuple[str, str], str | None] = {}  # (part, field) -> a path of one of its shard files
    problems = []
    for rel in _walk(st):
        if rel == MANIFEST or (appending and (rel.startswith(WORK_DIR + "/") or f"/{GROW_DIR}" in rel)):
            continue  # an append under way: its files join the manifest when it finishes
        if rel in manifest.metadata_files or rel in indexes:
            continue
        split, part, field = manifest.locate(rel)
        if field in manifest.dense_fields:
            n = shard_of(rel, part.path)
            if (part.path, field) not in examples:
                examples[(part.path, field)] = next(
                    (b.column("path")[0].as_py() for b in cache.index(split, part.path).batches([field])), None)
            example = examples[(part.path, field)]
            if n is not None and n < part.shards and example is not None and rel == with_shard(example, part.path, n):
                continue
        problems.append(f"{rel}: a file the manifest does not list")
    return problems


def _walk(st: Storage):
    """Every file under the cache, relative: streamed folder by folder on local disk; listed on other storage."""
    if not st.is_local:
        try:
            yield from sorted(st.files())
        except StorageError:  # a web server without directory listings: nothing to scan
            return
        return
    root = st.local_path()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            yield Path(folder, name).relative_to(root).as_posix()
