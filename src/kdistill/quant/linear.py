"""QuantLinear: a linear layer with quantized weights and a quantized input, and BinaryBERT's
ternary weight splitting."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.quant.quantizers import activation_quantizer, binary_scale, quantize_weight, sign, ternary_parts


class QuantLinear(nn.Module):
    """y = Q_a(x) @ Q_w(W)^T + b with full-precision latent weights.

    After a ternary -> binary split the layer holds two latent matrices whose binarized sum is the
    weight: two binary layers side by side, the "twice as wide" binary model of BinaryBERT.
    Parameter names `weight` and `bias` match nn.Linear so state dicts line up."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 32,
                 activation_bits: int = 32, signed_input: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.weight_split: nn.Parameter | None = None
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.signed_input = signed_input  # False after GELU/ReLU: BiT binarizes those inputs to {0, alpha}
        self.input_quant = activation_quantizer(activation_bits, signed=signed_input)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_bits: int, activation_bits: int,
                    signed_input: bool = True) -> "QuantLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_bits, activation_bits,
                    signed_input)
        layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @property
    def is_split(self) -> bool:
        return self.weight_split is not None

    def quantized_weight(self) -> torch.Tensor:
        w = quantize_weight(self.weight, self.weight_bits)
        if self.weight_split is not None:
            w = w + quantize_weight(self.weight_split, self.weight_bits)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x), self.quantized_weight(), self.bias)

    def set_activation_bits(self, bits: int) -> None:
        if bits != self.activation_bits:
            self.activation_bits = bits
            self.input_quant = activation_quantizer(bits, signed=self.signed_input).to(self.weight.device)

    def extra_repr(self):
        split = ", split" if self.is_split else ""
        return f"{self.in_features}, {self.out_features}, W{self.weight_bits}A{self.activation_bits}{split}"


def split_ternary_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two latent matrices w1, w2 with binarize(w1) + binarize(w2) == ternarize(w), row by row.

    Per row, with I = {|w| > Delta} (ternary non-zero) and Z its complement:
      on I:           w1 = a*w,            w2 = (1-a)*w        both carry sign(w), scales add up
      on Z, w >= 0:   w1 = w + b,          w2 = -b             the two signs cancel
      on Z, w < 0:    w1 = w - b,          w2 = +b
    and a, b are chosen so both halves get the scale alpha/2 (alpha = TWN's scale):
      a = (S_I - S_Z) / (2 S_I),   b = (n S_I / |I| - S_I - S_Z) / (2 |Z|),   S_X = sum of |w| over X.
    (BinaryBERT, Bai et al. 2021, section 3.1; derived again here so the signs match our sets.)"""
    mask, _ = ternary_parts(w)
    absw = w.abs()
    n = w.shape[-1]
    s_i = (absw * mask).sum(-1, keepdim=True)
    s_z = (absw * ~mask).sum(-1, keepdim=True)
    count_i = mask.sum(-1, keepdim=True).clamp(min=1)
    count_z = (~mask).sum(-1, keepdim=True).clamp(min=1)
    has_i = mask.any(-1, keepdim=True)
    a = torch.where(has_i, (s_i - s_z) / (2 * s_i.clamp(min=1e-12)), torch.full_like(s_i, 0.5))
    b = (n * s_i / count_i - s_i - s_z) / (2 * count_z)
    if bool((a <= 0).any()):
        raise ValueError("ternary weight splitting needs the kept weights to outweigh the zeroed ones in every row")
    # a row with no zeroed weights needs no b; keep b > 0 so sign(-b) and sign(w + b) are well defined
    b = b.clamp(min=1e-8)
    s = sign(w)
    w1 = torch.where(mask, a * w, w + s * b)
    w2 = torch.where(mask, (1 - a) * w, -s * b)
    return w1, w2


def split_layer(layer: QuantLinear) -> None:
    """Turn a ternary QuantLinear into a split binary one with the same output at this moment."""
    if layer.weight_bits != 2 or layer.is_split:
        raise ValueError(f"only an unsplit ternary layer can be split (this one is {layer.extra_repr()})")
    with torch.no_grad():
        w1, w2 = split_ternary_weight(layer.weight.detach())
        layer.weight.copy_(w1)
        layer.weight_split = nn.Parameter(w2.clone())
    layer.weight_bits = 1


def packed_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(signs as 0/1 bits, per-row scale) of binarize(w): what a 1-bit export stores."""
    with torch.no_grad():
        return (sign(w) > 0), binary_scale(w).squeeze(-1)


__all__ = ["QuantLinear", "split_layer", "split_ternary_weight", "packed_rows"]
