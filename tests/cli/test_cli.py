"""The command line: every known bad input is one clear message and exit code 2, never a traceback."""
import json
from pathlib import Path

import pytest
import yaml

from cli_runner import app, invoke, runner, write


def test_help_and_recipes():
    result, out = invoke("--help")
    assert result.exit_code == 0 and "validate" in out
    result, out = invoke("recipes")
    assert result.exit_code == 0 and "minilm-l3" in out
    # a description wrapped over comment lines is shown to the end of its sentence (it stopped at "straight to")
    assert "straight to binary weights and binary activations (W1A1, BiT's elastic binary activation) in one KD " \
           "stage." in " ".join(out.replace("│", " ").split())


def test_recipe_summaries_end_at_a_sentence_or_say_they_were_cut():
    from kdistill.cli import recipe_summary
    from kdistill.config import builtin_recipes

    assert recipe_summary("# A (Smith et al. 2020): one\n# two. Three.\nname: x") == "A (Smith et al. 2020): one two."
    assert recipe_summary("# Pipeline, ending at W1A1:\n#   stage I\nname: x") == "Pipeline, ending at W1A1"
    assert recipe_summary("# " + "word " * 100, longest=40).endswith("word …")
    for name, path in builtin_recipes().items():
        text = path.read_text()
        summary, whole = recipe_summary(text), recipe_summary(text, longest=10 ** 6)
        first_line = text.splitlines()[0].lstrip("#").strip().rstrip(":")
        if len(whole) > 300:
            assert summary.endswith(" …") and whole.startswith(summary[:-2]), name
        else:  # a whole sentence, or a first line that says all (no sentence of the next line run into it)
            assert summary == whole and (whole.endswith(".") or whole == first_line), name


def test_a_recipe_wide_set_some_stages_override_is_said_as_a_plain_warning():
    result, out = invoke("validate", "distilbert", "--set", "train.steps=5")
    assert result.exit_code == 0, out
    said = " ".join(out.split())
    assert ("warning: --set train.steps: not applied to stage task, which sets its own train.steps; add --set "
            "stages.1.train.steps=5 to change it too") in said
    assert "UserWarning" not in said  # one line, as errors are, not Python's file:line form


def test_validate_builtin_and_file(tmp_path, tiny_recipe):
    result, out = invoke("validate", "minilm-l3", "--set", "train.steps=5")
    assert result.exit_code == 0 and "5 steps" in out
    result, out = invoke("validate", write(tmp_path, tiny_recipe), "--full")
    assert result.exit_code == 0, out
    assert "hidden_states[4]" in out and "64 train" in out
    result, out = invoke("validate", "minilm-l3", "--set", "name=a:smile:b")
    assert result.exit_code == 0 and "a:smile:b is valid" in out  # as the user wrote it, not an emoji


def test_an_output_that_cannot_be_a_folder_is_named_by_validate_and_run(tmp_path, tiny_recipe):
    (tmp_path / "afile").write_text("")
    path = write(tmp_path, tiny_recipe)
    result, out = invoke("validate", path, "--set", f"output={tmp_path / 'afile'}")
    assert result.exit_code == 2 and "afile is a file; choose another --output" in out
    result, out = invoke("run", path, "--output", tmp_path / "afile" / "sub")
    assert result.exit_code == 2 and "afile is a file, so no folder can be made there; choose another --output" in out


def test_validate_full_refuses_a_head_fit_for_a_student_without_a_classifier(tmp_path, tiny_recipe):
    result, out = invoke("validate", write(tmp_path, tiny_recipe), "--set", "train.head_init=fit", "--full")
    assert result.exit_code == 2 and "train.head_init: fit needs a classification student" in out
    assert "Traceback" not in out


def test_validate_full_pairs_a_stage_teacher_with_that_stages_student(tmp_path, tiny_recipe):
    chained = {**tiny_recipe, "stages": [{"name": "a"}, {"name": "b", "teacher": {"model": "stage:a"},
                                                         "student": {"from_teacher": {"layers": [1]}}}]}
    result, out = invoke("validate", write(tmp_path, chained), "--full")
    assert result.exit_code == 0, out
    assert "stage 1 b: teacher stage:a" in " ".join(out.split()) and "ok:" in out


