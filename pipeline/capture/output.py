"""The output location of a capture, and what rank 0 makes of it before any shard is computed.

`prepare_output` compares the plan with what the location holds and returns one `Output`:
- a finished cache with these settings (or an append with nothing new): `finished`, nothing to do;
- a finished cache with other settings: refused, or wiped with output.overwrite;
- an unfinished capture of this plan: resumed (`todo` lists the uncommitted shards only);
- an unfinished capture of another plan: refused, or wiped with output.overwrite;
- an unfinished append of other documents or settings: refused (an append never overwrites);
- anything else that is not empty: refused, or wiped with output.overwrite.
A run that wrote its manifest but was stopped before it cleaned up is finished. Then the disk is checked
for room, and the plan, the rows, the tokenizer and the arrays are written (each only if absent).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import models
from ..config import TeacherCacheConfig
from ..errors import CaptureError
from ..format.layout import GROW_DIR, HEAD_FILE, MANIFEST, PLAN_FILE, ROWS_FILE, TOKENIZER_DIR, WORK_DIR, \
    shard_ranges, write_json
from ..format.manifest import Manifest, migrate
from ..format.idcodes import fit_order
from ..format.reader import read_manifest
from ..format.specs import FieldSpec
from ..format.storage import Storage
from ..format.writer import CacheWriter, committed_shards
from .checks import check_disk, estimate_bytes
from .plan import described, diff, finished_changes
from .rows import Prepared

ShardTask = tuple[str, int, int, int]  # (split, index within the written part, row start, row end)


@dataclass(frozen=True)
class Output:
    """What rank 0 found at the output location and made ready."""

    finished: Manifest | None = None  # the cache as it is, when there is nothing to compute
    todo: tuple[ShardTask, ...] = ()
    committed: int = 0  # shards an earlier run committed


def prepare_output(cfg: TeacherCacheConfig, st: Storage, plan: dict, base: Manifest | None, prepared: Prepared | None,
                   specs: list[FieldSpec], tokenizer, log) -> Output:
    """Rank 0: clear or refuse what the location holds, then write the plan, rows, tokenizer and arrays.
    `base`: the finished cache an append grows; `prepared` None: an append with nothing new (`base` is
    then the cache as it stays)."""
    if st.exists(PLAN_FILE) and st.exists(MANIFEST) and \
            migrate(json.loads(st.read_bytes(PLAN_FILE))) == read_manifest(st).plan():
        st.remove_tree(WORK_DIR)  # a run wrote its manifest and was stopped before it cleaned up
    if cfg.output.mode == "append":
        if prepared is None:
            if not st.exists(PLAN_FILE):
                drop_unlisted_parts(st, base)  # an abandoned append's folders
            return Output(finished=base)
        resuming = _check_append(st, plan, base)
    else:
        finished, resuming = _check_create(cfg, st, plan, log)
        if finished is not None:
            return Output(finished=finished, committed=sum(v["shards"] for v in plan["splits"].values()))
    if resuming and st.is_local:
        swept = sweep_temporary(st.local_path())
        if swept:
            log(f"removed {swept} temporary files left by an interrupted capture")
    _check_room(cfg, st, plan, prepared, specs, log)
    return _lay_out(cfg, st, plan, base, prepared, specs, tokenizer, resuming, log)


def _check_append(st: Storage, plan: dict, base: Manifest) -> bool:
    """An append's location: an unfinished append of this plan resumes (True), of another is refused; a fresh
    one clears what an abandoned one left (False)."""
    if st.exists(PLAN_FILE):
        changes = _unfinished_changes(st, plan)
        if changes:
            out = st.where
            raise CaptureError(f"{out} holds an unfinished append of other data or settings; rerun that command "
                               f"to finish it (or remove {out}/{WORK_DIR} to abandon it). Differences:"
                               "\n  " + "\n  ".join(changes[:20]))
        return True
    st.remove_tree(WORK_DIR)  # what an abandoned append left is not in the manifest; clear it
    drop_unlisted_parts(st, base)
    return False


def _check_create(cfg: TeacherCacheConfig, st: Storage, plan: dict, log) -> tuple[Manifest | None, bool]:
    """A new cache's location: (the finished cache when it already has these settings, whether an unfinished
    capture of this plan resumes); anything else is refused or, with output.overwrite, wiped."""
    out = st.where
    if st.exists(MANIFEST):
        old = read_manifest(st)
        changes = finished_changes(old, plan)  # a cache of an earlier version with these settings is done
        if not changes:
            log(f"{out} is already a finished cache with these settings; nothing to do")
            st.remove_tree(WORK_DIR)
            drop_unlisted_parts(st, old)
            return old, False
        _refuse_or_wipe(cfg, st, f"{out} holds a finished cache with other settings; pass output.overwrite=true to "
                        "replace it. Differences:\n  " + "\n  ".join(changes[:20]),
                        f"overwriting the finished cache at {out}", log)
        return None, False
    if st.exists(PLAN_FILE):
        changes = _unfinished_changes(st, plan)
        if not changes:
            return None, True
        _refuse_or_wipe(cfg, st, f"{out} holds an unfinished capture with other settings; rerun with the same "
                        "settings to resume, or pass output.overwrite=true to start over. Differences:\n  "
                        + "\n  ".join(changes[:20]), f"discarding the unfinished capture at {out}", log)
        return None, False
    if st.files():
        _refuse_or_wipe(cfg, st, f"{out} is not empty and is not a cache; choose an empty directory or pass "
                        "output.overwrite=true", None, log)
    return None, False


def _unfinished_changes(st: Storage, plan: dict) -> list[str]:
    """How `plan` differs from the plan of the unfinished capture at `st` (written by any earlier version)."""
    return diff(described(json.loads(st.read_bytes(PLAN_FILE)), plan), plan)


def _refuse_or_wipe(cfg: TeacherCacheConfig, st: Storage, refusal: str, notice: str | None, log) -> None:
    if not cfg.output.overwrite:
        raise CaptureError(refusal)
    if notice:
        log(notice)
    wipe(st)


def _check_room(cfg: TeacherCacheConfig, st: Storage, plan: dict, prepared: Prepared, specs: list[FieldSpec],
                log) -> None:
    """Log the rows and the size estimate; on local disk, refuse a capture the disk cannot hold."""
    out = st.where
    total_rows = sum(len(r) for r in prepared.splits.values())
    per_token = estimate_bytes(specs, cfg.data.seq_len, cfg.data, cfg.capture.rows_per_shard)
    left_rows = total_rows - committed_rows(st, Manifest.from_dict(plan))  # a resume needs room only for what is left
    need = int(sum(per_token.values()) * left_rows * cfg.data.seq_len)
    log(f"cache {out}: {total_rows} rows x {cfg.data.seq_len} positions "
        + ", ".join(f"{s}={len(r)}" for s, r in prepared.splits.items()))
    log("estimated size (uncompressed upper bound), bytes/token: "
        + ", ".join(f"{k}={v:,.1f}" for k, v in per_token.items())
        + f"; {need / 2**20:,.1f} MiB to write" + (f" ({left_rows} of {total_rows} rows left)"
                                                     if left_rows < total_rows else ""))
    if st.is_local:
        check_disk(out, need)


def _lay_out(cfg: TeacherCacheConfig, st: Storage, plan: dict, base: Manifest | None, prepared: Prepared,
             specs: list[FieldSpec], tokenizer, resuming: bool, log) -> Output:
    """Write what is not there yet (plan, rows, tokenizer, arrays); the shards left to compute."""
    if not resuming:
        write_json(st, PLAN_FILE, plan)
    split_rows = {s: len(r) for s, r in prepared.splits.items()}
    m = Manifest.from_dict(plan)
    writer = CacheWriter(st, m, specs, split_rows, base, fit_order=lambda split: fit_order(
        (b.real_tokens() for b in prepared.splits[split].iter_blocks()), m.teacher.vocab_size))
    for split, rows in prepared.splits.items():
        rel = f"{writer.parts[split]['path']}/{ROWS_FILE}"
        if not st.exists(rel):  # the prepared file, put in place at once
            st.upload(rows.path, rel)
    if base is None:  # students read the tokenizer from the cache, never from the teacher
        store_tokenizer(st, tokenizer)
    writer.create_arrays()
    committed = writer.committed()
    todo = tuple((s, i, a, b) for s, n in split_rows.items()
                 for i, (a, b) in enumerate(shard_ranges(n, cfg.capture.rows_per_shard)) if (s, i) not in committed)
    if committed:
        log(f"resuming: {len(committed)} shards already committed, {len(todo)} to go")
    return Output(todo=todo, committed=len(committed))


# ---------------------------------------------------------------------------------------------
# the location's files


@contextmanager
def writer_lock(out: Path):
    """An exclusive flock on the cache directory itself: no lock file is left behind, and the
    kernel drops the lock when the holder dies (kill -9 included)."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CaptureError(f"another capture is writing {out} (its directory lock is held)") from None
        yield
    finally:
        os.close(fd)


