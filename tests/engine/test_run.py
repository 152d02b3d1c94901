"""End-to-end runs on a tiny BERT: outputs, exact resume, exact accumulation, refusals."""
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kdistill import distill
from kdistill.errors import CheckpointError, ConfigError, DataError, OutputError


def weights(student_dir):
    return load_file(str(Path(student_dir) / "model.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0.0 if atol == 0 else 1e-5, msg=key)


def test_run_writes_a_complete_student_and_logs(tiny_recipe):
    student = distill(tiny_recipe, progress=False)
    out = student.parent
    files = {p.name for p in student.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "kdistill.json", "modules.json"} <= files
    meta = json.loads((student / "kdistill.json").read_text())
    assert meta["steps"] == 4 and meta["teacher"] == tiny_recipe["teacher"]["model"]
    assert set(meta["metrics"]["train"]["parts"]) == {"embedding_cosine", "hidden_mse", "attention_kl"}
    assert (out / "config.resolved.yaml").exists() and (out / "loss_curves.png").exists()
    logs = [json.loads(line) for line in (out / "logs" / "main.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if r["kind"] == "train"] == [1, 2, 3, 4]
    # training-only parts (projectors) are not exported; the student loads as a plain HF model
    assert not any(k.startswith("terms.") for k in weights(student))
    from transformers import AutoModel

    assert AutoModel.from_pretrained(student).config.num_hidden_layers == 2


def test_projector_is_trained_but_not_exported(tiny_recipe):
    tiny_recipe["student"] = {"config": {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32}}
    tiny_recipe["losses"] = [{"type": "hidden_mse"}, {"type": "embedding_cosine"}]
    student = distill(tiny_recipe, progress=False)
    assert all(v.shape[-1] in (16, 32) or v.ndim == 1 or "position" in k or "word" in k or "token_type" in k
               for k, v in weights(student).items())
    ckpt = sorted((student.parent / "checkpoints").glob("*/step-*"))
    assert not ckpt  # no save_every: no checkpoints kept


def test_resume_is_bit_exact(tiny_recipe, tmp_path, killed_run):
    tiny_recipe["train"].update(steps=6, save_every=2)
    tiny_recipe["student"] = {"from_teacher": {"layers": [2, 4]}}
    straight = distill({**tiny_recipe, "output": str(tmp_path / "straight")}, progress=False)

    killed = {**tiny_recipe, "output": str(tmp_path / "killed")}
    killed_run(killed, step=4)  # after the step-4 checkpoint, before the run finishes
    assert not (tmp_path / "killed" / "student").exists()  # nothing half-written presented as finished
    resumed = distill(killed, resume=True, progress=False)
    assert_same_weights(straight, resumed)


def test_an_output_folder_holding_other_things_is_refused_and_left_as_it_was(tiny_recipe):
    out = Path(tiny_recipe["output"])
    (out / "student").mkdir(parents=True)
    (out / "student" / "readme").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds something other than a kdistill run .*new or empty folder"):
        distill(tiny_recipe, progress=False)
    assert [p.name for p in out.rglob("*")] == ["student", "readme"]
    (out / "student" / "readme").unlink()
    (out / "student").rmdir()
    assert (distill(tiny_recipe, progress=False) / "kdistill.json").exists()  # an empty folder is fine


def test_rerun_without_resume_refuses_to_overwrite(tiny_recipe):
    distill(tiny_recipe, progress=False)
    with pytest.raises(ConfigError, match="pass resume=True to continue it, or choose another output="):
        distill(tiny_recipe, progress=False)  # the Python API's words, not the command line's flags
    with pytest.raises(ConfigError, match="a recipe is a built-in name, a YAML file path or a dict; got int 42"):
        distill(42)
    with pytest.raises(ConfigError, match="overrides are 'KEY=VALUE' strings"):
        distill(tiny_recipe, overrides=[3])


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


def logged_lrs(output) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(output) / "logs" / "main.jsonl").read_text().splitlines()]
    return {row["step"]: row["lr"] for row in rows if "lr" in row}


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
    log.write_text(log.read_text()[:-30])  # a kill in the middle of a write
    assert (distill(tiny_recipe, resume=True, progress=False) / "kdistill.json").exists()
    rows = [(json.loads(line)["kind"], json.loads(line)["step"]) for line in log.read_text().splitlines()]
    train = [step for kind, step in rows if kind == "train"]
    assert train == [1, 2, 3, 4]  # the cut line gone, the steps after the checkpoint logged once
    assert plot_losses(Path(tiny_recipe["output"])) is not None


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
    from kdistill.engine.loop import stage_hash

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
    with pytest.raises(CheckpointError, match=r"that run is finished: undo those changes, or choose another output="):
        distill(longer, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="finished run.*choose another output="):
        distill(longer, resume=True, force=True, progress=False)
    assert (Path(tiny_recipe["output"]) / "config.resolved.yaml").read_text() == resolved  # still the truth
    assert json.loads((student / "kdistill.json").read_text())["steps"] == tiny_recipe["train"]["steps"]


def test_a_run_that_failed_before_training_does_not_hold_its_folder(tiny_recipe):
    broken = {**tiny_recipe, "data": {**tiny_recipe["data"], "train": {"path": "/nonexistent/d.jsonl"}}}
    with pytest.raises(DataError, match="not found"):
        distill(broken, progress=False)
    assert (Path(tiny_recipe["output"]) / "config.resolved.yaml").exists()
    assert (distill(tiny_recipe, progress=False) / "kdistill.json").exists()  # the fixed recipe, no --resume needed


def test_an_unreadable_saved_recipe_names_the_way_out(tiny_recipe, killed_run):
    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)
    (Path(tiny_recipe["output"]) / "config.resolved.yaml").write_text("")
    with pytest.raises(CheckpointError, match="corrupt.*Pass resume=True, force=True"):
        distill(tiny_recipe, resume=True, progress=False)
    assert (distill(tiny_recipe, resume=True, force=True, progress=False) / "kdistill.json").exists()


def test_a_student_missing_its_weights_is_not_finished(tmp_path):
    from kdistill.engine.export import is_complete

    (tmp_path / "kdistill.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    assert not is_complete(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert is_complete(tmp_path)


def test_a_finished_student_truncated_since_is_trained_again_on_resume(tiny_recipe):
    from kdistill.engine.export import is_complete

    tiny_recipe["train"].update(steps=2, save_every=2)
    student = distill(tiny_recipe, progress=False)
    weights = student / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # a disk that filled, or a copy cut short
    assert not is_complete(student)
    assert is_complete(distill(tiny_recipe, resume=True, progress=False))  # exported again from its checkpoint
    assert weights.read_bytes() == whole


def test_corrupt_checkpoint_is_refused(tiny_recipe, killed_run):
    tiny_recipe["train"].update(steps=4, save_every=2)
    killed_run(tiny_recipe, step=3)
    ckpt = Path(tiny_recipe["output"]) / "checkpoints" / "main" / "step-0000002"
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        distill(tiny_recipe, resume=True, progress=False)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"not a kdistill checkpoint \(no manifest.json.*delete it to resume "
                                              r"from an earlier checkpoint"):
        distill(tiny_recipe, resume=True, progress=False)


def test_a_full_disk_is_named_and_the_last_checkpoint_kept(tiny_recipe, monkeypatch):
    import shutil
    from collections import namedtuple

    import kdistill.engine.checkpoint as checkpoint

    tiny_recipe["train"].update(steps=6, save_every=2)
    real_save = torch.save

    def fills_the_disk(obj, path, *args, **kwargs):
        if "step-0000004" in str(path):  # what torch raises when its zip writer runs out of disk
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 13632 vs 13524")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12, 504 * 1024))
    with pytest.raises(CheckpointError, match=r"step-0000004: the disk is full \(0 MiB free\).*resume"):
        distill(tiny_recipe, progress=False)
    root = Path(tiny_recipe["output"]) / "checkpoints" / "main"
    assert [p.name for p in root.iterdir()] == ["step-0000002"]  # complete, and no half-written one beside it
    checkpoint.verify(root / "step-0000002")
    # with room on the disk the same failure is not put down to it
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        distill(tiny_recipe, resume=True, progress=False)


@pytest.mark.parametrize("library", ["os", "safetensors"])
def test_a_full_disk_at_export_is_named_and_resume_finishes_the_same_student(tiny_recipe, tmp_path, monkeypatch,
                                                                             library):
    import errno

    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    tiny_recipe["train"].update(steps=4, save_every=2)
    real_save = PreTrainedModel.save_pretrained

    def fills_the_disk(self, *args, **kwargs):
        if library == "safetensors":  # what save_pretrained raises on a full disk: an Exception of its own
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fills_the_disk)
    with pytest.raises(OutputError, match=r"could not write the student .*: the disk is full .*call distill again with resume=True"):
        distill(tiny_recipe, progress=False)
    out = Path(tiny_recipe["output"])
    assert not [p.name for p in out.iterdir() if "student" in p.name]  # nothing half-written, nothing called finished
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    student = distill(tiny_recipe, resume=True, progress=False)
    once = distill({**tiny_recipe, "output": str(tmp_path / "once")}, progress=False)
    assert_same_weights(student, once)


