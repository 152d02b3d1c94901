"""`teacher: {model: recipe:NAME}`: the cached run is reused, a run from another version of the recipe says so, and
one command at a time trains it."""
import warnings

import pytest

from kdistill.teachers.recipe_runs import resolve_teacher


def test_a_cached_run_of_todays_recipe_is_used_quietly(cached_recipe_run):
    out = cached_recipe_run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_teacher("recipe:teacher-supersense") == str(out / "student")


def test_a_cached_run_of_another_recipe_version_is_used_with_a_warning(cached_recipe_run, recwarn):
    def older(dumped):  # as trained before the head had its own learning rate, and for more steps
        dumped["stages"][0]["train"]["lr_scale"] = {}
        dumped["stages"][0]["train"]["steps"] = 2000

    out = cached_recipe_run(edit=older)
    assert resolve_teacher("recipe:teacher-supersense") == str(out / "student")  # kept: it may have cost an hour
    [warning] = [w for w in recwarn if "cached teacher" in str(w.message)]
    message = str(warning.message)
    assert "train.lr_scale" in message and "train.steps: 2000 -> 1500" in message
    assert f"Delete {out}" in message
    assert (out / "student" / "kdistill.json").exists()


def test_the_warning_is_given_once_per_process(cached_recipe_run, recwarn):
    def older(dumped):
        dumped["stages"][0]["train"]["steps"] = 2000

    out = cached_recipe_run(edit=older)
    for _ in range(3):  # as a comparison does: every stage of every run resolves its teacher
        assert resolve_teacher("recipe:teacher-supersense") == str(out / "student")
    assert len([w for w in recwarn if "cached teacher" in str(w.message)]) == 1


HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def hold_lock_in_another_process(path):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture
def untrained_teacher(tmp_path, monkeypatch):
    """(its run folder, the recipes this process trains, a held lock on it in another process): teacher-supersense
    not trained yet under a temporary KDISTILL_HOME, with training itself recorded instead of run."""
    import kdistill.engine.run
    from kdistill.teachers.recipe_runs import recipe_output

    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path))
    trained = []
    monkeypatch.setattr(kdistill.engine.run, "run_recipe", lambda recipe, **kw: trained.append(recipe.name))
    out = recipe_output("teacher-supersense")
    out.mkdir(parents=True)
    holder = hold_lock_in_another_process(out.parent / ".teacher-supersense.lock")
    yield out, trained, holder
    holder.kill()
    holder.wait()


def test_a_teacher_being_trained_by_another_command_is_waited_for_not_trained_twice(untrained_teacher, capsys):
    import threading

    out, trained, holder = untrained_teacher
    result = []
    waiter = threading.Thread(target=lambda: result.append(resolve_teacher("recipe:teacher-supersense")))
    waiter.start()
    waiter.join(timeout=2)
    assert waiter.is_alive()  # waiting on the other command
    # the other command finishes its run, then exits (which releases its lock)
    (out / "student").mkdir()
    for name in ("kdistill.json", "config.json", "model.safetensors"):
        (out / "student" / name).write_text("{}")
    holder.kill()
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert result == [str(out / "student")]
    assert trained == []  # used the other command's teacher
    assert "being trained by another command" in capsys.readouterr().err


def test_a_killed_command_leaves_no_lock_behind(untrained_teacher):
    out, trained, holder = untrained_teacher
    holder.kill()  # killed mid-training: its lock goes with it
    holder.wait()
    assert resolve_teacher("recipe:teacher-supersense") == str(out / "student")
    assert trained == ["teacher-supersense"]


def test_recipe_names_a_built_in_recipe_with_the_closest_suggested(tmp_path):
    from kdistill.errors import ConfigError
    from kdistill.models.loading import packaged_dir

    with pytest.raises(ConfigError, match="unknown recipe model 'lm-teachr'; did you mean recipe:lm-teacher?"):
        resolve_teacher("recipe:lm-teachr")
    (tmp_path / "mine.yaml").write_text("name: mine\n")  # a file is a recipe to run, not a cached teacher
    with pytest.raises(ConfigError, match="unknown recipe model"):
        resolve_teacher(f"recipe:{tmp_path / 'mine.yaml'}")
    with pytest.raises(ConfigError, match="did you mean packaged:all-MiniLM-L6-v2?"):
        packaged_dir("all-MiniLM-L6")
