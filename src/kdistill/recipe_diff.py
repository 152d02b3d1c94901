"""How two recipes differ, field by field: what blocks a resume and what makes `kdistill compare` train a run again.
A changed spelling of the same file, the run's own folder and name, and how often a run logs or saves are not
changes."""
from __future__ import annotations

import os
from typing import Any

from kdistill.config import Recipe
from kdistill.errors import KdistillError


def read_saved(path) -> dict | None:
    """A run folder's saved recipe (config.resolved.yaml) as YAML data; None where it is missing or unreadable
    (not YAML, not UTF-8, not a mapping), which a resume of that run then names."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def recipe_changes(previous: dict, current: Recipe) -> list[str]:
    """Field paths where a run's saved recipe differs from `current`. The saved one is read through
    today's schema first, so a field added since (saved without it) counts as its default, not a change.
    `output` is left out: it names where the run lives, which the caller found it by, and the same folder
    spelt relative or absolute must not make a finished run look edited (compare would train it again).
    So is `name`, which changes no weight: compare's baselines are shared by every recipe that asks for
    the same one, each calling it after itself."""
    try:
        from kdistill.recipe_loading import build_recipe

        previous = build_recipe(previous, "the saved recipe").dump()
    except (KdistillError, TypeError, AttributeError):
        pass  # a field since removed or renamed: the raw difference names it
    now = current.dump()
    if isinstance(previous, dict):
        previous = {k: v for k, v in previous.items() if k not in ("output", "name")}
    return diff_configs(previous, {k: v for k, v in now.items() if k not in ("output", "name")}, ignore=BOOKKEEPING)


# How often a run evaluates, logs and checkpoints, and how many checkpoints it keeps, changes no weight
# (evaluation draws no random numbers; training is deterministic and resumes exactly: tests), so changing
# them neither blocks a resume nor makes compare retrain a finished run.
BOOKKEEPING = frozenset({"eval_every", "log_every", "save_every", "keep_checkpoints"})


def diff_configs(old: Any, new: Any, path: str = "", ignore: frozenset = frozenset()) -> list[str]:
    """Field paths where two dumped recipes differ; keys named in `ignore` are skipped at any depth."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            if key not in ignore:
                out += diff_configs(old.get(key), new.get(key), f"{path}.{key}" if path else str(key), ignore)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in diff_configs(a, b, f"{path}[{i}]", ignore)]
    return [] if old == new or same_file(old, new) else [f"{path}: {old!r} -> {new!r}"]


def same_file(old: Any, new: Any) -> bool:
    """Two spellings of one file or folder (relative and absolute, through a link): a data file or teacher named
    another way is not a changed recipe."""
    if not (isinstance(old, str) and isinstance(new, str)) or not (os.sep in old + new or old.startswith(".")):
        return False
    try:
        return os.path.samefile(os.path.expanduser(old), os.path.expanduser(new))
    except (OSError, ValueError):  # either is not a path that exists
        return False