def test_gradient_accumulation_equals_one_big_batch(tiny_recipe, tmp_path):
    # a random student: its gradients are far from zero, where Adam's normalisation would amplify float noise
    tiny_recipe["student"] = {"config": {"num_hidden_layers": 2}}
    tiny_recipe["train"].update(steps=3, batch_size=4, grad_accum=1)
    one = distill({**tiny_recipe, "output": str(tmp_path / "one")}, progress=False)
    accum = {**tiny_recipe, "train": {**tiny_recipe["train"], "grad_accum": 4}, "output": str(tmp_path / "accum")}
    four = distill(accum, progress=False)
    assert_same_weights(one, four, atol=1e-5)


def test_evaluating_logging_and_saving_change_no_weight(tiny_recipe, tmp_path):
    # what recipe_changes and compare's baseline key ignore (BOOKKEEPING) must be bookkeeping indeed: with
    # dropout on, an evaluation that drew a random number would shift every later mask and the weights
    tiny_recipe["student"] = {"config": {"num_hidden_layers": 2, "hidden_dropout_prob": 0.2}}
    tiny_recipe["train"].update(steps=4, log_every=10)
    quiet = distill({**tiny_recipe, "output": str(tmp_path / "quiet")}, progress=False)
    busy_train = {**tiny_recipe["train"], "eval_every": 1, "log_every": 1, "save_every": 1, "keep_checkpoints": 1}
    busy = distill({**tiny_recipe, "train": busy_train, "output": str(tmp_path / "busy")}, progress=False)
    assert len([r for r in (tmp_path / "busy" / "logs" / "main.jsonl").read_text().splitlines() if '"eval"' in r]) >= 4
    assert_same_weights(quiet, busy)


