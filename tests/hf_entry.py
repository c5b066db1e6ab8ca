"""A DistillTrainer run for `accelerate launch` (tests/test_hf_trainer.py): 2 optimiser steps of 2 accumulated
micro-batches and an evaluation on a cache, then each process writes what it saw to OUT/rank-<r>.json.

    accelerate launch --cpu --num_processes 2 tests/hf_entry.py CACHE OUT
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from pipeline.train.hf import CacheDataset, DistillTrainer, collate

cache, out = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
losses = {"kd_forward": 0.5, "ce": 0.5}
train, val = CacheDataset(cache, "train", losses), CacheDataset(cache, "validation", losses)
args = TrainingArguments(output_dir=str(out / "hf"), remove_unused_columns=False, report_to=[], use_cpu=True,
                         per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, logging_steps=1,
                         save_strategy="no", disable_tqdm=True, ddp_backend="gloo", learning_rate=1e-3)
trainer = DistillTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, data_collator=collate,
                         distill=train.loss)
result = trainer.train()
metrics = trainer.evaluate()
out.mkdir(parents=True, exist_ok=True)
(out / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps({
    "world": trainer.args.world_size, "training_loss": result.training_loss, "eval_loss": metrics["eval_loss"],
    "steps": trainer.state.global_step, "weights_sum": float(sum(p.double().sum() for p in model.parameters())),
    "logged": [k for rec in trainer.state.log_history for k in rec]}))
