"""Linear CKA against a slow numpy reference (the Gram-matrix HSIC form) and its known properties."""
import numpy as np
import pytest
import torch

from kdistill.errors import PairingError
from kdistill.losses import LOSSES
from kdistill.losses.cka import linear_cka
from kdistill.models.arch import ModelInfo

rng = np.random.default_rng(0)


def hsic(k, l):
    """tr(K H L H) with H = I − 1/n, written out as in Kornblith et al. (2019), eq. 3, up to (n−1)²."""
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h)


def cka_reference(x, y):
    k, l = x @ x.T, y @ y.T  # linear kernels over the examples: a different route from the feature form
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_linear_cka_matches_the_gram_matrix_reference():
    for n, d1, d2 in ((10, 4, 7), (30, 16, 5), (6, 12, 12)):
        x, y = rng.normal(size=(n, d1)), rng.normal(size=(n, d2)) + 0.5 * rng.normal(size=(n, 1))
        assert linear_cka(x, y).item() == pytest.approx(cka_reference(x, y), rel=1e-10)
        got32 = linear_cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
        assert got32.dtype == torch.float32 and got32.item() == pytest.approx(cka_reference(x, y), rel=1e-5)


def test_linear_cka_properties():
    x = rng.normal(size=(40, 8))
    y = x @ rng.normal(size=(8, 6)) + 0.3 * rng.normal(size=(40, 6))
    base = linear_cka(x, y).item()
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-12)
    assert 0.0 < base < 1.0
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(x @ q, y).item() == pytest.approx(base, rel=1e-10)  # rotation of one side
    assert linear_cka(x, y * 1e4 + 3.0).item() == pytest.approx(base, rel=1e-10)  # scale and shift
    assert linear_cka(y, x).item() == pytest.approx(base, rel=1e-12)  # symmetric
    # ... but not invariant to any invertible map: stretching one axis changes it
    assert linear_cka(x * np.array([50.0] + [1.0] * 7), y).item() != pytest.approx(base, rel=1e-3)


def test_linear_cka_survives_huge_and_half_precision_activations_and_degenerate_input():
    x = torch.randn(64, 32) * 1e18  # fourth powers of these overflow float32 without the rescaling
    assert linear_cka(x, x).item() == pytest.approx(1.0, rel=1e-5)
    h = torch.randn(50, 16).half()
    assert linear_cka(h, h).dtype == torch.float32 and linear_cka(h, h).item() == pytest.approx(1.0, rel=1e-5)
    constant = torch.ones(10, 4, requires_grad=True)
    value = linear_cka(constant, torch.randn(10, 3))
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(constant.grad).all()


