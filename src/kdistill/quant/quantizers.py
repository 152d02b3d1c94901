"""Weight and activation quantizers for quantization-aware distillation (fake quantization).

Weights keep a full-precision latent copy that the optimiser updates; the forward pass uses the
quantized values and the backward pass goes straight through to the latent weights (STE).
Scales are per output row (dim 0 of a linear weight), so a row of a binary matrix is one scale
and one bit per input, which is what the packed export stores.
"""
from __future__ import annotations

import torch
from torch import nn

TERNARY_THRESHOLD = 0.7  # TWN: Delta = 0.7 * mean|w|, the closed-form approximation of the optimal threshold


def sign(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, so every binary value is one of two levels."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class _ClippedStraightThrough(torch.autograd.Function):
    """Forward: a given quantized tensor. Backward: the gradient passes where |w| <= 1 (BWN's STE)."""

    @staticmethod
    def forward(ctx, w, quantized):
        ctx.save_for_backward(w)
        return quantized

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype), None


def binary_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-row scale alpha = mean|w| (BWN): minimises ||w - alpha*sign(w)||^2."""
    return w.abs().mean(dim=-1, keepdim=True)


def binarize(w: torch.Tensor) -> torch.Tensor:
    """BWN: alpha * sign(w) per row, straight-through gradient clipped to |w| <= 1."""
    with torch.no_grad():
        q = binary_scale(w) * sign(w)
    return _ClippedStraightThrough.apply(w, q)


def ternary_parts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN per row: the mask |w| > Delta (Delta = 0.7 mean|w|) and alpha = mean of |w| over the mask."""
    delta = TERNARY_THRESHOLD * w.abs().mean(dim=-1, keepdim=True)
    mask = w.abs() > delta
    alpha = (w.abs() * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    return mask, alpha


def ternarize(w: torch.Tensor) -> torch.Tensor:
    """TWN: alpha * sign(w) where |w| > Delta, else 0; straight-through gradient clipped to |w| <= 1."""
    with torch.no_grad():
        mask, alpha = ternary_parts(w)
        q = alpha * sign(w) * mask
    return _ClippedStraightThrough.apply(w, q)


def uniform_weights(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric uniform per row with the max-abs scale (TernaryBERT's 8-bit weights)."""
    with torch.no_grad():
        levels = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / levels
        q = torch.round(w / scale).clamp(-levels, levels) * scale
    return _ClippedStraightThrough.apply(w, q)


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 32:
        return w
    if bits == 1:
        return binarize(w)
    if bits == 2:
        return ternarize(w)
    return uniform_weights(w, bits)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign forward; identity gradient clipped to |x| <= 1 (the usual binary-activation STE)."""
    clipped = x.clamp(-1, 1)
    return clipped + (sign(x) - clipped).detach()


class ActivationQuantizer(nn.Module):
    """Learned parameters initialised from the first batch it sees (in training or calibration)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            with torch.no_grad():
                self.init_from(x.detach())
            self.initialized.fill_(True)
        return self.quantize(x)

    def init_from(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LearnedStepQuantizer(ActivationQuantizer):
    """LSQ (Esser 2020): round(clip(x/s, -Qn, Qp)) * s with a learned step s, symmetric and signed."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.qmax = 2 ** (bits - 1) - 1
        self.step = nn.Parameter(torch.ones(()))

    def init_from(self, x):
        self.step.copy_((2 * x.abs().mean() / self.qmax ** 0.5).clamp(min=1e-6))

    def quantize(self, x):
        # LSQ's gradient scale keeps the step's update comparable to the weights' across layer sizes
        g = 1.0 / (x.numel() * self.qmax) ** 0.5
        step = self.step * g + (self.step - self.step * g).detach()
        return round_ste((x / step).clamp(-self.qmax, self.qmax)) * step

    def extra_repr(self):
        return f"bits={self.bits}"


class ElasticBinary(ActivationQuantizer):
    """BiT's elastic binary activation with learned scale alpha and shift beta.

    unsigned: alpha * clip(round((x - beta) / alpha), 0, 1), values {0, alpha} (e.g. attention probabilities)
    signed:   alpha * sign((x - beta) / alpha),                values {-alpha, alpha} (e.g. queries, keys)
    """

    def __init__(self, signed: bool = True):
        super().__init__()
        self.signed = signed
        self.alpha = nn.Parameter(torch.ones(()))
        self.beta = nn.Parameter(torch.zeros(()))

    def init_from(self, x):
        if self.signed:
            self.beta.copy_(x.mean())
            self.alpha.copy_((x - x.mean()).abs().mean().clamp(min=1e-6))
        else:  # {0, alpha}: alpha near twice the mean keeps the rounding threshold at the mean
            self.beta.zero_()
            self.alpha.copy_((2 * x.abs().mean()).clamp(min=1e-6))

    def quantize(self, x):
        alpha = self.alpha.abs().clamp(min=1e-6)
        if self.signed:
            # alpha cancels inside the sign, so d/dalpha is sign((x - beta) / alpha) alone, as in BiT; a
            # straight-through path through the division would add -(x - beta) / alpha inside the clip
            return alpha * sign_ste((x - self.beta) / alpha.detach())
        scaled = (x - self.beta) / alpha
        return alpha * round_ste(scaled.clamp(0, 1))

    def extra_repr(self):
        return f"signed={self.signed}"


def activation_quantizer(bits: int, signed: bool = True) -> nn.Module:
    """32 -> identity; 8/4 -> learned step; 1 -> elastic binary."""
    if bits == 32:
        return nn.Identity()
    if bits == 1:
        return ElasticBinary(signed)
    return LearnedStepQuantizer(bits)
