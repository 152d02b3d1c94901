"""Teachers that are themselves the output of a built-in recipe: `teacher: {model: recipe:NAME}`.

The recipe runs once and its student is cached under $KDISTILL_HOME (default ~/.cache/kdistill), so
every student recipe and every seed of a comparison reuses the same task teacher.
"""
from __future__ import annotations

import os
from pathlib import Path

PREFIX = "recipe:"


def kdistill_home() -> Path:
    return Path(os.environ.get("KDISTILL_HOME", Path.home() / ".cache" / "kdistill"))


def recipe_output(name: str) -> Path:
    return kdistill_home() / "recipes" / name


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
    if is_complete(student):
        return str(student)
    recipe = load_recipe(name, output=str(out))
    if console is not None:
        console.print(f"teacher {ref} is not trained yet: running recipe {name!r} once (cached in {out})")
    run_recipe(recipe, resume=(out / "config.resolved.yaml").exists(), console=console)
    return str(student)
