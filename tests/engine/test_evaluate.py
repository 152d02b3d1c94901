"""The in-training evaluation (one student pass per batch, records taken shortest first) reports the accuracy and
loss a plain recomputation from the saved models gives."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdistill import distill
from kdistill.engine.build import shortest_first

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def test_shortest_first_orders_texts_and_pairs_and_keeps_other_records_in_place():
    records = [{"text": "ccc"}, {"text": "a", "text_pair": "bbbb"}, {"text": "bb"}]
    assert [r["text"] for r in shortest_first(records)] == ["bb", "ccc", "a"]
    images = [{"image": i} for i in range(3)]
    assert shortest_first(images) == images


def test_logged_eval_matches_a_recomputation_from_the_saved_models(make_classifier, tmp_path):
    teacher = make_classifier(tmp_path / "teacher")
    # lengths from 1 to 9 words in an order unlike the sorted one, so the batches differ from the file's
    rows = [{"text": " ".join(WORDS[(i * 5 + j) % 16] for j in range(1 + (i * 7) % 9)), "y": ["red", "green", "blue"][i % 3]}
            for i in range(37)]
    data = tmp_path / "labeled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {"path": str(data), "label": "y"}
    alpha, tau = 0.5, 2.0
    student = distill({"name": "kd", "teacher": {"model": teacher}, "student": {"from_teacher": {"layers": [2, 4]}},
                       "data": {"train": source, "eval": source, "max_length": 16},
                       "losses": [{"type": "logit_kd", "temperature": tau, "alpha": alpha}],
                       "train": {"steps": 3, "batch_size": 8, "lr": 1e-2, "eval_every": 3},
                       "output": str(tmp_path / "student")}, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "student" / "logs" / "main.jsonl").read_text().splitlines()]
    last = [r for r in logged if r["kind"] == "eval"][-1]

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    inputs = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt")
    labels = torch.tensor([["blue", "green", "red"].index(r["y"]) for r in rows])
    with torch.no_grad():
        t = AutoModelForSequenceClassification.from_pretrained(teacher).eval()(**inputs).logits.double()
        s = AutoModelForSequenceClassification.from_pretrained(student).eval()(**inputs).logits.double()
    per_record = [alpha * F.cross_entropy(s[i], labels[i]) + (1 - alpha) * tau ** 2 * F.kl_div(
        F.log_softmax(s[i] / tau, -1), F.log_softmax(t[i] / tau, -1), log_target=True, reduction="sum")
        for i in range(len(rows))]
    assert abs(last["accuracy"] - (s.argmax(-1) == labels).double().mean().item()) < 1e-9
    assert abs(last["loss"] - torch.stack(per_record).mean().item()) < 1e-4
