import json
import os

import pytest
import torch

from kdistill.errors import ConfigError, DataError
from kdistill.eval.report import evaluate, render_table, save, spec_from_arg

FAST = {"batch_size": 8, "max_length": 32}


def table_text(result) -> str:
    from rich.console import Console

    console = Console(record=True, width=140)
    console.print(render_table(result))
    return console.export_text()


def test_same_model_as_teacher_and_student(make_bert, jsonl_file, tmp_path):
    path = make_bert(0)
    result = evaluate(path, path, {"path": jsonl_file}, **FAST)
    data = result["datasets"][jsonl_file]
    assert data["n"] == 12
    assert data["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert data["spearman"] == pytest.approx(1.0, abs=1e-5)
    assert data["recall_at_10"] == pytest.approx(1.0)
    assert result["speedup"] > 0
    for role in ("teacher", "student"):
        model = result["models"][role]
        assert model["params"] > 0 and model["size_mb"] > 0 and model["texts_per_s"] > 0
        assert model["task"] == "embedding" and model["pooling"] == "mean"
    out = save(result, tmp_path / "out" / "eval.json")
    assert json.loads(open(out).read())["datasets"][jsonl_file]["n"] == 12
    text = table_text(result)
    assert "cosine to teacher" in text and "texts / s" in text and "speedup" in text


def test_different_student_on_two_datasets(make_bert, jsonl_file, tmp_path, texts):
    other = tmp_path / "other.txt"
    other.write_text("\n".join(reversed(texts)) + "\n\n")
    specs = [{"path": jsonl_file}, {"path": str(other), "name": "out-of-domain"}]
    result = evaluate(make_bert(1), make_bert(0), specs, speed=False, **FAST)
    assert set(result["datasets"]) == {jsonl_file, "out-of-domain"}
    for data in result["datasets"].values():
        assert data["n"] == 12  # the blank line is dropped
        assert -1 <= data["cosine"] < 0.999
        assert -1 <= data["spearman"] <= 1 and 0 <= data["recall_at_10"] <= 1
    assert result["speedup"] is None and result["models"]["student"]["texts_per_s"] is None


def test_student_only_and_pooling_from_sentence_transformers(make_bert, jsonl_file, tmp_path):
    import shutil

    path = tmp_path / "st"
    shutil.copytree(make_bert(0), path)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    result = evaluate(str(path), None, {"path": jsonl_file, "limit": 5}, **FAST)
    assert list(result["models"]) == ["student"]
    assert result["models"]["student"]["pooling"] == "cls"
    assert result["datasets"][jsonl_file] == {"n": 5}
    assert result["speedup"] is None and result["models"]["student"]["texts_per_s"] > 0
    assert "student" in table_text(result)


def test_classifier_accuracy_and_causal_lm_perplexity(classifier_dir, gpt2_dir, jsonl_file):
    spec = {"path": jsonl_file, "label": "label"}
    clf = evaluate(classifier_dir, classifier_dir, spec, speed=False, **FAST)
    acc = clf["datasets"][jsonl_file]["accuracy"]
    assert acc["teacher"] == acc["student"] and 0 <= acc["student"] <= 1
    assert "cosine" not in clf["datasets"][jsonl_file]
    lm = evaluate(gpt2_dir, None, {"path": jsonl_file}, speed=False, **FAST)
    assert lm["datasets"][jsonl_file]["perplexity"]["student"] > 1
    assert "perplexity" in table_text(lm)
    other = jsonl_file.replace("texts.jsonl", "other.jsonl")
    with open(other, "w") as f:
        f.write(json.dumps({"text": "a wasp", "label": "wasp"}) + "\n")
    with pytest.raises(DataError, match=r"data '.*other.jsonl', scoring the student: labels 'wasp' are not among"):
        evaluate(classifier_dir, None, {"path": other, "label": "label"}, speed=False, **FAST)


def test_spec_from_arg(tmp_path):
    assert spec_from_arg("stdlib-docstrings") == {"source": "stdlib-docstrings"}
    assert spec_from_arg("data/x.jsonl") == {"path": "data/x.jsonl"}
    assert spec_from_arg(str(tmp_path)) == {"path": str(tmp_path)}
    assert spec_from_arg("dataset:imdb") == {"dataset": "imdb"}
    with pytest.raises(ConfigError, match="did you mean 'stdlib-docstrings'"):
        spec_from_arg("stdlib-docstring")


def test_table_says_why_cosine_is_missing():
    result = {"models": {r: {"ref": r, "task": "embedding", "params": 10, "size_mb": None,
                             "texts_per_s": None} for r in ("teacher", "student")},
              "speedup": None,
              "datasets": {"d": {"n": 3, "cosine": None, "cosine_error": "cosine needs equal widths",
                                 "spearman": 0.5, "recall_at_10": 1.0}}}
    text = table_text(result)
    assert "n/a (widths differ)" in text and "0.500" in text


def test_the_limit_takes_records_evenly_through_an_ordered_corpus():
    """The supersense split is ordered by class: its first 512 glosses hold 3 of the 45, so a score on them
    measured three classes. A source's own `limit:` still means its first N."""
    from kdistill.data import load_records
    from kdistill.eval.report import load_datasets

    whole = load_records({"source": "wordnet-supersense"}, "eval")
    taken = load_datasets({"source": "wordnet-supersense"}, "eval", 512)["wordnet-supersense"]
    assert len(taken) == 512 and taken[0] == whole[0] and taken[-1] == whole[511 * len(whole) // 512]
    assert len({r["label"] for r in taken}) > 40 > len({r["label"] for r in whole[:512]})
    first = load_datasets({"source": "wordnet-supersense", "limit": 8}, "eval", 512)["wordnet-supersense"]
    assert first == whole[:8]
    # a sample is drawn from the first 100 x limit records, not from a huge source read whole
    assert load_datasets({"source": "wordnet-supersense"}, "eval", 3)["wordnet-supersense"] == [whole[0], whole[100],
                                                                                                    whole[200]]
    for bad in (0, -5, True, 2.5):
        with pytest.raises(ConfigError, match=rf"limit must be a whole number .*got {bad!r}"):
            load_datasets({"source": "wordnet-supersense"}, "eval", bad)


def test_report_paths_that_cannot_be_written_are_refused_before_the_work(tmp_path):
    from kdistill.errors import OutputError
    from kdistill.eval.report import check_report_path

    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere" / "e.json")
    with pytest.raises(ConfigError, match=r"is a link to .*nowhere/e.json, which does not exist"):
        check_report_path(tmp_path / "dangling.json", "--output", "eval.json")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError, match=r"could not be written to .*file.txt/r.json .*the table above holds"):
        save({"a": 1}, tmp_path / "file.txt" / "r.json")  # one message, not a traceback after the evaluation


def test_an_encoder_student_against_a_classifier_teacher_is_refused(tiny_bert_dir, make_classifier, tmp_path):
    """It returned the teacher's accuracy alone: nothing scored the student."""
    from kdistill.errors import PairingError
    from kdistill.eval.report import evaluate

    teacher = make_classifier(tmp_path / "teacher")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a red thing", "y": "red"}\n')
    with pytest.raises(PairingError, match="the student is an embedding model and the teacher a classification model"):
        evaluate(tiny_bert_dir, str(teacher), {"path": str(data), "label": "y"}, speed=False)
