"""The learning-rate schedule against its closed forms, gradient clipping, and loss-term weights in the gradient."""
import math

import pytest
import torch

from kdistill import distill
from kdistill.engine.schedule import make_scheduler
from student_weights import assert_same_weights


def rates(steps: int, warmup: float, kind: str) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = make_scheduler(optimizer, steps, warmup, kind)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])  # the rate step i trains at
        optimizer.step()
        scheduler.step()
    return seen


def test_warmup_then_linear_decay():
    # 10 steps, 2 of warmup: 1/2 and 2/2 of the rate, then (10 - i) / 8 from step i = 2; never 0 at the first step
    assert rates(10, 0.2, "linear") == pytest.approx([2.0 * f for f in (0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5,
                                                                          0.375, 0.25, 0.125)])


def test_warmup_then_cosine_decay():
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (i - 2) / 8)) for i in range(2, 10)]
    assert rates(10, 0.2, "cosine") == pytest.approx([2.0 * f for f in expected])


def test_constant_and_no_warmup():
    assert rates(4, 0.5, "constant") == pytest.approx([1.0, 2.0, 2.0, 2.0])
    assert rates(4, 0.0, "linear") == pytest.approx([2.0, 1.5, 1.0, 0.5])


def test_a_term_of_weight_zero_changes_nothing(tiny_recipe, tmp_path):
    # each term enters the gradient times its weight: a zero-weight term leaves the run as it was without it
    tiny_recipe["student"] = {"config": {"num_hidden_layers": 2}}
    tiny_recipe["train"].update(steps=2)
    alone = {**tiny_recipe, "losses": [{"type": "embedding_cosine"}], "output": str(tmp_path / "alone")}
    beside = {**tiny_recipe, "losses": [{"type": "embedding_cosine"}, {"type": "hidden_mse", "weight": 0.0}],
              "output": str(tmp_path / "beside")}
    assert_same_weights(distill(alone, progress=False), distill(beside, progress=False))


def test_gradients_are_clipped_at_max_grad_norm_and_the_norm_logged(tiny_recipe, monkeypatch):
    import json
    from pathlib import Path

    from accelerate import Accelerator

    asked, norms = [], []
    original = Accelerator.clip_grad_norm_

    def clip(self, parameters, max_norm, norm_type=2):
        asked.append(max_norm)
        norms.append(float(original(self, parameters, max_norm, norm_type)))
        return norms[-1]

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip)
    tiny_recipe["train"].update(steps=2, max_grad_norm=0.37)
    distill(tiny_recipe, progress=False)
    assert asked == [0.37, 0.37]
    rows = [json.loads(line) for line in (Path(tiny_recipe["output"]) / "logs" / "main.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] for r in rows if r["kind"] == "train"] == pytest.approx(norms)
    asked.clear()
    distill({**tiny_recipe, "train": {**tiny_recipe["train"], "max_grad_norm": None},
             "output": tiny_recipe["output"] + "-unclipped"}, progress=False)
    assert asked == []
