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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import distributed, models
from ..capture.documents import (RowConvention, conversations, data_columns, document_batches, load_documents,
                                 token_ids)
from ..errors import DataError, TeacherError
from ..format.columns import GENERATION_KEY
from ..format.layout import tokenizer_fingerprint
from .samples import FORMAT, VERSION, finish, part_name, prepare_dir, write_part
from ..config import DataConfig
from .settings import GenerateConfig, SamplingConfig


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


def eos_ids(tokenizer, generation_config=None) -> list[int]:
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


def load_prompts(pc: DataConfig, sc: SamplingConfig, tokenizer) -> Prompts:
    """Every prompt of `pc` as token ids, in dataset order, checked: a chat prompt must end in a user turn (it is
    rendered with the generation prompt), and each must leave room for sc.max_new_tokens within pc.seq_len."""
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
    digest = hashlib.sha256()
    for i, ids in zip(out.index, out.ids):  # which prompts, in which order, as which ids
        digest.update(np.asarray([i, len(ids)], "<i8").tobytes() + np.asarray(ids, "<i4").tobytes())
    out.info = {**info, "settings": pc.model_dump(mode="json"), "convention": conv.to_dict(), "prompts": len(out.ids),
                "prompt_ids_sha256": digest.hexdigest(), "skipped_long": out.skipped_long,
                "skipped_empty": out.skipped_empty}
    return out


def _prompt_ids(batch: dict, pc, conv: RowConvention, tokenizer, start: int) -> list[np.ndarray | None]:
    if pc.format == "tokens":  # one entry per row (None: empty), so that indices stay the dataset's
        return [token_ids(ids, f"prompt {start + i}", pc.ids_column, len(tokenizer)) if ids else None
                for i, ids in enumerate(batch[pc.ids_column])]
    if pc.format == "text":
        return _tokenized([t if isinstance(t, str) and t.strip() else None for t in batch[pc.text_column]],
                          tokenizer)
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
    return _tokenized(texts, tokenizer)


def _tokenized(texts: list[str | None], tokenizer) -> list[np.ndarray | None]:
    """The texts' token ids (no special tokens added), in one tokenizer call; None stays None."""
    keep = [i for i, t in enumerate(texts) if t]
    enc = tokenizer([texts[i] for i in keep], add_special_tokens=False)["input_ids"] if keep else []
    out: list = [None] * len(texts)
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
    prompts = load_prompts(cfg.prompts, cfg.sampling, tokenizer)
    eos = eos_ids(tokenizer, _generation_config(g, model_config))
    # one plan for every rank (rank 0's: the weights hashed once), so that every part carries the same record
    plan = distributed.on_main(lambda: generation_plan(cfg, tokenizer, model_config, prompts, device.type, eos))
    out = Path(cfg.output.dir)
    done = distributed.on_main(lambda: prepare_dir(out, plan, cfg.output.overwrite, log))
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
    # every rank joins (an error on one stops them all); after it, every part is written
    new_tokens = distributed.all_agree(lambda: _sample_parts(cfg, todo, units, prompts, tokenizer, eos, device, plan,
                                                             res, progress, after_part) if todo else 0)
    seconds = max(distributed.all_gather(res.seconds))
    new_tokens = sum(distributed.all_gather(new_tokens))
    done = distributed.on_main(lambda: finish(out, plan, n_parts, seconds, new_tokens, log))
    return _finished(res, done)


def _sample_parts(cfg: GenerateConfig, todo: list[int], units, prompts: Prompts, tokenizer, eos, device, plan: dict,
                  res: GenerationResult, progress: bool, after_part) -> int:
    """Sample and write this rank's missing parts; the completion tokens sampled."""
    from tqdm.auto import tqdm

    R = cfg.sampling.rows_per_part
    model = models.load_model(cfg.generator, device)
    sampler = _Sampler(model, tokenizer, cfg, eos, device, plan)
    bar = tqdm(total=sum(min(R, len(units) - p * R) for p in todo), unit="row", desc="generate", disable=not progress)
    t0, new_tokens = time.perf_counter(), 0
    for p in todo:
        table = sampler.part(p, units[p * R:(p + 1) * R], prompts)
        write_part(Path(cfg.output.dir), p, table)
        res.computed_parts += 1
        new_tokens += int(np.sum(table.column("length").to_numpy() - table.column("completion_start").to_numpy()))
        bar.update(table.num_rows)
        bar.set_postfix(completion_tokens_per_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):,.0f}")
        if after_part is not None:
            after_part(p)
    bar.close()
    res.seconds = time.perf_counter() - t0
    return new_tokens


def _finished(res: GenerationResult, done: dict) -> GenerationResult:
    st = done["statistics"]
    res.rows, res.prompt_tokens, res.completion_tokens = st["rows"], st["prompt_tokens"], st["completion_tokens"]
    res.parts = done["parts"]
    res.plan = done
    return res


def _generation_config(g, model_config):
    """The checkpoint's generation config, read for its end-of-sequence ids only (its sampling defaults are not
    used): generation_config.json at the model's revision, else what the model config says."""
    from transformers import GenerationConfig

    if g.gguf_file or g.model.endswith(".gguf"):
        return GenerationConfig.from_model_config(model_config)
    try:
        return GenerationConfig.from_pretrained(g.model, revision=g.revision)
    except OSError:  # a checkpoint without generation_config.json
        return GenerationConfig.from_model_config(model_config)


class _Sampler:
    """Samples the completions of one part, a batch at a time, each batch seeded from its place."""

    def __init__(self, model, tokenizer, cfg: GenerateConfig, eos: list[int], device, plan: dict):
        from transformers import GenerationConfig

        sc = cfg.sampling
        self.model, self.cfg, self.device, self.eos = model, cfg, device, eos
        self.pad = next(i for i in (tokenizer.pad_token_id, eos[0] if eos else None, 0) if i is not None)
        greedy = sc.temperature == 0
        vocab = int(getattr(model.config.get_text_config(), "vocab_size", 0) or 0)
        # the head's padding rows (ids the tokenizer does not have) are never sampled: no text, no teacher target
        unknown = list(range(len(tokenizer), vocab)) or None
        # Only these settings decide the draws. generate() fills every setting left unset from the checkpoint's
        # generation_config.json, then from its own defaults (top_k = 50): the model's is replaced by an empty one
        # and every filter is set to its neutral value, so the samples are softmax(z / temperature), nucleus-cut.
        model.generation_config = GenerationConfig()
        self.gen = GenerationConfig(
            do_sample=not greedy, temperature=1.0 if greedy else sc.temperature, top_p=1.0 if greedy else sc.top_p,
            top_k=None if greedy else 0, typical_p=1.0, min_p=None, repetition_penalty=1.0, no_repeat_ngram_size=0,
            min_length=0, num_beams=1, num_return_sequences=1, return_dict_in_generate=False,
            max_new_tokens=sc.max_new_tokens, eos_token_id=eos or None, pad_token_id=self.pad,
            bos_token_id=tokenizer.bos_token_id, suppress_tokens=unknown)
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
