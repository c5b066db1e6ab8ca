"""A student's logits made block by block of positions (`logit_block_mib`), fused with its head (`fused.py`): every
term that reads them has the value and the gradient of the materialised computation, in float64 (and in bf16
autocast, within its rounding), the gradient follows the total's scale, and no (B, L, V) tensor is ever made."""

from __future__ import annotations

import pytest
import torch

from conftest import STUDENT_ARCH, capture, settings
from pipeline.format.reader import Cache

LOGIT_TERMS = {"ce": 1.0, "kd_forward": 0.7, "kd_reverse": 0.5, "kd_jsd": 0.3, "kd_forward_renorm": 0.2,
               "mse_logprobs": 0.1, "mse_logits": 0.1, "uld": 0.4, "kd_mapped": 0.2, "kd_sampled": 0.6,
               "kd_full_forward": 0.5, "kd_full_reverse": 0.3, "kd_full_jsd": 0.2, "nll_match": 0.05}


@pytest.fixture(scope="module")
def rich_cache(llama_dir, corpus, tmp_path_factory):
    """Every logit term's fields, padded rows and a loss mask (prompt/response would need a chat corpus: the
    document mask gives position_ids and padding instead)."""
    out = tmp_path_factory.mktemp("blockwise") / "c"
    capture(settings(llama_dir, corpus, out, data={"seq_len": 48, "max_tokens": 1500, "packing": False},
                     capture={"top_k": 8, "temperatures": [2.0], "samples": 6, "final_hidden": True,
                              "final_hidden_dtype": "float32"}))
    return Cache(out)


def _batch(cache, fields, n=4):
    from pipeline.train.dataset import CacheBatches, make_loader

    return next(iter(make_loader(CacheBatches(cache, "train", fields, n, shuffle=False))))


def _student(cache, spec):
    from pipeline.train.student_init import build_student

    torch.manual_seed(0)
    return build_student(spec, cache.manifest, cache.tokenizer(), torch.device("cpu")).double()


def _values_and_grads(cache, model, batch, spec, block_mib):
    from pipeline.train.head import TeacherHead
    from pipeline.train.step import step_losses

    head = TeacherHead.from_cache(cache, torch.device("cpu"))  # float32 on both sides: the same teacher logits
    model.zero_grad(set_to_none=True)
    values = step_losses(model, batch, spec, cache.manifest, torch.device("cpu"), head=head, block_mib=block_mib)
    values["total"].backward()
    return values, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_every_logit_term_blockwise_equals_the_materialised_computation(rich_cache, temperature):
    """Blocks of 3 positions per row (a row of 48 in 16 blocks, padding and masks falling inside and across
    blocks): every term and the total equal the materialised ones, and so do the gradients of every parameter."""
    from pipeline.student_config import StudentConfig
    from pipeline.train import terms

    spec = StudentConfig.model_validate({"name": "s", "arch": STUDENT_ARCH, "losses": LOGIT_TERMS,
                                         "temperature": temperature})
    fields = terms.fields_for(spec, rich_cache.manifest)
    batch = _batch(rich_cache, fields)
    assert (batch["length"] < batch["input_ids"].shape[1]).any()  # padded rows
    model = _student(rich_cache, spec)
    V, B = model.config.vocab_size, batch["input_ids"].shape[0]
    mib = 3 * 4 * V * B / 2**20  # 3 positions of every row per block
    whole, g_whole = _values_and_grads(rich_cache, model, batch, spec, 0)
    blocks, g_blocks = _values_and_grads(rich_cache, model, batch, spec, mib)
    assert set(whole) == set(blocks) == {*LOGIT_TERMS, "total"}
    for k in whole:
        torch.testing.assert_close(blocks[k], whole[k], rtol=1e-10, atol=1e-12, msg=f"{k}: {blocks[k].item()} vs {whole[k].item()}")
    assert set(g_whole) == set(g_blocks) and g_whole
    for n in g_whole:
        torch.testing.assert_close(g_blocks[n], g_whole[n], rtol=1e-9, atol=1e-12, msg=n)


