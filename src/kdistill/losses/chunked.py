"""Memory-bounded logit distillation for causal LMs with large vocabularies.

A plain logit loss materialises student and teacher logits for every token at once: B·L·V floats
per model, plus as much again for their gradient. With V ≈ 150k that dwarfs the model itself.
:func:`chunked_divergence` takes the final hidden states and the LM-head weights instead, builds
the logits a chunk of tokens at a time, and computes the student's gradient inside the forward
pass, chunk by chunk (the trick behind Liger's fused linear losses). Peak extra memory is then
O(chunk_size · V), plus one gradient buffer the size of the student's LM head.

The divergences themselves are not reimplemented: each chunk is handed to the function of the
same name in :mod:`kdistill.losses.functional`, so values and gradients match it exactly (to
float32 rounding), with the same mask semantics: the mean over unmasked positions.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from kdistill.losses import functional

Tensor = torch.Tensor
Divergence = Callable[..., Tensor]


CHUNKED_DIVERGENCES = tuple(name for name in functional.DIVERGENCES if name != "mse")
"""Names accepted by :func:`chunked_divergence`'s ``divergence`` argument ("mse" needs whole logits)."""


def _shared_vocab(student_weight: Tensor, teacher_weight: Tensor, vocab_size: int | None) -> int:
    """How many leading vocabulary columns the two heads are compared over."""
    v_s, v_t = student_weight.shape[0], teacher_weight.shape[0]
    if vocab_size is None:
        if v_s != v_t:
            raise ValueError(
                f"student LM head has {v_s} rows but the teacher's has {v_t}. If both use the same "
                "tokenizer and only the padding differs, pass vocab_size=len(tokenizer) to compare "
                "the first vocab_size logits; models with different tokenizers cannot be compared "
                "this way, since logit i means a different token on each side"
            )
        return v_s
    if not 0 < vocab_size <= min(v_s, v_t):
        raise ValueError(f"vocab_size must be in [1, {min(v_s, v_t)}] (the smaller LM head), "
                         f"got {vocab_size}")
    return vocab_size


def _kept_rows(mask: Tensor | None, lead: torch.Size, device: torch.device) -> Tensor:
    """Indices of the flattened positions that count, with functional's broadcasting rules."""
    if mask is None:
        return torch.arange(lead.numel(), device=device)
    mask = mask.to(device=device, dtype=torch.bool)
    try:
        mask = torch.broadcast_to(mask, lead)
    except RuntimeError as error:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the leading "
                         f"dimensions {tuple(lead)} of the hidden states") from error
    return mask.reshape(-1).nonzero().squeeze(1)


def _head(weight: Tensor, bias: Tensor | None, vocab: int) -> tuple[Tensor, Tensor | None]:
    # Slicing rows is a view: padded vocabulary rows never enter a matmul.
    return weight[:vocab], None if bias is None else bias[:vocab]


class _ChunkedDivergence(torch.autograd.Function):
    """Value and student gradients in one chunked pass; backward only rescales saved gradients."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, t_hidden: Tensor,
                t_weight: Tensor, t_bias: Tensor | None, rows: Tensor, fn: Divergence,
                temperature: float, vocab: int, chunk_size: int) -> Tensor:
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        w, b = _head(weight, bias, vocab)
        t_w, t_b = _head(t_weight, t_bias, vocab)
        # Gradients accumulated over chunks go to float32 buffers so low-precision heads do not
        # lose the small per-chunk contributions; they are cast back once, in backward.
        grad_h = torch.zeros_like(hidden) if needs_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_w else None
        grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                  if needs_b and bias is not None else None)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        count = rows.numel()

        for start in range(0, count, chunk_size):
            idx = rows[start:start + chunk_size]
            h = hidden.index_select(0, idx)
            t_logits = F.linear(t_hidden.index_select(0, idx), t_w, t_b)
            # functional.* returns the chunk's mean; rescaling by n/count turns the chunk means
            # into the global mean over every kept position.
            scale = idx.numel() / count
            if not (needs_h or needs_w or needs_b):
                total += fn(F.linear(h, w, b), t_logits, temperature=temperature).float() * scale
                continue
            with torch.enable_grad():
                logits = F.linear(h, w, b).requires_grad_()
                loss = fn(logits, t_logits, temperature=temperature) * scale
            total += loss.detach().float()
            if not loss.requires_grad:
                # A constant in the student (skew KL with alpha = 1): its gradient is zero.
                continue
            (grad_logits,) = torch.autograd.grad(loss, logits)
            if grad_h is not None:
                grad_h.index_copy_(0, idx, (grad_logits @ w).to(grad_h.dtype))
            if grad_w is not None:
                grad_w[:vocab] += grad_logits.T @ h
            if grad_b is not None:
                grad_b[:vocab] += grad_logits.sum(0)

        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        grad_h = None if grad_h is None else grad_h * grad_output.to(grad_h.dtype)
        grad_w = None if grad_w is None else (grad_w * grad_output).to(w_dtype)
        grad_b = None if grad_b is None else (grad_b * grad_output).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


def chunked_divergence(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                       teacher_weight: Tensor, *, divergence: str = "kl", beta: float = 0.5,
                       alpha: float = 0.1, temperature: float = 1.0, mask: Tensor | None = None,
                       chunk_size: int = 1024, student_bias: Tensor | None = None,
                       teacher_bias: Tensor | None = None, vocab_size: int | None = None) -> Tensor:
    """``functional.<divergence>`` of the two LM heads' logits, without materialising them.

    Equal (values and gradients) to ``f(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, temperature=..., mask=...)`` with both
    logits cut to the first ``vocab_size`` columns, where ``f`` is the divergence named by
    ``divergence`` (one of :data:`CHUNKED_DIVERGENCES`; ``beta`` is used by "generalized_jsd",
    ``alpha`` by the skew ones). Hidden states are (..., D) with the same leading shape on both
    sides, e.g. (B, L, D) or (N, D); the heads are (V, D). ``mask`` is a boolean over the leading
    dims (or broadcastable to them). Masked positions are skipped, not computed.

    Only the student gets gradients; the teacher side is computed without a graph. The graph
    this returns cannot be differentiated twice. ``vocab_size`` is the tokenizer's real size,
    needed when the two heads are padded to different sizes.
    """
    fn = functional.divergence_fn(divergence, beta=beta, alpha=alpha, valid=CHUNKED_DIVERGENCES)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"student hidden states have leading shape {tuple(lead)} but the "
                         f"teacher's have {tuple(teacher_hidden.shape[:-1])}")
    for name, hidden, weight in (("student", student_hidden, student_weight),
                                 ("teacher", teacher_hidden, teacher_weight)):
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"{name} LM head of shape {tuple(weight.shape)} does not map hidden "
                             f"size {hidden.shape[-1]} to a vocabulary")
    vocab = _shared_vocab(student_weight, teacher_weight, vocab_size)
    rows = _kept_rows(mask, lead, student_hidden.device)

    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    if not torch.is_grad_enabled():
        # Function.apply reports needs_input_grad from requires_grad even under no_grad; detaching
        # skips the per-chunk backward work that nobody will use.
        hidden, student_weight = hidden.detach(), student_weight.detach()
        student_bias = None if student_bias is None else student_bias.detach()
    t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    t_weight = teacher_weight.detach()
    t_bias = None if teacher_bias is None else teacher_bias.detach()
    return _ChunkedDivergence.apply(hidden, student_weight, student_bias, t_hidden, t_weight,
                                    t_bias, rows, fn, temperature, vocab, chunk_size)
