"""Figures: which target should a user pick? Sizes, errors, step times and student quality of
the target modes, on the default corpus with the default teacher (SmolLM2-135M).

    python benchmarks/bench_targets.py [--steps 40] [--seeds 0 1 2] [--samples 16 32]

1. Two caches of the default cache's rows (data/configs/teacher_cache.toml, same rows, same order):
   A = top-64 (pcodec) + sampled targets at the larger N + final hidden state and LM head + hidden
   states as int8; B = top-64 + sampled targets at the smaller N + final hidden state. Captured once
   (a rerun resumes or finds them done).
2. Sizes: bytes/token of every field, the default (zstd) cache's top-K fields against A's (their values
   compared element for element), distinct ids per position, the int8 hidden states' error against the
   default cache's float16 ones.
3. Step time of each loss on the same batches (forward + backward, one teacher-initialised student),
   relative to CE.
4. Students: a teacher-initialised student (teacher layers 0, 6, 12, 18, 24) trained `--steps` steps of
   4 x 256 tokens with each target, the same rows in the same order per seed, for each seed: CE only;
   top-64 KD with the tail bucket; top-64 renormalised (alone, with allow_biased_kd);
   sampled targets at both N; exact full-vocabulary KD. Validation NLL, exact KL(teacher || student)
   over the whole vocabulary, top-1 agreement and ECE on the validation split, mean +- std over seeds.
Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.capture.run import run_capture  # noqa: E402
from pipeline.config import TeacherCacheConfig, load_config  # noqa: E402
from pipeline.student_config import StudentConfig, StudentRunConfig
from pipeline.format import Cache  # noqa: E402
from pipeline.train import terms  # noqa: E402
from pipeline.train.metrics import evaluate  # noqa: E402
from pipeline.train.head import TeacherHead  # noqa: E402
from pipeline.train.dataset import CacheBatches, make_loader  # noqa: E402
from pipeline.train.recipe import train_students
from pipeline.train.step import step_losses  # noqa: E402
from pipeline.train.student_init import build_student  # noqa: E402

STUDENT = {"from_teacher": 6, "lr": 1e-3, "warmup_steps": 10}


def make_caches(args) -> tuple[Path, Path, Path]:
    base = load_config(TeacherCacheConfig, str(REPO / "data/configs/teacher_cache.toml"), [])
    default = REPO / base.output.dir
    small, large = sorted(args.samples)
    out = []
    for name, cap in ((f"bench-targets-n{large}", {"samples": large, "hidden_dtype": "int8"}),
                      (f"bench-targets-n{small}", {"samples": small, "hidden_layers": [], "attention_layers": []})):
        cfg = base.model_copy(deep=True)
        c = cfg.capture.model_dump() | {"attention_layers": [], "final_hidden": True} | cap
        cfg = TeacherCacheConfig.model_validate({**cfg.model_dump(), "capture": c,
                                                 "output": {"dir": str(REPO / "data/caches" / name)}})
        t0 = time.perf_counter()
        r = run_capture(cfg, log=lambda m: None, progress=False)
        print(f"cache {name}: {r.computed_shards} shards computed, {r.resumed_shards} already there "
              f"({time.perf_counter() - t0:.0f}s)")
        out.append(Path(r.root))
    return default, out[0], out[1]


def sizes(default: Path, a: Path, b: Path, small: int, large: int) -> None:
    d, ca, cb = Cache(default), Cache(a), Cache(b)
    print(f"\n## Sizes (bytes per token as stored; {ca.manifest.stats.tokens:,} tokens)\n")
    print("| field | default cache (1.2 layout: int32 ids, zstd) | A (pcodec, int8 hidden, "
          f"N={large}) | B (N={small}) |")
    print("|---|---|---|---|")
    names = dict.fromkeys(list(d.manifest.stats.bytes_per_token) + list(ca.manifest.stats.bytes_per_token)
                          + list(cb.manifest.stats.bytes_per_token))
    for f in names:
        vals = [c.manifest.stats.bytes_per_token.get(f) for c in (d, ca, cb)]
        print(f"| {f} | " + " | ".join("-" if v is None else f"{v:,.1f}" for v in vals) + " |")
    # the codec alone: A's own top-K values written in the 1.2 layout (int32, zstd 3) and read back
    import tempfile

    import zarr
    from zarr.codecs import ZstdCodec

    tokens = ca.manifest.splits["train"].tokens
    with tempfile.TemporaryDirectory() as tmp:
        for f, dt in (("topk_ids", "int32"), ("topk_logprobs", "float16")):
            y = ca.array("train", f)[:]
            z = zarr.create_array(f"{tmp}/{f}", shape=y.shape, dtype=dt, chunks=(4, *y.shape[1:]),
                                  shards=(32, *y.shape[1:]), compressors=[ZstdCodec(level=3)], fill_value=0)
            z[:] = y.astype(dt)
            same = np.array_equal(z[:].astype(np.int64), y.astype(np.int64)) if f == "topk_ids" else \
                np.array_equal(z[:].view(np.uint16), y.view(np.uint16))
            size = sum(p.stat().st_size for p in Path(tmp, f).rglob("*") if p.is_file() and p.name != "zarr.json")
            print(f"train/{f}: the same values in the 1.2 layout ({dt}, zstd 3): {size / tokens:.1f} B/token; "
                  f"A's pcodec copy {ca.manifest.stats.bytes_per_token[f]:.1f}; identical after the round "
                  f"trip: {same}")
    # against the default cache (an earlier capture of the same rows): float32 recomputation noise only
    for f in ("topk_ids", "topk_logprobs", "logsumexp"):
        x, y = d.array("train", f)[:], ca.array("train", f)[:]
        if f == "logsumexp":
            print(f"train/logsumexp: max |difference| to the default cache {np.abs(x - y).max():.2e}")
            continue
        diff = (x.astype(np.int64) != y.astype(np.int64)) if f == "topk_ids" else \
            (x.view(np.uint16) != y.view(np.uint16))
        print(f"train/{f}: {diff.mean() * 1e3:.3f} per mille of the values differ from the default cache's")
    for c, n in ((ca, large), (cb, small)):
        cnt = c.array("train", "sample_counts")[:]
        real = cnt.sum(-1) > 0
        u = (cnt > 0).sum(-1)[real]
        per = sum(c.manifest.stats.bytes_per_token[k] for k in ("sample_ids", "sample_counts",
                                                                         "sample_logprobs"))
        print(f"sampled N={n}: {u.mean():.2f} distinct ids per position (median {np.median(u):.0f}, max {u.max()}), "
              f"{per:.1f} B/token for the three sampled fields")
    # int8 hidden states against the default cache's float16 ones (same rows)
    layers = list(ca.manifest.capture.hidden_layers)
    q = ca.array("train", "hidden_states")[:64].astype(np.float64)
    s = ca.array("train", "hidden_scale")[:64].astype(np.float64)
    ref = d.array("train", "hidden_states")[:64].astype(np.float64)
    deq = q * s[..., None]
    for j, layer in enumerate(layers):
        err, r = deq[:, j] - ref[:, j], ref[:, j]
        rel = np.sqrt((err**2).sum() / (r**2).sum())
        cos = (deq[:, j] * r).sum(-1) / (np.linalg.norm(deq[:, j], axis=-1) * np.linalg.norm(r, axis=-1) + 1e-30)
        real = np.linalg.norm(r, axis=-1) > 0
        print(f"int8 hidden state, layer {layer}: relative RMS error {rel:.4f}, max |error| / scale "
              f"{(np.abs(err) / np.maximum(s[:, j][..., None], 1e-30)).max():.3f}, mean cosine to float16 "
              f"{cos[real].mean():.6f}")


def reader_speed(a: Path) -> None:
    """Rows/s of one epoch of A's train split through the reader (0 workers), per target's fields."""
    cache = Cache(a)
    print("\n## Reader (one epoch of the train split, batch 4, 0 DataLoader workers)\n")
    print("| fields | rows/s |")
    print("|---|---|")
    for name, fields in (("top-64 (pcodec)", list(terms.TOPK_FIELDS)),
                         ("sampled", ["sample_ids", "sample_counts", "sample_logprobs", "logsumexp"]),
                         ("final hidden", list(terms.FULL_FIELDS))):
        ds = CacheBatches(cache, "train", fields, 4, shuffle=True)
        t0, n = time.perf_counter(), 0
        for b in make_loader(ds):
            n += len(b["row"])
        print(f"| {name}: {', '.join(fields)} | {n / (time.perf_counter() - t0):,.0f} |")


LOSSES = {
    "ce": {"ce": 1.0},
    "topk_tail": {"kd_forward": 1.0},
    "topk_renorm": {"kd_forward_renorm": 1.0},
    "sampled": {"kd_sampled": 1.0},
    "full": {"kd_full_forward": 1.0},
}


def step_times(a: Path, repeats: int = 5) -> dict[str, float]:
    cache = Cache(a)
    device = torch.device("cpu")
    head = TeacherHead.from_cache(cache, device)
    tok = cache.tokenizer()
    batches = []
    for batch in make_loader(CacheBatches(cache, "train", sorted({f for losses in LOSSES.values() for f in terms.fields_for(
            StudentConfig.model_validate({"name": "x", **STUDENT, "losses": losses, "allow_biased_kd": True}),
            cache.manifest)}), 4, shuffle=False)):
        batches.append(batch)
        if len(batches) == repeats + 1:
            break
    times: dict[str, list[float]] = {k: [] for k in LOSSES}
    models = {}
    for name, losses in LOSSES.items():
        spec = StudentConfig.model_validate({"name": name, **STUDENT, "losses": losses, "allow_biased_kd": True})
        models[name] = (spec, build_student(spec, cache.manifest, tok, device))
    for i, batch in enumerate(batches):  # interleaved: each loss sees the same batches in the same conditions
        for name, (spec, model) in models.items():
            t0 = time.perf_counter()
            step_losses(model, batch, spec, cache.manifest, device, head=head)["total"].backward()
            model.zero_grad(set_to_none=True)
            if i:  # the first batch warms up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\n## Step time (forward + backward, 4 x 256 tokens, teacher-initialised 5-layer student, median of "
          f"{repeats})\n")
    print("| target | seconds | relative to CE |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / med['ce']:.3f} |")
    return med


def students(a: Path, b: Path, small: int, large: int, steps: int, seeds: list[int]) -> None:
    runs = []
    for seed in seeds:
        for cache, names in ((a, ["ce", "topk_tail", "topk_renorm", "sampled", "full"]), (b, ["sampled"])):
            n = large if cache == a else small
            specs = [{"name": k if k != "sampled" else f"sampled_n{n}", **STUDENT, "losses": LOSSES[k], "seed": seed,
                      "allow_biased_kd": k == "topk_renorm"} for k in names]
            cfg = StudentRunConfig.model_validate({
                "cache": str(cache), "output_dir": str(REPO / "data/students/bench-targets" / f"seed{seed}"),
                "students": specs, "batch_size": 4, "max_steps": steps, "eval_every": steps, "log_every": steps,
                "seed": seed, "device": "cpu"})
            t0 = time.perf_counter()
            for r in train_students(cfg, log=lambda m: None, progress=False):
                runs.append((r["name"], seed, r["final"]))
            print(f"seed {seed}, {cache.name}: {len(specs)} students in {time.perf_counter() - t0:.0f}s", flush=True)
    c = Cache(a)
    ds = CacheBatches(c, "validation", list(terms.TOPK_FIELDS) + list(terms.FULL_FIELDS), 4, shuffle=False)
    spec = StudentConfig.model_validate({"name": "init", **STUDENT})
    init = evaluate(build_student(spec, c.manifest, c.tokenizer(), torch.device("cpu")), make_loader(ds),
                    torch.device("cpu"), TeacherHead.from_cache(c, "cpu"))
    print(f"\n## Students ({steps} steps x 4 x 256 tokens, seeds {seeds}; validation split, "
          f"{init['tokens']:,} tokens; KL exact over the whole vocabulary)\n")
    print("| target | val NLL | KL(teacher ‖ student) | top-1 agreement | ECE |")
    print("|---|---|---|---|---|")
    print(f"| (the student before training) | {init['nll']:.4f} | {init['kl']:.4f} | {init['top1_agreement']:.3f} | "
          f"{init['ece']:.4f} |")
    for name in dict.fromkeys(n for n, _, _ in runs):
        rows = [m for n, _, m in runs if n == name]

        def ms(k):
            v = [m[k] for m in rows]
            return f"{statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0:.4f}"

        print(f"| {name} | {ms('nll')} | {ms('kl')} | {ms('top1_agreement')} | {ms('ece')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples", type=int, nargs=2, default=[16, 32])
    ap.add_argument("--skip-students", action="store_true")
    ap.add_argument("--skip-step-times", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    small, large = sorted(args.samples)
    default, a, b = make_caches(args)
    sizes(default, a, b, small, large)
    reader_speed(a)
    if not args.skip_step_times:
        step_times(a)
    if not args.skip_students:
        students(a, b, small, large, args.steps, args.seeds)


if __name__ == "__main__":
    main()
