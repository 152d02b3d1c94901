"""skip_cls on the layer-wise feature, attention and relation terms, against independent references.

The references either run the same term with skip_cls off on inputs whose position-0 token / query
row has been cut out, or spell the loss out with explicit loops over the remaining rows."""
import math

import pytest
import torch
import yaml
from test_terms import kl, softmax  # the slow references the term tests use

from kdistill.config import load_recipe
from kdistill.errors import ConfigError, PairingError
from kdistill.losses import LOSSES
from kdistill.models.arch import ModelInfo

B, L, H = 3, 6, 2
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])  # padded, lengths 6 / 3 / 2
BATCH = {"attention_mask": MASK, "input_ids": torch.randint(0, 7, (B, L))}


def info(layers=2, hidden=8, heads=H, task="embedding"):
    return ModelInfo(model_type="bert", task=task, num_layers=layers, hidden_size=hidden, num_heads=heads,
                     num_kv_heads=heads, head_dim=hidden // heads, vocab_size=7, is_decoder=False,
                     layers_path="encoder.layer", pooling="mean")


def term(spec, s=None, t=None):
    cls = LOSSES.get(spec["type"])
    return cls(cls.Params.model_validate(spec), s or info(), t or info())


def cut_batch():
    """The batch with position 0 removed from every sequence."""
    return {"attention_mask": MASK[:, 1:], "input_ids": BATCH["input_ids"][:, 1:]}


def rows_after_cls():
    return [(b, i) for b in range(B) for i in range(1, L) if MASK[b, i]]


# ---------------------------------------------------------------- hidden states

@pytest.mark.parametrize("kind", ["hidden_mse", "hidden_cosine"])
def test_hidden_skip_cls_equals_the_term_on_sequences_without_position_0(kind):
    torch.manual_seed(0)
    s_info, t_info = info(hidden=6), info(layers=4, hidden=8)  # a projector, two layer pairs
    tm = term({"type": kind, "skip_cls": True}, s_info, t_info)
    ref_term = term({"type": kind}, s_info, t_info)
    ref_term.load_state_dict(tm.state_dict())  # the same projector
    s = {f"hidden_states[{i}]": torch.randn(B, L, 6) for i in (1, 2)}
    t = {f"hidden_states[{i}]": torch.randn(B, L, 8) for i in (2, 4)}
    loss = tm(s, t, BATCH)
    ref = ref_term({k: v[:, 1:] for k, v in s.items()}, {k: v[:, 1:] for k, v in t.items()}, cut_batch())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert loss.item() != pytest.approx(ref_term(s, t, BATCH).item(), rel=1e-3)  # position 0 did count before
    assert tm.count(BATCH) == len(rows_after_cls()) == int(MASK.sum()) - B
    assert ref_term.count(BATCH) == int(MASK.sum())


def test_hidden_mse_skip_cls_loop_reference():
    torch.manual_seed(1)
    tm = term({"type": "hidden_mse", "layers": "last", "skip_cls": True})
    s, t = {"hidden_states[2]": torch.randn(B, L, 8)}, {"hidden_states[2]": torch.randn(B, L, 8)}
    per = [((s["hidden_states[2]"][b, i] - t["hidden_states[2]"][b, i]) ** 2).mean().item() for b, i in rows_after_cls()]
    assert tm(s, t, BATCH).item() == pytest.approx(sum(per) / len(per), rel=1e-6)


@pytest.mark.parametrize("kind", ["hidden_mse", "hidden_cosine"])
def test_hidden_skip_cls_gives_position_0_no_gradient(kind):
    torch.manual_seed(2)
    tm = term({"type": kind, "layers": "last", "skip_cls": True})
    hs = torch.randn(B, L, 8, requires_grad=True)
    tm({"hidden_states[2]": hs}, {"hidden_states[2]": torch.randn(B, L, 8)}, BATCH).backward()
    assert torch.all(hs.grad[:, 0] == 0)
    assert torch.all(hs.grad[~MASK.bool()] == 0)  # padding, as before
    assert all(hs.grad[b, i].abs().sum() > 0 for b, i in rows_after_cls())
    plain = torch.randn(B, L, 8, requires_grad=True)
    term({"type": kind, "layers": "last"})({"hidden_states[2]": plain}, {"hidden_states[2]": torch.randn(B, L, 8)},
                                           BATCH).backward()
    assert torch.all(plain.grad[:, 0].abs().sum(-1) > 0)  # without skip_cls it does learn position 0


def test_hidden_skip_cls_without_attention_mask_and_leaves_the_batch_alone():
    torch.manual_seed(3)
    tm = term({"type": "hidden_mse", "layers": "last", "skip_cls": True})
    s, t = {"hidden_states[2]": torch.randn(B, L, 8)}, {"hidden_states[2]": torch.randn(B, L, 8)}
    loss = tm(s, t, {"input_ids": BATCH["input_ids"]})
    ref = ((s["hidden_states[2]"][:, 1:] - t["hidden_states[2]"][:, 1:]) ** 2).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    bool_mask = MASK.bool()
    tm(s, t, {"attention_mask": bool_mask})
    assert torch.equal(bool_mask, MASK.bool())  # the term's mask is a copy, never the batch's own


