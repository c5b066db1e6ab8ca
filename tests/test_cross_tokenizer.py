"""Students with another tokenizer than the cache's: re-tokenisation, alignment, the cross-tokenizer terms
(ULD, vocabulary-mapped KL) against float64 references, training, the saved model, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CORPUS_FILES, STDLIB, STUDENT_ARCH, capture, settings
from conftest import student_run as run_cfg
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.format import Cache, row_column, tokenizer_fingerprint
from pipeline.train import crosstok, retokenized, vocab_map
from pipeline.train import losses
from pipeline.train.recipe import train_students
from pipeline.errors import StudentError

TEXTS = ["def f(x):\n    return x  # héllo wörld 🙂 日本", "import os\n\n\nclass A:\n    pass\n", "naïve café ☕ — done."]


def make_student_tokenizer(out, vocab: int = 300):
    """A second byte-level BPE: another vocabulary size, trained on other files, other special tokens (eos `</s>`)
    and a decoder that is the same kind as the teacher's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    files = [str(STDLIB / f) for f in ("string.py", "calendar.py", "csv.py")]
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "</s>"],
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def student_tok_dir(tmp_path_factory):
    return make_student_tokenizer(tmp_path_factory.mktemp("student_tok"))


@pytest.fixture(scope="module")
def cache_dir(llama_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cross") / "cache"
    capture(settings(llama_dir, corpus, out, data={"max_tokens": 4000, "validation_fraction": 0.15},
                     capture={"top_k": 16, "temperatures": [2.0], "hidden_layers": [1, 3], "attention_layers": [2],
                              "rows_per_shard": 8, "rows_per_chunk": 4}))
    return out


def _toks(tokenizer_dir, student_tok_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(student_tok_dir)


def _prefix(tok, ids) -> str:
    return tok.backend_tokenizer.decode(list(ids), skip_special_tokens=False)


# ------------------------------------------------------------------------------------------- alignment


def test_boundaries_and_alignment_on_hand_checked_offsets():
    # the offsets the SmolLM2 tokenizer gives " 日本" (README): a byte-level piece carries its whole character's span
    ends, valid = crosstok._boundaries_from_offsets([(0, 2), (1, 2), (1, 2), (2, 3)])
    assert ends.tolist() == [2, 2, 2, 3] and valid.tolist() == [False, False, True, True]
    # teacher boundaries 3 5 . 9 9 12; student 1 3 9 12 12 . -> only 3 (unique on both sides) pairs
    t = np.array([3, 5, -1, 9, 9, 12])
    s = np.array([1, 3, 9, 12, 12, -1])
    assert crosstok.align(t, s).tolist() == [-1, 0, -1, -1, -1, -1]
    assert crosstok.align(np.array([2, 4, 7]), np.array([2, 3, 4, 7])).tolist() == [0, -1, 1, 2]


def test_alignment_pairs_exactly_the_positions_with_the_same_text_read(tokenizer_dir, student_tok_dir):
    """Brute force over real strings: a student and a teacher position are aligned iff the decoded prefixes they
    have read are the same text, that text ends on a whole character, and no other position of either side has
    read exactly it."""
    t_tok, s_tok = _toks(tokenizer_dir, student_tok_dir)
    retok = crosstok.Retokenizer(t_tok, s_tok)
    for text in TEXTS:
        ids = t_tok(text)["input_ids"]
        row = retok.row(ids)
        assert _prefix(s_tok, row.student_ids) == _prefix(t_tok, ids) == text  # the round trip keeps the text
        t_pre = [_prefix(t_tok, ids[: i + 1]) for i in range(len(ids))]
        s_pre = [_prefix(s_tok, row.student_ids[: i + 1]) for i in range(len(row.student_ids))]
        ok = lambda p, pres: text.startswith(p) and not p.endswith(crosstok.REPLACEMENT) and pres.count(p) == 1  # noqa: E731
        expected = [t_pre.index(p) if ok(p, s_pre) and p in t_pre and ok(p, t_pre) else -1 for p in s_pre]
        got = crosstok.align(row.teacher_ends, row.student_ends).tolist()
        assert got == expected, text
        assert sum(a >= 0 for a in got) >= len(text.split()) // 2  # word boundaries align
        assert row.student_chars.sum() == row.teacher_chars.sum() == len(text)
    # hand-checked: " 🙂" is a space and 4 bytes that neither small vocabulary merges, so only the space and the
    # emoji's last byte end a character
    row = retok.row(t_tok(" 🙂")["input_ids"])
    assert row.teacher_ends.tolist() == row.student_ends.tolist() == [1, -1, -1, -1, 2]
    assert crosstok.align(row.teacher_ends, row.student_ends).tolist() == [0, -1, -1, -1, 4]


def test_special_tokens_map_by_role_and_count_one_unit(tokenizer_dir, student_tok_dir):
    t_tok, s_tok = _toks(tokenizer_dir, student_tok_dir)
    eos_t, eos_s = t_tok.eos_token_id, s_tok.eos_token_id
    assert crosstok.special_map(t_tok, s_tok)[eos_t] == eos_s
    a, b = t_tok("x = 1")["input_ids"], t_tok("y = 2")["input_ids"]
    row = crosstok.Retokenizer(t_tok, s_tok).row(a + [eos_t] + b)
    k = len(s_tok("x = 1")["input_ids"])
    assert row.student_ids[k] == eos_s and row.student_chars[k] == 0
    al = crosstok.align(row.teacher_ends, row.student_ends)
    assert al[k] == len(a)  # the end-of-document positions predict the next document's first token on both sides
    assert al[-1] == len(a) + len(b)  # and positions after it align again


def test_round_trip_of_a_row_that_starts_inside_a_character(tokenizer_dir, student_tok_dir):
    """A packed row can start with the last bytes of a character: its decode holds U+FFFD, encoding that back does
    not give the cached ids, and the boundaries come from decoding every prefix instead. The student reads the
    decoded text less that U+FFFD (bytes of a cut character are no text); every aligned pair read the same text."""
    t_tok, s_tok = _toks(tokenizer_dir, student_tok_dir)
    ids = t_tok("é and more text")["input_ids"]
    first = [i for i in range(1, len(ids)) if not _prefix(t_tok, ids[:i]).endswith(crosstok.REPLACEMENT)][0]
    assert first > 1, "é must be more than one token in the test tokenizer"
    cut = ids[1:]  # starts with é's continuation byte
    row = crosstok.Retokenizer(t_tok, s_tok).row(cut)
    assert not row.lossless
    text = _prefix(t_tok, cut)
    assert text.startswith(crosstok.REPLACEMENT) and _prefix(s_tok, row.student_ids) == text[1:]
    assert row.student_chars.sum() == len(text) - 1
    al = crosstok.align(row.teacher_ends, row.student_ends)
    assert (al >= 0).sum() >= 3
    for s_pos, t_pos in enumerate(al):
        if t_pos >= 0:
            assert crosstok.REPLACEMENT + _prefix(s_tok, row.student_ids[: s_pos + 1]) == _prefix(t_tok, cut[: t_pos + 1])


def test_loss_mask_and_documents_follow_the_text():
    teacher_last = np.array([2, 5, 6, 9, 12])  # teacher tokens end at these characters
    student_last = np.array([1, 2, 4, 5, 9, 10, 12])
    mask = np.array([False, True, True, False, True])
    assert crosstok.follow(teacher_last, student_last, mask, "mask").tolist() == [False, False, False, True, False, False,
                                                                           True]
    docs = crosstok.documents(np.array([0, 1, 0, 1, 2]))  # documents [1, 1, 2, 2, 2]
    assert crosstok.follow(teacher_last, student_last, docs, "document").tolist() == [1, 1, 1, 1, 2, 2, 2]


def test_a_split_is_retokenised_once_and_kept(cache_dir, student_tok_dir, tmp_path, monkeypatch):
    c = Cache(cache_dir)
    s_tok = AutoTokenizer.from_pretrained(student_tok_dir)
    rows = retokenized.stored_rows(c, "train", s_tok, tmp_path, "s")
    stats = rows.stats()
    assert 0.5 < stats["aligned_share"] < 1 and stats["lossless_rows"] > 0.9
    table = c.rows("train")
    ids, lengths = row_column(table, "input_ids", np.int64), table.column("length").to_numpy()
    t_tok = c.tokenizer()
    for i in range(0, len(lengths), 7):  # the student's rows hold the teacher's text, and its own end-of-document
        s_ids, t_ids = rows.input_ids[i, : rows.length[i]].tolist(), ids[i, : lengths[i]].tolist()
        assert s_tok.decode(s_ids, skip_special_tokens=True) == t_tok.decode(t_ids, skip_special_tokens=True)
        assert s_ids.count(s_tok.eos_token_id) == t_ids.count(t_tok.eos_token_id)
    monkeypatch.setattr(retokenized, "retokenize_split", lambda *a, **k: pytest.fail("recomputed"))
    again = retokenized.stored_rows(c, "train", s_tok, tmp_path, "s")
    assert np.array_equal(again.align, rows.align) and np.array_equal(again.input_ids, rows.input_ids)


# ------------------------------------------------------------------------------------------- losses


def _uld_reference(p_t: np.ndarray, p_s: np.ndarray) -> float:
    """Boizard et al.'s ULD over two whole distributions: sorted, zero-padded to one length, absolute differences."""
    n = max(len(p_t), len(p_s))
    a = np.sort(np.pad(p_t, (0, n - len(p_t))))[::-1]
    b = np.sort(np.pad(p_s, (0, n - len(p_s))))[::-1]
    return float(np.abs(a - b).sum())


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_uld_against_float64_reference(T):
    g = torch.Generator().manual_seed(0)
    B, Lp, V_t, V_s, K = 2, 5, 40, 23, 6
    z_t = torch.randn(B, Lp, V_t, generator=g, dtype=torch.float64) * 3
    z_s = torch.randn(B, Lp, V_s, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(B, Lp, generator=g) > 0.3
    lp_t = torch.log_softmax(z_t / T, -1)
    lp_s = torch.log_softmax(z_s / T, -1)

    def cached(lp, k):  # top-k log-probs in a shuffled order + the exact tail, as the cache gives them
        top = lp.topk(k, -1).values
        top = top[..., torch.randperm(k, generator=g)]
        return top, losses.log1mexp(torch.logsumexp(top, -1))

    # the whole vocabulary on both sides (K = V): exactly the paper's ULD
    t_all, t_tail = cached(lp_t, V_t)
    s_all, s_tail = cached(lp_s, V_s)
    got = losses.uld(t_all, t_tail, s_all, s_tail, mask, T)
    ref = np.mean([_uld_reference(lp_t[b, i].exp().numpy(), lp_s[b, i].detach().exp().numpy())
                   for b in range(B) for i in range(Lp) if mask[b, i]]) * T**2
    assert got.item() == pytest.approx(ref, rel=1e-10)
    # top-K with the tail bucket: the ranks up to K one by one, those beyond by their total mass
    t_k, t_tail = cached(lp_t, K)
    s_k, s_tail = cached(lp_s, K)
    got = losses.uld(t_k, t_tail, s_k, s_tail, mask, T)
    vals = []
    for b in range(B):
        for i in range(Lp):
            if mask[b, i]:
                a = np.sort(lp_t[b, i].exp().numpy())[::-1]
                c = np.sort(lp_s[b, i].detach().exp().numpy())[::-1]
                vals.append(np.abs(a[:K] - c[:K]).sum() + abs(a[K:].sum() - c[K:].sum()))
                assert vals[-1] <= _uld_reference(a, c) + 1e-12  # a lower bound of the full ULD
    assert got.item() == pytest.approx(np.mean(vals) * T**2, rel=1e-10)
    got.backward()
    assert z_s.grad is not None and torch.isfinite(z_s.grad).all() and z_s.grad.abs().sum() > 0


def _mapped_reference(p_t: np.ndarray, K: int, mapping: np.ndarray, p_s: np.ndarray) -> float:
    """The teacher's top-K carried into the student's vocabulary by hand: each mapped id's mass added on its
    student id, the unmapped and untaken mass in one bucket; the student's distinct ids and its rest."""
    top = np.argsort(-p_t)[:K]
    q: dict[int, float] = {}
    bucket = 1.0 - p_t[top].sum()
    for v in top:
        if mapping[v] >= 0:
            q[int(mapping[v])] = q.get(int(mapping[v]), 0.0) + p_t[v]
        else:
            bucket += p_t[v]
    s_rest = 1.0 - sum(p_s[u] for u in q)
    kl = sum(m * np.log(m / p_s[u]) for u, m in q.items() if m > 0)
    return kl + (bucket * np.log(bucket / s_rest) if bucket > 0 else 0.0)


@pytest.mark.parametrize("T", [1.0, 0.5, 2.0])
def test_mapped_kl_against_float64_reference(T):
    g = torch.Generator().manual_seed(1)
    B, Lp, V_t, V_s, K = 2, 4, 30, 12, 8
    z_t = torch.randn(B, Lp, V_t, generator=g, dtype=torch.float64) * 2
    z_s = torch.randn(B, Lp, V_s, generator=g, dtype=torch.float64, requires_grad=True)
    mapping = torch.randint(-1, V_s, (V_t,), generator=g)  # many-to-one and unmapped ids
    mask = torch.rand(B, Lp, generator=g) > 0.2
    lp_t, lp_s = torch.log_softmax(z_t / T, -1), torch.log_softmax(z_s / T, -1)
    t_lp, ids = lp_t.topk(K, -1)
    t_tail = losses.log1mexp(torch.logsumexp(t_lp, -1))
    mapped = mapping[ids]
    s_lp = lp_s.gather(-1, mapped.clamp(min=0))
    got = losses.mapped_forward_kl(t_lp, t_tail, mapped, s_lp, mask, T)
    ref = np.mean([_mapped_reference(lp_t[b, i].exp().numpy(), K, mapping.numpy(), lp_s[b, i].detach().exp().numpy())
                   for b in range(B) for i in range(Lp) if mask[b, i]]) * T**2
    assert got.item() == pytest.approx(ref, rel=1e-9)
    got.backward()
    assert torch.isfinite(z_s.grad).all()
    # the gradient against autograd through the reference formula, in torch
    z2 = z_s.detach().clone().requires_grad_(True)
    lp2 = torch.log_softmax(z2 / T, -1)
    total = 0
    for b in range(B):
        for i in range(Lp):
            if not mask[b, i]:
                continue
            q = {}
            bucket = t_tail[b, i].exp()
            for k in range(K):
                u = int(mapped[b, i, k])
                if u >= 0:
                    q[u] = q.get(u, 0) + t_lp[b, i, k].exp()
                else:
                    bucket = bucket + t_lp[b, i, k].exp()
            rest = 1 - sum(lp2[b, i, u].exp() for u in q)
            total = total + sum(m * (m.log() - lp2[b, i, u]) for u, m in q.items()) + bucket * (bucket.log() - rest.log())
    (total / mask.sum() * T**2).backward()
    torch.testing.assert_close(z_s.grad, z2.grad, rtol=1e-9, atol=1e-12)


def test_mapped_kl_with_the_identity_map_is_kd_forward():
    g = torch.Generator().manual_seed(2)
    z_t, z_s = torch.randn(2, 5, 50, generator=g) * 3, torch.randn(2, 5, 50, generator=g)
    t_lp, ids = torch.log_softmax(z_t, -1).topk(10, -1)
    t_tail = losses.log1mexp(torch.logsumexp(t_lp, -1))
    mask = torch.ones(2, 5, dtype=torch.bool)
    s_lp, s_tail = losses.student_topk_logprobs(z_s, ids)
    expected = losses.forward_kl(t_lp, t_tail, s_lp, s_tail, mask)
    torch.testing.assert_close(losses.mapped_forward_kl(t_lp, t_tail, ids, s_lp, mask), expected)


def test_vocab_map_follows_the_tokens_text(tokenizer_dir, student_tok_dir):
    t_tok, s_tok = _toks(tokenizer_dir, student_tok_dir)
    vmap = vocab_map.VocabMap.build(t_tok, s_tok, len(t_tok))
    t_text, s_text = vocab_map.surfaces(t_tok), vocab_map.surfaces(s_tok)
    s_plain = s_tok.backend_tokenizer
    n_first = 0
    for v in range(len(t_tok)):
        u = int(vmap.ids[v])
        if v in t_tok.all_special_ids:
            continue
        if u < 0:
            assert crosstok.REPLACEMENT in t_text[v] or not s_plain.encode(t_text[v], add_special_tokens=False).ids or \
                t_text[v] not in s_text and not t_text[v].startswith(s_text[s_plain.encode(t_text[v],
                                                                     add_special_tokens=False).ids[0]])
        elif s_text[u] == t_text[v]:
            continue
        else:  # several student tokens: the first of them
            n_first += 1
            assert s_plain.encode(t_text[v], add_special_tokens=False).ids[0] == u and t_text[v].startswith(s_text[u])
    assert vmap.counts["first_piece"] == n_first > 0 and vmap.counts["exact"] > 50
    assert vmap.ids[t_tok.eos_token_id] == s_tok.eos_token_id


# ------------------------------------------------------------------------------------------- training


def _train(cfg, **kw):
    return train_students(cfg, log=lambda m: None, progress=False, **kw)


@pytest.mark.slow
def test_cross_tokenizer_student_trains_and_is_saved_with_its_tokenizer(cache_dir, student_tok_dir, tmp_path):
    students = [{"name": "x", "arch": STUDENT_ARCH, "tokenizer": str(student_tok_dir), "lr": 3e-3, "warmup_steps": 2,
                 "losses": {"ce": 0.5, "uld": 0.5, "kd_mapped": 0.5, "hidden_mse": 0.01, "attn_kl": 0.1},
                 "attention_heads": "mean"}]
    cfg = run_cfg(cache_dir, tmp_path / "o", students, max_steps=30, eval_every=10, patience=None)
    report = _train(cfg)[0]
    recs = [json.loads(x) for x in (tmp_path / "o" / "x" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if r["split"] == "validation"]
    train = [r for r in recs if r["split"] == "train"]
    assert val[-1]["nll"] < val[0]["nll"] - 0.3  # validation loss falls
    assert val[-1]["nll_per_char"] < val[0]["nll_per_char"]
    for r in val:
        assert 0.3 < r["aligned_share"] < 1 and 0 < r["mapped_mass"] <= 1 and r["chars"] > r["tokens"] > 0
    for r in train:
        assert all(np.isfinite(r[k]) for k in ("ce", "uld", "kd_mapped", "hidden_mse", "attn_kl"))
        assert 0.3 < r["aligned_share"] < 1
    assert train[-1]["uld"] < train[0]["uld"] and train[-1]["kd_mapped"] < train[0]["kd_mapped"]
    assert report["cross_tokenizer"]["vocab_map"]["first_piece"] > 0
    saved = tmp_path / "o" / "x" / "model"
    s_tok = AutoTokenizer.from_pretrained(saved)
    assert tokenizer_fingerprint(s_tok) == tokenizer_fingerprint(AutoTokenizer.from_pretrained(student_tok_dir))
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert model.config.vocab_size == len(s_tok)
    out = model.generate(**s_tok("def f(x):", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 4


def test_same_tokenizer_given_explicitly_is_the_same_student(cache_dir, tokenizer_dir, tmp_path):
    """`tokenizer` naming the cache's own tokenizer changes nothing: same losses, same metrics, bit for bit;
    NLL per character is reported for it too."""
    base = {"name": "s", "arch": STUDENT_ARCH, "losses": {"kd_forward": 0.5, "ce": 0.5, "uld": 0.2}, "lr": 3e-3,
            "warmup_steps": 2}
    a = _train(run_cfg(cache_dir, tmp_path / "a", [base]))[0]
    b = _train(run_cfg(cache_dir, tmp_path / "b", [{**base, "tokenizer": str(tokenizer_dir)}]))[0]
    assert a["final"] == b["final"] and "aligned_share" not in a["final"] and "cross_tokenizer" not in b
    assert a["final"]["nll_per_char"] == pytest.approx(a["final"]["nll"] * a["final"]["tokens"] / a["final"]["chars"])
    ra = [json.loads(x) for x in (tmp_path / "a" / "s" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in ra] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in rb]


def test_kd_mapped_on_the_same_tokenizer_equals_kd_forward(cache_dir, tmp_path):
    from pipeline.student_config import StudentConfig
    from pipeline.train.dataset import CacheBatches, make_loader
    from pipeline.train.step import step_losses
    from pipeline.train.student_init import build_student

    c = Cache(cache_dir)
    spec = StudentConfig.model_validate({"name": "s", "arch": STUDENT_ARCH, "losses": {"kd_forward": 1.0,
                                                                                        "kd_mapped": 1.0}})
    model = build_student(spec, c.manifest, c.tokenizer(), torch.device("cpu"))
    batch = next(iter(make_loader(CacheBatches(c, "train", ["topk_ids", "topk_logprobs", "logsumexp"], 4))))
    v = step_losses(model, batch, spec, c.manifest, torch.device("cpu"))
    torch.testing.assert_close(v["kd_mapped"], v["kd_forward"])


# ------------------------------------------------------------------------------------------- refusals


def test_refusals(cache_dir, student_tok_dir, tmp_path):
    from pydantic import ValidationError
    from transformers import BertTokenizerLegacy

    def student(**kw):
        return [{"name": "x", "arch": STUDENT_ARCH, "losses": {"ce": 1.0, "uld": 1.0}, **kw}]

    with pytest.raises(StudentError, match=r"tokenizer '.*/nowhere' does not exist"):
        _train(run_cfg(cache_dir, tmp_path / "a", student(tokenizer=str(tmp_path / "nowhere"))))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "def", "x", "##s", "return"]))
    BertTokenizerLegacy(str(vocab)).save_pretrained(tmp_path / "slow")
    with pytest.raises(StudentError, match=r"BertTokenizerLegacy is a slow tokenizer without character offsets"):
        _train(run_cfg(cache_dir, tmp_path / "b", student(tokenizer=str(tmp_path / "slow"))))
    with pytest.raises(StudentError, match=r"kd_forward, mse_logits compare the teacher's token ids with the "
                                           r"student's"):
        _train(run_cfg(cache_dir, tmp_path / "c", [{**student(tokenizer=str(student_tok_dir))[0],
                                                    "losses": {"kd_forward": 1.0, "mse_logits": 1.0, "ce": 1.0}}]))
    with pytest.raises(StudentError, match=r"mutual_weight > 0 compares the students' distributions over one "
                                           r"vocabulary, but x has another tokenizer"):
        _train(run_cfg(cache_dir, tmp_path / "d", student(tokenizer=str(student_tok_dir))
                       + [{"name": "y", "arch": STUDENT_ARCH}], mutual_weight=0.5))
    with pytest.raises(ValidationError, match=r"from_teacher copies the teacher's embeddings"):
        run_cfg(cache_dir, tmp_path / "e", [{"name": "x", "from_teacher": 2, "tokenizer": str(student_tok_dir)}])


def test_corpus_files_are_not_the_student_tokenizers():
    """The student's tokenizer is trained on other files than the teacher's (the test would be weaker otherwise)."""
    assert not {"string.py", "calendar.py", "csv.py"} & set(CORPUS_FILES)


def test_teacher_nll_per_character_against_its_own_forward_pass(cache_dir, llama_dir):
    """The run's reference figure: the teacher's validation NLL per token and per character, checked against a
    float64 forward pass of the teacher and the characters of the decoded rows."""
    from pipeline.train.metrics import teacher_metrics

    c = Cache(cache_dir)
    tok = c.tokenizer()
    table = c.rows("validation")
    ids, lengths = row_column(table, "input_ids", np.int64), table.column("length").to_numpy()
    m = teacher_metrics(c, "validation", retokenized.teacher_chars(tok, ids, lengths))
    teacher = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()
    nll, n, chars = 0.0, 0, 0
    with torch.no_grad():
        for row, k in zip(ids, lengths):
            lp = torch.log_softmax(teacher(torch.from_numpy(row[None, :k])).logits[0], -1)
            nll -= lp[:-1].gather(-1, torch.from_numpy(row[1:k, None])).sum().item()
            n += k - 1
            chars += len(tok.decode(row[:k].tolist(), skip_special_tokens=True)) - \
                len(tok.decode(row[:1].tolist(), skip_special_tokens=True))
    assert m["tokens"] == n
    assert m["nll"] == pytest.approx(nll / n, rel=1e-4)
    assert m["nll_per_char"] == pytest.approx(nll / chars, rel=1e-4)


def test_text_that_spells_a_special_token_stays_text(tokenizer_dir, student_tok_dir):
    t_tok, s_tok = _toks(tokenizer_dir, student_tok_dir)
    ids = t_tok('x = "</s><pad>"')["input_ids"]
    row = crosstok.Retokenizer(t_tok, s_tok).row(ids)
    assert s_tok.eos_token_id not in row.student_ids.tolist() and s_tok.pad_token_id not in row.student_ids.tolist()
    assert s_tok.decode(row.student_ids.tolist()) == 'x = "</s><pad>"'


def test_a_dropped_special_token_leaves_the_position_before_it_unaligned(tokenizer_dir, student_tok_dir):
    t_tok, s_tok = _toks(tokenizer_dir, student_tok_dir)
    pad_t = t_tok.convert_tokens_to_ids("<|pad|>")
    retok = crosstok.Retokenizer(t_tok, s_tok)
    retok.specials[pad_t] = None  # as if the student had no counterpart
    a, b = t_tok("x = 1")["input_ids"], t_tok(" y")["input_ids"]
    row = retok.row(a + [pad_t] + b)
    al = crosstok.align(row.teacher_ends, row.student_ends)
    assert len(row.student_ids) == len(s_tok("x = 1 y")["input_ids"])
    assert len(a) - 1 not in al.tolist() and len(a) not in al.tolist()  # the one that predicted it, and itself
    assert al[-1] == len(a) + len(b)


def test_teacher_targets_land_on_the_aligned_student_positions(cache_dir, student_tok_dir, tmp_path):
    """The signal a cross-tokenizer student's terms read at student position s is the cached teacher's at
    position align[s], on every per-position field: top-K ids (B, L, K), hidden states (B, n, L, d) and attention
    maps on both their query and key axes (B, n, H, L, L)."""
    from pipeline.train.dataset import CacheBatches, make_loader
    from pipeline.train.signal import TeacherSignal

    c = Cache(cache_dir)
    rows = retokenized.stored_rows(c, "train", AutoTokenizer.from_pretrained(student_tok_dir), tmp_path, "s")
    batch = next(iter(make_loader(CacheBatches(c, "train", ["topk_ids", "hidden_states", "attentions"], 3))))
    view = rows.batch(batch["row"])
    dims = {f: list(spec.dims) for f, spec in c.manifest.fields.items()}
    sig = TeacherSignal(batch, torch.device("cpu")).aligned(view["align"], dims)
    al = view["align"]
    for b in range(al.shape[0]):
        for s in range(al.shape[1]):
            t = int(al[b, s])
            if t < 0:
                continue
            assert torch.equal(sig.field("topk_ids")[b, s], batch["topk_ids"][b, t])
            assert torch.equal(sig.field("hidden_states")[b, :, s], batch["hidden_states"][b, :, t])
            for s2 in range(al.shape[1]):
                if al[b, s2] >= 0:
                    assert torch.equal(sig.field("attentions")[b, :, :, s, s2],
                                       batch["attentions"][b, :, :, t, int(al[b, s2])])
    bits = batch["hidden_states"].view(torch.int16).view(torch.uint16)  # bfloat16 bits, as a bf16 cache stores them
    from pipeline.train.signal import gather_positions

    got = gather_positions(bits, al.clamp(min=0), [2])
    t0 = int(al[0, 0].clamp(min=0))
    assert got.dtype == torch.uint16 and torch.equal(got.view(torch.int16)[0, :, 0], bits.view(torch.int16)[0, :, t0])


@pytest.mark.slow
def test_a_cross_tokenizer_student_sharded_with_fsdp_matches_one_process(cache_dir, student_tok_dir, tmp_path):
    """parallel = fsdp on 2 ranks: a student with its own tokenizer (its re-tokenised rows, the vocabulary-mapped
    and ULD terms, hidden-state and attention terms) ends at the weights and metrics of one process with the same
    global batch."""
    from conftest import write_toml
    from test_distributed import DISTILL, torchrun

    students = [{"name": "x", "arch": STUDENT_ARCH, "tokenizer": str(student_tok_dir), "lr": 3e-3, "warmup_steps": 2,
                 "losses": {"ce": 0.5, "uld": 0.5, "kd_mapped": 0.5, "hidden_mse": 0.01, "attn_kl": 0.1},
                 "attention_heads": "mean"}]
    base = {"cache": str(cache_dir), "students": students, "batch_size": 2, "max_steps": 4, "eval_every": 2,
            "log_every": 1, "device": "cpu"}
    _train(run_cfg(cache_dir, tmp_path / "one", students, batch_size=2, max_steps=4, eval_every=2, log_every=1,
                   grad_accum=2))
    toml = write_toml(tmp_path / "s.toml", {**base, "output_dir": str(tmp_path / "two"), "parallel": "fsdp"})
    torchrun(2, "--no-python", DISTILL, "student", "-c", str(toml))
    one, two = (json.loads((tmp_path / d / "x" / "report.json").read_text()) for d in ("one", "two"))
    assert two["ranks"] == 2
    for k in ("nll", "nll_per_char", "kl", "aligned_share", "mapped_mass"):
        assert one["final"][k] == pytest.approx(two["final"][k], abs=1.5e-4), k
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d / "x" / "model").state_dict() for d in ("one", "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
