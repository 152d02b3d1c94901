"""DKD, CLKD and Sinkhorn against slow references written out here with Python floats."""
import math

import pytest
import torch

from kdistill.losses import LOSSES
from kdistill.losses import functional as fn
from kdistill.models.arch import ModelInfo

torch.manual_seed(0)


def softmax(row, tau=1.0):
    m = max(x / tau for x in row)
    e = [math.exp(x / tau - m) for x in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def dkd_reference(s_row, t_row, target, alpha, beta, tau):
    p, q = softmax(t_row, tau), softmax(s_row, tau)
    tckd = kl([p[target], 1 - p[target]], [q[target], 1 - q[target]])
    p_rest = [x / (1 - p[target]) for i, x in enumerate(p) if i != target]
    q_rest = [x / (1 - q[target]) for i, x in enumerate(q) if i != target]
    return alpha * tckd + beta * kl(p_rest, q_rest)


def test_dkd_matches_the_reference_per_position_with_mask():
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6) * 2
    targets = torch.randint(0, 6, (2, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]]).bool()
    got = fn.dkd(s, t, targets, alpha=0.5, beta=8.0, temperature=2.0, mask=mask)
    rows = [dkd_reference(s[b, i].tolist(), t[b, i].tolist(), int(targets[b, i]), 0.5, 8.0, 2.0)
            for b in range(2) for i in range(4) if mask[b, i]]
    assert got.item() == pytest.approx(sum(rows) / len(rows), rel=1e-5)


def test_dkd_is_zero_for_identical_models_and_tckd_plus_nckd_relate_to_kl():
    z = torch.randn(5, 7)
    targets = torch.randint(0, 7, (5,))
    assert fn.dkd(z, z, targets).item() == pytest.approx(0.0, abs=1e-6)
    # DKD's decomposition: KL = TCKD + (1 - p_target) * NCKD, so alpha=1, beta=1 bounds KL from above
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    assert fn.dkd(s, t, targets, 1.0, 1.0).item() >= fn.kl_div(s, t).item() - 1e-6


def clkd_reference(s, t, tau, wc, wr):
    n, c = len(s), len(s[0])
    instance = sum(kl(softmax(t[i], tau), softmax(s[i], tau)) for i in range(n)) / n
    cols_s = [[s[i][k] for i in range(n)] for k in range(c)]
    cols_t = [[t[i][k] for i in range(n)] for k in range(c)]
    per_class = sum(kl(softmax(cols_t[k], tau), softmax(cols_s[k], tau)) for k in range(c)) / c

    def corr(cols):
        normed = []
        for col in cols:
            mean = sum(col) / n
            centred = [x - mean for x in col]
            norm = math.sqrt(sum(x * x for x in centred))
            normed.append([x / norm for x in centred])
        return [[sum(a * b for a, b in zip(u, v)) for v in normed] for u in normed]

    cs, ct = corr(cols_s), corr(cols_t)
    correlation = sum((ct[i][j] - cs[i][j]) ** 2 for i in range(c) for j in range(c)) / (c * c)
    return instance + wc * per_class + wr * correlation


def test_clkd_matches_the_reference_on_the_unmasked_rows():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    got = fn.clkd(s, t, temperature=2.0, class_weight=0.5, correlation_weight=2.0, mask=mask)
    rows_s = [s[b, i].tolist() for b in range(2) for i in range(3) if mask[b, i]]
    rows_t = [t[b, i].tolist() for b in range(2) for i in range(3) if mask[b, i]]
    assert got.item() == pytest.approx(clkd_reference(rows_s, rows_t, 2.0, 0.5, 2.0), rel=1e-5)
    z = torch.randn(4, 5)
    assert fn.clkd(z, z).item() == pytest.approx(0.0, abs=1e-6)


def sinkhorn_reference(s, t, tau, eps, iterations):
    """Sinkhorn's original scaling iterations in probability space (not log space)."""
    p = [softmax(r, tau) for r in t]
    q = [softmax(r, tau) for r in s]
    n = len(p)
    cost = [[sum((a - b) ** 2 for a, b in zip(p[i], q[j])) for j in range(n)] for i in range(n)]
    kernel = [[math.exp(-cost[i][j] / eps) for j in range(n)] for i in range(n)]
    u, v = [1.0] * n, [1.0] * n
    for _ in range(iterations):
        u = [(1 / n) / sum(kernel[i][j] * v[j] for j in range(n)) for i in range(n)]
        v = [(1 / n) / sum(kernel[i][j] * u[i] for i in range(n)) for j in range(n)]
    return sum(u[i] * kernel[i][j] * v[j] * cost[i][j] for i in range(n) for j in range(n))