def test_hidden_skip_cls_refuses_taps_without_a_cls_position():
    with pytest.raises(PairingError, match="skip_cls"):
        term({"type": "hidden_cosine", "student_tap": "pooled", "teacher_tap": "pooled", "skip_cls": True})
    term({"type": "hidden_cosine", "student_tap": "pooled", "teacher_tap": "pooled"})  # fine without it
    cls_info = info(task="classification")
    tm = term({"type": "hidden_mse", "student_tap": "logits", "teacher_tap": "logits", "skip_cls": True},
              cls_info, cls_info)
    with pytest.raises(ValueError, match="skip_cls"):  # classifier logits: one vector per sequence
        tm({"logits": torch.randn(B, 4)}, {"logits": torch.randn(B, 4)}, BATCH)


# ---------------------------------------------------------------- attention maps

def random_attention():
    return torch.randn(B, H, L, L).masked_fill(~MASK.bool()[:, None, None, :], -1e9).softmax(-1)


def test_attention_kl_skip_cls_drops_row_0_keeps_column_0():
    torch.manual_seed(4)
    tm, ref_term = term({"type": "attention_kl", "skip_cls": True}), term({"type": "attention_kl"})
    s = {f"attentions[{i}]": random_attention() for i in (1, 2)}
    t = {f"attentions[{i}]": random_attention() for i in (1, 2)}
    loss = tm(s, t, BATCH)
    # rows 1.. over all L keys, unrenormalised: the same per-row values as without skip_cls
    ref = ref_term({k: v[:, :, 1:] for k, v in s.items()}, {k: v[:, :, 1:] for k, v in t.items()}, cut_batch())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert tm.count(BATCH) == int(MASK.sum()) - B


@pytest.mark.parametrize("spec, tap", [
    ({"type": "attention_mse"}, "attention_scores"),
    ({"type": "attention_mse", "target": "probs"}, "attentions"),
])
def test_attention_mse_skip_cls_drops_row_0_keeps_column_0(spec, tap):
    torch.manual_seed(4)
    tm = term({**spec, "skip_cls": True})
    make = random_attention if tap == "attentions" else (lambda: torch.randn(B, H, L, L))
    s = {f"{tap}[{i}]": make() for i in (1, 2)}
    t = {f"{tap}[{i}]": make() for i in (1, 2)}
    rows = []  # per real row after position 0: the squared error over that sequence's real keys, column 0 kept
    for b, i in rows_after_cls():
        keys = [j for j in range(L) if MASK[b, j]]
        for h in range(H):
            rows.append(sum(sum((s[f"{tap}[{n}]"][b, h, i, j] - t[f"{tap}[{n}]"][b, h, i, j]).item() ** 2
                                for j in keys) / len(keys) for n in (1, 2)))
    assert tm(s, t, BATCH).item() == pytest.approx(sum(rows) / len(rows), rel=1e-5)
    assert tm.count(BATCH) == int(MASK.sum()) - B


def test_attention_kl_skip_cls_loop_reference():
    torch.manual_seed(5)
    tm = term({"type": "attention_kl", "layers": "last", "skip_cls": True})
    s, t = {"attentions[2]": random_attention()}, {"attentions[2]": random_attention()}
    rows = []
    for b, i in rows_after_cls():
        for h in range(H):
            p, q = t["attentions[2]"][b, h, i].tolist(), s["attentions[2]"][b, h, i].tolist()
            rows.append(sum(a * math.log(a / max(c, 1e-12)) for a, c in zip(p, q) if a > 0))
    assert tm(s, t, BATCH).item() == pytest.approx(sum(rows) / len(rows), rel=1e-4)


def test_attention_skip_cls_without_attention_mask():
    torch.manual_seed(6)
    tm = term({"type": "attention_mse", "layers": "last", "skip_cls": True})
    s, t = {"attention_scores[2]": torch.randn(B, H, L, L)}, {"attention_scores[2]": torch.randn(B, H, L, L)}
    ref = ((s["attention_scores[2]"][:, :, 1:] - t["attention_scores[2]"][:, :, 1:]) ** 2).mean()
    assert tm(s, t, {"input_ids": BATCH["input_ids"]}).item() == pytest.approx(ref.item(), rel=1e-6)


# ---------------------------------------------------------------- self-relations

def relation_row(x, b, h, i):
    """softmax over the real keys j (position 0 included) of <x_i, x_j>/sqrt(d)."""
    real = int(MASK[b].sum())
    return softmax([(x[b, h, i] @ x[b, h, j]).item() / math.sqrt(x.shape[-1]) for j in range(real)])


def relation_reference(xs, xt, heads):
    rows = [kl(relation_row(xt, b, h, i), relation_row(xs, b, h, i)) for b, i in rows_after_cls() for h in range(heads)]
    return sum(rows) / len(rows)


