"""Divergences between a student and a teacher as plain tensor functions.

Conventions shared by every function here:

* The distribution (or feature vector) lives in the last dimension; all leading dimensions are
  positions: (B, V), (B, L, V), (B, H, L, L) for attention maps used as logits, ...
* Student first, teacher second. With logits z, p = softmax(z_T / τ) is the teacher and
  q = softmax(z_S / τ) the student; KL(a‖b) = Σ a·(log a − log b).
* ``temperature`` τ divides both logits before the softmax, always. No τ² factor is applied
  here; a loss term that wants Hinton's gradient scaling multiplies by τ² itself.
* ``mask`` is a boolean tensor over the leading dimensions, or one that broadcasts to them under
  the usual (right-aligned) rules, e.g. (B, L) for (B, L, V), (B, 1, L) for (B, H, L, L). The
  result is the mean over True positions of the per-position value (for a divergence, summed
  over the last dimension). ``mask=None`` uses every position. A mask with no True element gives
  a zero that is still attached to the graph, never NaN.
* Arithmetic is float32 (inputs are cast with ``.float()``) through ``log_softmax``, so large
  logits (±1e4) are safe, teacher logits may be -inf where the teacher puts no mass
  (0·log 0 = 0), and both may be -inf at the same entries (vocabulary padding). Each row still
  needs at least one finite logit.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _masked_mean(per_position: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``per_position`` over the positions where ``mask`` is True."""
    if mask is None:
        return per_position.mean()
    mask = mask.to(device=per_position.device, dtype=torch.bool)
    try:
        mask = torch.broadcast_to(mask, per_position.shape)
    except RuntimeError as error:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the leading dimensions "
            f"{tuple(per_position.shape)} of the inputs; pass a boolean mask over the positions, "
            "not over the last (vocabulary / feature) dimension"
        ) from error
    # Select rather than multiply: padding positions may hold inf, and inf·0 would be NaN.
    total = torch.where(mask, per_position, torch.zeros_like(per_position)).sum()
    return total / mask.sum().clamp_min(1).to(total.dtype)


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ a·(log a − log b) over the last dimension, with 0·log 0 = 0."""
    a = log_a.exp()
    # Where a is 0 the term is 0 whatever log_b is. Zeroing the difference itself (not the
    # product) keeps -inf out of the backward pass, where 0·inf would turn into NaN.
    diff = torch.where(a == 0, torch.zeros_like(log_a), log_a - log_b)
    return (a * diff).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """log(w·a + (1 − w)·b), computed in log space so tiny probabilities do not underflow."""
    if weight == 0:
        return log_b
    if weight == 1:
        return log_a
    # logaddexp(-inf, -inf) has a NaN gradient. Entries that both distributions rule out (say,
    # vocabulary padding masked in both models) are routed around it.
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    mixed = torch.logaddexp(log_a.masked_fill(both_zero, 0.0) + math.log(weight),
                            log_b.masked_fill(both_zero, 0.0) + math.log1p(-weight))
    return mixed.masked_fill(both_zero, -math.inf)


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def kl_div(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
           mask: Tensor | None = None) -> Tensor:
    """Forward KL(p‖q): the student covers every mode of the teacher (mean-seeking)."""
    log_p, log_q = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    return _masked_mean(_kl(log_p, log_q), mask)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
               mask: Tensor | None = None) -> Tensor:
    """Reverse KL(q‖p) (MiniLLM): the student commits to the teacher's main modes.

    Infinite wherever the teacher has zero probability (a -inf logit) and the student does not.
    """
    log_p, log_q = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    return _masked_mean(_kl(log_q, log_p), mask)


def _jsd_beta(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def js_div(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
           mask: Tensor | None = None) -> Tensor:
    """Jensen–Shannon ½·KL(p‖m) + ½·KL(q‖m), m = (p + q)/2; symmetric and at most log 2."""
    log_p, log_q = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    return _masked_mean(_jsd_beta(log_p, log_q, 0.5), mask)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5,
                    temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Generalised JSD_β of GKD (Agarwal et al. 2024, Eq. 1), with β weighting the teacher.

    For 0 < β < 1: β·KL(p‖m) + (1 − β)·KL(q‖m) with m = β·p + (1 − β)·q, as TRL's
    ``GKDTrainer.generalized_jsd_loss``. β = 0.5 is :func:`js_div`.
    β = 0 is exactly :func:`kl_div`, forward KL(p‖q); β = 1 is exactly :func:`reverse_kl`,
    KL(q‖p). These endpoints are definitions, not limits: the formula itself tends to 0 as β
    approaches 0 or 1 (roughly β·KL(p‖q) near 0), so the loss jumps in scale at the ends.
    """
    _check_unit("beta", beta)
    log_p, log_q = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    if beta == 0:
        per_position = _kl(log_p, log_q)
    elif beta == 1:
        per_position = _kl(log_q, log_p)
    else:
        per_position = _jsd_beta(log_p, log_q, beta)
    return _masked_mean(per_position, mask)