def test_multi_stage_starts_from_previous_student(tiny_recipe):
    tiny_recipe["stages"] = [{"name": "general", "train": {"steps": 2}},
                             {"name": "task", "losses": [{"type": "embedding_cosine"}], "train": {"steps": 2}}]
    final = distill(tiny_recipe, progress=False)
    out = final.parent
    first = out / "stages" / "general" / "student"
    assert (first / "kdistill.json").exists() and (final / "kdistill.json").exists()
    meta = json.loads((final / "kdistill.json").read_text())
    assert meta["stage"] == "task" and meta["student_init"] == {"previous_stage": str(first)}


def test_classifier_fine_tune_and_logit_kd(tiny_bert_dir, tmp_path):
    """A base encoder becomes a classifier (new head with the data's classes), then teaches a student."""
    import json as _json

    data = tmp_path / "labeled.jsonl"
    rows = [{"text": f"{word} number {i}", "y": word} for i in range(24) for word in ("red", "green", "blue")]
    data.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    source = {"path": str(data), "label": "y"}
    teacher = distill({"name": "ft", "teacher": {"model": tiny_bert_dir, "task": "classification"},
                       "student": {"from_teacher": {"layers": "uniform", "num_layers": 4}},
                       "data": {"train": source, "eval": {**source, "limit": 12}, "max_length": 16},
                       "losses": [{"type": "cross_entropy"}],
                       "train": {"steps": 40, "batch_size": 8, "lr": 1e-2, "eval_every": 40},
                       "output": str(tmp_path / "teacher")}, progress=False)
    config = _json.loads((teacher / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["blue", "green", "red"]
    meta = _json.loads((teacher / "kdistill.json").read_text())
    # the new head really trains: held-out loss falls well below chance level ln(3) = 1.0986
    assert meta["metrics"]["eval"]["parts"]["cross_entropy"] < 0.95 and "accuracy" in meta["metrics"]["eval"]
    student = distill({"name": "kd", "teacher": {"model": str(teacher)}, "student": {"from_teacher": {"layers": [4]}},
                       "data": {"train": source, "max_length": 16},
                       "losses": [{"type": "logit_kd", "temperature": 2.0, "alpha": 0.5}],
                       "train": {"steps": 2, "batch_size": 8}, "output": str(tmp_path / "student")}, progress=False)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(student)
    assert model.config.id2label == {int(k): v for k, v in config["id2label"].items()}


def test_freeze_keeps_matching_parameters_fixed(tiny_recipe):
    tiny_recipe["train"]["freeze"] = ["embeddings.*", "encoder.layer.0.*"]
    student = distill(tiny_recipe, progress=False)
    from transformers import AutoModel

    teacher = AutoModel.from_pretrained(tiny_recipe["teacher"]["model"])
    trained = weights(student)
    torch.testing.assert_close(trained["embeddings.word_embeddings.weight"], teacher.embeddings.word_embeddings.weight)
    torch.testing.assert_close(trained["encoder.layer.0.output.dense.weight"], teacher.encoder.layer[1].output.dense.weight)
    assert not torch.equal(trained["encoder.layer.1.output.dense.weight"], teacher.encoder.layer[3].output.dense.weight)


def test_freezing_every_parameter_is_refused_not_reported_done(tiny_recipe):
    tiny_recipe["train"]["freeze"] = ["*"]
    with pytest.raises(ConfigError, match=r"fixes every parameter of the student, so the stage would train nothing"):
        distill(tiny_recipe, progress=False)
    assert not (Path(tiny_recipe["output"]) / "student").exists()
    from kdistill.config import load_recipe
    from kdistill.engine.build import build_stage

    # where `validate --full` meets it too (it passed there, and only the run refused it)
    with pytest.raises(ConfigError, match=r"train.freeze \['\*'\] fixes every parameter of the student"):
        build_stage(load_recipe(tiny_recipe).stages[0])


def test_freeze_pattern_that_matches_nothing(tiny_recipe):
    tiny_recipe["train"]["freeze"] = ["encoder.layers.*"]
    with pytest.raises(ConfigError, match=r"train.freeze\[0\]"):
        distill(tiny_recipe, progress=False)


def test_lr_scale_multiplies_the_learning_rate_of_matching_parameters(tiny_recipe):
    # a multiplier of 1e-9 leaves layer 0 where the teacher's layer 2 was; layer 1 trains at the full rate
    tiny_recipe["train"]["lr_scale"] = {"encoder.layer.0.*": 1e-9}
    student = distill(tiny_recipe, progress=False)
    from transformers import AutoModel

    teacher = AutoModel.from_pretrained(tiny_recipe["teacher"]["model"])
    trained = weights(student)
    torch.testing.assert_close(trained["encoder.layer.0.output.dense.weight"], teacher.encoder.layer[1].output.dense.weight,
                               atol=1e-8, rtol=0)
    assert not torch.allclose(trained["encoder.layer.1.output.dense.weight"], teacher.encoder.layer[3].output.dense.weight,
                              atol=1e-5)


def test_lr_scale_groups():
    """Student parameters get the first matching glob's multiple; training-only parts (projectors) do not."""
    from kdistill.engine.params import param_groups

    module = torch.nn.Module()
    module.student = torch.nn.Module()
    module.student.body = torch.nn.Linear(4, 4)
    module.student.classifier = torch.nn.Linear(4, 2)
    module.terms = torch.nn.Module()
    module.terms.classifier = torch.nn.Linear(4, 4)  # a projector that happens to share the name
    groups = param_groups(module, 0.01, 1e-4, {"classifier.*": 10.0, "*": 2.0})
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert lr_of[id(module.student.classifier.weight)] == (1e-3, 0.01)
    assert lr_of[id(module.student.classifier.bias)] == (1e-3, 0.0)
    assert lr_of[id(module.student.body.weight)] == (2e-4, 0.01)
    assert lr_of[id(module.terms.classifier.weight)] == (1e-4, 0.01)
    assert sum(len(g["params"]) for g in groups) == 6
    # without multipliers: the two groups (decay, no decay) a checkpoint written before lr_scale holds
    assert [(g["lr"], g["weight_decay"]) for g in param_groups(module, 0.01, 1e-4)] == [(1e-4, 0.01), (1e-4, 0.0)]


def test_a_later_stages_freeze_glob_is_named_with_its_stage_when_the_stage_is_built(tiny_recipe, tmp_path):
    from kdistill.engine.build import build_stage
    from kdistill.config import load_recipe

    staged = {**tiny_recipe, "stages": [{"name": "a"}, {"name": "b", "train": {"freeze": ["encoder.layer.5.*"]}}]}
    recipe = load_recipe(staged)
    build_stage(recipe.stages[0], prefix="stages[0].").student.save_pretrained(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"stages\[1\].train.freeze\[0\]: 'encoder.layer.5.\*' matches no student "
                                          r"parameter; did you mean 'encoder.layer.1"):
        build_stage(recipe.stages[1], str(tmp_path / "a"), prefix="stages[1].")  # what run and validate --full build


def test_lr_scale_refusals(tiny_recipe):
    tiny_recipe["train"]["lr_scale"] = {"classifier.*": 10}  # the tiny encoder has no classifier
    with pytest.raises(ConfigError, match=r"train.lr_scale\['classifier.\*'\]: .* matches no student parameter"):
        distill(tiny_recipe, progress=False)
    tiny_recipe["train"]["lr_scale"] = {"encoder.*": 0}
    with pytest.raises(ConfigError, match="lr_scale"):
        distill(tiny_recipe, progress=False)


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


def test_fp16_on_a_cpu_is_said_to_train_in_fp32(monkeypatch):
    import accelerate

    from kdistill.engine.run import make_accelerator

    # Accelerate's state is one per process, already made by earlier tests: record the request instead
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: kwargs)
    with pytest.warns(UserWarning, match="fp16 needs a GPU"):
        assert make_accelerator("fp16", cpu=True)["mixed_precision"] == "fp16"


def test_a_copy_abandoned_by_a_killed_export_is_removed_by_the_next(tmp_path):
    import subprocess
    import sys

    from kdistill.engine.disk import remove_abandoned_copies

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited: its copy is abandoned
    out = tmp_path / "student"
    (tmp_path / f".student.tmp-{pid}").mkdir()
    (tmp_path / f".student.tmp-{os.getpid()}").mkdir()  # this process's own: kept
    (tmp_path / ".student.tmp-notapid").mkdir()
    (tmp_path / f".student.old-{pid}").mkdir()  # killed between moving the old student aside and the new one in
    remove_abandoned_copies(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".student.tmp-{os.getpid()}", ".student.tmp-notapid",
                                                                 f".student.old-{pid}"])
    remove_abandoned_copies(out, "old")
    assert f".student.old-{pid}" not in [p.name for p in tmp_path.iterdir()]


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
    from kdistill.engine.loop import stage_hash

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


def test_a_run_folder_another_command_is_training_is_refused(tiny_recipe):
    from filelock import FileLock

    out = Path(tiny_recipe["output"])
    held = FileLock(str(out.parent / f".{out.name}.run.lock"))
    held.acquire()  # as another `kdistill run` of this folder would
    try:
        with pytest.raises(ConfigError, match=r"is being trained by another kdistill command .*choose another output="):
            distill(tiny_recipe, progress=False)
        assert not out.exists()
    finally:
        held.release()
    assert (distill(tiny_recipe, progress=False) / "kdistill.json").exists()


def test_a_batch_larger_than_the_training_data_is_pointed_out(tiny_recipe):
    from io import StringIO

    from rich.console import Console

    from kdistill.config import load_recipe
    from kdistill.data import load_records
    from kdistill.engine.run import run_recipe

    records = len(load_records(tiny_recipe["data"]["train"]))
    tiny_recipe["train"].update(steps=1, batch_size=records + 4)
    out = StringIO()
    run_recipe(load_recipe(tiny_recipe), console=Console(file=out, width=200), progress=False)
    assert f"train.batch_size {records + 4} is more than the {records} training records" in out.getvalue()
