"""Memory-bounded logit distillation for causal LMs with large vocabularies.

A plain logit loss materialises student and teacher logits for every token at once: B·L·V floats
per model, plus as much again for their gradient. With V ≈ 150k that dwarfs the model itself.
:func:`chunked_divergence` takes the final hidden states and the LM-head weights instead, builds
the logits a chunk of tokens at a time, and computes the student's gradient inside the forward
pass, chunk by chunk (the trick behind Liger's fused linear losses): each chunk's gradient with
respect to its logits goes straight into the hidden-state and head gradients, so backward only
rescales them. Peak extra memory is a few chunk-sized buffers (by default at most
:data:`LOGITS_PER_CHUNK` floats each, whatever the vocabulary and length), plus one gradient the
size of the student's LM head.

Each divergence's value and gradient are written out in closed form (:mod:`kdistill.losses.chunk_kernels`) and
run in place on reused buffers; that is most of the speed, since autograd through the generic functions would
make a dozen chunk-sized temporaries per chunk. On CUDA the common ones run instead as one Triton program per
row (:mod:`kdistill.losses.triton_rows`), which reads the logits at most three times. Both equal the function
of the same name in :mod:`kdistill.losses.functional` (to float32 rounding), with the same mask semantics: the mean
over unmasked positions. Logits that are not finite (a -inf bias ruling tokens out, say) fall back
to autograd through those functions, which define the 0·log 0 and ±inf cases.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from kdistill.losses import functional, triton_rows
from kdistill.losses.chunk_kernels import kernel_for

Tensor = torch.Tensor
Divergence = Callable[..., Tensor]

LOGITS_PER_CHUNK = 1 << 24
"""Default chunk height is LOGITS_PER_CHUNK // vocab tokens (at most CHUNK_TOKENS): a count of
logits, not of tokens, so the working set (2–4 float32 buffers of at most this many logits, 64 MiB
each) is bounded whatever the vocabulary and length."""

CHUNK_TOKENS = 128
"""Tallest default chunk. Every chunk streams the LM heads through its matmuls again, so short
chunks are slow (at 128k vocabulary, 64 tokens took 11% and 32 tokens 27% longer than 128), while
past 128 the matmuls gain little (256: 3%) and the buffers keep growing."""

POSITIONS_PER_CHUNK = 8
"""A default chunk also holds at most 1/POSITIONS_PER_CHUNK of the positions (but at least
SHORTEST_CHUNK tokens): the 2–4 buffers then stay under half of one full logits tensor, where the
plain path holds five or six (at 32k × 512: 64-token chunks, 45 MiB of buffers against 1.1 GiB for
TRL, 7% slower than 128-token ones)."""

SHORTEST_CHUNK = 32

CHUNKED_DIVERGENCES = tuple(name for name in functional.DIVERGENCES if name != "mse")
"""Names accepted by :func:`chunked_divergence`'s ``divergence`` argument ("mse" needs whole logits)."""

# ---- the chunked pass --------------------------------------------------------------------------

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


def _kept_rows(mask: Tensor | None, lead: torch.Size, device: torch.device) -> Tensor | None:
    """Indices of the flattened positions that count, with functional's broadcasting rules;
    None when all do (chunks are then slices, not copies)."""
    if mask is None:
        return None
    mask = mask.to(device=device, dtype=torch.bool)
    try:
        mask = torch.broadcast_to(mask, lead)
    except RuntimeError as error:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the leading "
                         f"dimensions {tuple(lead)} of the hidden states") from error
    return mask.reshape(-1).nonzero().squeeze(1)


def _chunks(rows: Tensor | None, count: int, chunk_size: int):
    """(start, stop, what to take) per chunk: a slice of the flat positions or their indices."""
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        yield start, stop, slice(start, stop) if rows is None else rows[start:stop]


def _take(x: Tensor, part) -> Tensor:
    return x[part] if isinstance(part, slice) else x.index_select(0, part)


def _head(weight: Tensor, bias: Tensor | None, vocab: int) -> tuple[Tensor, Tensor | None]:
    # Slicing rows is a view: padded vocabulary rows never enter a matmul.
    return weight[:vocab], None if bias is None else bias[:vocab]


def _log_probs_into(out: Tensor, h: Tensor, w: Tensor, b: Tensor | None, temperature: float,
                    normalise: bool = True) -> Tensor:
    """out ← log_softmax((h·wᵀ + b)/τ) in float32, without a temporary when everything is float32
    (only (h·wᵀ + b)/τ when not ``normalise``: the Triton kernels normalise as they read)."""
    if h.dtype == w.dtype == out.dtype and (b is None or b.dtype == out.dtype):
        # beta=0 ignores out's old contents (NaN included); τ folds into the matmul's scaling
        torch.addmm(out if b is None else b, h, w.T, beta=0.0 if b is None else 1.0 / temperature,
                    alpha=1.0 / temperature, out=out)
    else:  # low-precision heads: logits in their dtype, as the plain path makes them, then float32
        out.copy_(F.linear(h, w, b))
        if temperature != 1:
            out.div_(temperature)
    return torch.log_softmax(out, -1, out=out) if normalise else out