def test_value_relation_skip_cls_loop_reference():
    torch.manual_seed(7)
    tm = term({"type": "value_relation", "skip_cls": True}, info(hidden=4), info(hidden=8))
    s, t = {"values[2]": torch.randn(B, H, L, 2)}, {"values[2]": torch.randn(B, H, L, 4)}
    loss = tm(s, t, BATCH)
    assert loss.item() == pytest.approx(relation_reference(s["values[2]"], t["values[2]"], H), rel=1e-4)
    assert loss.item() != pytest.approx(term({"type": "value_relation"}, info(hidden=4), info(hidden=8))(
        s, t, BATCH).item(), rel=1e-3)
    assert tm.count(BATCH) == int(MASK.sum()) - B


def test_qkv_relation_skip_cls_loop_reference():
    torch.manual_seed(8)
    tm = term({"type": "qkv_relation", "relations": ["q", "k", "v"], "relation_heads": 2, "skip_cls": True},
              info(hidden=4, heads=2), info(hidden=12, heads=3))
    names = ("queries[2]", "keys[2]", "values[2]")
    s = {n: torch.randn(B, 2, L, 2) for n in names}
    t = {n: torch.randn(B, 3, L, 4) for n in names}

    def resplit(x, r):
        b, h, length, d = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, length, h * d).reshape(b, length, r, h * d // r).permute(0, 2, 1, 3)

    ref = sum(relation_reference(resplit(s[n], 2), resplit(t[n], 2), 2) for n in names)
    assert tm(s, t, BATCH).item() == pytest.approx(ref, rel=1e-4)
    assert tm.count(BATCH) == int(MASK.sum()) - B


# ---------------------------------------------------------------- recipe schema

RECIPE = """
name: t
teacher: {model: "packaged:all-MiniLM-L6-v2"}
student: {from_teacher: {layers: [1, 3, 5]}}
data: {train: {source: stdlib-docstrings}}
losses:
  - {type: hidden_mse, layers: uniform, skip_cls: true}
  - {type: hidden_cosine, skip_cls: true}
  - {type: attention_kl, layers: last, skip_cls: true}
  - {type: attention_mse, skip_cls: true}
  - {type: value_relation, skip_cls: true}
  - {type: qkv_relation, relation_heads: 12, skip_cls: true}
train: {steps: 10}
output: runs/t
"""


def test_recipe_with_skip_cls_validates():
    losses = load_recipe(yaml.safe_load(RECIPE)).stages[0].losses
    assert [p.skip_cls for p in losses] == [True] * 6
    default = load_recipe(yaml.safe_load(RECIPE.replace(", skip_cls: true", ""))).stages[0].losses
    assert [p.skip_cls for p in default] == [False] * 6


def test_skip_cls_is_not_a_field_of_other_terms():
    raw = yaml.safe_load(RECIPE)
    raw["losses"] = [{"type": "embedding_cosine", "skip_cls": True}]
    with pytest.raises(ConfigError, match="skip_cls"):
        load_recipe(raw)


def test_center_subtracts_each_sequence_mean_over_compared_tokens():
    # slow reference: per sequence, the mean over real tokens (position 0 left out with skip_cls) removed
    # from both sides, then the plain MSE over those tokens
    from kdistill.losses.features import centred

    torch.manual_seed(0)
    x = torch.randn(3, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]).bool()
    out = centred(x, mask, "w", "t")
    for i in range(3):
        real = x[i][mask[i]]
        torch.testing.assert_close(out[i][mask[i]], real - real.mean(0))
    with pytest.raises(ValueError, match="nothing to centre"):
        centred(torch.randn(3, 4), None, "w", "t")


def test_layer_norm_compares_each_tokens_standardised_state_on_both_sides():
    # slow reference: per real token, (x - mean) / sqrt(var + 1e-5) over its features on each side, then the mean
    # over real tokens of the per-token mean squared difference
    torch.manual_seed(0)
    s, t = {"hidden_states[1]": torch.randn(B, L, 8)}, {"hidden_states[1]": 3 + 5 * torch.randn(B, L, 8)}
    got = term({"type": "hidden_mse", "layers": [[1, 1]], "projector": "none", "layer_norm": True})(s, t, BATCH)

    def standardised(v):
        mean = sum(v) / len(v)
        var = sum((a - mean) ** 2 for a in v) / len(v)
        return [(a - mean) / math.sqrt(var + 1e-5) for a in v]

    per = []
    for b in range(B):
        for i in range(L):
            if MASK[b, i]:
                xs = standardised(s["hidden_states[1]"][b, i].tolist())
                xt = standardised(t["hidden_states[1]"][b, i].tolist())
                per.append(sum((p - q) ** 2 for p, q in zip(xs, xt)) / 8)
    assert got.item() == pytest.approx(sum(per) / len(per), rel=1e-5)
    # a teacher state that is an affine copy of the student's, token by token, is at distance 0
    same = {"hidden_states[1]": 2 * s["hidden_states[1]"] + 7}
    assert term({"type": "hidden_mse", "layers": [[1, 1]], "projector": "none", "layer_norm": True})(
        s, same, BATCH).item() == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(PairingError, match=r"losses\.layer_norm.*'attentions\[1\]' holds no hidden states"):
        term({"type": "hidden_mse", "student_tap": "attentions[1]", "teacher_tap": "attentions[1]", "layer_norm": True})
