"""The classification worked example (docs/classification.md), step by step:

    python benchmarks/fortunes_example.py data       # Debian's fortunes -> data/fortunes/{train,validation,test}.jsonl
    python benchmarks/fortunes_example.py teacher    # fine-tune SmolLM2-135M into a topic classifier (once)
    distill teacher-cache --config data/configs/fortunes_cache.toml
    python benchmarks/fortunes_example.py students   # 3 seeds x (CE | KD + CE | KD + CE + hidden), test figures

The data are the fortune-cookie collections of Debian's `fortunes` package (BSD-licensed texts that
no one in this project wrote), labelled by the category file each cookie comes from. The package is
fetched with `apt-get download` (no root needed) when /usr/share/games/fortunes is not there.
Every cookie is a document; the split is fixed by a hash of its text (70/10/20).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "fortunes"
TEACHER = ROOT / "data" / "teachers" / "smollm2-fortunes"
BASE = ROOT / "data" / "teachers" / "SmolLM2-135M-Instruct"
CATEGORIES = ["computers", "politics", "science", "songs-poems", "work", "men-women"]
PER_CLASS = 500
MAX_CHARS = 600  # longer cookies (long poems, ascii art) are left out
SPLITS = {"train": 0.7, "validation": 0.1, "test": 0.2}
SEQ_LEN = 128


def fortunes_dir() -> Path:
    system = Path("/usr/share/games/fortunes")
    if (system / CATEGORIES[0]).is_file():
        return system
    cache = ROOT / "data" / "fortunes" / "deb"
    if not (cache / "usr/share/games/fortunes" / CATEGORIES[0]).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", "fortunes", "fortunes-min"], cwd=tmp, check=True)
            for deb in Path(tmp).glob("*.deb"):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(cache)], check=True)
    return cache / "usr/share/games/fortunes"


def cookies(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    out = []
    for c in text.split("\n%\n"):
        c = c.strip("\n%").strip()
        if 20 <= len(c) <= MAX_CHARS:
            out.append(c)
    return out


def split_of(text: str) -> str:
    u = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8
    acc = 0.0
    for name, share in SPLITS.items():
        acc += share
        if u < acc:
            return name
    return "test"


def make_data() -> None:
    src = fortunes_dir()
    DATA.mkdir(parents=True, exist_ok=True)
    rows = {s: [] for s in SPLITS}
    seen = set()
    for cat in CATEGORIES:
        items = [c for c in cookies(src / cat) if c not in seen]
        random.Random(cat).shuffle(items)
        for c in items[:PER_CLASS]:
            seen.add(c)
            rows[split_of(c)].append({"text": c, "label": cat})
    for s, items in rows.items():
        random.Random(s).shuffle(items)
        with open(DATA / f"{s}.jsonl", "w") as f:
            for r in items:
                f.write(json.dumps(r) + "\n")
        counts = {c: sum(r["label"] == c for r in items) for c in CATEGORIES}
        print(f"{s}: {len(items)} cookies {counts}")


# ---------------------------------------------------------------------------------------------
# the teacher: SmolLM2-135M-Instruct with a classification head, its top layers fine-tuned


def read_split(name: str) -> list[dict]:
    return [json.loads(x) for x in (DATA / f"{name}.jsonl").read_text().splitlines() if x.strip()]


def batches(tok, items, label2id, batch_size, shuffle, seed=0):
    import torch

    enc = tok([r["text"] for r in items], truncation=True, max_length=SEQ_LEN)
    order = sorted(range(len(items)), key=lambda i: len(enc["input_ids"][i]))  # similar lengths together
    groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if shuffle:
        random.Random(seed).shuffle(groups)
    for g in groups:
        n = max(len(enc["input_ids"][i]) for i in g)
        ids = torch.full((len(g), n), tok.pad_token_id)
        mask = torch.zeros((len(g), n), dtype=torch.long)
        for j, i in enumerate(g):
            row = enc["input_ids"][i]
            ids[j, :len(row)] = torch.tensor(row)
            mask[j, :len(row)] = 1
        yield ids, mask, torch.tensor([label2id[items[i]["label"]] for i in g])


def accuracy(model, tok, items, label2id) -> float:
    import torch

    right = 0
    with torch.inference_mode():
        for ids, mask, y in batches(tok, items, label2id, 32, False):
            right += int((model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == y).sum())
    return right / len(items)


def train_teacher(epochs: int, train_layers: int, lr: float) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(BASE)
    label2id = {c: i for i, c in enumerate(CATEGORIES)}
    model = AutoModelForSequenceClassification.from_pretrained(
        BASE, num_labels=len(CATEGORIES), id2label=dict(enumerate(CATEGORIES)), label2id=label2id,
        pad_token_id=tok.pad_token_id, dtype=torch.float32)
    n = model.config.num_hidden_layers
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [model.model.layers[i] for i in range(n - train_layers, n)] + [model.model.norm, model.score]
    for m in trained:
        for p in m.parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    train, val = read_split("train"), read_split("validation")
    steps = epochs * math.ceil(len(train) / 16)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    best, t0, step = -1.0, time.time(), 0
    for epoch in range(epochs):
        model.train()
        for ids, mask, y in batches(tok, train, label2id, 16, True, seed=epoch):
            loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % 20 == 0:
                print(f"step {step}/{steps} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
        model.eval()
        acc = accuracy(model, tok, val, label2id)
        print(f"epoch {epoch}: validation accuracy {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
        if acc > best:
            best = acc
            model.save_pretrained(TEACHER)
            tok.save_pretrained(TEACHER)
    info = {"base": str(BASE.relative_to(ROOT)), "epochs": epochs, "trained_layers": train_layers, "lr": lr,
            "validation_accuracy": best, "seconds": time.time() - t0, "categories": CATEGORIES}
    (TEACHER / "finetune.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("data")
    t = sub.add_parser("teacher")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--train-layers", type=int, default=10, help="top decoder layers fine-tuned (the rest frozen)")
    t.add_argument("--lr", type=float, default=1e-4)
    s = sub.add_parser("students")
    s.add_argument("--seeds", type=int, default=3)
    s.add_argument("--steps", type=int, default=130, help="optimiser steps of 16 rows (130: one epoch)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cmd == "data":
        make_data()
    elif args.cmd == "teacher":
        train_teacher(args.epochs, args.train_layers, args.lr)
    else:
        run_students(args.seeds, args.steps)


def run_students(seeds: int, steps: int) -> None:
    """data/configs/fortunes_students.toml for each seed (the data order; the students start from the same
    teacher layers): test accuracy, macro-F1 and agreement with the teacher of each student's best model
    (best validation accuracy), mean and standard deviation over seeds, and the teacher's own."""
    import statistics

    from pipeline.config import load_config
    from pipeline.student_config import StudentRunConfig
    from pipeline.format import Cache
    from pipeline.train.recipe import train_students

    base = ROOT / "data" / "configs" / "fortunes_students.toml"
    results: dict[str, list[dict]] = {}
    t0 = time.time()
    for seed in range(seeds):
        out = ROOT / "data" / "students" / "fortunes" / f"seed-{seed}"
        cache = ROOT / "data" / "caches" / "fortunes"
        cfg = load_config(StudentRunConfig, base, [f"seed={seed}", f"output_dir={out}", f"max_steps={steps}",
                                                   f"cache={cache}"])
        cfg = cfg.model_copy(update={"students": [s.model_copy(update={"seed": seed}) for s in cfg.students]})
        for r in train_students(cfg, log=print, progress=False):
            results.setdefault(r["name"], []).append({"seed": seed, "best_step": r["best_step"], **r["test"]})
        print(f"seed {seed} done, {time.time() - t0:.0f}s", flush=True)
    cache = Cache(ROOT / "data" / "caches" / "fortunes")
    teacher = cache.manifest.stats.teacher_accuracy
    params = {}
    for name in results:
        info = json.loads((ROOT / "data" / "students" / "fortunes" / "seed-0" / name / "report.json").read_text())
        params[name] = info["parameters"]
    summary = {"teacher_accuracy": teacher, "students": results, "parameters": params, "steps": steps,
               "seconds": time.time() - t0}
    out = ROOT / "data" / "students" / "fortunes" / "summary.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")

    def ms(name, key):
        v = [r[key] for r in results[name]]
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}"

    print(f"\nteacher (SmolLM2-135M classifier): test accuracy {teacher['test']:.3f}")
    print("| student | test accuracy | test macro-F1 | agreement with the teacher | parameters |")
    print("|---|---|---|---|---|")
    for name in results:
        print(f"| {name} | {ms(name, 'accuracy')} | {ms(name, 'macro_f1')} | {ms(name, 'top1_agreement')} | "
              f"{params[name] / 1e6:.1f}M |")
    for name in results:
        print(name, "per seed:", [(r["seed"], round(r["accuracy"], 4), r["best_step"]) for r in results[name]])


if __name__ == "__main__":
    sys.exit(main())
