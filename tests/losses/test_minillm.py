"""MiniLLM: the policy-gradient loss against a slow reference, teacher-mixed sampling's weights, a run."""
import math

import pytest
import torch

from kdistill import distill
from kdistill.config import OnPolicyConfig
from kdistill.engine.on_policy import OnPolicy
from kdistill.losses import LOSSES
from kdistill.losses.minillm import MiniLLMParams, future_mean
from kdistill.models.arch import ModelInfo
from kdistill.models.loading import load_model

LM = ModelInfo(model_type="gpt2", task="causal-lm", num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=2,
               head_dim=4, vocab_size=5, is_decoder=True, layers_path="transformer.h", pooling="last")


def log_softmax(row):
    m = max(row)
    z = math.log(sum(math.exp(x - m) for x in row)) + m
    return [x - z for x in row]


def test_future_mean_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.tensor([[0, 1, 1, 1]]).bool()
    assert future_mean(r, m).tolist() == [[3.0, 3.5, 4.0, 0.0]]


def test_loss_on_a_generated_batch_matches_the_reference():
    torch.manual_seed(0)
    zs, zt = torch.randn(2, 5, 5), torch.randn(2, 5, 5)
    batch = {"input_ids": torch.randint(0, 5, (2, 5)),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
             "loss_mask": torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 0, 0]]).bool(),
             "importance": torch.tensor([[1.0, 0.5, 2.0, 1.0, 1.0], [1.0, 1.5, 1.0, 1.0, 1.0]])}
    term = LOSSES.get("minillm")(MiniLLMParams(single_step_weight=0.7, long_term_weight=1.3), LM, LM)
    got = term({"logits": zs}, {"logits": zt}, batch)
    total, n = 0.0, 0
    for b in range(2):
        positions = [i for i in range(4) if batch["loss_mask"][b, i]]
        rewards = {}
        for i in positions:
            y = int(batch["input_ids"][b, i + 1])
            rewards[i] = log_softmax(zt[b, i].tolist())[y] - log_softmax(zs[b, i].tolist())[y]
        for i in positions:
            lq, lp = log_softmax(zs[b, i].tolist()), log_softmax(zt[b, i].tolist())
            kl = sum(math.exp(a) * (a - c) for a, c in zip(lq, lp))
            later = [rewards[j] for j in positions if j > i]
            future = sum(later) / len(later) if later else 0.0
            y = int(batch["input_ids"][b, i + 1])
            w = float(batch["importance"][b, i])
            total += w * (0.7 * kl - 1.3 * future * lq[y])
            n += 1
    assert got.item() == pytest.approx(total / n, rel=1e-5)
    assert term.count(batch) == n
    data = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    ce = torch.nn.functional.cross_entropy(zs[:, :-1][data["attention_mask"][:, 1:].bool()],
                                           data["input_ids"][:, 1:][data["attention_mask"][:, 1:].bool()])
    assert term({"logits": zs}, {"logits": zt}, data).item() == pytest.approx(ce.item(), rel=1e-6)


def test_teacher_mixed_sampling_weights(tiny_gpt2_dir):
    loaded = load_model(tiny_gpt2_dir, "causal-lm")
    policy = OnPolicy(OnPolicyConfig(fraction=1.0, max_new_tokens=4, teacher_mix=0.3), loaded.tokenizer, 102, 0)
    records = [{"text": "a short text to continue here"}, {"text": "another one"}]
    same = policy.sample(loaded.model, records, 32, 0, 0, 0, teacher=loaded.model)
    assert torch.allclose(same["importance"], torch.ones_like(same["importance"]))  # p = q: the mix is q
    torch.manual_seed(1)
    other = load_model(tiny_gpt2_dir, "causal-lm").model
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    mixed = policy.sample(loaded.model, records, 32, 0, 0, 0, teacher=other)
    generated = mixed["importance"][mixed["loss_mask"]]
    assert (generated > 0).all() and (generated < 1 / 0.7 + 1e-6).all()  # q / (0.3 p + 0.7 q) <= 1 / 0.7
    assert not torch.allclose(generated, torch.ones_like(generated))
    # alpha = 0: plain student sampling, every weight 1 whatever the teacher
    plain = OnPolicy(OnPolicyConfig(fraction=1.0, max_new_tokens=4, teacher_mix=0.0), loaded.tokenizer, 102, 0)
    unmixed = plain.sample(loaded.model, records, 32, 0, 0, 0, teacher=other)
    assert torch.equal(unmixed["importance"], torch.ones_like(unmixed["importance"]))


