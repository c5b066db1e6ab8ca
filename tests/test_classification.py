"""Task-specific distillation: sequence- and token-classification teachers (an encoder, BERT, and a decoder,
Llama, both tiny and random-init), their cached class distributions against a float64 forward pass, the
classification loss terms against float64 references, students that learn, saved students that load with
the matching AutoModelFor... class and predict label names, the metrics against sklearn and seqeval, and
every refusal."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import (SEQ_LABELS, TOKEN_LABELS, capture, classification_settings, make_classifier, make_llama,
                      student_run)

from pipeline.errors import CaptureError
from pipeline.errors import DataError
from pipeline.format.layout import IGNORE_INDEX as IGNORE
from pipeline.config import TeacherCacheConfig
from pipeline.student_config import StudentRunConfig
from pipeline.format import Cache, row_column, verify
from pipeline.train import losses
from pipeline.train.metrics import entities, evaluate_all
from pipeline.format.layout import row_values
from pipeline.train.dataset import CacheBatches, make_loader
from pipeline.train.recipe import train_students
from pipeline.errors import StudentError

ARCH = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64}
CASES = [("bert", "sequence"), ("bert", "token"), ("llama", "sequence"), ("llama", "token")]


@pytest.fixture(scope="module")
def classifiers(tokenizer_dir, tmp_path_factory):
    """{(family, task): teacher folder}"""
    root = tmp_path_factory.mktemp("classifiers")
    return {(f, t): make_classifier(tokenizer_dir, root / f"{f}-{t}", f, t, SEQ_LABELS if t == "sequence"
                                    else TOKEN_LABELS) for f, t in CASES}


@pytest.fixture(scope="module")
def caches(classifiers, labelled, tmp_path_factory):
    """{(family, task): finished cache} with two hidden layers, one attention layer and T=2 captured."""
    root = tmp_path_factory.mktemp("class-caches")
    out = {}
    for (f, t), model in classifiers.items():
        cfg = classification_settings(model, labelled, root / f"{f}-{t}", t,
                                      capture={"hidden_layers": [1, -1], "attention_layers": [0], "temperatures": [2.0]})
        out[(f, t)] = capture(cfg).root
    return out


def _rows(cache: Cache, split: str):
    tab = cache.rows(split)
    ids = row_column(tab, "input_ids", np.int64)
    lengths = tab.column("length").to_numpy()
    return ids, lengths, row_values(tab, "labels", np.int64)


def _float64_forward(model_dir, task: str, ids, lengths):
    import transformers

    cls = transformers.AutoModelForSequenceClassification if task == "sequence" else \
        transformers.AutoModelForTokenClassification
    model = cls.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager").eval()
    mask = (np.arange(ids.shape[1])[None] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True,
                    output_attentions=True)
    return out, mask.astype(bool)


@pytest.mark.parametrize("family,task", CASES)
def test_cached_class_distribution_equals_the_teachers_float64_forward(caches, classifiers, family, task):
    cache = Cache(caches[(family, task)])
    assert verify(cache.root) == []
    m = cache.manifest
    assert m.task.type == f"{task}-classification"
    assert list(m.task.labels) == (SEQ_LABELS if task == "sequence" else TOKEN_LABELS)
    assert m.document["task"]["label2id"] == {n: i for i, n in enumerate(m.task.labels)}
    assert not {"topk_ids", "logsumexp"} & set(m.fields)  # next-token fields are not written
    assert m.task.bidirectional == (family == "bert")  # an encoder's attention maps are full rows
    assert m.preparation.raw["add_special_tokens"] is True
    ids, lengths, labels = _rows(cache, "validation")
    out, mask = _float64_forward(classifiers[(family, task)], task, ids, lengths)
    z = out.logits  # (B, C) or (B, L, C) float64
    ref_lp = torch.log_softmax(z, -1).numpy()
    ref_lse = torch.logsumexp(z, -1).numpy()
    ref_lse2 = torch.logsumexp(z / 2.0, -1).numpy()
    lp = cache.array("validation", "class_logprobs")[:]
    lse = cache.array("validation", "class_logsumexp")[:]
    lse2 = cache.array("validation", "class_logsumexp_tempered")[:][:, 0]
    if task == "token":
        lp, ref_lp, lse, ref_lse, lse2, ref_lse2 = lp[mask], ref_lp[mask], lse[mask], ref_lse[mask], lse2[mask], \
            ref_lse2[mask]
        assert labels.shape == ids.shape and set(np.unique(labels)) <= {IGNORE, *range(len(TOKEN_LABELS))}
        assert (labels[~mask] == IGNORE).all() and (labels[mask] != IGNORE).any()
    else:
        assert labels.shape == (len(ids),)
    np.testing.assert_allclose(lp, ref_lp, atol=2e-5, rtol=0)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=1e-6)
    np.testing.assert_allclose(lse2, ref_lse2, atol=2e-5, rtol=1e-6)
    # hidden states and attention maps as for a causal LM: the float64 forward's, at real positions
    hs = cache.array("validation", "hidden_states")[:].astype(np.float64)  # (N, 2, L, d)
    for j, layer in enumerate([1, len(out.hidden_states) - 1]):
        ref = out.hidden_states[layer].numpy()
        np.testing.assert_allclose(hs[:, j][mask], ref[mask], atol=2e-3 * np.abs(ref).max(), rtol=1e-2)
    att = cache.array("validation", "attentions")[:].astype(np.float64)[:, 0]  # (N, H, L, L)
    ref_att = out.attentions[0].numpy()
    both = mask[:, None, :, None] & mask[:, None, None, :]
    np.testing.assert_allclose(att[np.broadcast_to(both, att.shape)], ref_att[np.broadcast_to(both, att.shape)],
                               atol=2e-3)
    # the teacher's recorded accuracy is its argmax against these gold labels
    pred = ref_lp.argmax(-1)
    gold = labels[mask] if task == "token" else labels
    if task == "token":
        known = gold != IGNORE
        pred, gold = pred[known], gold[known]
    assert m.stats.teacher_accuracy["validation"] == pytest.approx(float((pred == gold).mean()), abs=1e-9)


def test_labels_follow_the_gold_column_by_name_and_each_words_first_token(caches, labelled):
    """Sequence labels are the rows' class names mapped to the teacher's ids; a token row labels the first token
    of each word, in word order, and nothing else."""
    docs = [json.loads(x) for x in labelled.read_text().splitlines()]
    cache = Cache(caches[("llama", "sequence")])
    tok = cache.tokenizer()
    by_text = {tuple(tok(d["text"], truncation=True, max_length=24)["input_ids"]): d["label"] for d in docs[:120]}
    ids, lengths, labels = _rows(cache, "train")
    names = list(cache.manifest.task.labels)
    for row, n, lab in zip(ids, lengths, labels):
        assert names[lab] == by_text[tuple(row[:n])]
    cache = Cache(caches[("llama", "token")])
    by_words = {tuple(tok(d["words"], is_split_into_words=True, truncation=True, max_length=24)["input_ids"]):
                d["tags"] for d in docs[:120]}
    ids, lengths, labels = _rows(cache, "train")
    names = list(cache.manifest.task.labels)
    for row, n, lab in zip(ids, lengths, labels):
        tags = by_words[tuple(row[:n])]
        got = [names[x] for x in lab[lab != IGNORE]]
        assert got == tags[: len(got)] and len(got) >= 1


# ---------------------------------------------------------------------------------------------
# the terms against float64 references


def _ref_kl(p_logits, q_logits, T):
    p = np.exp(p_logits / T - np.log(np.exp(p_logits / T).sum(-1, keepdims=True)))
    lp = np.log(p)
    lq = q_logits / T - np.log(np.exp(q_logits / T).sum(-1, keepdims=True))
    return (p * (lp - lq)).sum(-1)


@pytest.mark.parametrize("shape", [(6, 5), (3, 7, 4)])
@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_classification_losses_against_float64_references(shape, T):
    g = torch.Generator().manual_seed(0)
    t_logits = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    s_logits = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    mask = torch.rand(shape[:-1], generator=g) > 0.3
    mask.view(-1)[0] = True
    labels = torch.where(mask, labels, IGNORE)
    tz, sz, m = t_logits.numpy(), s_logits.numpy(), mask.numpy()
    t_lp = torch.log_softmax(t_logits, -1)
    lse = torch.logsumexp(t_logits, -1)
    # teacher at T: from the T=1 log-probs and logsumexp, with and without the captured tempered logsumexp
    ref_t = tz / T - np.log(np.exp(tz / T).sum(-1, keepdims=True))
    for lse_t in (None, torch.logsumexp(t_logits / T, -1)):
        np.testing.assert_allclose(losses.teacher_class_logprobs(t_lp, lse, T, lse_t).numpy(), ref_t, atol=1e-12)
    t_T = losses.teacher_class_logprobs(t_lp, lse, T)
    fwd = losses.class_divergence(t_T, s_logits, mask, T, "forward")
    rev = losses.class_divergence(t_T, s_logits, mask, T, "reverse")
    assert fwd.item() == pytest.approx(_ref_kl(tz, sz, T)[m].mean() * T**2, rel=1e-10)
    assert rev.item() == pytest.approx(_ref_kl(sz, tz, T)[m].mean() * T**2, rel=1e-10)
    beta = 0.3
    p, q = np.exp(ref_t), np.exp(sz / T - np.log(np.exp(sz / T).sum(-1, keepdims=True)))
    mix = beta * p + (1 - beta) * q
    ref_jsd = beta * (p * np.log(p / mix)).sum(-1) + (1 - beta) * (q * np.log(q / mix)).sum(-1)
    jsd = losses.class_divergence(t_T, s_logits, mask, T, "jsd", beta)
    assert jsd.item() == pytest.approx(ref_jsd[m].mean() * T**2, rel=1e-10)
    ce = losses.class_cross_entropy(s_logits, labels, mask)
    ls = sz - np.log(np.exp(sz).sum(-1, keepdims=True))
    gold = np.take_along_axis(ls, np.clip(labels.numpy(), 0, None)[..., None], -1)[..., 0]
    assert ce.item() == pytest.approx(-gold[m].mean(), rel=1e-10)
    mse = losses.mse_logits(t_logits, s_logits, mask)
    tc, sc = tz - tz.mean(-1, keepdims=True), sz - sz.mean(-1, keepdims=True)
    assert mse.item() == pytest.approx(((sc - tc) ** 2).mean(-1)[m].mean(), rel=1e-10)
    # gradients: KL's gradient in the student's logits is T (q - p) / count at each kept position
    s = s_logits.clone().requires_grad_(True)
    losses.class_divergence(t_T, s, mask, T, "forward").backward()
    ref_grad = T * (q - p) * m[..., None] / m.sum()
    np.testing.assert_allclose(s.grad.numpy(), ref_grad, atol=1e-12)


def test_attention_terms_of_an_encoder_cover_every_real_key():
    """On an encoder's maps (bidirectional), attn_kl is the KL of whole rows over the real keys and attn_mse the
    mean over every real (query, key) pair; on a decoder's, keys above the diagonal carry nothing."""
    g = torch.Generator().manual_seed(0)
    B, H, L = 2, 3, 5
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    key = mask[:, None, None, :]

    def rows(x):  # softmax over the real keys only
        return torch.softmax(torch.where(key, x, -torch.inf), -1).nan_to_num()

    a_t = rows(torch.randn(B, H, L, L, generator=g, dtype=torch.float64))
    a_s = rows(torch.randn(B, H, L, L, generator=g, dtype=torch.float64))
    t, s = a_t.numpy(), a_s.numpy()
    kl = (np.where(t > 0, t * (np.log(np.clip(t, 1e-300, None)) - np.log(np.clip(s, 1e-300, None))), 0)).sum(-1)
    q = np.broadcast_to(mask.numpy()[:, None, :], kl.shape)
    assert losses.attention_kl(a_t, a_s, mask, causal=False).item() == pytest.approx(kl[q].mean(), rel=1e-9)
    assert (kl[q] >= 0).all()
    pair = np.broadcast_to((mask[:, :, None] & mask[:, None, :])[:, None].numpy(), t.shape)
    assert losses.attention_mse(a_t, a_s, mask, causal=False).item() == pytest.approx(((s - t) ** 2)[pair].mean(),
                                                                                   rel=1e-9)
    causal_pair = pair & np.tril(np.ones((L, L), dtype=bool))
    assert losses.attention_mse(a_t, a_s, mask).item() == pytest.approx(((s - t) ** 2)[causal_pair].mean(), rel=1e-9)


