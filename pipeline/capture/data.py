"""Step 1, prepare: documents -> fixed-length token rows with content keys and a split.

Documents come through `datasets` (a hub id, or local txt/jsonl/parquet/arrow files): a text
column, or chat data (a `messages` column of [{role, content}] conversations, or prompt/response
columns) rendered with the teacher's chat template. Rows are `seq_len` tokens: documents joined
and cut (packing), or one document per row, truncated and right-padded.

Rows are what the teacher expects (`RowConvention`): when its tokenizer adds a BOS token (as
`tokenizer("x")` does), every document starts with it and so does every packed row, even one that
starts mid-document (the BOS is inserted, the row then holds seq_len - 1 stream tokens). Text
documents end with EOS; chat documents end where their template ends them.

Optional per-position columns travel with the rows: `loss_mask` (position t trains iff the token
it predicts, t + 1, is an assistant/response token; the last position of a row looks at the
stream's next token) and `position_ids` (document_mask: positions restart at 0 at each document,
and the padding of a row is a segment of its own, so attention is block-diagonal causal).

Each row's key is blake2b-128 of its real tokens (int32 little-endian), so students can join,
subset and reorder rows; identical rows are dropped (keys are unique). The validation split is
chosen by key, so it does not depend on row order and a subset of a corpus keeps its rows' assignment.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import LOCAL_LOADERS, DataConfig
_DOC_BATCH = 256
IGNORE = -100  # token-classification: a position without a gold label (special tokens, a word's later pieces)


class DataError(ValueError):
    """A dataset that cannot be prepared as configured."""


@dataclass
class Rows:
    """Token rows of one split. Positions >= lengths[i] are padding."""

    input_ids: np.ndarray  # (N, L) int32
    lengths: np.ndarray  # (N,) int32
    keys: list[str]  # (N,) 32 hex chars
    loss_mask: np.ndarray | None = None  # (N, L) uint8: 1 where the prediction of token t+1 trains
    position_ids: np.ndarray | None = None  # (N, L) int32: restart at 0 per document (document_mask)
    labels: np.ndarray | None = None  # classification: (N,) class ids, or (N, L) per token with IGNORE elsewhere

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def take(self, idx: np.ndarray) -> "Rows":
        return Rows(self.input_ids[idx], self.lengths[idx], [self.keys[i] for i in idx],
                    None if self.loss_mask is None else self.loss_mask[idx],
                    None if self.position_ids is None else self.position_ids[idx],
                    None if self.labels is None else self.labels[idx])


@dataclass
class Prepared:
    splits: dict[str, Rows]
    info: dict = field(default_factory=dict)  # dataset identity and preparation statistics
    convention: dict = field(default_factory=dict)  # RowConvention.to_dict(): what position 0 is, the template


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
        template, source = (None, None) if cfg.format == "text" else _chat_template(cfg, tokenizer)
        return cls(cfg.bos, adds, int(tokenizer.bos_token_id) if want else None, template, source)

    def to_dict(self) -> dict:
        d = {"bos": {"setting": self.bos_setting, "tokenizer_adds_bos": self.tokenizer_adds_bos,
                     "applied": self.bos_token_id is not None, "token_id": self.bos_token_id}}
        if self.chat_template is not None:
            d["chat_template"] = {"source": self.chat_template_source, "text": self.chat_template,
                                  "sha256": hashlib.sha256(self.chat_template.encode()).hexdigest()}
        return d


def _chat_template(cfg: DataConfig, tokenizer) -> tuple[str, str]:
    if cfg.chat_template is not None:
        t = cfg.chat_template
        if "{" not in t:  # not a template: a file holding one
            if not Path(t).is_file():
                raise DataError(f"data.chat_template {t!r} is neither a Jinja template nor an existing file")
            t = Path(t).read_text()
        return t, "config"
    t = tokenizer.chat_template
    if isinstance(t, dict):
        t = t.get("default")
    if not t:
        raise DataError(f"data.format = {cfg.format!r} renders conversations with the chat template, but the "
                        "teacher's tokenizer has none: set data.chat_template")
    return t, "tokenizer"


def content_key(ids: np.ndarray) -> str:
    """blake2b-128 hex digest of the real token ids as little-endian int32."""
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype="<i4").tobytes(), digest_size=16).hexdigest()


def is_validation(key: str, fraction: float) -> bool:
    return int(key[:8], 16) < fraction * 16**8


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
    for what, col in _columns(cfg, task):
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
        "columns": {what: col for what, col in _columns(cfg, task)},
        "data_files": [_portable(f) for f in files],
        "datasets_fingerprint": getattr(ds, "_fingerprint", None),
        "documents_available": len(ds),
    }
    return ds, info


def _columns(cfg: DataConfig, task: str = "causal-lm") -> list[tuple[str, str]]:
    if task != "causal-lm":
        return [("words" if task == "token-classification" else "text", cfg.text_column),
                ("label", cfg.label_column)]
    if cfg.format == "messages":
        return [("messages", cfg.messages_column)]
    if cfg.format == "prompt_response":
        return [("prompt", cfg.prompt_column), ("response", cfg.response_column)]
    return [("text", cfg.text_column)]


def _portable(path: str) -> str:
    stdlib = sysconfig.get_paths()["stdlib"]
    return "{stdlib}" + path[len(stdlib) :] if path.startswith(stdlib) else path


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


# ---------------------------------------------------------------------------------------------
# documents -> token lists (with a per-token "trained" flag for chat data)


def _conversations(batch: dict, cfg: DataConfig, first_index: int) -> list[list[dict]]:
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


def render_conversation(tokenizer, template: str, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the template renders it, and the character spans of its assistant turns.

    An assistant turn spans from the end of the prompt the template renders before it (with the
    generation prompt) to the end of the rendering that includes it, so it covers the template's
    end-of-turn tokens too. A template that renders earlier turns differently once later ones
    exist falls back to locating the message's content.
    """
    def render(msgs, gen=False) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                                 add_generation_prompt=gen)
        except Exception as e:  # jinja's TemplateError, raise_exception(...) in the template, ValueError
            raise DataError(f"the chat template cannot render this conversation ({type(e).__name__}: {e}); "
                            f"roles: {[m['role'] for m in messages]}") from e

    full = render(messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], gen=True) if i else None  # nothing to render before a first turn
        through = render(messages[: i + 1])
        if before is not None and through.startswith(before) and full.startswith(through) and len(before) >= cursor:
            span = (len(before), len(through))
        else:
            at = full.find(m["content"], cursor)
            if at < 0:
                raise DataError(f"cannot find assistant message {i} in the rendered conversation (the chat "
                                "template changes it): its loss mask cannot be built")
            span = (at, at + len(m["content"]))
        spans.append(span)
        cursor = span[1]
    return full, spans


