"""Resuming a tiny BERT run: bit-exact continuation, forced resumes under a changed recipe, and the checkpoints
and saved recipes a resume refuses."""
import json
from pathlib import Path

import pytest
import yaml

from kdistill import distill
from kdistill.errors import CheckpointError, ConfigError
from student_weights import assert_same_weights


def logged_lrs(output) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(output) / "logs" / "main.jsonl").read_text().splitlines()]
    return {row["step"]: row["lr"] for row in rows if "lr" in row}


def test_resume_is_bit_exact(tiny_recipe, tmp_path, killed_run):
    tiny_recipe["train"].update(steps=6, save_every=2)
    tiny_recipe["student"] = {"from_teacher": {"layers": [2, 4]}}
    straight = distill({**tiny_recipe, "output": str(tmp_path / "straight")}, progress=False)

    killed = {**tiny_recipe, "output": str(tmp_path / "killed")}
    killed_run(killed, step=4)  # after the step-4 checkpoint, before the run finishes
    assert not (tmp_path / "killed" / "student").exists()  # nothing half-written presented as finished
    resumed = distill(killed, resume=True, progress=False)
    assert_same_weights(straight, resumed)


def test_resume_with_changed_recipe_is_refused_unless_forced(tiny_recipe, killed_run):
    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)
    changed = {**tiny_recipe, "train": {**tiny_recipe["train"], "lr": 0.5}}
    with pytest.raises(CheckpointError, match=r"train\.lr: 0\.001 -> 0\.5"):
        distill(changed, resume=True, progress=False)
    resolved = (Path(tiny_recipe["output"]) / "config.resolved.yaml").read_text()
    # the refusal leaves the run's own recipe saved, so the right recipe resumes it
    assert (Path(tiny_recipe["output"]) / "config.resolved.yaml").read_text() == resolved
    assert (distill(tiny_recipe, resume=True, progress=False) / "kdistill.json").exists()


def test_a_forced_resume_goes_on_under_the_changed_settings(tiny_recipe, tmp_path, killed_run):
    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)  # the checkpoint is at step 2
    longer = {**tiny_recipe, "train": {**tiny_recipe["train"], "lr": 0.01, "steps": 6, "weight_decay": 0.05}}
    student = distill(longer, resume=True, force=True, progress=False)
    assert json.loads((student / "kdistill.json").read_text())["steps"] == 6
    assert yaml.safe_load((Path(tiny_recipe["output"]) / "config.resolved.yaml").read_text())["stages"][0]["train"][
        "lr"] == 0.01
    # from step 3 on, the learning rate is what a run of the changed recipe from the start has at that step
    fresh = distill({**longer, "output": str(tmp_path / "fresh")}, progress=False)
    resumed, reference = logged_lrs(tiny_recipe["output"]), logged_lrs(fresh.parent)
    assert [resumed[step] for step in (3, 4, 5, 6)] == pytest.approx([reference[step] for step in (3, 4, 5, 6)])
    assert resumed[1] != reference[1]  # the steps before it ran under the old rate


def test_a_forced_resume_says_what_it_cannot_change(tiny_recipe, killed_run):
    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)
    # weight decay 0 puts every parameter in one optimizer group: the checkpoint's moments no longer fit
    changed = {**tiny_recipe, "train": {**tiny_recipe["train"], "weight_decay": 0.0}}
    with pytest.raises(CheckpointError, match=r"does not fit this run.*can change how the stage trains .*not what it "
                                              r"trains"):
        distill(changed, resume=True, force=True, progress=False)


def test_a_forced_resume_with_other_loss_terms_is_refused(tiny_recipe, killed_run):
    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)
    fewer_terms = {**tiny_recipe, "losses": tiny_recipe["losses"][:1]}  # the same parameters: the optimizer fits
    with pytest.raises(CheckpointError, match=r"trained with the loss terms \['embedding_cosine', 'hidden_mse'.*this "
                                              r"recipe has \['embedding_cosine'\]: a forced resume"):
        distill(fewer_terms, resume=True, force=True, progress=False)
    heavier = {**tiny_recipe, "losses": [{**term, "weight": 2.0} for term in tiny_recipe["losses"]]}
    assert (distill(heavier, resume=True, force=True, progress=False) / "kdistill.json").exists()  # weights may change


