"""kdistill.losses.functional against slow references written out with plain Python floats."""

import math

import pytest
import torch
from torch.testing import assert_close

from kdistill.losses import functional as kd

# ---- slow references: one position at a time, float64 Python arithmetic ---------------------


def softmax(row, temperature=1.0):
    scaled = [x / temperature for x in row]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def mix(w, a, b):
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


def jsd(beta, p, q):
    m = mix(beta, p, q)
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def reference(row_fn, student, teacher, mask=None):
    """Mean of row_fn(student_row, teacher_row) over the kept positions."""
    lead = student.shape[:-1]
    keep = torch.ones(lead, dtype=torch.bool) if mask is None else torch.broadcast_to(mask, lead)
    rows = zip(student.double().reshape(-1, student.shape[-1]).tolist(),
               teacher.double().reshape(-1, teacher.shape[-1]).tolist(), keep.reshape(-1).tolist())
    values = [row_fn(s, t) for s, t, k in rows if k]
    return torch.tensor(sum(values) / len(values) if values else 0.0, dtype=torch.float32)


# name, function, extra kwargs, reference over (p = teacher probs, q = student probs)
DISTRIBUTION_CASES = [
    ("kl", kd.kl_div, {}, lambda p, q: kl(p, q)),
    ("reverse_kl", kd.reverse_kl, {}, lambda p, q: kl(q, p)),
    ("js", kd.js_div, {}, lambda p, q: jsd(0.5, p, q)),
    ("gjsd", kd.generalized_jsd, {"beta": 0.3}, lambda p, q: jsd(0.3, p, q)),
    ("tvd", kd.tvd, {}, lambda p, q: 0.5 * sum(abs(x - y) for x, y in zip(p, q))),
    ("skew_kl", kd.skew_kl, {"alpha": 0.2}, lambda p, q: kl(p, mix(0.2, p, q))),
    ("skew_reverse_kl", kd.skew_reverse_kl, {"alpha": 0.2}, lambda p, q: kl(q, mix(0.2, q, p))),
    ("soft_ce", kd.soft_cross_entropy, {}, lambda p, q: -sum(x * math.log(y) for x, y in zip(p, q) if x > 0)),
]
SHAPES = [((4, 5), None), ((2, 3, 5), (2, 3)), ((2, 2, 3, 3), (2, 1, 3))]  # last: attention maps
# Functions that stay finite when the teacher puts zero mass somewhere (reverse KL is infinite there).
ZERO_MASS_SAFE = ["kl", "js", "gjsd", "tvd", "skew_kl", "skew_reverse_kl", "soft_ce"]


