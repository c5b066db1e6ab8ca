"""The lineage of rows given as token ids (data.format = "tokens"): which `distill generate` run sampled them, as
its Parquet files record it in their schema metadata (`GENERATION_KEY`), one generation per cache, and checked
against the teacher's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..format.columns import GENERATION_KEY


def generation_of(files: list[str]) -> dict | None:
    """What `distill generate` recorded in the schema metadata of these Parquet files (its generator, tokenizer,
    sampling settings, round): one record for all of them; None when none carries one. Files of several
    generations, or a mix of generated and other files, are refused: the manifest records one lineage."""
    import json

    import pyarrow.parquet as pq

    seen: dict[str, list[str]] = {}
    for f in files:
        if not f.endswith(".parquet"):
            seen.setdefault("", []).append(f)
            continue
        meta = pq.read_schema(f).metadata or {}
        seen.setdefault(meta.get(GENERATION_KEY, b"").decode(), []).append(f)
    records = [k for k in seen if k]
    if not records:
        return None
    if len(seen) > 1:
        groups = "; ".join(f"{len(v)} file(s) like {Path(v[0]).name}" + (" from no generation" if not k else "")
                           for k, v in seen.items())
        raise DataError(f"data.format = 'tokens': the data files come from {len(seen)} different generations "
                        f"({groups}); score one generation per cache (or append them one at a time)")
    return json.loads(records[0])


def check_generation(generation: dict | None, tokenizer) -> None:
    """Rows sampled by a model must be scored by a teacher with the same tokenizer: the ids are the targets'
    positions. (Cross-tokenizer on-policy distillation, re-aligning the ids by text, is out of scope.)"""
    from ..format.layout import tokenizer_fingerprint

    if generation is None:
        return
    theirs = (generation.get("tokenizer") or {}).get("fingerprint")
    ours = tokenizer_fingerprint(tokenizer)
    if theirs != ours:
        who = (generation.get("generator") or {}).get("model", "?")
        raise DataError(f"the rows were sampled by {who!r}, whose tokenizer (fingerprint {str(theirs)[:16]}...) is not "
                        f"the teacher's ({ours[:16]}...): on-policy targets must be the teacher's distribution at "
                        "exactly the student's token ids, so generator and teacher must share a tokenizer "
                        "(cross-tokenizer on-policy distillation is not supported)")
