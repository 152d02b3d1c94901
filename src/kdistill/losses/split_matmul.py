"""Float32 matrix products on TF32 tensor cores, at float32 accuracy ("3xTF32").

A TF32 product keeps 10 of float32's 23 mantissa bits of each input: fast on tensor cores, but its
relative error (about 2^-11 per input) is far above float32's, so a loss computed with it no longer
equals the float32 one to 1e-5. Splitting each input x = hi + lo, with hi = x rounded to TF32 (exact
in TF32) and lo = x − hi (exact in float32, |lo| ≤ 2^-11·|x|), gives

    a·b = hi_a·hi_b + hi_a·lo_b + lo_a·hi_b + lo_a·lo_b

and the first three terms, each a TF32 product, lose only lo_a·lo_b (≤ 2^-22 relative) and the TF32
rounding of the lo factors (about 2^-22 too): the size of float32's own rounding of a dot product.
Three tensor-core products then replace one float32 (SIMT) product, which on GPUs whose tensor cores
are several times faster than their float32 units is the better deal (CUTLASS calls it 3xTF32).

Only CUDA has TF32 tensor cores; elsewhere the same three products run in float32 (slower than one
product and no more accurate: only the tests use that).
"""
from __future__ import annotations

import contextlib

import torch

Tensor = torch.Tensor

_ROUND_BIT = 1 << 12        # half of the last kept mantissa bit: adding it rounds to nearest (ties away)
_KEEP_TF32 = -(1 << 13)     # 0xFFFFE000 as int32: sign, exponent and the top 10 mantissa bits


def split(x: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) with hi = x rounded to TF32 and lo = x − hi, both float32, hi + lo == x exactly.
    x must be finite (a value within half a TF32 step of float32's largest would round to inf)."""
    x = x.contiguous()
    hi = torch.empty_like(x)
    _round_into(x, hi)
    return hi, x - hi


def _round_into(x: Tensor, hi: Tensor) -> None:
    """hi ← x rounded to TF32, in hi's own memory (an int32 temporary would be another x-sized buffer)."""
    bits = hi.view(torch.int32)
    torch.add(x.view(torch.int32), _ROUND_BIT, out=bits)
    bits.bitwise_and_(_KEEP_TF32)


def split_into(x: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`split` in place: ``hi`` (a buffer of x's shape) gets the TF32 part and ``x`` becomes the rest."""
    _round_into(x, hi)
    return hi, x.sub_(hi)


@contextlib.contextmanager
def tf32_products(device: torch.device):
    """Float32 matmuls on ``device`` may use TF32 inside the block; torch's setting is restored after."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def addmm(out: Tensor, a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], *, alpha: float = 1.0,
          beta: float = 0.0, bias: Tensor | None = None) -> Tensor:
    """out ← beta·out + alpha·(a·b) [+ alpha·bias when beta is 0], a and b given as :func:`split` pairs.
    The small terms go first, so the large one is added to an accumulator that already holds them."""
    (a_hi, a_lo), (b_hi, b_lo) = a, b
    with tf32_products(out.device):
        if bias is not None and beta == 0.0:
            torch.addmm(bias, a_lo, b_hi, beta=alpha, alpha=alpha, out=out)
        else:
            torch.addmm(out, a_lo, b_hi, beta=beta, alpha=alpha, out=out)
        out.addmm_(a_hi, b_lo, alpha=alpha)
        out.addmm_(a_hi, b_hi, alpha=alpha)
    return out


def transposed(pair: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return pair[0].T, pair[1].T
