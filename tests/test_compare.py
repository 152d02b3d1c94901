"""`kdistill compare` on tiny models: a recipe and its no-teacher baseline, two seeds, a results section."""
import json

import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification

from kdistill.compare import baseline_of, compare
from kdistill.config import load_recipe


def tiny_classifier(path, tokenizer):
    torch.manual_seed(0)
    labels = ["blue", "green", "red"]
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3,
                        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_compare_writes_a_table_with_baseline(tmp_path, tokenizer):
    teacher = tiny_classifier(tmp_path / "teacher", tokenizer)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} thing {i}", "y": w}) + "\n"
                            for i in range(8) for w in ("red", "green", "blue")))
    recipe = {"name": "tiny-kd", "teacher": {"model": teacher}, "student": {"from_teacher": {"layers": [2, 4]}},
              "data": {"train": {"path": str(data), "label": "y"}, "eval": {"path": str(data), "label": "y"},
                       "max_length": 16},
              "losses": [{"type": "logit_kd", "alpha": 0.5}], "train": {"steps": 2, "batch_size": 4}}
    path = tmp_path / "tiny-kd.yaml"
    path.write_text(yaml.safe_dump(recipe))

    base = baseline_of(load_recipe(str(path)))
    assert [p.type for p in base.stages[0].losses] == ["cross_entropy"] and base.stages[0].train.steps == 2
    assert base.stages[0].student == load_recipe(str(path)).stages[0].student

    results = tmp_path / "results.md"
    report = compare([str(path)], seeds=2, output=str(tmp_path / "runs"), results=str(results))
    names = [row["name"] for row in report["rows"]]
    assert names == ["tiny-kd", "tiny-kd-baseline"]
    assert all(len(row["accuracy"]) == 2 and all(0 <= a <= 1 for a in row["accuracy"]) for row in report["rows"])
    text = results.read_text()
    assert "| tiny-kd-baseline |" in text and (tmp_path / "results-tiny-kd.png").exists()
    compare([str(path)], seeds=2, output=str(tmp_path / "runs"), results=str(results))  # reuses the runs
    assert results.read_text().count("<!-- compare:tiny-kd -->") == 1
