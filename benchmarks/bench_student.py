"""Stage 2 figures on the default cache and student (SmolLM2-135M teacher, 2 CPU cores here).

    python benchmarks/bench_student.py speed     # step-time ratios and reader throughput (~3 min)
    python benchmarks/bench_student.py quality   # CE vs cached KD (tail) vs renormalised vs online KD (~20 min)

speed, in one process over the same preloaded batches (median of --repeats):
  ce        the student's plain cross-entropy step (forward, backward, AdamW)
  kd        the same student's cached KD step (0.5 top-K forward KL with tail + 0.5 CE, the default)
  online    teacher forward (inference_mode) + the student's step with full-vocabulary KL + CE
and reader rows/s (fields the KD step needs, 0 and 1 DataLoader workers) against the rows/s a
KD step consumes.
quality: the same student shape, seed, data order and number of steps, trained four ways, then
validation NLL / top-1 agreement / KL on the cache's validation split. Figures only; no asserts.
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

from pipeline.train import losses  # noqa: E402
from pipeline.format import Cache  # noqa: E402
from pipeline.config import TeacherConfig, load_config  # noqa: E402
from pipeline.student_config import StudentRunConfig
from pipeline.train.dataset import CacheBatches, make_loader  # noqa: E402
from pipeline.train.student_init import build_student  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.train.metrics import evaluate  # noqa: E402
from pipeline.train.recipe import train_students  # noqa: E402
from pipeline.train.students import make_optimizer  # noqa: E402
from pipeline.train.step import step_losses  # noqa: E402
from pipeline.train.signal import batch_masks  # noqa: E402
from pipeline.train.terms import TOPK_FIELDS  # noqa: E402

CPU = torch.device("cpu")


def _setup(args):
    cfg = load_config(StudentRunConfig, args.config, [])
    cache = Cache(cfg.cache)
    spec = cfg.students[0]
    teacher_dir = cache.manifest.teacher.model
    return cfg, cache, spec, teacher_dir


def online_step_losses(student, teacher, batch, ce_weight: float = 0.5):
    """Full-distribution KD with a live teacher: KL over the whole vocabulary, mixed with CE."""
    ids = batch["input_ids"]
    masks = batch_masks(batch, CPU)
    with torch.inference_mode():
        t_logits = teacher(input_ids=ids, **masks.forward).logits  # (B, L, V)
    t_logits = t_logits.clone()  # leave inference mode: usable in autograd as a constant
    s_logits = student(input_ids=ids, **masks.forward).logits
    kd = losses.full_forward_kl(t_logits, s_logits, masks.kd)
    tgt = losses.next_token_logprobs(s_logits, ids, losses.logsumexp_t(s_logits))
    return ce_weight * losses.cross_entropy(tgt, masks.ce) + (1 - ce_weight) * kd


def speed(args):
    cfg, cache, spec, teacher_dir = _setup(args)
    tok = cache.tokenizer()
    ds = CacheBatches(cfg.cache, "train", list(TOPK_FIELDS), cfg.batch_size, seed=0)
    batches = [b for _, b in zip(range(args.batches), make_loader(ds))]
    teacher = load_model(TeacherConfig(model=teacher_dir), CPU)
    modes = {"ce": spec.model_copy(update={"losses": {"ce": 1.0}}), "kd": spec}
    students = {m: build_student(s, cache.manifest, tok, CPU) for m, s in modes.items()}
    students["online"] = build_student(spec, cache.manifest, tok, CPU)
    opts = {m: make_optimizer(st.parameters(), spec, 1000)[0] for m, st in students.items()}

    def step(mode):
        t0 = time.perf_counter()
        for b in batches:
            if mode == "online":
                loss = online_step_losses(students[mode], teacher, b)
            else:
                loss = step_losses(students[mode], b, modes[mode], cache.manifest, CPU)["total"]
            loss.backward()
            opts[mode].step()
            opts[mode].zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / len(batches)

    def teacher_only():
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                teacher(input_ids=b["input_ids"]).logits
        return (time.perf_counter() - t0) / len(batches)

    for m in ("ce", "kd"):
        step(m)  # warm-up
    times = {"ce": [], "kd": [], "online": [], "teacher": []}
    for r in range(args.repeats):
        times["ce"].append(step("ce"))
        times["kd"].append(step("kd"))
        times["online"].append(step("online"))
        times["teacher"].append(teacher_only())
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    tok_per_batch = sum(int(b["length"].sum()) for b in batches) / len(batches)
    print(f"\nstudent {spec.name}, batch {cfg.batch_size} x {cache.manifest.preparation.seq_len} "
          f"({tok_per_batch:.0f} tokens), {args.batches} batches x {args.repeats} repeats, "
          f"torch threads {torch.get_num_threads()}")
    print("| step | median s/step | ratio |")
    print("|---|---|---|")
    print(f"| plain CE | {med['ce']:.3f} | 1.000 |")
    print(f"| cached KD (top-64 tail KL + CE) | {med['kd']:.3f} | {med['kd'] / med['ce']:.3f} (kd / ce) |")
    print(f"| online KD (teacher forward + full KL + CE) | {med['online']:.3f} | {med['online'] / med['kd']:.2f} "
          f"(online / kd) |")
    print(f"| teacher forward alone | {med['teacher']:.3f} | physical (teacher + kd step) / kd step = "
          f"{(med['teacher'] + med['kd']) / med['kd']:.2f} |")

    reader_rates(cfg, cfg.batch_size / med["kd"])


def reader_rates(cfg, consume: float | None = None) -> None:
    """Rows/s of one epoch of the train split through the reader, in process and through one DataLoader worker."""
    for workers in (0, 1):
        rd = CacheBatches(cfg.cache, "train", list(TOPK_FIELDS), cfg.batch_size, seed=1, num_workers=workers)
        t0 = time.perf_counter()
        n = sum(len(b["row"]) for b in make_loader(rd))
        rate = n / (time.perf_counter() - t0)
        print(f"reader, {workers} workers: {rate:,.0f} rows/s over {n} rows"
              + (f" = {rate / consume:,.0f}x the {consume:.2f} rows/s a KD step consumes" if consume else ""))


def quality(args):
    cfg, cache, spec, teacher_dir = _setup(args)
    steps = args.steps
    with tempfile.TemporaryDirectory(dir=REPO / "data") as tmp:
        base = {**cfg.model_dump(), "output_dir": tmp, "max_steps": steps, "eval_every": steps, "patience": None,
                "num_workers": 0}
        s = spec.model_dump()
        base["students"] = [
            {**s, "name": "ce", "losses": {"ce": 1.0}},
            {**s, "name": "kd_tail", "losses": {"kd_forward": 0.5, "ce": 0.5}},
            {**s, "name": "kd_renorm", "losses": {"kd_forward_renorm": 0.5, "ce": 0.5}},
        ]
        run = StudentRunConfig.model_validate(base)
        t0 = time.perf_counter()
        reports = {r["name"]: r["final"] for r in train_students(run, progress=False)}
        print(f"three cached students, one read: {time.perf_counter() - t0:.0f}s", flush=True)

        # online: same student, seed, data order, optimiser and steps; the teacher in the loop
        tok = cache.tokenizer()
        student = build_student(spec, cache.manifest, tok, CPU)
        opt, sched = make_optimizer(student.parameters(), spec, steps)
        teacher = load_model(TeacherConfig(model=teacher_dir), CPU)
        ds = CacheBatches(cfg.cache, "train", [], cfg.batch_size, seed=cfg.seed)
        done, epoch, t0 = 0, 0, time.perf_counter()
        while done < steps:
            ds.epoch = epoch
            for b in make_loader(ds):
                online_step_losses(student, teacher, b).backward()
                if spec.grad_clip:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), spec.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                done += 1
                if done >= steps:
                    break
            epoch += 1
        val = CacheBatches(cfg.cache, "validation", list(TOPK_FIELDS), cfg.batch_size, shuffle=False)
        reports["online_full"] = evaluate(student, make_loader(val), CPU)
        print(f"online student: {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"\n{spec.name}, {steps} steps x batch {cfg.batch_size} x {cache.manifest.preparation.seq_len} tokens, "
          f"seed {spec.seed}, lr {spec.lr}; validation split of {cfg.cache}")
    print("| training signal | val NLL | val ppl | top-1 agreement | KL(teacher||student) | ECE |")
    print("|---|---|---|---|---|---|")
    names = {"ce": "CE only", "kd_tail": "cached top-64 KD, tail bucket (+CE, 0.5/0.5)",
             "kd_renorm": "cached top-64 KD, renormalised (+CE)", "online_full": "online full-vocabulary KD (+CE)"}
    for k, label in names.items():
        m = reports[k]
        print(f"| {label} | {m['nll']:.4f} | {m['ppl']:.1f} | {m['top1_agreement']:.3f} | {m['kl']:.4f} | "
              f"{m['ece']:.4f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["speed", "quality", "reader"])
    ap.add_argument("--config", default=str(REPO / "data/configs/student.toml"))
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    if args.what == "reader":
        reader_rates(load_config(StudentRunConfig, args.config, []))
        return
    {"speed": speed, "quality": quality}[args.what](args)


if __name__ == "__main__":
    main()
