"""A classifier stage's classes (engine/classes.py): every record labelled or none, and the teacher's classes."""
import json

import pytest


def test_a_classifier_data_mixing_labelled_and_unlabelled_records_is_refused_before_training(tmp_path, make_classifier):
    from kdistill import distill
    from kdistill.errors import DataError

    teacher = make_classifier(tmp_path / "teacher")
    labelled, bare = tmp_path / "labelled.jsonl", tmp_path / "bare.jsonl"
    labelled.write_text("".join(json.dumps({"text": f"{w} thing {i}", "y": w}) + "\n"
                                for i in range(4) for w in ("red", "green", "blue")))
    bare.write_text("".join(json.dumps({"text": f"plain text {i}"}) + "\n" for i in range(5)))
    recipe = {"name": "mixed", "teacher": {"model": teacher}, "student": {"from_teacher": {"layers": [2, 4]}},
              "data": {"train": [{"path": str(labelled), "label": "y"}, {"path": str(bare)}], "max_length": 16},
              "losses": [{"type": "logit_kd", "alpha": 0.5}], "train": {"steps": 2, "batch_size": 4},
              "output": str(tmp_path / "run")}
    with pytest.raises(DataError, match=r"data.train: 5 of its 17 records have no label \(e.g. 'plain text 0'\)"):
        distill(recipe, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    recipe["data"]["train"] = [{"path": str(bare)}]
    # unlabelled alone: refused by name for a term that trains on labels, before any step ...
    with pytest.raises(DataError, match=r"data.train has no labels, but losses\[0\] trains on them"):
        distill(recipe, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    # ... and distillation on the teacher's outputs alone
    recipe["losses"] = [{"type": "logit_kd", "alpha": 0.0}]
    assert (distill(recipe, progress=False) / "kdistill.json").exists()


def test_data_with_classes_the_teacher_does_not_know_is_refused_naming_the_fix(tmp_path, make_classifier):
    from kdistill import distill
    from kdistill.errors import PairingError

    teacher = make_classifier(tmp_path / "teacher")
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} thing {i}", "y": w}) + "\n"
                            for i in range(2) for w in ("red", "purple")))
    recipe = {"name": "unknown-class", "teacher": {"model": teacher}, "student": {"from_teacher": {"layers": [2, 4]}},
              "data": {"train": {"path": str(data), "label": "y"}, "max_length": 16},
              "losses": [{"type": "logit_kd", "alpha": 0.5}], "train": {"steps": 2, "batch_size": 4},
              "output": str(tmp_path / "run")}
    with pytest.raises(PairingError, match=r"over 3 classes \(blue, green, red\) but data.train has labels it does "
                                           r"not know: purple; losses\[0\] reads the teacher's predictions, which need "
                                           r"teacher and data to share their classes \(terms that read only its "
                                           r"features, such as hidden_mse"):
        distill(recipe, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    known = tmp_path / "known.jsonl"  # the training data's classes are the teacher's: only data.eval's are not
    known.write_text("".join(json.dumps({"text": f"{w} thing {i}", "y": w}) + "\n"
                             for i in range(2) for w in ("red", "blue")))
    with pytest.raises(PairingError, match=r"but data.eval has labels it does not know: purple"):
        distill({**recipe, "data": {"train": {"path": str(known), "label": "y"},
                                    "eval": {"path": str(data), "label": "y"}, "max_length": 16}}, progress=False)
    # terms that read the teacher's features only: the student gets a head of the data's classes, the teacher keeps its
    for student in ({"from_teacher": {"layers": [2, 4]}}, {"config": {"num_hidden_layers": 2}}):
        recipe.update(student=student, losses=[{"type": "cross_entropy"}, {"type": "hidden_mse", "layers": "uniform"}],
                      output=str(tmp_path / f"run-{len(student)}-{next(iter(student))}"))
        from kdistill.models.loading import load_model

        saved = load_model(str(distill(recipe, progress=False)), "classification").model
        assert saved.config.id2label == {0: "purple", 1: "red"} and saved.classifier.out_features == 2
    # a teacher saved without class names: transformers' placeholders, and the message says how to name them
    config = json.loads((tmp_path / "teacher" / "config.json").read_text())
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(3)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(3)}
    (tmp_path / "teacher" / "config.json").write_text(json.dumps(config))
    recipe["output"] = str(tmp_path / "run-unnamed")
    with pytest.raises(PairingError, match=r"\(LABEL_0, LABEL_1, LABEL_2\) but data has labels it does not know: "
                                           r"purple, red; its config names no classes .* write the class names into "
                                           r"id2label and label2id of its config.json"):
        distill(recipe, progress=False)


def test_a_new_head_replaces_every_layer_writing_the_old_classes():
    import torch
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    from kdistill.engine.classes import give_head

    deit = DeiTForImageClassificationWithTeacher(DeiTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                            intermediate_size=32, image_size=8, patch_size=4,
                                                            num_channels=1, num_labels=3))
    give_head(deit, {"num_labels": 2, "id2label": {0: "a", 1: "b"}, "label2id": {"a": 0, "b": 1}})
    out = deit(pixel_values=torch.zeros(1, 1, 8, 8))
    assert out.cls_logits.shape == out.distillation_logits.shape == (1, 2)  # DeiT's two heads, both
    assert deit.config.num_labels == 2 and deit.config.id2label == {0: "a", 1: "b"}