def randn(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def random_mask(shape, seed=1):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask.view(-1)[0] = True
    return mask


def pair(shape, seed=0, scale=3.0):
    return randn(*shape, seed=seed, scale=scale), randn(*shape, seed=seed + 100, scale=scale)


def all_divergences():
    """Every logits function with its parameters, including generalized_jsd's special points."""
    cases = [(name, fn, {}) for name, fn in kd.DIVERGENCES.items()]
    return cases + [(f"gjsd_{b}", kd.generalized_jsd, {"beta": b}) for b in (0.0, 0.3, 0.5, 1.0)]


# ---- golden values ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,mask_shape", SHAPES)
@pytest.mark.parametrize("name,fn,kwargs,row_ref", DISTRIBUTION_CASES, ids=[c[0] for c in DISTRIBUTION_CASES])
def test_matches_reference(name, fn, kwargs, row_ref, shape, mask_shape):
    student, teacher = pair(shape)
    mask = None if mask_shape is None else random_mask(mask_shape)
    expected = reference(lambda s, t: row_ref(softmax(t, 2.0), softmax(s, 2.0)), student, teacher, mask)
    assert_close(fn(student, teacher, temperature=2.0, mask=mask, **kwargs), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,mask_shape", SHAPES)
def test_logits_mse_matches_reference(shape, mask_shape):
    student, teacher = pair(shape)
    mask = None if mask_shape is None else random_mask(mask_shape)
    row_ref = lambda s, t: sum(((a - b) / 2.0) ** 2 for a, b in zip(s, t)) / len(s)  # noqa: E731
    assert_close(kd.logits_mse(student, teacher, 2.0, mask), reference(row_ref, student, teacher, mask))


def test_feature_losses_match_reference():
    student, teacher = pair((2, 3, 6))
    mask = random_mask((2, 3))
    student[0, 0] = 0.0  # a zero vector: cosine treats it as orthogonal

    def cosine_distance(s, t):
        dot, ns, nt = sum(a * b for a, b in zip(s, t)), math.hypot(*s), math.hypot(*t)
        return 1.0 - (dot / (ns * nt) if ns > 0 and nt > 0 else 0.0)

    mse = lambda s, t: sum((a - b) ** 2 for a, b in zip(s, t)) / len(s)  # noqa: E731
    assert_close(kd.masked_mse(student, teacher, mask), reference(mse, student, teacher, mask))
    assert_close(kd.masked_cosine_distance(student, teacher, mask),
                 reference(cosine_distance, student, teacher, mask))


def test_kl_div_probs_matches_reference_with_zero_probabilities():
    scores_s, scores_t = pair((2, 2, 3, 4))
    scores_t[..., -1] = float("-inf")  # a causal/padding mask: teacher puts exactly 0 there
    scores_s[0, 0, 0] = torch.tensor([0.0, 0.0, -1e4, 0.0])  # a student 0 where the teacher has mass
    student, teacher = scores_s.softmax(-1), scores_t.softmax(-1)
    mask = random_mask((2, 1, 3))
    eps = 1e-12
    row_ref = lambda s, t: sum(b * math.log(b / max(a, eps)) for a, b in zip(s, t) if b > 0)  # noqa: E731
    assert_close(kd.kl_div_probs(student, teacher, mask, eps=eps), reference(row_ref, student, teacher, mask))


def test_kl_div_gradient_is_q_minus_p():
    student, teacher = pair((3, 5))
    student.requires_grad_(True)
    kd.kl_div(student, teacher, temperature=2.0).backward()
    expected = (student.detach().div(2).softmax(-1) - teacher.div(2).softmax(-1)) / 2.0 / 3
    assert_close(student.grad, expected)


def test_extreme_logits_golden_values():
    student = torch.tensor([[1e4, 0.0]])
    teacher = torch.tensor([[0.0, 1e4]])
    assert_close(kd.kl_div(student, teacher), torch.tensor(1e4))
    assert_close(kd.reverse_kl(student, teacher), torch.tensor(1e4))
    assert_close(kd.tvd(student, teacher), torch.tensor(1.0))
    assert_close(kd.js_div(student, teacher), torch.tensor(math.log(2)))


# ---- masks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,fn,kwargs", all_divergences(), ids=[c[0] for c in all_divergences()])
def test_mask_selects_positions(name, fn, kwargs):
    student, teacher = pair((2, 3, 5))
    mask = random_mask((2, 3))
    value = fn(student, teacher, mask=mask, **kwargs)
    changed_s, changed_t = student.clone(), teacher.clone()
    changed_s[~mask] = 50.0 * randn(int((~mask).sum()), 5, seed=7)
    changed_t[~mask] = torch.tensor([1e4, -math.inf, 0.0, 3.0, -math.inf])  # inf-valued padding
    assert_close(fn(changed_s, changed_t, mask=mask, **kwargs), value)
    assert_close(fn(student[mask], teacher[mask], **kwargs), value)
    assert_close(fn(student, teacher, mask=mask.int(), **kwargs), value)  # any 0/1 dtype works


@pytest.mark.parametrize("name,fn,kwargs", all_divergences(), ids=[c[0] for c in all_divergences()])
def test_empty_mask_gives_zero_with_graph(name, fn, kwargs):
    student, teacher = pair((2, 3, 5))
    student.requires_grad_(True)
    value = fn(student, teacher, mask=torch.zeros(2, 3, dtype=torch.bool), **kwargs)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.all(student.grad == 0)


def test_empty_mask_feature_losses():
    student, teacher = pair((2, 3, 4))
    student.requires_grad_(True)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for fn in (kd.masked_mse, kd.masked_cosine_distance, kd.kl_div_probs):
        value = fn(student.softmax(-1), teacher.softmax(-1), empty)
        assert value.item() == 0.0 and value.requires_grad


def test_mask_that_does_not_broadcast_is_rejected():
    student, teacher = pair((2, 3, 5))
    with pytest.raises(ValueError, match="does not broadcast"):
        kd.kl_div(student, teacher, mask=torch.ones(2, 3, 5, dtype=torch.bool))


# ---- identities and properties ------------------------------------------------------------------


@pytest.mark.parametrize("name,fn,kwargs", all_divergences(), ids=[c[0] for c in all_divergences()])
def test_temperature_divides_both_logits(name, fn, kwargs):
    student, teacher = pair((2, 3, 5))
    assert_close(fn(student, teacher, temperature=3.0, **kwargs), fn(student / 3.0, teacher / 3.0, **kwargs))


def test_generalized_jsd_special_points():
    student, teacher = pair((2, 3, 5))
    assert_close(kd.generalized_jsd(student, teacher, beta=0.0), kd.kl_div(student, teacher), rtol=0, atol=0)
    assert_close(kd.generalized_jsd(student, teacher, beta=1.0), kd.reverse_kl(student, teacher), rtol=0, atol=0)
    assert_close(kd.generalized_jsd(student, teacher, beta=0.5), kd.js_div(student, teacher), rtol=0, atol=0)
    # β weights the teacher: swapping the roles maps β to 1 − β.
    assert_close(kd.generalized_jsd(student, teacher, beta=0.2), kd.generalized_jsd(teacher, student, beta=0.8))


def test_skew_endpoints():
    student, teacher = pair((2, 3, 5))
    assert_close(kd.skew_kl(student, teacher, alpha=0.0), kd.kl_div(student, teacher))
    assert_close(kd.skew_reverse_kl(student, teacher, alpha=0.0), kd.reverse_kl(student, teacher))
    assert kd.skew_kl(student, teacher, alpha=1.0).item() == 0.0
    assert kd.skew_reverse_kl(student, teacher, alpha=1.0).item() == 0.0


def test_soft_cross_entropy_is_kl_plus_teacher_entropy():
    student, teacher = pair((2, 3, 5))
    p = teacher.softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert_close(kd.soft_cross_entropy(student, teacher), kd.kl_div(student, teacher) + entropy)


@pytest.mark.parametrize("name,fn,kwargs", all_divergences(), ids=[c[0] for c in all_divergences()])
def test_identical_inputs_give_zero_and_others_are_positive(name, fn, kwargs):
    logits = randn(2, 3, 5)
    if name != "soft_ce":  # soft CE of p with itself is the entropy of p
        assert_close(fn(logits, logits.clone(), **kwargs), torch.tensor(0.0), atol=1e-6, rtol=0)
    for seed, scale in [(1, 1.0), (2, 10.0), (3, 100.0)]:
        value = fn(*pair((4, 7), seed=seed, scale=scale), **kwargs).item()
        assert value > 1e-6 if name != "soft_ce" else value >= 0.0


def test_bounds():
    for seed in range(3):
        student, teacher = pair((4, 6), seed=seed, scale=20.0)
        assert kd.js_div(student, teacher).item() <= math.log(2) + 1e-6
        assert kd.tvd(student, teacher).item() <= 1.0 + 1e-6


def test_identical_features_give_zero():
    features = randn(2, 3, 4)
    for fn in (kd.masked_mse, kd.masked_cosine_distance):
        assert_close(fn(features, features.clone()), torch.tensor(0.0), atol=1e-6, rtol=0)
    probs = features.softmax(-1)
    assert_close(kd.kl_div_probs(probs, probs.clone()), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_low_precision_inputs_are_computed_in_float32():
    student, teacher = pair((2, 3, 5))
    value = kd.kl_div(student.bfloat16(), teacher.bfloat16())
    assert value.dtype == torch.float32
    assert_close(value, kd.kl_div(student.bfloat16().float(), teacher.bfloat16().float()))


def test_invalid_parameters_are_rejected():
    student, teacher = pair((2, 5))
    # matched: log1p(-1.5) inside the mixture would raise a ValueError of its own
    for call, message in ((lambda: kd.generalized_jsd(student, teacher, beta=1.5), r"beta must be in \[0, 1\]"),
                          (lambda: kd.skew_kl(student, teacher, alpha=-0.1), r"alpha must be in \[0, 1\]"),
                          (lambda: kd.kl_div(student, teacher, temperature=0.0), "temperature must be > 0")):
        with pytest.raises(ValueError, match=message):
            call()


# ---- numerical stability ------------------------------------------------------------------------


def finite_grads(fn, student, teacher, **kwargs):
    student, teacher = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    value = fn(student, teacher, **kwargs)
    value.backward()
    return value, student.grad, teacher.grad


@pytest.mark.parametrize("name,fn,kwargs", all_divergences(), ids=[c[0] for c in all_divergences()])
def test_extreme_logits_have_finite_values_and_gradients(name, fn, kwargs):
    student = torch.tensor([[1e4, -1e4, 0.0, 5e3, -5e3], [-1e4, -1e4, -1e4, -1e4, 1e4]])
    teacher = torch.tensor([[-1e4, 1e4, 0.0, -5e3, 5e3], [1e4, -1e4, 3.0, 0.0, 1e4]])
    for temperature in (1.0, 0.5):
        value, grad_s, grad_t = finite_grads(fn, student, teacher, temperature=temperature, **kwargs)
        assert torch.isfinite(value) and value.item() >= 0
        assert torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()


@pytest.mark.parametrize("name,fn,kwargs,row_ref", [c for c in DISTRIBUTION_CASES if c[0] in ZERO_MASS_SAFE],
                         ids=ZERO_MASS_SAFE)
def test_teacher_minus_inf_entries(name, fn, kwargs, row_ref):
    student, teacher = pair((2, 3, 5))
    teacher[..., 1] = float("-inf")
    teacher[0, 0, 3] = float("-inf")
    mask = random_mask((2, 3))
    expected = reference(lambda s, t: row_ref(softmax(t), softmax(s)), student, teacher, mask)
    value, grad_s, grad_t = finite_grads(fn, student, teacher, mask=mask, **kwargs)
    assert_close(value, expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()


@pytest.mark.parametrize("name,fn,kwargs", all_divergences(), ids=[c[0] for c in all_divergences()])
def test_minus_inf_in_both_is_agreement(name, fn, kwargs):
    student, teacher = pair((2, 3, 5))
    student[..., -1] = teacher[..., -1] = -math.inf  # vocabulary padding masked in both models
    value, grad_s, grad_t = finite_grads(fn, student, teacher, **kwargs)
    assert_close(value, fn(student[..., :-1], teacher[..., :-1], **kwargs) * (0.8 if name == "mse" else 1.0))
    assert torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()


def test_reverse_kl_is_infinite_where_teacher_has_no_mass():
    student, teacher = pair((2, 5))
    teacher[..., 0] = float("-inf")
    assert kd.reverse_kl(student, teacher).item() == math.inf
    assert math.isfinite(kd.skew_reverse_kl(student, teacher, alpha=0.1).item())


def test_feature_losses_have_finite_gradients_at_zero():
    zeros = torch.zeros(2, 4, requires_grad=True)
    kd.masked_cosine_distance(zeros, torch.ones(2, 4)).backward()
    assert torch.isfinite(zeros.grad).all()
    student = torch.tensor([[0.0, 1.0], [0.5, 0.5]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    kd.kl_div_probs(student, teacher).backward()
    assert torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()