def test_linear_cka_refuses_mismatched_rows():
    with pytest.raises(ValueError, match="same rows"):
        linear_cka(np.zeros((5, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        linear_cka(np.ones((1, 3)), np.ones((1, 2)))


def info(layers=2, hidden=8, prefix=1, model_type="vit"):
    return ModelInfo(model_type=model_type, task="image-classification", num_layers=layers, hidden_size=hidden,
                     num_heads=2, num_kv_heads=2, head_dim=hidden // 2, vocab_size=None, is_decoder=False,
                     layers_path="vit.encoder.layer", pooling="cls", prefix_tokens=prefix)


def term(spec, s=None, t=None):
    cls = LOSSES.get(spec["type"])
    return cls(cls.Params.model_validate(spec), s or info(), t or info(), where="losses[0]")


B, P = 4, 9
PIXELS = {"pixel_values": torch.zeros(B, 1, 12, 12)}


def rows(x, keep):
    """The rows the term should use, picked out one by one."""
    return np.array([x[i, j].tolist() for i in range(x.shape[0]) for j in range(x.shape[1]) if keep(i, j)])


def test_cka_term_sums_one_minus_cka_over_layer_pairs_on_all_tokens():
    tm = term({"type": "cka", "layers": "uniform"}, info(layers=2, hidden=6), info(layers=4, hidden=8))
    assert tm.student_taps() == ["hidden_states[1]", "hidden_states[2]"]
    assert tm.teacher_taps() == ["hidden_states[2]", "hidden_states[4]"]
    assert tm.count(PIXELS) == B
    s = {f"hidden_states[{i}]": torch.randn(B, 1 + P, 6) for i in (1, 2)}
    t = {f"hidden_states[{i}]": torch.randn(B, 1 + P, 8) for i in (2, 4)}
    ref = sum(1 - cka_reference(rows(s[f"hidden_states[{a}]"], lambda i, j: True),
                                rows(t[f"hidden_states[{b}]"], lambda i, j: True)) for a, b in ((1, 2), (2, 4)))
    assert tm(s, t, PIXELS).item() == pytest.approx(ref, rel=1e-5)


def test_cka_term_cls_and_patches_across_vit_and_deit():
    s_info, t_info = info(hidden=6, prefix=1), info(hidden=8, prefix=2)
    s = {"hidden_states[2]": torch.randn(B, 1 + P, 6)}
    t = {"hidden_states[2]": torch.randn(B, 2 + P, 8)}
    patches = term({"type": "cka", "layers": "last", "tokens": "patches"}, s_info, t_info)(s, t, PIXELS)
    ref = 1 - cka_reference(rows(s["hidden_states[2]"], lambda i, j: j >= 1),  # each model's own prefix dropped
                            rows(t["hidden_states[2]"], lambda i, j: j >= 2))
    assert patches.item() == pytest.approx(ref, rel=1e-5)
    cls = term({"type": "cka", "layers": "last", "tokens": "cls"}, s_info, t_info)(s, t, PIXELS)
    ref = 1 - cka_reference(s["hidden_states[2]"][:, 0].numpy(), t["hidden_states[2]"][:, 0].numpy())
    assert cls.item() == pytest.approx(ref, rel=1e-5)
    with pytest.raises(PairingError, match=r"losses\[0\]\.tokens.*tokens: patches"):
        term({"type": "cka", "tokens": "all"}, s_info, t_info)


def test_cka_term_leaves_out_padding_tokens_of_text_models():
    bert = info(hidden=8, prefix=0, model_type="bert")
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    s, t = {"hidden_states[1]": torch.randn(3, 4, 8)}, {"hidden_states[1]": torch.randn(3, 4, 8)}
    got = term({"type": "cka", "layers": [[1, 1]]}, bert, bert)(s, t, {"input_ids": mask, "attention_mask": mask})
    ref = 1 - cka_reference(rows(s["hidden_states[1]"], lambda i, j: mask[i, j]),
                            rows(t["hidden_states[1]"], lambda i, j: mask[i, j]))
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_cka_term_is_zero_for_a_rotated_scaled_copy_and_errors_name_the_fix():
    tm = term({"type": "cka", "layers": [[2, 2]]}, info(hidden=8), info(hidden=8))
    x = torch.randn(B, 1 + P, 8)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert tm({"hidden_states[2]": x}, {"hidden_states[2]": 5 * x @ q}, PIXELS).item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(PairingError, match=r"losses\[0\]\.tokens.*40 all rows.*teacher 20"):
        tm({"hidden_states[2]": x}, {"hidden_states[2]": torch.randn(B, 5, 8)}, PIXELS)
    with pytest.raises(PairingError, match="teacher gave no hidden_states"):
        tm({"hidden_states[2]": x}, {}, PIXELS)


def test_cka_term_on_tiny_vits_matches_its_reference_and_trains_the_student(tiny_vits):
    (student, s_info, s_reader), (teacher, t_info, t_reader) = tiny_vits
    tm = term({"type": "cka"}, s_info, t_info)
    batch = {"pixel_values": torch.randn(4, 1, 16, 16), "labels": torch.tensor([0, 1, 2, 0])}
    with torch.no_grad():
        t = t_reader(batch, tm.teacher_taps())
    s = s_reader(batch, tm.student_taps())
    loss = tm(s, t, batch)
    assert torch.isfinite(loss) and 0 < loss.item() < 2  # two pairs, each 1 − CKA in [0, 1]
    # written out, not read from tm: the default uniform map pairs the 2-layer student's layers 1, 2 with the
    # 4-layer teacher's 2, 4, and tokens: all keeps every token of every image, CLS included
    ref = sum(1 - cka_reference(rows(s[f"hidden_states[{a}]"], lambda i, j: True),
                                rows(t[f"hidden_states[{b}]"], lambda i, j: True)) for a, b in ((1, 2), (2, 4)))
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    grads = [p.grad for p in student.get_submodule(s_info.layers_path).parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
