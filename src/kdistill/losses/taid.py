"""TAID (Shing et al., ICLR 2025): distil toward a target that moves from the student to the teacher.

The target at interpolation t is softmax((1 − t)·z_S' + t·z_T) with z_S' the student's logits
*detached*, and the loss is KL(target ‖ student). t starts at t_start and rises to t_end; besides the
linear floor t_start + (t_end − t_start)·n/N it moves faster while the objective is still falling:

    δ_n = (J_{n−1} − J_n) / (J_{n−1} + ε)        relative improvement of this step's TAID loss
    m_n = β·m_{n−1} + (1 − β)·δ_n                 its momentum
    t_n = min(t_end, max(floor(n), t_{n−1} + η·sigmoid(m_n)·(1 − t_{n−1})))

t, m and the previous loss are method state, saved in every checkpoint.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from kdistill.losses import functional as fn
from kdistill.losses.base import TermParams, register_loss
from kdistill.losses.logit_structure import _LogitTerm
from kdistill.losses.logits import logits_mask

EPS = 1e-8


class TAIDParams(TermParams):
    type: Literal["taid"] = "taid"
    t_start: float = Field(0.4, ge=0, lt=1, description="interpolation at step 0 (0 = the student itself)")
    t_end: float = Field(1.0, gt=0, le=1, description="interpolation reached by the end (1 = the teacher)")
    step_size: float = Field(5e-4, ge=0, le=1, description="η: the adaptive increase per step")
    momentum: float = Field(0.99, ge=0, lt=1, description="β: momentum of the relative improvement")
    adaptive: bool = True
    temperature: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def rising(self):
        if self.t_end < self.t_start:
            raise ValueError(f"t_end ({self.t_end}) must be at least t_start ({self.t_start})")
        return self


def next_interpolation(t: float, momentum_state: float, previous: float | None, current: float, step: int,
                       total: int, p: TAIDParams) -> tuple[float, float]:
    """(t, m) after a step whose TAID loss was `current` (`previous` the step before, None at first)."""
    floor = p.t_start + (p.t_end - p.t_start) * min(1.0, step / max(1, total))
    if p.adaptive and previous is not None:
        delta = (previous - current) / (previous + EPS)
        momentum_state = p.momentum * momentum_state + (1 - p.momentum) * delta
        t = t + p.step_size / (1 + math.exp(-momentum_state)) * (1 - t)
    return min(p.t_end, max(floor, t)), momentum_state


@register_loss("taid")
class TAID(_LogitTerm):
    Params = TAIDParams

    def __init__(self, params, student, teacher, where="losses"):
        super().__init__(params, student, teacher, where)
        self.t, self.m, self.previous = params.t_start, 0.0, None

    def forward(self, s, t, batch):
        zs, zt = s["logits"], t["logits"]
        target = (1 - self.t) * zs.detach().float() + self.t * zt.float()
        return self.params.temperature**2 * fn.kl_div(zs, target, self.params.temperature, logits_mask(batch, zs))

    def after_step(self, step, total_steps, parts=None):
        current = (parts or {}).get(self.name)
        if current is None:
            return
        self.t, self.m = next_interpolation(self.t, self.m, self.previous, current, step, total_steps, self.params)
        self.previous = current

    def method_state(self):
        return {"t": self.t, "m": self.m, "previous": self.previous}

    def load_method_state(self, state):
        self.t = state.get("t", self.params.t_start)
        self.m = state.get("m", 0.0)
        self.previous = state.get("previous")


__all__ = ["TAID", "next_interpolation"]
