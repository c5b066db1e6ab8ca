"""Figures: how far is a bfloat16 (float16, float32) capture of the real teacher from its float64 forward?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_bf16.py [--rows 8] [--seq-len 256] [--top-k 64]

1. The default config's teacher (SmolLM2-135M-Instruct) and rows (Python's standard library, packed,
   shuffled with seed 0): `--rows` rows of `--seq-len` tokens, captured through the real capture
   (`run_capture`, on the CPU) once per teacher dtype, top-K only; the bfloat16 capture also stores the
   final hidden state (bfloat16 bits) and the LM head, the exact full-distribution mode.
2. References, float64 forwards over the same rows: `original` = the saved float32 weights widened;
   `rounded` = the weights rounded to the capture's dtype, then widened (the difference from `original`
   is the weights' rounding; what is left is the low-precision arithmetic).
3. Per teacher dtype, on every position of the rows: abs error of the stored top-K log-probs (at the
   stored ids, against the reference's log-probs there), of logsumexp, of the tail mass 1 - sum exp(top-K
   log-probs) (same ids); top-1 agreement (stored first id = the reference's argmax), top-K set overlap
   (|stored ids & reference top-K| / K, mean) and the share of positions whose K ids are the same set;
   max |z - z_ref| / (2^-8 m), the logit error in bfloat16 roundings of the position's largest |logit| m
   (what tests/test_bf16.py budgets). "bf16 final_hidden" are the targets a student recomputes from that
   cache (`TeacherHead`: the bfloat16 final state through the head in float32).
4. The capture against the teacher's own logits in its dtype (replayed batch by batch as the capture
   ran): max abs error of logsumexp and of the top-K log-probs: float32 / float16 storage rounding only
   when the capture loses nothing.
Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline import models  # noqa: E402
from pipeline.capture.run import run_capture  # noqa: E402
from pipeline.config import TeacherCacheConfig, load_config  # noqa: E402
from pipeline.format import Cache  # noqa: E402
from pipeline.train.head import TeacherHead  # noqa: E402

U_BF16 = 2.0**-8


def capture(args, dtype: str, out: Path) -> tuple[Cache, float]:
    overrides = [f"teacher.dtype={dtype}", "teacher.device=cpu", f"data.seq_len={args.seq_len}",
                 f"data.max_tokens={(args.rows + 1) * args.seq_len}", "data.validation_fraction=0.0",
                 f"capture.top_k={args.top_k}", "capture.temperatures=[]", "capture.hidden_layers=[]",
                 "capture.attention_layers=[]", f"capture.batch_size={args.batch_size}",
                 f"capture.rows_per_shard={args.rows + 8}", "capture.rows_per_chunk=1", f"output.dir={out}"]
    if dtype == "bfloat16":
        overrides += ["capture.final_hidden=true", "capture.final_hidden_dtype=bfloat16"]
    cfg = load_config(TeacherCacheConfig, args.config, overrides)
    t0 = time.perf_counter()
    run_capture(cfg, log=lambda m: None, progress=False)
    return Cache(out), time.perf_counter() - t0


def stored_fields(c: Cache, n: int) -> dict[str, np.ndarray]:
    rows = c.rows("train", max_rows=n)
    f = {name: c.array("train", name)[:n] for name in ("topk_ids", "topk_logprobs", "logsumexp")}
    f["input_ids"] = np.stack(rows.column("input_ids").to_numpy(zero_copy_only=False))[:n].astype(np.int64)
    f["lengths"] = rows.column("length").to_numpy()[:n].astype(np.int64)
    if "final_hidden" in c.dense_fields:
        f["final_hidden"] = c.array("train", "final_hidden")[:n]
    return f


def forward_logits(model, ids: np.ndarray, lengths: np.ndarray, batch_size: int):
    """Per batch of rows as the capture ran them (mask None when every row is full): (first row, the model's
    output) for the float64 references."""
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            x = torch.from_numpy(ids[s : s + batch_size])
            valid = torch.arange(x.shape[1])[None] < torch.from_numpy(lengths[s : s + batch_size])[:, None]
            mask = None if bool(valid.all()) else valid.long()
            yield s, model(input_ids=x, attention_mask=mask, use_cache=False).logits


def own_logits(model, ids: np.ndarray, lengths: np.ndarray, batch_size: int, position_chunk: int):
    """The teacher's logits (N, L, V) float32 in its own dtype, computed as the capture computes them: the decoder
    per batch, the head (`output_logits`) per block of `position_chunk` positions of the batch. Also the share of
    logits that differ when the head runs on the whole batch at once (HF's `model(...).logits`), and the largest
    logsumexp difference that makes: low-precision matmuls round differently by the shape of the product."""
    spec = models.TeacherSpec.from_config(model.config)
    head = models.output_logits(model, spec)
    out, n_diff, lse_diff = [], 0, 0.0
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            x = torch.from_numpy(ids[s : s + batch_size])
            valid = torch.arange(x.shape[1])[None] < torch.from_numpy(lengths[s : s + batch_size])[:, None]
            mask = None if bool(valid.all()) else valid.long()
            h = model.get_decoder()(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state  # (B, L, d)
            flat = h.reshape(-1, h.shape[-1])
            z = torch.cat([head(flat[a : a + position_chunk]) for a in range(0, len(flat), position_chunk)])
            z = z.reshape(*h.shape[:2], -1)  # (B, L, V) float32
            whole = head(h)
            n_diff += int((whole != z).sum())
            lse_diff = max(lse_diff, float((torch.logsumexp(whole.double(), -1) - torch.logsumexp(z.double(), -1))
                                           .abs().max()))
            out.append(z)
    z = torch.cat(out)
    return z, n_diff / z.numel(), lse_diff


def targets_of(z: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Top-K ids and log-probs, logsumexp of logits z (P, V), computed in float64."""
    z = z.double()
    lse = torch.logsumexp(z, -1)
    vals, ids = z.topk(k, -1)
    return {"topk_ids": ids, "topk_logprobs": vals - lse[:, None], "logsumexp": lse}


class Errors:
    """Per-position and per-(position, k) errors of one set of targets against one reference, row by row."""

    def __init__(self):
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, t: dict[str, torch.Tensor], z_ref: torch.Tensor, z_model: torch.Tensor | None, k: int) -> None:
        """t: the targets of P positions (topk_ids, topk_logprobs, logsumexp), z_ref (P, V) float64, z_model the
        logits that produced them (P, V) or None."""
        ids = t["topk_ids"].long()
        lp = t["topk_logprobs"].double()
        lse_ref = torch.logsumexp(z_ref, -1)
        lp_ref = z_ref.gather(-1, ids) - lse_ref[:, None]
        ref_top = z_ref.topk(k, -1).indices
        same = (ids[:, :, None] == ref_top[:, None, :]).any(-1)  # (P, K) stored id in the reference's top-K
        m = z_ref.abs().amax(-1)
        new = {
            "lp": (lp - lp_ref).abs().flatten(),
            "lse": (t["logsumexp"].double() - lse_ref).abs(),
            "tail": ((1 - lp.exp().sum(-1)) - (1 - lp_ref.exp().sum(-1))).abs(),
            "top1": (ids[:, 0] == z_ref.argmax(-1)).double(),
            "overlap": same.double().mean(-1),
            "sameset": same.all(-1).double(),
        }
        if z_model is not None:
            new["dz"] = (z_model.double() - z_ref).abs().amax(-1) / (U_BF16 * m)
        for name, v in new.items():
            self.parts.setdefault(name, []).append(v.numpy())

    def get(self, name: str) -> np.ndarray:
        return np.concatenate(self.parts[name]) if name in self.parts else np.array([np.nan])


