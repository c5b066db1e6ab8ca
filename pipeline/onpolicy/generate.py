"""`distill generate`: a model samples completions for prompts, and the token ids it sampled are kept.

On-policy targets are the teacher's distribution at exactly the positions the student produced; text
re-tokenised can change the tokens, so the output is token ids. It is a folder:

    samples/
      generation.json      the plan (generator identity, tokenizer, sampling settings, prompts, round),
                           then, once finished, the parts with their sha256, and the statistics
      part-00000.parquet   input_ids (prompt + completion), completion_start, prompt_index, sample, ended;
      ...                  each part's schema metadata carries the plan too (`GENERATION_KEY`), so the
                           capture that scores it (data.format = "tokens") records the lineage

Each part is written to a temporary name and renamed once complete, so a killed run resumes at its
first missing part. Every batch is seeded from (sampling.seed, part, batch), so the tokens do not
depend on which parts were already done, nor (under torchrun, part p on rank p mod W) on the
number of ranks: the same settings on the same device and dtype give the same tokens.

Prompts are checked before any sampling: every one must leave room for max_new_tokens within
prompts.seq_len, and a chat prompt must end in a user turn.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import distributed, models
from ..errors import DataError, StorageError, TeacherError
from ..format.layout import file_digest, tokenizer_fingerprint
from .settings import GenerateConfig
from ..capture.documents import (GENERATION_KEY, RowConvention, conversations, data_columns, document_batches,
                                 given_tokens, load_documents)

FORMAT = "distill-samples"
VERSION = 1
PLAN = "generation.json"


@dataclass
class Prompts:
    """The prompts to sample for, as token ids, and what was left out."""

    ids: list[np.ndarray]
    index: list[int]  # each prompt's row in the prompt dataset
    info: dict
    skipped_long: int = 0
    skipped_empty: int = 0


@dataclass
class GenerationResult:
    dir: Path
    plan: dict
    rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    computed_parts: int = 0
    resumed_parts: int = 0
    parts: list = field(default_factory=list)


def part_name(p: int) -> str:
    return f"part-{p:05d}.parquet"


def eos_ids(tokenizer, model_config=None, generation_config=None) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and those of the model's generation config."""
    out = []
    for src in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if i is not None and int(i) not in out:
                out.append(int(i))
    return out


