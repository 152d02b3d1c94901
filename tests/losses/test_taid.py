"""TAID: the interpolated target against a slow reference, the schedule by hand, resume with t restored."""
import json
import math
from pathlib import Path

import pytest
import torch

from kdistill import distill
from kdistill.config import load_recipe
from kdistill.errors import ConfigError
from kdistill.losses import LOSSES
from kdistill.losses.taid import TAIDParams, next_interpolation
from kdistill.models.arch import ModelInfo
from kdistill.models.loading import load_model

LM = ModelInfo(model_type="gpt2", task="causal-lm", num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=2,
               head_dim=4, vocab_size=5, is_decoder=True, layers_path="transformer.h", pooling="last")


def softmax(row, tau=1.0):
    e = [math.exp((x - max(row)) / tau) for x in row]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_target_interpolates_detached_student_and_teacher_logits(tau):
    torch.manual_seed(0)
    term = LOSSES.get("taid")(TAIDParams(t_start=0.3, temperature=tau), LM, LM)
    zs = torch.randn(1, 3, 5, requires_grad=True)
    zt = torch.randn(1, 3, 5)
    batch = {"attention_mask": torch.tensor([[1, 1, 0]])}
    loss = term({"logits": zs}, {"logits": zt}, batch)
    expected = 0.0
    for i in range(2):  # the logits are mixed, then tempered; τ² keeps the gradient's scale, as in Hinton's KD
        target = softmax([0.7 * a + 0.3 * b for a, b in zip(zs[0, i].tolist(), zt[0, i].tolist())], tau)
        q = softmax(zs[0, i].tolist(), tau)
        expected += tau**2 * sum(p * math.log(p / r) for p, r in zip(target, q)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)  # float32 KL of close distributions
    loss.backward()  # the target is a constant: the gradient is τ(softmax(z_S/τ) - target) at each real position
    target = torch.softmax((0.7 * zs.detach()[0, :2] + 0.3 * zt[0, :2]) / tau, -1)
    expected_grad = tau * (torch.softmax(zs.detach()[0, :2] / tau, -1) - target) / 2
    assert torch.allclose(zs.grad[0, :2], expected_grad, atol=1e-6)


def test_interpolation_endpoints_are_the_student_itself_and_plain_kd():
    from kdistill.losses import functional

    term = LOSSES.get("taid")(TAIDParams(t_start=0.0, temperature=1.0), LM, LM)
    zs = torch.randn(2, 4, 5, requires_grad=True)
    zt = torch.randn(2, 4, 5)
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    at_zero = term({"logits": zs}, {"logits": zt}, batch)  # t = 0: the target is the student itself
    (grad,) = torch.autograd.grad(at_zero, zs)
    assert at_zero.item() == pytest.approx(0.0, abs=1e-7) and grad.abs().max().item() < 1e-7
    term.t = 1.0  # t = 1: the teacher alone, i.e. plain forward-KL distillation
    at_one = term({"logits": zs}, {"logits": zt}, batch)
    mask = batch["attention_mask"].bool()
    assert at_one.item() == pytest.approx(functional.kl_div(zs, zt, 1.0, mask).item(), rel=1e-6)


def test_schedule_by_hand():
    p = TAIDParams(t_start=0.4, t_end=1.0, step_size=0.1, momentum=0.9)
    # delta = (2.0 - 1.5) / 2.0 = 0.25; m = 0.1 * 0.25 = 0.025; t = 0.4 + 0.1 * sigmoid(0.025) * 0.6
    t, m = next_interpolation(0.4, 0.0, 2.0, 1.5, step=1, total=100, p=p)
    assert m == pytest.approx(0.025) and t == pytest.approx(0.4 + 0.1 / (1 + math.exp(-0.025)) * 0.6)
    assert next_interpolation(0.4, 0.0, None, 1.5, step=50, total=100, p=p)[0] == pytest.approx(0.7)  # the floor
    fixed = TAIDParams(t_start=0.4, adaptive=False)
    assert next_interpolation(0.4, 0.0, 2.0, 1.0, step=25, total=100, p=fixed)[0] == pytest.approx(0.55)
    assert next_interpolation(0.99, 5.0, 2.0, 1.0, step=100, total=100, p=TAIDParams())[0] == 1.0  # never past t_end
    with pytest.raises(ConfigError, match="t_end"):
        load_recipe({"teacher": {"model": "x"}, "student": {"config": {}}, "data": {"train": {"source": "stdlib-docstrings"}},
                     "losses": [{"type": "taid", "t_start": 0.8, "t_end": 0.5}]})


def test_resume_restores_the_interpolation(tiny_gpt2_dir, text_file, tmp_path, killed_run):
    recipe = {"name": "taid", "teacher": {"model": tiny_gpt2_dir}, "student": {"config": {"n_layer": 1}},
              "data": {"train": {"path": text_file, "text": "sentence", "limit": 16}, "max_length": 24},
              "losses": [{"type": "taid", "step_size": 0.05}],
              "train": {"steps": 6, "batch_size": 4, "save_every": 2, "lr": 1e-3}}
    straight = distill({**recipe, "output": str(tmp_path / "straight")}, progress=False)
    killed = {**recipe, "output": str(tmp_path / "killed")}
    killed_run(killed, step=4)
    state = json.loads((tmp_path / "killed" / "checkpoints" / "main" / "step-0000004" / "state.json").read_text())
    assert 0.4 < state["method"]["0"]["t"] < 1.0
    resumed = distill(killed, resume=True, progress=False)
    a, b = (load_model(str(d), "causal-lm").model.state_dict() for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert Path(resumed).exists()