def tvd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
        mask: Tensor | None = None) -> Tensor:
    """Total variation ½·Σ|p − q|, in [0, 1]."""
    p = _log_probs(teacher_logits, temperature).exp()
    q = _log_probs(student_logits, temperature).exp()
    return _masked_mean(0.5 * (p - q).abs().sum(-1), mask)


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1,
            temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """DistiLLM skew KL(p ‖ α·p + (1 − α)·q); α = 0 is :func:`kl_div`, α = 1 gives 0.

    Mixing some teacher into the target keeps it finite where the student's q is near 0.
    """
    _check_unit("alpha", alpha)
    log_p, log_q = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    return _masked_mean(_kl(log_p, _log_mix(log_p, log_q, alpha)), mask)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1,
                    temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """DistiLLM skew reverse KL(q ‖ α·q + (1 − α)·p); α = 0 is :func:`reverse_kl`, α = 1 gives 0.

    Unlike plain reverse KL it stays finite where the teacher has zero probability, for α > 0.
    """
    _check_unit("alpha", alpha)
    log_p, log_q = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    return _masked_mean(_kl(log_q, _log_mix(log_q, log_p, alpha)), mask)


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                       mask: Tensor | None = None) -> Tensor:
    """Soft cross-entropy −Σ p·log q (DistilBERT's L_ce): KL(p‖q) plus the teacher's entropy."""
    log_p, log_q = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    p = log_p.exp()
    # Same reason as in _kl: a zero-probability teacher entry contributes 0 even if log q = -inf.
    log_q = torch.where(p == 0, torch.zeros_like(log_q), log_q)
    return _masked_mean(-(p * log_q).sum(-1), mask)


def logits_mse(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
               mask: Tensor | None = None) -> Tensor:
    """Mean squared difference of z_S/τ and z_T/τ over the last dimension, then over positions."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    diff = (student_logits.float() - teacher_logits.float()) / temperature
    # -inf in both (a vocabulary entry masked in both models) is agreement, not NaN.
    diff = diff.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)
    return _masked_mean(diff.pow(2).mean(-1), mask)


def masked_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Feature MSE (hidden states, embeddings): mean over the last dimension, then over positions."""
    return _masked_mean((student.float() - teacher.float()).pow(2).mean(-1), mask)


def attention_map_mse(student: Tensor, teacher: Tensor, key_mask: Tensor | None = None,
                      row_mask: Tensor | None = None) -> Tensor:
    """MSE of (B, H, L, L) attention maps: per row, the squared error summed over the real keys and divided by
    their count, then the mean over real rows. Padding keys add nothing and count for nothing, so a sequence
    costs the same however far its batch pads it (a mean over all L keys shrank it by real/padded length)."""
    error = (student.float() - teacher.float()).pow(2)
    if key_mask is None:
        return _masked_mean(error.mean(-1), row_mask)
    keys = key_mask.to(device=error.device, dtype=torch.bool)[:, None, None, :]
    per_row = torch.where(keys, error, torch.zeros_like(error)).sum(-1)
    return _masked_mean(per_row / keys.sum(-1).clamp_min(1).to(per_row.dtype), row_mask)


def masked_cosine_distance(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """1 − cos(s, t) over the last dimension, in [0, 2]; a zero vector counts as orthogonal."""
    cosine = F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)
    return _masked_mean(1.0 - cosine, mask)


def kl_div_probs(student_probs: Tensor, teacher_probs: Tensor, mask: Tensor | None = None,
                 eps: float = 1e-12) -> Tensor:
    """KL(teacher‖student) between distributions that are already normalised (attention maps).

    Teacher entries equal to 0 contribute 0; student probabilities are clamped to ``eps`` before
    the log, so a student 0 where the teacher has mass costs a large but finite −log(eps).
    """
    p, q = teacher_probs.float(), student_probs.float()
    # log(1) = 0 at p == 0 keeps both the value and the gradient of 0·log 0 finite.
    log_p = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    log_q = torch.log(q.clamp_min(eps))
    return _masked_mean((p * (log_p - log_q)).sum(-1), mask)


# ---------------------------------------------------------------- structure-aware logit losses