KERNELS = ("auto", "torch", "triton")
"""Values of :func:`chunked_divergence`'s ``kernels``: "auto" takes Triton's fused rows where they exist
(a CUDA device with Triton) and the torch kernels elsewhere."""


def pick_kernel(divergence: str, beta: float, alpha: float, device: torch.device, kernels: str = "auto"):
    """(rows function, scratch buffers, whether it wants log-probabilities), or None for a constant zero."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels != "torch" and triton_rows.available(device):
        rows = triton_rows.rows_for(divergence, beta, alpha)
        if rows is not None:
            return rows, 0, False
    if kernels == "triton":
        raise ValueError("kernels='triton' needs Triton, which is not installed (it comes with CUDA builds of "
                         "torch); kernels='auto' uses the torch kernels without it" if triton_rows.triton is None
                         else f"no Triton kernel for {divergence!r} on {device}: Triton's rows cover js and "
                         f"{', '.join(triton_rows.MODES)} on CUDA (kernels='auto' falls back to torch's)")
    torch_kernel = kernel_for(divergence, beta, alpha)
    return None if torch_kernel is None else (*torch_kernel, True)


class _ChunkedDivergence(torch.autograd.Function):
    """Value and student gradients in one chunked pass; backward only rescales saved gradients."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, t_hidden: Tensor,
                t_weight: Tensor, t_bias: Tensor | None, rows: Tensor | None, fn: Divergence,
                kernel, temperature: float, vocab: int, chunk_size: int) -> Tensor:
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        # Gradients accumulated over chunks go to float32 buffers so low-precision heads do not
        # lose the small per-chunk contributions; they are cast back once, in backward.
        grads = (torch.zeros_like(hidden) if needs_h else None,
                 torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_w else None,
                 torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                 if needs_b and bias is not None else None)
        args = (hidden, weight, bias, t_hidden, t_weight, t_bias, rows, temperature, vocab, chunk_size)
        total = hidden.new_zeros((), dtype=torch.float32)
        if kernel is not None:
            total = _fused_pass(*args, kernel, grads)
            if not torch.isfinite(total):
                # Non-finite logits: start over with the definitions' own 0·log 0 and ±inf rules.
                for grad in grads:
                    if grad is not None:
                        grad.zero_()
                total = _autograd_pass(*args, fn, grads)
        # Kept on ctx, not save_for_backward: they are handed over (and scaled in place) in
        # backward, so the head's gradient is never copied.
        ctx.grads = grads
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):
        if ctx.grads is None:
            raise RuntimeError("chunked_divergence computes its gradient during the forward pass and "
                               "hands it over once; backpropagating the same loss twice "
                               "(retain_graph=True) is not supported: call chunked_divergence again")
        (grad_h, grad_w, grad_b), (w_dtype, b_dtype) = ctx.grads, ctx.dtypes
        ctx.grads = None
        grad_h = None if grad_h is None else grad_h.mul_(grad_output.to(grad_h.dtype))
        grad_w = None if grad_w is None else grad_w.mul_(grad_output).to(w_dtype)
        grad_b = None if grad_b is None else grad_b.mul_(grad_output).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def _fused_pass(hidden, weight, bias, t_hidden, t_weight, t_bias, rows, temperature, vocab,
                chunk_size, kernel, grads) -> Tensor:
    """Σ of the per-row divergences / count, adding each chunk's gradient to ``grads`` on the way."""
    rows_fn, n_scratch, normalise = kernel
    grad_h, grad_w, grad_b = grads
    w, b = _head(weight, bias, vocab)
    t_w, t_b = _head(t_weight, t_bias, vocab)
    count = hidden.shape[0] if rows is None else rows.numel()
    # Allocated once and reused by every chunk (the last one uses a prefix).
    height = min(chunk_size, max(count, 1))
    lq, lp, *scratch = (torch.empty(height, vocab, dtype=torch.float32, device=hidden.device)
                        for _ in range(2 + n_scratch))
    # mean over positions and the 1/τ of s = z/τ, applied to the gradient inside the matmuls
    scale = 1.0 / (temperature * max(count, 1))
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start, stop, part in _chunks(rows, count, chunk_size):
        n = stop - start
        h = _take(hidden, part)
        _log_probs_into(lq[:n], h, w, b, temperature, normalise)
        _log_probs_into(lp[:n], _take(t_hidden, part), t_w, t_b, temperature, normalise)
        total += rows_fn(lq[:n], lp[:n], *(s[:n] for s in scratch)).sum()
        g = lq[:n] if w.dtype == torch.float32 else lq[:n].to(w.dtype)  # ∂ℓ/∂s per row
        if grad_h is not None:
            grad_h[part] = torch.mm(g, w).mul_(scale).to(grad_h.dtype)
        if grad_w is not None:
            if g.dtype == grad_w.dtype:
                grad_w[:vocab].addmm_(g.T, h, alpha=scale)
            else:
                grad_w[:vocab].add_(g.T @ h, alpha=scale)
        if grad_b is not None:
            grad_b[:vocab].add_(lq[:n].sum(0), alpha=scale)
    return total / max(count, 1)


