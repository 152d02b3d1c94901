"""Throughput timing shared by the text and image reports: interleaved passes, best pass per model."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch


def synchronize(model) -> None:
    # CUDA runs asynchronously: without a sync the clock stops before the work is done.
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastest_passes(passes: dict[str, tuple[torch.nn.Module, Callable[[], object]]], repeats: int) -> dict[str, float]:
    """Seconds of each {name: (model, one_pass)}'s best pass. The passes are interleaved, one per model per
    round, so a neighbour's load on a shared machine falls on all models alike instead of on whichever ran
    second; each model keeps its best round, the one least disturbed. Warm-up is the caller's."""
    best = {name: math.inf for name in passes}
    for _ in range(max(1, repeats)):
        for name, (model, one_pass) in passes.items():
            synchronize(model)
            start = time.perf_counter()
            one_pass()
            synchronize(model)
            best[name] = min(best[name], time.perf_counter() - start)
    return best
