"""The samples folder `distill generate` writes: the plan (generation.json, "running" then "finished" with each
part's sha256 and the statistics) and the Parquet parts, each written whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import DataError, StorageError
from ..format.layout import file_digest, write_json
from ..format.storage import Storage

FORMAT = "distill-samples"
VERSION = 1
PLAN = "generation.json"


class OtherSettings(DataError):
    """A samples folder made with other settings than the ones asked for."""


def part_name(p: int) -> str:
    return f"part-{p:05d}.parquet"


def write_part(out: Path, p: int, table) -> None:
    import pyarrow.parquet as pq

    tmp = out / f".{part_name(p)}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out / part_name(p))  # a part is there whole or not at all
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {out / part_name(p)}: {e}") from e


def prepare_dir(out: Path, plan: dict, overwrite: bool, log) -> dict | None:
    """Make (or resume in) the output folder; the finished record when these samples are done already."""
    path = out / PLAN
    if out.exists() and not out.is_dir():
        raise StorageError(f"samples output {out} is a file, not a folder")
    if path.is_file():
        old = json.loads(path.read_text())
        same = {k: old.get(k) for k in plan} == plan
        if same and old.get("status") == "finished":
            return old
        if not same:
            changed = sorted(k for k in plan if old.get(k) != plan[k])
            if not overwrite:
                raise OtherSettings(f"{out} holds samples made with other settings ({', '.join(changed)} differ): "
                                    "choose another output.dir, or set output.overwrite = true to replace them")
            log(f"{out}: replacing samples made with other settings ({', '.join(changed)})")
            shutil.rmtree(out)
    elif out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise StorageError(f"samples output {out} is a folder with other files in it: choose an empty or new "
                               "folder (or output.overwrite = true)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".part-*.tmp-*"):  # a killed run's half-written part
        stale.unlink()
    if not path.is_file():
        write_json(Storage(out), PLAN, {**plan, "status": "running"})
    return None


def finish(out: Path, plan: dict, n_parts: int, seconds: float, new_tokens: int, log) -> dict:
    import pyarrow.parquet as pq

    parts, rows, prompt_tokens, completion_tokens, ended = [], 0, 0, 0, 0
    for p in range(n_parts):
        f = out / part_name(p)
        if not f.is_file():
            raise StorageError(f"{f} is missing after generation: was another run writing to {out}?")
        t = pq.read_table(f, columns=["length", "completion_start", "ended"])
        lengths, starts = t.column("length").to_numpy(), t.column("completion_start").to_numpy()
        rows += t.num_rows
        prompt_tokens += int(starts.sum())
        completion_tokens += int((lengths - starts).sum())
        ended += int(np.sum(t.column("ended").to_numpy(zero_copy_only=False)))
        parts.append({"path": part_name(p), "rows": t.num_rows, **file_digest(f)})
    stats = {"rows": rows, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "ended_with_eos": ended, "seconds": round(seconds, 3),  # the last run's sampling (slowest rank)
             "completion_tokens_per_second": round(new_tokens / seconds, 1) if seconds else None}
    record = {**plan, "status": "finished", "parts": parts, "statistics": stats}
    write_json(Storage(out), PLAN, record)
    log(f"{out}: {rows} completions, {completion_tokens:,} tokens sampled ({ended} ended with EOS)")
    return record


def read_samples(folder: str | Path) -> dict:
    """The finished record of a samples folder; refused when it is missing or unfinished."""
    path = Path(folder) / PLAN
    if not path.is_file():
        raise DataError(f"{folder} holds no samples (no {PLAN}): run distill generate first")
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT or doc.get("status") != "finished":
        raise DataError(f"{folder}: the samples are not finished (rerun the same distill generate to resume)")
    return doc


def identical_draws(folder: str | Path) -> int:
    """Rows of a finished samples folder whose token ids (prompt and completion) equal an earlier row's: the same
    completion drawn again for a prompt. Each is scored and trained as its own row (the loop keys rows by prompt
    and sample); this counts how often the student repeated itself."""
    import tempfile

    import pyarrow.parquet as pq

    from ..capture.rowfiles import KeyStore
    from ..capture.rows import content_key

    repeats = 0
    with tempfile.TemporaryDirectory(prefix="distill-draws-") as tmp:
        seen = KeyStore(Path(tmp) / "keys.sqlite")  # on disk: memory does not grow with the samples
        for part in read_samples(folder)["parts"]:
            table = pq.read_table(Path(folder) / part["path"], columns=["input_ids"])
            for ids in table.column("input_ids").to_numpy(zero_copy_only=False):
                repeats += not seen.add(content_key(ids), "main")
        seen.close()
    return repeats