def check_causal_lm(gen, model_config) -> None:
    """A generator must be a causal LM: refused (before any prompt is read) when its checkpoint was saved for
    another task, or its family has no causal-LM head in transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    task = models.checkpoint_task(model_config)
    archs = getattr(model_config, "architectures", None)
    if task not in (None, "causal-lm"):
        raise TeacherError(f"generator {gen.model!r} is a {task} checkpoint ({', '.join(archs or [])}), not a causal "
                           "LM: only a model that predicts the next token can sample completions")
    if model_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise TeacherError(f"generator {gen.model!r} ({model_config.model_type}) has no causal-LM head in "
                           "transformers: it cannot sample completions")


def check_same_tokenizer(tokenizer, teacher_tokenizer, what: str, teacher: str) -> None:
    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(teacher_tokenizer):
        raise DataError(f"{what}'s tokenizer is not the teacher's ({teacher}): the teacher must score exactly the "
                        "token ids the student sampled, so both must share one tokenizer (cross-tokenizer on-policy "
                        "distillation is not supported; a student with its own tokenizer trains from offline "
                        "caches)")


def load_prompts(cfg: GenerateConfig, tokenizer) -> Prompts:
    """Every prompt as token ids, in dataset order, checked: a chat prompt must end in a user turn (it is rendered
    with the generation prompt), and each must leave room for max_new_tokens within prompts.seq_len."""
    pc, sc = cfg.prompts, cfg.sampling
    conv = RowConvention.resolve(pc, tokenizer)
    ds, info = load_documents(pc)
    room = pc.seq_len - sc.max_new_tokens
    if room < 1:
        raise DataError(f"sampling.max_new_tokens = {sc.max_new_tokens} leaves no room for a prompt within "
                        f"prompts.seq_len = {pc.seq_len}: raise seq_len or lower max_new_tokens")
    columns = [c for _, c in data_columns(pc)]
    out = Prompts([], [], info)
    too_long: list[tuple[int, int]] = []
    bos = conv.bos_token_id
    for start, batch in document_batches(ds, pc, columns):
        for i, ids in enumerate(_prompt_ids(batch, pc, conv, tokenizer, start)):
            if ids is None or not len(ids):
                out.skipped_empty += 1
                continue
            if bos is not None and ids[0] != bos and pc.format != "tokens":
                ids = np.concatenate([[bos], ids]).astype(np.int32)
            if sc.prompt_tokens is not None and pc.format == "text":
                ids = ids[: sc.prompt_tokens]
            if len(ids) > room:
                too_long.append((start + i, len(ids)))
                continue
            out.ids.append(ids)
            out.index.append(start + i)
    if too_long and sc.long_prompts == "refuse":
        first, n = too_long[0]
        raise DataError(f"{len(too_long)} of {len(too_long) + len(out.ids)} prompts leave no room for "
                        f"sampling.max_new_tokens = {sc.max_new_tokens} within prompts.seq_len = {pc.seq_len} "
                        f"(at most {room} prompt tokens; prompt {first} has {n}, the longest "
                        f"{max(n for _, n in too_long)}): raise seq_len, lower max_new_tokens, cut text prompts with "
                        "sampling.prompt_tokens, or skip them with sampling.long_prompts = \"skip\"")
    out.skipped_long = len(too_long)
    if not out.ids:
        raise DataError(f"no prompt to sample for ({out.skipped_empty} empty, {out.skipped_long} too long)")
    out.info = {**info, "convention": conv.to_dict(), "prompts": len(out.ids), "skipped_long": out.skipped_long,
                "skipped_empty": out.skipped_empty}
    return out


def _prompt_ids(batch: dict, pc, conv: RowConvention, tokenizer, start: int) -> list[np.ndarray | None]:
    if pc.format == "tokens":
        return [ids for ids, _ in given_tokens(batch, pc, start, len(tokenizer))]
    if pc.format == "text":
        texts = batch[pc.text_column]
        keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        enc = tokenizer([texts[i] for i in keep], add_special_tokens=False)["input_ids"] if keep else []
        out: list = [None] * len(texts)
        for i, ids in zip(keep, enc):
            out[i] = np.asarray(ids, np.int32)
        return out
    convs = conversations(batch, pc, start)
    texts = []
    for i, msgs in enumerate(convs):
        if pc.format == "prompt_response":
            msgs = msgs[:1]  # the prompt alone: the sampled completion replaces the response
        if not msgs:
            texts.append(None)
            continue
        if msgs[-1]["role"] != "user":
            raise DataError(f"prompt {start + i}: a chat prompt must end in a user turn (the model answers it), "
                            f"but its last message is the {msgs[-1]['role']!r}'s")
        try:
            texts.append(tokenizer.apply_chat_template(msgs, chat_template=conv.chat_template, tokenize=False,
                                                       add_generation_prompt=True))
        except Exception as e:  # jinja's errors, raise_exception() in a template
            raise DataError(f"prompt {start + i}: the chat template cannot render it ({type(e).__name__}: {e})") from e
    keep = [i for i, t in enumerate(texts) if t]
    enc = tokenizer([texts[i] for i in keep], add_special_tokens=False)["input_ids"] if keep else []
    out = [None] * len(texts)
    for i, ids in zip(keep, enc):
        out[i] = np.asarray(ids, np.int32)
    return out


def batch_seed(seed: int, part: int, batch: int) -> int:
    """The seed of one batch: from the run's seed and the batch's place, never from what ran before it."""
    d = hashlib.blake2b(f"{seed}/{part}/{batch}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") & ((1 << 63) - 1)


def generation_plan(cfg: GenerateConfig, tokenizer, model_config, prompts: Prompts, device: str,
                    eos: list[int]) -> dict:
    """Everything that determines the samples' tokens, and the lineage the scoring cache records."""
    g = cfg.generator
    return {
        "format": FORMAT, "format_version": VERSION,
        "generator": {"model": g.model, "gguf_file": g.gguf_file, "revision": g.revision,
                      "weights_sha256": models.weights_fingerprint(g), "dtype": g.dtype, "device_type": device,
                      "model_type": model_config.model_type},
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "class": type(tokenizer).__name__,
                      "eos_token_ids": eos},
        "sampling": cfg.sampling.model_dump(),
        "prompts": {**prompts.info, "seq_len": cfg.prompts.seq_len},
        "round": cfg.round,
    }


