"""Step 1a, documents: a dataset read through `datasets`, and what the teacher expects of its rows.

Documents come through `datasets` (a hub id, or local txt/jsonl/parquet/arrow files): a text
column, or chat data (a `messages` column of [{role, content}] conversations, or prompt/response
columns) rendered with the teacher's chat template (`chat.py`, which also finds the assistant
turns' characters for the loss mask). `token_documents` turns them into token lists.

Rows are what the teacher expects (`RowConvention`): when its tokenizer adds a BOS token (as
`tokenizer("x")` does), every document starts with it. Text documents end with EOS; chat documents
end where their template ends them.

Pre-tokenised rows (data.format = "tokens": a column of token-id lists, e.g. `distill generate`'s
samples) are taken exactly as given, one per row: on-policy targets must sit at exactly the positions
the student produced, which re-tokenising text would not keep. Parquet files written by `distill
generate` carry their generator's identity in their schema metadata; it is checked (one generator,
the teacher's tokenizer: `lineage.py`) and recorded in the cache's manifest.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import distributed
from ..config import LOCAL_LOADERS, DataConfig
from ..errors import DataError
from .chat import render_conversation, template_of, trained_flags
from .lineage import generation_of

DOC_BATCH = 256  # documents tokenised together


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first when asked to add special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def missing_bos_warning(tokenizer, first_tokens: np.ndarray, lengths: np.ndarray, where: str) -> str | None:
    """A warning when the tokenizer puts BOS first but rows of a cache do not start with it."""
    if not tokenizer_adds_bos(tokenizer):
        return None
    bos = tokenizer.bos_token_id
    missing = int(((first_tokens != bos) & (lengths > 0)).sum())
    if not missing:
        return None
    return (f"warning: {where}: the teacher's tokenizer puts BOS (id {bos}) first, but {missing} of {len(lengths)} "
            "rows do not start with it; the teacher labelled them without the context it expects (recapture "
            "with data.bos = \"auto\")")


@dataclass(frozen=True)
class RowConvention:
    """How rows are made for this teacher: BOS first or not, and the chat template used (if any)."""

    bos_setting: str | bool  # data.bos as configured
    tokenizer_adds_bos: bool
    bos_token_id: int | None  # the id put first in every row, or None
    chat_template: str | None
    chat_template_source: str | None  # "tokenizer" or "config"

    @classmethod
    def resolve(cls, cfg: DataConfig, tokenizer) -> "RowConvention":
        adds = tokenizer_adds_bos(tokenizer)
        want = adds if cfg.bos == "auto" else bool(cfg.bos)
        if want and tokenizer.bos_token_id is None:
            raise DataError("data.bos = true, but the teacher's tokenizer has no BOS token (bos_token_id is None)")
        template, source = (None, None) if cfg.format in ("text", "tokens") else template_of(cfg, tokenizer)
        return cls(cfg.bos, adds, int(tokenizer.bos_token_id) if want else None, template, source)

    def to_dict(self) -> dict:
        d = {"bos": {"setting": self.bos_setting, "tokenizer_adds_bos": self.tokenizer_adds_bos,
                     "applied": self.bos_token_id is not None, "token_id": self.bos_token_id}}
        if self.chat_template is not None:
            d["chat_template"] = {"source": self.chat_template_source, "text": self.chat_template,
                                  "sha256": hashlib.sha256(self.chat_template.encode()).hexdigest()}
        return d


def expand_data_files(cfg: DataConfig, split: str | None = None) -> list[str]:
    """The files of `split` (a dataset split; None: data.split) after globbing and excludes."""
    patterns = cfg.data_files
    if isinstance(patterns, dict):
        patterns = patterns.get(split or cfg.split, [])
    stdlib = sysconfig.get_paths()["stdlib"]
    files: list[str] = []
    for pattern in patterns:
        pattern = pattern.replace("{stdlib}", stdlib)
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"data file pattern {pattern!r} matches no file")
        for m in matches:
            if not Path(m).is_file():
                raise DataError(f"data file {m} does not exist")
        files.extend(m for m in matches if not any(fnmatch.fnmatch(Path(m).name, ex) for ex in cfg.exclude))
    if patterns and not files:
        raise DataError(f"every data file was excluded by {cfg.exclude}")
    return files


def load_documents(cfg: DataConfig, split: str | None = None, task: str = "causal-lm"):
    """A dataset split (None: data.split) as a `datasets.Dataset` with the configured columns."""
    import datasets

    split = split or cfg.split
    files = expand_data_files(cfg, split)
    kwargs: dict = {"split": split}
    if cfg.source in LOCAL_LOADERS:
        if not files:
            raise DataError(f"data.source={cfg.source!r} reads local files: set data.data_files")
        kwargs["data_files"] = {split: files}
        if cfg.source == "text":
            kwargs["sample_by"] = cfg.sample_by
    elif files:
        kwargs["data_files"] = files
    try:
        ds = datasets.load_dataset(cfg.source, cfg.config_name, **kwargs)
    except Exception as e:  # datasets raises many types (StopIteration for an empty json file)
        raise DataError(f"cannot load dataset {cfg.source!r} {files[:3] or ''}: "
                        f"{type(e).__name__}: {e or 'no data'}") from e
    for what, col in data_columns(cfg, task):
        if col not in ds.column_names:
            raise DataError(f"{what} column {col!r} not in dataset {cfg.source!r} split {split!r} "
                            f"(columns: {', '.join(ds.column_names)})"
                            + (": a classification teacher's rows need their gold labels (data.label_column)"
                               if what == "label" else ""))
    if len(ds) == 0:
        raise DataError(f"dataset {cfg.source!r} split {split!r} is empty")
    info = {
        "source": cfg.source,
        "config_name": cfg.config_name,
        "split": split,
        "text_column": cfg.text_column,
        "format": cfg.format,
        "columns": {what: col for what, col in data_columns(cfg, task)},
        "data_files": [_portable(f) for f in files],
        "datasets_fingerprint": getattr(ds, "_fingerprint", None),
        "documents_available": len(ds),
    }
    if cfg.format == "tokens":
        generation = generation_of(files)
        if generation is not None:
            info["generation"] = generation
    return ds, info


def data_columns(cfg: DataConfig, task: str = "causal-lm") -> list[tuple[str, str]]:
    if task != "causal-lm":
        return [("words" if task == "token-classification" else "text", cfg.text_column),
                ("label", cfg.label_column)]
    if cfg.format == "messages":
        return [("messages", cfg.messages_column)]
    if cfg.format == "prompt_response":
        return [("prompt", cfg.prompt_column), ("response", cfg.response_column)]
    if cfg.format == "tokens":
        return [("token ids", cfg.ids_column)] + ([("completion start", cfg.completion_column)]
                                                   if cfg.loss_mask == "assistant" else []) + \
            [("key", c) for c in cfg.key_columns]
    return [("text", cfg.text_column)]


def _portable(path: str) -> str:
    stdlib = sysconfig.get_paths()["stdlib"]
    return "{stdlib}" + path[len(stdlib) :] if path.startswith(stdlib) else path


def conversations(batch: dict, cfg: DataConfig, first_index: int) -> list[list[dict]]:
    """The batch's conversations as lists of {role, content}; bad items are refused by row index."""
    if cfg.format == "prompt_response":
        convs = []
        for i, (p, r) in enumerate(zip(batch[cfg.prompt_column], batch[cfg.response_column])):
            if not isinstance(p, str) or not isinstance(r, str):
                raise DataError(f"row {first_index + i}: prompt/response columns must hold strings, got "
                                f"{type(p).__name__}/{type(r).__name__}")
            convs.append([{"role": "user", "content": p}, {"role": "assistant", "content": r}])
        return convs
    convs = []
    for i, msgs in enumerate(batch[cfg.messages_column]):
        if msgs is None:
            msgs = []
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in msgs):
            raise DataError(f"row {first_index + i}: column {cfg.messages_column!r} must hold a list of "
                            "{role: str, content: str} messages")
        convs.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    return convs


