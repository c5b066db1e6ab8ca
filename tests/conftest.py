"""Shared fixtures: an offline tokenizer, tiny random-init teachers saved as safetensors, corpora.

Nothing here touches the network: the tokenizer is a byte-level BPE trained on a few
standard-library files, and every model is built from a config.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ["json/decoder.py", "json/encoder.py", "json/scanner.py", "json/tool.py", "textwrap.py",
                "colorsys.py", "bisect.py", "keyword.py", "fnmatch.py", "shlex.py"]


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer(out: Path, bos: bool = False, chat: bool = False) -> Path:
    """A byte-level BPE over a few standard-library files. `bos`: a `<s>` token that the tokenizer puts
    first (as Llama's and Gemma's do); `chat`: ChatML turn tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>"] + (["<s>"] if bos else []) + (["<|im_start|>", "<|im_end|>"] if chat
                                                                            else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(STDLIB / f) for f in CORPUS_FILES], trainer)
    kwargs = {}
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
        kwargs["bos_token"] = "<s>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", **kwargs)
    if chat:
        fast.chat_template = CHATML
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def bos_tokenizer_dir(tmp_path_factory) -> Path:
    """Adds BOS like Llama/Gemma tokenizers, and has a ChatML template."""
    return make_tokenizer(tmp_path_factory.mktemp("bos_tokenizer"), bos=True, chat=True)


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory) -> Path:
    """No BOS (like SmolLM2's), a ChatML template."""
    return make_tokenizer(tmp_path_factory.mktemp("chat_tokenizer"), chat=True)


