"""Learning-rate schedules: linear warm-up, then linear or cosine decay to zero, or constant."""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - progress


def make_scheduler(optimizer, steps: int, warmup_fraction: float, kind: str) -> LambdaLR:
    warmup = int(round(warmup_fraction * steps))
    return LambdaLR(optimizer, lambda step: lr_factor(step, steps, warmup, kind))
