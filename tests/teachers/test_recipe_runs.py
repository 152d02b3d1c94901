"""`teacher: {model: recipe:NAME}`: the cached run is reused, and a run from another version of the recipe says so."""
import warnings

import yaml

from kdistill.config import load_recipe
from kdistill.teachers.recipe_runs import recipe_output, resolve_teacher


def cached_run(tmp_path, monkeypatch, name="teacher-supersense", edit=None):
    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path))
    out = recipe_output(name)
    (out / "student").mkdir(parents=True)
    (out / "student" / "kdistill.json").write_text("{}")
    (out / "student" / "config.json").write_text("{}")
    dumped = load_recipe(name, output=str(out)).dump()
    if edit:
        edit(dumped)
    (out / "config.resolved.yaml").write_text(yaml.safe_dump(dumped, sort_keys=False))
    return out


def test_a_cached_run_of_todays_recipe_is_used_quietly(tmp_path, monkeypatch):
    out = cached_run(tmp_path, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_teacher("recipe:teacher-supersense") == str(out / "student")


def test_a_cached_run_of_another_recipe_version_is_used_with_a_warning(tmp_path, monkeypatch, recwarn):
    def older(dumped):  # as trained before the head had its own learning rate, and for more steps
        dumped["stages"][0]["train"]["lr_scale"] = {}
        dumped["stages"][0]["train"]["steps"] = 2000

    out = cached_run(tmp_path, monkeypatch, edit=older)
    assert resolve_teacher("recipe:teacher-supersense") == str(out / "student")  # kept: it may have cost an hour
    [warning] = [w for w in recwarn if "cached teacher" in str(w.message)]
    message = str(warning.message)
    assert "train.lr_scale" in message and "train.steps: 2000 -> 1500" in message
    assert f"Delete {out}" in message
    assert (out / "student" / "kdistill.json").exists()


def test_the_warning_is_given_once_per_process(tmp_path, monkeypatch, recwarn):
    def older(dumped):
        dumped["stages"][0]["train"]["steps"] = 2000

    out = cached_run(tmp_path, monkeypatch, edit=older)
    for _ in range(3):  # as a comparison does: every stage of every run resolves its teacher
        assert resolve_teacher("recipe:teacher-supersense") == str(out / "student")
    assert len([w for w in recwarn if "cached teacher" in str(w.message)]) == 1
