"""Cross-tokenizer distillation on the default cache (docs/cross-tokenizer.md).

    python benchmarks/cross_tokenizer.py tokenizer   # a byte-level BPE of 8,192 tokens -> data/tokenizers/stdlib-bpe-8k
    python benchmarks/cross_tokenizer.py students    # CE | CE + uld | CE + kd_mapped, 3 seeds each: validation figures
    python benchmarks/cross_tokenizer.py timing      # step time of each against the same student's CE step

The student's tokenizer is a byte-level BPE trained on the default corpus (every top-level module of the
standard library, of which the cache holds a 65,536-token sample), so it is a tokenizer fitted to this
corpus with a sixth of the teacher's vocabulary: another vocabulary size, other merges, other special
tokens. Every student is the
default student's shape (data/configs/student.toml: Llama, 4 layers of 192) with that tokenizer, the same
optimiser, steps and cache rows; only the loss terms differ. Each variant runs with seeds 0, 1, 2 (the
student's initialisation and the data order). Figures: validation NLL per token (of the student's own tokens)
and per character (comparable with the teacher's), agreement and mapped KL with the teacher at aligned
positions, the aligned share; printed as a table and written to data/cross_tokenizer/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "data" / "caches" / "smollm2-stdlib"
TOKENIZER = ROOT / "data" / "tokenizers" / "stdlib-bpe-8k"
OUT = ROOT / "data" / "cross_tokenizer"
VOCAB = 8192
SEEDS = (0, 1, 2)
VARIANTS = {"ce": {"ce": 1.0}, "ce+uld": {"ce": 0.5, "uld": 0.5}, "ce+kd_mapped": {"ce": 0.5, "kd_mapped": 0.5}}


def make_tokenizer() -> None:
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))  # the default corpus, every module
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(TOKENIZER)
    print(f"{TOKENIZER}: {len(fast)} tokens, trained on {sum(map(len, texts)):,} characters of {len(files)} modules")


def run_config(variant: str, seed: int, out: Path, max_steps: int | None = None):
    import tomllib

    from pipeline.student_config import StudentRunConfig

    base = tomllib.loads((ROOT / "data" / "configs" / "student.toml").read_text())
    student = dict(base["students"][0])
    student.update(name=variant.replace("+", "_"), tokenizer=str(TOKENIZER), losses=VARIANTS[variant], seed=seed)
    base.update(cache=str(CACHE), output_dir=str(out), seed=seed, students=[student], patience=None)
    if max_steps is not None:
        base["max_steps"] = max_steps
    return StudentRunConfig.model_validate(base)


def students(seeds=SEEDS, variants=tuple(VARIANTS)) -> None:
    from pipeline.train.recipe import train_students

    results = {}
    for seed in seeds:
        for variant in variants:
            t0 = time.perf_counter()
            report = train_students(run_config(variant, seed, OUT / f"seed{seed}"), progress=False,
                                    log=lambda m: print("  " + m))[0]
            results.setdefault(variant, []).append({"seed": seed, "best": report["final"], "last": report["last_eval"],
                                                     "seconds": time.perf_counter() - t0,
                                                     "cross_tokenizer": report.get("cross_tokenizer"),
                                                     "teacher": report.get("teacher_validation")})
            print(f"{variant} seed {seed}: {report['final']}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    name = "results.json" if (seeds, variants) == (SEEDS, tuple(VARIANTS)) else \
        f"results-{'-'.join(map(str, seeds))}-{'-'.join(v.replace('+', '_') for v in variants)}.json"
    (OUT / name).write_text(json.dumps(results, indent=2) + "\n")
    teacher = next(iter(results.values()))[0]["teacher"]
    print(f"\nteacher (SmolLM2-135M-Instruct) on the same validation rows: {json.dumps(teacher)}")
    print("\n| student | val NLL per char | val NLL per token | top-1 agreement | mapped KL | aligned share |")
    print("|---|---|---|---|---|---|")
    for variant, runs in results.items():
        def ms(key):
            vals = [r["best"][key] for r in runs]
            return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else f"{vals[0]:.4f}"
        print(f"| {variant} | {ms('nll_per_char')} | {ms('nll')} | {ms('top1_agreement')} | {ms('kl')} | "
              f"{runs[0]['best']['aligned_share']:.3f} |")
    for variant, runs in results.items():
        if "ce" not in results:
            break
        wins = sum(r["best"]["nll_per_char"] < c["best"]["nll_per_char"] for r, c in zip(runs, results["ce"]))
        print(f"{variant}: lower NLL per char than CE in {wins} of {len(runs)} seeds (paired by seed)")


def timing(steps: int = 30, warmup: int = 5) -> None:
    """Each variant's optimiser step (forward, terms, backward, AdamW) on the same batches, interleaved in one
    process so that they share the machine's state; medians."""
    import torch

    from pipeline.train.recipe import Recipe

    torch.manual_seed(0)
    recipes = {}
    for variant in VARIANTS:
        r = Recipe(run_config(variant, 0, OUT / "timing", max_steps=steps + warmup), log=lambda m: None,
                   progress=False)
        r.setup()
        recipes[variant] = (r, iter(r.stream))
    times = {v: [] for v in VARIANTS}
    for i in range(steps + warmup):
        for variant, (r, it) in recipes.items():
            source, batch = next(it)
            t0 = time.perf_counter()
            r.micro_step(batch, last=True, source=source)
            r.optimizer_step()
            if i >= warmup:
                times[variant].append(time.perf_counter() - t0)
    ce = statistics.median(times["ce"])
    print(f"{'variant':<14} {'median step s':>14} {'vs CE':>7}")
    for variant, t in times.items():
        print(f"{variant:<14} {statistics.median(t):>14.4f} {statistics.median(t) / ce:>7.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["tokenizer", "students", "timing"])
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.step == "students":
        students(tuple(args.seeds), tuple(args.variants))
    else:
        {"tokenizer": make_tokenizer, "timing": timing}[args.step]()


if __name__ == "__main__":
    main()