def test_validate_refuses_an_output_folder_that_run_would_refuse(tmp_path, tiny_recipe):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**tiny_recipe, "output": str(occupied)}))
    result, out = invoke("validate", path)
    assert result.exit_code == 2 and "holds something other than a kdistill run (notes.txt;" in " ".join(out.split())


def bad(tiny_recipe, **changes):
    recipe = json.loads(json.dumps(tiny_recipe))
    for dotted, value in changes.items():
        node = recipe
        *path, last = dotted.split("__")
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    return recipe


CASES = {
    "unknown loss": ({"losses": [{"type": "hiden_mse"}]}, "did you mean 'hidden_mse'"),
    "unknown tap": ({"losses": [{"type": "hidden_mse", "student_tap": "hiden_states[1]",
                                 "teacher_tap": "hidden_states[1]"}]}, "did you mean 'hidden_states'"),
    "unknown corpus": ({"data__train": {"source": "stdlib-docstring"}}, "did you mean 'stdlib-docstrings'"),
    "unknown init": ({"student": {"from_techer": {"layers": [1]}}}, "did you mean 'from_teacher'"),
    "layer out of range": ({"student": {"from_teacher": {"layers": [1, 9]}}}, "out of range"),
    "loss layer out of range": ({"losses": [{"type": "hidden_mse", "layers": [[1, 7]]}]}, "out of range"),
    "wider student without projector": ({"student": {"config": {"hidden_size": 64, "intermediate_size": 64}},
                                         "losses": [{"type": "hidden_mse", "projector": "none"}]}, "projector"),
    "missing data file": ({"data__train": {"path": "/nonexistent/train.jsonl"}},
                          "data.train: data file not found: /nonexistent/train.jsonl"),
    "missing teacher": ({"teacher": {"model": "/nonexistent/model"}}, "does not exist"),
    "student vocabulary smaller than the tokenizer": (
        {"student": {"config": {"vocab_size": 100, "num_hidden_layers": 1}}}, "its vocabulary has 100 tokens"),
    "fewer positions than max_length": (
        {"student": {"config": {"max_position_embeddings": 16, "num_hidden_layers": 1}}},
        "data.max_length is 32 but the student has 16 positions"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_clear_error(case, tiny_recipe, tmp_path):
    changes, expected = CASES[case]
    recipe = bad(tiny_recipe, **changes)
    result, out = invoke("run", write(tmp_path, recipe), "--no-progress")
    assert result.exit_code == 2, out
    assert expected in out and "Traceback" not in out
    assert not (Path(tiny_recipe["output"]) / "student").exists()


def test_logits_between_different_vocabularies(tiny_gpt2_dir, tiny_recipe, tmp_path):
    recipe = bad(tiny_recipe, teacher={"model": tiny_gpt2_dir},
                 student={"config": {"vocab_size": 1000, "n_layer": 1}}, losses=[{"type": "logit_kd"}])
    result, out = invoke("run", write(tmp_path, recipe), "--no-progress")
    assert result.exit_code == 2 and "vocabulary" in out


def test_an_output_that_cannot_be_a_folder(tiny_recipe, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result, out = invoke("run", write(tmp_path, tiny_recipe), "--no-progress", "--output", blocker)
    assert result.exit_code == 2 and f"output {blocker} is a file; choose another --output" in out, out
    assert blocker.read_text() == ""


def test_empty_dataset(tiny_recipe, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    recipe = bad(tiny_recipe, data__train={"path": str(empty)})
    result, out = invoke("run", write(tmp_path, recipe), "--no-progress")
    assert result.exit_code == 2 and "no records" in out


def test_bad_set_and_missing_recipe(tmp_path, tiny_recipe):
    result, out = invoke("run", write(tmp_path, tiny_recipe), "--set", "train.stpes=3")
    assert result.exit_code == 2 and "train.stpes: unknown field; did you mean 'steps'?" in out
    result, out = invoke("run", "no-such-recipe")
    assert result.exit_code == 2 and "built-in" in out


def test_foreign_checkpoint_directory(tmp_path, tiny_recipe):
    recipe = bad(tiny_recipe, train={"steps": 2, "batch_size": 4, "save_every": 1})
    path = write(tmp_path, recipe)
    assert invoke("run", path, "--no-progress")[0].exit_code == 0
    again, out = invoke("run", path, "--no-progress")  # the command's flags, not the Python API's keywords
    assert again.exit_code == 2 and "pass --resume to continue it, or choose another --output" in out
    ckpt = Path(recipe["output"]) / "checkpoints" / "main"
    (ckpt / "step-0000009").mkdir()
    (ckpt / "step-0000009" / "manifest.json").write_text('{"format": "something-else"}')
    (Path(recipe["output"]) / "student" / "kdistill.json").unlink()  # pretend it never finished
    result, out = invoke("run", path, "--resume", "--no-progress")
    assert result.exit_code == 2 and "not a kdistill checkpoint" in out


def test_a_dead_api_teacher_is_one_clear_message_and_exit_code_2(tmp_path):
    import socket

    import yaml

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = {"name": "dead-api", "output": str(tmp_path / "run"), "stages": [{"name": "synthesize", "synthesize": {
        "teacher": {"api": {"base_url": f"http://127.0.0.1:{port}/v1", "model": "teacher", "max_retries": 1}},
        "prompts": {"source": "arithmetic-problems", "limit": 2}, "template": "problem: {problem}\nprogram:\n"}}]}
    path = tmp_path / "dead.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and f"127.0.0.1:{port}" in result.output


def test_cache_teacher_cuts_an_existing_store_to_a_smaller_k(tmp_path):
    from kdistill.teachers.store import StoreWriter, TeacherStore

    import torch

    with StoreWriter(tmp_path / "store", k=4, fingerprints={"data": "d"}, dtype="float32") as writer:
        writer.add("a", torch.randn(3, 10, generator=torch.Generator().manual_seed(0)))
    result, out = invoke("cache-teacher", "--from-store", tmp_path / "store", "--k", 2)
    assert result.exit_code == 0, out
    assert TeacherStore.open(tmp_path / "store-k2", expect={"k": 2, "data": "d"})["a"].topk_indices.shape == (3, 2)
    result, out = invoke("cache-teacher", "--from-store", tmp_path / "store", "--k", 4)
    assert result.exit_code == 2 and "needs 1 <= k < 4" in out and "Traceback" not in out
    result, out = invoke("cache-teacher")
    assert result.exit_code == 2 and "needs a RECIPE" in out
    result, out = invoke("cache-teacher", "lm-kd", "--sample-head", 8)
    assert result.exit_code == 2 and "add --sample N" in out
    result, out = invoke("cache-teacher", "lm-kd", "--from-store", tmp_path / "store", "--k", 2, "--dtype", "float32")
    assert result.exit_code == 2 and "drop RECIPE, --dtype" in out
    result, out = invoke("cache-teacher", "--from-store", tmp_path / "store", "--k", 2, "--out", tmp_path / "store")
    assert result.exit_code == 2 and "into itself" in out


def test_ctrl_c_says_how_to_go_on_for_each_command(monkeypatch):
    """run has --resume; compare resumes by itself, so telling its user to add --resume would be an error."""
    import kdistill.compare
    import kdistill.engine.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kdistill.engine.run, "run_recipe", interrupted)
    monkeypatch.setattr(kdistill.compare, "compare", interrupted)
    result = runner.invoke(app, ["run", "supersense-kd"])
    assert result.exit_code == 130 and "plus --resume" in result.output
    result = runner.invoke(app, ["compare", "supersense-kd", "--seeds", "1"])
    assert result.exit_code == 130 and "run the same command again" in result.output
    assert "--resume" not in result.output


def test_compare_trains_two_runs_at_a_time_by_default_without_a_gpu(monkeypatch):
    import os

    import torch

    import kdistill.compare

    asked = []
    monkeypatch.setattr(kdistill.compare, "compare", lambda *a, jobs, **kw: asked.append(jobs) or {"rows": []})
    monkeypatch.setattr("kdistill.compare_report.markdown", lambda report: "")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    invoke("compare", "supersense-kd")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    invoke("compare", "supersense-kd")
    invoke("compare", "supersense-kd", "--jobs", "3")
    assert asked == [2, 1, 3]
    shown = []
    monkeypatch.setattr(kdistill.compare, "compare", lambda *a, progress, **kw: shown.append(progress) or {"rows": []})
    invoke("compare", "supersense-kd", "--no-progress")
    invoke("compare", "supersense-kd")
    assert shown == [False, True]


def test_a_store_of_an_embedding_teacher_is_refused(tiny_recipe, tmp_path):
    result, out = invoke("cache-teacher", write(tmp_path, tiny_recipe), "--out", tmp_path / "store")
    assert result.exit_code == 2 and "is an embedding model" in out and "keep teacher.source: live" in out, out
    assert not (tmp_path / "store").exists()


def test_numeric_options_out_of_range_are_refused_by_the_command_line(tmp_path):
    for args in (["compare", "x", "--seeds", "0"], ["cache-teacher", "x", "--k", "0"], ["demo", "--steps", "0"],
                 ["serve-teacher", "x", "--port", "99999"], ["eval", "--student", "x", "--max-length", "0"]):
        result, out = invoke(*args)
        assert result.exit_code == 2 and "Invalid value" in out, (args, out)
    result, out = invoke("cache-teacher", "x", "--dtype", "int8")
    assert result.exit_code == 2 and "float16 or float32" in out


def test_validate_full_pairs_an_automatic_store_with_the_live_teacher_without_building_it(tmp_path, make_classifier,
                                                                                          monkeypatch):
    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} thing {i}", "y": w}) + "\n"
                            for i in range(8) for w in ("red", "green", "blue")))
    recipe = {"name": "stored", "teacher": {"model": make_classifier(tmp_path / "teacher"), "source": "cache"},
              "student": {"config": {"num_hidden_layers": 1}},
              "data": {"train": {"path": str(data), "label": "y"}, "max_length": 16},
              "losses": [{"type": "logit_kd"}], "train": {"steps": 2, "batch_size": 4}}
    result, out = invoke("validate", write(tmp_path, recipe), "--full")
    assert result.exit_code == 0 and "built on the first run" in out, out
    assert not (tmp_path / "home" / "stores").exists()
    recipe["student"] = {"from_teacher": {"layers": [1]}}  # the store holds no weights to copy: still refused
    result, out = invoke("validate", write(tmp_path, recipe, "r2.yaml"), "--full")
    assert result.exit_code == 2 and "teacher store does not hold" in out, out
    recipe["student"] = {"config": {"num_hidden_layers": 1}}
    recipe["losses"] = [{"type": "logit_kd"}, {"type": "hidden_mse"}]  # a term the store cannot feed: refused too
    result, out = invoke("validate", write(tmp_path, recipe, "r3.yaml"), "--full")
    assert result.exit_code == 2 and "losses[1]: hidden_mse needs the live teacher" in out, out
    assert not (tmp_path / "home" / "stores").exists()


