"""Sharing figures on the default cache, against a moto S3 server started here on localhost.

    python benchmarks/bench_share.py [--cache data/caches/smollm2-stdlib] [--config data/configs/student.toml]

Prints: push and pull MB/s to the local S3 server; bytes a top-K-only pull transfers against the
whole cache; reader rows/s (the fields the default KD student reads, 0 DataLoader workers) from
local disk, from the bucket with an empty mirror (cold: every shard fetched and verified) and with
the mirror filled (warm), each against the rows/s a KD step of the default student consumes.
moto is a pure-Python server on the same 2 cores: the MB/s say what this code does against it,
not what a real S3 endpoint would give. Figures only; no asserts.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.student_config import StudentRunConfig
from pipeline.format import Cache  # noqa: E402
from pipeline.format.share import pull, push  # noqa: E402
from pipeline.train.dataset import CacheBatches, make_loader  # noqa: E402
from pipeline.train.student_init import build_student  # noqa: E402
from pipeline.train.students import make_optimizer  # noqa: E402
from pipeline.train.step import step_losses  # noqa: E402
from pipeline.train.terms import fields_for  # noqa: E402


def start_s3() -> str:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    import s3fs

    s3fs.S3FileSystem().mkdir("bench")
    return f"http://127.0.0.1:{port}"


def kd_rows_per_second(cfg: StudentRunConfig, cache: Cache, fields: list[str], batches: int = 3) -> float:
    spec = cfg.students[0]
    student = build_student(spec, cache.manifest, cache.tokenizer(), torch.device("cpu"))
    opt = make_optimizer(student.parameters(), spec, 1000)[0]
    data = [b for _, b in zip(range(batches + 1), make_loader(CacheBatches(cache, "train", fields, cfg.batch_size)))]
    times = []
    for i, b in enumerate(data):
        t0 = time.perf_counter()
        step_losses(student, b, spec, cache.manifest, torch.device("cpu"))["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return cfg.batch_size / statistics.median(times)


def reader_rate(cache: Cache, fields: list[str], batch_size: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = sum(len(b["row"]) for b in make_loader(CacheBatches(cache, "train", fields, batch_size, seed=1)))
    return n / (time.perf_counter() - t0), n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=str(REPO / "data/caches/smollm2-stdlib"))
    ap.add_argument("--config", default=str(REPO / "data/configs/student.toml"))
    args = ap.parse_args()
    cfg = load_config(StudentRunConfig, args.config, [])
    local = Cache(args.cache)
    fields = sorted({f for s in cfg.students for f in fields_for(s, local.manifest)})
    whole, n_files = local.manifest.bytes, sum(1 for _ in local.iter_files())
    endpoint = start_s3()
    url = "s3://bench/caches/default"
    print(f"cache {args.cache}: {whole / 2**20:.1f} MiB in {n_files} files; S3 server {endpoint} (moto)")

    res = push(args.cache, url, log=lambda m: None)
    print(f"push   {res['bytes'] / 2**20:7.1f} MiB in {res['seconds']:5.1f} s = {res['bytes'] / 2**20 / res['seconds']:6.1f}"
          " MB/s (after verifying the source)")
    with tempfile.TemporaryDirectory() as tmp:
        res = pull(url, Path(tmp) / "all", log=lambda m: None)
        print(f"pull   {res['bytes'] / 2**20:7.1f} MiB in {res['seconds']:5.1f} s = "
              f"{res['bytes'] / 2**20 / res['seconds']:6.1f} MB/s (every file's sha256 checked on arrival)")
        res = pull(url, Path(tmp) / "topk", fields=fields, splits=["train"], log=lambda m: None)
        print(f"pull --fields {','.join(fields)} --splits train: {res['bytes'] / 2**20:.1f} MiB of "
              f"{whole / 2**20:.1f} MiB = {res['bytes'] / whole:.1%} of the whole cache "
              f"({res['bytes'] / 2**20 / res['seconds']:.1f} MB/s)")

        consume = kd_rows_per_second(cfg, local, fields)
        os.environ["TEACHER_CACHE_MIRROR"] = str(Path(tmp) / "mirror")
        rates = {"local disk": reader_rate(local, fields, cfg.batch_size),
                 "bucket, cold mirror": reader_rate(Cache(url), fields, cfg.batch_size),
                 "bucket, warm mirror": reader_rate(Cache(url), fields, cfg.batch_size)}
    print(f"\nreader: fields {', '.join(fields)}; batch {cfg.batch_size}; 0 workers; one epoch of the train split")
    print(f"a KD step of the default student consumes {consume:.2f} rows/s (median of 3 steps)")
    print("| source | rows/s | x KD consumption |")
    print("|---|---|---|")
    for name, (rate, n) in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / consume:,.0f}x |")


if __name__ == "__main__":
    main()
