"""Fused divergence rows for GPUs (Triton): the chunked loss's per-row value and gradient in one kernel.

The torch kernels in :mod:`kdistill.losses.chunk_kernels` take log-probabilities and run a dozen
elementwise and reduction ops over each chunk, each one a full read or write of a chunk-sized buffer.
On a GPU the chunk does not fit in cache, so those passes over memory are the divergence's whole cost
(measured on an H100 at 128k × 2048: about a third of the chunked loss's time at β = 0.5). Here one
program per row reads the raw tempered logits and makes at most three passes: the two log-sum-exps,
the row sums the gradient needs, then the gradient itself, written over the student's logits. The
formulas are those of chunk_kernels (gradients with respect to s = z/τ), so both paths agree to
float32 rounding; the tests run this file through Triton's interpreter on the CPU.

Only the divergences the causal-LM recipes spend their time in are here (KL, reverse KL, generalised
JSD, soft cross-entropy); the others keep the torch kernels.
"""
from __future__ import annotations

import contextlib
import os

import torch

from kdistill.losses.chunk_kernels import _TINY, reduced

try:  # Triton ships with CUDA builds of torch; a CPU install has none, and needs none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

Tensor = torch.Tensor

MODES = {"kl": 0, "reverse_kl": 1, "generalized_jsd": 2, "soft_ce": 3}  # after chunk_kernels.reduced: js included
BLOCK = 4096


def available(device: torch.device) -> bool:
    """Whether rows on ``device`` can use the Triton kernel: CUDA with Triton installed, or Triton's CPU
    interpreter when TRITON_INTERPRET=1 (how the tests run it)."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def rows_for(name: str, beta: float, alpha: float):
    """A ``rows(s, t) -> values`` function for divergence ``name``, or None where this module has none.
    ``s`` and ``t`` are (rows, V) float32 tempered logits; ``s`` is overwritten with ∂ℓ/∂s."""
    form = reduced(name, beta, alpha)
    if form is None or form[0] not in MODES:
        return None
    mode = MODES[form[0]]
    beta = form[1] if mode == 2 else 0.0

    def rows(s: Tensor, t: Tensor) -> Tensor:
        n, vocab = s.shape
        values = torch.empty(n, dtype=torch.float32, device=s.device)
        if n:
            block = min(BLOCK, triton.next_power_of_2(vocab))
            # Triton launches on the current device, which need not be the tensors'
            with torch.cuda.device(s.device) if s.is_cuda else contextlib.nullcontext():
                _divergence_rows[(n,)](s, t, values, s.stride(0), t.stride(0), float(beta), _TINY, VOCAB=vocab,
                                       MODE=mode, BLOCK=block, num_warps=8 if block >= 2048 else 4)
        return values

    return rows


if triton is not None:
    @triton.jit
    def _lse(ptr, VOCAB: tl.constexpr, BLOCK: tl.constexpr):
        """log Σ exp over one row, in one streaming pass (running maximum, rescaled sum), per lane."""
        cols = tl.arange(0, BLOCK)
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK], tl.float32)
        for start in range(0, VOCAB, BLOCK):
            x = tl.load(ptr + start + cols, mask=start + cols < VOCAB, other=float("-inf"))
            new = tl.maximum(top, x)
            # lanes still at -inf keep a zero sum (exp(-inf - -inf) would be NaN)
            total = tl.where(new == float("-inf"), 0.0, total * tl.exp(top - new) + tl.exp(x - new))
            top = new
        row_max = tl.max(top, 0)
        return row_max + tl.log(tl.sum(total * tl.exp(top - row_max), 0))

    @triton.jit
    def _divergence_rows(s_ptr, t_ptr, out_ptr, s_stride, t_stride, beta, tiny,
                         VOCAB: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s_ptr += row * s_stride
        t_ptr += row * t_stride
        lse_s = _lse(s_ptr, VOCAB, BLOCK)
        lse_t = _lse(t_ptr, VOCAB, BLOCK)
        cols = tl.arange(0, BLOCK)
        # pass 2: the row sums (and, for KL and soft CE, whose gradient q − p needs none, the gradient)
        acc_a = tl.zeros([BLOCK], tl.float32)
        acc_b = tl.zeros([BLOCK], tl.float32)
        for start in range(0, VOCAB, BLOCK):
            keep = start + cols < VOCAB
            log_q = tl.load(s_ptr + start + cols, mask=keep, other=0.0) - lse_s
            log_p = tl.load(t_ptr + start + cols, mask=keep, other=0.0) - lse_t
            q = tl.where(keep, tl.exp(log_q), 0.0)
            p = tl.where(keep, tl.exp(log_p), 0.0)
            if MODE == 0:  # KL(p‖q) = Σ p(log p − log q); ∂/∂s = q − p
                acc_a += p * (log_p - log_q)
                tl.store(s_ptr + start + cols, q - p, mask=keep)
            elif MODE == 3:  # −Σ p log q; ∂/∂s = q − p
                acc_a -= p * log_q
                tl.store(s_ptr + start + cols, q - p, mask=keep)
            elif MODE == 1:  # KL(q‖p) = Σ q(log q − log p)
                acc_a += q * (log_q - log_p)
            else:  # β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q
                log_m = tl.log(tl.maximum(beta * p + (1.0 - beta) * q, tiny))
                acc_a += p * (log_p - log_m)
                acc_b += q * (log_q - log_m)
        value_a = tl.sum(acc_a, 0)
        value_b = tl.sum(acc_b, 0)
        if MODE == 2:
            value = beta * value_a + (1.0 - beta) * value_b
        else:
            value = value_a
        # pass 3: gradients that need a row sum
        if MODE == 1 or MODE == 2:
            for start in range(0, VOCAB, BLOCK):
                keep = start + cols < VOCAB
                log_q = tl.load(s_ptr + start + cols, mask=keep, other=0.0) - lse_s
                log_p = tl.load(t_ptr + start + cols, mask=keep, other=0.0) - lse_t
                q = tl.exp(log_q)
                if MODE == 1:  # ∂/∂s = q(log q − log p − ℓ)
                    grad = q * (log_q - log_p - value_a)
                else:  # ∂/∂s = (1−β)·q·(log q − log m − KL(q‖m))
                    log_m = tl.log(tl.maximum(beta * tl.exp(log_p) + (1.0 - beta) * q, tiny))
                    grad = (1.0 - beta) * q * (log_q - log_m - value_b)
                tl.store(s_ptr + start + cols, grad, mask=keep)
        tl.store(out_ptr + row, value)
