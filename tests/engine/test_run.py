"""End-to-end runs on a tiny BERT: outputs, exact accumulation, freezing, refusals (resume: test_resume.py)."""
import json
import os
from pathlib import Path

import pytest
import torch

from kdistill import distill
from kdistill.errors import CheckpointError, ConfigError, DataError, OutputError
from student_weights import assert_same_weights, weights


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
    tiny_recipe["train"].update(steps=6, save_every=2)  # keeps step-2 and step-4
    student = distill(tiny_recipe, progress=False)
    # exported: exactly the weights of a model of the student's class, no projector
    from transformers import AutoConfig, AutoModel

    fresh = AutoModel.from_config(AutoConfig.from_pretrained(student))
    assert set(weights(student)) == set(fresh.state_dict())
    # trained: the checkpoints (the whole training state) hold the projector, and it moved between them
    steps = [weights(d) for d in sorted((student.parent / "checkpoints").glob("*/step-*"))]
    assert len(steps) == 2
    projectors = [k for k in steps[0] if k.startswith("terms.") and k.endswith("projector.weight")]
    assert projectors == ["terms.0.projector.weight", "terms.1.projector.weight"]  # one per term, 16 -> 32
    for key in projectors:
        assert steps[0][key].shape == (32, 16) and not torch.equal(steps[0][key], steps[1][key]), key


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