def test_a_truncated_log_line_does_not_stop_a_resume_and_the_curves_plot(tiny_recipe, killed_run):
    from kdistill.engine.logs import plot_losses

    tiny_recipe["train"].update(steps=4, save_every=2, log_every=1)
    killed_run(tiny_recipe, step=3)
    log = Path(tiny_recipe["output"]) / "logs" / "main.jsonl"
    log.write_bytes(log.read_bytes()[:-30] + b"\xff")  # a kill in the middle of a write, a damaged byte
    assert (distill(tiny_recipe, resume=True, progress=False) / "kdistill.json").exists()
    rows = [(json.loads(line)["kind"], json.loads(line)["step"]) for line in log.read_text().splitlines()]
    train = [step for kind, step in rows if kind == "train"]
    assert train == [1, 2, 3, 4]  # the cut line gone, the steps after the checkpoint logged once
    assert plot_losses(Path(tiny_recipe["output"])) is not None


def test_a_stage_resumed_without_a_checkpoint_logs_each_step_once(tiny_recipe, killed_run):
    tiny_recipe["train"].update(steps=4, log_every=1)  # no save_every: the resume trains from step 0
    killed_run(tiny_recipe, step=3)
    distill(tiny_recipe, resume=True, progress=False)
    log = Path(tiny_recipe["output"]) / "logs" / "main.jsonl"
    train = [row["step"] for row in map(json.loads, log.read_text().splitlines()) if row["kind"] == "train"]
    assert train == [1, 2, 3, 4]  # was [1, 2, 3, 1, 2, 3, 4]


def test_a_resumed_stage_reports_its_training_time_across_the_resume(tiny_recipe, killed_run):
    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)
    checkpoint = next((Path(tiny_recipe["output"]) / "checkpoints" / "main").glob("step-*"))
    before = json.loads((checkpoint / "state.json").read_text())["elapsed_s"]
    assert before > 0
    student = distill(tiny_recipe, resume=True, progress=False)
    assert json.loads((student / "kdistill.json").read_text())["wall_time_s"] >= round(before, 2)  # not since resuming


def test_tensorboard_shows_each_step_once_after_a_resume(tiny_recipe, killed_run):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    tiny_recipe["train"].update(steps=4, save_every=2, log_every=1)
    killed_run(tiny_recipe, step=3)  # step 3 was logged, then the run stopped; it resumes from step 2
    distill(tiny_recipe, resume=True, progress=False)
    events = event_accumulator.EventAccumulator(str(Path(tiny_recipe["output"]) / "tensorboard" / "main"))
    events.Reload()  # reads every file of the folder, honouring the resumed writer's purge of step 3 on
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_a_forced_resume_with_another_student_is_named(tiny_recipe, killed_run):
    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)
    fewer_layers = {**tiny_recipe, "student": {"from_teacher": {"layers": [2]}}}
    with pytest.raises(CheckpointError, match=r"does not fit this student: missing \[\], unexpected \['student.encoder"
                                              r".layer.1.*not what it trains: another student"):
        distill(fewer_layers, resume=True, force=True, progress=False)


def test_a_forced_resume_cannot_shorten_a_stage_past_its_checkpoint(tiny_recipe, killed_run):
    tiny_recipe["train"].update(steps=6, save_every=4)
    killed_run(tiny_recipe, step=5)  # the checkpoint is at step 4
    shorter = {**tiny_recipe, "train": {**tiny_recipe["train"], "steps": 3}}
    with pytest.raises(CheckpointError, match=r"is at step 4, past this recipe's train.steps 3; raise train.steps"):
        distill(shorter, resume=True, force=True, progress=False)


def test_bookkeeping_changes_do_not_block_a_resume(tiny_recipe, tmp_path, killed_run):
    tiny_recipe["train"].update(steps=6, save_every=2)
    straight = distill({**tiny_recipe, "output": str(tmp_path / "straight")}, progress=False)
    killed = {**tiny_recipe, "output": str(tmp_path / "killed")}
    killed_run(killed, step=4)
    # how often it saves, logs and evaluates, and how many checkpoints it keeps, changes no weight
    other = {**killed, "train": {**killed["train"], "save_every": 1, "log_every": 2, "keep_checkpoints": 3}}
    assert_same_weights(straight, distill(other, resume=True, progress=False))


def test_a_checkpoint_from_before_bookkeeping_left_the_hash_still_resumes(tiny_recipe, killed_run):
    from kdistill.config import load_recipe
    from kdistill.engine.checkpoint import verify
    from kdistill.engine.stage_hash import stage_hash

    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)
    ckpt = Path(tiny_recipe["output"]) / "checkpoints" / "main" / "step-0000002"
    stage = load_recipe(tiny_recipe).stages[0]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["recipe_hash"] == stage_hash(stage) != stage_hash(stage, legacy=True)
    (ckpt / "manifest.json").write_text(json.dumps({**manifest, "recipe_hash": stage_hash(stage, legacy=True)}))
    verify(ckpt, (stage_hash(stage), stage_hash(stage, legacy=True)))  # what a resume accepts
    assert (distill(tiny_recipe, resume=True, progress=False) / "kdistill.json").exists()


