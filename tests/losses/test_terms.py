"""Each registered term against a slow reference written out here with explicit loops."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from kdistill.errors import PairingError
from kdistill.losses import LOSSES
from kdistill.models.arch import ModelInfo

torch.manual_seed(0)
B, L, V = 2, 5, 7


def info(layers=2, hidden=8, heads=2, task="embedding", vocab=V):
    return ModelInfo(model_type="bert", task=task, num_layers=layers, hidden_size=hidden, num_heads=heads,
                     num_kv_heads=heads, head_dim=hidden // heads, vocab_size=vocab, is_decoder=task == "causal-lm",
                     layers_path="encoder.layer", pooling="mean")


def term(spec, s=None, t=None):
    cls = LOSSES.get(spec["type"])
    return cls(cls.Params.model_validate(spec), s or info(), t or info())


MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
BATCH = {"attention_mask": MASK, "input_ids": torch.randint(0, V, (B, L))}


def real_positions():
    return [(b, i) for b in range(B) for i in range(L) if MASK[b, i]]


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_logit_kd_token_level_with_temperature_and_hard_labels():
    s, t = torch.randn(B, L, V), torch.randn(B, L, V)
    tau, alpha = 2.0, 0.3
    lm = info(task="causal-lm")
    loss = term({"type": "logit_kd", "temperature": tau, "alpha": alpha}, lm, lm)({"logits": s}, {"logits": t}, BATCH)
    soft = [kl(softmax((t[b, i] / tau).tolist()), softmax((s[b, i] / tau).tolist())) for b, i in real_positions()]
    ce, n = 0.0, 0
    for b in range(B):
        for i in range(L - 1):
            if MASK[b, i + 1]:
                ce -= math.log(softmax(s[b, i].tolist())[BATCH["input_ids"][b, i + 1]])
                n += 1
    ref = (1 - alpha) * tau**2 * sum(soft) / len(soft) + alpha * ce / n
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_logit_kd_sequence_level_classification():
    s, t = torch.randn(B, 4), torch.randn(B, 4)
    labels = torch.tensor([1, 3])
    cls = info(task="classification")
    loss = term({"type": "logit_kd", "temperature": 1.0, "alpha": 0.5}, cls, cls)(
        {"logits": s}, {"logits": t}, {**BATCH, "labels": labels})
    soft = sum(kl(softmax(t[b].tolist()), softmax(s[b].tolist())) for b in range(B)) / B
    hard = -sum(math.log(softmax(s[b].tolist())[labels[b]]) for b in range(B)) / B
    assert loss.item() == pytest.approx(0.5 * soft + 0.5 * hard, rel=1e-5)


@pytest.mark.parametrize("divergence", ["skew_kl", "skew_reverse_kl", "generalized_jsd"])
def test_logit_kd_passes_its_skew_and_beta_to_the_divergence(divergence):
    s, t = torch.randn(B, 4), torch.randn(B, 4)
    cls = info(task="classification")
    spec = {"type": "logit_kd", "temperature": 2.0, "divergence": divergence, "skew": 0.3, "beta": 0.2}
    loss = term(spec, cls, cls)({"logits": s}, {"logits": t}, BATCH)
    rows = []
    for b in range(B):
        p, q = softmax((t[b] / 2).tolist()), softmax((s[b] / 2).tolist())  # teacher p, student q

        def mix(w, x, y):
            return [w * a + (1 - w) * c for a, c in zip(x, y)]
        rows.append({"skew_kl": kl(p, mix(0.3, p, q)), "skew_reverse_kl": kl(q, mix(0.3, q, p)),
                     # GKD: β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), m = β·p + (1 − β)·q
                     "generalized_jsd": 0.2 * kl(p, mix(0.2, p, q)) + 0.8 * kl(q, mix(0.2, p, q))}[divergence])
    assert loss.item() == pytest.approx(4.0 * sum(rows) / B, rel=1e-4)


def stored_top(t, k):
    from kdistill.teachers.cached import SparseLogits

    logprobs = torch.log_softmax(t, -1)
    top, indices = logprobs.topk(k, -1)
    return SparseLogits(top, indices, torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7)), temperature=1.0)


def test_logit_kd_uniform_tail_from_a_store_is_tinyvits_target():
    s, t, k = torch.randn(B, V), torch.randn(B, V), 3
    cls = info(task="classification")
    stored = stored_top(t, k)
    loss = term({"type": "logit_kd", "temperature": 1.0, "tail": "uniform"}, cls, cls)({"logits": s}, {"logits": stored}, BATCH)
    ref = 0.0
    for b in range(B):  # TinyViT (Wu et al. 2022, sec. 3.1): the top k as stored, the rest of the mass shared evenly
        p = softmax(t[b].tolist())
        kept = set(stored.indices[b].tolist())
        rest = (1 - sum(p[c] for c in kept)) / (V - k)
        target = [p[c] if c in kept else rest for c in range(V)]
        ref += kl(target, softmax(s[b].tolist())) / B
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    bucket = term({"type": "logit_kd", "temperature": 1.0}, cls, cls)({"logits": s}, {"logits": stored}, BATCH)
    assert bucket.item() < loss.item()  # one bucket loses how the tail is spread: a lower bound


def test_logit_kd_from_a_store_at_a_temperature_is_the_dense_term():
    # a store made at tau = 2 keeping all classes but one, whose bucket then holds exactly that one: the term is
    # tau^2 * KL(softmax(t / 2) || softmax(s / 2)), as with the live teacher
    from kdistill.teachers.cached import SparseLogits

    s, t, tau = torch.randn(B, V), torch.randn(B, V), 2.0
    logprobs = torch.log_softmax(t / tau, -1)
    top, indices = logprobs.topk(V - 1, -1)
    left = logprobs.topk(V, -1).values[:, -1]  # the one class the store leaves in its bucket
    stored = SparseLogits(top, indices, left, temperature=tau)
    cls = info(task="classification")
    loss = term({"type": "logit_kd", "temperature": tau}, cls, cls)({"logits": s}, {"logits": stored}, BATCH)
    ref = sum(kl(softmax((t[b] / tau).tolist()), softmax((s[b] / tau).tolist())) for b in range(B)) / B
    assert loss.item() == pytest.approx(tau**2 * ref, rel=1e-5)


def test_hard_label_items_of_a_causal_batch_are_the_scored_next_tokens():
    # position i predicts token i + 1: a sequence of n real tokens scores n - 1 (accumulation weights by this)
    lm = info(task="causal-lm")
    assert term({"type": "cross_entropy"}, lm, lm).count(BATCH) == (5 - 1) + (3 - 1)
    generated = {**BATCH, "loss_mask": torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])}  # positions scored
    assert term({"type": "cross_entropy"}, lm, lm).count(generated) == 2 + 2


def test_logit_kd_uniform_tail_refuses_a_sampled_store():
    s, t = torch.randn(B, V), torch.randn(B, V)
    cls = info(task="classification")
    stored = stored_top(t, 3)
    stored.sampled = True
    with pytest.raises(PairingError, match="tail: uniform"):
        term({"type": "logit_kd", "temperature": 1.0, "tail": "uniform"}, cls, cls)({"logits": s}, {"logits": stored}, BATCH)


def test_logit_kd_refuses_different_vocabularies():
    with pytest.raises(PairingError, match="vocabulary"):
        term({"type": "logit_kd"}, info(task="causal-lm", vocab=7), info(task="causal-lm", vocab=9))


def test_hidden_mse_uniform_map_with_projector():
    s_info, t_info = info(layers=2, hidden=6, heads=2), info(layers=4, hidden=8, heads=2)
    tm = term({"type": "hidden_mse"}, s_info, t_info)
    assert tm.student_taps() == ["hidden_states[1]", "hidden_states[2]"]
    assert tm.teacher_taps() == ["hidden_states[2]", "hidden_states[4]"]
    s = {f"hidden_states[{i}]": torch.randn(B, L, 6) for i in (1, 2)}
    t = {f"hidden_states[{i}]": torch.randn(B, L, 8) for i in (2, 4)}
    loss = tm(s, t, BATCH)
    W, bias = tm.projector.weight, tm.projector.bias
    ref = 0.0
    for a, b in ((1, 2), (2, 4)):
        per = []
        for bb, i in real_positions():
            proj = W @ s[f"hidden_states[{a}]"][bb, i] + bias
            per.append(((proj - t[f"hidden_states[{b}]"][bb, i]) ** 2).mean().item())
        ref += sum(per) / len(per)
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_hidden_mse_without_projector_refuses_other_widths():
    with pytest.raises(PairingError, match="projector"):
        term({"type": "hidden_mse", "projector": "none"}, info(hidden=16), info(hidden=8))


def test_hidden_cosine_on_named_taps():
    tm = term({"type": "hidden_cosine", "student_tap": "hidden_states[-1]", "teacher_tap": "hidden_states[1]"})
    s = {"hidden_states[2]": torch.randn(B, L, 8)}
    t = {"hidden_states[1]": torch.randn(B, L, 8)}
    loss = tm(s, t, BATCH)
    per = [1 - F.cosine_similarity(s["hidden_states[2]"][b, i], t["hidden_states[1]"][b, i], dim=0).item()
           for b, i in real_positions()]
    assert loss.item() == pytest.approx(sum(per) / len(per), rel=1e-5)


def test_unknown_tap_in_a_term():
    # refused on reading the term's parameters (a pydantic ValidationError), before any model is paired
    with pytest.raises(ValueError, match="did you mean 'hidden_states'"):
        term({"type": "hidden_mse", "student_tap": "hiden_states[1]", "teacher_tap": "hidden_states[1]"})


@pytest.mark.parametrize("student_tap, teacher_tap", [("pooled", "hidden_states[2]"), ("attentions[1]", "hidden_states[2]"),
                                                      ("queries[1]", "hidden_states[2]"), ("hidden_states[1]", "values[1]")])
def test_taps_of_different_kinds_are_refused_by_name(student_tap, teacher_tap):
    # an attention map against hidden states broadcast into a loss of nothing; the others failed inside torch
    with pytest.raises(PairingError, match=rf"student_tap '{re.escape(student_tap)}' and teacher_tap .* different kinds"):
        term({"type": "hidden_mse", "student_tap": student_tap, "teacher_tap": teacher_tap})


def test_taps_of_one_kind_pair_and_a_projector_only_maps_hidden_states():
    term({"type": "hidden_mse", "student_tap": "hidden_states[1]", "teacher_tap": "embeddings"})
    narrow, wide = info(hidden=4), info(hidden=8)
    assert term({"type": "hidden_mse", "student_tap": "patches[1]", "teacher_tap": "hidden_states[2]"},
                narrow, wide).projector is not None
    assert term({"type": "hidden_mse", "student_tap": "lm_head", "teacher_tap": "lm_head"}, narrow, wide).projector
    # maps and predictions have no hidden width: no projector, whatever the widths (the loss compares them as they are)
    assert term({"type": "hidden_mse", "student_tap": "attentions[1]", "teacher_tap": "attentions[2]"},
                narrow, wide).projector is None
    cls = info(task="classification")
    deit = term({"type": "hidden_mse", "student_tap": "logits", "teacher_tap": "logits"}, cls, cls)
    assert deit.projector is None
    with pytest.raises(PairingError, match=r"projector: a projector maps hidden states between widths, and "
                                           r"attentions taps are no hidden states; leave projector at auto"):
        term({"type": "hidden_mse", "student_tap": "attentions[1]", "teacher_tap": "attentions[2]",
              "projector": "linear"})


def random_attention():
    a = torch.randn(B, 2, L, L).masked_fill(~MASK.bool()[:, None, None, :], -1e9).softmax(-1)
    return a


def test_attention_kl_per_real_query_row():
    tm = term({"type": "attention_kl", "layers": "last"})
    s, t = {"attentions[2]": random_attention()}, {"attentions[2]": random_attention()}
    loss = tm(s, t, BATCH)
    rows = [kl(t["attentions[2]"][b, h, i].tolist(), s["attentions[2]"][b, h, i].tolist())
            for b, i in real_positions() for h in range(2)]
    assert loss.item() == pytest.approx(sum(rows) / len(rows), rel=1e-4)


def test_attention_kl_needs_equal_heads():
    with pytest.raises(PairingError, match="qkv_relation"):
        term({"type": "attention_kl"}, info(heads=2), info(heads=4))


def test_attention_mse_on_scores():
    tm = term({"type": "attention_mse", "layers": [[1, 2]]})
    assert tm.student_taps() == ["attention_scores[1]"]
    s, t = {"attention_scores[1]": torch.randn(B, 2, L, L)}, {"attention_scores[2]": torch.randn(B, 2, L, L)}
    loss = tm(s, t, BATCH)
    rows = [((s["attention_scores[1]"][b, h, i] - t["attention_scores[2]"][b, h, i]) ** 2)[MASK[b].bool()].mean().item()
            for b, i in real_positions() for h in range(2)]  # over the real keys only
    assert loss.item() == pytest.approx(sum(rows) / len(rows), rel=1e-5)


def test_attention_mse_is_the_same_however_far_the_batch_pads():
    """Padding keys are 0 in both maps (taps.py): padding a sequence further must not shrink its loss, or
    two processes (or accumulated micro-batches), each padded to its own longest sequence, would differ from
    one batch."""
    tm = term({"type": "attention_mse", "layers": [[1, 1]]})
    torch.manual_seed(3)
    s, t = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)

    def padded(x, n):
        out = torch.zeros(1, 2, n, n)
        out[..., :3, :3] = x
        return out

    batch = {"attention_mask": torch.ones(1, 3, dtype=torch.long)}
    wide = {"attention_mask": torch.tensor([[1, 1, 1, 0, 0]])}
    short = tm({"attention_scores[1]": s}, {"attention_scores[1]": t}, batch)
    long = tm({"attention_scores[1]": padded(s, 5)}, {"attention_scores[1]": padded(t, 5)}, wide)
    assert long.item() == pytest.approx(short.item(), rel=1e-6)
    assert short.item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)


def relation_rows(x, b, h, i, real):
    """softmax over real keys j of <x_i, x_j>/sqrt(d) for one head: the MiniLM relation."""
    d = x.shape[-1]
    return softmax([(x[b, h, i] @ x[b, h, j]).item() / math.sqrt(d) for j in range(real)])


def test_value_relation_reference():
    s_info, t_info = info(hidden=4, heads=2), info(hidden=8, heads=2)  # different head widths are fine
    tm = term({"type": "value_relation"}, s_info, t_info)
    s, t = {"values[2]": torch.randn(B, 2, L, 2)}, {"values[2]": torch.randn(B, 2, L, 4)}
    loss = tm(s, t, BATCH)
    rows = []
    for b, i in real_positions():
        real = int(MASK[b].sum())
        for h in range(2):
            rows.append(kl(relation_rows(t["values[2]"], b, h, i, real), relation_rows(s["values[2]"], b, h, i, real)))
    assert loss.item() == pytest.approx(sum(rows) / len(rows), rel=1e-4)


def test_qkv_relation_resplits_heads_across_widths():
    s_info, t_info = info(hidden=4, heads=2), info(hidden=12, heads=3)
    tm = term({"type": "qkv_relation", "relations": ["q", "v"], "relation_heads": 2}, s_info, t_info)
    s = {"queries[2]": torch.randn(B, 2, L, 2), "values[2]": torch.randn(B, 2, L, 2)}
    t = {"queries[2]": torch.randn(B, 3, L, 4), "values[2]": torch.randn(B, 3, L, 4)}
    loss = tm(s, t, BATCH)

    def resplit(x, r):
        b, h, length, d = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, length, h * d).reshape(b, length, r, h * d // r).permute(0, 2, 1, 3)

    ref = 0.0
    for name in ("queries[2]", "values[2]"):
        xs, xt = resplit(s[name], 2), resplit(t[name], 2)
        rows = []
        for b, i in real_positions():
            real = int(MASK[b].sum())
            for h in range(2):
                rows.append(kl(relation_rows(xt, b, h, i, real), relation_rows(xs, b, h, i, real)))
        ref += sum(rows) / len(rows)
    assert loss.item() == pytest.approx(ref, rel=1e-4)


def test_qkv_relation_refuses_heads_that_do_not_divide():
    with pytest.raises(PairingError, match="relation_heads"):
        term({"type": "qkv_relation", "relation_heads": 5}, info(hidden=8), info(hidden=8))


def test_embedding_cosine_and_mse():
    s, t = {"pooled": torch.randn(B, 8)}, {"pooled": torch.randn(B, 8)}
    cos = term({"type": "embedding_cosine"})(s, t, BATCH)
    ref = sum(1 - F.cosine_similarity(s["pooled"][b], t["pooled"][b], dim=0).item() for b in range(B)) / B
    assert cos.item() == pytest.approx(ref, rel=1e-5)
    mse = term({"type": "embedding_mse", "scale": 3.0})(s, t, BATCH)
    ref = sum(((3 * s["pooled"][b] - 3 * t["pooled"][b]) ** 2).mean().item() for b in range(B)) / B
    assert mse.item() == pytest.approx(ref, rel=1e-5)
    assert term({"type": "embedding_cosine"}).count(BATCH) == B


def test_cross_entropy_and_mlm_counts():
    cls = info(task="classification")
    ce = term({"type": "cross_entropy"}, cls, cls)
    s = torch.randn(B, 3)
    labels = torch.tensor([0, 2])
    ref = -sum(math.log(softmax(s[b].tolist())[labels[b]]) for b in range(B)) / B
    assert ce({"logits": s}, {}, {**BATCH, "labels": labels}).item() == pytest.approx(ref, rel=1e-5)
    mlm_info = info(task="masked-lm")
    mlm = term({"type": "mlm"}, mlm_info, mlm_info)
    mlm_labels = torch.full((B, L), -100)
    mlm_labels[0, 1], mlm_labels[1, 2] = 3, 4
    logits = torch.randn(B, L, V)
    ref = -(math.log(softmax(logits[0, 1].tolist())[3]) + math.log(softmax(logits[1, 2].tolist())[4])) / 2
    batch = {**BATCH, "mlm_labels": mlm_labels}
    assert mlm({"logits": logits}, {}, batch).item() == pytest.approx(ref, rel=1e-5)
    assert mlm.count(batch) == 2


def test_mlm_needs_a_masked_lm_student():
    with pytest.raises(PairingError, match="masked-LM"):
        term({"type": "mlm"})