def _autograd_pass(hidden, weight, bias, t_hidden, t_weight, t_bias, rows, temperature, vocab,
                   chunk_size, fn, grads) -> Tensor:
    """The same sum through autograd of ``functional``'s definitions: slower, for non-finite logits."""
    grad_h, grad_w, grad_b = grads
    w, b = _head(weight, bias, vocab)
    t_w, t_b = _head(t_weight, t_bias, vocab)
    count = hidden.shape[0] if rows is None else rows.numel()
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start, stop, part in _chunks(rows, count, chunk_size):
        h = _take(hidden, part)
        t_logits = F.linear(_take(t_hidden, part), t_w, t_b)
        # functional.* returns the chunk's mean; rescaling by n/count turns the chunk means
        # into the global mean over every kept position.
        scale = (stop - start) / count
        with torch.enable_grad():
            logits = F.linear(h, w, b).requires_grad_()
            loss = fn(logits, t_logits, temperature=temperature) * scale
        total += loss.detach().float()
        if not any(grad is not None for grad in grads) or not loss.requires_grad:
            continue
        (grad_logits,) = torch.autograd.grad(loss, logits)
        if grad_h is not None:
            grad_h[part] = (grad_logits @ w).to(grad_h.dtype)
        if grad_w is not None:
            grad_w[:vocab] += grad_logits.T @ h
        if grad_b is not None:
            grad_b[:vocab] += grad_logits.sum(0)
    return total


def default_chunk(positions: int, vocab: int) -> int:
    """Tokens per chunk: at most CHUNK_TOKENS, LOGITS_PER_CHUNK // vocab and an eighth of the positions,
    at least SHORTEST_CHUNK (or one, for a vocabulary past the logit budget)."""
    share = max(SHORTEST_CHUNK, math.ceil(positions / POSITIONS_PER_CHUNK))
    return max(1, min(CHUNK_TOKENS, LOGITS_PER_CHUNK // vocab, share))


def chunked_divergence(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                       teacher_weight: Tensor, *, divergence: str = "kl", beta: float = 0.5,
                       alpha: float = 0.1, temperature: float = 1.0, mask: Tensor | None = None,
                       chunk_size: int | None = None, student_bias: Tensor | None = None,
                       teacher_bias: Tensor | None = None, vocab_size: int | None = None,
                       kernels: str = "auto") -> Tensor:
    """``functional.<divergence>`` of the two LM heads' logits, without materialising them.

    Equal (values and gradients) to ``f(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, temperature=..., mask=...)`` with both
    logits cut to the first ``vocab_size`` columns, where ``f`` is the divergence named by
    ``divergence`` (one of :data:`CHUNKED_DIVERGENCES`; ``beta`` is used by "generalized_jsd",
    ``alpha`` by the skew ones). Hidden states are (..., D) with the same leading shape on both
    sides, e.g. (B, L, D) or (N, D); the heads are (V, D). ``mask`` is a boolean over the leading
    dims (or broadcastable to them). Masked positions are skipped, not computed.

    ``chunk_size`` is how many tokens' logits exist at a time; by default :func:`default_chunk`, so
    memory does not grow with the vocabulary and stays a fraction of the plain path's.

    Only the student gets gradients; the teacher side is computed without a graph. The graph
    this returns cannot be differentiated twice, nor backpropagated twice. ``vocab_size`` is the
    tokenizer's real size, needed when the two heads are padded to different sizes. ``kernels`` picks
    the per-chunk divergence code (:data:`KERNELS`); every choice gives the same values.
    """
    fn = functional.divergence_fn(divergence, beta=beta, alpha=alpha, valid=CHUNKED_DIVERGENCES)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
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
    chunk_size = chunk_size or default_chunk(lead.numel() if rows is None else rows.numel(), vocab)

    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    if not torch.is_grad_enabled():
        # Function.apply reports needs_input_grad from requires_grad even under no_grad; detaching
        # skips the per-chunk gradient matmuls that nobody will use.
        hidden, student_weight = hidden.detach(), student_weight.detach()
        student_bias = None if student_bias is None else student_bias.detach()
    t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    t_weight = teacher_weight.detach()
    t_bias = None if teacher_bias is None else teacher_bias.detach()
    return _ChunkedDivergence.apply(hidden, student_weight, student_bias, t_hidden, t_weight, t_bias,
                                    rows, fn, pick_kernel(divergence, beta, alpha, hidden.device, kernels),
                                    temperature, vocab,
                                    chunk_size)
