import json

import pytest

from kdistill.data.sources import spread


def test_eval_limit_takes_records_evenly_through_an_ordered_corpus():
    records = [{"pos": "noun"}] * 70 + [{"pos": "verb"}] * 20 + [{"pos": "adj"}] * 10
    picked = spread(records, 10)
    assert [r["pos"] for r in picked] == ["noun"] * 7 + ["verb"] * 2 + ["adj"]
    assert spread(records, 500) == records and spread(records, None) == records


def test_a_gpt2_classifier_student_gets_the_pad_of_the_batches(tmp_path, make_classifier, tiny_gpt2_dir):
    """GPT-2's classifier finds each text's last token by config.pad_token_id; a GPT-2 saved without one
    stopped at the first batch of two inside transformers."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from kdistill import distill

    assert AutoConfig.from_pretrained(tiny_gpt2_dir).pad_token_id is None
    teacher = make_classifier(tmp_path / "teacher")
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} thing {i}", "y": w}) + "\n"
                            for i in range(4) for w in ("red", "green", "blue")))
    recipe = {"name": "gpt2-classifier", "teacher": {"model": teacher}, "student": {"model": str(tiny_gpt2_dir)},
              "data": {"train": {"path": str(data), "label": "y"}, "max_length": 16},
              "losses": [{"type": "logit_kd", "alpha": 0.5}], "train": {"steps": 2, "batch_size": 4},
              "output": str(tmp_path / "run")}
    out = distill(recipe, progress=False)
    saved = AutoModelForSequenceClassification.from_pretrained(out)
    assert saved.config.pad_token_id == 0  # the MiniLM tokenizer's [PAD], which padded the batches


def test_one_class_is_no_classifier(tiny_bert_dir, tmp_path):
    from kdistill import distill
    from kdistill.errors import DataError

    data = tmp_path / "one.jsonl"
    data.write_text("".join(f'{{"text": "thing {i}", "y": "red"}}\n' for i in range(8)))
    recipe = {"name": "one", "teacher": {"model": tiny_bert_dir, "task": "classification"},
              "student": {"from_teacher": {"layers": [1]}}, "data": {"train": {"path": str(data), "label": "y"}},
              "losses": [{"type": "cross_entropy"}], "train": {"steps": 1, "batch_size": 4},
              "output": str(tmp_path / "run")}
    with pytest.raises(DataError, match="data has one class \\('red'\\); a classifier needs two or more"):
        distill(recipe, progress=False)


def test_classes_only_in_the_eval_data_are_pointed_out(tiny_bert_dir, tmp_path):
    from io import StringIO

    from rich.console import Console

    from kdistill.config import load_recipe
    from kdistill.engine.run import run_recipe

    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(f'{{"text": "thing {i}", "y": "{c}"}}\n' for i in range(4) for c in ("red", "blue")))
    dev.write_text("".join(f'{{"text": "thing {i}", "y": "{c}"}}\n' for i in range(2) for c in ("red", "teal")))
    recipe = {"name": "evalonly", "teacher": {"model": tiny_bert_dir, "task": "classification"},
              "student": {"from_teacher": {"layers": [1]}},
              "data": {"train": {"path": str(train), "label": "y"}, "eval": {"path": str(dev), "label": "y"}},
              "losses": [{"type": "cross_entropy"}], "train": {"steps": 1, "batch_size": 4},
              "output": str(tmp_path / "run")}
    out = StringIO()
    run_recipe(load_recipe(recipe), console=Console(file=out, width=300), progress=False)
    assert "data.eval has 1 class(es) the training data lacks (teal)" in out.getvalue()


@pytest.mark.parametrize("task, error, message", [
    ("masked-lm", "PairingError", "was saved without an MLM head .*BertModel.*random head"),
    ("classification", "DataError", "data has no labels, and the teacher is a classifier of a task not yet"),
])
def test_a_teacher_asked_for_a_task_it_has_not_learned_is_refused_by_name(tiny_bert_dir, tmp_path, task, error,
                                                                           message):
    import kdistill.errors
    from kdistill import distill

    recipe = {"name": "untaught", "teacher": {"model": tiny_bert_dir, "task": task},
              "student": {"from_teacher": {"layers": [1]}},
              "data": {"train": {"source": "stdlib-docstrings", "limit": 8}}, "losses": [{"type": "logit_kd"}],
              "train": {"steps": 1, "batch_size": 4}, "output": str(tmp_path / "r")}
    with pytest.raises(getattr(kdistill.errors, error), match=message):
        distill(recipe, progress=False)


def test_a_batch_twice_the_training_data_is_refused_naming_the_field(tmp_path, tiny_recipe):
    """A batch of 100,000 over 64 records was killed for memory with no message."""
    from kdistill import distill
    from kdistill.config import load_recipe
    from kdistill.engine.build import read_sources
    from kdistill.errors import ConfigError

    records = len(read_sources(load_recipe(tiny_recipe).stages[0].data.train, "train", "data.train"))
    tiny_recipe["train"]["batch_size"] = 2 * records
    with pytest.raises(ConfigError, match=rf"train.batch_size {2 * records:,} is at least twice the {records:,} "
                                          rf"training records.*lower train.batch_size to {records:,} or less"):
        distill(tiny_recipe, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