def test_a_forced_resume_refuses_changes_to_a_finished_stage(tiny_recipe, killed_run):
    tiny_recipe["stages"] = [{"name": "general", "train": {"steps": 2}},
                             {"name": "task", "losses": [{"type": "embedding_cosine"}], "train": {"steps": 4}}]
    tiny_recipe["train"]["save_every"] = 2
    killed_run(tiny_recipe, step=3, stage="task")
    changed = {**tiny_recipe, "stages": [{**tiny_recipe["stages"][0], "train": {"steps": 2, "lr": 0.5}},
                                         tiny_recipe["stages"][1]]}
    resolved = (Path(tiny_recipe["output"]) / "config.resolved.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"stage 'general' is finished, trained by the recipe before these "
                                              r"changes \(stages\.0\.train\.lr: 0\.001 -> 0\.5\)"):
        distill(changed, resume=True, force=True, progress=False)
    assert (Path(tiny_recipe["output"]) / "config.resolved.yaml").read_text() == resolved


def test_odd_folders_and_manifests_in_checkpoints_are_named_or_ignored(tiny_recipe, killed_run):
    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)
    root = Path(tiny_recipe["output"]) / "checkpoints" / "main"
    (root / "step-backup").mkdir()  # a folder a user made beside the checkpoints: not one of them
    ckpt = root / "step-0000002"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    with pytest.raises(CheckpointError, match=r"manifest.json is corrupt \(no files\); delete .*step-0000002"):
        distill(tiny_recipe, resume=True, progress=False)
    (ckpt / "manifest.json").write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointError, match=r"manifest.json is corrupt \(not JSON\); delete .*step-0000002"):
        distill(tiny_recipe, resume=True, progress=False)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert (distill(tiny_recipe, resume=True, progress=False) / "kdistill.json").exists()


def test_force_without_resume_is_refused_not_ignored(tiny_recipe):
    with pytest.raises(ConfigError, match=r"force=True continues an interrupted run .* goes with resume=True"):
        distill(tiny_recipe, force=True, progress=False)
    assert not Path(tiny_recipe["output"]).exists()


def test_a_finished_run_is_not_relabelled_as_trained_by_a_changed_recipe(tiny_recipe):
    student = distill(tiny_recipe, progress=False)
    resolved = (Path(tiny_recipe["output"]) / "config.resolved.yaml").read_text()
    longer = {**tiny_recipe, "train": {**tiny_recipe["train"], "steps": 3}}
    # without force=True: the advice is the one that works (force cannot continue a finished run)
    with pytest.raises(CheckpointError, match=r"that run is finished: undo those changes, or pass another output="):
        distill(longer, resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"finished run.*student is final.*start a new run from it "
                                              r"\(student: \{model: .*student\}\) with another output="):
        distill(longer, resume=True, force=True, progress=False)
    assert (Path(tiny_recipe["output"]) / "config.resolved.yaml").read_text() == resolved  # still the truth
    assert json.loads((student / "kdistill.json").read_text())["steps"] == tiny_recipe["train"]["steps"]
    # the advice works: the finished student trains on in a run of its own
    further = distill({**longer, "student": {"model": str(student)}, "output": str(student.parent.parent / "more")},
                      progress=False)
    assert json.loads((further / "kdistill.json").read_text())["student_init"] == {"model": str(student)}


def test_an_unreadable_saved_recipe_names_the_way_out(tiny_recipe, killed_run):
    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)
    for damage in (b"", b"\xff\xfe"):  # emptied, or bytes that are no UTF-8
        (Path(tiny_recipe["output"]) / "config.resolved.yaml").write_bytes(damage)
        with pytest.raises(CheckpointError, match="corrupt.*Pass resume=True, force=True"):
            distill(tiny_recipe, resume=True, progress=False)
    assert (distill(tiny_recipe, resume=True, force=True, progress=False) / "kdistill.json").exists()