def test_the_recipe_computes_each_term_on_a_cached_batch_as_the_references_do(caches):
    """step_losses on a real cached batch (float64 student logits from a fixed model) against the loss functions
    applied to the cached fields by hand."""
    from pipeline.student_config import StudentConfig
    from pipeline.train.step import step_losses

    cache = Cache(caches[("bert", "token")])
    ds = CacheBatches(cache, "train", ["class_logprobs", "class_logsumexp", "class_logsumexp_tempered"], 4,
                      shuffle=False, trim=True)
    batch = next(iter(make_loader(ds)))
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=512, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=len(TOKEN_LABELS), hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    model = transformers.BertForTokenClassification(cfg).double().eval()
    spec = StudentConfig(name="s", arch=ARCH, losses={"ce": 1.0, "kd_forward": 1.0, "kd_reverse": 1.0,
                                                      "mse_logits": 1.0}, temperature=2.0)
    values = step_losses(model, batch, spec, cache.manifest, torch.device("cpu"))
    real = torch.arange(batch["input_ids"].shape[1])[None] < batch["length"][:, None]
    logits = model(input_ids=batch["input_ids"], attention_mask=real.long()).logits
    labels = batch["labels"]
    lab = labels != IGNORE
    t_lp = batch["class_logprobs"].double()
    t_z = t_lp + batch["class_logsumexp"].double()[..., None]
    t2 = torch.log_softmax(t_z / 2.0, -1)
    ref = {"ce": losses.class_cross_entropy(logits, labels, lab),
           "kd_forward": losses.class_divergence(t2, logits, lab, 2.0, "forward"),
           "kd_reverse": losses.class_divergence(t2, logits, lab, 2.0, "reverse"),
           "mse_logits": losses.mse_logits(t_z, logits, lab)}
    for k, v in ref.items():
        assert values[k].item() == pytest.approx(v.item(), rel=1e-4), k
    assert batch["input_ids"].shape[1] == int(batch["length"].max())  # trimmed to the longest row


