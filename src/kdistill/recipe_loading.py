"""Reading recipes: a YAML file or built-in name, `--set` overrides applied (kdistill.recipe_overrides), stage
merging, and validation of every block against the schema (kdistill.config) with errors that name the field path.
How a saved recipe differs from the current one: kdistill.recipe_diff; error messages: kdistill.recipe_errors.
"""
from __future__ import annotations

import collections.abc
import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdistill.config import (
    RECIPES_DIR, STAGE_FIELDS, STAGE_TEACHER, DataSource, Recipe, Stage,
)
from kdistill.errors import ConfigError, did_you_mean
from kdistill.recipe_errors import format_validation
from kdistill.recipe_overrides import apply_override, check_not_shadowed


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: YAML's rule is that the last one
    wins, so a second `train:` block would silently replace the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys given after it override it
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, collections.abc.Hashable):
                continue  # the base class names an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping (the second would silently replace "
                    f"the first): keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_recipe_file(ref: str | Path) -> tuple[dict, str]:
    """Raw dict of a recipe given as a path or a built-in name."""
    path = Path(ref).expanduser()
    if not path.exists():
        builtins = builtin_recipes()
        if str(ref) in builtins:
            path = builtins[str(ref)]
        else:
            hint = did_you_mean(ref, builtins, cutoff=0.6)
            raise ConfigError(f"recipe {str(ref)!r} is neither a file nor a built-in recipe{hint or ';'} built-in: "
                              f"{', '.join(builtins)}")
    if not path.is_file():
        raise ConfigError(f"recipe {path} is not a file (a recipe is one YAML file)")
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except yaml.YAMLError as err:
        # `{student_tap: hidden_states[2]}`: inside { } a bare [ opens a list, so the value needs quotes
        hint = ("\n(inside { } a value with [ ] or a comma needs quotes, e.g. {teacher_tap: \"hidden_states[4]\"})"
                if "flow mapping" in str(err) else "")
        raise ConfigError(f"{path}: not valid YAML: {err}{hint}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"recipe {path} cannot be read as text: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping with teacher, student, data, losses, train, output")
    return raw, str(path)


def merge(base: Any, update: Any) -> Any:
    if isinstance(base, dict) and isinstance(update, dict):
        out = dict(base)
        for key, value in update.items():
            out[key] = merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(update)


def validate_losses(stage: Stage, prefix: str, source: str) -> None:
    from kdistill.losses import LOSSES

    parsed = []
    for i, block in enumerate(stage.losses):
        where = f"{prefix}losses[{i}]"
        if not isinstance(block, dict) or "type" not in block:
            raise ConfigError(f"{source}: {where}: each loss needs a type, e.g. {{type: hidden_mse, weight: 1.0}}")
        term = LOSSES.get(block["type"], f"{where}.type")
        try:
            parsed.append(term.Params.model_validate(block))
        except ValidationError as err:
            raise ConfigError(format_validation(err, where, source, term.Params)) from None
    if parsed and not any(term.weight > 0 for term in parsed):
        raise ConfigError(f"{source}: {prefix}losses: every weight is 0, so the student would learn nothing; give "
                          f"at least one loss a positive weight")
    stage.losses = parsed


def validate_filter(stage: Stage, prefix: str, source: str) -> None:
    """`synthesize.filter` against the params model of its registered type (kdistill.api.filters)."""
    from kdistill.api.filters import FILTERS

    where = f"{prefix}synthesize.filter"
    block = stage.synthesize.filter
    if not isinstance(block, dict) or "type" not in block:
        raise ConfigError(f"{source}: {where}: a filter needs a type, e.g. {{type: execution}}; "
                          f"valid: {', '.join(FILTERS.names())}")
    kind = FILTERS.get(block["type"], f"{where}.type")
    try:
        stage.synthesize.filter = kind.Params.model_validate(block)
    except ValidationError as err:
        raise ConfigError(format_validation(err, where, source, kind.Params)) from None


def validate_lion(stage: Stage, prefix: str, source: str) -> None:
    """`lion.referee` and `lion.writer` against the params models of their registered types."""
    from kdistill.api.instruction_writers import WRITERS
    from kdistill.api.referees import REFEREES

    for name, registry, example in (("referee", REFEREES, "{type: rouge, threshold: 0.5}"),
                                    ("writer", WRITERS, "{type: wordnet-neighbours}")):
        where = f"{prefix}lion.{name}"
        block = getattr(stage.lion, name)
        if not isinstance(block, dict) or "type" not in block:
            raise ConfigError(f"{source}: {where}: needs a type, e.g. {example}; valid: {', '.join(registry.names())}")
        kind = registry.get(block["type"], f"{where}.type")
        try:
            params = kind.Params.model_validate(block)
        except ValidationError as err:
            raise ConfigError(format_validation(err, where, source, kind.Params)) from None
        setattr(stage.lion, name, params)
        # a part that talks to a chat service needs one before the first round trains, not after it
        if "api" in kind.Params.model_fields and params.api is None and getattr(stage.lion.teacher, "api", None) is None:
            raise ConfigError(f"{source}: {where}.api: {block['type']} needs a chat service: give {where}.api "
                              f"({{base_url, model, ...}}) or a lion.teacher.api to reuse")


def data_specs(stage: Stage) -> list[tuple[str, DataSource]]:
    """(field path, source) of every data source a training stage reads."""
    out = []
    for split in ("train", "eval"):
        specs = getattr(stage.data, split) if stage.data else None
        specs = specs if isinstance(specs, list) else [] if specs is None else [specs]
        out += [(f"data.{split}" + (f"[{j}]" if len(specs) > 1 else "") + ".path", spec) for j, spec in enumerate(specs)]
    return out


def check_precision_order(stages: list, source: str) -> None:
    """What the engine would refuse after the earlier stages trained, refused before: a later stage keeps training
    the quantized student, so it needs its own precision; split binary halves cannot become wider again."""
    quantized, split = None, False
    for i, stage in enumerate(stages):
        where = f"{source}: stages[{i}].quant"
        fresh = stage.student is not None and not str(stage.student.model or "").startswith("stage:")
        if stage.synthesize is not None or fresh:
            quantized, split = None, False  # a new student starts at full precision (or none trains here)
        if stage.quant is None:
            if quantized is not None and stage.synthesize is None:
                raise ConfigError(f"{where}: stages[{quantized}] quantized the student and this stage trains it on; "
                                  f"give it its own quant: block (the precision it trains at)")
            continue
        if split and stage.quant.weights != 1:
            raise ConfigError(f"{where}.weights: an earlier stage split the ternary weights into two binary halves "
                              f"(BinaryBERT); they cannot become {stage.quant.weights}-bit again")
        split = split or (quantized is not None and stages[quantized].quant.weights == 2 and stage.quant.weights == 1
                          and stage.quant.split)
        quantized = i


def check_stage_references(stages: list[Stage], multi: bool, source: str) -> None:
    """`teacher.model: stage:NAME` names an earlier training stage (its student); `path: stage:NAME` in data
    names an earlier synthesize stage (its kept rows)."""
    for i, stage in enumerate(stages):
        prefix = f"stages[{i}]." if multi else ""
        earlier = stages[:i]
        trained = [s.name for s in earlier if s.synthesize is None]
        synthesized = [s.name for s in earlier if s.synthesize is not None]
        models = [("teacher.model", stage.teacher.model if stage.teacher else None)]
        if stage.synthesize is not None:
            models.append(("synthesize.teacher.model", stage.synthesize.teacher.model))
        if stage.lion is not None and stage.lion.teacher is not None:
            models.append(("lion.teacher.model", stage.lion.teacher.model))
        for where, ref in models:
            ref = str(ref or "")
            if ref.startswith(STAGE_TEACHER) and ref[len(STAGE_TEACHER):] not in trained:
                why = (f"{ref[len(STAGE_TEACHER):]!r} is a synthesize stage, which makes data, not a model; "
                       if ref[len(STAGE_TEACHER):] in synthesized else "")
                raise ConfigError(f"{source}: {prefix}{where}: {ref!r} must name an earlier stage that trains a model; {why}"
                                  f"earlier training stages: {', '.join(trained) or 'none'}")
        for where, spec in data_specs(stage):
            ref = str(spec.path or "")
            if ref.startswith(STAGE_TEACHER) and ref[len(STAGE_TEACHER):] not in synthesized:
                why = (f"{ref[len(STAGE_TEACHER):]!r} is a training stage, which makes a model, not data "
                       f"(use teacher.model: {ref} for its student); " if ref[len(STAGE_TEACHER):] in trained else "")
                raise ConfigError(f"{source}: {prefix}{where}: {ref!r} must name an earlier synthesize stage (it reads "
                                  f"that stage's kept rows); {why}earlier synthesize stages: {', '.join(synthesized) or 'none'}")


STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def replace_whole(merged: dict, block: dict, defaults: dict) -> None:
    """A stage's own student of another kind than the shared one (model under a shared from_teacher), or its own
    data source of another kind (path under a shared source), replaces it whole: merged key by key it would be
    two kinds at once. Of the same kind, the two merge as any mapping does."""
    kinds = {"student": ("from_teacher", "config", "model", "theseus"), "source": ("source", "path", "dataset")}

    def other_kind(own, shared, keys) -> bool:  # a block naming no kind (`eval: {limit: 10}`) adjusts the shared one
        mine = {k for k in keys if isinstance(own, dict) and own.get(k) is not None}
        return bool(mine) and isinstance(shared, dict) and mine != {k for k in keys if shared.get(k) is not None}

    if other_kind(block.get("student"), defaults.get("student"), kinds["student"]):
        merged["student"] = copy.deepcopy(block["student"])
    data, shared = block.get("data"), defaults.get("data")
    for split in ("train", "eval"):
        if isinstance(data, dict) and isinstance(shared, dict) and isinstance(merged.get("data"), dict) and \
                other_kind(data.get(split), shared.get(split), kinds["source"]):
            merged["data"][split] = copy.deepcopy(data[split])


def build_recipe(raw: dict, source: str = "recipe") -> Recipe:
    raw = copy.deepcopy(raw)
    known = {"name", "output", "stages", "synthesize", *STAGE_FIELDS}
    extra = [k for k in raw if k not in known]
    if extra:
        hints = [repr(k) + (f" ({hint[2:]})" if (hint := did_you_mean(k, known, cutoff=0.6)) else "") for k in extra]
        raise ConfigError(f"{source}: unknown top-level field {', '.join(hints)}; valid: {', '.join(sorted(known))}")
    name = raw.get("name")
    if name is not None and (str(name).strip() in ("", ".", "..") or any(c in str(name) for c in "/\\\0")):
        raise ConfigError(f"{source}: name {name!r}: a recipe's name is a folder name (runs/NAME, and its runs in "
                          f"`kdistill compare`), so it cannot be empty, '.' or '..', or hold '/' or '\\' "
                          f"(e.g. my-distilbert)")
    recipe_name = raw.setdefault("name", Path(source).stem)  # a file without one: the file's name, and its run's
    if "output" not in raw:
        raw["output"] = f"runs/{recipe_name}"
    if raw["output"] is None or not str(raw["output"]).strip():  # `output:` with no value would be a folder "None"
        raise ConfigError(f"{source}: output is empty; give the run's folder (e.g. output: runs/my-run), or leave the "
                          f"field out for runs/{recipe_name}")
    if "synthesize" in raw and raw.get("stages"):
        raise ConfigError(f"{source}: synthesize: at the top level makes a one-stage recipe; with stages:, put "
                          "it inside the stage that synthesizes")
    defaults = {k: raw[k] for k in (*STAGE_FIELDS, "synthesize") if k in raw}
    blocks = raw.get("stages") or [{"name": "main"}]
    if not isinstance(blocks, list):
        raise ConfigError(f"{source}: stages must be a list of stage blocks, each with a name")
    stages = []
    for i, block in enumerate(blocks):
        prefix = f"stages[{i}]." if raw.get("stages") else ""
        if not isinstance(block, dict):
            raise ConfigError(f"{source}: {prefix.rstrip('.') or 'stages'} must be a mapping")
        # The shared defaults describe training; a synthesize stage is its own block alone.
        merged = copy.deepcopy(block) if "synthesize" in block else merge(defaults, block)
        replace_whole(merged, block, defaults)
        trained_before = any(s.synthesize is None for s in stages)
        if trained_before and "student" not in block:
            merged.pop("student", None)  # later stages continue from the previous stage's student
        try:
            stage = Stage.model_validate(merged)
        except ValidationError as err:
            raise ConfigError(format_validation(err, prefix.rstrip("."), source, Stage)) from None
        if stage.synthesize is None and stage.student is None and not trained_before:
            raise ConfigError(f"{source}: {prefix}student: the first training stage needs a student "
                              f"(from_teacher, config or model)")
        validate_losses(stage, prefix, source)
        if stage.synthesize is not None:
            validate_filter(stage, prefix, source)
        if stage.lion is not None:
            validate_lion(stage, prefix, source)
        stages.append(stage)
    names = [s.name for s in stages]
    for i, name in enumerate(names):
        # a stage's name is a folder and file name inside the run (checkpoints/NAME, NAME.jsonl)
        if not STAGE_NAME.fullmatch(name) or name in (".", ".."):
            raise ConfigError(f"{source}: stages[{i}].name {name!r}: a stage name becomes a folder inside the run, so "
                              f"it takes letters, digits, '_', '-' and '.' only (e.g. general, task-2)")
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: stage names must be unique, got {names}")
    check_stage_references(stages, bool(raw.get("stages")), source)
    check_precision_order(stages, source)
    try:
        return Recipe(name=recipe_name, output=str(raw["output"]), stages=stages)
    except ValidationError as err:
        raise ConfigError(format_validation(err, "", source, Recipe)) from None


SECRET_WORDS = ("key", "token", "secret", "password")


def shown_override(assignment: str) -> str:
    """An override as an error repeats it: its value left out where it may hold a credential."""
    path = assignment.partition("=")[0]
    in_url = re.search(r"://[^/@\s]+@|://\S*\?", assignment)  # user:token@host, or a query string
    credentials = in_url or any(word in assignment.lower() for word in SECRET_WORDS)
    return f"{path}=…" if credentials else assignment


def load_recipe(ref: str | Path | dict, overrides: list[str] | tuple[str, ...] = (), output: str | None = None) -> Recipe:
    """A validated Recipe from a file, a built-in name, or a dict, with `a.b=value` overrides applied."""
    if not isinstance(ref, (str, Path, dict)):
        raise ConfigError(f"a recipe is a built-in name, a YAML file path or a dict; got {type(ref).__name__} "
                          f"{ref!r} (`kdistill recipes` lists the names)")
    if not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"overrides are 'KEY=VALUE' strings (as --set takes), got {list(overrides)!r}")
    if isinstance(ref, dict):
        raw, source = copy.deepcopy(ref), "recipe"
    else:
        raw, source = read_recipe_file(ref)
        raw.setdefault("name", Path(source).stem)  # before --set joins the source's spelling
    for assignment in overrides:
        apply_override(raw, assignment)
    for assignment in overrides:
        check_not_shadowed(raw, assignment)
    if output is not None:
        raw["output"] = output
    if overrides:  # a bad value may be the override's, not the file's
        source = f"{source} with --set {' '.join(map(shown_override, overrides))}"
    return build_recipe(raw, source)
