"""`kdistill eval` on the command line: students and teachers by folder, packaged name or recipe, labelled files,
and where the report goes."""
import json
from pathlib import Path

import yaml

from cli_runner import invoke, write


def test_run_then_eval_via_cli(tmp_path, tiny_recipe, text_file):
    result, out = invoke("run", write(tmp_path, tiny_recipe), "--set", "train.steps=2", "--no-progress")
    assert result.exit_code == 0, out
    student = Path(tiny_recipe["output"]) / "student"
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": f"sentence number {i} about things"}) + "\n" for i in range(12)))
    result, out = invoke("eval", "--student", student, "--teacher", tiny_recipe["teacher"]["model"],
                         "--data", data, "--no-speed")
    assert result.exit_code == 0, out
    report = json.loads((student / "eval.json").read_text())
    entry = next(iter(report["datasets"].values()))
    assert 0.0 < entry["cosine"] <= 1.0 and entry["n"] == 12
    result, out = invoke("eval", "--student", student, "--data", data, "--no-speed", "--output", tmp_path / "alone.json")
    assert result.exit_code == 0 and "no --teacher" in out
    assert f"trained by --teacher {tiny_recipe['teacher']['model']}" in " ".join(out.split())
    # a bad --output is refused before the evaluation runs, not after it (its results would be lost)
    (tmp_path / "a-file").write_text("")
    for output, message in ((tmp_path, "is a folder; give the report's file name"),
                            (tmp_path / "a-file" / "r.json", "a-file is a file, so no folder can be made there")):
        result, out = invoke("eval", "--student", student, "--data", data, "--no-speed", "--output", output)
        assert result.exit_code == 2 and message in " ".join(out.split()) and "Traceback" not in out
    # an existing file is replaced only if it is an earlier report: never the weights or the data
    weights = (student / "model.safetensors").read_bytes()
    for victim in (student / "model.safetensors", data):
        before = victim.read_bytes()
        result, out = invoke("eval", "--student", student, "--data", data, "--no-speed", "--output", victim)
        assert result.exit_code == 2 and "is not an earlier `kdistill eval` report" in " ".join(out.split()), out
        assert victim.read_bytes() == before
    assert (student / "model.safetensors").read_bytes() == weights
    result, out = invoke("eval", "--student", student, "--data", data, "--no-speed")  # eval.json again: replaced
    assert result.exit_code == 0, out
    for damaged in ("{", "[1]"):  # the run's record only gives a hint; damaged, the evaluation still runs
        (student / "kdistill.json").write_text(damaged)
        result, out = invoke("eval", "--student", student, "--data", data, "--no-speed")
        assert result.exit_code == 0 and "Traceback" not in out, out


def test_eval_reads_the_label_field_of_a_file_for_a_classifier(tmp_path, make_classifier):
    teacher = make_classifier(tmp_path / "clf")
    data = tmp_path / "labelled.csv"
    data.write_text("sentence,colour\n" + "".join(f"a {c} thing {i},{c}\n" for i in range(3) for c in ("red", "blue")))
    result, out = invoke("eval", "--student", teacher, "--data", data, "--text", "sentence", "--label", "colour",
                         "--no-speed", "--output", tmp_path / "r.json")
    assert result.exit_code == 0, out
    entry = json.loads((tmp_path / "r.json").read_text())["datasets"][str(data)]
    assert entry["n"] == 6 and 0 <= entry["accuracy"]["student"] <= 1
    assert "no model here is a classifier" not in out  # the note is for labels nothing scores


def test_eval_takes_a_recipe_teacher_without_training_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # not a checkout's own runs/teacher-supersense
    result, out = invoke("eval", "--student", tmp_path, "--teacher", "recipe:teacher-supersense",
                         "--data", "wordnet-supersense", "--no-speed", "--output", tmp_path / "r.json")
    assert result.exit_code == 2 and "has not been trained here yet" in out
    assert "kdistill run teacher-supersense" in " ".join(out.split())
    assert not (tmp_path / "home").exists()