# ---------------------------------------------------------------------------------------------
# students


def _majority_share(cache: Cache, split: str) -> float:
    _, _, labels = _rows(cache, split)
    labels = labels[labels != IGNORE]
    return float(np.bincount(labels).max() / len(labels))


@pytest.mark.slow
@pytest.mark.parametrize("family,task", [("llama", "sequence"), ("bert", "token")])
def test_students_learn_save_and_predict_label_names(caches, family, task, tmp_path):
    """A CE student beats the majority class on validation, a KD student (of a random teacher) comes closer to
    the teacher than it; the saved model loads with the matching AutoModelFor... class, knows the label names,
    and a transformers pipeline predicts them; the test split is not used (this cache has none)."""
    import transformers

    cache = Cache(caches[(family, task)])
    students = [{"name": "kd", "arch": ARCH, "losses": {"kd_forward": 1.0, "hidden_mse": 0.1},
                 "temperature": 2.0, "lr": 5e-3, "warmup_steps": 2},
                {"name": "ce", "arch": ARCH, "losses": {"ce": 1.0}, "lr": 5e-3, "warmup_steps": 2}]
    cfg = student_run(cache.root, tmp_path, students=students, max_steps=60, eval_every=10,
                      early_stopping_metric="accuracy")
    kd, ce = train_students(cfg, log=lambda m: None, progress=False)
    chance = _majority_share(cache, "validation")
    assert ce["final"]["accuracy"] > chance + 0.05, (ce["final"], chance)
    if task == "token":  # the majority class (O) finds no entity at all
        assert ce["final"]["entity_f1"] > 0.2, ce["final"]
    assert kd["last_eval"]["kl"] < ce["last_eval"]["kl"] and \
        kd["last_eval"]["top1_agreement"] > ce["last_eval"]["top1_agreement"], (kd["last_eval"], ce["last_eval"])
    for r in (kd, ce):
        assert r["task"] == f"{task}-classification"
        assert {"macro_f1", "top1_agreement", "kl", "ece"} <= set(r["final"])
        assert ("entity_f1" in r["final"]) == (task == "token")
        assert "test" not in r
    auto = transformers.AutoModelForSequenceClassification if task == "sequence" else \
        transformers.AutoModelForTokenClassification
    saved = tmp_path / "kd" / "model"
    model = auto.from_pretrained(saved)
    names = list(cache.manifest.task.labels)
    assert [model.config.id2label[i] for i in range(len(names))] == names
    assert model.config.label2id == {n: i for i, n in enumerate(names)}
    pipe = transformers.pipeline("text-classification" if task == "sequence" else "token-classification",
                                 model=model, tokenizer=transformers.AutoTokenizer.from_pretrained(saved),
                                 device="cpu")
    out = pipe("import json\nfrom textwrap import dedent as Dedent")
    got = [out[0]["label"]] if task == "sequence" else [x["entity"] for x in out]
    assert got and set(got) <= set(names)
    # the saved weights are the best evaluation's: their validation metrics are the report's
    ds = CacheBatches(cache, "validation", ["class_logprobs"], 4, shuffle=False, trim=True)
    again = evaluate_all({"m": model.float()}, make_loader(ds), torch.device("cpu"), task=cache.manifest.task)["m"]
    assert again["accuracy"] == pytest.approx(kd["final"]["accuracy"], abs=1e-9)