def dkd(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float = 1.0, beta: float = 8.0,
        temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): α·TCKD + β·NCKD per position.

    TCKD is the KL between the binary distributions [p_target, 1 − p_target] of teacher and student;
    NCKD the KL between their distributions over the non-target classes, renormalised. ``targets``
    holds the target class index of every position (the leading dimensions of the logits)."""
    zs, zt = student_logits.float() / temperature, teacher_logits.float() / temperature
    index = targets.long().unsqueeze(-1)

    def binary_and_rest(z):
        log_norm = torch.logsumexp(z, -1)
        rest = z.scatter(-1, index, -math.inf)  # the target removed: the non-target distribution's logits
        log_target = z.gather(-1, index).squeeze(-1) - log_norm
        log_rest_mass = torch.logsumexp(rest, -1) - log_norm  # log(1 − p_target) without cancellation
        return torch.stack([log_target, log_rest_mass], -1), F.log_softmax(rest, -1)

    binary_t, rest_t = binary_and_rest(zt)
    binary_s, rest_s = binary_and_rest(zs)
    return _masked_mean(alpha * _kl(binary_t, binary_s) + beta * _kl(rest_t, rest_s), mask)


def _rows(logits: Tensor, mask: Tensor | None) -> Tensor:
    """The positions as rows of a (N, C) matrix, only the unmasked ones."""
    rows = logits.float().reshape(-1, logits.shape[-1])
    if mask is None:
        return rows
    return rows[torch.broadcast_to(mask.bool(), logits.shape[:-1]).reshape(-1)]


def _class_correlation(z: Tensor) -> Tensor:
    """C×C correlation of the class logits across the rows of the batch."""
    centred = z - z.mean(0, keepdim=True)
    normed = centred / centred.norm(dim=0, keepdim=True).clamp_min(1e-8)
    return normed.T @ normed


def clkd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, class_weight: float = 1.0,
         correlation_weight: float = 1.0, mask: Tensor | None = None, kl_scale: float = 1.0) -> Tensor:
    """Class-aware logit KD: kl_scale·(instance-level KL (softmax over classes, per row) + class-level KL
    (softmax over the batch, per class)) + MSE between the teacher's and the student's class
    correlation matrices over the batch. Batch-wise: the rows are the unmasked positions.
    ``kl_scale`` is for τ², which only the tempered KLs need: the correlations are of the raw logits."""
    zs, zt = _rows(student_logits, mask), _rows(teacher_logits, mask)
    if zs.shape[0] == 0:
        return student_logits.sum() * 0.0
    instance = _kl(F.log_softmax(zt / temperature, -1), F.log_softmax(zs / temperature, -1)).mean()
    if zs.shape[0] < 2:  # class-level terms need a batch
        return kl_scale * instance
    per_class = _kl(F.log_softmax(zt.T / temperature, -1), F.log_softmax(zs.T / temperature, -1)).mean()
    correlation = (_class_correlation(zt) - _class_correlation(zs)).pow(2).mean()
    return kl_scale * (instance + class_weight * per_class) + correlation_weight * correlation


def sinkhorn(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, epsilon: float = 0.1,
             iterations: int = 20, mask: Tensor | None = None) -> Tensor:
    """Entropic optimal transport between the batch's teacher and student distributions (SinKD-style).

    Rows are the unmasked positions; the cost between teacher row i and student row j is the squared
    Euclidean distance of their probability vectors (an N×N matrix built with one matmul, so memory
    stays O(N·V)); uniform marginals; log-domain Sinkhorn iterations, differentiated through.
    Returns ⟨P, C⟩ for the entropic plan P."""
    p = F.softmax(_rows(teacher_logits, mask) / temperature, -1)
    q = F.softmax(_rows(student_logits, mask) / temperature, -1)
    n = p.shape[0]
    if n == 0:
        return student_logits.sum() * 0.0
    cost = (p.pow(2).sum(-1, keepdim=True) + q.pow(2).sum(-1)[None, :] - 2 * p @ q.T).clamp_min(0)
    log_k = -cost / epsilon
    log_marginal = torch.full((n,), -math.log(n), device=cost.device)
    f, g = torch.zeros_like(log_marginal), torch.zeros_like(log_marginal)
    for _ in range(iterations):
        f = log_marginal - torch.logsumexp(log_k + g[None, :], 1)
        g = log_marginal - torch.logsumexp(log_k + f[:, None], 0)
    plan = torch.exp(log_k + f[:, None] + g[None, :])
    return (plan * cost).sum()


DIVERGENCES = {
    "kl": kl_div,
    "reverse_kl": reverse_kl,
    "js": js_div,
    "generalized_jsd": generalized_jsd,
    "tvd": tvd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "soft_ce": soft_cross_entropy,
    "mse": logits_mse,
}
"""Logits divergences by the name used in recipes. Each is called as ``f(student_logits,
teacher_logits, temperature=..., mask=...)``; extra parameters (``alpha``) are keywords with defaults."""

EXTRA_PARAMETER = {"generalized_jsd": "beta", "skew_kl": "alpha", "skew_reverse_kl": "alpha"}


def divergence_fn(name: str, *, beta: float = 0.5, alpha: float = 0.1, valid=None):
    """``DIVERGENCES[name]`` with its extra parameter (β of generalized_jsd, α of the skew divergences)
    bound and checked up front; ``valid`` narrows the accepted names (e.g. all but "mse")."""
    valid = tuple(valid or DIVERGENCES)
    if name not in valid:
        raise ValueError(f"unknown divergence {name!r}; valid names are: {', '.join(valid)}")
    param = EXTRA_PARAMETER.get(name)
    if param is None:
        return DIVERGENCES[name]
    value = {"beta": beta, "alpha": alpha}[param]
    # checked here too: with every position masked, a chunked or sparse caller may never call it
    _check_unit(param, value)
    return functools.partial(DIVERGENCES[name], **{param: value})
