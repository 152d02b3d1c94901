"""kdistill: knowledge distillation for transformer models, from one recipe.

    import kdistill
    student_dir = kdistill.distill("minilm-l3", overrides=["train.steps=100"])
    report = kdistill.evaluate(str(student_dir), "packaged:all-MiniLM-L6-v2", {"source": "stdlib-docstrings"})
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

__version__ = "0.1.0"


def load_recipe(ref, overrides=(), output=None):
    """A validated recipe from a YAML path, a built-in recipe name, or a dict."""
    from kdistill.config import Recipe
    from kdistill.config import load_recipe as _load
    from kdistill.errors import ConfigError

    with api_words():
        if isinstance(overrides, (str, dict)):
            raise ConfigError(f"overrides is a list of 'KEY=VALUE' strings, got {overrides!r}")
        if output is not None and not isinstance(output, (str, os.PathLike)):  # output=5 wrote to ./5
            raise ConfigError(f"output is a folder path (str or Path), got {type(output).__name__} {output!r}")
        if isinstance(ref, Recipe):
            if overrides:  # its stages already hold every setting, so `train.steps=...` would change nothing
                raise ConfigError("overrides apply to a recipe's name, file or dict, not to a loaded Recipe; "
                                  "pass the name or file with overrides instead")
            ref = ref.dump()
        return _load(ref, overrides, None if output is None else os.fspath(output))


def distill(recipe, overrides=(), output: str | os.PathLike | None = None, resume: bool = False, force: bool = False,
            progress: bool = True) -> Path:
    """Run a recipe (path, built-in name, dict or Recipe) and return the final student directory."""
    from rich.console import Console

    from kdistill.config import Recipe
    from kdistill.engine.run import run_recipe
    from kdistill.errors import ConfigError

    overrides = () if overrides is None else overrides
    with api_words():
        for name, value in (("resume", resume), ("force", force), ("progress", progress)):
            if not isinstance(value, bool):  # resume="no" is truthy
                raise ConfigError(f"{name} is True or False, got {value!r}")
        if not isinstance(recipe, Recipe) or overrides or output:
            recipe = load_recipe(recipe, overrides, output)
        return run_recipe(recipe, resume=resume, force=force, console=Console(emoji=False), progress=progress)


# The engine's refusals name the command line's flags and commands; a Python caller passes keywords and calls
# functions instead. Whole phrases first, so that what is left reads as Python.
API_WORDS = [(r" \(as --set takes\)", ""),
             (r"choose another --output", "pass another output="),
             (r"with --set (.*?): invalid recipe", r"with overrides [\1]: invalid recipe"),
             (r"--set '([^']*)'", r"override '\1'"), (r"--set (\S+)", r"override \1"),
             (r"`kdistill run ([\w.-]+) --output (\S+)`", r"kdistill.distill('\1', output='\2')"),
             (r"`kdistill run ([\w.-]+)`", r"kdistill.distill('\1')"),
             (r"--resume --force", "resume=True, force=True"), (r"--resume", "resume=True"), (r"--force", "force=True"),
             (r"--output", "output="), (r"--limit", "limit="), (r" \(limit=\)", "")]


def in_api_words(message: str) -> str:
    import re

    from kdistill.engine.disk import RERUN

    message = message.replace(RERUN, "call distill again with resume=True")
    for pattern, words in API_WORDS:
        message = re.sub(pattern, words, message)
    return message


@contextlib.contextmanager
def api_words():
    """kdistill's refusals inside the block, reworded for a Python caller (the same error type and cause)."""
    from kdistill.errors import KdistillError

    try:
        yield
    except KdistillError as err:
        raise type(err)(in_api_words(str(err))) from err.__cause__


def load_model(ref: str, task: str = "auto"):
    """A model and its tokenizer (`.model`, `.tokenizer`) from a directory, hub id, packaged:NAME or recipe:NAME
    (a built-in recipe's trained student); quantized students and packed 1-bit exports come back with their
    quantized structure."""
    from kdistill.errors import ConfigError, article
    from kdistill.models.loading import detect_task, load_config
    from kdistill.models.loading import load_model as _load
    from kdistill.teachers.recipe_runs import trained_model

    with api_words():
        ref = trained_model(ref, "ref")
        saved = detect_task(load_config(ref)[1])
        if task not in ("auto", "embedding", saved):  # transformers would fill the missing head with random weights
            raise ConfigError(f"{ref} was saved as {article(saved)} model, so as {task} its head would be random "
                              f"weights (transformers only warns); load it with task='auto', or 'embedding' for its "
                              f"encoder alone")
        return _load(ref, task)


def evaluate(student: str, teacher: str | None, data, **kwargs) -> dict:
    """Side-by-side metrics of a student against its teacher (see kdistill.eval.report.evaluate)."""
    from kdistill.eval.report import evaluate as _evaluate
    from kdistill.teachers.recipe_runs import trained_model

    with api_words():
        return _evaluate(trained_model(student, "student"), trained_model(teacher, "teacher") if teacher else None,
                         data, **kwargs)


__all__ = ["distill", "evaluate", "load_model", "load_recipe", "__version__"]