def test_validate_full_does_not_train_an_untrained_recipe_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    result, out = invoke("validate", "supersense-kd", "--full")
    assert result.exit_code == 0, out
    assert "recipe:teacher-supersense is not trained yet" in " ".join(out.split())
    assert not (tmp_path / "home" / "recipes").exists()


@pytest.mark.parametrize("assignment, message", [
    ("teacher.model=recipe:teacher-supersens", "did you mean recipe:teacher-supersense?"),
    ("teacher.model=packaged:all-MiniLM-L12", "unknown packaged model 'all-MiniLM-L12'"),
    ("student={model: blueprint:gpt2-6x385}", "did you mean blueprint:gpt2-6x384?"),
    ("student={from_teacher: {layers: [2], model: ./nowhere}}", "student.from_teacher.model: model directory './nowhere'"),
    ("data.train={path: /nowhere/train.jsonl}", "data.train: data file not found: /nowhere/train.jsonl"),
    ("data.train.split=validation", "unknown split 'validation' at data.train.split"),
    # what a teacher store cannot give: known from the recipe alone, not only by --full or the run
    ("teacher.source=cache", "student: from_teacher copies the teacher's weights, which a teacher store does not"),
])
def test_plain_validate_finds_what_a_recipe_refers_to_that_does_not_exist(assignment, message):
    result, out = invoke("validate", "supersense-kd", "--set", assignment)
    assert result.exit_code == 2 and message in " ".join(out.split()) and "Traceback" not in out


