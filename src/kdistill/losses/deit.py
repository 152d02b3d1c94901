"""DeiT (Touvron et al. 2021): a distillation token with its own head learns from the teacher while the
class token's head learns from the labels; at inference the two heads are averaged."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from kdistill.errors import PairingError
from kdistill.losses import functional as fn
from kdistill.losses.base import LossTerm, TermParams, register_loss, sequence_count
from kdistill.teachers.cached import SparseLogits


class DeiTParams(TermParams):
    type: Literal["deit"] = "deit"
    distillation: Literal["hard", "soft"] = Field(
        "hard", description="hard: CE on the teacher's argmax (the paper's best); soft: τ²·KL(teacher ‖ head)")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation head; 1 − alpha goes to the "
                         "class head's cross-entropy on the labels (the paper: 1/2 for hard, 0.1 for soft)")
    temperature: float = Field(3.0, gt=0, description="soft distillation only (the paper uses 3)")


@register_loss("deit")
class DeiT(LossTerm):
    """(1 − α)·CE(class head, labels) + α·D(teacher, distillation head), one item per image."""

    Params = DeiTParams

    def __init__(self, params, student, teacher, where="losses"):
        super().__init__(params, student, teacher, where)
        if student.model_type != "deit":
            raise PairingError(f"{where}: deit needs a DeiT student with a distillation token "
                               f"(student: {{model: blueprint:deit-3x96-p4}}), not a {student.model_type}")

    @classmethod
    def store_refusal(cls, params) -> str | None:
        return None

    def student_taps(self):
        return ["cls_logits", "distillation_logits"]

    def teacher_taps(self):
        return ["logits"]

    def count(self, batch):
        return sequence_count(batch)

    def uses_labels(self):
        return True

    def forward(self, s, t, batch):
        p = self.params
        if "labels" not in batch:
            raise PairingError(f"{self.where}: deit's class head trains on labels: give the data a `label:` field")
        class_loss = F.cross_entropy(s["cls_logits"].float(), batch["labels"])
        return (1 - p.alpha) * class_loss + p.alpha * self.distillation(s["distillation_logits"], t["logits"])

    def distillation(self, zs: torch.Tensor, zt) -> torch.Tensor:
        p = self.params
        if isinstance(zt, SparseLogits) and zt.sampled:
            raise PairingError(f"{self.where}: deit distils from the teacher's top classes; a sampled store has draws "
                               f"instead (build it without --sample)")
        if p.distillation == "hard":
            target = zt.indices[..., 0] if isinstance(zt, SparseLogits) else zt.argmax(-1)
            return F.cross_entropy(zs.float(), target)
        if isinstance(zt, SparseLogits):
            from kdistill.losses.sparse import sparse_divergence

            return p.temperature ** 2 * sparse_divergence(zs, zt.logprobs, zt.indices, zt.tail, "kl",
                                                          temperature=p.temperature)
        return p.temperature ** 2 * fn.kl_div(zs, zt, temperature=p.temperature)
