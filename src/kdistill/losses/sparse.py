"""Divergences between a student and a sparse (top-k) teacher, as kept by the teacher store.

A stored teacher position is its k most likely tokens — log-probabilities and vocabulary indices —
plus ``tail_logmass``, the log of the probability left outside them (see
:mod:`kdistill.teachers.store`). The full teacher distribution is gone, so a divergence needs a
rule for the tail. Two are offered:

``tail="bucket"`` (default)
    Both distributions are coarsened to k + 1 outcomes: the k stored tokens and one "everything
    else" bucket. The teacher's bucket holds its stored tail mass; the student's holds
    1 − Σ q over the k tokens, computed as a logsumexp over the student's other log-probabilities
    (no cancellation when the k tokens hold almost all the mass). The result is the *exact*
    divergence between these two coarsened distributions. Why this is the default:
    it is exact when k = V; it assumes nothing about how the teacher spreads its tail over the
    V − k unseen tokens; for every f-divergence here (KL, reverse KL, JS / generalised JSD, TVD,
    skew KL) the data-processing inequality makes it a lower bound of the full divergence that
    is 0 only when the coarsened distributions agree; and it costs O(k) beyond the student's own
    log-softmax. Soft cross-entropy is not a divergence, but its coarsened value is also at most
    the full one (log of a bucket's mass ≥ log of any of its tokens).
    The student is pushed to put the teacher's tail mass *somewhere* outside the top k, and is
    free to arrange it there as it likes.

``tail="uniform"``
    The teacher's tail mass is spread evenly over the V − k tokens outside its top k, and the
    divergence is computed over the full vocabulary. This fixes the student's tail shape to a
    flat one the teacher never had; it is offered for comparison with published sparse-KD
    setups, and costs one more (…, V) tensor.

Temperature: the store holds teacher log-probabilities at the temperature it was built with
(recorded in its manifest). ``temperature`` here divides the **student** logits only; the caller
must check that it equals the store's temperature (``TeacherStore.open(path, expect={"temperature":
τ})`` does). The stored teacher values are renormalised over the k + 1 buckets (or over V), so the
small rounding of float16 storage never leaves the teacher with a total mass other than 1.

Everything else follows :mod:`kdistill.losses.functional`: student first, float32 math, the mean
over unmasked positions, no τ² factor, and the same divergence names. The divergence functions
are not reimplemented: the coarsened (or densified) log-distributions are handed to
``functional.*`` with τ = 1, so conventions and edge cases (β = 0 / 1, α, 0·log 0, masks) match it
exactly. Gradients flow to ``student_logits`` only; the teacher tensors are detached.
Positions that are masked out must still hold valid indices in [0, V) (pad with 0, not −1).
If the student's vocabulary is padded beyond the teacher's, slice its logits to the store's
``vocab_size`` first (this matters for ``tail="uniform"``, which spreads over every column).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdistill.losses import functional

Tensor = torch.Tensor

SPARSE_DIVERGENCES = tuple(name for name in functional.DIVERGENCES if name != "mse")
"""Names accepted by :func:`sparse_divergence`'s ``divergence`` argument ("mse" needs full logits)."""

TAIL_MODES = ("bucket", "uniform")


def sparse_divergence(student_logits: Tensor, topk_logprobs: Tensor, topk_indices: Tensor, tail_logmass: Tensor,
                      divergence: str = "kl", *, beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0,
                      mask: Tensor | None = None, tail: str = "bucket") -> Tensor:
    """``divergence`` between softmax(student_logits / τ) and a stored top-k teacher.

    Shapes: ``student_logits`` (…, V); ``topk_logprobs`` and ``topk_indices`` (…, k) with k ≤ V;
    ``tail_logmass`` (…); ``mask`` boolean over (or broadcasting to) the leading dimensions.
    ``beta`` is used by "generalized_jsd", ``alpha`` by the skew divergences.
    """
    fn = functional.divergence_fn(divergence, beta=beta, alpha=alpha, valid=SPARSE_DIVERGENCES)
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be one of {', '.join(TAIL_MODES)}, got {tail!r}")
    _check_shapes(student_logits, topk_logprobs, topk_indices, tail_logmass)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    top = topk_logprobs.detach().float()
    indices = topk_indices.detach().long()
    log_tail = tail_logmass.detach().float()
    if tail == "bucket":
        student = _StudentBuckets.apply(student_logits, indices, float(temperature))
        teacher = torch.cat([top, log_tail.unsqueeze(-1)], dim=-1)
    else:
        student = F.log_softmax(student_logits.float() / temperature, dim=-1)
        teacher = uniform_teacher(top, indices, log_tail, student.shape[-1])
    # Both sides are already log-probabilities, so functional's log_softmax at τ = 1 leaves the
    # student unchanged and only renormalises the (rounded) teacher.
    return fn(student, teacher, temperature=1.0, mask=mask)


