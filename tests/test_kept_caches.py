"""Caches written by earlier versions of this code, kept as test data, read and grow with today's.

`tests/data/cache-3.0`: format 3.0 (before bounded-error log-probs), written by the capture of the commit before
3.1 from the session fixtures' tiny Llama (`make_llama` with its defaults: the same weights), 400 tokens of the
test corpus, top-8, shards of 4 rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from conftest import capture, settings

from pipeline.format import Cache, verify

KEPT = Path(__file__).parent / "data" / "cache-3.0"


def test_a_3_0_cache_reads_and_verifies():
    from stages.cache import describe

    c = Cache(KEPT)
    m = c.manifest
    assert m.recorded_version == "3.0" and m.format_version == "4.0"  # read as today's version describes it
    assert m.capture.logprob_precision is None and m.stats.logprob_kl is None
    assert verify(KEPT) == []
    for split in c.splits:
        ids, lp = (np.asarray(c.array(split, f)[:]) for f in ("topk_ids", "topk_logprobs"))
        lengths = np.asarray(c.rows(split, ["length"]).column("length"))
        valid = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        assert ids.shape[-1] == lp.shape[-1] == 8 and (np.diff(lp[valid].astype(np.float32), axis=-1) <= 0).all()
        mass = np.exp(lp[valid].astype(np.float64)).sum(-1)
        assert ((mass > 0) & (mass <= 1 + 1e-2)).all()
    assert not any("rounded" in line for line in describe(m, str(KEPT)))


def test_an_append_to_a_3_0_cache_keeps_its_settings(llama_dir, corpus, tmp_path):
    root = tmp_path / "grown"
    shutil.copytree(KEPT, root)
    cfg = settings(llama_dir, corpus, root, data={"max_tokens": 800, "validation_fraction": 0.25},
                   capture={"top_k": 8, "batch_size": 4, "rows_per_shard": 4, "rows_per_chunk": 2},
                   output={"mode": "append"})
    grown = capture(cfg).manifest
    assert grown.format_version == "4.0" and len(grown.grown) == 1 and grown.stats.tokens > 400
    assert grown.capture.logprob_precision is None and grown.capture.topk_codec == "pcodec"
    assert grown.capture.topk_ids_encoding == "ids" and grown.fields["topk_ids"].encoding is None  # kept
    assert verify(root) == []
    old, new = Cache(KEPT), Cache(root)
    for split in old.splits:  # the old part's values are where they were
        n = old.manifest.splits[split].rows
        np.testing.assert_array_equal(np.asarray(new.array(split, "topk_ids")[:n]),
                                      np.asarray(old.array(split, "topk_ids")[:]))
