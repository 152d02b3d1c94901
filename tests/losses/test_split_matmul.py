"""split_matmul (three TF32 products for one float32 product) and the chunked loss with matmuls='tf32x3'.

This machine has no TF32 tensor cores, so the accuracy claim is checked by emulating them: every input of
each product is cut to TF32 (10 mantissa bits, truncated: the worse of the two roundings a tensor core may
apply) and the products are summed in float64."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from kdistill.losses import split_matmul
from tests.losses.test_chunked import PLAIN, assert_matches, chunked, extra_for, make_inputs, plain


def tf32(x: torch.Tensor) -> torch.Tensor:
    """x with its low 13 mantissa bits cleared: what a TF32 tensor core reads of a float32."""
    return (x.contiguous().view(torch.int32) & ~((1 << 13) - 1)).view(torch.float32)


def test_split_is_exact_and_hi_is_tf32():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-20, 20, 4096)
    hi, lo = split_matmul.split(x)
    assert torch.equal(hi + lo, x)
    assert torch.equal(tf32(hi), hi)  # a tensor core reads hi without loss
    assert (lo.abs() <= 2.0**-11 * x.abs()).all()  # rounded to nearest: at most half a TF32 step


def test_split_keeps_signs_zeros_and_rounds_up_across_a_binade():
    x = torch.tensor([0.0, -0.0, -1.5, 1.0 - 2.0**-23, -(1.0 - 2.0**-23)])
    hi, lo = split_matmul.split(x)
    assert torch.equal(hi + lo, x)
    assert hi[3].item() == 1.0 and hi[4].item() == -1.0  # the carry lands in the exponent


def test_three_tf32_products_are_as_accurate_as_one_float32_product():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 384, generator=gen), torch.randn(384, 512, generator=gen) * 0.05
    exact = a.double() @ b.double()
    (a_hi, a_lo), (b_hi, b_lo) = split_matmul.split(a), split_matmul.split(b)
    emulated = sum(tf32(x).double() @ tf32(y).double() for x, y in ((a_lo, b_hi), (a_hi, b_lo), (a_hi, b_hi)))
    plain_tf32 = tf32(a).double() @ tf32(b).double()
    err = {name: (value - exact).abs().max().item() / exact.abs().max().item()
           for name, value in (("fp32", (a @ b).double()), ("3xtf32", emulated), ("tf32", plain_tf32))}
    assert err["3xtf32"] <= 2 * err["fp32"], err
    assert err["tf32"] >= 100 * err["3xtf32"], err  # what the split buys


def test_addmm_with_bias_and_accumulation():
    gen = torch.Generator().manual_seed(2)
    a, b, bias = torch.randn(5, 7, generator=gen), torch.randn(7, 3, generator=gen), torch.randn(3, generator=gen)
    pa, pb = split_matmul.split(a), split_matmul.split(b)
    out = torch.full((5, 3), float("nan"))  # beta 0 ignores what the buffer held
    assert_close(split_matmul.addmm(out, pa, pb, alpha=0.5, bias=bias), 0.5 * (a @ b + bias))
    start = torch.randn(5, 3, generator=gen)
    assert_close(split_matmul.addmm(start.clone(), pa, pb, alpha=2.0, beta=1.0), start + 2.0 * (a @ b))


@pytest.mark.parametrize("name", sorted(PLAIN))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_loss_with_split_products_matches_plain(name, temperature):
    student, teacher = make_inputs(seed=3)
    extra = extra_for(name, 0.3)
    expected = plain(name, student, teacher, temperature=temperature, **extra)
    assert_matches(expected, chunked(name, student, teacher, temperature=temperature, matmuls="tf32x3", **extra),
                   student)


def test_split_products_are_refused_for_low_precision_heads_and_unknown_names():
    student, teacher = make_inputs()
    half = {**student, "weight": student["weight"].detach().bfloat16()}
    with pytest.raises(ValueError, match="student_weight is not float32"):
        chunked("kl", half, teacher, matmuls="tf32x3")
    with pytest.raises(ValueError, match="matmuls must be one of torch, tf32x3"):
        chunked("kl", student, teacher, matmuls="bf16")


def test_split_into_reuses_the_buffers():
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(4))
    want_hi, want_lo = split_matmul.split(x)
    buffer = torch.full_like(x, float("nan"))
    hi, lo = split_matmul.split_into(x.clone(), buffer)
    assert hi.data_ptr() == buffer.data_ptr()
    assert torch.equal(hi, want_hi) and torch.equal(lo, want_lo)


def test_split_products_default_to_taller_chunks():
    from kdistill.losses.chunked import default_chunk

    assert default_chunk(4096, 128_000, "tf32x3") == (1 << 27) // 128_000  # the logit budget: 1,048 tokens
    assert default_chunk(2048, 128_000, "tf32x3") == 1024                   # half the positions
    assert default_chunk(512, 128_000, "tf32x3") == 256                    # half the positions
    assert default_chunk(2048, 128_000) == 128                              # torch's products: unchanged


def test_a_recipe_trains_with_split_products_like_the_plain_loss(tiny_gpt2_dir, text_file, tmp_path):
    from kdistill import distill
    from kdistill.errors import KdistillError
    from kdistill.models.loading import load_model

    kd = {"type": "logit_kd", "temperature": 2.0, "divergence": "generalized_jsd", "beta": 0.3}
    recipe = {"name": "lm", "teacher": {"model": tiny_gpt2_dir}, "student": {"config": {"n_layer": 1}},
              "data": {"train": {"path": text_file, "text": "sentence", "limit": 12}, "max_length": 24},
              "losses": [kd], "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0}}
    plain_run = distill({**recipe, "output": str(tmp_path / "plain")}, progress=False)
    split_run = distill({**recipe, "output": str(tmp_path / "split"),
                         "losses": [{**kd, "chunk_size": 5, "matmuls": "tf32x3"}]}, progress=False)
    a, b = (load_model(str(d), "causal-lm").model.state_dict() for d in (plain_run, split_run))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    with pytest.raises(KdistillError, match=r"losses\[0\]\.matmuls: tf32x3 products are a choice of the chunked path"):
        distill({**recipe, "output": str(tmp_path / "bad"), "losses": [{**kd, "matmuls": "tf32x3"}]}, progress=False)
