"""Rows the teacher expects: BOS by the tokenizer's convention, chat rendering, loss masks, document ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CHATML
from transformers import AutoTokenizer

from pipeline.config import DataConfig
from pipeline.capture.chat import render_conversation
from pipeline.capture.documents import RowConvention, load_documents
from pipeline.capture.packing import tokenize_rows
from pipeline.capture.rows import prepare
from pipeline.errors import DataError


def data_cfg(path, **kw) -> DataConfig:
    base = {"source": "json", "data_files": [str(path)], "seq_len": 32, "max_tokens": 3000}
    return DataConfig.model_validate({**base, **kw})


def rows_of(cfg: DataConfig, tok):
    ds, _ = load_documents(cfg)
    arrays, stats = tokenize_rows(ds, tok, cfg)
    return arrays, stats


def text_stream(corpus, tok, bos: bool) -> list[int]:
    """Every document as the teacher expects it: [BOS] + tokens + EOS, in order."""
    out = []
    for line in corpus.read_text().splitlines():
        text = json.loads(line)["text"]
        if text.strip():
            out += ([tok.bos_token_id] if bos else []) + tok(text, add_special_tokens=False)["input_ids"] + \
                [tok.eos_token_id]
    return out


# ------------------------------------------------------------------------------------------------ BOS


def test_convention_follows_what_the_tokenizer_adds(tokenizer_dir, bos_tokenizer_dir, corpus):
    with_bos, without = AutoTokenizer.from_pretrained(bos_tokenizer_dir), AutoTokenizer.from_pretrained(tokenizer_dir)
    assert with_bos("x")["input_ids"][0] == with_bos.bos_token_id  # the fixture behaves like Llama's tokenizer
    auto = RowConvention.resolve(data_cfg(corpus), with_bos)
    assert auto.bos_token_id == with_bos.bos_token_id and auto.tokenizer_adds_bos
    assert RowConvention.resolve(data_cfg(corpus, bos=False), with_bos).bos_token_id is None
    assert RowConvention.resolve(data_cfg(corpus), without).bos_token_id is None
    with pytest.raises(DataError, match="no BOS token"):
        RowConvention.resolve(data_cfg(corpus, bos=True), without)


def test_packed_rows_begin_with_bos_even_mid_document(bos_tokenizer_dir, corpus):
    tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    cfg = data_cfg(corpus, max_tokens=None, max_documents=60)
    arrays, stats = rows_of(cfg, tok)
    ids, lengths, L = arrays["input_ids"], arrays["lengths"], cfg.seq_len
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert not ((ids[:, 0] == tok.bos_token_id) & (ids[:, 1] == tok.bos_token_id)).any(), "BOS doubled"
    # the rows are the document stream cut into rows, a BOS inserted exactly where a row starts mid-document
    stream = text_stream(corpus, tok, bos=True)[: stats["tokens_read"]]
    p = inserted = 0
    for row, n in zip(ids, lengths):
        if stream[p] == tok.bos_token_id:  # the row starts at a document
            assert row[:n].tolist() == stream[p : p + n]
            p += n
        else:
            assert row[:n].tolist() == [tok.bos_token_id] + stream[p : p + n - 1]
            p += n - 1
            inserted += 1
    assert p == len(stream) and inserted == stats["rows_bos_inserted"] > 0
    assert (lengths[:-1] == L).all()


def test_unpacked_rows_begin_with_bos_and_end_with_eos(bos_tokenizer_dir, corpus):
    tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    arrays, _ = rows_of(data_cfg(corpus, packing=False, max_tokens=None, max_documents=40), tok)
    ids, lengths = arrays["input_ids"], arrays["lengths"]
    assert (ids[:, 0] == tok.bos_token_id).all()
    short = lengths < 32
    assert short.any()
    assert (ids[short, lengths[short] - 1] == tok.eos_token_id).all()


def test_rows_of_a_tokenizer_without_bos_are_the_plain_stream(tokenizer_dir, corpus):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    arrays, stats = rows_of(data_cfg(corpus), tok)
    stream = text_stream(corpus, tok, bos=False)[: stats["tokens_read"]]
    flat = np.concatenate([r[:n] for r, n in zip(arrays["input_ids"], arrays["lengths"])]).tolist()
    assert flat == stream and stats["rows_bos_inserted"] == 0
    assert arrays["loss_mask"] is None and arrays["position_ids"] is None  # nothing extra by default


def test_forcing_bos_off_keeps_a_bos_tokenizer_rows_plain(bos_tokenizer_dir, corpus):
    tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    arrays, _ = rows_of(data_cfg(corpus, bos=False), tok)
    assert not (arrays["input_ids"] == tok.bos_token_id).any()


# ------------------------------------------------------------------------------------------------ chat


def test_messages_render_as_apply_chat_template(bos_tokenizer_dir, chat_tokenizer_dir, conversations):
    convs = [json.loads(x)["messages"] for x in conversations.read_text().splitlines()]
    for tok_dir, bos_first in ((chat_tokenizer_dir, False), (bos_tokenizer_dir, True)):
        tok = AutoTokenizer.from_pretrained(tok_dir)
        cfg = data_cfg(conversations, format="messages", packing=False, seq_len=2048, max_tokens=None)
        arrays, stats = rows_of(cfg, tok)
        assert stats["documents"] == len(convs)
        for row, n, msgs in zip(arrays["input_ids"], arrays["lengths"], convs):
            expected = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
            if bos_first:
                expected = [tok.bos_token_id] + expected
            assert row[:n].tolist() == expected


def test_assistant_mask_on_a_hand_checked_conversation(chat_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort [3, 1]?"},
            {"role": "assistant", "content": "[1, 3]"}, {"role": "user", "content": "Reverse it."},
            {"role": "assistant", "content": "[3, 1]"}]
    text, spans = render_conversation(tok, CHATML, msgs)
    assert [text[a:b] for a, b in spans] == ["[1, 3]<|im_end|>\n", "[3, 1]<|im_end|>\n"]
    path = _jsonl([{"messages": msgs}])
    arrays, stats = rows_of(data_cfg(path, format="messages", loss_mask="assistant", packing=False, seq_len=256), tok)
    ids, mask, n = arrays["input_ids"][0], arrays["loss_mask"][0], arrays["lengths"][0]
    # position t trains iff it predicts an assistant token: decode the predicted tokens, turn by turn
    predicted = [int(ids[t + 1]) for t in range(n - 1) if mask[t]]
    assert tok.decode(predicted) == "[1, 3]<|im_end|>\n[3, 1]<|im_end|>\n"
    assert mask[n - 1] == 0 and not mask[n:].any() and stats["trained_positions"] == len(predicted)


def test_masks_survive_truncation_and_the_token_budget(chat_tokenizer_dir):
    """A row cut by seq_len or by max_tokens keeps, at its last position, whether the cut-off next token trains."""
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    msgs = [{"role": "user", "content": "Sort [3, 1]?"}, {"role": "assistant", "content": "It is [1, 3] once sorted."}]
    path = _jsonl([{"messages": msgs}])
    full, _ = rows_of(data_cfg(path, format="messages", loss_mask="assistant", packing=False, seq_len=256), tok)
    n = int(full["lengths"][0])
    for cut in (n - 3, n - 6):
        for kw in ({"seq_len": cut}, {"seq_len": 256, "max_tokens": cut}):
            part, _ = rows_of(data_cfg(path, format="messages", loss_mask="assistant", packing=False, **kw), tok)
            assert part["lengths"][0] == cut
            assert part["loss_mask"][0][:cut].tolist() == full["loss_mask"][0][:cut].tolist()
            assert part["loss_mask"][0][cut - 1] == 1  # the cut falls inside the answer


def test_whitespace_tokens_with_trimmed_offsets_are_trained(chat_tokenizer_dir):
    """Tokenizers that trim offsets give whitespace tokens empty spans; indentation in answers still trains."""
    from tokenizers import processors

    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    answer = "for i in x:\n    if i:\n        print(i)  # two  spaces"
    msgs = [{"role": "user", "content": "Loop?"}, {"role": "assistant", "content": answer}]
    arrays, _ = rows_of(data_cfg(_jsonl([{"messages": msgs}]), format="messages", loss_mask="assistant",
                                 packing=False, seq_len=256), tok)
    ids, mask, n = arrays["input_ids"][0], arrays["loss_mask"][0], arrays["lengths"][0]
    assert tok.decode([int(ids[t + 1]) for t in range(n - 1) if mask[t]]) == answer + "<|im_end|>\n"


def test_a_conversation_may_open_with_the_assistant(chat_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    msgs = [{"role": "assistant", "content": "Hello, ask me."}, {"role": "user", "content": "Sum 1 2?"},
            {"role": "assistant", "content": "3"}]
    text, spans = render_conversation(tok, CHATML, msgs)
    assert [text[a:b] for a, b in spans] == ["Hello, ask me.", "3<|im_end|>\n"]
    with pytest.raises(DataError, match="the chat template cannot render this conversation"):
        render_conversation(tok, "{{ raise_exception('no system turns') }}", msgs)


def test_prompt_response_masks_the_response_only(chat_tokenizer_dir, conversations):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    rec = [json.loads(x) for x in conversations.read_text().splitlines()][:5]
    cfg = data_cfg(conversations, format="prompt_response", loss_mask="assistant", packing=False, seq_len=2048,
                   max_documents=5, max_tokens=None)
    arrays, _ = rows_of(cfg, tok)
    for row, mask, n, r in zip(arrays["input_ids"], arrays["loss_mask"], arrays["lengths"], rec):
        msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
        assert row[:n].tolist() == tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        predicted = [int(row[t + 1]) for t in range(n - 1) if mask[t]]
        assert tok.decode(predicted) == r["response"] + "<|im_end|>\n"


def test_packed_conversations_keep_their_masks_across_row_cuts(chat_tokenizer_dir, conversations):
    """Packed rows are cut mid-conversation; the mask at each position still says whether the token it
    predicts (in the stream, even past the row's end) is an assistant token."""
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    unpacked, _ = rows_of(data_cfg(conversations, format="messages", loss_mask="assistant", packing=False,
                                   seq_len=2048, max_tokens=None), tok)
    stream, trained = [], []  # per token of the stream: does some position predict it for training?
    for row, mask, n in zip(unpacked["input_ids"], unpacked["loss_mask"], unpacked["lengths"]):
        stream += row[:n].tolist()
        trained += [0] + mask[: n - 1].tolist()
    packed, stats = rows_of(data_cfg(conversations, format="messages", loss_mask="assistant", seq_len=48,
                                     max_tokens=None), tok)
    p = 0
    for row, mask, n in zip(packed["input_ids"], packed["loss_mask"], packed["lengths"]):
        assert row[:n].tolist() == stream[p : p + n]
        nxt = trained[p + 1 : p + n + 1] + [0] * (p + n + 1 - len(trained))
        assert mask[:n].tolist() == nxt
        p += n
    assert p == len(stream) and stats["trained_positions"] == sum(trained)


def test_chat_data_needs_a_template(tokenizer_dir, conversations, tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)  # no chat template
    with pytest.raises(DataError, match="has none: set data.chat_template"):
        prepare(data_cfg(conversations, format="messages"), tok)
    f = tmp_path / "t.jinja"
    f.write_text(CHATML)
    p = prepare(data_cfg(conversations, format="messages", chat_template=str(f)), tok)
    assert p.convention["chat_template"]["source"] == "config" and p.convention["chat_template"]["text"] == CHATML
    with pytest.raises(DataError, match="neither a Jinja template nor an existing file"):
        prepare(data_cfg(conversations, format="messages", chat_template=str(tmp_path / "missing.jinja")), tok)


def test_bad_chat_input_is_refused(chat_tokenizer_dir, conversations):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    with pytest.raises(DataError, match="messages column 'turns' not in dataset"):
        prepare(data_cfg(conversations, format="messages", messages_column="turns"), tok)
    bad = _jsonl([{"messages": [{"role": "user", "text": "no content key"}]}])
    with pytest.raises(DataError, match="row 0: column 'messages' must hold a list"):
        prepare(data_cfg(bad, format="messages"), tok)
    only_user = _jsonl([{"messages": [{"role": "user", "content": "hi"}]}] * 2)
    with pytest.raises(DataError, match="no position to train on"):
        prepare(data_cfg(only_user, format="messages", loss_mask="assistant"), tok)
    with pytest.raises(ValueError, match="needs chat data"):
        data_cfg(conversations, loss_mask="assistant")
    with pytest.raises(ValueError, match="needs packing = true"):
        data_cfg(conversations, document_mask=True, packing=False)


# ------------------------------------------------------------------------------------------------ documents


def test_document_positions_restart_at_each_document(bos_tokenizer_dir, corpus):
    tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    arrays, _ = rows_of(data_cfg(corpus, document_mask=True), tok)
    ids, pos, lengths = arrays["input_ids"], arrays["position_ids"], arrays["lengths"]
    for row, p, n in zip(ids, pos, lengths):
        starts = np.flatnonzero(p[:n] == 0)
        assert starts[0] == 0
        assert (row[starts] == tok.bos_token_id).all()  # every document (or row) segment starts with BOS
        assert (row[starts[1:] - 1] == tok.eos_token_id).all()  # ... right after the previous one's EOS
        assert (np.diff(p[:n])[np.diff(p[:n]) != 1] <= 0).all()
        if n < len(row):
            assert (p[n:] == np.arange(len(row) - n)).all()  # padding: a segment of its own
    assert (pos[:, 1:] == 0).any(), "expected rows holding several documents"


def _jsonl(records) -> object:
    import tempfile
    from pathlib import Path

    f = Path(tempfile.mkdtemp()) / "data.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    return f
