"""MiniLLM (Gu et al., ICLR 2024): sequence-level reverse KL, optimised by policy gradient on the
student's own samples (the stage's `on_policy` block, with `teacher_mix` for teacher-mixed sampling).

On a generated micro-batch, with y_t the sampled token at position t, q the student, p the teacher,
w_t the importance weight of teacher-mixed sampling (q/(α·p + (1 − α)·q), 1 without mixing) and
r_t = log p(y_t) − log q(y_t):

    single-step part   Σ_t w_t · KL(q_t ‖ p_t)                       exact over the vocabulary at each step
    long-term part     −Σ_t w_t · R_{t+1} · log q(y_t)                R_{t+1} = mean of r over the later tokens
                                                                      (length-normalised, detached)

both averaged over the generated tokens. On a data micro-batch (the 1 − λ that is not generated) the term
is the next-token cross-entropy: MiniLLM's language-modelling loss on pre-training text.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from kdistill.losses import functional as fn
from kdistill.losses.base import TermParams, register_loss
from kdistill.losses.logit_structure import _LogitTerm
from kdistill.losses.logits import hard_label_count, hard_label_loss


class MiniLLMParams(TermParams):
    type: Literal["minillm"] = "minillm"
    single_step_weight: float = Field(1.0, ge=0)
    long_term_weight: float = Field(1.0, ge=0)
    lm_weight: float = Field(1.0, ge=0, description="weight of the language-modelling loss on data micro-batches")


def future_mean(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per position, the mean of the rewards at the later masked positions of its row (0 at the last)."""
    r = rewards * mask
    later_sum = r.flip(-1).cumsum(-1).flip(-1) - r
    later_count = mask.float().flip(-1).cumsum(-1).flip(-1) - mask.float()
    return later_sum / later_count.clamp_min(1)


@register_loss("minillm")
class MiniLLM(_LogitTerm):
    Params = MiniLLMParams

    def count(self, batch):
        return hard_label_count(batch, "causal-lm")  # generated tokens, or the language-modelling loss's targets

    def forward(self, s, t, batch):
        zs, p = s["logits"], self.params
        if "importance" not in batch:  # a data micro-batch (generated ones carry the samples' importance weights)
            return p.lm_weight * hard_label_loss(zs, batch, "causal-lm")
        mask = batch["loss_mask"][:, :-1].bool()
        zs, zt = zs[:, :-1].float(), t["logits"][:, :-1].float()
        tokens = batch["input_ids"][:, 1:].unsqueeze(-1)
        weights = batch.get("importance", torch.ones_like(mask, dtype=torch.float))[:, :-1].to(zs.dtype)
        log_q, log_p = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
        q_token = log_q.gather(-1, tokens).squeeze(-1)
        rewards = (log_p.gather(-1, tokens).squeeze(-1) - q_token).detach()
        per_step_kl = fn._kl(log_q, log_p)  # reverse KL(q ‖ p) at each position, exact over the vocabulary
        long_term = -future_mean(rewards, mask) * q_token
        per_position = p.single_step_weight * per_step_kl + p.long_term_weight * long_term
        n = mask.sum().clamp_min(1)
        return (weights * per_position * mask).sum() / n