def token_documents(ds, tokenizer, cfg: DataConfig, conv: RowConvention, timing: dict | None = None):
    """Yield (token ids, trained flags or None, key salt or None) per non-empty document (int32 / uint8 arrays;
    the salt: data.key_columns' values, bytes), in dataset order,
    up to the caps. Under torchrun each rank tokenises every W-th block of documents and receives the others'
    (`distributed.split_work`): every rank sees the same documents, for 1/W of the tokenising. `timing`, when
    given, receives this rank's own tokenising: `tokenise_seconds` and `documents_tokenised`.

    Text documents: tokens (+ BOS first when the convention says so) + EOS (always appended, as
    before BOS conventions existed, so a tokenizer without BOS keeps its rows). Chat documents: the
    rendered conversation (+ BOS first when the template did not put it there); flags mark
    assistant tokens when data.loss_mask = 'assistant'.
    """
    bos, eos = conv.bos_token_id, tokenizer.eos_token_id
    want_flags = cfg.loss_mask == "assistant"
    if want_flags and cfg.format != "tokens" and not getattr(tokenizer, "is_fast", False):
        raise DataError("data.loss_mask = 'assistant' needs a fast tokenizer (character offsets per token)")

    def tokenised(item: tuple[int, dict]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        start, batch = item
        if cfg.format == "tokens":
            return given_tokens(batch, cfg, start, len(tokenizer))
        if cfg.format == "text":
            texts = [t for t in batch[cfg.text_column] if isinstance(t, str) and t.strip()]
            if not texts:
                return []
            docs = []
            for ids in tokenizer(texts, add_special_tokens=cfg.add_special_tokens)["input_ids"]:
                if bos is not None and (not ids or ids[0] != bos):
                    ids = [bos] + ids
                docs.append((np.asarray(ids + [eos] if eos is not None else ids, dtype=np.int32), None, None))
            return docs
        rendered = [render_conversation(tokenizer, conv.chat_template, m)
                    for m in conversations(batch, cfg, start) if m]
        if not rendered:
            return []
        enc = tokenizer([text for text, _ in rendered], add_special_tokens=False,
                        return_offsets_mapping=want_flags)
        docs = []
        for i, ids in enumerate(enc["input_ids"]):
            flags = trained_flags(enc["offset_mapping"][i], rendered[i][1]) if want_flags else None
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
                flags = None if flags is None else [0] + flags
            docs.append((np.asarray(ids, dtype=np.int32), None if flags is None else np.asarray(flags, np.uint8),
                         None))
        return docs

    def timed(item: tuple[int, dict]):
        t0 = time.perf_counter()
        docs = tokenised(item)
        if timing is not None:
            timing["tokenise_seconds"] = timing.get("tokenise_seconds", 0.0) + time.perf_counter() - t0
            timing["documents_tokenised"] = timing.get("documents_tokenised", 0) + len(next(iter(item[1].values())))
        return docs

    columns = [c for _, c in data_columns(cfg)]
    for docs in distributed.split_work(document_batches(ds, cfg, columns), timed):  # each rank tokenises 1/W
        yield from docs


def given_tokens(batch: dict, cfg: DataConfig, first_index: int, vocab: int
                 ) -> list[tuple[np.ndarray, np.ndarray | None, bytes | None]]:
    """data.format = 'tokens': each row's ids as given, (loss_mask = 'assistant') flags on its completion, the
    tokens from its completion start on, and (key_columns) the bytes its key columns add to its content key. Ids
    outside the tokenizer's vocabulary, rows longer than seq_len and completion starts outside a row are refused
    by row index."""
    import json

    docs = []
    starts = batch.get(cfg.completion_column) if cfg.loss_mask == "assistant" else None
    for i, ids in enumerate(batch[cfg.ids_column]):
        where = f"row {first_index + i}"
        arr = token_ids(ids, where, cfg.ids_column, vocab)
        if not len(arr):
            continue
        if len(arr) > cfg.seq_len:
            raise DataError(f"{where}: {len(arr)} token ids, more than data.seq_len = {cfg.seq_len}; rows given as "
                            "tokens are never cut (a cut completion would train on what was not produced): raise "
                            "seq_len")
        flags = None
        if starts is not None:
            s = starts[i]
            if not isinstance(s, (int, np.integer)) or not 0 < s <= len(arr):
                raise DataError(f"{where}: {cfg.completion_column} = {s!r} is not a position inside the row's "
                                f"{len(arr)} tokens (1..{len(arr)}: at least one prompt token comes first)")
            flags = (np.arange(len(arr)) >= s).astype(np.uint8)
        salt = json.dumps([batch[c][i] for c in cfg.key_columns], default=str).encode() if cfg.key_columns else None
        docs.append((arr, flags, salt))
    return docs


def token_ids(ids, where: str, column: str, vocab: int) -> np.ndarray:
    """One row's list of token ids as int32, refused (naming `where`) unless a flat list of ids below `vocab`."""
    try:
        arr = np.asarray(ids if ids is not None else [], dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: column {column!r} must hold lists of token ids") from None
    if arr.ndim != 1:
        raise DataError(f"{where}: column {column!r} must hold flat lists of token ids")
    bad = arr[(arr < 0) | (arr >= vocab)]
    if len(bad):
        raise DataError(f"{where}: token id {int(bad[0])} is outside the tokenizer's vocabulary (0..{vocab - 1}): "
                        "were these rows made with another tokenizer?")
    return arr.astype(np.int32)


def document_batches(ds, cfg: DataConfig, columns: list[str]):
    """(index of the first document, {column: values}) for consecutive batches of DOC_BATCH documents, in dataset
    order (shuffled with data.shuffle_seed), up to data.max_documents.

    Unshuffled, they are read in sequence from the dataset's own Arrow files (IPC streams): plain reads, so
    the pages read are not kept in the process the way a memory map's are, and memory does not grow with the
    corpus. A shuffled dataset (an indices mapping) is read by slicing it."""
    import pyarrow as pa

    n_docs = len(ds) if cfg.max_documents is None else min(len(ds), cfg.max_documents)
    if n_docs <= 0:
        return
    plain = cfg.shuffle_seed is None and ds.cache_files and ds.data.num_rows == len(ds)  # no indices mapping
    if not plain:
        ds = ds.shuffle(seed=cfg.shuffle_seed) if cfg.shuffle_seed is not None else ds
        for start in range(0, n_docs, DOC_BATCH):
            yield start, ds[start : min(start + DOC_BATCH, n_docs)]
        return
    pending: dict[str, list] = {c: [] for c in columns}
    first, start = columns[0], 0
    for f in ds.cache_files:
        with pa.OSFile(f["filename"]) as source:
            for batch in pa.ipc.open_stream(source):
                for c in columns:
                    pending[c].extend(batch.column(c).to_pylist())
                while len(pending[first]) >= DOC_BATCH or (pending[first] and start + len(pending[first]) >= n_docs):
                    take = min(DOC_BATCH, n_docs - start, len(pending[first]))
                    yield start, {c: v[:take] for c, v in pending.items()}
                    pending = {c: v[take:] for c, v in pending.items()}
                    start += take
                    if start >= n_docs:
                        return
    if pending[first]:
        yield start, pending
