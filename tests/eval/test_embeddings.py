import math

import numpy as np
import pytest
import torch

from kdistill.errors import PairingError
from kdistill.eval.embeddings import encode, encode_speed, fidelity, mean_cosine


# ---------------------------------------------------------------- slow references


def ref_cosine(a, b):
    total = 0.0
    for x, y in zip(a.tolist(), b.tolist()):
        dot = sum(p * q for p, q in zip(x, y))
        total += dot / (math.sqrt(sum(p * p for p in x)) * math.sqrt(sum(q * q for q in y)))
    return total / len(a)


def ref_similarities(e):
    rows = e.tolist()
    norm = [math.sqrt(sum(v * v for v in r)) for r in rows]
    n = len(rows)
    return [[sum(p * q for p, q in zip(rows[i], rows[j])) / (norm[i] * norm[j]) for j in range(n)]
            for i in range(n)]


def ref_ranks(values):
    # Average ranks for ties, as Spearman's definition asks.
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return np.array(ranks)


def ref_spearman(a, b):
    sa, sb = ref_similarities(a), ref_similarities(b)
    n = len(sa)
    xs = [sa[i][j] for i in range(n) for j in range(i + 1, n)]
    ys = [sb[i][j] for i in range(n) for j in range(i + 1, n)]
    rx, ry = ref_ranks(xs), ref_ranks(ys)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / math.sqrt((rx * rx).sum() * (ry * ry).sum()))


def ref_recall(a, b, k):
    sa, sb = ref_similarities(a), ref_similarities(b)
    n = len(sa)
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        top_a = set(sorted(others, key=lambda j: -sa[i][j])[:k])
        top_b = set(sorted(others, key=lambda j: -sb[i][j])[:k])
        total += len(top_a & top_b) / k
    return total / n


# ---------------------------------------------------------------- fidelity


@pytest.mark.parametrize("k", [3, 10])
def test_fidelity_matches_slow_references(k):
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 6, generator=gen)
    student = teacher + 0.7 * torch.randn(16, 6, generator=gen)
    got = fidelity(student, teacher, k=k)
    assert got["cosine"] == pytest.approx(ref_cosine(student, teacher), abs=1e-6)
    assert got["spearman"] == pytest.approx(ref_spearman(student, teacher), abs=1e-6)
    assert got[f"recall_at_{k}"] == pytest.approx(ref_recall(student, teacher, k), abs=1e-9)
    assert got["n"] == 16


def test_identical_embeddings_are_perfectly_faithful():
    emb = torch.randn(15, 8, generator=torch.Generator().manual_seed(1))
    got = fidelity(emb, emb.clone())
    assert got["cosine"] == pytest.approx(1.0)
    assert got["spearman"] == pytest.approx(1.0)
    assert got["recall_at_10"] == pytest.approx(1.0)


def test_different_widths_skip_only_cosine():
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(12, 4, generator=gen), torch.randn(12, 9, generator=gen)
    with pytest.raises(PairingError, match="cosine needs equal widths"):
        mean_cosine(student, teacher)
    got = fidelity(student, teacher, k=5)
    assert got["cosine"] is None and "equal widths" in got["cosine_error"]
    assert got["spearman"] == pytest.approx(ref_spearman(student, teacher), abs=1e-6)
    assert got["recall_at_5"] == pytest.approx(ref_recall(student, teacher, 5))


def test_fidelity_edge_cases():
    with pytest.raises(PairingError, match="same texts"):
        fidelity(torch.randn(3, 4), torch.randn(4, 4))
    tiny = fidelity(torch.randn(2, 4), torch.randn(2, 4))
    assert tiny["spearman"] is None  # one pair: no ranking to correlate
    assert tiny["recall_at_10"] is None  # every other text is among the 10 nearest: nothing measured
    assert fidelity(torch.randn(11, 4), torch.randn(11, 4))["recall_at_10"] is None
    assert fidelity(torch.randn(12, 4), torch.randn(12, 4))["recall_at_10"] is not None


# ---------------------------------------------------------------- encode


@pytest.fixture(scope="module")
def bert(make_bert):
    from transformers import AutoModel, AutoTokenizer

    path = make_bert(0)
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_encode_batches_equal_single_texts(bert, texts):
    model, tok = bert
    batched = encode(model, tok, texts, "mean", batch_size=5, max_length=32)
    assert batched.shape == (len(texts), 32) and batched.dtype == torch.float32
    with torch.no_grad():
        for i in (0, 3, 11):  # padding must not leak into the mean
            enc = tok(texts[i], return_tensors="pt")
            alone = model(**enc).last_hidden_state.mean(1)[0]
            assert torch.allclose(batched[i], alone, atol=1e-5)


def test_encode_cls_and_last_pooling(bert, texts):
    model, tok = bert
    cls = encode(model, tok, texts[:4], "cls", batch_size=4, max_length=32)
    last = encode(model, tok, texts[:4], "last", batch_size=4, max_length=32)
    with torch.no_grad():
        enc = tok(texts[1], return_tensors="pt")
        hidden = model(**enc).last_hidden_state[0]
    assert torch.allclose(cls[1], hidden[0], atol=1e-5)
    assert torch.allclose(last[1], hidden[-1], atol=1e-5)


def test_encode_model_with_head_uses_hidden_states(classifier_dir, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    clf = AutoModelForSequenceClassification.from_pretrained(classifier_dir)
    tok = AutoTokenizer.from_pretrained(classifier_dir)
    with_head = encode(clf, tok, texts[:6], "mean", batch_size=4, max_length=32)
    bare = encode(clf.bert, tok, texts[:6], "mean", batch_size=4, max_length=32)
    assert torch.allclose(with_head, bare, atol=1e-6)


def test_encode_speed_is_positive(bert, texts):
    model, tok = bert
    assert encode_speed(model, tok, texts, "mean", batch_size=4, max_length=32, repeats=1) > 0