def run_generate(cfg: GenerateConfig, log: Callable[[str], None] = print, progress: bool = True,
                 after_part: Callable[[int], None] | None = None) -> GenerationResult:
    """Sample (or resume, or find finished) the completions of `cfg`; in this process or as one rank of a
    torchrun launch (rank r samples parts r, r + W, ...; rank 0 writes generation.json)."""
    import torch

    ranks = distributed.setup()
    if not ranks.main:
        log, progress = (lambda m: None), False
    g = cfg.generator
    tokenizer = models.load_tokenizer(g)
    model_config = models.load_model_config(g)
    check_causal_lm(g, model_config)
    if cfg.teacher is not None:
        check_same_tokenizer(tokenizer, models.load_tokenizer(cfg.teacher), f"generator {g.model!r}",
                             cfg.teacher.model)
    try:
        device = distributed.device_for(g.device)
    except ValueError as e:
        raise TeacherError(str(e)) from None
    prompts = load_prompts(cfg, tokenizer)
    gen_config = _generation_config(g, model_config)
    eos = eos_ids(tokenizer, model_config, gen_config)
    plan = generation_plan(cfg, tokenizer, model_config, prompts, device.type, eos)
    out = Path(cfg.output.dir)
    done = distributed.on_main(lambda: _prepare_dir(out, plan, cfg.output.overwrite, log))
    res = GenerationResult(out, plan)
    if done is not None:
        log(f"{out}: finished samples with these settings ({done['statistics']['rows']} rows); nothing to do")
        return _finished(res, done)
    units = [(p, s) for p in range(len(prompts.ids)) for s in range(cfg.sampling.samples_per_prompt)]
    R = cfg.sampling.rows_per_part
    n_parts = -(-len(units) // R)
    mine = [p for p in range(n_parts) if p % ranks.world == ranks.rank]
    todo = [p for p in mine if not (out / part_name(p)).is_file()]
    res.resumed_parts = len(mine) - len(todo)
    if res.resumed_parts:
        log(f"resuming: {res.resumed_parts} of {len(mine)} parts already written")
    if todo:
        model = models.load_model(g, device)
        sampler = _Sampler(model, tokenizer, cfg, gen_config, eos, device, plan)
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(min(R, len(units) - p * R) for p in todo), unit="row", desc="generate",
                   disable=not progress)
        t0, new_tokens = time.perf_counter(), 0
        for p in todo:
            table = sampler.part(p, units[p * R:(p + 1) * R], prompts)
            _write_part(out, p, table)
            res.computed_parts += 1
            new_tokens += int(np.sum(table.column("length").to_numpy() - table.column("completion_start").to_numpy()))
            bar.update(table.num_rows)
            bar.set_postfix(completion_tokens_per_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):,.0f}")
            if after_part is not None:
                after_part(p)
        bar.close()
        res.seconds = time.perf_counter() - t0
    distributed.all_gather(res.computed_parts)  # every rank's parts are written
    seconds = sum(distributed.all_gather(res.seconds))
    done = distributed.on_main(lambda: _finish(out, plan, n_parts, seconds, log))
    return _finished(res, done)


def _finished(res: GenerationResult, done: dict) -> GenerationResult:
    st = done["statistics"]
    res.rows, res.prompt_tokens, res.completion_tokens = st["rows"], st["prompt_tokens"], st["completion_tokens"]
    res.parts = done["parts"]
    res.plan = done
    return res


def _generation_config(g, model_config):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(g.model if not g.model.endswith(".gguf") else str(Path(g.model).parent))
    except Exception:  # noqa: BLE001  a checkpoint without generation_config.json
        return GenerationConfig.from_model_config(model_config)


class _Sampler:
    """Samples the completions of one part, a batch at a time, each batch seeded from its place."""

    def __init__(self, model, tokenizer, cfg: GenerateConfig, base_config, eos: list[int], device, plan: dict):
        from transformers import GenerationConfig

        sc = cfg.sampling
        self.model, self.cfg, self.device, self.eos = model, cfg, device, eos
        self.pad = next(i for i in (tokenizer.pad_token_id, eos[0] if eos else None, 0) if i is not None)
        greedy = sc.temperature == 0
        vocab = int(getattr(model.config.get_text_config(), "vocab_size", 0) or 0)
        # the head's padding rows (ids the tokenizer does not have) are never sampled: no text, no teacher target
        unknown = list(range(len(tokenizer), vocab)) or None
        # only what is set here decides the draws: the checkpoint's own sampling defaults (top_k = 50, a
        # repetition penalty, ...) would make the samples another distribution than the settings say
        self.gen = GenerationConfig(do_sample=not greedy, temperature=None if greedy else sc.temperature,
                                    top_p=None if greedy or sc.top_p == 1 else sc.top_p, top_k=None,
                                    max_new_tokens=sc.max_new_tokens, eos_token_id=eos or None,
                                    pad_token_id=self.pad, bos_token_id=base_config.bos_token_id,
                                    suppress_tokens=unknown)
        self.meta = {GENERATION_KEY: json.dumps(plan, sort_keys=True).encode()}

    def part(self, p: int, units: list[tuple[int, int]], prompts: Prompts):
        import pyarrow as pa
        import torch

        B = self.cfg.sampling.batch_size
        ids, starts, pidx, sample, ended = [], [], [], [], []
        for b in range(0, len(units), B):
            chunk = units[b:b + B]
            rows = [prompts.ids[u] for u, _ in chunk]
            width = max(len(r) for r in rows)
            x = torch.full((len(rows), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):  # left padding: every completion starts at column `width`
                x[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
                mask[i, width - len(r):] = 1
            torch.manual_seed(batch_seed(self.cfg.sampling.seed, p, b // B))
            with torch.inference_mode():
                y = self.model.generate(input_ids=x.to(self.device), attention_mask=mask.to(self.device),
                                        generation_config=self.gen).cpu().numpy()
            for i, (u, s) in enumerate(chunk):
                new = y[i, width:]
                hit = np.flatnonzero(np.isin(new, self.eos)) if self.eos else []
                done = len(hit) > 0
                new = new[: hit[0] + 1] if done else new
                ids.append(np.concatenate([rows[i], new]).astype(np.int32))
                starts.append(len(rows[i]))
                pidx.append(prompts.index[u])
                sample.append(s)
                ended.append(done)
        table = pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.int32())),
                          "completion_start": pa.array(starts, pa.int32()),
                          "length": pa.array([len(r) for r in ids], pa.int32()),
                          "prompt_index": pa.array(pidx, pa.int64()), "sample": pa.array(sample, pa.int32()),
                          "ended": pa.array(ended, pa.bool_())})
        return table.replace_schema_metadata(self.meta)


