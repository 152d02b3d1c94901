"""`teacher: {model: recipe:NAME}`: the cached run is reused, and a run from another version of the recipe says so."""
import warnings

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
