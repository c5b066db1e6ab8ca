"""docs/format.md (the cache format) is enough: its reader, using only zarr + pyarrow + numpy, runs against a real cache."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import capture, settings

REPO = Path(__file__).resolve().parents[1]


def _reader_code() -> str:
    text = (REPO / "docs" / "format.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/format.md should hold exactly one python block"
    code = blocks[0]
    assert not re.search(r"^\s*(from|import)\s+(pipeline|stages|torch|transformers)\b", code, flags=re.M)
    return code


def run_reader(tmp_path: Path, cache: Path) -> subprocess.CompletedProcess:
    """docs/format.md's reader run on `cache` in isolated mode (-I: the repository is not on sys.path)."""
    script = tmp_path / "reader.py"
    script.write_text(_reader_code())
    return subprocess.run([sys.executable, "-I", str(script)], env={**os.environ, "CACHE": str(cache)},
                          cwd=tmp_path, capture_output=True, text=True)


@pytest.mark.parametrize("capture_cfg", [
    {"top_k": 8, "temperatures": [2.0], "hidden_layers": [0, -1], "attention_layers": [1]},
    {"top_k": 4, "hidden_layers": [2], "hidden_dtype": "bfloat16"},
    {"top_k": 4, "topk_codec": "zstd", "hidden_layers": [1], "hidden_dtype": "int8"},
    {"top_k": 8, "samples": 12, "final_hidden": True, "hidden_layers": [-1], "hidden_dtype": "int8"},
])
@pytest.mark.slow
def test_format_md_reader_runs_on_a_cache(llama_dir, corpus, tmp_path, capture_cfg):
    capture(settings(llama_dir, corpus, tmp_path / "c", data={"packing": False}, capture=capture_cfg))
    res = run_reader(tmp_path, tmp_path / "c")
    assert res.returncode == 0, res.stderr
    assert "ok train" in res.stdout


@pytest.mark.slow
def test_format_md_reader_rejects_a_flipped_byte(llama_dir, corpus, tmp_path):
    capture(settings(llama_dir, corpus, tmp_path / "c"))
    victim = next((tmp_path / "c" / "train" / "logsumexp" / "c").rglob("0"))
    victim = [p for p in victim.parent.rglob("*") if p.is_file()][0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    res = run_reader(tmp_path, tmp_path / "c")
    assert res.returncode != 0 and "logsumexp" in res.stderr


@pytest.mark.slow
def test_format_md_reader_runs_on_a_chat_cache_with_masks(bos_llama_dir, conversations, tmp_path):
    capture(settings(bos_llama_dir, conversations, tmp_path / "c",
                     data={"format": "messages", "loss_mask": "assistant", "document_mask": True, "seq_len": 64}))
    res = run_reader(tmp_path, tmp_path / "c")
    assert res.returncode == 0, res.stderr
    assert "ok train" in res.stdout


def test_the_format_package_needs_no_training_stack(llama_dir, corpus, tmp_path):
    """pipeline.format reads, verifies and moves caches without importing torch or transformers."""
    cache_dir = tmp_path / "c"
    capture(settings(llama_dir, corpus, cache_dir, data={"max_tokens": 600}))
    code = (
        "import sys\n"
        "from pipeline.format import Cache, verify, pull, list_caches\n"
        f"c = Cache({str(cache_dir)!r})\n"
        "assert c.array('train', 'topk_ids')[:2].shape[0] == 2 and verify(c.storage) == []\n"
        f"pull({str(cache_dir)!r}, {str(tmp_path / 'p')!r}, fields=['topk_ids'], log=lambda m: None)\n"
        f"assert len(list_caches({str(tmp_path)!r})) == 2\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.slow
def test_format_md_reader_runs_on_a_cache_of_the_previous_format(llama_dir, corpus, tmp_path):
    """A 2.0 cache (its shards listed in the manifest, no shard index) still reads with the documented reader."""
    from conftest import as_legacy

    capture(settings(llama_dir, corpus, tmp_path / "c", capture={"top_k": 4}))
    as_legacy(tmp_path / "c", "2.0")
    assert not list((tmp_path / "c").rglob("shards.parquet"))
    res = run_reader(tmp_path, tmp_path / "c")
    assert res.returncode == 0, res.stderr
    assert "ok train" in res.stdout
