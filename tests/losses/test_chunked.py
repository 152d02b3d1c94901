"""kdistill.losses.chunked against functional.* on fully materialised logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from kdistill.losses import chunked as chunked_module
from kdistill.losses import functional as kd
from kdistill.losses.chunked import CHUNKED_DIVERGENCES, chunked_divergence

B, L, D_S, D_T, V = 2, 5, 8, 6, 50
CHUNK = 3  # 7 kept positions below -> chunks of 3, 3, 1

PLAIN = {
    "kl": kd.kl_div,
    "reverse_kl": kd.reverse_kl,
    "js": kd.js_div,
    "generalized_jsd": kd.generalized_jsd,
    "tvd": kd.tvd,
    "skew_kl": kd.skew_kl,
    "skew_reverse_kl": kd.skew_reverse_kl,
    "soft_ce": kd.soft_cross_entropy,
}


def make_inputs(v_s=V, v_t=V, seed=0, lead=(B, L)):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    student = {"hidden": rand(*lead, D_S), "weight": rand(v_s, D_S, scale=0.7), "bias": rand(v_s, scale=0.3)}
    for tensor in student.values():
        tensor.requires_grad_()
    teacher = {"hidden": rand(*lead, D_T), "weight": rand(v_t, D_T, scale=0.7), "bias": rand(v_t, scale=0.3)}
    return student, teacher


MASK = torch.tensor([[True, True, False, True, True], [False, True, True, False, True]])


def plain(name, student, teacher, vocab=None, mask=MASK, temperature=1.0, **extra):
    s_logits = F.linear(student["hidden"], student["weight"], student["bias"])[..., :vocab]
    t_logits = F.linear(teacher["hidden"], teacher["weight"], teacher["bias"])[..., :vocab]
    return PLAIN[name](s_logits, t_logits, temperature=temperature, mask=mask, **extra)


def chunked(name, student, teacher, mask=MASK, chunk_size=CHUNK, **kwargs):
    return chunked_divergence(student["hidden"], student["weight"], teacher["hidden"], teacher["weight"],
                              divergence=name, mask=mask, chunk_size=chunk_size,
                              student_bias=student["bias"], teacher_bias=teacher["bias"], **kwargs)


def grads(loss, student):
    return torch.autograd.grad(loss, list(student.values()))


def assert_matches(expected, actual, student):
    assert actual.shape == ()
    assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    for want, got in zip(grads(expected, student), grads(actual, student)):
        assert_close(got, want, atol=1e-5, rtol=1e-5)


def extra_for(name, value):
    return {"generalized_jsd": {"beta": value}, "skew_kl": {"alpha": value},
            "skew_reverse_kl": {"alpha": value}}.get(name, {})


def test_names_cover_the_contract():
    assert set(CHUNKED_DIVERGENCES) == set(PLAIN)


@pytest.mark.parametrize("name", sorted(PLAIN))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_plain_values_and_gradients(name, temperature):
    student, teacher = make_inputs()
    extra = extra_for(name, 0.3)
    expected = plain(name, student, teacher, temperature=temperature, **extra)
    actual = chunked(name, student, teacher, temperature=temperature, **extra)
    assert expected.item() > 0
    assert_matches(expected, actual, student)


@pytest.mark.parametrize("name", ["generalized_jsd", "skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("value", [0.0, 1.0])
def test_parameter_endpoints(name, value):
    student, teacher = make_inputs(seed=1)
    extra = extra_for(name, value)
    expected, actual = plain(name, student, teacher, **extra), chunked(name, student, teacher, **extra)
    if not expected.requires_grad:
        # Skew KL at alpha = 1 is KL(p‖p) = 0 with no path to the student: the plain loss has no
        # graph, the chunked one still backpropagates (zeros) so a training step does not crash.
        assert expected.item() == 0.0 and actual.item() == 0.0
        assert all(g.abs().sum() == 0 for g in grads(actual, student))
        return
    assert_matches(expected, actual, student)


@pytest.mark.parametrize("name,value", [("generalized_jsd", 0.01), ("generalized_jsd", 0.99),
                                        ("skew_kl", 0.99), ("skew_reverse_kl", 0.99)])
def test_parameters_near_the_endpoints(name, value):
    # The closed forms divide by nothing that vanishes here; the ends themselves are other kernels.
    student, teacher = make_inputs(seed=9)
    extra = extra_for(name, value)
    assert_matches(plain(name, student, teacher, **extra), chunked(name, student, teacher, **extra), student)


@pytest.mark.parametrize("name", sorted(PLAIN))
@pytest.mark.parametrize("scale", [30.0, 300.0])
def test_peaked_distributions(name, scale):
    # Logits in the hundreds: most probabilities underflow to 0 and the rows are near one-hot.
    student, teacher = make_inputs(seed=8)
    with torch.no_grad():
        student["weight"].mul_(scale)
        teacher["weight"].mul_(scale)
    extra = extra_for(name, 0.3)
    expected, actual = plain(name, student, teacher, **extra), chunked(name, student, teacher, **extra)
    assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # float32 rounding on logits this large is itself ~1e-5 of the largest gradient entry (the plain
    # path is off a float64 reference by 3e-4 on reverse KL at scale 30, the chunked one by 1e-4)
    for want, got in zip(grads(expected, student), grads(actual, student)):
        assert_close(got, want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_non_finite_logits_keep_the_definitions(name, monkeypatch):
    # -inf logits (tokens a head rules out) make the closed forms meet 0·log 0; the pass notices
    # the non-finite result and redoes the sum through functional's definitions.
    student, teacher = make_inputs(seed=7)
    with torch.no_grad():
        teacher["bias"][[3, 17, 40]] = -math.inf  # ruled out by the teacher only
        for side in (student, teacher):
            side["bias"][[5, 44]] = -math.inf  # by both, like masked padding
    fallbacks, original = [], chunked_module._autograd_pass
    monkeypatch.setattr(chunked_module, "_autograd_pass", lambda *args: fallbacks.append(1) or original(*args))
    extra = extra_for(name, 0.3)
    expected, actual = plain(name, student, teacher, **extra), chunked(name, student, teacher, **extra)
    if name == "reverse_kl":  # infinite where only the teacher has zero mass, in both paths
        assert math.isinf(expected.item()) and math.isinf(actual.item())
        return
    assert fallbacks or name == "tvd"  # tvd takes no logs, so -inf never reaches a product
    assert_matches(expected, actual, student)


def test_finite_logits_take_the_fused_pass(monkeypatch):
    def refuse(*args):
        raise AssertionError("finite logits should not need the autograd pass")

    monkeypatch.setattr(chunked_module, "_autograd_pass", refuse)
    for name in sorted(PLAIN):
        student, teacher = make_inputs(seed=10)
        chunked(name, student, teacher, **extra_for(name, 0.3)).backward()


def test_low_precision_heads():
    # bf16 heads: logits are made in bf16 as the plain path makes them, the divergence in float32.
    student, teacher = make_inputs(seed=12)
    low = {k: v.detach().bfloat16().requires_grad_() for k, v in student.items()}
    t_low = {k: v.bfloat16() for k, v in teacher.items()}
    expected, actual = plain("js", low, t_low), chunked("js", low, t_low)
    assert actual.dtype == torch.float32
    assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    for want, got in zip(grads(expected, low), grads(actual, low)):
        assert got.dtype == torch.bfloat16
        assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-2)


def test_backpropagating_twice_is_refused():
    student, teacher = make_inputs()
    loss = chunked("kl", student, teacher)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


@pytest.mark.parametrize("mask", [None, torch.tensor([True, False, True, True, False])],
                         ids=["no-mask", "broadcast-mask"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_mask_forms_and_chunk_sizes(mask, chunk_size):
    student, teacher = make_inputs(seed=2)
    assert_matches(plain("js", student, teacher, mask=mask),
                   chunked("js", student, teacher, mask=mask, chunk_size=chunk_size), student)


def test_flat_hidden_states():
    student, teacher = make_inputs(seed=3, lead=(7,))
    mask = torch.tensor([True, False, True, True, True, False, True])
    assert_matches(plain("kl", student, teacher, mask=mask), chunked("kl", student, teacher, mask=mask), student)


def test_without_bias():
    student, teacher = make_inputs(seed=4)
    student["bias"] = torch.zeros(V)  # plain path: adding 0 is the same as no bias
    teacher["bias"] = None
    expected = plain("reverse_kl", student, teacher)
    actual = chunked_divergence(student["hidden"], student["weight"], teacher["hidden"], teacher["weight"],
                                divergence="reverse_kl", mask=MASK, chunk_size=CHUNK)
    assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    want = torch.autograd.grad(expected, [student["hidden"], student["weight"]])
    got = torch.autograd.grad(actual, [student["hidden"], student["weight"]])
    for w, g in zip(want, got):
        assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_frozen_student_head():
    # Only the hidden states train (a tied or frozen head): no head gradient is made or returned.
    student, teacher = make_inputs(seed=13)
    for key in ("weight", "bias"):
        student[key] = student[key].detach()
    expected, actual = plain("generalized_jsd", student, teacher, beta=0.3), \
        chunked("generalized_jsd", student, teacher, beta=0.3)
    assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    (want,), (got,) = (torch.autograd.grad(loss, [student["hidden"]]) for loss in (expected, actual))
    assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_all_masked_is_zero_with_zero_gradients():
    student, teacher = make_inputs()
    loss = chunked("kl", student, teacher, mask=torch.zeros(B, L, dtype=torch.bool))
    assert loss.item() == 0.0
    assert all(g.abs().sum() == 0 for g in grads(loss, student))


def test_scaled_upstream_gradient():
    student, teacher = make_inputs(seed=5)
    expected = 3.0 * plain("tvd", student, teacher)
    actual = 3.0 * chunked("tvd", student, teacher)
    assert_matches(expected, actual, student)


def test_teacher_gets_no_gradient():
    student, teacher = make_inputs()
    for tensor in teacher.values():
        tensor.requires_grad_()
    loss = chunked("kl", student, teacher)
    assert loss.requires_grad
    loss.backward()
    assert all(tensor.grad is None for tensor in teacher.values())
    assert all(tensor.grad is not None for tensor in student.values())


def test_no_grad_mode_gives_the_value_without_a_graph():
    student, teacher = make_inputs()
    with torch.no_grad():
        loss = chunked("skew_kl", student, teacher)
    assert not loss.requires_grad
    assert_close(loss, plain("skew_kl", student, teacher).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_padded_vocabularies(name):
    student, teacher = make_inputs(v_s=50, v_t=56, seed=6)
    extra = extra_for(name, 0.3)
    expected = plain(name, student, teacher, vocab=48, **extra)
    actual = chunked(name, student, teacher, vocab_size=48, **extra)
    assert_matches(expected, actual, student)
    # Padded rows of the student head never reach a logit, so they get exactly zero gradient.
    weight_grad = grads(chunked(name, student, teacher, vocab_size=48, **extra), student)[1]
    assert weight_grad[48:].abs().sum() == 0


def test_mismatched_vocabularies_need_vocab_size():
    student, teacher = make_inputs(v_s=50, v_t=56)
    with pytest.raises(ValueError, match="vocab_size") as error:
        chunked("kl", student, teacher)
    assert "tokenizer" in str(error.value)
    with pytest.raises(ValueError, match="vocab_size"):
        chunked("kl", student, teacher, vocab_size=51)


def test_unknown_divergence_lists_valid_names():
    student, teacher = make_inputs()
    with pytest.raises(ValueError, match="unknown divergence 'kld'") as error:
        chunked("kld", student, teacher)
    assert all(name in str(error.value) for name in CHUNKED_DIVERGENCES)


@pytest.mark.parametrize("kwargs, message", [
    ({"divergence": "skew_kl", "alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ({"divergence": "generalized_jsd", "beta": -0.1}, r"beta must be in \[0, 1\]"),
    ({"temperature": 0.0}, "temperature must be > 0"), ({"chunk_size": 0}, "chunk_size must be >= 1")])
def test_bad_arguments(kwargs, message):
    student, teacher = make_inputs()
    kwargs = {"divergence": "kl", **kwargs}
    name = kwargs.pop("divergence")
    with pytest.raises(ValueError, match=message):
        chunked(name, student, teacher, **kwargs)


# ---- memory: no op may produce a tensor with one entry per (token, vocabulary item) -----------


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns, backward included."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("name", ["kl", "generalized_jsd", "skew_reverse_kl"])
def test_memory_is_bounded_by_the_chunk(name):
    # Many tokens, few hidden units: B·L·V is far above both chunk·V and the heads' V·D.
    lead, chunk, v = (4, 32), 4, 200
    student, teacher = make_inputs(v_s=v, v_t=v, lead=lead)
    tokens = lead[0] * lead[1]
    bound = max(chunk * v, v * D_S, v * D_T, tokens * max(D_S, D_T))
    assert bound * 4 <= tokens * v

    with LargestTensor() as chunked_run:
        loss = chunked(name, student, teacher, mask=None, chunk_size=chunk)
        loss.backward()
    assert chunked_run.largest <= bound

    # The probe is real: the same measurement on materialised logits sees B·L·V.
    with LargestTensor() as plain_run:
        plain(name, student, teacher, mask=None).backward()
    assert plain_run.largest >= tokens * v


def test_default_chunk_is_a_budget_of_logits(monkeypatch):
    # A budget of 3 rows' worth of logits makes the default chunk 3 tokens: the default is set in
    # logits, so the largest buffer follows it whatever the vocabulary.
    lead, v = (4, 32), 200
    monkeypatch.setattr(chunked_module, "LOGITS_PER_CHUNK", 3 * v)
    student, teacher = make_inputs(v_s=v, v_t=v, lead=lead, seed=11)
    tokens = lead[0] * lead[1]
    assert_matches(plain("js", student, teacher, mask=None),
                   chunked("js", student, teacher, mask=None, chunk_size=None), student)
    with LargestTensor() as run:
        chunked("js", student, teacher, mask=None, chunk_size=None).backward()
    assert run.largest <= max(3 * v, v * D_S, v * D_T, tokens * max(D_S, D_T)) < tokens * v


def test_chunked_logit_kd_trains_like_the_plain_one_without_making_full_logits(tiny_gpt2_dir, text_file, tmp_path,
                                                                                monkeypatch):
    from kdistill import distill
    from kdistill.models.loading import load_model

    recipe = {"name": "lm", "teacher": {"model": tiny_gpt2_dir}, "student": {"config": {"n_layer": 1}},
              "data": {"train": {"path": text_file, "text": "sentence", "limit": 12}, "max_length": 24},
              "losses": [{"type": "logit_kd", "temperature": 2.0, "divergence": "generalized_jsd", "beta": 0.3}],
              "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0}}
    plain = distill({**recipe, "output": str(tmp_path / "plain")}, progress=False)
    chunked_recipe = {**recipe, "output": str(tmp_path / "chunked"),
                      "losses": [{**recipe["losses"][0], "chunk_size": 5}]}
    import torch.nn as nn
    head_calls = []
    original = nn.Linear.forward

    def counting(self, x):
        if self.out_features > 1000:  # the LM heads (vocabulary-sized): must never run in training
            head_calls.append(tuple(x.shape))
        return original(self, x)

    monkeypatch.setattr(nn.Linear, "forward", counting)
    chunked = distill(chunked_recipe, progress=False)
    monkeypatch.setattr(nn.Linear, "forward", original)
    assert head_calls == []
    a, b = (load_model(str(d), "causal-lm").model.state_dict() for d in (plain, chunked))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_default_chunk_is_an_eighth_of_the_positions_within_the_logit_budget():
    from kdistill.losses.chunked import default_chunk

    assert default_chunk(512, 32_000) == 64      # an eighth of the positions
    assert default_chunk(2048, 32_000) == 128    # the tallest chunk
    assert default_chunk(100, 32_000) == 32      # never shorter than 32 tokens...
    assert default_chunk(10, 32_000) == 32       # (a chunk taller than the input is just one chunk)
    assert default_chunk(4096, 1 << 20) == 16    # ...unless the logit budget says so
    assert default_chunk(4096, 1 << 26) == 1
