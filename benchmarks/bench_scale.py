"""Growth curves: does a cache's cost in memory and start-up stay flat as it grows?

    python benchmarks/bench_scale.py            # corpora of 1e6, 1e7, 1e8 tokens; caches of 1e3, 1e4, 1e5 shards
    python benchmarks/bench_scale.py --quick    # 1e6, 1e7 tokens; 1e3, 1e4 shards

1. Preparation: generated text corpora (Parquet, words of the standard library's source drawn at random,
   documents of 200-4,000 words) prepared by `distill teacher-cache --dry-run` with the default teacher's
   tokenizer (seq_len 256), on 1 rank and on 2 (torchrun, gloo): seconds and peak RSS (the largest rank).
2. Caches: synthetic but real-format caches (rows of 8 tokens, 2 rows per shard, top-4 targets drawn at
   random) laid out by the capture's own `prepare_output` and written shard by shard by the real
   `CacheWriter` (two writer processes), finalized with its shard index. Per size, each in a fresh process:
   open (`Cache(path)`), `ls` (`list_caches`), `distill inspect`, `distill verify`, planning a rerun (what a
   rerun of the capture reads of a finished cache: the manifest and the plan comparison; of an unfinished one:
   which shards are committed, before the manifest is written), a student's first batch
   (`CacheBatches` + `make_loader`), and a reader worker's steady state (RSS after 2,000 batches).
3. The growth exponent of each (the log-log slope from the smallest to the largest size: 0 is flat,
   1 is linear) and the objects per cache.
4. The shard-size trade-off: the same tokens written at the default shapes with 64, 256 and 1,024 rows per
   shard: objects, object size, writer seconds per shard and writer memory.

Peak RSS is the process's own maximum resident set (ru_maxrss), imports included: compare sizes, not
absolute values. Needs the default teacher (`make teacher`) for its tokenizer and config; no weights are
loaded. Work files go to --work (default a temporary folder), removed unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEACHER = ROOT / "data" / "teachers" / "SmolLM2-135M-Instruct"
PY = sys.executable


# ---------------------------------------------------------------------------------------------- helpers


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` (which prints one JSON line last, or nothing) in a fresh wrapper; add the peak RSS of its largest
    process (MiB) and the wall seconds."""
    wrapper = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(json.dumps({'rc': r.returncode, 'out': r.stdout, 'err': r.stderr[-3000:], "
               "'wall': time.perf_counter() - t, "
               "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    res = subprocess.run([PY, "-c", wrapper, *cmd], capture_output=True, text=True, env=full, cwd=ROOT)
    out = json.loads(res.stdout)
    if out["rc"] != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out['err']}")
    lines = [x for x in out["out"].strip().splitlines() if x.startswith("{")]
    data = json.loads(lines[-1]) if lines else {}
    return {**data, "wall": out["wall"], "rss_mib": out["rss"]}


def slope(xs: list[float], ys: list[float]) -> float:
    """The log-log slope from the first point to the last (0: flat, 1: linear)."""
    if len(xs) < 2 or min(ys) <= 0:
        return float("nan")
    return (math.log(ys[-1]) - math.log(ys[0])) / (math.log(xs[-1]) - math.log(xs[0]))


def table(title: str, sizes: list[int], rows: dict[str, list[float]], unit: str) -> None:
    print(f"\n{title}")
    print(f"  {'':<28}" + "".join(f"{s:>12,}" for s in sizes) + f"{'slope':>9}")
    for name, ys in rows.items():
        print(f"  {name:<28}" + "".join(f"{y:>12,.{3 if unit == 's' else 0}f}" for y in ys)
              + f"{slope(sizes, ys):>9.2f}")


# ---------------------------------------------------------------------------------------------- preparation


def make_corpus(out: Path, tokens: int, seed: int = 0) -> Path:
    """A Parquet corpus of about `tokens` tokens (~1.3 tokens per word) of words from the standard library."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import sysconfig

    words = sorted({w for f in ("argparse.py", "typing.py", "inspect.py")
                    for w in (Path(sysconfig.get_paths()["stdlib"]) / f).read_text().split() if w.isidentifier()})
    rng = np.random.default_rng(seed)
    vocab = np.asarray(words)
    target_words = int(tokens / 1.3)
    writer, done, k = None, 0, 0
    while done < target_words:
        lengths = rng.integers(200, 4000, size=256)
        docs = [" ".join(vocab[rng.integers(0, len(vocab), size=n)]) for n in lengths]
        t = pa.table({"text": docs})
        writer = writer or pq.ParquetWriter(str(out), t.schema, compression="zstd")
        writer.write_table(t)
        done += int(lengths.sum())
        k += 1
    writer.close()
    return out


def prepare_config(work: Path, corpus: Path, out: Path) -> Path:
    cfg = work / f"prep-{corpus.stem}.toml"
    cfg.write_text(f'''[teacher]
model = "{TEACHER}"
[data]
source = "parquet"
data_files = ["{corpus}"]
seq_len = 256
max_tokens = 1_000_000_000_000
validation_fraction = 0.01
[capture]
top_k = 64
[output]
dir = "{out}"
''')
    return cfg


def bench_preparation(work: Path, sizes: list[int]) -> dict:
    """Dry runs on 1 and 2 ranks, one tokenizer thread per rank (RAYON_NUM_THREADS=1: the ranks of a node share
    its cores): wall seconds, each rank's own tokenising seconds, the largest rank's peak RSS."""
    distill = str(Path(PY).with_name("distill"))
    results = {"1 rank: seconds": [], "1 rank: tokenising s": [], "2 ranks: seconds": [],
               "2 ranks: tokenising s/rank": [], "1 rank: peak RSS MiB": [], "2 ranks: peak RSS MiB/rank": []}
    for n in sizes:
        corpus = make_corpus(work / f"corpus-{n}.parquet", n)
        cfg = prepare_config(work, corpus, work / "never-written")
        env = {"HF_DATASETS_CACHE": str(work / "hf-datasets"), "TMPDIR": str(work), "RAYON_NUM_THREADS": "1"}
        one = measured([distill, "teacher-cache", "-c", str(cfg), "--dry-run"], env)
        two = measured([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", distill,
                        "teacher-cache", "-c", str(cfg), "--dry-run"], env)
        tok_two = max(r.get("tokenise_seconds", 0.0) for r in two["ranks"])
        results["1 rank: seconds"].append(one["wall"])
        results["1 rank: tokenising s"].append(one["ranks"][0].get("tokenise_seconds", 0.0))
        results["2 ranks: seconds"].append(two["wall"])
        results["2 ranks: tokenising s/rank"].append(tok_two)
        results["1 rank: peak RSS MiB"].append(one["rss_mib"])
        results["2 ranks: peak RSS MiB/rank"].append(two["rss_mib"])
        print(f"  prepared {n:,} tokens ({sum(v['tokens'] for v in one['splits'].values()):,} in rows): 1 rank "
              f"{one['wall']:.1f}s ({results['1 rank: tokenising s'][-1]:.1f}s tokenising) {one['rss_mib']:.0f} MiB; "
              f"2 ranks {two['wall']:.1f}s ({tok_two:.1f}s tokenising per rank) {two['rss_mib']:.0f} MiB per rank; "
              f"documents tokenised per rank {[r.get('documents_tokenised') for r in two['ranks']]}", flush=True)
        assert one["splits"] == two["splits"], "2 ranks prepared other rows than 1"
        shutil.rmtree(work / "hf-datasets", ignore_errors=True)
        corpus.unlink()
    return results


# ---------------------------------------------------------------------------------------------- caches


def synthetic_settings(work: Path, shards: int, seq_len: int = 8, rows_per_shard: int = 2, top_k: int = 4,
                       rows_per_chunk: int = 2) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = rows_per_shard * shards
    rng = np.random.default_rng(1)
    words = np.asarray(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"])
    docs = [" ".join(words[rng.integers(0, 10, size=40)]) for _ in range(rows * seq_len // 30 + 16)]  # > rows
    name = f"{shards}x{rows_per_shard}x{seq_len}"
    corpus = work / f"synthetic-{name}.parquet"
    pq.write_table(pa.table({"text": docs}), corpus)
    return {"teacher": {"model": str(TEACHER)},
            "data": {"source": "parquet", "data_files": [str(corpus)], "seq_len": seq_len,
                     "max_tokens": rows * seq_len, "validation_fraction": 0.01},
            "capture": {"top_k": top_k, "rows_per_shard": rows_per_shard, "rows_per_chunk": rows_per_chunk,
                        "batch_size": rows_per_chunk},
            "output": {"dir": str(work / f"caches/c{name}")}}


def build_cache(work: Path, shards: int, writers: int = 2, **shape) -> tuple[Path, dict]:
    """Lay out a synthetic cache with the capture's own code, write its shards with two writer processes, measure
    what a resume of the unfinished capture reads, then finalize it."""
    settings = synthetic_settings(work, shards, **shape)
    plan_file = work / f"plan-{Path(settings['output']['dir']).name}.json"
    measured([PY, __file__, "_layout", json.dumps(settings), str(plan_file)],
             {"HF_DATASETS_CACHE": str(work / "hf-datasets")})
    if writers == 1:
        wrote = measured([PY, __file__, "_write", str(plan_file), "0", "1"])
    else:
        procs = [subprocess.Popen([PY, __file__, "_write", str(plan_file), str(k), str(writers)],
                                  env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
                 for k in range(writers)]
        if any(p.wait() for p in procs):
            raise SystemExit("a writer process failed")
        wrote = {}
    unfinished = measured([PY, __file__, "_op", "resume_unfinished", settings["output"]["dir"]])
    measured([PY, __file__, "_finalize", str(plan_file)])
    return Path(settings["output"]["dir"]), {**unfinished, "write": wrote}


def _layout(settings_json: str, plan_file: str) -> None:
    from dataclasses import replace

    import torch

    from pipeline.capture.output import prepare_output
    from pipeline.capture.plan import build_plan
    from pipeline.capture.rows import prepare
    from pipeline.capture.teacher import capture_specs, describe_teacher
    from pipeline.config import TeacherCacheConfig
    from pipeline.format.storage import Storage

    cfg = TeacherCacheConfig.model_validate(json.loads(settings_json))
    teacher = describe_teacher(cfg)
    prepared = prepare(cfg.data, teacher.tokenizer, shard_rows=cfg.capture.rows_per_shard)
    specs = capture_specs(cfg, teacher)
    plan = build_plan(cfg, replace(teacher, hidden=[], attention=[], device=torch.device("cpu")), prepared, specs,
                      "synthetic")
    st = Storage(cfg.output.dir)
    st.local_path().mkdir(parents=True, exist_ok=True)
    outcome = prepare_output(cfg, st, plan, None, prepared, specs, teacher.tokenizer, lambda m: None)
    Path(plan_file).write_text(json.dumps({"settings": json.loads(settings_json), "plan": plan,
                                           "todo": [list(t) for t in outcome.todo]}))
    prepared.close()


def _writer(plan_file: str):
    from pipeline.capture.teacher import capture_specs, describe_teacher
    from pipeline.config import TeacherCacheConfig
    from pipeline.format import CacheWriter, Manifest

    spec = json.loads(Path(plan_file).read_text())
    cfg = TeacherCacheConfig.model_validate(spec["settings"])
    plan = Manifest.from_dict(spec["plan"])
    specs = capture_specs(cfg, describe_teacher(cfg))
    return CacheWriter(Path(cfg.output.dir), plan, specs, {s: v.rows for s, v in plan.splits.items()}), spec


def _write(plan_file: str, k: str, n: str) -> None:
    import numpy as np

    from pipeline.capture.targets import TeacherTargets

    writer, spec = _writer(plan_file)
    writer.create_arrays()
    rng = np.random.default_rng(int(k))
    L, K = spec["settings"]["data"]["seq_len"], spec["settings"]["capture"]["top_k"]
    t0, shards = time.perf_counter(), 0
    for split, index, a, b in spec["todo"][int(k)::int(n)]:
        rows = b - a
        lp = -rng.random((rows, L, K), dtype=np.float32) * 5
        t = TeacherTargets(topk_ids=rng.integers(0, 49152, size=(rows, L, K), dtype=np.int32),
                           topk_logprobs=np.sort(lp, -1)[..., ::-1].astype(np.float16),
                           logsumexp=rng.random((rows, L), dtype=np.float32),
                           target_logprob=rng.random((rows, L), dtype=np.float32))
        writer.write_shard(split, index, t, {"tokens": rows * L, "seconds": 0.001, "topk_mass_sum": 0.5 * rows * L})
        shards += 1
    print(json.dumps({"seconds": time.perf_counter() - t0, "shards": shards}))


def _finalize(plan_file: str) -> None:
    writer, _ = _writer(plan_file)
    writer.create_arrays()
    writer.finalize()


def _op(kind: str, path: str) -> None:
    """One measured operation in this (fresh) process, timed after its imports; prints {"seconds": ...}."""
    from pipeline.capture.plan import finished_changes
    from pipeline.format import Cache, Storage, list_caches, read_manifest
    from pipeline.format.writer import committed_shards

    if kind in ("first_batch", "steady"):
        from pipeline.train.dataset import CacheBatches, make_loader
    t0 = time.perf_counter()
    extra = {}
    if kind == "open":
        Cache(path)
    elif kind == "ls":
        list_caches(str(Path(path).parent))
    elif kind == "resume":  # what a rerun of the capture reads of a finished cache before it knows it is done
        m = read_manifest(Storage(path))
        assert finished_changes(m, m.plan()) == []
    elif kind == "resume_unfinished":  # ... of an unfinished one: which shards are committed (their records' names)
        extra["committed"] = len(committed_shards(Storage(path)))
    elif kind in ("first_batch", "steady"):
        ds = CacheBatches(path, "train", ["topk_ids", "topk_logprobs", "logsumexp"], 8, seed=0)
        it = iter(make_loader(ds))
        next(it)
        if kind == "steady":
            extra["seconds_first"] = time.perf_counter() - t0
            t1, n = time.perf_counter(), 0
            while n < 2000:
                for _ in it:
                    n += 1
                    if n == 2000:
                        break
                ds.epoch += 1  # the next epoch, reshuffled
                it = iter(make_loader(ds))
            extra["ms_per_batch"] = (time.perf_counter() - t1) / 2000 * 1000
    else:
        raise SystemExit(f"unknown op {kind}")
    print(json.dumps({"seconds": time.perf_counter() - t0, **extra,
                      "rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_caches(work: Path, sizes: list[int]) -> tuple[dict, dict, list[dict]]:
    distill = str(Path(PY).with_name("distill"))
    secs = {k: [] for k in ("open", "ls", "inspect", "verify", "rerun of a finished cache",
                            "resume of an unfinished one", "first batch", "reader: ms/batch")}
    rss = {k: [] for k in ("open", "ls", "inspect", "verify", "rerun of a finished cache",
                           "resume of an unfinished one", "first batch", "reader after 2,000 batches")}
    facts, actual = [], []
    for n in sizes:
        t0 = time.perf_counter()
        path, unfinished = build_cache(work, n)
        built = time.perf_counter() - t0
        secs["resume of an unfinished one"].append(unfinished["seconds"])
        rss["resume of an unfinished one"].append(unfinished["rss_mib"])
        for kind, name in (("open", "open"), ("ls", "ls"), ("resume", "rerun of a finished cache"),
                           ("first_batch", "first batch")):
            r = measured([PY, __file__, "_op", kind, str(path)])
            secs[name].append(r["seconds"])
            rss[name].append(r["rss_mib"])
        for cmd, name in ((["inspect", str(path)], "inspect"), (["verify", str(path)], "verify")):
            r = measured([distill, *cmd])
            secs[name].append(r["wall"])
            rss[name].append(r["rss_mib"])
        r = measured([PY, __file__, "_op", "steady", str(path)])
        secs["reader: ms/batch"].append(r["ms_per_batch"])
        rss["reader after 2,000 batches"].append(r["rss_mib"])
        manifest = (path / "manifest.json").stat().st_size
        files = sum(1 for p in path.rglob("*") if p.is_file())
        n = json.loads((path / "manifest.json").read_text())
        n = sum(s["shards"] for s in n["splits"].values())  # as written (the corpus may fall a little short)
        actual.append(n)
        facts.append({"shards": n, "build_seconds": built, "manifest_bytes": manifest, "files": files,
                      "index_bytes": sum(p.stat().st_size for p in path.rglob("shards.parquet"))})
        print(f"  cache of {n:,} shards: built in {built:.0f}s, {files:,} files, manifest {manifest:,} bytes",
              flush=True)
        shutil.rmtree(path)
    return secs, rss, facts, actual


def bench_objects(work: Path, tokens: int) -> None:
    """Objects per cache against what a shard costs: the default shapes (seq_len 256, top-64), one writer
    process, `tokens` tokens written with 64, 256 and 1,024 rows per shard."""
    print(f"\nshard size trade-off (seq_len 256, top_k 64, {tokens:,} tokens, one writer process)")
    print(f"  {'rows/shard':>10} {'tokens/shard':>13} {'objects':>8} {'per 1e9 tokens':>15} {'MiB/object':>11} "
          f"{'write s/shard':>14} {'writer RSS MiB':>15}")
    for rows in (64, 256, 1024):
        shards = max(tokens // (rows * 256), 1)
        path, facts = build_cache(work, shards, writers=1, seq_len=256, rows_per_shard=rows, top_k=64,
                                  rows_per_chunk=8)
        files = [p for p in path.rglob("*") if p.is_file() and "/c/" in p.as_posix()]  # the shard objects
        data = [p.stat().st_size for p in files]
        per_shard = facts["write"]["seconds"] / max(facts["write"]["shards"], 1)
        n_obj = len(data)
        print(f"  {rows:>10} {rows * 256:>13,} {n_obj:>8,} {n_obj / (shards * rows * 256) * 1e9:>15,.0f} "
              f"{sum(data) / max(n_obj, 1) / 2**20:>11.2f} {per_shard:>14.3f} {facts['write']['rss_mib']:>15,.0f}",
              flush=True)
        shutil.rmtree(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1e6-1e7 tokens, 1e3-1e4 shards")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-preparation", action="store_true")
    ap.add_argument("--skip-caches", action="store_true")
    ap.add_argument("--skip-objects", action="store_true")
    args = ap.parse_args()
    if not TEACHER.exists():
        raise SystemExit(f"{TEACHER} is missing: run `make teacher` first (its tokenizer and config are used)")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    tokens = [10**6, 10**7] if args.quick else [10**6, 10**7, 10**8]
    shards = [10**3, 10**4] if args.quick else [10**3, 10**4, 10**5]
    print(f"bench_scale: {os.cpu_count()} cores; work in {work}", flush=True)
    try:
        if not args.skip_preparation:
            prep = bench_preparation(work, tokens)
            table("preparation (distill teacher-cache --dry-run), by corpus tokens", tokens,
                  {k: v for k, v in prep.items() if "RSS" not in k}, "s")
            table("", tokens, {k: v for k, v in prep.items() if "RSS" in k}, "MiB")
        if not args.skip_caches:
            secs, rss, facts, actual = bench_caches(work, shards)
            table("seconds, by shards in the cache", actual, secs, "s")
            table("peak RSS MiB, by shards in the cache", actual, rss, "MiB")
            print("\nobjects: " + "; ".join(f"{f['shards']:,} shards: {f['files']:,} files, manifest "
                                            f"{f['manifest_bytes']:,} B, shard index {f['index_bytes']:,} B, built "
                                            f"in {f['build_seconds']:.0f}s" for f in facts))
        if not args.skip_objects:
            bench_objects(work, 2**20 if args.quick else 2**22)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        {"_layout": _layout, "_write": _write, "_finalize": _finalize, "_op": _op}[sys.argv[1]](*sys.argv[2:])
    else:
        main()
