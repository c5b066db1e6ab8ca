"""`distill import`: another tool's top-K log-probs (axolotl's KD layout, vLLM's prompt_logprobs, DistillKit's
compressed files) as a cache.

Two passes over the source (`imported.py` reads it), nothing held but a batch and a shard:

1. `survey.survey`: every row is checked before anything is written, and what the source holds is learnt (K, the
   normalisation, what is known, the alignment of targets with tokens); `survey.decide` makes the manifest's
   `imported` section of it.
2. `write_split`: the rows in the cache's alignment (cache position t holds the distribution that predicts token
   t + 1: the source's position t + 1), each position's K most likely entries (more are folded into the tail,
   whose mass stays exact for vocabulary-normalised log-probs), through the capture's writer: shards committed
   as written, the manifest last. Identical rows are kept once (keys are unique in a cache).

The teacher is named, never loaded: its config (when it can be read) gives the architecture facts, its tokenizer
the vocabulary and the fingerprint students are checked against. The manifest's `imported` section records
what the source said (docs/format.md); `pipeline.train.terms.on_import` derives from it which loss terms are
exact.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import TeacherConfig
from ..errors import DataError, StorageError, TeacherError
from ..format.columns import row_fields
from ..format.layout import MANIFEST, PLAN_FILE, ROWS_FILE, write_json
from ..format.manifest import Manifest
from ..format.plans import part_record, plan_document, tokenizer_record
from ..format.reader import Cache
from ..format.records import Split
from ..format.specs import field_specs
from ..format.storage import Storage
from ..format.writer import CacheWriter
from .imported import EXTENSIONS, blocks, source_splits
from .layouts import Block
from .output import store_tokenizer, wipe
from .packing import tokenizer_pad_id
from .plan import software
from .rowfiles import KeyStore, RowFileWriter, Rows
from .rows import content_key
from .survey import ImportSettings, Survey, Targets, decide, in_order, ranked, survey, targets
from .targets import TeacherTargets

__all__ = ["ImportSettings", "run_import"]


# ---------------------------------------------------------------------------------------------
# the teacher, the plan


def teacher_facts(s: ImportSettings):
    """(the teacher's manifest entry, its tokenizer, the vocabulary ids must fall in)."""
    from .. import models

    tok = models.load_tokenizer(TeacherConfig(model=s.tokenizer or s.teacher))
    try:
        spec = models.TeacherSpec.from_config(models.load_model_config(TeacherConfig(model=s.teacher))).to_dict()
    except (TeacherError, TypeError, ValueError):  # no readable config: the facts stay unknown
        spec = {"model_type": None, "vocab_size": None, "hidden_size": None, "num_layers": None, "num_heads": None}
    vocab = s.vocab_size or spec.get("vocab_size") or len(tok)
    if vocab < len(tok):
        raise DataError(f"vocab_size {vocab} is smaller than the tokenizer's {len(tok)} tokens")
    teacher = {**spec, "model": s.teacher, "vocab_size": vocab, "weights_sha256": None, "gguf_file": None,
               "revision": None, "dtype": None, "device_type": None}
    return teacher, tok, vocab


def build_plan(s: ImportSettings, sv: Survey, imported: dict, teacher: dict, tok, L: int, specs) -> dict:
    split_rows = sv.rows
    fields = {f.name: f.to_dict(split_rows, s.rows_per_chunk, s.rows_per_shard) for f in specs}
    fields |= row_fields(["key", "input_ids", "length", "loss_mask"] + (["position_ids"] if sv.documents else []),
                         split_rows, L)
    column = "prompt_token_ids" if imported["layout"] == "vllm" else "input_ids"
    return plan_document(
        teacher=teacher, tokenizer=tokenizer_record(tok),
        dataset={"source": s.source, "split": None, "columns": {"token ids": column}, "text_column": None,
                 "data_files": [f for files in sv.files.values() for f in files],
                 "statistics": {"documents": sv.rows_read, "duplicate_rows": sv.duplicates}},
        preparation={"seq_len": L, "packing": sv.documents, "format": "imported", "loss_mask": "imported",
                     "document_mask": sv.documents, "add_special_tokens": False},
        capture={"top_k": imported["top_k"], "temperatures": [], "temperatures_all": [1.0], "hidden_layers": [],
                 "hidden_dtype": "float16", "attention_layers": [], "attention_heads_stored": None,
                 "rows_per_shard": s.rows_per_shard, "rows_per_chunk": s.rows_per_chunk, "compression_level": 3,
                 "samples": 0, "sample_temperature": 1.0, "sample_seed": 0, "final_hidden": False,
                 "final_hidden_dtype": "float16", "topk_codec": "pcodec", "hidden_codec": "zstd",
                 "topk_ids_encoding": "ids"},
        imported=imported,
        splits=[Split.of(sp, (part_record(sp, 0, n, sv.tokens[sp], s.rows_per_shard),))
                for sp, n in split_rows.items()],
        fields=fields,
        software=software(),
    )


# ---------------------------------------------------------------------------------------------
# pass 2


class _Shard:
    """Rows gathered for one shard, in the cache's alignment."""

    def __init__(self, L: int, K: int, lse: bool, label: bool, pad: int, documents: bool):
        self.L, self.K, self.lse, self.label, self.pad, self.documents = L, K, lse, label, pad, documents
        self.ids, self.lengths, self.keys, self.mask, self.top_ids, self.top_lp, self.lses, self.labels = \
            [], [], [], [], [], [], [], []
        self.position_ids = []
        self.mass, self.positions = 0.0, 0  # the K kept entries' probability at trained positions, and those

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, b: Block, t: Targets, top_ids: np.ndarray, top_lp: np.ndarray, kept_mass: np.ndarray, r: int,
            key: str) -> None:
        a, e = int(b.starts[r]), int(b.starts[r + 1])
        n, L = e - a, self.L
        ids = np.full(L, self.pad, np.int32)  # padded as the capture pads
        ids[:n] = b.tokens[a:e]
        src = np.arange(a + 1, e)  # cache position p <- the source's position p + 1
        trains = t.target[src]
        mask = np.zeros(L, np.uint8)
        mask[: n - 1] = trains
        tid, tlp = np.zeros((L, self.K), np.int64), np.zeros((L, self.K), np.float16)
        tid[: n - 1], tlp[: n - 1] = top_ids[src], top_lp[src]
        lse = np.zeros(L, np.float32)  # 0 where nothing trains, as the capture pads: never NaN under a mask
        lse[: n - 1] = np.where(trains, b.lse[src] if self.lse else np.nan, 0.0)
        label = np.full(L, np.nan, np.float32)
        if self.label:
            label[: n - 1] = np.where(trains, t.label_lp[src], np.nan)
        self.mass += float(kept_mass[src][trains].sum())
        self.positions += int(trains.sum())
        for dest, v in ((self.ids, ids), (self.lengths, n), (self.keys, key), (self.mask, mask),
                        (self.top_ids, tid), (self.top_lp, tlp), (self.lses, lse), (self.labels, label)):
            dest.append(v)
        if self.documents:  # position ids as the capture writes them: the padding a segment of its own
            pos = np.empty(L, np.int32)
            pos[:n] = b.positions[a:e] if b.positions is not None else np.arange(n)
            pos[n:] = np.arange(L - n)
            self.position_ids.append(pos)

    def rows(self) -> Rows:
        return Rows(np.stack(self.ids), np.asarray(self.lengths, np.int32), list(self.keys), np.stack(self.mask),
                    np.stack(self.position_ids) if self.documents else None)

    def targets(self) -> TeacherTargets:
        return TeacherTargets(topk_ids=np.stack(self.top_ids), topk_logprobs=np.stack(self.top_lp),
                              logsumexp=np.stack(self.lses),
                              target_logprob=np.stack(self.labels) if self.label else None)