def test_a_finished_student_truncated_since_is_trained_again_on_resume(tiny_recipe, capsys):
    from kdistill.engine.export import is_complete

    tiny_recipe["train"].update(steps=2, save_every=2)
    student = distill(tiny_recipe, progress=False)
    weights = student / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # a disk that filled, or a copy cut short
    assert not is_complete(student)
    capsys.readouterr()
    assert is_complete(distill(tiny_recipe, resume=True, progress=False))  # exported again from its checkpoint
    assert "student is damaged or incomplete" in " ".join(capsys.readouterr().out.split())  # and the user told why
    assert weights.read_bytes() == whole
    (student / "tokenizer.json").unlink()  # `kdistill eval` would then say it has no tokenizer
    assert not is_complete(student)
    assert is_complete(distill(tiny_recipe, resume=True, progress=False)) and (student / "tokenizer.json").exists()


def test_a_checkpoint_of_another_stage_is_refused_even_forced(tiny_recipe, killed_run):
    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)
    manifest = Path(tiny_recipe["output"]) / "checkpoints" / "main" / "step-0000002" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"stage": "main"', '"stage": "general"'))  # as if copied here
    for force in (False, True):
        with pytest.raises(CheckpointError, match=r"was written by stage 'general', not 'main'; move it back"):
            distill(tiny_recipe, resume=True, force=force, progress=False)


def test_corrupt_checkpoint_is_refused(tiny_recipe, killed_run):
    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)
    ckpt = Path(tiny_recipe["output"]) / "checkpoints" / "main" / "step-0000002"
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt: model.safetensors is damaged \(its checksum differs .*the "
                                              r"stage's first step, if it was the only one"):
        distill(tiny_recipe, resume=True, progress=False)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"corrupt: model.safetensors is missing; delete"):  # not "checksum"
        distill(tiny_recipe, resume=True, progress=False)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"not a kdistill checkpoint \(no manifest.json.*delete it to resume "
                                              r"from an earlier checkpoint"):
        distill(tiny_recipe, resume=True, progress=False)


def test_resuming_a_finished_run_trains_no_stage_again(tiny_recipe):
    import shutil

    tiny_recipe["stages"] = [{"name": "general", "train": {"steps": 2}},
                             {"name": "task", "losses": [{"type": "embedding_cosine"}], "train": {"steps": 2}}]
    final = distill(tiny_recipe, progress=False)
    out = Path(tiny_recipe["output"])
    shutil.rmtree(out / "stages" / "general" / "student")  # checkpoints and stage students may be deleted
    assert distill(tiny_recipe, resume=True, progress=False) == final
    assert not (out / "stages" / "general" / "student").exists()  # its stage was trained again, then unused


def test_resume_in_the_middle_of_the_second_stage(tiny_recipe, tmp_path, killed_run):
    """A finished stage is not trained again; the running one continues from its checkpoint, exactly."""
    tiny_recipe["stages"] = [{"name": "general", "train": {"steps": 2}},
                             {"name": "task", "losses": [{"type": "embedding_cosine"}], "train": {"steps": 4}}]
    tiny_recipe["train"]["save_every"] = 2
    straight = distill({**tiny_recipe, "output": str(tmp_path / "a")}, progress=False)
    killed = {**tiny_recipe, "output": str(tmp_path / "b")}
    killed_run(killed, step=3, stage="task")
    first = tmp_path / "b" / "stages" / "general" / "student" / "kdistill.json"
    stamp = first.stat().st_mtime_ns
    resumed = distill(killed, resume=True, progress=False)
    assert first.stat().st_mtime_ns == stamp  # stage 1 was not redone
    assert_same_weights(straight, resumed)
    logs = [json.loads(line) for line in (tmp_path / "b" / "logs" / "task.jsonl").read_text().splitlines()]
    # step 3 ran once before the kill (after the step-2 checkpoint) and again after resuming: logged once
    assert [r["step"] for r in logs if r["kind"] == "train"] == [1, 2, 3, 4]


def test_a_stage_teacher_run_resumes_from_another_spelling_of_its_folder(tiny_recipe, tmp_path, killed_run,
                                                                          monkeypatch):
    """`teacher: stage:NAME` becomes a path under the run folder; the checkpoint is bound to the stage as
    written, so resuming through a relative path what an absolute one started is the same run."""
    tiny_recipe["stages"] = [{"name": "general", "train": {"steps": 2}},
                             {"name": "task", "teacher": {"model": "stage:general"},
                              "losses": [{"type": "embedding_cosine"}], "train": {"steps": 4}}]
    tiny_recipe["train"]["save_every"] = 2
    straight = distill({**tiny_recipe, "output": str(tmp_path / "a")}, progress=False)
    killed_run({**tiny_recipe, "output": str(tmp_path / "b")}, step=3, stage="task")
    monkeypatch.chdir(tmp_path)
    resumed = distill({**tiny_recipe, "output": "b"}, resume=True, progress=False)
    assert_same_weights(straight, tmp_path / resumed)