class _StudentBuckets(torch.autograd.Function):
    """(…, k + 1) log-probabilities of softmax(z / τ): the k tokens at ``indices``, then all the others, in five
    passes over the vocabulary (the copy with the k set to -inf, its maximum, the shift, exp, the sum) and one back.

    The autograd form makes a dozen vocabulary-sized tensors per step (log-softmax, the scattered copy, its
    masked fill and logsumexp, and their backwards), which made a step from the store cost 1.15–1.4× a plain
    SFT step. Here one buffer serves both directions: e = exp(s − m) over the tokens outside the k (the k set to
    −inf first), m the largest of those, so the rest bucket is log Σ e + m, a sum of its own terms shifted by its
    own maximum: it neither cancels (as 1 − Σ q_top would) nor underflows when the k hold nearly all the mass
    (as a shift by the overall maximum would), and no row needs a second look (which cost a device sync a
    step). The normaliser is logaddexp of the k's log-sum-exp and the rest's. With q_rest the rest's probability
    and G the sum of the incoming gradients, ∂/∂s_j = e_j/Σ e · (g_rest − q_rest·G) outside the k and
    g_i − q_i·G at token i of the k. The k indices of a position must be distinct (the store's are); masked
    positions may hold anything.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, indices: Tensor, temperature: float) -> Tensor:
        s = logits.float()
        if temperature != 1:
            s = s / temperature
        top = s.gather(-1, indices)
        e = s.scatter(-1, indices, -math.inf)
        peak = e.amax(-1, keepdim=True)
        # no token outside the k (k = V, or the rest all -inf): an empty bucket, log 0 = -inf, without NaN
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        e.sub_(peak).exp_()
        rest_sum = e.sum(-1, keepdim=True)
        rest = rest_sum.log() + peak
        log_norm = torch.logaddexp(torch.logsumexp(top, -1, keepdim=True), rest)
        buckets = torch.cat([top.sub_(log_norm), rest.sub_(log_norm)], -1)
        ctx.save_for_backward(e, rest_sum, indices, buckets)
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        return buckets

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        e, rest_sum, indices, buckets = ctx.saved_tensors
        grad = grad.float()
        total = grad.sum(-1, keepdim=True)
        probs = buckets.exp()
        g_rest = grad[..., -1:] - probs[..., -1:] * total
        scale = torch.where(rest_sum > 0, g_rest / rest_sum.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        out = e.mul_(scale / ctx.temperature)  # e is not needed again: its buffer becomes the gradient
        out.scatter_(-1, indices, (grad[..., :-1] - probs[..., :-1] * total) / ctx.temperature)
        return out.to(ctx.dtype), None, None


def uniform_teacher(topk_logprobs: Tensor, indices: Tensor, tail_logmass: Tensor, vocab_size: int) -> Tensor:
    """(…, V) teacher log-probabilities: the stored k tokens, the tail mass spread evenly over the rest."""
    k = indices.shape[-1]
    if k == vocab_size:  # no token outside the top k to spread anything over
        fill = torch.full_like(tail_logmass, -math.inf)
    else:
        fill = tail_logmass - math.log(vocab_size - k)
    dense = fill.unsqueeze(-1).expand(*fill.shape, vocab_size).clone()
    return dense.scatter(-1, indices, topk_logprobs)


def _check_shapes(student_logits: Tensor, topk_logprobs: Tensor, topk_indices: Tensor, tail_logmass: Tensor) -> None:
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if topk_logprobs.shape != topk_indices.shape:
        raise ValueError(f"topk_logprobs {tuple(topk_logprobs.shape)} and topk_indices "
                         f"{tuple(topk_indices.shape)} must have the same shape")
    if topk_logprobs.shape[:-1] != lead or tail_logmass.shape != lead:
        raise ValueError(f"student logits {tuple(student_logits.shape)} have leading dimensions {tuple(lead)}, but the "
                         f"teacher's top-k is {tuple(topk_logprobs.shape)} and its tail {tuple(tail_logmass.shape)}")
    if topk_indices.shape[-1] > vocab:
        raise ValueError(f"the teacher stores k = {topk_indices.shape[-1]} tokens per position, more than the "
                         f"student's vocabulary of {vocab}")
