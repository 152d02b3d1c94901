"""ProKT: the teacher's loss against a hand-written formula, and a run that trains it and resumes exactly."""
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

from kdistill import distill
from kdistill.config import TeacherUpdate
from kdistill.engine.teacher_update import TeacherUpdater


def softmax(xs):
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


def test_teacher_loss_is_task_loss_plus_kl_toward_the_student():
    torch.manual_seed(0)
    updater = TeacherUpdater.__new__(TeacherUpdater)  # only the loss: no model needed
    updater.task, updater.cfg = "classification", TeacherUpdate(kl_weight=0.7, temperature=2.0)
    zt, zs, labels = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 2, 3])
    loss = updater.loss(zt, zs, {"labels": labels})
    ce = -sum(math.log(softmax(zt[i].tolist())[labels[i]]) for i in range(3)) / 3
    kl = 0.0
    for i in range(3):
        p, q = softmax((zs[i] / 2).tolist()), softmax((zt[i] / 2).tolist())
        kl += sum(a * math.log(a / b) for a, b in zip(p, q))
    assert loss.item() == pytest.approx(ce + 0.7 * kl / 3, rel=1e-5)


def test_prokt_trains_the_teacher_and_resumes_exactly(prokt_recipe, tmp_path, killed_run):
    straight = distill({**prokt_recipe, "output": str(tmp_path / "a")}, progress=False)
    killed_run({**prokt_recipe, "output": str(tmp_path / "b")}, step=3)
    ckpt = tmp_path / "b" / "checkpoints" / "main" / "step-0000002"
    trained_teacher = load_file(str(ckpt / "teacher.safetensors"))
    before = load_file(str(tmp_path / "teacher" / "model.safetensors"))
    key = "classifier.weight"
    assert not torch.equal(trained_teacher[key], before[key])  # the teacher moved
    resumed = distill({**prokt_recipe, "output": str(tmp_path / "b")}, resume=True, progress=False)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_teacher_lr_scale_gives_matching_parameters_their_rate():
    from kdistill.engine.teacher_update import scaled_groups
    from kdistill.errors import ConfigError

    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                        num_labels=3)
    teacher = BertForSequenceClassification(config)
    groups = scaled_groups(teacher, 1e-4, {"classifier.*": 10})
    rates = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert rates[id(teacher.classifier.weight)] == pytest.approx(1e-3)
    assert rates[id(teacher.bert.pooler.dense.weight)] == pytest.approx(1e-4)
    assert len(rates) == len(list(teacher.parameters()))
    with pytest.raises(ConfigError, match=r"teacher.update.lr_scale.*matches no teacher parameter"):
        scaled_groups(teacher, 1e-4, {"clasifier.*": 10})


def test_two_teacher_updates_equal_adamw_steps_worked_out_by_hand():
    """The updater's optimizer steps against AdamW written out here (torch's defaults: betas 0.9/0.999, eps 1e-8,
    weight decay 0.01, bias-corrected), on gradients of the ProKT loss written out here, the head at its 10×
    rate: what a run's teacher does between two checkpoints."""
    import copy

    from accelerate import Accelerator

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = BertForSequenceClassification(config)
    reference = copy.deepcopy(teacher)
    start = teacher.classifier.weight.detach().clone()
    lr, kl_weight, tau = 1e-2, 0.7, 2.0
    cfg = TeacherUpdate(lr=lr, kl_weight=kl_weight, temperature=tau, lr_scale={"classifier.*": 10})
    updater = TeacherUpdater(teacher, lambda batch, names: {"logits": teacher(input_ids=batch["input_ids"]).logits},
                             "classification", cfg, Accelerator(cpu=True), max_grad_norm=None)
    params = dict(reference.named_parameters())
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    for t in (1, 2):
        batch = {"input_ids": torch.randint(0, 30, (4, 5)), "labels": torch.randint(0, 3, (4,))}
        student_logits = torch.randn(4, 3)
        updater.loss(updater.logits(batch), student_logits, batch).backward()
        updater.step()

        zt = reference(input_ids=batch["input_ids"]).logits
        log_q = zt - zt.exp().sum(-1, keepdim=True).log()
        ce = -log_q[torch.arange(4), batch["labels"]].mean()
        p_s = (student_logits / tau).softmax(-1)
        log_qt = zt / tau - (zt / tau).exp().sum(-1, keepdim=True).log()
        kl = (p_s * (p_s.log() - log_qt)).sum(-1).mean()
        grads = dict(zip(params, torch.autograd.grad(ce + kl_weight * kl, list(params.values()))))
        with torch.no_grad():
            for name, p in params.items():
                rate = lr * (10 if name.startswith("classifier.") else 1)
                m[name] = 0.9 * m[name] + 0.1 * grads[name]
                v[name] = 0.999 * v[name] + 0.001 * grads[name] ** 2
                m_hat, v_hat = m[name] / (1 - 0.9 ** t), v[name] / (1 - 0.999 ** t)
                p.mul_(1 - rate * 0.01).sub_(rate * m_hat / (v_hat.sqrt() + 1e-8))
        for name, p in teacher.named_parameters():
            assert torch.allclose(p, params[name], atol=1e-6), (t, name)
    assert (teacher.classifier.weight - start).abs().max() > 0.1  # steps of about 10 × lr each: it moved