def test_plain_validate_names_a_run_folder_given_as_a_model(tmp_path):
    (tmp_path / "run" / "student").mkdir(parents=True)
    (tmp_path / "run" / "student" / "config.json").write_text("{}")
    for field in ("teacher", "student"):
        result, out = invoke("validate", "supersense-kd", "--set", f"{field}={{model: {tmp_path / 'run'}}}")
        said = " ".join(out.split())
        assert result.exit_code == 2 and f"{field}.model: {tmp_path / 'run'} is a directory but has no config.json" in said
        assert f"it is a kdistill run: its model is {tmp_path / 'run' / 'student'}" in said


def test_plain_validate_refuses_a_data_file_no_reader_takes(tmp_path):
    (tmp_path / "rows.tsv").write_text("text\tlabel\na\tb\n")
    result, out = invoke("validate", "supersense-kd", "--set", f"data.train={{path: {tmp_path / 'rows.tsv'}}}")
    said = " ".join(out.split())
    assert result.exit_code == 2 and "data.train: cannot read" in said and "unsupported file kind '.tsv'" in said
    assert "supported: .jsonl, .csv, .txt" in said


def test_the_saved_recipe_of_a_moved_run_says_where_it_will_train(tmp_path, tiny_recipe):
    """A run folder moved after a checkpoint: its config.resolved.yaml still names the old place, where `run ...
    --resume` quietly started a new run."""
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "config.resolved.yaml").write_text(yaml.safe_dump({**tiny_recipe, "output": str(tmp_path / "old")}))
    result, out = invoke("validate", moved / "config.resolved.yaml")  # validate says nothing: it trains nowhere
    assert result.exit_code == 0 and "saved recipe" not in out
    result, out = invoke("run", moved / "config.resolved.yaml", "--set", "train.steps=1", "--no-progress")
    said = " ".join(out.split())
    assert result.exit_code == 0, out
    assert f"is the saved recipe of the run in {moved}, but it trains into {tmp_path / 'old'}" in said
    assert f"add --output {moved} to continue that run" in said