def test_minillm_run(tiny_gpt2_dir, text_file, tmp_path, monkeypatch):
    import json

    sampled = []
    sample = OnPolicy.sample
    monkeypatch.setattr(OnPolicy, "sample", lambda self, *a, **kw: sampled.append(kw.get("teacher")) or sample(
        self, *a, **kw))
    recipe = {"name": "minillm", "teacher": {"model": tiny_gpt2_dir}, "student": {"config": {"n_layer": 1}},
              "data": {"train": {"path": text_file, "text": "sentence", "limit": 16}, "max_length": 24},
              "losses": [{"type": "minillm"}],
              "on_policy": {"fraction": 0.75, "max_new_tokens": 6, "teacher_mix": 0.2},
              "train": {"steps": 3, "batch_size": 4, "grad_accum": 2, "lr": 1e-3, "log_every": 1},
              "output": str(tmp_path / "run")}
    student = distill(recipe, progress=False)
    assert (student / "config.json").exists()
    # the policy gradient trained on the student's own samples, mixed with the teacher's (teacher_mix)
    assert sampled and all(teacher is not None for teacher in sampled)
    logs = [json.loads(line) for line in (tmp_path / "run" / "logs" / "main.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if r["kind"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_a_completion_only_data_batch_gets_the_language_modelling_loss_on_its_completion():
    """A data micro-batch with a loss_mask (data.loss_on: completion) is still a data batch: generated ones are
    told apart by their importance weights."""
    torch.manual_seed(0)
    zs, zt = torch.randn(1, 5, 5), torch.randn(1, 5, 5)
    batch = {"input_ids": torch.randint(0, 5, (1, 5)), "attention_mask": torch.ones(1, 5, dtype=torch.long),
             "loss_mask": torch.tensor([[0, 0, 1, 1, 0]]).bool()}
    term = LOSSES.get("minillm")(MiniLLMParams(lm_weight=0.5), LM, LM)
    ce = torch.nn.functional.cross_entropy(zs[0, 2:4], batch["input_ids"][0, 3:5])
    assert term({"logits": zs}, {"logits": zt}, batch).item() == pytest.approx(0.5 * ce.item(), rel=1e-6)
    assert term.count(batch) == 2


def test_gradient_is_the_policy_gradient_with_rewards_held_fixed():
    # REINFORCE: the rewards R are constants; only log q(y_t) and the exact per-step KL carry gradient
    torch.manual_seed(1)
    zs, zt = torch.randn(1, 5, 5, requires_grad=True), torch.randn(1, 5, 5)
    batch = {"input_ids": torch.randint(0, 5, (1, 5)), "attention_mask": torch.ones(1, 5, dtype=torch.long),
             "loss_mask": torch.tensor([[0, 1, 1, 1, 0]]).bool(), "importance": torch.ones(1, 5)}
    term = LOSSES.get("minillm")(MiniLLMParams(), LM, LM)
    (got,) = torch.autograd.grad(term({"logits": zs}, {"logits": zt}, batch), zs)
    positions, ys = [1, 2, 3], [int(batch["input_ids"][0, i + 1]) for i in (1, 2, 3)]
    with torch.no_grad():
        rewards = [float(torch.log_softmax(zt[0, i], -1)[y] - torch.log_softmax(zs[0, i], -1)[y])
                   for i, y in zip(positions, ys)]
    reference = 0.0
    for k, (i, y) in enumerate(zip(positions, ys)):
        log_q, log_p = torch.log_softmax(zs[0, i], -1), torch.log_softmax(zt[0, i], -1)
        later = rewards[k + 1:]
        future = sum(later) / len(later) if later else 0.0
        reference = reference + (log_q.exp() * (log_q - log_p)).sum() - future * log_q[y]
    (expected,) = torch.autograd.grad(reference / 3, zs)
    torch.testing.assert_close(got, expected)
