"""A hidden-state projector starts at the least-squares map on the first records, not at random."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kdistill.losses.base import LeastSquares
from kdistill.losses.features import HiddenMSE, HiddenMSEParams
from kdistill.models.arch import ModelInfo


def fit_linear(layer, x, y, ridge=1e-3):
    sums = LeastSquares()
    sums.add(x, y)
    sums.solve_into(layer, ridge)


def info(width: int) -> ModelInfo:
    return ModelInfo(model_type="bert", task="embedding", num_layers=2, hidden_size=width, num_heads=2, num_kv_heads=2,
                     head_dim=width // 2, vocab_size=10, is_decoder=False, layers_path="encoder.layer", pooling="mean")


def test_fit_linear_recovers_an_exact_affine_map():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen)
    a, b = torch.randn(6, 4, generator=gen), torch.randn(4, generator=gen)
    layer = nn.Linear(6, 4)
    fit_linear(layer, x, x @ a + b, ridge=0.0)
    torch.testing.assert_close(layer.weight, a.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.bias, b, atol=1e-5, rtol=0)


def test_fit_linear_is_ridge_regression():
    """Against numpy: centred least squares with rows sqrt(λ)·I appended, λ = ridge × mean feature variance sum."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 8)), rng.normal(size=(20, 3))  # fewer items than a well-posed fit wants
    layer = nn.Linear(8, 3)
    fit_linear(layer, torch.tensor(x), torch.tensor(y), ridge=0.1)
    xc, yc = x - x.mean(0), y - y.mean(0)
    lam = 0.1 * np.mean(np.sum(xc * xc, axis=0)) + 1e-12
    stacked_x = np.vstack([xc, np.sqrt(lam) * np.eye(8)])
    stacked_y = np.vstack([yc, np.zeros((8, 3))])
    w = np.linalg.lstsq(stacked_x, stacked_y, rcond=None)[0]
    np.testing.assert_allclose(layer.weight.detach().numpy(), w.T, atol=1e-5)
    np.testing.assert_allclose(layer.bias.detach().numpy(), y.mean(0) - x.mean(0) @ w, atol=1e-5)


def test_running_sums_over_batches_equal_one_fit():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(300, 5, generator=gen) * 3 + 1, torch.randn(300, 2, generator=gen)
    whole, parts = nn.Linear(5, 2), nn.Linear(5, 2)
    fit_linear(whole, x, y, ridge=0.01)
    sums = LeastSquares()
    for start in range(0, 300, 64):
        sums.add(x[start:start + 64], y[start:start + 64])
    sums.solve_into(parts, ridge=0.01)
    torch.testing.assert_close(parts.weight, whole.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(parts.bias, whole.bias, atol=1e-6, rtol=0)


def test_hidden_term_fits_one_map_over_its_pairs_and_real_tokens():
    torch.manual_seed(0)
    term = HiddenMSE(HiddenMSEParams(layers=[(1, 1), (2, 2)]), info(4), info(6))
    a = torch.randn(4, 6)
    s = {f"hidden_states[{i}]": torch.randn(8, 20, 4) for i in (1, 2)}
    t = {k: v @ a + 1.0 for k, v in s.items()}
    mask = torch.ones(8, 20, dtype=torch.long)
    mask[0, 3:] = 0
    for k in t:
        t[k][0, 3:] = 100.0  # padding: must not enter the fit
    batch = {"attention_mask": mask, "input_ids": torch.zeros(8, 20, dtype=torch.long)}
    assert term.fits_projector()
    fit_linear(term.projector, *term.projector_rows(s, t, batch))
    torch.testing.assert_close(term.projector.weight, a.T, atol=1e-2, rtol=0)  # the ridge shrinks it a little
    assert float(term(s, t, batch).detach()) < 1e-3


def test_random_init_is_left_alone():
    term = HiddenMSE(HiddenMSEParams(projector_init="random"), info(4), info(6))
    assert not term.fits_projector()
    assert not HiddenMSE(HiddenMSEParams(), info(6), info(6)).fits_projector()  # same width: no projector


def test_stage_fits_before_step_one_and_not_on_resume(tiny_recipe, killed_run, monkeypatch):
    from kdistill import distill
    from kdistill.engine import loop

    tiny_recipe["student"] = {"config": {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 4,
                                         "intermediate_size": 32}}
    tiny_recipe["losses"] = [{"type": "hidden_mse", "layers": "uniform"}]
    tiny_recipe["train"].update(steps=4, save_every=2)
    calls = []
    original = loop.StageTrainer.fit_projectors

    def record(self):
        term = self.parts.terms[0]
        before = term.projector.weight.detach().clone()
        original(self)
        calls.append((self.step, torch.equal(before, term.projector.weight)))

    monkeypatch.setattr(loop.StageTrainer, "fit_projectors", record)
    killed_run(tiny_recipe, step=3)
    assert calls == [(0, False)]  # fitted once, at step 0
    distill(tiny_recipe, resume=True, progress=False)
    assert calls == [(0, False)]  # resumed at step 2: the checkpoint's projector, not a new fit
