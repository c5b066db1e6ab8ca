"""Peak memory at real vocabularies and contexts, on CPU: a student's training step with its logits made in blocks
(`logit_block_mib`) against materialised, and a capture's peak against the sequence length.

    python benchmarks/bench_memory.py                 # both tables (about 10 minutes on 2 cores)
    python benchmarks/bench_memory.py student         # the student table alone
    python benchmarks/bench_memory.py capture         # the capture table alone

Each measurement runs in its own process (peak RSS: ru_maxrss of that process), under an address-space limit
(--limit-gib) so that a materialised run too large for the machine reports "over the limit" instead of swapping.

Student: a Llama of 4 layers x 192 with Gemma 3's 262,144-token vocabulary (tied embeddings: 55M parameters),
AdamW, two steps of kd_forward + ce from synthetic top-64 targets, then an evaluation of the batch. Capture: a
reduced-depth teacher of real width and vocabulary (1 layer, d = 2048, ff = 8192, V = 128,256, random init)
capturing top-64 over one row of L tokens with the pipeline's own TargetComputer (the LM head in blocks of
capture.position_chunk positions).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def student_step(vocab: int, batch: int, seq: int, block_mib: int) -> dict:
    import torch
    import transformers

    from pipeline.student_config import StudentConfig
    from pipeline.train import terms
    from pipeline.train.signal import TeacherSignal, Wiring
    from pipeline.train.students import StudentModule
    from pipeline.train.step import forward

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                                   num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=max(seq, 256),
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    spec = StudentConfig.model_validate({"name": "s", "arch": {"num_layers": 4, "hidden_size": 192, "num_heads": 3},
                                         "losses": {"kd_forward": 0.5, "ce": 0.5}})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    K = 64
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    lp = torch.log_softmax(torch.randn(batch, seq, K, generator=g) * 3, -1).sort(-1, descending=True).values - 0.1
    b = {"input_ids": ids, "length": torch.full((batch,), seq), "topk_ids": torch.randint(0, vocab, (batch, seq, K),
                                                                                          generator=g),
         "topk_logprobs": lp.half(), "logsumexp": torch.randn(batch, seq)}
    dims = {"topk_ids": ["row", "position", "k"], "topk_logprobs": ["row", "position", "k"],
            "logsumexp": ["row", "position"]}
    module, dev = StudentModule(model, Wiring()), torch.device("cpu")
    base = _peak_mib()
    t0 = time.perf_counter()
    for _ in range(2):
        out = forward(module, Wiring(), b, dev, block_mib=block_mib)
        values = terms.compute(spec, out, TeacherSignal(b, dev, dims=dims), Wiring())
        values["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - t0) / 2
    from pipeline.train.metrics import evaluate

    t1 = time.perf_counter()
    metrics = evaluate(model, [b], dev)  # an evaluation of the batch, as a run's validation makes
    return {"params": params, "peak_rss_mib": _peak_mib(), "before_steps_mib": base, "seconds_per_step": seconds,
            "evaluation_seconds": time.perf_counter() - t1, "loss": float(values["total"]), "nll": metrics["nll"]}


def capture_row(seq: int, width: int, vocab: int, chunk: int) -> dict:
    import numpy as np
    import torch
    import transformers

    from pipeline.capture.targets import TargetComputer
    from pipeline.config import CaptureConfig
    from pipeline.models import TeacherSpec

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width,
                                   num_hidden_layers=1, num_attention_heads=width // 128, num_key_value_heads=8,
                                   max_position_embeddings=seq)
    model = transformers.LlamaForCausalLM(cfg).eval()
    weights = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    computer = TargetComputer(model, TeacherSpec.from_config(cfg), CaptureConfig(top_k=64, position_chunk=chunk),
                              [], [])
    ids = np.random.default_rng(0).integers(0, vocab, (1, seq)).astype(np.int32)
    base = _peak_mib()
    t0 = time.perf_counter()
    t = computer(ids, np.array([seq], np.int32))
    assert t.topk_ids.shape == (1, seq, 64)
    return {"weights_mib": weights, "before_mib": base, "peak_rss_mib": _peak_mib(),
            "seconds": time.perf_counter() - t0}


def _child(kind: str, args: dict, limit_gib: float) -> dict:
    """One measurement in a fresh process under an address-space limit; {"error": ...} when it fails."""
    code = (f"import json, resource, sys; sys.path.insert(0, {str(REPO)!r}); "
            f"resource.setrlimit(resource.RLIMIT_AS, ({int(limit_gib * 2**30)}, {int(limit_gib * 2**30)})); "
            f"import benchmarks.bench_memory as b; print(json.dumps(b.{kind}(**{args!r})))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    if p.returncode:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": "over the limit" if "MemoryError" in p.stderr or "alloc" in p.stderr else last[:120]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("which", nargs="?", choices=["student", "capture", "both"], default="both")
    ap.add_argument("--limit-gib", type=float, default=16.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = {}
    print(f"python benchmarks/bench_memory.py {args.which} --limit-gib {args.limit_gib:g}")
    if args.which in ("student", "both"):
        print("\nstudent: 4 layers x 192, V = 262,144 (tied), AdamW, 2 steps of kd_forward + ce (top-64), an "
              "evaluation\n")
        print("| batch x seq | logits | peak RSS (MiB) | s/step |\n|---|---|---|---|")
        for batch, seq in ((4, 256), (1, 4096)):
            for mib, name in ((0, "materialised"), (256, "fused, blocks of 256 MiB"),
                              (64, "fused, blocks of 64 MiB (the default)"), (16, "fused, blocks of 16 MiB")):
                r = _child("student_step", {"vocab": 262144, "batch": batch, "seq": seq, "block_mib": mib},
                           args.limit_gib)
                out[f"student {batch}x{seq} {name}"] = r
                peak = f"{r['peak_rss_mib']:,.0f}" if "error" not in r else f"> {args.limit_gib * 1024:,.0f} ({r['error']})"
                step = f"{r['seconds_per_step']:.1f}" if "error" not in r else "-"
                print(f"| {batch} x {seq} | {name} | {peak} | {step} |", flush=True)
    if args.which in ("capture", "both"):
        print("\ncapture: 1 layer, d = 2048, ff = 8192, V = 128,256, float32, top-64, one row, position_chunk 128\n")
        print("| L | weights (MiB) | peak RSS (MiB) | peak - weights | s |\n|---|---|---|---|---|")
        for seq in (2048, 8192, 32768):
            r = _child("capture_row", {"seq": seq, "width": 2048, "vocab": 128256, "chunk": 128}, args.limit_gib)
            out[f"capture L={seq}"] = r
            if "error" in r:
                print(f"| {seq:,} | - | {r['error']} | - | - |", flush=True)
                continue
            print(f"| {seq:,} | {r['weights_mib']:,.0f} | {r['peak_rss_mib']:,.0f} | "
                  f"{r['peak_rss_mib'] - r['weights_mib']:,.0f} | {r['seconds']:.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
