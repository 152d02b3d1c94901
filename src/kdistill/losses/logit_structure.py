"""Terms that look at the structure of the output distributions, not only position by position:
target vs non-target classes (DKD), classes across the batch (CLKD), transport between the batch's
distributions (Sinkhorn). Each works for classifiers (one distribution per sequence) and for causal
LMs (one per token; DKD's target is the next token)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from kdistill.errors import PairingError
from kdistill.losses import functional as fn
from kdistill.losses.base import LossTerm, TermParams, register_loss, sequence_count, token_count
from kdistill.losses.logits import hard_label_loss, logits_mask, next_token_mask


class _LogitTerm(LossTerm):
    def __init__(self, params, student, teacher, where="losses"):
        super().__init__(params, student, teacher, where)
        if student.logits_per != teacher.logits_per or (
                student.logits_per == "token" and student.vocab_size != teacher.vocab_size):
            raise PairingError(f"{where}: {self.type_name} needs student and teacher logits over the same classes "
                               f"or vocabulary")

    def student_taps(self):
        return ["logits"]

    def teacher_taps(self):
        return ["logits"]

    def count(self, batch):
        return token_count(batch) if self.student_info.logits_per == "token" else sequence_count(batch)


class DKDParams(TermParams):
    type: Literal["dkd"] = "dkd"
    alpha: float = Field(1.0, ge=0, description="weight of target-class KD (TCKD)")
    beta: float = Field(8.0, ge=0, description="weight of non-target-class KD (NCKD)")
    temperature: float = Field(4.0, gt=0)
    ce_weight: float = Field(1.0, ge=0, description="weight of the hard-label loss added to DKD, as the paper trains")


@register_loss("dkd")
class DecoupledKD(_LogitTerm):
    """ce_weight·CE + τ²·(α·TCKD + β·NCKD); needs labels (class ids) or, for causal LMs, the next tokens."""

    Params = DKDParams

    def count(self, batch):
        if self.student_info.logits_per == "token":
            return int(next_token_mask(batch).sum())
        return sequence_count(batch)

    def uses_labels(self):
        return True  # the target class splits TCKD from NCKD

    def forward(self, s, t, batch):
        zs, zt, p = s["logits"], t["logits"], self.params
        if zs.dim() == 2:
            if "labels" not in batch:
                raise PairingError(f"{self.where}: dkd needs labels: give the data source a `label:` field")
            targets, mask = batch["labels"], None
        else:  # position i is scored against token i+1
            zs, zt = zs[:, :-1], zt[:, :-1]
            targets, mask = batch["input_ids"][:, 1:], next_token_mask(batch)
        loss = p.temperature**2 * fn.dkd(zs, zt, targets, p.alpha, p.beta, p.temperature, mask)
        if p.ce_weight > 0:
            loss = loss + p.ce_weight * hard_label_loss(s["logits"], batch, self.student_info.task)
        return loss


class CLKDParams(TermParams):
    type: Literal["clkd"] = "clkd"
    temperature: float = Field(2.0, gt=0)
    class_weight: float = Field(1.0, ge=0, description="weight of the class-level (across the batch) KL")
    correlation_weight: float = Field(1.0, ge=0, description="weight of the class-correlation MSE")


@register_loss("clkd")
class ClassAwareKD(_LogitTerm):
    """τ²·(instance KL + class-level KL) + class-correlation MSE over the batch's positions."""

    Params = CLKDParams

    def forward(self, s, t, batch):
        p = self.params
        return fn.clkd(s["logits"], t["logits"], p.temperature, p.class_weight, p.correlation_weight,
                       logits_mask(batch, s["logits"]), kl_scale=p.temperature**2)


class SinkhornParams(TermParams):
    type: Literal["sinkhorn"] = "sinkhorn"
    temperature: float = Field(1.0, gt=0)
    epsilon: float = Field(0.1, gt=0, description="entropic regularisation of the transport plan")
    iterations: int = Field(20, ge=1)
    cost: Literal["squared_euclidean"] = "squared_euclidean"


@register_loss("sinkhorn")
class SinkhornKD(_LogitTerm):
    """Entropic optimal transport between the batch's teacher and student distributions."""

    Params = SinkhornParams

    def forward(self, s, t, batch):
        p = self.params
        return fn.sinkhorn(s["logits"], t["logits"], p.temperature, p.epsilon, p.iterations,
                           logits_mask(batch, s["logits"]))


__all__ = ["DecoupledKD", "ClassAwareKD", "SinkhornKD"]
