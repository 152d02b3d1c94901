"""Quantizers against values computed by hand: forward values and straight-through gradients."""
import pytest
import torch

from kdistill.quant.quantizers import (ElasticBinary, LearnedStepQuantizer, activation_quantizer, binarize,
                                       quantize_weight, ternarize)


def test_binarize_rows_and_clipped_straight_through():
    w = torch.tensor([[0.5, -1.5, 0.25, -0.25], [2.0, 0.0, -1.0, 1.0]], requires_grad=True)
    q = binarize(w)
    # row scales mean|w| = 0.625 and 1.0; sign(0) = +1
    assert torch.equal(q.detach(), torch.tensor([[0.625, -0.625, 0.625, -0.625], [1.0, 1.0, -1.0, 1.0]]))
    q.backward(torch.arange(8.0).view(2, 4))
    # the gradient passes only where |w| <= 1
    assert torch.equal(w.grad, torch.tensor([[0.0, 0.0, 2.0, 3.0], [0.0, 5.0, 6.0, 7.0]]))


def test_ternarize_threshold_and_scale():
    w = torch.tensor([[0.9, -0.1, 0.05, -0.6]], requires_grad=True)
    # Delta = 0.7 * 0.4125 = 0.28875 keeps 0.9 and -0.6; alpha = (0.9 + 0.6) / 2 = 0.75
    q = ternarize(w)
    assert torch.allclose(q.detach(), torch.tensor([[0.75, 0.0, 0.0, -0.75]]))
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones(1, 4))


def test_uniform_weight_levels():
    w = torch.tensor([[1.27, -0.5, 0.004]])
    q = quantize_weight(w, 8)  # scale 1.27 / 127 = 0.01
    assert torch.allclose(q, torch.tensor([[1.27, -0.5, 0.0]]), atol=1e-6)
    assert quantize_weight(w, 32) is w


def test_learned_step_forward_and_gradients():
    quant = LearnedStepQuantizer(8)
    quant.initialized.fill_(True)
    with torch.no_grad():
        quant.step.fill_(0.1)
    x = torch.tensor([0.26, -13.0, 0.04], requires_grad=True)
    y = quant(x)
    assert torch.allclose(y.detach(), torch.tensor([0.3, -12.7, 0.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 0.0, 1.0]))  # clipped values pass no gradient
    # LSQ: dy/ds = round(x/s) - x/s inside the range, -Qn outside; scaled by 1/sqrt(numel * Qp)
    expected = ((3 - 2.6) + (-127) + (0 - 0.4)) / (3 * 127) ** 0.5
    assert quant.step.grad.item() == pytest.approx(expected, rel=1e-4)


def test_learned_step_initialises_from_first_batch():
    quant = LearnedStepQuantizer(4)
    x = torch.tensor([1.0, -3.0])
    quant(x)
    assert bool(quant.initialized)
    assert quant.step.item() == pytest.approx(2 * 2.0 / 7 ** 0.5)


def elastic(signed: bool, alpha: float, beta: float) -> ElasticBinary:
    """An elastic binary quantizer with set alpha and beta (no first-batch initialisation)."""
    quant = ElasticBinary(signed=signed)
    quant.initialized.fill_(True)
    with torch.no_grad():
        quant.alpha.fill_(alpha)
        quant.beta.fill_(beta)
    return quant


def test_elastic_binary_unsigned_values_and_gradients():
    quant = elastic(signed=False, alpha=2.0, beta=0.5)
    x = torch.tensor([0.0, 1.4, 1.6, 5.0], requires_grad=True)
    y = quant(x)  # (x - 0.5) / 2 = [-0.25, 0.45, 0.55, 2.25] -> clip, round -> [0, 0, 1, 1]
    assert torch.equal(y.detach(), torch.tensor([0.0, 0.0, 2.0, 2.0]))
    y.sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    # d/dalpha = round(v) - v inside (0, 1), the level (0 or 1) outside: 0 - 0.45 + 1 - 0.55 + 0 + 1
    assert quant.alpha.grad.item() == pytest.approx(1.0)
    assert quant.beta.grad.item() == pytest.approx(-2.0)  # -1 per value inside the range


def test_elastic_binary_signed():
    quant = elastic(signed=True, alpha=2.0, beta=0.5)
    x = torch.tensor([-1.0, 0.4, 0.6, 3.5], requires_grad=True)
    y = quant(x)  # (x - 0.5) / 2 = [-0.75, -0.05, 0.05, 1.5]
    assert torch.equal(y.detach(), torch.tensor([-2.0, -2.0, 2.0, 2.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    # BiT: d/dalpha = sign((x - beta) / alpha) for every value, -1 - 1 + 1 + 1; d/dbeta = -1 inside the clip
    assert quant.alpha.grad.item() == pytest.approx(0.0)
    assert quant.beta.grad.item() == pytest.approx(-3.0)


def test_elastic_binary_signed_alpha_gradient_is_the_sign():
    quant = elastic(signed=True, alpha=1.5, beta=-0.2)
    x = torch.randn(200, generator=torch.Generator().manual_seed(0)) * 2
    quant(x).mul(torch.linspace(-1, 2, 200)).sum().backward()
    upstream = torch.linspace(-1, 2, 200)
    assert quant.alpha.grad.item() == pytest.approx((torch.where(x + 0.2 >= 0, 1.0, -1.0) * upstream).sum().item(),
                                                    abs=1e-5)


def test_activation_quantizer_choice():
    assert isinstance(activation_quantizer(32), torch.nn.Identity)
    assert isinstance(activation_quantizer(8), LearnedStepQuantizer)
    assert isinstance(activation_quantizer(1, signed=False), ElasticBinary)


def test_ternary_threshold_is_seven_tenths_of_the_mean():
    # mean|w| = 0.4, so Delta = 0.28 falls between 0.27 and 0.29: any factor outside about 0.68..0.72 keeps or
    # drops another weight
    w = torch.tensor([[1.0, -0.29, 0.27, 0.04]])
    assert torch.allclose(ternarize(w), torch.tensor([[0.645, -0.645, 0.0, 0.0]]))


def test_elastic_binary_starts_from_its_first_batch():
    # BiT: signed beta = mean(x), alpha = mean|x - beta|; unsigned ({0, alpha}) beta = 0, alpha = 2 mean|x|
    x = torch.tensor([1.0, 2.0, 4.0, 5.0])
    signed, unsigned = ElasticBinary(signed=True), ElasticBinary(signed=False)
    assert torch.equal(signed(x), torch.tensor([-1.5, -1.5, 1.5, 1.5]))  # sign((x - 3) / 1.5)
    assert (signed.beta.item(), signed.alpha.item()) == (3.0, 1.5) and bool(signed.initialized)
    assert torch.equal(unsigned(x), torch.tensor([0.0, 0.0, 6.0, 6.0]))  # round(clip(x / 6, 0, 1)) * 6
    assert (unsigned.beta.item(), unsigned.alpha.item()) == (0.0, 6.0)
    signed(x * 10)  # later batches do not move the initial values
    assert (signed.beta.item(), signed.alpha.item()) == (3.0, 1.5)


def test_uniform_weight_gradient_is_clipped_straight_through():
    w = torch.tensor([[1.27, -0.5, 0.004, -1.5]], requires_grad=True)
    quantize_weight(w, 8).backward(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert torch.equal(w.grad, torch.tensor([[0.0, 2.0, 3.0, 0.0]]))  # |w| > 1 gets none