def test_a_teacher_store_and_its_answer_cache_in_the_output_folder_are_no_obstacle(tmp_path):
    """cache-api-teacher's default --out is the run's folder, with its answers beside the store
    (teacher-store.teacher.sqlite): that folder was refused as not a run. Anything else there is named."""
    from kdistill.engine.run_dir import check_not_foreign
    from kdistill.teachers.store_writer import FORMAT

    out = tmp_path / "run"
    (out / "teacher-store").mkdir(parents=True)
    (out / "teacher-store" / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    (out / "teacher-store.teacher.sqlite").write_bytes(b"")
    (out / "teacher-store.teacher.sqlite-wal").write_bytes(b"")  # SQLite's write-ahead log, while a cache is open
    check_not_foreign(out)
    (out / "notes.txt").write_text("mine")
    (out / "other.teacher.sqlite").write_bytes(b"")  # beside no store
    with pytest.raises(ConfigError, match=r"something other than a kdistill run \(notes.txt, other.teacher.sqlite;"):
        check_not_foreign(out)
    (out / "checkpoints").mkdir()  # a run that lost its saved recipe is named as one
    with pytest.raises(ConfigError, match=r"holds a kdistill run's checkpoints but not its config.resolved.yaml.*put "
                                          r"that recipe back"):
        check_not_foreign(out)


def test_rerun_without_resume_refuses_to_overwrite(tiny_recipe):
    distill(tiny_recipe, progress=False)
    with pytest.raises(ConfigError, match="pass resume=True to continue it, or pass another output="):
        distill(tiny_recipe, progress=False)  # the Python API's words, not the command line's flags
    with pytest.raises(ConfigError, match="a recipe is a built-in name, a YAML file path or a dict; got int 42"):
        distill(42)
    with pytest.raises(ConfigError, match="overrides are 'KEY=VALUE' strings"):
        distill(tiny_recipe, overrides=[3])


def test_a_run_that_failed_before_training_does_not_hold_its_folder(tiny_recipe):
    broken = {**tiny_recipe, "data": {**tiny_recipe["data"], "train": {**tiny_recipe["data"]["train"], "text": "nope"}}}
    with pytest.raises(DataError, match="nope"):
        distill(broken, progress=False)
    assert (Path(tiny_recipe["output"]) / "config.resolved.yaml").exists()
    assert (distill(tiny_recipe, progress=False) / "kdistill.json").exists()  # the fixed recipe, no --resume needed


def test_a_student_missing_its_weights_is_not_finished(tmp_path):
    from kdistill.engine.export import is_complete

    (tmp_path / "kdistill.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    assert not is_complete(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert is_complete(tmp_path)


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


def test_a_run_folder_another_command_is_training_is_refused(tiny_recipe):
    from filelock import FileLock

    out = Path(tiny_recipe["output"])
    held = FileLock(str(out.parent / f".{out.name}.run.lock"))
    held.acquire()  # as another `kdistill run` of this folder would
    try:
        with pytest.raises(ConfigError, match=r"is being trained by another kdistill command .*pass another output="):
            distill(tiny_recipe, progress=False)
        assert not out.exists()
    finally:
        held.release()
    assert (distill(tiny_recipe, progress=False) / "kdistill.json").exists()


@pytest.mark.parametrize("rank, refused", [("0", True), ("1", False)])
def test_a_distributed_launch_holds_the_run_lock_in_its_first_process(tmp_path, monkeypatch, rank, refused):
    """A launch's first process refuses a folder another command trains, and holds it against others while it
    trains (the launcher stops the other ranks when it exits); the other ranks take no lock of their own."""
    from filelock import FileLock

    from kdistill.engine.run_dir import run_lock

    out = tmp_path / "run"
    held = FileLock(str(tmp_path / ".run.run.lock"))
    held.acquire()  # another command trains the folder
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    try:
        if refused:
            with pytest.raises(ConfigError, match="is being trained by another kdistill command"):
                with run_lock(out):
                    pass
        else:
            with run_lock(out):
                pass
    finally:
        held.release()
    monkeypatch.setenv("RANK", "0")
    with run_lock(out):  # and while rank 0 trains, another command is refused
        monkeypatch.delenv("WORLD_SIZE")
        with pytest.raises(ConfigError, match="is being trained by another kdistill command"):
            with run_lock(out):
                pass


def test_one_lock_per_real_folder_whatever_its_spelling(tmp_path, monkeypatch):
    """A symlink to a run folder, or `.` for it, took a lock of its own name: a second command trained the same
    folder at once (or `--output .` found its own lock file inside and refused the folder as foreign)."""
    from kdistill.engine.run_dir import run_lock

    real = tmp_path / "race"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with run_lock(real):
        with pytest.raises(ConfigError, match="is being trained by another kdistill command"):
            with run_lock(tmp_path / "link"):
                pass
    monkeypatch.chdir(real)
    with run_lock(Path(".")):
        assert list(real.iterdir()) == []  # the lock lies beside the folder, not in it


def test_an_output_that_links_to_nothing_is_named(tmp_path):
    from kdistill.engine.run_dir import check_output

    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match=r"output .*dangling is a link to .*gone, which does not exist"):
        check_output(tmp_path / "dangling")  # it said "cannot write the run there (File exists)"


def test_a_launch_that_names_no_rank_takes_no_lock(tmp_path, monkeypatch):
    """WORLD_SIZE without RANK (some MPI/SLURM set-ups): every process would think itself the first, and all but
    one would be refused their own launch's folder."""
    from filelock import FileLock

    from kdistill.engine.run_dir import run_lock

    held = FileLock(str(tmp_path / ".run.run.lock"))
    held.acquire()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    try:
        with run_lock(tmp_path / "run"):
            pass
    finally:
        held.release()


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


def test_the_students_record_names_a_local_teacher_from_any_directory(tiny_recipe, monkeypatch):
    """A teacher given relative to the working directory was recorded so: from elsewhere, eval's hint 'this
    student was trained by --teacher ...' named nothing."""
    teacher = Path(tiny_recipe["teacher"]["model"])
    monkeypatch.chdir(teacher.parent)
    student = distill({**tiny_recipe, "teacher": {"model": teacher.name}}, progress=False)
    assert json.loads((student / "kdistill.json").read_text())["teacher"] == str(teacher.resolve())


def test_a_folder_where_no_lock_file_can_be_made_is_not_called_busy(tmp_path, monkeypatch):
    """filelock answers a lock file it cannot create (ENOENT in /proc, say) with Timeout, as if another command
    held it: the message sent the user to wait for a command that did not exist."""
    import filelock

    from kdistill.engine.run_dir import run_lock

    def cannot_create(self, timeout=None, **kwargs):
        raise filelock.Timeout(self.lock_file)  # what filelock does there, and no file made

    monkeypatch.setattr(filelock.FileLock, "acquire", cannot_create)
    with pytest.raises(ConfigError, match=r"cannot write the run there \(no file can be created in .*\); choose "
                                          r"another --output"):
        with run_lock(tmp_path / "run"):
            pass


def test_a_teacher_with_a_dense_projection_gives_a_student_sentence_transformers_loads(tiny_bert_dir, tmp_path):
    """The student learns the teacher's pooled output before the Dense layer: it keeps Transformer, Pooling and
    Normalize, and says which module it left out (its modules.json pointed at a 2_Dense folder it never had)."""
    import json

    import sentence_transformers as st
    from transformers import AutoModel, AutoTokenizer

    from kdistill.engine.export import save_student

    teacher = st.SentenceTransformer(tiny_bert_dir, device="cpu")
    with_dense = st.SentenceTransformer(modules=[teacher[0], teacher[1], st.models.Dense(32, 16), st.models.Normalize()],
                                        device="cpu")
    with_dense.save(str(tmp_path / "teacher"))
    student = AutoModel.from_pretrained(tiny_bert_dir)
    out = save_student(student, AutoTokenizer.from_pretrained(tiny_bert_dir), tmp_path / "student",
                       teacher_dir=str(tmp_path / "teacher"), metadata={})
    loaded = st.SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in loaded] == ["Transformer", "Pooling", "Normalize"]
    assert loaded.encode(["a small test"]).shape == (1, 32)
    record = json.loads((out / "kdistill.json").read_text())
    assert record["sentence_transformers"] and record["sentence_transformers_left_out"] == ["2_Dense (Dense)"]