def stats(x: np.ndarray) -> str:
    return f"{x.mean():9.2e} {np.quantile(x, 0.99):9.2e} {x.max():9.2e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "data/configs/teacher_cache.toml"))
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command: " + " ".join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO))
                                  else sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_bf16_") as work:
        report(args, Path(work))


def report(args, work: Path) -> None:
    """Capture under `work`, compare, print."""
    k, n = args.top_k, args.rows
    base = load_config(TeacherCacheConfig, args.config, [])
    fields, seconds = {}, {}
    for dtype in args.dtypes:
        c, seconds[dtype] = capture(args, dtype, work / dtype)
        fields[dtype] = stored_fields(c, n)
        if dtype == "bfloat16":
            head = TeacherHead.from_cache(c, "cpu")
    first = fields[args.dtypes[0]]
    ids, lengths = first["input_ids"], first["lengths"]
    for d, f in fields.items():
        if not np.array_equal(f["input_ids"], ids):
            raise SystemExit(f"the {d} capture has other rows than the {args.dtypes[0]} one")
    valid = torch.from_numpy(np.arange(ids.shape[1])[None] < lengths[:, None])  # (N, L)
    print(f"teacher {base.teacher.model}: {len(ids)} rows x {ids.shape[1]} tokens ({int(valid.sum())} real "
          f"positions), top-{k}, batch {args.batch_size}; capture seconds: "
          + ", ".join(f"{d} {s:.1f}" for d, s in seconds.items()), flush=True)

    def rows_targets(f: dict, r: int) -> dict[str, torch.Tensor]:
        v = valid[r]
        return {name: torch.from_numpy(f[name][r].astype(np.int64 if name == "topk_ids" else np.float64))[v]
                for name in ("topk_ids", "topk_logprobs", "logsumexp")}

    # 4. the capture against the teacher's own logits in its dtype
    own_err: dict[str, tuple[float, float, float, float, float]] = {}
    own: dict[str, torch.Tensor] = {}  # (N, L, V) float32 in the teacher's dtype, for the logit error
    for dtype in args.dtypes:
        t0 = time.perf_counter()
        model = models.load_model(base.teacher.model_copy(update={"dtype": dtype}), torch.device("cpu"))
        own[dtype], diff_share, diff_lse = own_logits(model, ids, lengths, args.batch_size,
                                                      base.capture.position_chunk)
        lse_e, lp_e = 0.0, 0.0
        for r in range(len(ids)):
            z = own[dtype][r][valid[r]].double()
            lse_own = torch.logsumexp(z, -1)
            st = rows_targets(fields[dtype], r)
            lse_e = max(lse_e, float((st["logsumexp"] - lse_own).abs().max()))
            lp_own = z.gather(-1, st["topk_ids"]) - lse_own[:, None]
            lp_e = max(lp_e, float((st["topk_logprobs"] - lp_own).abs().max()))
        lp = fields[dtype]["topk_logprobs"][valid.numpy()]
        ties = float((lp[:, 0] == lp[:, 1]).mean())
        own_err[dtype] = (lse_e, lp_e, diff_share, diff_lse, ties)
        print(f"  {dtype} own-logits replay {time.perf_counter() - t0:.1f}s", flush=True)
        del model

    # 2-3. float64 references
    weights = models.load_model(base.teacher.model_copy(update={"dtype": "float32"}), torch.device("cpu"))
    refs = {"original": None}
    refs.update({f"rounded to {d}": d for d in args.dtypes if d != "float32"})
    errors: dict[tuple[str, str], Errors] = {}
    for ref_name, rounding in refs.items():
        t0 = time.perf_counter()
        model = copy.deepcopy(weights)  # Module.to converts in place
        model = model.to(getattr(torch, rounding)).double() if rounding else model.double()
        dtypes = args.dtypes if rounding is None else [rounding]
        for s, z_ref_batch in forward_logits(model, ids, lengths, args.batch_size):
            for j in range(z_ref_batch.shape[0]):
                r = s + j
                z_ref = z_ref_batch[j][valid[r]]  # (P, V) float64
                for dtype in dtypes:
                    errors.setdefault((dtype, ref_name), Errors()).add(
                        rows_targets(fields[dtype], r), z_ref, own[dtype][r][valid[r]], k)
                if rounding in (None, "bfloat16") and "bfloat16" in fields:  # the exact mode's recomputed targets
                    h = head.decode(torch.from_numpy(fields["bfloat16"]["final_hidden"][r].view(np.int16)))
                    z_fh = head(h[valid[r]])  # (P, V) float32
                    errors.setdefault(("bf16 final_hidden", ref_name), Errors()).add(targets_of(z_fh, k), z_ref,
                                                                                     z_fh, k)
        print(f"  float64 forward, weights {ref_name}: {time.perf_counter() - t0:.1f}s", flush=True)
        del model

    print()
    print(f"abs error against the float64 forward, over {int(valid.sum())} positions (top-K: x{k}): "
          "mean / p99 / max")
    head_line = (f"{'capture':<18} {'reference':<18} | {'top-K log-probs (nats)':^29} | {'logsumexp (nats)':^29} | "
                 f"{'tail mass':^29} | {'top-1':>6} {'top-K':>6} {'same':>6} | {'dz/(u m)':>8}")
    print(head_line)
    print("-" * len(head_line))
    for (dtype, ref_name), e in errors.items():
        dz = e.get("dz")
        print(f"{dtype:<18} {ref_name:<18} | {stats(e.get('lp'))} | {stats(e.get('lse'))} | {stats(e.get('tail'))} | "
              f"{e.get('top1').mean():6.4f} {e.get('overlap').mean():6.4f} {e.get('sameset').mean():6.4f} | "
              f"{dz.max():8.2f}")
    print("top-1: stored first id = reference argmax; top-K: mean |stored ids & reference top-K| / K; same: share of "
          "positions with the same K ids; dz/(u m): max_i |z_i - z_ref,i| / (2^-8 max_i |z_ref,i|), the worst position")
    print()
    print("the capture against the teacher's own logits in its dtype (max abs error; storage rounding only); "
          "the head's rounding by the product's shape; exact ties between the 1st and 2nd stored log-probs:")
    for dtype, (lse_e, lp_e, diff_share, diff_lse, ties) in own_err.items():
        print(f"  {dtype:<9} logsumexp {lse_e:.2e} (float32 storage), top-K log-probs {lp_e:.2e} (float16 storage); "
              f"head over the whole batch: {diff_share:.2%} of logits differ, logsumexp by <= {diff_lse:.1e}; "
              f"top-1/top-2 ties {ties:.1%} of positions")
    if "bfloat16" in fields:  # the top-K fields and the exact mode of the same bf16 cache
        d_lse, agree = [], []
        for r in range(len(ids)):
            v = valid[r]
            h = head.decode(torch.from_numpy(fields["bfloat16"]["final_hidden"][r].view(np.int16)))
            z_fh = head(h[v]).double()
            st = rows_targets(fields["bfloat16"], r)
            d_lse.append((st["logsumexp"] - torch.logsumexp(z_fh, -1)).abs().numpy())
            agree.append((st["topk_ids"][:, 0] == z_fh.argmax(-1)).numpy())
        d_lse = np.concatenate(d_lse)
        print(f"  one bfloat16 cache, its logsumexp against the distribution its final_hidden + head give a student "
              f"(head in float32): |diff| mean {d_lse.mean():.2e}, max {d_lse.max():.2e}; top-1 the same at "
              f"{np.concatenate(agree).mean():.2%} of positions")

if __name__ == "__main__":
    main()
