"""The front page's figures: the default student, a teacher-initialised student of the same budget, and the
teacher itself, side by side: validation figures (from each student's report.json) and greedy completions of
a few code prompts.

    make teacher-cache student                                              # the default student
    make student STUDENT_CONFIG=data/configs/student_from_teacher.toml      # the teacher-initialised one
    python benchmarks/front_page.py

Figures only; nothing is asserted.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

MODELS = {
    "teacher (SmolLM2-135M)": REPO / "data/teachers/SmolLM2-135M-Instruct",
    "default student (11M, random init)": REPO / "data/students/default/llama-4x192/model",
    "teacher-initialised student (46M, 5 of 30 layers)": REPO / "data/students/from-teacher/smollm2-5of30/model",
}
PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef list_python_files(folder):", "class Stack:\n    def push(self, item):"]
NEW_TOKENS = 32


def main() -> None:
    torch.manual_seed(0)
    print("| model | validation NLL | ppl | top-1 agreement | KL(teacher ‖ student) | steps |")
    print("|---|---|---|---|---|---|")
    for name, path in MODELS.items():
        report = path.parent / "report.json"
        if report.exists():
            r = json.loads(report.read_text())
            f, t = r["final"], r.get("teacher_validation", {}).get("default", {})
            print(f"| {name} | {f['nll']:.3f} | {f['ppl']:.1f} | {f['top1_agreement']:.3f} | {f['kl']:.3f} | "
                  f"{r['best_step']} of {r['steps']} |")
    if t:
        print(f"| teacher (SmolLM2-135M) | {t['nll']:.3f} | | 1 | 0 | |")
    for name, path in MODELS.items():
        if not (path / "config.json").exists():
            print(f"\n{name}: {path} not found (see the module docstring)")
            continue
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        print(f"\n## {name}")
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id)
            print("```python\n" + tok.decode(out[0], skip_special_tokens=True) + "\n```")


if __name__ == "__main__":
    main()
