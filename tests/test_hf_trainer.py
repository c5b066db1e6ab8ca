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
from pipeline.train.dataset import CacheBatches
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


def test_a_model_with_fewer_output_rows_than_the_vocabulary_is_refused(cache, tmp_path, tokenizer_dir):
    """`distill student` refuses it; so must the loss a Trainer calls: its top-K ids would be gathered out of
    range (a device-side assert on CUDA), before any step."""
    from conftest import make_llama
    from transformers import AutoModelForCausalLM

    small = AutoModelForCausalLM.from_pretrained(make_llama(tokenizer_dir, tmp_path / "small", vocab=450, hidden=16,
                                                            layers=1, heads=2, kv_heads=1))
    ds = CacheDataset(str(cache), "train", LOSSES)
    with pytest.raises(DistillError, match=r"450 rows, fewer than the cache's vocabulary \(512\)"):
        ds.loss(small, collate([ds[0], ds[1]]))
    trainer = DistillTrainer(model=small, args=args(tmp_path, max_steps=1), train_dataset=ds, data_collator=collate,
                             distill=ds.loss)
    with pytest.raises(DistillError, match="fewer than the cache's vocabulary"):
        trainer.train()


def _source_cache(llama_dir, where, rows: int, n: int = 16, k: int = 4):
    """An imported cache of `rows` distinct rows of n tokens, their targets aligned (each token its position's top
    entry), in row groups of 2,048 rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.capture.importer import ImportSettings, run_import

    rng = np.random.default_rng(0)
    ids = (rng.integers(0, 500, size=(rows, n, 1)) + np.arange(k)) % 512
    lp = np.log(np.sort(rng.dirichlet(np.ones(k), size=(rows, n)), -1)[..., ::-1] * 0.9)
    lp[:, 0] = -np.inf
    tokens = ids[:, :, 0].copy()
    tokens[:, 0] = rng.integers(0, 512, size=rows)
    ids[:, 1] = (np.arange(rows)[:, None] + np.arange(k)) % 512
    ids[:, 2] = (np.arange(rows)[:, None] // 512 + np.arange(k)) % 512
    tokens[:, 1:3] = ids[:, 1:3, 0]  # rows distinct
    where.mkdir()
    pq.write_table(pa.table({"input_ids": tokens.tolist(), "target_token_ids": ids.tolist(),
                             "target_logprobs": lp.tolist()}), where / "s.parquet")
    return run_import(ImportSettings(source=str(where / "s.parquet"), out=str(where / "c"),
                                     teacher=str(llama_dir)), log=lambda m: None)


def _epoch_peak(c) -> tuple[int, int, list[int]]:
    """(rows read, peak traced bytes, the sampler's order) of an epoch of a `CacheDataset` read as DistillTrainer
    reads it: its sampler, batches of 8 through `__getitems__`, the first batch (imports, open files) untraced."""
    import tracemalloc

    ds = CacheDataset(c, "train", {"kd_forward": 1.0})
    sampler = ds.sampler(seed=0)
    batches = iter(torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler, collate_fn=collate))
    seen = len(next(batches)["length"])
    tracemalloc.start()
    for batch in batches:
        seen += len(batch["length"])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seen, peak, list(sampler), ds


@pytest.mark.slow
def test_the_dataset_streams_the_split_with_bounded_memory(llama_dir, tmp_path, monkeypatch):
    """Splits of 4,000 and 24,000 rows (2 and 12 row groups): building the dataset reads nothing, and an epoch in
    the order `DistillTrainer` asks for (`sampler`: a shuffle window of shards at a time) holds as much memory for
    either (the window's shards, not the split), reads each shard's chunks once, and gives the student reader's
    rows."""
    from pipeline.format import Cache

    small, large = _source_cache(llama_dir, tmp_path / "small", 4_000), _source_cache(llama_dir, tmp_path / "l", 24_000)
    monkeypatch.setattr(Cache, "rows", lambda *a, **kw: pytest.fail("the dataset read the whole split"))
    peaks = {}
    for name, c in (("small", small), ("large", large)):
        seen, peaks[name], order, ds = _epoch_peak(c)
        assert seen == len(ds) == c.manifest.splits["train"].rows
        assert sorted(order) == list(range(len(ds))) and order != sorted(order)
        chunks = sum(-(-(b - a) // 8) for a, b in np.asarray(c.shard_ranges("train")).reshape(-1, 2))
        assert ds.reader().chunks_read == 3 * chunks  # three fields, each chunk once
    assert peaks["large"] < 1.5 * peaks["small"], peaks  # 6x the rows; the old dataset held 36 B/token of lists
    monkeypatch.undo()
    ds = CacheDataset(large, "train", {"kd_forward": 1.0})
    want = next(iter(CacheBatches(large, "train", ds.fields, batch_size=8, shuffle=False)))
    mine = collate(ds.__getitems__(want["row"].tolist()))
    for key, v in mine.items():  # (NaN: the logsumexp the source did not give)
        torch.testing.assert_close(v, want[key], rtol=0, atol=0, equal_nan=True, msg=key)