def _save(model, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def make_llama(tokenizer_dir, out, vocab=512, hidden=32, layers=3, heads=4, kv_heads=2, positions=256, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=positions,
                      eos_token_id=0, pad_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    # random-init logits are nearly flat; spread them so top-K and tails are non-trivial
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return _save(model, tokenizer_dir, out)


def make_gpt2(tokenizer_dir, out, vocab=512, positions=128, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=positions,
                     eos_token_id=0, bos_token_id=0, pad_token_id=1)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(10.0)
    return _save(model, tokenizer_dir, out)


@pytest.fixture(scope="session")
def llama_dir(tokenizer_dir, tmp_path_factory) -> Path:
    return make_llama(tokenizer_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def gpt2_dir(tokenizer_dir, tmp_path_factory) -> Path:
    return make_gpt2(tokenizer_dir, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def bigvocab_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A Llama whose LM head has 70,000 rows: top-K ids above 65,535 must survive storage."""
    return make_llama(tokenizer_dir, tmp_path_factory.mktemp("bigvocab"), vocab=70_000, hidden=16, layers=2,
                      heads=2, kv_heads=1)


@pytest.fixture(scope="session")
def bos_llama_dir(bos_tokenizer_dir, tmp_path_factory) -> Path:
    return make_llama(bos_tokenizer_dir, tmp_path_factory.mktemp("bos_llama"))


@pytest.fixture(scope="session")
def chat_llama_dir(chat_tokenizer_dir, tmp_path_factory) -> Path:
    return make_llama(chat_tokenizer_dir, tmp_path_factory.mktemp("chat_llama"))


@pytest.fixture(scope="session")
def assistant_cache(bos_llama_dir, conversations, tmp_path_factory) -> Path:
    """A chat cache with assistant-only loss masks, one conversation per row (export and import tests)."""
    out = tmp_path_factory.mktemp("assistant") / "cache"
    capture(settings(bos_llama_dir, conversations, out, data={"format": "messages", "loss_mask": "assistant",
                                                               "packing": False, "seq_len": 96}))
    return out


@pytest.fixture(scope="session")
def conversations(tmp_path_factory) -> Path:
    """A jsonl of chat data: `messages` (system/user/assistant turns) and `prompt`/`response` columns."""
    out = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    paras = [p.strip() for name in CORPUS_FILES for p in (STDLIB / name).read_text().split("\n\n") if p.strip()]
    with open(out, "w") as f:
        for i in range(0, min(len(paras), 240) - 3, 3):
            msgs = [{"role": "user", "content": f"Explain this:\n{paras[i][:120]}"},
                    {"role": "assistant", "content": paras[i + 1][: 30 + 40 * (i % 4)]},
                    {"role": "user", "content": "And this?"},
                    {"role": "assistant", "content": paras[i + 2][:60]}]
            if i % 2:
                msgs.insert(0, {"role": "system", "content": "You read Python."})
            f.write(json.dumps({"messages": msgs, "prompt": msgs[-4]["content"], "response": msgs[-3]["content"]})
                    + "\n")
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A jsonl corpus of real text: standard-library modules split into paragraphs."""
    return _paragraphs(tmp_path_factory.mktemp("corpus") / "docs.jsonl", lambda para, name: {"source": name})


def _paragraphs(out: Path, columns) -> Path:
    """A jsonl file of the corpus files' paragraphs: {"text": paragraph, **columns(paragraph, file name)}."""
    with open(out, "w") as f:
        for name in CORPUS_FILES:
            for para in (STDLIB / name).read_text().split("\n\n"):
                if para.strip():
                    f.write(json.dumps({"text": para, **columns(para, name)}) + "\n")
    return out


def settings(model_dir: Path, corpus: Path, out: Path, **sections) -> dict:
    """A small capture config as a dict; `sections` update the defaults section by section."""
    cfg = {
        "teacher": {"model": str(model_dir)},
        "data": {"source": "json", "data_files": [str(corpus)], "seq_len": 32, "max_tokens": 3000,
                 "validation_fraction": 0.2},
        "capture": {"top_k": 8, "batch_size": 3, "rows_per_shard": 8, "rows_per_chunk": 2},
        "output": {"dir": str(out)},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


STUDENT_ARCH = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64}


def student_run(cache_dir, out, students=None, **kw):
    """A small stage-2 run on a test cache: one 2-layer student (0.5 KD + 0.5 CE) unless given, 6 steps."""
    from pipeline.student_config import StudentRunConfig

    students = students or [{"name": "s", "arch": STUDENT_ARCH, "losses": {"kd_forward": 0.5, "ce": 0.5},
                             "lr": 3e-3, "warmup_steps": 2}]
    return StudentRunConfig.model_validate({"cache": str(cache_dir), "output_dir": str(out), "students": students,
                                            "batch_size": 4, "max_steps": 6, "eval_every": 3, "log_every": 2,
                                            "device": "cpu", **kw})


def capture(cfg: dict):
    from pipeline.capture.run import run_capture
    from pipeline.config import TeacherCacheConfig

    return run_capture(TeacherCacheConfig.model_validate(cfg), log=lambda m: None, progress=False)


def write_toml(path: Path, cfg: dict) -> Path:
    """A settings dict as a TOML file, for commands run as subprocesses (torchrun)."""
    from pipeline.onpolicy.settings import dump_toml

    path.write_text(dump_toml(cfg))
    return path


# ---------------------------------------------------------------------------------------------
# classification teachers and labelled data

SEQ_LABELS = ["def", "import", "other"]
TOKEN_LABELS = ["O", "B-KW", "B-CAP", "I-CAP"]


def paragraph_label(text: str) -> str:
    """A label a small model can learn from the tokens: does the paragraph define, import, or neither."""
    return "def" if "def " in text else "import" if "import" in text else "other"


def word_tags(words: list[str]) -> list[str]:
    """BIO tags: Python keywords are KW entities, runs of capitalised words CAP entities."""
    import keyword

    tags, prev_cap = [], False
    for w in words:
        if keyword.iskeyword(w):
            tags.append("B-KW")
            prev_cap = False
        elif w[:1].isupper():
            tags.append("I-CAP" if prev_cap else "B-CAP")
            prev_cap = True
        else:
            tags.append("O")
            prev_cap = False
    return tags


@pytest.fixture(scope="session")
def labelled(tmp_path_factory) -> Path:
    """jsonl rows of real text with `label` (SEQ_LABELS), `words` and `tags` (TOKEN_LABELS per word)."""
    def columns(para: str, name: str) -> dict:
        words = para.split()[:20]
        return {"label": paragraph_label(para), "words": words, "tags": word_tags(words)}

    return _paragraphs(tmp_path_factory.mktemp("labelled") / "labelled.jsonl", columns)


def make_classifier(tokenizer_dir, out, family: str, task: str, labels: list[str], seed: int = 0) -> Path:
    """A tiny random-init classifier: family 'bert' (encoder) or 'llama' (decoder), task 'sequence' or 'token'."""
    import transformers

    torch.manual_seed(seed)
    common = dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                  pad_token_id=1)
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, **common)
    else:
        cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       eos_token_id=0, bos_token_id=None, **common)
    head = "ForSequenceClassification" if task == "sequence" else "ForTokenClassification"
    model = getattr(transformers, ("Bert" if family == "bert" else "Llama") + head)(cfg)
    with torch.no_grad():  # spread the class logits so the distributions are not flat
        for name, p in model.named_parameters():
            if name.startswith(("classifier", "score")) and p.ndim == 2:
                p.mul_(20.0)
    return _save(model, tokenizer_dir, out)


def classification_settings(model_dir: Path, data_file: Path, out: Path, task: str, **sections) -> dict:
    """A small capture config of a classification teacher (task 'sequence' or 'token') over `labelled` rows."""
    cfg = settings(model_dir, data_file, out, teacher={"model": str(model_dir), "task": f"{task}-classification"},
                   data={"source": "json", "data_files": [str(data_file)], "seq_len": 24, "max_tokens": None,
                         "max_documents": 120, "validation_fraction": 0.25,
                         **({"text_column": "words", "label_column": "tags"} if task == "token" else {})})
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def shard_files(root) -> dict[tuple[str, int], dict]:
    """{(split, shard number): {"part", "rows": (start, end), "files": {field: path}}} from the cache's shard
    indexes (or, before format 3.0, its manifest)."""
    from pipeline.format import Cache

    c = Cache(root)
    out: dict[tuple[str, int], dict] = {}
    for split in c.splits:
        for p in c.parts(split):
            for batch in c.index(split, p.path).batches():
                t = batch.to_pydict()
                for i, a, b, field, path in zip(t["index"], t["row_start"], t["row_end"], t["field"], t["path"]):
                    sh = out.setdefault((split, i), {"part": p.path, "rows": (a, b), "files": {}})
                    sh["files"][field] = path
    return out


def all_files(cache) -> dict:
    """{path: FileDigest} of every file of a cache (a Cache, a path or a URL) but its manifest."""
    from pipeline.format import Cache

    c = cache if isinstance(cache, Cache) else Cache(cache)
    return {rel: d for rel, d, _ in c.iter_files()}


def as_legacy(root: Path, version: str = "2.0") -> dict:
    """Rewrite a finished cache as a cache of format `version` (< 3.0) was: its shards listed in the manifest,
    no shard index files. Returns the new manifest document."""
    from pipeline.format.manifest import manifest_digest

    m = json.loads((root / "manifest.json").read_text())
    shards = []
    for (split, index), sh in sorted(shard_files(root).items(), key=lambda kv: (list(m["splits"]).index(kv[0][0]),
                                                                                  kv[0][1])):
        files = {}
        for path in sh["files"].values():
            data = (root / path).read_bytes()
            import hashlib

            files[path] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        shards.append({"split": split, "part": sh["part"], "index": index, "row_start": int(sh["rows"][0]),
                       "row_end": int(sh["rows"][1]), "files": files})
    for entry in m.pop("shard_index").values():
        (root / entry["path"]).unlink()
    m["shards"] = shards
    m["format_version"] = version
    m["digest"] = manifest_digest(m)
    (root / "manifest.json").write_text(json.dumps(m))
    return m