def test_resuming_with_another_process_count_says_it_is_not_exact(tiny_recipe, killed_run):
    from io import StringIO

    from rich.console import Console

    from kdistill.config import load_recipe
    from kdistill.engine.run import run_recipe

    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)
    manifest_path = Path(tiny_recipe["output"]) / "checkpoints" / "main" / "step-0000002" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "world": 2}))  # as if written by a two-process launch
    out = StringIO()
    run_recipe(load_recipe(tiny_recipe), resume=True, console=Console(file=out, width=200), progress=False)
    assert "written by 2 process(es), this run has 1" in out.getvalue()


def test_stage_hashes_of_checkpoints_from_before_data_loss_on_are_unchanged():
    """A field added to the recipe later hashes, at its default, as if absent: checkpoints written before it
    still resume (the values are those of the code before data.loss_on, a source's sample and logit_kd's tail
    existed)."""
    from kdistill.config import load_recipe
    from kdistill.engine.stage_hash import stage_hash

    recipe = {"name": "h", "teacher": {"model": "/nowhere/teacher"}, "student": {"config": {"n_layer": 1}},
              "data": {"train": {"source": "wordnet-definitions"}, "max_length": 24},
              "losses": [{"type": "logit_kd", "temperature": 1.0}], "train": {"steps": 4}}
    stage = load_recipe(recipe).stages[0]
    assert (stage_hash(stage), stage_hash(stage, legacy=True)) == ("2b9f2d87a74cc13c", "5b40e3df018308fa")
    recipe["data"]["loss_on"] = "completion"
    assert stage_hash(load_recipe(recipe).stages[0]) != stage_hash(stage)
    recipe["data"]["loss_on"] = "all"
    recipe["data"]["train"]["sample"] = 100
    assert stage_hash(load_recipe(recipe).stages[0]) != stage_hash(stage)
    del recipe["data"]["train"]["sample"]
    recipe["losses"][0]["tail"] = "uniform"  # a loss-term field added later (logit_kd's tail): the same rule
    assert stage_hash(load_recipe(recipe).stages[0]) != stage_hash(stage)
    # hidden_mse / hidden_cosine's layer_norm (2026-11-29): the hash of this stage before the field existed
    recipe["losses"] = [{"type": "hidden_mse"}, {"type": "hidden_cosine", "weight": 0.5}]
    assert stage_hash(load_recipe(recipe).stages[0]) == "541f6ed4bcd7a21b"
    recipe["losses"][0]["layer_norm"] = True
    assert stage_hash(load_recipe(recipe).stages[0]) != "541f6ed4bcd7a21b"


def test_a_resume_naming_the_data_file_another_way_goes_on(tiny_recipe, killed_run, monkeypatch):
    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)
    data = Path(tiny_recipe["data"]["train"]["path"])
    monkeypatch.chdir(data.parent)
    relative = {**tiny_recipe, "data": {**tiny_recipe["data"], "train": {**tiny_recipe["data"]["train"],
                                                                          "path": data.name}}}
    student = distill(relative, resume=True, progress=False)
    assert json.loads((student / "kdistill.json").read_text())["steps"] == 4


def test_a_forced_resume_names_checkpoints_of_a_stage_the_recipe_no_longer_has(tiny_recipe, killed_run, capsys):
    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)  # stage "main" has a checkpoint at step 2
    renamed = {**tiny_recipe, "stages": [{"name": "renamed"}]}
    (Path(tiny_recipe["output"]) / "checkpoints" / "renamed-round-01").mkdir()  # a Lion stage's round: its own
    capsys.readouterr()
    distill(renamed, resume=True, force=True, progress=False)
    out = " ".join(capsys.readouterr().out.split())
    assert "checkpoints of main belong to no stage of this recipe and are not used" in out


def test_a_resume_does_not_ask_for_the_files_of_stages_it_will_not_run_again(tiny_recipe, tmp_path, killed_run):
    import shutil

    data = tmp_path / "first.jsonl"
    shutil.copy(tiny_recipe["data"]["train"]["path"], data)
    tiny_recipe["train"].update(steps=4, save_every=2)
    tiny_recipe["stages"] = [{"name": "one", "data": {"train": {"path": str(data), "text": "sentence"}}},
                             {"name": "two"}]
    killed_run(tiny_recipe, step=3, stage="two")
    data.unlink()  # stage one is finished: its data is no longer needed
    assert (distill(tiny_recipe, resume=True, progress=False) / "kdistill.json").exists()
    assert (distill(tiny_recipe, resume=True, progress=False) / "kdistill.json").exists()  # a finished run too