def _write_part(out: Path, p: int, table) -> None:
    import pyarrow.parquet as pq

    tmp = out / f".{part_name(p)}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out / part_name(p))  # a part is there whole or not at all
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {out / part_name(p)}: {e}") from e


def _prepare_dir(out: Path, plan: dict, overwrite: bool, log) -> dict | None:
    """Make (or resume in) the output folder; the finished record when these samples are done already."""
    path = out / PLAN
    if out.exists() and not out.is_dir():
        raise StorageError(f"samples output {out} is a file, not a folder")
    if path.is_file():
        old = json.loads(path.read_text())
        same = {k: old.get(k) for k in plan} == plan
        if same and old.get("status") == "finished":
            return old
        if not same:
            changed = sorted(k for k in plan if old.get(k) != plan[k])
            if not overwrite:
                raise DataError(f"{out} holds samples made with other settings ({', '.join(changed)} differ): "
                                "choose another output.dir, or set output.overwrite = true to replace them")
            log(f"{out}: replacing samples made with other settings ({', '.join(changed)})")
            shutil.rmtree(out)
    elif out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise StorageError(f"samples output {out} is a folder with other files in it: choose an empty or new "
                               "folder (or output.overwrite = true)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".part-*.tmp-*"):  # a killed run's half-written part
        stale.unlink()
    if not path.is_file():
        _write_json(path, {**plan, "status": "running"})
    return None


def _finish(out: Path, plan: dict, n_parts: int, seconds: float, log) -> dict:
    import pyarrow.parquet as pq

    parts, rows, prompt_tokens, completion_tokens, ended = [], 0, 0, 0, 0
    for p in range(n_parts):
        f = out / part_name(p)
        if not f.is_file():
            raise StorageError(f"{f} is missing after generation: was another run writing to {out}?")
        t = pq.read_table(f, columns=["length", "completion_start", "ended"])
        lengths, starts = t.column("length").to_numpy(), t.column("completion_start").to_numpy()
        rows += t.num_rows
        prompt_tokens += int(starts.sum())
        completion_tokens += int((lengths - starts).sum())
        ended += int(np.sum(t.column("ended").to_numpy(zero_copy_only=False)))
        parts.append({"path": part_name(p), "rows": t.num_rows, **file_digest(f)})
    stats = {"rows": rows, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "ended_with_eos": ended, "seconds": round(seconds, 3),
             "completion_tokens_per_second": round(completion_tokens / seconds, 1) if seconds else None}
    record = {**plan, "status": "finished", "parts": parts, "statistics": stats}
    _write_json(out / PLAN, record)
    log(f"{out}: {rows} completions, {completion_tokens:,} tokens sampled ({ended} ended with EOS)")
    return record


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_samples(folder: str | Path) -> dict:
    """The finished record of a samples folder; refused when it is missing or unfinished."""
    path = Path(folder) / PLAN
    if not path.is_file():
        raise DataError(f"{folder} holds no samples (no {PLAN}): run distill generate first")
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT or doc.get("status") != "finished":
        raise DataError(f"{folder}: the samples are not finished (rerun the same distill generate to resume)")
    return doc