def test_under_a_distributed_launch_a_recipe_error_is_said_once(monkeypatch):
    """Every process reads the same recipe and refuses it the same way: torchrun with 8 processes printed it 8 times."""
    monkeypatch.setenv("RANK", "1")
    result, out = invoke("validate", "supersense-kd", "--set", "train.stpes=3")
    assert result.exit_code == 2 and "stpes" not in out
    monkeypatch.setenv("RANK", "0")
    result, out = invoke("validate", "supersense-kd", "--set", "train.stpes=3")
    assert result.exit_code == 2 and "train.stpes: unknown field" in " ".join(out.split())


def test_validate_notes_a_model_that_is_no_folder_here_nor_cached(tmp_path, tiny_recipe, tiny_bert_dir, monkeypatch):
    # a misspelt relative folder looks like a hub id: said before the run would try to download it
    import shutil

    shutil.copytree(tiny_bert_dir, tmp_path / "tiny_bert")
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, {**tiny_recipe, "teacher": {"model": "tiny_bertt"}})
    result, out = invoke("validate", path)
    assert result.exit_code == 0, out
    assert "note: teacher.model 'tiny_bertt' is no folder here" in out and "did you mean 'tiny_bert'?" in out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "the run will fail: HF_HUB_OFFLINE is set" in invoke("validate", path)[1]
    result, out = invoke("validate", write(tmp_path, {**tiny_recipe, "teacher": {"model": "tiny_bert"}}))
    assert result.exit_code == 0 and "note:" not in out