def test_from_teacher_student_and_the_test_split(classifiers, labelled, tmp_path):
    """A student copied from the teacher's layers (head included) starts where the teacher is; dataset splits
    become cache splits (a train row equal to a test row leaves train) and the best model is tested on 'test'."""
    docs = [json.loads(x) for x in labelled.read_text().splitlines()][:150]
    files = {}
    for name, part in (("train", docs[:100] + docs[120:125]), ("validation", docs[100:120]), ("test", docs[120:150])):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(d) + "\n" for d in part))
    model = classifiers[("llama", "sequence")]
    cfg = classification_settings(model, labelled, tmp_path / "c", "sequence",
                                  data={"data_files": {k: [str(v)] for k, v in files.items()},
                                        "splits": {"validation": "validation", "test": "test"},
                                        "max_documents": None})
    result = capture(cfg)
    cache = Cache(result.root)
    assert sorted(cache.splits) == ["test", "train", "validation"]
    stats = result.manifest.dataset["statistics"]
    assert stats["train_rows_in_held_out_splits_dropped"] >= 4  # docs[120:125] are test rows too
    assert result.manifest.preparation.raw["splits"] == {"validation": "validation", "test": "test"}
    train_keys = set(cache.rows("train").column("key").to_pylist())
    assert not train_keys & set(cache.rows("test").column("key").to_pylist())
    run = StudentRunConfig.model_validate({
        "cache": str(cache.root), "output_dir": str(tmp_path / "s"), "batch_size": 4, "max_steps": 2,
        "eval_every": 1, "device": "cpu", "early_stopping_metric": "macro_f1",
        "students": [{"name": "copy", "from_teacher": [0, 1, 2], "losses": {"kd_forward": 1.0}, "lr": 1e-9,
                      "warmup_steps": 1}]})
    report = train_students(run, log=lambda m: None, progress=False)[0]
    # all three layers and the head copied, no learning (lr 1e-9): the student is the teacher
    assert report["final"]["top1_agreement"] == 1.0 and report["final"]["kl"] < 1e-6
    assert report["test"]["top1_agreement"] == 1.0
    assert report["test"]["accuracy"] == pytest.approx(result.manifest.stats.teacher_accuracy["test"], abs=1e-9)
    lines = [json.loads(x) for x in (tmp_path / "s" / "copy" / "metrics.jsonl").read_text().splitlines()]
    assert [x["split"] for x in lines].count("test") == 1