def _trained_flags(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap an assistant span."""
    flags = [0] * len(offsets)
    j = 0
    for t, (a, b) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        if j < len(spans) and a < spans[j][1] and (b > spans[j][0] or (a == b and a >= spans[j][0])):
            flags[t] = 1  # overlaps the span; a token with trimmed (empty) offsets counts where it starts
    return flags


def _token_docs(ds, tokenizer, cfg: DataConfig, conv: RowConvention):
    """Yield (token ids, trained flags or None) per non-empty document, in dataset order, up to the caps.

    Text documents: tokens (+ BOS first when the convention says so) + EOS (always appended, as
    before BOS conventions existed, so a tokenizer without BOS keeps its rows). Chat documents: the
    rendered conversation (+ BOS first when the template did not put it there); flags mark
    assistant tokens when data.loss_mask = 'assistant'.
    """
    if cfg.shuffle_seed is not None:
        ds = ds.shuffle(seed=cfg.shuffle_seed)
    n_docs = len(ds) if cfg.max_documents is None else min(len(ds), cfg.max_documents)
    bos, eos = conv.bos_token_id, tokenizer.eos_token_id
    want_flags = cfg.loss_mask == "assistant"
    if want_flags and not getattr(tokenizer, "is_fast", False):
        raise DataError("data.loss_mask = 'assistant' needs a fast tokenizer (character offsets per token)")
    for start in range(0, n_docs, _DOC_BATCH):
        batch = ds[start : min(start + _DOC_BATCH, n_docs)]
        if cfg.format == "text":
            texts = [t for t in batch[cfg.text_column] if isinstance(t, str) and t.strip()]
            if not texts:
                continue
            for ids in tokenizer(texts, add_special_tokens=cfg.add_special_tokens)["input_ids"]:
                if bos is not None and (not ids or ids[0] != bos):
                    ids = [bos] + ids
                yield (ids + [eos] if eos is not None else ids), None
            continue
        rendered = [render_conversation(tokenizer, conv.chat_template, m)
                    for m in _conversations(batch, cfg, start) if m]
        if not rendered:
            continue
        enc = tokenizer([text for text, _ in rendered], add_special_tokens=False,
                        return_offsets_mapping=want_flags)
        for i, ids in enumerate(enc["input_ids"]):
            flags = _trained_flags(enc["offset_mapping"][i], rendered[i][1]) if want_flags else None
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
                flags = None if flags is None else [0] + flags
            yield ids, flags


# ---------------------------------------------------------------------------------------------
# token lists -> rows


@dataclass
class _RowBuilder:
    """Collects rows: token ids, lengths and, as configured, prediction masks and position ids."""

    seq_len: int
    pad: int
    with_mask: bool
    with_positions: bool
    ids: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    positions: list = field(default_factory=list)

    def add(self, toks: list[int], flags: list[int], starts: list[bool], next_flag: int) -> None:
        """One row of n <= seq_len tokens; flags[t] = token t trains, starts[t] = a document starts at t."""
        L, n = self.seq_len, len(toks)
        row = np.full(L, self.pad, dtype=np.int32)
        row[:n] = toks
        self.ids.append(row)
        self.lengths.append(n)
        if self.with_mask:  # position t trains iff the token it predicts (t + 1) does
            m = np.zeros(L, dtype=np.uint8)
            m[: n - 1] = flags[1:n]
            m[n - 1] = next_flag
            self.masks.append(m)
        if self.with_positions:
            pos = np.empty(L, dtype=np.int32)
            p = 0
            for t in range(n):
                p = 0 if (t == 0 or starts[t]) else p + 1
                pos[t] = p
            pos[n:] = np.arange(L - n)  # the padding is a segment of its own
            self.positions.append(pos)

    def arrays(self) -> dict:
        return {"input_ids": np.stack(self.ids), "lengths": np.asarray(self.lengths, dtype=np.int32),
                "loss_mask": np.stack(self.masks) if self.with_mask else None,
                "position_ids": np.stack(self.positions) if self.with_positions else None}


def tokenize_rows(ds, tokenizer, cfg: DataConfig, conv: RowConvention | None = None) -> tuple[dict, dict]:
    """All rows, in order: ({input_ids (N, L) int32, lengths (N,), loss_mask, position_ids}, stats)."""
    conv = conv or RowConvention.resolve(cfg, tokenizer)
    L = cfg.seq_len
    eos = tokenizer.eos_token_id
    if cfg.packing and cfg.format == "text" and eos is None:
        raise DataError("packing joins documents with EOS, but the tokenizer has no eos_token_id")
    bos = conv.bos_token_id
    if bos is not None and L < 2:
        raise DataError("rows begin with BOS: data.seq_len must be at least 2")
    out = _RowBuilder(L, _pad_id(tokenizer), cfg.loss_mask == "assistant", cfg.document_mask)
    budget = cfg.max_tokens if cfg.max_tokens is not None else float("inf")
    stats = {"documents": 0, "documents_truncated": 0, "tokens_read": 0, "rows_bos_inserted": 0}
    toks: list[int] = []  # the packing stream: tokens, their trained flags, document starts
    flags: list[int] = []
    starts: list[bool] = []

    def cut(final: bool) -> None:
        """Emit full rows from the stream, keeping one token of look-ahead (the last position's mask);
        once the stream has ended, also the rest as one last, padded row."""
        while toks:
            insert = bos is not None and not starts[0]  # a row that starts mid-document gets BOS first
            take = L - insert
            if len(toks) <= take and not final:
                return
            nxt = flags[take] if len(toks) > take else 0
            out.add([bos] * insert + toks[:take], [0] * insert + flags[:take], [True] * insert + starts[:take], nxt)
            stats["rows_bos_inserted"] += int(insert)
            del toks[:take], flags[:take], starts[:take]

    for ids, doc_flags in _token_docs(ds, tokenizer, cfg, conv):
        if stats["tokens_read"] >= budget:
            break
        if not ids:
            continue
        stats["documents"] += 1
        doc_flags = doc_flags if doc_flags is not None else [1] * len(ids)
        if cfg.packing:
            take = int(min(len(ids), budget - stats["tokens_read"]))
            toks.extend(ids[:take])
            flags.extend(doc_flags[:take])
            starts.extend([True] + [False] * (take - 1))
            stats["tokens_read"] += take
            cut(final=False)
        else:
            nxt = doc_flags[L] if len(ids) > L else 0
            if len(ids) > L:
                stats["documents_truncated"] += 1
                ids, doc_flags = ids[:L], doc_flags[:L]
            take = int(min(len(ids), budget - stats["tokens_read"]))
            if take < len(ids):
                nxt = doc_flags[take]
            stats["tokens_read"] += take
            out.add(ids[:take], doc_flags[:take], [True] + [False] * (take - 1), nxt)
    if cfg.packing:
        cut(final=True)
    if not out.ids:
        raise DataError("the dataset produced no tokens (every document empty?)")
    arrays = out.arrays()
    if arrays["loss_mask"] is not None:
        stats["trained_positions"] = int(arrays["loss_mask"].sum())
        if stats["trained_positions"] == 0:
            raise DataError("data.loss_mask = 'assistant' left no position to train on (no assistant tokens?)")
    return arrays, stats


# ---------------------------------------------------------------------------------------------
# classification rows


@dataclass(frozen=True)
class LabelSet:
    """A classification teacher's classes: names by id (config.id2label)."""

    names: list[str]

    @property
    def ids(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    @property
    def generic(self) -> bool:
        """Names transformers makes up when none were given (LABEL_0, LABEL_1, ...)."""
        return all(n == f"LABEL_{i}" for i, n in enumerate(self.names))

    @classmethod
    def from_config(cls, config) -> "LabelSet":
        id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
        n = int(getattr(config, "num_labels", len(id2label)) or len(id2label))
        return cls([id2label.get(i, f"LABEL_{i}") for i in range(n)])


def _label_feature_names(ds, column: str) -> list[str] | None:
    """Class names a datasets ClassLabel feature gives the column's ints (Sequence(ClassLabel) too)."""
    feat = ds.features.get(column)
    feat = getattr(feat, "feature", feat)  # Sequence(ClassLabel) / List(ClassLabel)
    names = getattr(feat, "names", None)
    return list(names) if names else None


class _LabelMapper:
    """Gold labels (names, or ids in the teacher's numbering, or a ClassLabel's ids mapped by name) -> teacher ids;
    labels the teacher does not know are collected and refused together."""

    def __init__(self, labels: LabelSet, feature_names: list[str] | None):
        self.labels, self.ids = labels, labels.ids
        self.feature_names = None if (feature_names is None or labels.generic) else feature_names
        self.unknown: dict[str, int] = {}

    def __call__(self, value) -> int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value == IGNORE:
            return IGNORE  # already "no label" (a word or row left out on purpose)
        if isinstance(value, (bool, np.bool_)) or value is None:
            key = repr(value)
        elif isinstance(value, (int, np.integer)):
            if self.feature_names is not None and 0 <= value < len(self.feature_names):
                return self(self.feature_names[int(value)])
            if 0 <= value < len(self.labels.names):
                return int(value)
            key = str(int(value))
        elif isinstance(value, str):
            if value in self.ids:
                return self.ids[value]
            key = repr(value)
        else:
            key = f"{type(value).__name__} {value!r}"
        self.unknown[key] = self.unknown.get(key, 0) + 1
        return IGNORE

    def check(self, where: str) -> None:
        if self.unknown:
            shown = ", ".join(f"{k} (x{n})" for k, n in list(self.unknown.items())[:8])
            raise DataError(f"{where}: {sum(self.unknown.values())} labels are not in the teacher's label set "
                            f"{self.labels.names} (ids 0..{len(self.labels.names) - 1}): {shown}")


def classification_rows(ds, tokenizer, cfg: DataConfig, task: str, labels: LabelSet, pad_id: int,
                        where: str) -> tuple[dict, dict]:
    """One example per row, as the classifier reads it: tokenizer(text) with its special tokens, truncated to
    seq_len and right-padded with `pad_id`. Sequence classification: one label per row; token classification:
    `text_column` holds words, the label of each word goes to its first token, IGNORE elsewhere."""
    L = cfg.seq_len
    if cfg.shuffle_seed is not None:
        ds = ds.shuffle(seed=cfg.shuffle_seed)
    n_docs = len(ds) if cfg.max_documents is None else min(len(ds), cfg.max_documents)
    mapper = _LabelMapper(labels, _label_feature_names(ds, cfg.label_column))
    words = task == "token-classification"
    if words and not getattr(tokenizer, "is_fast", False):
        raise DataError("token-classification needs a fast tokenizer (which word each token comes from)")
    ids_out, lens, labs = [], [], []
    stats = {"documents": 0, "documents_truncated": 0, "tokens_read": 0, "documents_empty": 0}
    budget = cfg.max_tokens if cfg.max_tokens is not None else float("inf")
    for start in range(0, n_docs, _DOC_BATCH):
        if stats["tokens_read"] >= budget:
            break
        batch = ds[start : min(start + _DOC_BATCH, n_docs)]
        texts, golds = [], []
        for i, (text, gold) in enumerate(zip(batch[cfg.text_column], batch[cfg.label_column])):
            if words:
                ok = isinstance(text, list) and all(isinstance(w, str) for w in text)
                if not ok or not isinstance(gold, list) or len(gold) != len(text):
                    raise DataError(f"{where} row {start + i}: token-classification reads a list of words in "
                                    f"{cfg.text_column!r} and one label per word in {cfg.label_column!r} (got "
                                    f"{type(text).__name__} of {len(text) if isinstance(text, list) else '?'} and "
                                    f"{type(gold).__name__} of {len(gold) if isinstance(gold, list) else '?'})")
                empty = not text
            else:
                if text is not None and not isinstance(text, str):
                    raise DataError(f"{where} row {start + i}: column {cfg.text_column!r} must hold text, got "
                                    f"{type(text).__name__}")
                empty = not text or not text.strip()
            if empty:
                stats["documents_empty"] += 1
                continue
            texts.append(text)
            golds.append(gold)
        if not texts:
            continue
        try:
            enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=L, is_split_into_words=words)
        except Exception as e:  # a byte-level BPE without add_prefix_space refuses pre-split words
            raise DataError(f"the teacher's tokenizer cannot encode {'words' if words else 'the texts'}: "
                            f"{type(e).__name__}: {e}") from e
        for i, row in enumerate(enc["input_ids"]):
            if stats["tokens_read"] >= budget:
                break
            stats["documents"] += 1
            stats["tokens_read"] += len(row)
            if words:
                lab = np.full(L, IGNORE, dtype=np.int32)
                seen = set()
                for t, w in enumerate(enc.word_ids(i)):
                    if w is not None and w not in seen:
                        seen.add(w)
                        lab[t] = mapper(golds[i][w])
                stats["documents_truncated"] += int(len(seen) < len(golds[i]))
                for w in range(len(seen), len(golds[i])):
                    mapper(golds[i][w])  # a truncated word's label is still checked
            else:
                lab = mapper(golds[i])
                full = tokenizer(texts[i], add_special_tokens=True)["input_ids"] if len(row) == L else row
                stats["documents_truncated"] += int(len(full) > L)
            padded = np.full(L, pad_id, dtype=np.int32)
            padded[: len(row)] = row
            ids_out.append(padded)
            lens.append(len(row))
            labs.append(lab)
    mapper.check(where)
    if not ids_out:
        raise DataError(f"{where}: the dataset produced no example (every text empty?)")
    arrays = {"input_ids": np.stack(ids_out), "lengths": np.asarray(lens, dtype=np.int32),
              "labels": np.stack(labs).astype(np.int32) if words else np.asarray(labs, dtype=np.int32),
              "loss_mask": None, "position_ids": None}
    return arrays, stats


def _dedup(keys: list[str]) -> list[int]:
    seen: set[str] = set()
    keep = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return keep


def prepare(cfg: DataConfig, tokenizer, min_validation: bool = True, task: str = "causal-lm",
            labels: LabelSet | None = None, pad_id: int | None = None) -> Prepared:
    """Load, tokenize, key, deduplicate and split. Deterministic for the same inputs. `min_validation`:
    a corpus whose keys put no row in validation still gives it one (not for an append: there the
    split must follow the keys alone, as in the cache it grows). Classification tasks (`labels`: the
    teacher's classes, `pad_id`: what the rows are padded with) keep one example per row with its labels.
    Splits named in data.splits come from the dataset's own splits; a train row equal to one of theirs
    is dropped from train."""
    classify = task != "causal-lm"
    if classify:
        conv = {"rows": {"one_example_per_row": True, "special_tokens": "tokenizer", "truncation": True,
                         "pad_token_id": pad_id}}
    else:
        conv = RowConvention.resolve(cfg, tokenizer)  # before the dataset: a bad setting fails at once

    def rows_of(split: str | None, where: str):
        ds, info = load_documents(cfg, split, task)
        if classify:
            arrays, stats = classification_rows(ds, tokenizer, cfg, task, labels, pad_id, where)
        else:
            arrays, stats = tokenize_rows(ds, tokenizer, cfg, conv)
        keys = [content_key(r[:n]) for r, n in zip(arrays["input_ids"], arrays["lengths"])]
        every = Rows(arrays["input_ids"], arrays["lengths"], keys, arrays["loss_mask"], arrays["position_ids"],
                     arrays.get("labels"))
        keep = _dedup(keys)
        stats["rows"] = len(keys)
        stats["duplicate_rows_dropped"] = len(keys) - len(keep)
        return every, keep, info, stats

    every, keep, info, stats = rows_of(None, f"dataset split {cfg.split!r}")
    keys = every.keys
    by_fraction = "validation" not in cfg.splits
    val = [i for i in keep if is_validation(keys[i], cfg.validation_fraction)] if by_fraction else []
    if by_fraction and min_validation and cfg.validation_fraction > 0 and not val and len(keep) > 1:
        val = [min(keep, key=lambda i: keys[i])]  # a tiny corpus still gets one validation row
    val_set = set(val)
    train = [i for i in keep if i not in val_set]
    splits = {"train": every.take(np.asarray(train, dtype=np.int64))}
    if val:
        splits["validation"] = every.take(np.asarray(val))
    info["statistics"] = stats
    if cfg.splits:
        info["splits"] = {}
        for name in ("validation", "test"):
            if name not in cfg.splits:
                continue
            rows, kept, sinfo, sstats = rows_of(cfg.splits[name], f"dataset split {cfg.splits[name]!r}")
            splits[name] = rows.take(np.asarray(kept, dtype=np.int64))
            info["splits"][name] = {"split": cfg.splits[name], "documents_available": sinfo["documents_available"],
                                    "datasets_fingerprint": sinfo["datasets_fingerprint"],
                                    "data_files": sinfo["data_files"], "statistics": sstats}
        held_out = {k for name in ("validation", "test") if name in cfg.splits for k in splits[name].keys}
        t = splits["train"]
        clean = np.asarray([i for i, k in enumerate(t.keys) if k not in held_out], dtype=np.int64)
        stats["train_rows_in_held_out_splits_dropped"] = len(t) - len(clean)
        splits["train"] = t.take(clean)
    if not len(splits["train"]):
        if stats.get("train_rows_in_held_out_splits_dropped"):
            raise DataError(f"every train row is also in a held-out split ({', '.join(cfg.splits.values())}): do "
                            "data_files name each split's own files?")
        raise DataError("no training rows left after the validation split; add data or lower validation_fraction")
    return Prepared(splits=splits, info=info, convention=conv if classify else conv.to_dict())
