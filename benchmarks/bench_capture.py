"""Capture overhead and storage for the default teacher (SmolLM2-135M) on this machine.

    make bench            (or: python benchmarks/bench_capture.py --tokens 8192 --repeats 5)

In one process, over the same rows and batch size, it times
  bare     the teacher's plain forward, `model(input_ids).logits` (what a hand-rolled dump starts from)
  topk     the whole capture of top-64 + logsumexp (targets, shard writes, checksums, commit)
  full     the same plus 3 hidden-state layers and 1 attention layer (the default config)
and prints capture / bare for each (runs interleaved, each ratio from the median of its repeats),
then the bytes per token of every field as stored. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline import models  # noqa: E402
from pipeline.capture.rows import prepare  # noqa: E402
from pipeline.capture.run import run_capture  # noqa: E402
from pipeline.capture.shards import writer_threads  # noqa: E402
from pipeline.capture.teacher import teacher_device  # noqa: E402
from pipeline.config import TeacherCacheConfig, load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "data/configs/teacher_cache.toml"))
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per timed run")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    base = [f"data.max_tokens={args.tokens}", "data.validation_fraction=0.0"]
    modes = {
        "topk": base + ["capture.temperatures=[]", "capture.hidden_layers=[]", "capture.attention_layers=[]"],
        "full": base + ["capture.temperatures=[]"],  # + 3 hidden layers + 1 attention layer (all heads)
        "full_T2": base,  # the default config as shipped: full + logsumexp at T=2
    }
    cfgs = {m: load_config(TeacherCacheConfig, args.config, o) for m, o in modes.items()}
    cfg0 = cfgs["topk"]
    tok = models.load_tokenizer(cfg0.teacher)
    prepared = prepare(cfg0.data, tok, shard_rows=cfg0.capture.rows_per_shard)
    rows = prepared.splits["train"].read(0, len(prepared.splits["train"]))  # a small corpus: every row in memory
    prepared.close()
    device = teacher_device(cfg0)
    model = models.load_model(cfg0.teacher, device)  # loaded once, handed to every capture
    bs = cfg0.capture.batch_size
    print(f"device {device}, torch threads {torch.get_num_threads()}, writer threads: "
          f"{writer_threads(device)}, {len(rows)} rows x {rows.input_ids.shape[1]} "
          f"tokens = {rows.n_tokens} tokens per run, batch {bs}, {args.repeats} repeats", flush=True)

    def bare() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(rows), bs):
                ids = torch.from_numpy(rows.input_ids[s : s + bs]).to(device, torch.long)
                model(input_ids=ids).logits
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"bare": [], **{m: [] for m in modes}}
    manifests = {}
    bare()  # warm-up
    with tempfile.TemporaryDirectory(dir=REPO / "data") as tmp:
        for r in range(args.repeats):
            times["bare"].append(bare())
            for m, cfg in cfgs.items():
                out = Path(tmp) / f"{m}-{r}"
                cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(out)})})
                res = run_capture(cfg, log=lambda s: None, progress=False, model=model)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[m].append(res.shard_seconds)  # the shard loop only: not tokenisation or set-up
                manifests[m] = res.manifest
            print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    n = rows.n_tokens
    print("\n| run | median s | tokens/s | / bare (medians) | / bare per repeat: median (min..max) |")
    print("|---|---|---|---|---|")
    for k, v in med.items():
        per = [a / b for a, b in zip(times[k], times["bare"])]  # each repeat against its own bare run
        print(f"| {k} | {v:.2f} | {n / v:,.0f} | {v / med['bare']:.3f} | {statistics.median(per):.3f} "
              f"({min(per):.3f}..{max(per):.3f}) |")
    for m, man in manifests.items():
        bpt = man.stats.bytes_per_token
        print(f"\nbytes per token, {m} ({man.stats.bytes_on_disk / n:,.1f} total):")
        for field, b in sorted(bpt.items(), key=lambda kv: -kv[1]):
            print(f"  {field:20s} {b:10.1f}")


if __name__ == "__main__":
    main()
