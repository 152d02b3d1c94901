"""The four vocabulary-sized products of each chunk of :mod:`kdistill.losses.chunked`: the student's and the
teacher's logits, then the student's hidden-state and head gradients. They are most of the chunked loss's time,
so how they are computed is a choice (``matmuls``): torch's own products, or three TF32 tensor-core products for
each float32 one (:mod:`kdistill.losses.split_matmul`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.losses import split_matmul

Tensor = torch.Tensor


def _logits_into(out: Tensor, x: Tensor, w: Tensor, b: Tensor | None, temperature: float) -> None:
    """out ← (x·wᵀ + b)/τ in float32, without a temporary when everything is float32."""
    if x.dtype == w.dtype == out.dtype and (b is None or b.dtype == out.dtype):
        # beta=0 ignores out's old contents (NaN included); τ folds into the matmul's scaling
        torch.addmm(out if b is None else b, x, w.T, beta=0.0 if b is None else 1.0 / temperature,
                    alpha=1.0 / temperature, out=out)
    else:  # low-precision heads: logits in their dtype, as the plain path makes them, then float32
        out.copy_(F.linear(x, w, b))
        if temperature != 1:
            out.div_(temperature)


class TorchProducts:
    """torch's products: float32 ones (IEEE unless torch.set_float32_matmul_precision allows TF32), or a
    low-precision head's own dtype."""

    def __init__(self, w: Tensor, t_w: Tensor, temperature: float):
        self.w, self.t_w, self.temperature = w, t_w, temperature

    def operand(self, x: Tensor) -> Tensor:
        """A chunk's hidden states as the products take them."""
        return x

    def student_logits(self, out: Tensor, x, bias: Tensor | None) -> None:
        _logits_into(out, x, self.w, bias, self.temperature)

    def teacher_logits(self, out: Tensor, x, bias: Tensor | None) -> None:
        _logits_into(out, x, self.t_w, bias, self.temperature)

    def gradient(self, lq: Tensor, lp: Tensor, split_by_rows: bool):
        """∂ℓ/∂s, left in lq by the rows, as the gradient products take it."""
        return lq if self.w.dtype == torch.float32 else lq.to(self.w.dtype)

    def hidden_gradient(self, g, scale: float) -> Tensor:
        return torch.mm(g, self.w).mul_(scale)

    def add_head_gradient(self, grad_w: Tensor, g, x, scale: float) -> None:
        if g.dtype == grad_w.dtype:
            grad_w.addmm_(g.T, x, alpha=scale)
        else:
            grad_w.add_(g.T @ x, alpha=scale)


SPLIT_SLICE = 1 << 23
"""The teacher's head is split a slice of at most this many weights at a time (two 32 MiB buffers), not kept
split whole: it enters one product per chunk, where the student's enters two and is split once per call
(measured on an H200 at 128k × 2,048: 1,637 MiB of extra memory against 2,951 with both heads split whole,
19.0 ms against 16.0)."""


class SplitProducts:
    """Each float32 product as three TF32 products (split_matmul): operands are (hi, lo) pairs."""

    def __init__(self, w: Tensor, t_w: Tensor, temperature: float):
        self.w, self.t_w, self.alpha = split_matmul.split(w), t_w, 1.0 / temperature
        self.slice_rows = max(1, SPLIT_SLICE // t_w.shape[1])

    def operand(self, x: Tensor):
        return split_matmul.split(x)

    def student_logits(self, out: Tensor, x, bias: Tensor | None) -> None:
        split_matmul.addmm(out, x, split_matmul.transposed(self.w), alpha=self.alpha, bias=bias)

    def teacher_logits(self, out: Tensor, x, bias: Tensor | None) -> None:
        for first in range(0, self.t_w.shape[0], self.slice_rows):
            cut = slice(first, first + self.slice_rows)
            split_matmul.addmm(out[:, cut], x, split_matmul.transposed(split_matmul.split(self.t_w[cut])),
                               alpha=self.alpha, bias=None if bias is None else bias[cut])

    def gradient(self, lq: Tensor, lp: Tensor, split_by_rows: bool):
        """∂ℓ/∂s as a (hi, lo) pair: already split by the Triton rows (hi in the teacher's buffer, free by then),
        or split now into that buffer."""
        return (lp, lq) if split_by_rows else split_matmul.split_into(lq, lp)

    def hidden_gradient(self, g, scale: float) -> Tensor:
        out = g[0].new_empty(g[0].shape[0], self.w[0].shape[1])
        return split_matmul.addmm(out, g, self.w, alpha=scale)

    def add_head_gradient(self, grad_w: Tensor, g, x, scale: float) -> None:
        split_matmul.addmm(grad_w, split_matmul.transposed(g), x, alpha=scale, beta=1.0)


PRODUCTS = {"torch": TorchProducts, "tf32x3": SplitProducts}
"""The chunked loss's ``matmuls`` choices."""
