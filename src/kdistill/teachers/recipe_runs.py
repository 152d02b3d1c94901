"""Teachers that are themselves the output of a built-in recipe: `teacher: {model: recipe:NAME}`.

The recipe runs once and its student is cached under $KDISTILL_HOME (default ~/.cache/kdistill), so
every student recipe and every seed of a comparison reuses the same task teacher.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

PREFIX = "recipe:"
# (directory, differences) already warned about: a comparison resolves the teacher once per stage of every
# run, and one warning says it all
_warned: set[tuple[str, tuple[str, ...]]] = set()


def kdistill_home() -> Path:
    return Path(os.environ.get("KDISTILL_HOME") or Path.home() / ".cache" / "kdistill").expanduser()


def recipe_output(name: str) -> Path:
    """Where recipe:NAME's run is cached; NAME is a built-in recipe (a path would put the cache beside it)."""
    from kdistill.models.loading import check_model_name

    check_model_name(PREFIX + name)
    return kdistill_home() / "recipes" / name


def trained_recipe(ref: str) -> Path | None:
    """`recipe:NAME`'s trained model folder, without training it: None when it is not trained yet. Any other
    reference is no recipe: a ValueError (callers check the prefix first)."""
    from kdistill.engine.export import is_complete

    if not str(ref).startswith(PREFIX):
        raise ValueError(f"{ref!r} is not a {PREFIX}NAME reference")
    student = recipe_output(str(ref)[len(PREFIX):]) / "student"
    return student if is_complete(student) else None


def trained_model(ref: str, where: str) -> str:
    """recipe:NAME as the model that recipe trained, without training it (evaluating or loading one does not
    start an hour of training): the cached run a `recipe:` teacher uses, else the run `kdistill run NAME` made in
    the recipe's own output folder (runs/NAME from here); any other reference as it is."""
    if not str(ref).startswith(PREFIX):
        return ref
    from kdistill.config import load_recipe
    from kdistill.engine.export import is_complete
    from kdistill.errors import ConfigError

    trained = trained_recipe(ref)
    if trained is not None:
        return str(trained)
    name = ref[len(PREFIX):]
    own = Path(load_recipe(name).output) / "student"
    if is_complete(own) and ran_recipe(own) == name:
        warn_if_stale(load_recipe(name, output=str(own.parent)), own.parent, what="the run")  # e.g. a 5-step smoke run
        return str(own)
    cached = recipe_output(name)
    raise ConfigError(f"{where} {ref}: that recipe has not been trained here yet (neither {cached / 'student'} nor "
                      f"{own} holds a finished run of it); `kdistill run {name}` trains it into {own.parent}, "
                      f"`kdistill run {name} --output {cached}` where a recipe:{name} teacher looks")


def ran_recipe(student: Path) -> str | None:
    """The recipe name a finished student records in its kdistill.json (None if it cannot be read)."""
    import json

    try:
        return json.loads((student / "kdistill.json").read_text()).get("recipe")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_teacher(ref: str, console=None) -> str:
    """A model reference for loading; `recipe:NAME` is trained first if it has not been yet."""
    if not str(ref).startswith(PREFIX):
        return ref
    from kdistill.config import load_recipe
    from kdistill.engine.export import is_complete
    from kdistill.engine.run import run_recipe

    name = ref[len(PREFIX):]
    out = recipe_output(name)
    student = out / "student"
    recipe = load_recipe(name, output=str(out))
    if is_complete(student):
        warn_if_stale(recipe, out, console)
        return str(student)
    with training_lock(out, ref, console):
        if is_complete(student):  # another command trained it while this one waited
            return str(student)
        if console is not None:
            console.print(f"teacher {ref} is not trained yet: running recipe {name!r} once (cached in {out})")
        run_recipe(recipe, resume=(out / "config.resolved.yaml").exists(), console=console)
    return str(student)


@contextmanager
def training_lock(out: Path, ref: str, console=None):
    """One command at a time trains a cached teacher: two commands started together would otherwise both
    train it into the same folder, each overwriting the other's checkpoints. A second one waits."""
    from kdistill.engine.locks import folder_lock
    from kdistill.errors import ConfigError

    def wait(lock_file: str):
        message = f"teacher {ref} is being trained by another command: waiting for it to finish (lock {lock_file})"
        if console is not None:
            console.print(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def unwritable(err: OSError):
        raise ConfigError(f"teacher {ref}: cannot write its cache in {out.parent} ({err.strerror or err}); set "
                          f"KDISTILL_HOME to a writable folder") from None

    with folder_lock(out, "lock", wait, unwritable):
        yield


def warn_if_stale(recipe, out: Path, console=None, what: str = "the cached teacher") -> None:
    """A cached teacher trained by another version of its recipe (an upgrade changed the recipe, or it was
    run with --set overrides) is used as it is, since it may have cost an hour to train, but not silently:
    the warning names what differs and how to train today's recipe instead."""
    import warnings

    from kdistill.recipe_diff import read_saved, recipe_changes

    resolved = out / "config.resolved.yaml"
    saved = read_saved(resolved)
    changed = [f"{resolved} is missing or unreadable"] if saved is None else recipe_changes(saved, recipe)
    key = (str(out.resolve()), tuple(changed))
    if changed and key not in _warned:
        _warned.add(key)
        message = (f"{what} in {out} was trained by a different {recipe.name!r} recipe than today's ("
                   + "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
                   + f"); using it as it is. Delete {out} to train today's recipe")
        if console is not None:
            console.print(f"[yellow]warning:[/yellow] {message}")
        else:
            warnings.warn(message, stacklevel=3)