def test_no_tensor_of_batch_by_length_by_vocabulary_exists(rich_cache):
    """With blocks of 4 positions per row, the autograd graph saves logits (any tensor whose last axis is the
    vocabulary) of at most 4 positions of every row, never the (B, L, V) logits; the materialised run does."""
    from pipeline.student_config import StudentConfig
    from pipeline.train import terms

    spec = StudentConfig.model_validate({"name": "s", "arch": STUDENT_ARCH,
                                         "losses": {"ce": 1.0, "kd_forward": 1.0, "kd_full_forward": 0.5}})
    batch = _batch(rich_cache, terms.fields_for(spec, rich_cache.manifest))
    model = _student(rich_cache, spec)
    B, L = batch["input_ids"].shape
    V = model.config.vocab_size

    def largest(block_mib):
        biggest = [0]

        def pack(t):
            if t.ndim >= 2 and t.shape[-1] == V:
                biggest[0] = max(biggest[0], t.numel() // V)  # positions of logits (or their softmax)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _values_and_grads(rich_cache, model, batch, spec, block_mib)
        return biggest[0]

    assert largest(0) >= B * L
    assert largest(4 * 4 * V * B / 2**20) <= B * 4  # fused blocks: a block's logits, gone after the block


def test_a_student_trains_the_same_with_and_without_blocks(rich_cache, tmp_path):
    """The recipe end to end: two runs of a few steps, blockwise and materialised, log the same losses."""
    import json

    from conftest import student_run
    from pipeline.train.recipe import train_students

    students = [{"name": "s", "arch": STUDENT_ARCH, "losses": {"kd_forward": 0.5, "ce": 0.5}, "lr": 3e-3,
                 "warmup_steps": 2}]
    train_students(student_run(rich_cache.root, tmp_path / "a", students, logit_block_mib=0), log=lambda m: None,
                   progress=False)
    train_students(student_run(rich_cache.root, tmp_path / "b", students, logit_block_mib=0.1), log=lambda m: None,
                   progress=False)
    ra = [json.loads(x) for x in (tmp_path / "a" / "s" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert len(ra) == len(rb) > 2
    for x, y in zip(ra, rb):
        for k, v in x.items():
            if isinstance(v, float) and k != "seconds" and "per_second" not in k:
                assert y[k] == pytest.approx(v, rel=2e-4, abs=1e-6), k


@pytest.mark.parametrize("exact_kl", [False, True])
def test_evaluation_in_blocks_equals_the_whole_logits(rich_cache, monkeypatch, exact_kl):
    """Every metric of an evaluation made 2 positions of every row at a time equals the one from whole logits
    (the top-K KL, or the exact KL from the cached final hidden states)."""
    from pipeline.train import metrics
    from pipeline.train.head import TeacherHead
    from pipeline.train.dataset import CacheBatches, make_loader

    from pipeline.student_config import StudentConfig

    spec = StudentConfig.model_validate({"name": "s", "arch": STUDENT_ARCH, "losses": {"ce": 1.0}})
    model = _student(rich_cache, spec)
    head = TeacherHead.from_cache(rich_cache, torch.device("cpu")) if exact_kl else None
    fields = ["topk_ids", "topk_logprobs", "logsumexp"] + (["final_hidden"] if exact_kl else [])

    def run(mib):
        monkeypatch.setattr(metrics, "EVAL_BLOCK_MIB", mib)
        batches = make_loader(CacheBatches(rich_cache, "validation", fields, 4, shuffle=False))
        return metrics.evaluate_all({"m": model}, batches, torch.device("cpu"), head)["m"]

    whole = run(2**20)
    blocks = run(2 * 4 * 4 * model.config.vocab_size / 2**20)
    assert whole.keys() == blocks.keys() and whole["tokens"] > 0
    for k, v in whole.items():
        assert blocks[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_bf16_autocast_on_cpu_follows_the_gpu_semantics(rich_cache):
    """precision = "bf16-autocast" on a CPU: the student's matrix products in bfloat16 (its logits carry bfloat16's
    rounding, relative 2^-8), every loss in float32; the terms stay within bfloat16's error of the float32 run, and
    blocks equal the materialised logits under autocast too."""
    from pipeline.student_config import StudentConfig
    from pipeline.train import terms
    from pipeline.train.students import StudentModule
    from pipeline.train.step import forward, step_losses
    from pipeline.train.signal import Wiring

    spec = StudentConfig.model_validate({"name": "s", "arch": STUDENT_ARCH, "losses": {"ce": 1.0, "kd_forward": 1.0}})
    batch = _batch(rich_cache, terms.fields_for(spec, rich_cache.manifest))
    model = _student(rich_cache, spec).float()
    cpu = torch.device("cpu")
    out = forward(StudentModule(model, Wiring()), Wiring(), batch, cpu, precision="bf16-autocast")
    assert out.logits.dtype == torch.bfloat16  # the head ran in bfloat16, as under CUDA autocast
    f32 = step_losses(model, batch, spec, rich_cache.manifest, cpu)
    bf16 = step_losses(model, batch, spec, rich_cache.manifest, cpu, precision="bf16-autocast")
    bf16_blocks = step_losses(model, batch, spec, rich_cache.manifest, cpu, precision="bf16-autocast", block_mib=0.01)
    for k in f32:
        assert bf16[k].dtype == torch.float32  # losses upcast
        assert bf16[k].item() != f32[k].item()  # autocast did run
        assert bf16[k].item() == pytest.approx(f32[k].item(), rel=2e-2), k
        assert bf16_blocks[k].item() == pytest.approx(bf16[k].item(), rel=1e-2), k


def test_fused_gradients_follow_the_scale_of_the_total_and_the_values_carry_none(rich_cache):
    """The gradients a fused block computes in the forward pass are those of the weighted total: backpropagating
    0.37 x total (grad_accum, a loss scale) gives 0.37 x the gradients; the terms' own values are detached."""
    from pipeline.student_config import StudentConfig
    from pipeline.train import terms
    from pipeline.train.step import step_losses

    spec = StudentConfig.model_validate({"name": "s", "arch": STUDENT_ARCH,
                                         "losses": {"ce": 1.0, "kd_forward": 0.5, "kd_reverse": 0.25}})
    batch = _batch(rich_cache, terms.fields_for(spec, rich_cache.manifest))
    model = _student(rich_cache, spec)
    mib = 3 * 4 * model.config.vocab_size * 4 / 2**20
    grads = []
    for scale in (1.0, 0.37):
        model.zero_grad(set_to_none=True)
        values = step_losses(model, batch, spec, rich_cache.manifest, torch.device("cpu"), block_mib=mib)
        assert all(not values[k].requires_grad for k in spec.losses) and values["total"].requires_grad
        (scale * values["total"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n, g in grads[0].items():  # within the float32 a float64 Llama's RMSNorm computes in (as materialised)
        assert (grads[1][n] - 0.37 * g).abs().max().item() <= 1e-6 * g.abs().max().item(), n


def test_bf16_autocast_fused_gradients_match_the_materialised_ones(rich_cache):
    """Under bf16 autocast the fused head's gradients are made with bfloat16 products, as autograd's are for the
    materialised head: every parameter's gradient within bfloat16's rounding of the materialised one."""
    from pipeline.student_config import StudentConfig
    from pipeline.train import terms
    from pipeline.train.step import step_losses

    spec = StudentConfig.model_validate({"name": "s", "arch": STUDENT_ARCH, "losses": {"ce": 1.0, "kd_forward": 1.0}})
    batch = _batch(rich_cache, terms.fields_for(spec, rich_cache.manifest))
    model = _student(rich_cache, spec).float()
    grads = []
    for mib in (0, 0.01):
        model.zero_grad(set_to_none=True)
        step_losses(model, batch, spec, rich_cache.manifest, torch.device("cpu"), block_mib=mib,
                    precision="bf16-autocast")["total"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        scale = g.abs().max().item()
        assert (grads[1][n] - g).abs().max().item() <= 2e-2 * scale + 1e-7, n
