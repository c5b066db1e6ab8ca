"""Checking a finished cache wherever it lives: the manifest's digest and every file's checksum."""

from __future__ import annotations

from pathlib import Path

from .layout import GROW_DIR, MANIFEST, PLAN_FILE, WORK_DIR
from .manifest import FileDigest, Manifest, manifest_digest
from .reader import read_document
from .storage import Storage, StorageError


def verify(root: str | Path | Storage) -> list[str]:
    """Recompute every checksum (streamed) wherever the cache lives; one line per problem: a changed,
    missing or unlisted file, or an edited manifest (empty: the cache is intact)."""
    st = root if isinstance(root, Storage) else Storage(root)
    document = read_document(st)
    manifest = Manifest.from_dict(document, f"{st.location}/{MANIFEST}")
    problems = []
    if document.get("digest") != manifest_digest(document):  # the digest of the document as stored
        problems.append(f"{MANIFEST}: contents do not match its digest (the manifest was edited or damaged)")
    expected: dict[str, tuple[str, FileDigest]] = {}
    for sh in manifest.shards:
        for rel, dig in sh.files.items():
            expected[rel] = (f"shard {sh.split}/{sh.index} (rows {sh.row_start}-{sh.row_end})", dig)
    for rel, dig in manifest.metadata_files.items():
        expected[rel] = ("metadata", dig)
    try:
        present = st.files()
    except StorageError:  # a web server without directory listings: check the listed files one by one
        present = None
    problems += _checked_files(st, expected, present)
    appending = present is not None and PLAN_FILE in present
    for rel in sorted(set(present or ()) - set(expected) - {MANIFEST}):
        if appending and (rel.startswith(WORK_DIR + "/") or f"/{GROW_DIR}" in rel):
            continue  # an append under way: its files join the manifest when it finishes
        problems.append(f"{rel}: a file the manifest does not list")
    return problems


def _checked_files(st: Storage, expected: dict[str, tuple[str, FileDigest]], present: dict | None) -> list[str]:
    """One line per owner (a shard, or the metadata) with a missing file or a size or checksum mismatch."""
    bad: dict[str, list[str]] = {}
    for rel, (owner, dig) in expected.items():
        if present is not None and rel not in present or present is None and not st.exists(rel):
            bad.setdefault(owner, []).append(f"{rel} missing")
            continue
        size = None if present is None else present[rel]
        got = st.digest(rel) if size in (None, dig.bytes) else {"bytes": size}
        if got != dig.to_dict():
            what = "size" if got["bytes"] != dig.bytes else "checksum"
            bad.setdefault(owner, []).append(f"{rel} {what} mismatch")
    return [f"{owner}: " + "; ".join(items) for owner, items in bad.items()]
