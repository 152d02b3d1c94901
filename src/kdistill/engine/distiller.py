"""The student and its training-only parts as one trainable module, so DDP and the optimizer see both."""
from __future__ import annotations

import torch
from torch import nn

from kdistill.losses import LossTerm
from kdistill.models.arch import ModelInfo
from kdistill.models.taps import TapReader


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, student_info: ModelInfo, terms: list[LossTerm], student_taps: set[str]):
        super().__init__()
        self.student = student
        self.terms = nn.ModuleList(terms)
        self.reader = TapReader(student, student_info)
        self.tap_names = sorted(student_taps)

    def forward(self, batch: dict, teacher_taps: dict, scales: list[float] | None = None, also: tuple = ()) -> dict:
        """Weighted sum of the terms. `scales` re-weights each term for exact accumulation (see engine.loop);
        `also` names taps to return besides the terms' own, so evaluation reads logits from the same pass."""
        taps = self.reader(batch, sorted(set(self.tap_names) | set(also)))
        scales = scales or [1.0] * len(self.terms)
        total = torch.zeros((), device=next(self.student.parameters()).device)
        parts = {}
        for term, scale in zip(self.terms, scales):
            value = term(taps, teacher_taps, batch)
            parts[term.name] = value.detach()
            total = total + term.weight * scale * value
        return {"loss": total, "parts": parts, "taps": taps}