def test_eval_says_when_label_scores_nothing_because_no_model_is_a_classifier(tmp_path, text_file):
    result, out = invoke("eval", "--student", "packaged:all-MiniLM-L6-v2", "--data", text_file, "--text", "sentence",
                         "--label", "sentence", "--limit", 4, "--no-speed", "--output", tmp_path / "r.json")
    assert result.exit_code == 0, out
    assert "--label sentence: no model here is a classifier (student: embedding)" in " ".join(out.split())


def test_eval_takes_a_trained_recipe_as_the_student_and_reports_beside_it(tmp_path, cached_recipe_run,
                                                                         make_classifier):
    import shutil

    student = cached_recipe_run("teacher-supersense") / "student"
    shutil.rmtree(student)
    make_classifier(student)
    (student / "kdistill.json").write_text("{}")
    data = tmp_path / "labelled.csv"
    data.write_text("sentence,colour\n" + "".join(f"a {c} thing,{c}\n" for c in ("red", "blue")))
    result, out = invoke("eval", "--student", "recipe:teacher-supersense", "--data", data, "--text", "sentence",
                         "--label", "colour", "--no-speed")
    assert result.exit_code == 0, out
    assert json.loads((student / "eval.json").read_text())["datasets"][str(data)]["n"] == 2


def test_eval_takes_the_run_kdistill_run_made_of_a_built_in_recipe(tmp_path, monkeypatch, make_classifier, text_file):
    """`kdistill run minilm` trains into runs/minilm, where recipe:minilm now looks after the teachers' cache; a
    folder there of another recipe's run is not taken for it, and the refusal names both ways to train it."""
    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    args = ("eval", "--student", "recipe:minilm", "--data", text_file, "--text", "sentence", "--limit", 4, "--no-speed")
    result, out = invoke(*args)
    assert result.exit_code == 2
    said = " ".join(out.split())
    assert "`kdistill run minilm` trains it into runs/minilm" in said
    assert f"`kdistill run minilm --output {tmp_path / 'home' / 'recipes' / 'minilm'}`" in said
    student = Path(make_classifier(tmp_path / "runs" / "minilm" / "student"))
    (student / "kdistill.json").write_text(json.dumps({"recipe": "minilm-l3"}))  # another recipe's run
    assert invoke(*args)[0].exit_code == 2
    (student / "kdistill.json").write_text(json.dumps({"recipe": "minilm"}))
    from kdistill.config import load_recipe

    saved = load_recipe("minilm", ["stages.0.train.steps=5"], output="runs/minilm").dump()  # a smoke run
    (student.parent / "config.resolved.yaml").write_text(yaml.safe_dump(saved))
    result, out = invoke(*args)
    assert result.exit_code == 0, out
    assert (student / "eval.json").exists()
    said = " ".join(out.split())
    assert "warning: the run in runs/minilm was trained by a different 'minilm' recipe than today's" in said
    assert "steps" in said


def test_eval_of_a_packaged_student_reports_in_the_working_directory(tmp_path, monkeypatch, text_file):
    monkeypatch.chdir(tmp_path)
    result, out = invoke("eval", "--student", "packaged:all-MiniLM-L6-v2", "--data", text_file, "--text", "sentence",
                         "--limit", 4, "--no-speed")
    assert result.exit_code == 0, out
    assert [p.name for p in tmp_path.iterdir()] == ["eval-packaged-all-MiniLM-L6-v2.json"]


def test_an_image_model_without_a_head_is_not_told_to_read_texts(tmp_path):
    result, out = invoke("eval", "--student", "blueprint:vit-3x96-p4", "--data", "digits", "--no-speed",
                         "--output", tmp_path / "r.json")
    said = " ".join(out.split())
    assert result.exit_code == 2 and "is an image model (vit) without a classification head" in said
    assert "evaluate it on texts" not in said