def committed_rows(st: Storage, plan: Manifest) -> int:
    """Rows of the shards an earlier run of this capture committed (from the records' names and the plan)."""
    ranges = {s: plan.shard_ranges(s) for s in plan.splits}
    done = 0
    for split, g in committed_shards(st):
        if split in ranges and g < len(ranges[split]):
            a, b = ranges[split][g]
            done += b - a
    return done


def sweep_temporary(out: Path) -> int:
    """Remove the temporary files (`*.tmp`, `*.partial`) a killed capture can leave; returns how many."""
    stale = [p for pattern in ("*.tmp", "*.partial") for p in out.rglob(pattern)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return len(stale)


def drop_unlisted_parts(st: Storage, manifest: Manifest) -> None:
    """Remove the `<split>/grow-NNNN` folders of an abandoned append: parts the manifest does not list."""
    listed = {p.path for s in manifest.splits.values() for p in s.parts}
    for split in manifest.splits:
        for rel in st.glob(f"{split}/{GROW_DIR}*"):
            if rel not in listed:
                st.remove_tree(rel)


def wipe(st: Storage) -> None:
    """Everything under the output location (the location itself stays)."""
    if st.is_local:
        for p in st.local_path().iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    else:
        for rel in st.files():
            st.remove(rel)


def store_head(st: Storage, cfg: TeacherCacheConfig, model=None, write: bool = True) -> None:
    """The teacher's LM head (weight, and bias where it has one) in safetensors, in the dtype the teacher
    computes with; the logit scale, divisor and softcap are in the manifest's `teacher`. A tensor-parallel
    teacher's group all call this (its slices are joined); the one with `write` stores it."""
    import torch
    from safetensors.torch import save_file

    if model is None:
        model = models.load_model(cfg.teacher, torch.device("cpu"))
    head = model.get_output_embeddings()

    def whole(t):  # a tensor-parallel teacher's slices joined (collective: every rank of its group calls this)
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().contiguous()

    tensors = {"weight": whole(head.weight)}
    if getattr(head, "bias", None) is not None:
        tensors["bias"] = whole(head.bias)
    if not write:
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, str(Path(tmp) / HEAD_FILE), metadata={"format": "pt"})
        st.upload(Path(tmp) / HEAD_FILE, HEAD_FILE)


def store_tokenizer(st: Storage, tokenizer) -> None:
    """The teacher's tokenizer files under tokenizer/: on local disk a folder renamed into place once;
    on object storage uploaded file by file (again on a resume: they are small)."""
    if st.is_local:
        final = st.local_path(TOKENIZER_DIR)
        if final.exists():
            return
        tmp = final.with_name(TOKENIZER_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(final)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for p in sorted(Path(tmp).rglob("*")):
            if p.is_file():
                st.upload(p, f"{TOKENIZER_DIR}/{p.relative_to(tmp).as_posix()}")
