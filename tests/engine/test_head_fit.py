"""train.head_init: fit sets the student's classifier to the ridge least-squares map from its pooled features
to the teacher's centred logits (one-hot labels without a teacher), checked against numpy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdistill import distill
from kdistill.config import load_recipe
from kdistill.engine.head_fit import fit_head, head_targets
from kdistill.errors import ConfigError

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()
LABELS = ["blue", "green", "red"]


def ridge(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3):
    """Centred least squares with rows sqrt(λ)·I appended, λ = ridge × the features' mean variance sum."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    lam = ridge * np.mean(np.sum(xc * xc, axis=0)) + 1e-12
    w = np.linalg.lstsq(np.vstack([xc, np.sqrt(lam) * np.eye(x.shape[1])]),
                        np.vstack([yc, np.zeros((x.shape[1], y.shape[1]))]), rcond=None)[0]
    return w.T, y.mean(0) - x.mean(0) @ w


def pooled(model, tokenizer, texts):
    with torch.no_grad():
        inputs = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        return model.bert(**inputs).pooler_output.double().numpy()


def assert_same_map(model, x: np.ndarray, y: np.ndarray) -> None:
    """The head's outputs on x equal the ridge fit's (compared as outputs: a tiny random model's pooled
    features are near collinear, so equal maps can differ in their weights by float32 noise)."""
    w, bias = ridge(x, y)
    head = model.classifier
    got = x @ head.weight.detach().double().numpy().T + head.bias.detach().double().numpy()
    np.testing.assert_allclose(got, x @ w.T + bias, atol=1e-3 * np.abs(y).max())  # a random teacher's logits are small
    assert np.abs(x @ w.T + bias - y).mean() < np.abs(y - y.mean(0)).mean()  # the fit explains something


def test_fit_head_is_ridge_on_what_the_head_reads(make_classifier, tmp_path, tokenizer):
    model = AutoModelForSequenceClassification.from_pretrained(make_classifier(tmp_path / "m")).eval()
    gen = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 5)) for i in range(40)]
    y = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    batches = [dict(tokenizer(texts[s:s + 16], padding=True, return_tensors="pt"), rows=y[s:s + 16])
               for s in range(0, 40, 16)]
    fit_head(model.classifier, lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                    token_type_ids=b["token_type_ids"]), batches, lambda b: b["rows"])
    assert_same_map(model, pooled(model, tokenizer, texts), y.numpy())


def test_targets_are_centred_teacher_logits_else_one_hot_labels():
    logits = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    torch.testing.assert_close(head_targets({}, logits, 3), torch.tensor([[-2.0, -1.0, 3.0], [-1.0, -1.0, 2.0]]))
    torch.testing.assert_close(head_targets({"labels": torch.tensor([2, 0])}, None, 3),
                               torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(ConfigError, match="head_init"):
        head_targets({}, None, 3)


@pytest.fixture
def head_recipe(make_classifier, tmp_path):
    teacher = make_classifier(tmp_path / "teacher")
    data = tmp_path / "d.jsonl"
    rows = [{"text": " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(2 + i % 4)), "label": LABELS[i % 3]}
            for i in range(48)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows, {"name": "fit", "teacher": {"model": str(teacher)}, "student": {"from_teacher": {"layers": [2, 4]}},
                  "data": {"train": {"path": str(data), "label": "label"}, "max_length": 16},
                  "train": {"steps": 1, "batch_size": 8, "lr": 1e-12, "warmup": 0.0, "head_init": "fit"},
                  "output": str(tmp_path / "run")}


@pytest.mark.parametrize("loss", ["logit_kd", "cross_entropy"])
def test_a_stage_starts_from_the_fitted_head(head_recipe, loss):
    rows, recipe = head_recipe
    student_dir = distill({**recipe, "losses": [{"type": loss}]}, progress=False)
    student = AutoModelForSequenceClassification.from_pretrained(student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    texts = [r["text"] for r in rows]
    if loss == "logit_kd":  # the teacher's logits, less each row's mean
        teacher = AutoModelForSequenceClassification.from_pretrained(recipe["teacher"]["model"]).eval()
        with torch.no_grad():
            z = teacher(**tokenizer(texts, padding=True, truncation=True, max_length=16,
                                    return_tensors="pt")).logits.double().numpy()
        y = z - z.mean(1, keepdims=True)
    else:  # no teacher read: the labels one-hot
        y = np.eye(3)[[LABELS.index(r["label"]) for r in rows]]
    assert_same_map(student, pooled(student, tokenizer, texts), y)


def test_head_init_fit_is_refused_where_no_logits_are_there_to_fit(head_recipe):
    _, recipe = head_recipe
    prokt = {**recipe, "teacher": {**recipe["teacher"], "update": {"lr": 1e-3}}, "losses": [{"type": "logit_kd"}]}
    with pytest.raises(ConfigError, match="head_init: fit reads the live teacher's logits"):
        load_recipe(prokt)


def test_a_run_killed_after_the_fit_resumes_exactly(head_recipe, tmp_path, killed_run, monkeypatch):
    """The fitted head is in the checkpoint; a resume must not fit it again over the trained one."""
    from safetensors.torch import load_file

    from kdistill.engine.loop import StageTrainer

    _, recipe = head_recipe
    recipe = {**recipe, "losses": [{"type": "logit_kd"}],
              "train": {**recipe["train"], "steps": 4, "lr": 1e-3, "save_every": 2}}
    straight = distill({**recipe, "output": str(tmp_path / "a")}, progress=False)
    killed_run({**recipe, "output": str(tmp_path / "b")}, step=3)
    fits = []
    original = StageTrainer.init_head
    monkeypatch.setattr(StageTrainer, "init_head", lambda self: fits.append(self.step) or original(self))
    resumed = distill({**recipe, "output": str(tmp_path / "b")}, resume=True, progress=False)
    assert fits == []  # resumed at step 2: the head comes from the checkpoint
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