def test_sinkhorn_matches_the_scaling_iterations_and_has_gradients():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6) * 2
    got = fn.sinkhorn(s, t, temperature=1.0, epsilon=0.05, iterations=30)
    assert got.item() == pytest.approx(sinkhorn_reference(s.tolist(), t.tolist(), 1.0, 0.05, 30), rel=1e-4)
    got.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    z = torch.randn(4, 6)
    far = fn.sinkhorn(torch.randn(4, 6) * 3, z, epsilon=0.01, iterations=50)
    assert fn.sinkhorn(z, z, epsilon=0.01, iterations=50).item() < far.item()


def info(task, vocab=6):
    return ModelInfo(model_type="bert", task=task, num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=2,
                     head_dim=4, vocab_size=vocab, is_decoder=task == "causal-lm", layers_path="encoder.layer",
                     pooling="mean")


def make(spec, task):
    cls = LOSSES.get(spec["type"])
    return cls(cls.Params.model_validate(spec), info(task), info(task))


def test_dkd_term_on_a_causal_lm_scores_next_tokens_and_adds_ce():
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    batch = {"input_ids": torch.randint(0, 6, (2, 4)), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    term = make({"type": "dkd", "temperature": 2.0, "ce_weight": 0.0}, "causal-lm")
    got = term({"logits": s}, {"logits": t}, batch)
    rows = [dkd_reference(s[b, i].tolist(), t[b, i].tolist(), int(batch["input_ids"][b, i + 1]), 1.0, 8.0, 2.0)
            for b in range(2) for i in range(3) if batch["attention_mask"][b, i + 1]]
    assert got.item() == pytest.approx(4.0 * sum(rows) / len(rows), rel=1e-5)
    assert term.count(batch) == len(rows)


def test_structure_terms_on_a_classifier():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3),
             "labels": torch.tensor([0, 2, 5, 1])}
    dkd = make({"type": "dkd", "temperature": 2.0, "alpha": 0.5, "beta": 3.0, "ce_weight": 0.3}, "classification")
    ce = torch.nn.functional.cross_entropy(s, batch["labels"]).item()
    rows = [dkd_reference(s[i].tolist(), t[i].tolist(), int(batch["labels"][i]), 0.5, 3.0, 2.0) for i in range(4)]
    expected = 4.0 * sum(rows) / 4 + 0.3 * ce  # τ² on the KD part only
    assert dkd({"logits": s}, {"logits": t}, batch).item() == pytest.approx(expected, rel=1e-4)
    clkd = make({"type": "clkd", "temperature": 2.0, "class_weight": 0.5, "correlation_weight": 3.0}, "classification")
    # τ² scales the two tempered KLs only: the correlation matrices are of the raw logits
    kls = clkd_reference(s.tolist(), t.tolist(), 2.0, 0.5, 0.0)
    correlation = clkd_reference(s.tolist(), t.tolist(), 2.0, 0.0, 1.0) - clkd_reference(s.tolist(), t.tolist(), 2.0, 0.0, 0.0)
    expected = 4.0 * kls + 3.0 * correlation
    assert clkd({"logits": s}, {"logits": t}, batch).item() == pytest.approx(expected, rel=1e-5)
    sink = make({"type": "sinkhorn", "temperature": 2.0, "epsilon": 0.2, "iterations": 7}, "classification")
    expected = sinkhorn_reference(s.tolist(), t.tolist(), 2.0, 0.2, 7)
    assert sink({"logits": s}, {"logits": t}, batch).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("spec", [{"type": "dkd", "temperature": 2.0, "ce_weight": 0.5},
                                  {"type": "logit_kd", "temperature": 1.0, "alpha": 0.3},
                                  {"type": "cross_entropy"}, {"type": "taid"},
                                  {"type": "sinkhorn", "epsilon": 0.5}, {"type": "clkd"}])
def test_a_loss_mask_scores_only_its_positions(spec):
    """data.loss_on: completion (and generated batches): positions outside the loss_mask change nothing."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    batch = {"input_ids": torch.randint(0, 6, (2, 5)), "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
             "loss_mask": torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]).bool()}
    term = make(spec, "causal-lm")
    got = term({"logits": s}, {"logits": t}, batch)
    moved = s.clone()
    moved[~batch["loss_mask"]] += 5 * torch.randn(int((~batch["loss_mask"]).sum()), 6)
    assert term({"logits": moved}, {"logits": t}, batch).item() == pytest.approx(got.item(), rel=1e-6)
    inside = s.clone()
    inside[0, 2] += 5 * torch.randn(6)
    assert term({"logits": inside}, {"logits": t}, batch).item() != pytest.approx(got.item(), rel=1e-3)
    assert term.count(batch) == 4