# ---------------------------------------------------------------------------------------------
# metrics against the reference implementations


class _Fixed(torch.nn.Module):
    """A 'model' that returns given logits for the rows of each batch (by their row index)."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.calls = logits, 0

    def forward(self, input_ids, attention_mask=None):
        out = self.logits[self.calls]
        self.calls += 1
        return type("Out", (), {"logits": out[:, : input_ids.shape[1]] if out.ndim == 3 else out})()


def test_metrics_match_sklearn_and_seqeval(caches):
    from seqeval.metrics import f1_score as entity_f1
    from sklearn.metrics import accuracy_score, f1_score

    for task in ("sequence", "token"):
        cache = Cache(caches[("bert", task)])
        ds = CacheBatches(cache, "validation", ["class_logprobs"], 5, shuffle=False, trim=True)
        batches = list(make_loader(ds))
        g = torch.Generator().manual_seed(1)
        C = len(list(cache.manifest.task.labels))
        logits = [torch.randn(*b["class_logprobs"].shape[:-1], C, generator=g) * 2 for b in batches]
        m = evaluate_all({"m": _Fixed(logits)}, batches, torch.device("cpu"), task=cache.manifest.task)["m"]
        names = list(cache.manifest.task.labels)
        golds, preds, gold_seqs, pred_seqs = [], [], [], []
        for b, z in zip(batches, logits):
            lab = b["labels"]
            p = z.argmax(-1)
            if task == "sequence":
                golds += lab.tolist()
                preds += p.tolist()
                continue
            for i in range(len(lab)):
                keep = lab[i] != IGNORE
                gold_seqs.append([names[x] for x in lab[i][keep].tolist()])
                pred_seqs.append([names[x] for x in p[i][keep].tolist()])
                golds += lab[i][keep].tolist()
                preds += p[i][keep].tolist()
        assert m["accuracy"] == pytest.approx(accuracy_score(golds, preds), abs=1e-12)
        assert m["macro_f1"] == pytest.approx(f1_score(golds, preds, average="macro"), abs=1e-12)
        assert m["examples"] == len(golds)
        if task == "token":
            assert m["entity_f1"] == pytest.approx(entity_f1(gold_seqs, pred_seqs), abs=1e-12)


def test_entity_chunks_match_seqeval_on_random_tag_sequences():
    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-LOC", "S-PER"]
    for _ in range(2000):
        seq = [rng.choice(tags) for _ in range(rng.randint(0, 12))]
        assert entities(seq) == set(get_entities(seq)), seq
    assert entities(["B-PER", "I-PER", "O", "I-LOC", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4)}


# ---------------------------------------------------------------------------------------------
# refusals


def test_refusals_at_capture(classifiers, labelled, llama_dir, corpus, tmp_path):
    seq = classifiers[("bert", "sequence")]
    with pytest.raises(DataError, match="label column 'gold' not in dataset.*need their gold labels"):
        capture(classification_settings(seq, labelled, tmp_path / "a", "sequence", data={"label_column": "gold"}))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f"text number {i}", "label": ["def", "lambda", 7][i % 3]}) + "\n"
                             for i in range(30)))
    with pytest.raises(DataError, match=r"20 labels are not in the teacher's label set \['def', 'import', 'other'\]"
                                        r".*'lambda' \(x10\), 7 \(x10\)"):
        capture(classification_settings(seq, other, tmp_path / "b", "sequence"))
    assert not (tmp_path / "b" / "manifest.json").exists()
    with pytest.raises(CaptureError, match="set teacher.task = 'sequence-classification'"):
        capture(classification_settings(seq, labelled, tmp_path / "c", "sequence", teacher={"task": "causal-lm"},
                                        data={"packing": False}))
    with pytest.raises(CaptureError, match="head would be initialised at random"):
        capture(classification_settings(llama_dir, labelled, tmp_path / "d", "sequence"))
    with pytest.raises(CaptureError, match="head would be initialised at random"):  # sequence head, token task
        capture(classification_settings(seq, labelled, tmp_path / "e", "token"))
    import transformers

    masked = tmp_path / "masked-lm"  # a pretrained encoder without a classification head
    transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=512, hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32)
                                 ).save_pretrained(masked)
    transformers.AutoTokenizer.from_pretrained(seq).save_pretrained(masked)
    with pytest.raises(CaptureError, match="is a BertForMaskedLM, not a sequence-classification checkpoint"):
        capture(classification_settings(masked, labelled, tmp_path / "h", "sequence"))
    with pytest.raises(ValueError, match="data_files must name each split's files"):
        TeacherCacheConfig.model_validate(classification_settings(seq, labelled, tmp_path / "i", "sequence",
                                                                  data={"splits": {"test": "test"}}))
    with pytest.raises(ValueError, match="data.packing must be false"):
        TeacherCacheConfig.model_validate(classification_settings(seq, labelled, tmp_path / "f", "sequence",
                                                                  data={"packing": True}))
    with pytest.raises(ValueError, match="capture.samples: next-token target modes"):
        TeacherCacheConfig.model_validate(classification_settings(seq, labelled, tmp_path / "g", "sequence",
                                                                  capture={"samples": 8}))


def test_refusals_of_students(caches, classifiers, tokenizer_dir, tmp_path):
    seq_cache = caches[("bert", "sequence")]

    def run(students, **kw):
        return train_students(student_run(seq_cache, tmp_path / "out", students=students, max_steps=1, **kw),
                              log=lambda m: None, progress=False)

    with pytest.raises(StudentError, match="task 'token-classification', but the cache holds a sequence-class"):
        run([{"name": "s", "arch": ARCH, "losses": {"ce": 1.0}, "task": "token-classification"}])
    with pytest.raises(StudentError, match="kd_sampled is a next-token term; a sequence-classification cache "
                                           "trains with ce, kd_forward"):
        run([{"name": "s", "arch": ARCH, "losses": {"ce": 1.0, "kd_sampled": 1.0}}])
    with pytest.raises(StudentError, match="early_stopping_metric = 'entity_f1' is not a metric of a sequence"):
        run([{"name": "s", "arch": ARCH, "losses": {"ce": 1.0}}], early_stopping_metric="entity_f1")
    # a pretrained classifier with other labels, and a token classifier for a sequence cache
    other = make_classifier(tokenizer_dir, tmp_path / "other", "bert", "sequence", ["a", "b", "c"])
    with pytest.raises(StudentError, match=r"classifies into \['a', 'b', 'c'\], the cache's teacher into "
                                           r"\['def', 'import', 'other'\]"):
        run([{"name": "s", "pretrained": str(other), "losses": {"ce": 1.0}}])
    with pytest.raises(StudentError, match="is a token-classification checkpoint"):
        run([{"name": "s", "pretrained": str(classifiers[("bert", "token")]), "losses": {"ce": 1.0}}])
    # the same labels load (a classifier of the cache's task and labels), and so does a causal LM checkpoint,
    # which gets a new head for the cache's labels
    lm = make_llama(tokenizer_dir, tmp_path / "lm")
    llama_cache = caches[("llama", "sequence")]
    for src in (classifiers[("llama", "sequence")], lm):
        train_students(student_run(llama_cache, tmp_path / f"ok-{src.name}", students=[
            {"name": "s", "pretrained": str(src), "losses": {"ce": 1.0}}], max_steps=1), log=lambda m: None,
            progress=False)
    # two caches of different tasks in one run
    with pytest.raises(StudentError, match="the caches of one run must share the task, its labels and the id"):
        train_students(StudentRunConfig.model_validate({
            "sources": [{"name": "a", "cache": str(seq_cache)}, {"name": "b", "cache": str(caches[("bert", "token")])}],
            "output_dir": str(tmp_path / "mix"), "device": "cpu", "max_steps": 1,
            "students": [{"name": "s", "arch": ARCH, "losses": {"ce": 1.0}}]}), log=lambda m: None, progress=False)


def test_the_trainer_loss_refuses_a_classifier_of_other_labels(caches, tokenizer_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from pipeline.errors import DistillError
    from pipeline.train.hf import CacheDataset, collate

    ds = CacheDataset(str(caches[("bert", "sequence")]), "train", {"ce": 1.0})
    two = AutoModelForSequenceClassification.from_pretrained(
        make_classifier(tokenizer_dir, tmp_path / "two", "bert", "sequence", ["a", "b"]))
    with pytest.raises(DistillError, match=r"the model has 2 labels, the cache's sequence-classification teacher 3"):
        ds.loss(two, collate([ds[0], ds[1]]))


@pytest.mark.slow
def test_an_encoder_classifier_sharded_with_fsdp_matches_one_process(caches, tmp_path):
    """parallel = fsdp on 2 ranks shards a token-classification student (each encoder layer, then the embeddings
    and the classification head): with the same global batch it ends at the weights and metrics of one process,
    and its model/ loads as a plain token classifier with the same weights."""
    import transformers
    from conftest import write_toml
    from test_distributed import DISTILL, torchrun

    cache = Cache(caches[("bert", "token")])
    students = [{"name": "kd", "arch": ARCH, "losses": {"kd_forward": 1.0, "ce": 0.5, "hidden_mse": 0.1},
                 "temperature": 2.0, "lr": 5e-3, "warmup_steps": 2}]
    base = {"cache": str(cache.root), "students": students, "batch_size": 2, "max_steps": 4, "eval_every": 2,
            "log_every": 1, "device": "cpu", "early_stopping_metric": "accuracy"}
    train_students(StudentRunConfig.model_validate({**base, "output_dir": str(tmp_path / "one"), "grad_accum": 2}),
                   log=lambda m: None, progress=False)
    toml = write_toml(tmp_path / "s.toml", {**base, "output_dir": str(tmp_path / "two"), "parallel": "fsdp"})
    torchrun(2, "--no-python", DISTILL, "student", "-c", str(toml))
    one, two = (json.loads((tmp_path / d / "kd" / "report.json").read_text()) for d in ("one", "two"))
    assert two["ranks"] == 2 and one["best_step"] == two["best_step"]
    for k in ("accuracy", "macro_f1", "entity_f1", "kl", "nll"):
        assert one["final"][k] == pytest.approx(two["final"][k], abs=1.5e-4), k
    a, b = (transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / d / "kd" / "model").state_dict()
            for d in ("one", "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
