"""kdistill.losses.sparse against functional.* (k = V, uniform tail) and a slow bucket reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from kdistill.losses import functional as kd
from kdistill.losses.sparse import SPARSE_DIVERGENCES, _StudentBuckets, sparse_divergence
from kdistill.teachers.store import sparsify

B, L, V, K, TAU = 2, 3, 7, 3, 2.0
MASK = torch.tensor([[True, False, True], [True, True, False]])
PARAMS = {"generalized_jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}

DENSE = {
    "kl": kd.kl_div,
    "reverse_kl": kd.reverse_kl,
    "js": kd.js_div,
    "generalized_jsd": kd.generalized_jsd,
    "tvd": kd.tvd,
    "skew_kl": kd.skew_kl,
    "skew_reverse_kl": kd.skew_reverse_kl,
    "soft_ce": kd.soft_cross_entropy,
}


def make(seed=0, vocab=V):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, L, vocab, generator=gen) * 2).requires_grad_()
    teacher = torch.randn(B, L, vocab, generator=gen) * 2
    return student, teacher


def grad_of(value, student):
    (grad,) = torch.autograd.grad(value, student)
    return grad


# ---- slow reference: coarsened distributions built one position at a time in float64 ---------

def kl(a, b):
    return sum(x * (torch.log(x) - torch.log(y)) for x, y in zip(a, b) if float(x.detach()) > 0)


def mix(w, a, b):
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


def reference_value(name, p, q, beta=0.5, alpha=0.1):
    if name == "kl" or (name == "generalized_jsd" and beta == 0):
        return kl(p, q)
    if name == "reverse_kl" or (name == "generalized_jsd" and beta == 1):
        return kl(q, p)
    if name in ("js", "generalized_jsd"):
        beta = 0.5 if name == "js" else beta
        m = mix(beta, p, q)
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    if name == "skew_kl":
        return kl(p, mix(alpha, p, q))
    if name == "skew_reverse_kl":
        return kl(q, mix(alpha, q, p))
    if name == "soft_ce":
        return -sum(x * torch.log(y) for x, y in zip(p, q) if float(x.detach()) > 0)
    raise KeyError(name)


def reference_bucket(name, student, top, indices, tail, mask, **params):
    """Mean over unmasked positions of the divergence between explicit (k + 1)-bucket distributions."""
    total, count = 0.0, 0
    for b in range(B):
        for t in range(L):
            if not MASK_OR_ALL(mask)[b][t]:
                continue
            q = torch.softmax(student[b, t].double() / TAU, -1)
            chosen = [int(i) for i in indices[b, t]]
            q_buckets = [q[i] for i in chosen] + [sum(q[j] for j in range(V) if j not in chosen)]
            p_raw = [math.exp(float(x)) for x in top[b, t]] + [math.exp(float(tail[b, t]))]
            p_buckets = [torch.tensor(x / sum(p_raw), dtype=torch.float64) for x in p_raw]
            total = total + reference_value(name, p_buckets, q_buckets, **params)
            count += 1
    return total / count


def MASK_OR_ALL(mask):
    return mask.tolist() if mask is not None else [[True] * L for _ in range(B)]


# ------------------------------------------------------------------------------------- k = V

@pytest.mark.parametrize("tail", ["bucket", "uniform"])
@pytest.mark.parametrize("mask", [None, MASK], ids=["all", "masked"])
@pytest.mark.parametrize("name", SPARSE_DIVERGENCES)
def test_full_vocabulary_matches_dense(name, mask, tail):
    student, teacher = make()
    stored = sparsify(teacher, k=V, temperature=TAU)
    params = PARAMS.get(name, {})
    sparse = sparse_divergence(student, *stored, name, temperature=TAU, mask=mask, tail=tail, **params)
    dense = DENSE[name](student, teacher, temperature=TAU, mask=mask, **params)
    assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    assert_close(grad_of(sparse, student), grad_of(dense, student), atol=1e-5, rtol=1e-5)


def test_full_vocabulary_with_zero_mass_entries():
    """-inf teacher logits (0·log 0) and vocabulary padding -inf in both models stay finite."""
    student, teacher = make()
    teacher = teacher.clone()
    teacher[..., 0] = -math.inf  # the teacher rules token 0 out
    student.data[..., -2:] = -math.inf
    teacher[..., -2:] = -math.inf  # padding: masked in both
    for name in ("kl", "js", "tvd", "skew_reverse_kl", "soft_ce"):
        for k in (V, V - 2):  # V - 2: the student's "everything else" bucket is empty (-inf)
            dense = DENSE[name](student, teacher, temperature=TAU)
            sparse = sparse_divergence(student, *sparsify(teacher, k, TAU), name, temperature=TAU)
            assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
            grad = grad_of(sparse, student)
            assert torch.isfinite(grad).all()
            assert_close(grad, grad_of(dense, student), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------- k < V

@pytest.mark.parametrize("mask", [None, MASK], ids=["all", "masked"])
@pytest.mark.parametrize("name", SPARSE_DIVERGENCES)
def test_bucket_matches_slow_reference(name, mask):
    student, teacher = make(seed=1)
    top, indices, tail = sparsify(teacher, K, TAU)
    params = PARAMS.get(name, {})
    value = sparse_divergence(student, top, indices, tail, name, temperature=TAU, mask=mask, **params)
    expected = reference_bucket(name, student, top, indices, tail, mask, **params)
    assert_close(value.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    assert_close(grad_of(value, student).double(), grad_of(expected, student).double(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", SPARSE_DIVERGENCES)
def test_bucket_lower_bounds_dense(name):
    """Data-processing inequality: coarsening never increases the divergence (nor soft CE)."""
    student, teacher = make(seed=2)
    params = PARAMS.get(name, {})
    for k in range(1, V + 1):
        sparse = sparse_divergence(student, *sparsify(teacher, k, TAU), name, temperature=TAU, **params)
        assert sparse <= DENSE[name](student, teacher, temperature=TAU, **params) + 1e-6


@pytest.mark.parametrize("mask", [None, MASK], ids=["all", "masked"])
@pytest.mark.parametrize("name", SPARSE_DIVERGENCES)
def test_uniform_tail_matches_dense_reconstruction(name, mask):
    student, teacher = make(seed=3)
    top, indices, tail = sparsify(teacher, K, TAU)
    # The teacher the uniform rule implies: stored tokens as stored, the tail spread evenly.
    p = (tail.double().exp() / (V - K)).unsqueeze(-1).expand(B, L, V).clone()
    p.scatter_(-1, indices.long(), top.double().exp())
    params = PARAMS.get(name, {})
    value = sparse_divergence(student, top, indices, tail, name, temperature=TAU, mask=mask, tail="uniform", **params)
    # functional divides both sides by τ; the reconstruction is already at the store's τ.
    dense = DENSE[name](student / TAU, p.log().float(), temperature=1.0, mask=mask, **params)
    assert_close(value, dense, atol=1e-5, rtol=1e-5)
    assert_close(grad_of(value, student), grad_of(dense, student), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- edge cases

def test_beta_and_alpha_endpoints():
    student, teacher = make(seed=4)
    stored = sparsify(teacher, K, TAU)

    def run(name, **params):
        return sparse_divergence(student, *stored, name, temperature=TAU, **params)

    assert_close(run("generalized_jsd", beta=0.0), run("kl"))
    assert_close(run("generalized_jsd", beta=1.0), run("reverse_kl"))
    assert_close(run("generalized_jsd", beta=0.5), run("js"))
    assert_close(run("skew_kl", alpha=0.0), run("kl"))
    assert_close(run("skew_reverse_kl", alpha=0.0), run("reverse_kl"))
    assert run("skew_kl", alpha=1.0).abs() < 1e-7 and run("skew_reverse_kl", alpha=1.0).abs() < 1e-7
    for name, params in [("skew_kl", {"alpha": 1.5}), ("skew_reverse_kl", {"alpha": -0.1}),
                         ("generalized_jsd", {"beta": 1.1})]:
        with pytest.raises(ValueError, match="must be in"):
            run(name, **params)


def test_masks():
    student, teacher = make(seed=5)
    top, indices, tail = sparsify(teacher, K, TAU)
    masked = sparse_divergence(student, top, indices, tail, "kl", temperature=TAU, mask=MASK)
    kept = sparse_divergence(student[MASK], top[MASK], indices[MASK], tail[MASK], "kl", temperature=TAU)
    assert_close(masked, kept)
    row = torch.tensor([[True], [False]])  # broadcasts over L
    assert_close(sparse_divergence(student, top, indices, tail, "kl", temperature=TAU, mask=row),
                 sparse_divergence(student[:1], top[:1], indices[:1], tail[:1], "kl", temperature=TAU))
    none = torch.zeros(B, L, dtype=torch.bool)
    nothing = sparse_divergence(student, top, indices, tail, "js", temperature=TAU, mask=none)
    assert nothing.item() == 0.0 and nothing.requires_grad
    assert torch.equal(grad_of(nothing, student), torch.zeros_like(student))


def test_gradients_reach_the_student_only():
    student, teacher = make(seed=6)
    top, indices, tail = sparsify(teacher, K, TAU)
    top, tail = top.requires_grad_(), tail.requires_grad_()
    sparse_divergence(student, top, indices, tail, "js", temperature=TAU).backward()
    assert student.grad is not None and top.grad is None and tail.grad is None


def test_float16_store_values():
    student, teacher = make(seed=7)
    top, indices, tail = sparsify(teacher, K, TAU)
    exact = sparse_divergence(student, top, indices, tail, "kl", temperature=TAU)
    rounded = sparse_divergence(student, top.half(), indices, tail, "kl", temperature=TAU)
    assert_close(rounded, exact, atol=5e-3, rtol=5e-3)


def test_bad_arguments():
    student, teacher = make()
    top, indices, tail = sparsify(teacher, K, TAU)
    with pytest.raises(ValueError, match="unknown divergence"):
        sparse_divergence(student, top, indices, tail, "mse")
    with pytest.raises(ValueError, match="tail must be"):
        sparse_divergence(student, top, indices, tail, tail="spread")
    with pytest.raises(ValueError, match="leading dimensions"):
        sparse_divergence(student[:1], top, indices, tail)
    with pytest.raises(ValueError, match="temperature"):
        sparse_divergence(student, top, indices, tail, temperature=0.0)


# ------------------------------------------------------- the fused buckets against their autograd form

def student_buckets(log_q, indices):
    """(…, k + 1) log-probabilities: the student's k tokens at ``indices``, then all the others.

    The plain autograd form (what sparse_divergence ran before the fused :class:`_StudentBuckets`), the reference here.
    The last bucket is a logsumexp over the remaining log-probabilities rather than
    log(1 − Σ q_top), which would cancel to garbage when the k tokens hold nearly all the mass.
    """
    top = log_q.gather(-1, indices)
    rest = log_q.scatter(-1, indices, -math.inf)
    # A row with nothing left (k = V, or -inf student logits outside the k) has log-mass -inf;
    # logsumexp over all -inf has a NaN gradient, so such rows are routed around it.
    empty = rest.amax(dim=-1, keepdim=True) == -math.inf
    rest_mass = torch.logsumexp(rest.masked_fill(empty, 0.0), dim=-1, keepdim=True).masked_fill(empty, -math.inf)
    return torch.cat([top, rest_mass], dim=-1)


def buckets_both_ways(logits, indices, tau, upstream):
    """(values, gradient) of the fused buckets and of student_buckets(log_softmax(z / τ)) for one upstream gradient."""
    out = []
    for fused in (True, False):
        z = logits.detach().clone().requires_grad_()
        b = (_StudentBuckets.apply(z, indices, tau) if fused
             else student_buckets(torch.log_softmax(z.float() / tau, -1), indices))
        (grad,) = torch.autograd.grad(b, z, upstream)
        out.append((b.detach(), grad))
    return out


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_fused_buckets_match_autograd_form(tau):
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 5, 50, generator=gen) * 3
    indices = torch.stack([torch.randperm(50, generator=gen)[:8] for _ in range(20)]).view(4, 5, 8)
    upstream = torch.randn(4, 5, 9, generator=gen)
    (fused, g_fused), (plain, g_plain) = buckets_both_ways(logits, indices, tau, upstream)
    assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert_close(g_fused, g_plain, atol=1e-5, rtol=1e-5)


def test_fused_buckets_rest_below_exp_range():
    """Every token outside the k sits ~150 nats under the peak: exp underflows to 0 in float32, yet the rest
    bucket is ln Σ exp(rest − lse) ≈ −150 + ln(count), as the log-softmax form gives, and so is its gradient."""
    logits = torch.zeros(2, 3, 20)
    indices = torch.arange(4).expand(2, 3, 4).contiguous()
    logits[..., :4] = torch.tensor([150.0, 149.0, 148.5, 147.0])
    logits[1, 2, 10] = -math.inf  # a ruled-out token inside such a row
    upstream = torch.linspace(-1, 1, 2 * 3 * 5).view(2, 3, 5)
    (fused, g_fused), (plain, g_plain) = buckets_both_ways(logits, indices, 1.0, upstream)
    assert torch.isfinite(fused).all() and fused[..., -1].max() < -140
    assert_close(fused, plain, atol=1e-4, rtol=1e-6)
    assert_close(g_fused, g_plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gap", [90.0, 102.0, 104.0])
def test_fused_buckets_rest_where_exp_is_subnormal(gap):
    """The rest ~100 nats under the peak: exp(rest - peak) is a float32 subnormal, not 0, and has lost most of
    its digits, so a rest bucket shifted by the overall peak is off (the form before 2026-11-27: by 5e-3 at a gap
    of 102, 0.18 at 104); shifted by the rest's own maximum it matches float64."""
    logits = torch.zeros(3, 30)
    logits[:, :3] = torch.tensor([gap, gap - 0.5, gap - 2.0])
    logits[:, 3:] = torch.linspace(-1.0, 1.0, 27)
    indices = torch.arange(3).expand(3, 3).contiguous()
    buckets = _StudentBuckets.apply(logits, indices, 1.0)
    exact = torch.logsumexp(logits[:, 3:].double(), -1) - torch.logsumexp(logits.double(), -1)
    assert_close(buckets[:, -1].double(), exact, atol=1e-4, rtol=0)


def test_fused_buckets_keep_low_precision_logits_dtype():
    logits = torch.randn(3, 16).bfloat16().requires_grad_()
    indices = torch.tensor([[0, 3], [5, 1], [15, 2]])
    _StudentBuckets.apply(logits, indices, 1.0).sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad).all()