def test_a_later_stage_missing_its_data_or_teacher_is_refused_before_the_first_stage_trains(tiny_recipe, tmp_path):
    tiny_recipe["stages"] = [{"name": "one", "train": {"steps": 2}},
                             {"name": "two", "data": {"train": {"path": str(tmp_path / "nofile.jsonl")}}}]
    with pytest.raises(DataError, match=r"stages\[1\].data.train: data file not found"):
        distill(tiny_recipe, progress=False)
    assert not (Path(tiny_recipe["output"]) / "stages" / "one").exists()
    tiny_recipe["stages"][1] = {"name": "two", "teacher": {"model": str(tmp_path / "nope")}}
    with pytest.raises(DataError, match=r"stages\[1\].teacher.model: model directory .*nope.* does not exist"):
        distill(tiny_recipe, progress=False)
    assert not (Path(tiny_recipe["output"]) / "checkpoints").exists()


def test_an_encoder_is_refused_as_a_causal_lm(tiny_recipe, tiny_gpt2_dir, tiny_bert_dir):
    # BertLMHeadModel without is_decoder attends both ways: it would train on the next tokens it can see
    from kdistill.errors import PairingError

    tiny_recipe.update(losses=[{"type": "logit_kd"}], teacher={"model": tiny_bert_dir, "task": "causal-lm"})
    with pytest.raises(PairingError, match=r"is a bert encoder: its attention reads every token both ways"):
        distill(tiny_recipe, progress=False)
    tiny_recipe.update(teacher={"model": tiny_gpt2_dir}, student={"model": tiny_bert_dir})
    with pytest.raises(PairingError, match=r"is a bert encoder"):
        distill(tiny_recipe, progress=False)
    assert not (Path(tiny_recipe["output"]) / "student").exists()


def test_a_split_of_a_one_split_file_is_refused(tiny_recipe):
    # a plain file is the same records whatever split is asked of it: eval would score the training records
    tiny_recipe["data"]["eval"] = {**tiny_recipe["data"]["eval"], "split": "eval"}
    with pytest.raises(ConfigError, match=r"data.eval.split: .* is one split .* no 'eval' split to choose; give each "
                                          r"split its own file"):
        distill(tiny_recipe, progress=False)


def test_a_split_of_a_saved_dataset_without_splits_is_refused_and_train_of_a_training_file_is_not(tiny_recipe,
                                                                                                    tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"sentence": f"text {i}"} for i in range(16)]).save_to_disk(str(saved))
    tiny_recipe["data"]["eval"] = {"path": str(saved), "text": "sentence", "split": "eval"}
    with pytest.raises(ConfigError, match=r"data.eval.split: .*saved is one split"):
        distill(tiny_recipe, progress=False)
    tiny_recipe["data"]["eval"] = {"path": str(saved), "text": "sentence"}
    tiny_recipe["data"]["train"] = {**tiny_recipe["data"]["train"], "split": "train"}
    assert (distill(tiny_recipe, progress=False) / "kdistill.json").exists()
