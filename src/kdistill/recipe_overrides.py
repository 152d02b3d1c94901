"""`--set KEY=VALUE` overrides on a raw recipe, before it is merged and validated."""
from __future__ import annotations

import re
from typing import Any

import yaml

from kdistill.config import STAGE_FIELDS
from kdistill.errors import ConfigError


def key_parts(key: str) -> list[str]:
    """`stages[0].train.lr` (as recipe-difference messages print it) or `stages.0.train.lr` -> its parts."""
    return re.sub(r"\[(-?\d+)\]", r".\1", key.strip()).split(".")


def apply_override(raw: dict, assignment: str) -> None:
    """`a.b.c=value`, value parsed as YAML (so numbers, booleans and lists work); list items by index, written
    `stages.0.train.lr` or, as the recipe-difference messages print it, `stages[0].train.lr`."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.steps=100")
    key, value = assignment.split("=", 1)
    parts = key_parts(key)
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            where = '.'.join(parts[:i]) or 'recipe'
            if not part.lstrip("-").isdigit():
                raise ConfigError(f"--set {key}: {where} is a list of {len(node)}; use an index")
            if not -len(node) <= int(part) < len(node):
                raise ConfigError(f"--set {key}: {where} has {len(node)} item(s), so index {part} is out of range "
                                  f"(0 to {len(node) - 1})")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping")
        if last:
            try:
                node[part] = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"--set {key}: the value {value!r} is not valid YAML "
                                  f"(quote it, or close its brackets)") from None
        else:
            if isinstance(node, dict) and node.get(part) is None:
                if parts[i + 1].lstrip("-").isdigit():  # an index into a list the recipe does not have
                    hint = f"; a one-stage recipe has none: set {'.'.join(parts[i + 2:]) or 'the field'} directly" \
                        if part == "stages" else ""
                    raise ConfigError(f"--set {key}: the recipe has no {'.'.join(parts[:i + 1])} list to index{hint}")
                node[part] = {}
            elif not isinstance(node[part], (dict, list)):
                raise ConfigError(f"--set {key}: {'.'.join(str(p) for p in parts[:i + 1])} is {node[part]!r}, "
                                  f"not a mapping to set {parts[i + 1]!r} in")
            node = node[part]


def check_not_shadowed(raw: dict, assignment: str) -> None:
    """A recipe-wide `--set` that every stage overrides with its own value would change nothing, silently: refused.
    One that some stages override is said. Run after every `--set` is applied: a stage given the same value
    (`--set stages.1.train.steps=5` beside `train.steps=5`) overrides nothing."""
    key = assignment.split("=", 1)[0].strip()
    parts = key_parts(key)
    stages = raw.get("stages")
    if parts[0] not in STAGE_FIELDS or not isinstance(stages, list) or not stages:
        return

    def step(node: Any, part: str) -> Any:
        if isinstance(node, dict):
            return node.get(part)
        if isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            return node[int(part)]
        return None

    def keeps_own(block: Any) -> bool:
        if not isinstance(block, dict) or "synthesize" in block:  # a synthesize stage takes no training defaults
            return True
        wide = raw
        for part in parts:
            if isinstance(block, list):  # the stage's own list replaces the recipe-wide one whole
                return block != wide
            if not isinstance(block, dict) or part not in block:
                return False
            block, wide = block[part], step(wide, part)
        return block != wide

    own = [i for i, block in enumerate(stages) if keeps_own(block)]
    index = next((i for i, part in enumerate(parts) if part.lstrip("-").isdigit()), len(parts))
    field = ".".join(parts[:index])
    if len(own) == len(stages):
        synthesize = any(isinstance(block, dict) and "synthesize" in block for block in stages)
        # the example names a stage that trains: a synthesize stage refuses training fields
        example = next((i for i, block in enumerate(stages) if isinstance(block, dict) and "synthesize" not in block), 0)
        raise ConfigError(f"--set {key}: every stage sets its own {field}"
                          + (" (or is a synthesize stage, which takes no recipe-wide training fields)" if synthesize
                             else "")
                          + f", so the recipe-wide value would change nothing; set it per stage, e.g. "
                            f"stages.{example}.{key}=...")
    trained_own = [i for i in own if isinstance(stages[i], dict) and "synthesize" not in stages[i]]
    if trained_own:  # said, not refused: changing the shared value of the other stages is a fair wish
        import warnings

        value = assignment.split("=", 1)[1].strip() if "=" in assignment else "..."
        names = ", ".join(str(stages[i].get("name", i)) for i in trained_own)
        fixes = " ".join(f"--set stages.{i}.{key}={value}" for i in trained_own)
        warnings.warn(f"--set {key}: not applied to stage{'s' if len(trained_own) > 1 else ''} {names}, which "
                      f"set{'s' if len(trained_own) == 1 else ''} its own {field}; add {fixes} to change "
                      f"{'them' if len(trained_own) > 1 else 'it'} too", stacklevel=3)