LABELS = ["x", "y"]
ROWS = [{"text": f"item {i} of {'ab' * i}", "label": LABELS[i % 2]} for i in range(4)]


def four_rows(tmp_path):
    import json

    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return data


def save_pair(teacher, student, tmp_path, tokenizer):
    for model, where in ((teacher, "teacher"), (student, "student")):
        with torch.no_grad():  # random heads give near-uniform outputs: a KL term too small to see
            model.bert.pooler.dense.weight.mul_(50)
            model.classifier.weight.mul_(50)
        model.save_pretrained(tmp_path / where)
        tokenizer.save_pretrained(tmp_path / where)


def test_the_loop_gives_the_teacher_the_gradient_of_its_loss_toward_the_student(prokt_recipe, tmp_path, tokenizer,
                                                                                 monkeypatch):
    # the teacher's gradient in a run (two micro-batches) against CE + kl_weight * KL(student || teacher) written out
    # over the whole batch; the student has dropout, and the teacher's target is the student read in eval mode
    import torch.nn.functional as F

    data = four_rows(tmp_path)
    seen = {}
    original = TeacherUpdater.step

    def step(self):
        seen.update({n: p.grad.clone() for n, p in self.module.named_parameters() if p.grad is not None})
        original(self)

    monkeypatch.setattr(TeacherUpdater, "step", step)
    teacher = BertForSequenceClassification.from_pretrained(tmp_path / "teacher")
    torch.manual_seed(1)
    student = BertForSequenceClassification(teacher.config.__class__(**{**teacher.config.to_dict(),
                                                                       "num_hidden_layers": 1,
                                                                       "hidden_dropout_prob": 0.5}))
    save_pair(teacher, student, tmp_path, tokenizer)
    recipe = {**prokt_recipe, "data": {"train": {"path": str(data), "label": "label"}, "max_length": 16},
              "teacher": {**prokt_recipe["teacher"], "update": {"lr": 1e-2, "kl_weight": 0.7}},
              "student": {"model": str(tmp_path / "student")},
              "train": {"steps": 1, "batch_size": 4, "grad_accum": 2}, "output": str(tmp_path / "run")}
    distill(recipe, progress=False)

    teacher = BertForSequenceClassification.from_pretrained(tmp_path / "teacher").train()
    student = BertForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    batch = tokenizer([r["text"] for r in ROWS], padding=True, return_tensors="pt")
    y = torch.tensor([LABELS.index(r["label"]) for r in ROWS])
    zt = teacher(**batch).logits
    with torch.no_grad():
        ps = F.softmax(student(**batch).logits, -1)
    kl = (ps * (ps.log() - F.log_softmax(zt, -1))).sum(-1).mean()
    toward = torch.autograd.grad(0.7 * kl, teacher.classifier.weight, retain_graph=True)[0]
    assert toward.abs().max() > 1e-2  # the KL's share is far above the tolerance below
    (F.cross_entropy(zt, y) + 0.7 * kl).backward()
    assert set(seen) == {n for n, p in teacher.named_parameters() if p.grad is not None}
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(seen[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_the_student_distils_from_the_teacher_after_its_step_read_without_dropout(prokt_recipe, tmp_path, tokenizer,
                                                                                  monkeypatch):
    # ProKT's order in the authors' code: the teacher steps first, then the student's targets are the updated
    # teacher's logits in eval mode. The teacher has dropout here, so targets read in train mode would differ too;
    # two micro-batches: both read the teacher after its one step (the whole batch's gradient is checked)
    import torch.nn.functional as F

    from kdistill.engine.loop import StageTrainer

    data = four_rows(tmp_path)
    config = BertForSequenceClassification.from_pretrained(tmp_path / "teacher").config.to_dict()
    torch.manual_seed(1)
    teacher = BertForSequenceClassification(BertConfig(**{**config, "hidden_dropout_prob": 0.5}))
    student = BertForSequenceClassification(BertConfig(**{**config, "num_hidden_layers": 1}))
    save_pair(teacher, student, tmp_path, tokenizer)
    after_step, student_grad = {}, {}
    original_step, original_backward = TeacherUpdater.step, StageTrainer.backward

    def step(self):
        original_step(self)
        after_step.update({n: p.detach().clone() for n, p in self.module.state_dict().items()})

    def backward(self, loss, world):
        original_backward(self, loss, world)
        student = self.acc.unwrap_model(self.model).student
        student_grad["w"], student_grad["training"] = student.classifier.weight.grad.clone(), student.training

    monkeypatch.setattr(TeacherUpdater, "step", step)
    monkeypatch.setattr(StageTrainer, "backward", backward)
    recipe = {**prokt_recipe, "data": {"train": {"path": str(data), "label": "label"}, "max_length": 16},
              "teacher": {**prokt_recipe["teacher"], "update": {"lr": 1e-1}},
              "student": {"model": str(tmp_path / "student")},
              "train": {"steps": 1, "batch_size": 4, "grad_accum": 2}, "output": str(tmp_path / "run")}
    distill(recipe, progress=False)
    assert student_grad["training"]  # the student trains in train mode after reading itself in eval mode

    batch = tokenizer([r["text"] for r in ROWS], padding=True, return_tensors="pt")
    y = torch.tensor([LABELS.index(r["label"]) for r in ROWS])
    teacher = BertForSequenceClassification.from_pretrained(tmp_path / "teacher").eval()
    with torch.no_grad():
        before = teacher(**batch).logits
        teacher.load_state_dict(after_step)
        after = teacher(**batch).logits

    def grad_toward(zt):  # 0.5 CE + 0.5 τ² KL(teacher ‖ student) at τ = 2, the recipe's logit_kd
        student = BertForSequenceClassification.from_pretrained(tmp_path / "student").train()
        zs = student(**batch).logits
        pt = F.softmax(zt / 2, -1)
        kl = (pt * (pt.log() - F.log_softmax(zs / 2, -1))).sum(-1).mean()
        return torch.autograd.grad(0.5 * F.cross_entropy(zs, y) + 0.5 * 4 * kl, student.classifier.weight)[0]

    expected, stale = grad_toward(after), grad_toward(before)
    assert (expected - stale).abs().max() > 1e-3  # the teacher's step changes the targets by far more than the tolerance
    torch.testing.assert_close(student_grad["w"], expected, atol=1e-6, rtol=1e-4)


def test_prokt_is_refused_beside_on_policy_samples_and_a_theseus_student(prokt_recipe):
    from kdistill.config import load_recipe
    from kdistill.errors import ConfigError

    load_recipe(prokt_recipe)
    sampling = {**prokt_recipe, "on_policy": {"fraction": 0.5}}
    with pytest.raises(ConfigError, match=r"teacher.update \(ProKT\).*generated samples.*remove on_policy"):
        load_recipe(sampling)
    theseus = {**prokt_recipe, "student": {"theseus": {"modules": 1}}}
    with pytest.raises(ConfigError, match=r"teacher.update \(ProKT\) with a student.theseus hybrid"):
        load_recipe(theseus)