def top_k(t: Targets, b: Block, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, K) ids and log-probs of each trained position's K most likely entries (zeros elsewhere), and (T,) the
    probability they hold (from the source's values)."""
    T = len(b.tokens)
    order, own, rank = ranked(t, b)
    keep = rank < K
    ids, lp = np.zeros((T, K), np.int64), np.zeros((T, K), np.float16)
    ids[own[keep], rank[keep]] = b.e_ids[order[keep]]
    lp[own[keep], rank[keep]] = b.e_lp[order[keep]]
    return ids, lp, np.bincount(own[keep], weights=np.exp(b.e_lp[order[keep]]), minlength=T)


@dataclass(frozen=True)
class Pass2:
    """What writing every split of an import shares: its settings, the source, the writer, what pass 1 decided
    (`imported`), the rows' length and padding id, the duplicate check across splits, a scratch folder, and
    whether rows carry document positions."""

    settings: ImportSettings
    src: Storage
    writer: CacheWriter
    imported: dict
    seq_len: int
    pad: int
    keys: KeyStore
    scratch: Path
    documents: bool


def write_split(job: Pass2, split: str, files: list[str]) -> None:
    """One split of the source, its rows kept once across the cache, written shard by shard, then its rows file."""
    s, src, writer, imported, keys = job.settings, job.src, job.writer, job.imported, job.keys
    L, pad, scratch, documents = job.seq_len, job.pad, job.scratch, job.documents
    K = imported["top_k"]
    rows_file = RowFileWriter(scratch / f"{split}-{ROWS_FILE}", s.rows_per_shard)

    def new_shard():
        return _Shard(L, K, imported["logsumexp"], imported["target_logprob"], pad, documents)

    shard, index, started = new_shard(), 0, time.perf_counter()

    def flush():
        nonlocal shard, index, started
        rows = shard.rows()
        rows_file.add(rows)
        stats = {"tokens": rows.n_tokens, "seconds": time.perf_counter() - started, "topk_mass_sum": shard.mass,
                 "target_positions": shard.positions}
        writer.write_shard(split, index, shard.targets(), stats)
        shard, index, started = new_shard(), index + 1, time.perf_counter()

    for b in blocks(src, files, imported["layout"]):
        t = targets(b)
        ids, lp, kept = top_k(t, b, K)
        for r in range(b.rows):
            key = content_key(b.tokens[b.starts[r]:b.starts[r + 1]])
            if keys.add(key, "main"):
                shard.add(b, t, ids, lp, kept, r, key)
                if len(shard) == s.rows_per_shard:
                    flush()
    if len(shard):
        flush()
    writer.st.upload(rows_file.close().path, f"{split}/{ROWS_FILE}")


def _apart(src: Storage, splits: dict[str, list[str]], folder: bool, out: Storage) -> None:
    """Refuse an output that holds a source file, or lies inside a source folder (--overwrite would delete the
    source; a later import of the folder would read the cache as source)."""
    if src.fs.protocol != out.fs.protocol:
        return
    root = out.path().rstrip("/") + "/"
    inside = any(src.path(f).startswith(root) for files in splits.values() for f in files)
    if inside or (folder and root.startswith(src.path().rstrip("/") + "/")):
        raise StorageError(f"{out.location} and the source {src.location} overlap: write the cache elsewhere")


def run_import(s: ImportSettings, log=print) -> Cache:
    """Check the source, then write the cache at `s.out` (see the module doc); the finished cache."""
    out = Storage(s.out)
    if out.is_local:
        out.local_path().mkdir(parents=True, exist_ok=True)
    if out.exists(MANIFEST) and not s.overwrite:
        raise StorageError(f"{s.out} holds a cache; import writes a new one (choose another OUT, or --overwrite)")
    if out.files() and not s.overwrite:
        raise StorageError(f"{s.out} is not empty; import writes a new cache (choose an empty OUT, or --overwrite)")
    st, splits = source_splits(s.source, s.split)
    _apart(st, splits, not s.source.rstrip("/").endswith(EXTENSIONS), out)
    teacher, tok, vocab = teacher_facts(s)
    with tempfile.TemporaryDirectory(prefix="distill-import-") as tmp:
        sv = survey(s, st, splits, vocab, Path(tmp))
        imported = decide(s, sv, vocab)
        L = s.seq_len or sv.longest
        specs = field_specs(seq_len=L, top_k=imported["top_k"], n_temperatures=0, hidden=None, hidden_dtype="float16",
                            attention=None, vocab_size=vocab, topk_codec="pcodec")
        specs = [f for f in specs if f.name != "target_logprob" or imported["target_logprob"]]
        plan = build_plan(s, sv, imported, teacher, tok, L, specs)
        log(f"{s.source}: {sv.rows_read} rows ({sv.duplicates} duplicates dropped), layout {sv.layout}, "
            f"K = {imported['top_k']} (trained positions hold {sv.k_min}..{sv.k_max} entries), log-probs normalised "
            f"over the {'ids given' if imported['normalised'] == 'top-k' else 'whole vocabulary'}, mean top-K mass "
            f"{imported['mean_mass']:.4f} at the {sv.positions:,} trained positions")
        for split, share in imported["alignment"].items():
            log(f"  {split}: the token a position predicts is among its entries at {share['0']:.1%} of trained "
                f"positions (the token before it: {share['-1']:.1%}, after it: {share['+1']:.1%})")
        if s.overwrite:
            wipe(out)
        write_json(out, PLAN_FILE, plan)
        manifest = Manifest.from_dict(plan)
        writer = CacheWriter(out, manifest, specs, sv.rows)
        store_tokenizer(out, tok)
        writer.create_arrays()
        job = Pass2(settings=s, src=st, writer=writer, imported=imported, seq_len=L, pad=tokenizer_pad_id(tok),
                    keys=KeyStore(Path(tmp) / "write.sqlite"), scratch=Path(tmp), documents=sv.documents)
        for split in in_order(splits):
            write_split(job, split, splits[split])
        job.keys.close()
        writer.finalize()
    return Cache(s.out)
