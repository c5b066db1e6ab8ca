"""A cache in transformers' Trainer: `CacheDataset` + `collate` give the batches `distill student` trains on, and
`DistillTrainer`'s step has the recipe's loss and gradients (float64); gradient accumulation, evaluation and
logging of every term work; representation terms are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import capture, settings

from pipeline.errors import DistillError
from pipeline.train.hf import CacheDataset, DistillTrainer, collate
from pipeline.train.reader import CacheBatches
from pipeline.train.signal import Wiring
from pipeline.train.step import step_losses

LOSSES = {"kd_forward": 0.5, "kd_reverse": 0.25, "ce": 0.5}


@pytest.fixture(scope="module")
def cache(llama_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "cache"
    capture(settings(llama_dir, corpus, out, capture={"top_k": 8, "hidden_layers": [-1], "temperatures": [2.0]}))
    return out


def student(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(torch.float64)


def args(tmp_path, **kw):
    from transformers import TrainingArguments

    kw = {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, **kw}
    return TrainingArguments(output_dir=str(tmp_path / "hf"), remove_unused_columns=False, report_to=[],
                             use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, **kw)


def test_the_rows_are_the_batches_distill_student_reads(cache):
    ds = CacheDataset(str(cache), "train", LOSSES)
    assert set(ds.fields) == {"topk_ids", "topk_logprobs", "logsumexp"}
    reader = CacheBatches(str(cache), "train", ds.fields, batch_size=4, shuffle=False)
    first = next(iter(reader))
    mine = collate([ds[int(i)] for i in first["row"]])
    for k, v in mine.items():
        assert v.dtype == first[k].dtype and torch.equal(v, first[k]), k


def test_a_trainer_step_has_the_recipes_loss_and_gradients(cache, tmp_path):
    from torch.utils.data import Subset
    from transformers import TrainerCallback

    ds = CacheDataset(str(cache), "train", LOSSES)
    rows = Subset(ds, [0, 1, 2, 3])
    batch = collate([ds[i] for i in range(4)])
    ref_model = student()
    ref = step_losses(ref_model, batch, ds.loss.spec, ds.loss.manifest, torch.device("cpu"), Wiring())
    ref["total"].backward()
    want = {n: p.grad.clone() for n, p in ref_model.named_parameters()}

    seen = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, a, state, control, model=None, **kw):
            seen.update({n: p.grad.clone() for n, p in model.named_parameters()})

    model = student()
    trainer = DistillTrainer(model=model, args=args(tmp_path, max_steps=1, max_grad_norm=0.0), train_dataset=rows,
                             data_collator=collate, distill=ds.loss, callbacks=[Grab()])
    out = trainer.train()
    assert out.training_loss == pytest.approx(float(ref["total"]), rel=1e-6)  # the Trainer sums it in float32
    for n, g in want.items():
        torch.testing.assert_close(seen[n], g, rtol=1e-10, atol=1e-12)
    logged = trainer.state.log_history[0]
    for k in LOSSES:
        assert logged[f"distill/{k}"] == pytest.approx(float(ref[k]), rel=1e-9)


def test_gradient_accumulation_and_evaluation(cache, tmp_path):
    from torch.utils.data import Subset
    from transformers import TrainerCallback

    ds = CacheDataset(str(cache), "train", LOSSES)
    val = CacheDataset(str(cache), "validation", LOSSES)
    # one row four times: each of the two accumulated micro-batches of 2 has that row's loss, so the step's
    # gradient is that loss's gradient (not twice it: the Trainer divides by the accumulation steps)
    ref_model = student()
    step_losses(ref_model, collate([ds[0], ds[0]]), ds.loss.spec, ds.loss.manifest, torch.device("cpu"),
                Wiring())["total"].backward()
    seen = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, a, state, control, model=None, **kw):
            seen.update({n: p.grad.clone() for n, p in model.named_parameters()})

    trainer = DistillTrainer(model=student(), args=args(tmp_path, max_steps=1, max_grad_norm=0.0, learning_rate=0.0,
                                                        per_device_train_batch_size=2, gradient_accumulation_steps=2),
                             train_dataset=Subset(ds, [0, 0, 0, 0]), eval_dataset=val, data_collator=collate,
                             distill=ds.loss, callbacks=[Grab()])
    trainer.train()
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(seen[n], p.grad, rtol=1e-10, atol=1e-12)
    metrics = trainer.evaluate()  # lr 0: the start's weights, every validation row in batches of 4
    with torch.no_grad():
        losses = [float(step_losses(student(), collate([val[i] for i in range(a, min(a + 4, len(val)))]),
                                    val.loss.spec, val.loss.manifest, torch.device("cpu"), Wiring())["total"])
                  for a in range(0, len(val), 4)]
    assert metrics["eval_loss"] == pytest.approx(float(np.mean(losses)), rel=1e-9)


def test_representation_terms_are_refused(cache):
    with pytest.raises(DistillError, match="representation terms"):
        CacheDataset(str(cache), "train", {"kd_forward": 1.0, "hidden_mse": 1.0})


@pytest.mark.slow
def test_under_accelerate_launch_with_two_cpu_processes(cache, tmp_path):
    """`accelerate launch` (torch.distributed underneath, gloo on CPU): 2 processes, 2 optimiser steps of 2
    accumulated micro-batches, an evaluation; both hold the same weights after it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    res = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", str(repo / "tests" / "hf_entry.py"),
                          str(cache), str(tmp_path / "out")], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((tmp_path / "out" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["steps"] == 2 for r in ranks)
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"] and ranks[0]["eval_loss"] == ranks[1]["eval_loss"]
    assert np.isfinite(ranks[0]["training_loss"]) and "distill/kd_forward" in ranks[0]["logged"]


def test_trls_sft_trainer_takes_the_same_loss_mixed_in(cache, tmp_path):
    """docs/interop.md's TRL recipe: DistillTrainer mixed into SFTTrainer, its dataset preparation skipped, the rows
    given as a `datasets.Dataset` of row numbers (TRL takes nothing else). Its step has the recipe's loss and
    gradients, as the plain Trainer's does."""
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class DistillSFTTrainer(DistillTrainer, SFTTrainer):
        pass

    ds = CacheDataset(str(cache), "train", LOSSES)
    batch = collate([ds[i] for i in range(4)])
    ref_model = student()
    ref = step_losses(ref_model, batch, ds.loss.spec, ds.loss.manifest, torch.device("cpu"), Wiring())
    ref["total"].backward()
    seen = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, a, state, control, model=None, **kw):
            seen.update({n: p.grad.clone() for n, p in model.named_parameters()})

    cfg = SFTConfig(output_dir=str(tmp_path / "trl"), remove_unused_columns=False, packing=False,
                    dataset_kwargs={"skip_prepare_dataset": True}, per_device_train_batch_size=4, max_steps=1,
                    max_grad_norm=0.0, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                    disable_tqdm=True)
    rows = ds.row_numbers()
    assert len(rows) == len(ds) and rows[5]["row"] == 5
    trainer = DistillSFTTrainer(model=student(), args=cfg, train_dataset=rows.select(range(4)),
                                data_collator=ds.collate_rows, processing_class=AutoTokenizer.from_pretrained(cache / "tokenizer"),
                                distill=ds.loss, callbacks=[Grab()])
    assert trainer.train().training_loss == pytest.approx(float(ref["total"]), rel=1e-6)
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(seen[n], p.grad, rtol=1e-10, atol=1e-12)
