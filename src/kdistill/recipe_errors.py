"""Recipe validation errors as messages: one line per bad field, with its path, the name probably meant, and what
its block takes."""
from __future__ import annotations

import re

from pydantic import ValidationError

from kdistill.errors import did_you_mean


def known_fields() -> list[str]:
    """Every field name of kdistill's recipe models (schema and loss parameters): a misspelt field is
    most often one of these."""
    from pydantic import BaseModel

    seen, stack, names = set(), [BaseModel], set()
    while stack:
        for cls in stack.pop().__subclasses__():
            if cls not in seen:
                seen.add(cls)
                stack.append(cls)
                if cls.__module__.startswith("kdistill"):
                    names.update(cls.model_fields)
    return sorted(names)


# names other training tools give these fields (transformers' TrainingArguments, most of them)
SYNONYMS = {"learning_rate": "lr", "max_steps": "steps", "num_steps": "steps", "train_batch_size": "batch_size",
            "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
            "warmup_ratio": "warmup", "lr_scheduler_type": "schedule", "scheduler": "schedule",
            "output_dir": "output", "mixed_precision": "precision", "eval_steps": "eval_every",
            "save_steps": "save_every", "logging_steps": "log_every", "save_total_limit": "keep_checkpoints",
            "tau": "temperature", "T": "temperature"}


def block_model(model, loc: tuple) -> type | None:
    """The schema class holding the field at `loc` (its last part), followed from `model` through the field
    types; None where a union or a free-form field leaves it open."""
    import typing

    from pydantic import BaseModel

    current = model
    for part in loc[:-1]:
        if not isinstance(part, str) or part.startswith(("function-", "list[", "literal[")):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        stack, models = [field.annotation], set()
        while stack:
            kind = stack.pop()
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                models.add(kind)
            stack += typing.get_args(kind)
        if len(models) != 1:
            return None
        current = models.pop()
    return current if isinstance(current, type) and hasattr(current, "model_fields") else None


def unknown_field(name: str, block: type | None) -> str:
    """The message for a field the schema does not take: the likely meant name, and what the block takes."""
    known = known_fields()
    takes = list(block.model_fields) if block is not None else known
    if SYNONYMS.get(name) in takes:
        hint = f"; did you mean {SYNONYMS[name]!r}?"
    else:
        hint = did_you_mean(name, takes, cutoff=0.6 if block is not None else 0.75)
    if hint:
        return "unknown field" + hint
    msg = ("unknown field here (other blocks or loss types take it, this one does not)" if name in known
           else "unknown field")
    return msg + (f"; this block takes: {', '.join(takes)}" if block is not None else "")


# the names pydantic gives a union's branches in an error's location: no field of the recipe
PYDANTIC_BRANCHES = ("function-", "list[", "literal[", "constrained-", "is-instance[", "union[", "nullable[",
                     "tagged-union[", "json-or-python[", "lax-or-strict[")


def field_path(prefix: str, loc: tuple) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith(PYDANTIC_BRANCHES) and part not in ("int", "float", "str", "bool"):
            path += f".{part}" if path else str(part)
    return path or "recipe"


def entry_message(e: dict, model: type | None) -> str:
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "model_type":  # "Input should be a valid dictionary or instance of DataSource"
        block = block_model(model, (*e["loc"], "")) if model is not None else None
        msg = "takes a mapping of fields" + (f" ({', '.join(block.model_fields)})" if block else "")
    if e["type"] == "extra_forbidden":
        return unknown_field(str(e["loc"][-1]), block_model(model, e["loc"]) if model is not None else None)
    if "input" in e and not isinstance(e["input"], (dict, list)) and e["type"] not in ("missing", "value_error"):
        msg += f" (got {e['input']!r})"
    if e["type"] == "literal_error" and isinstance(e.get("input"), str):  # "Input should be 'uniform' or 'last'"
        msg += did_you_mean(e["input"], re.findall(r"'([^']*)'", e.get("ctx", {}).get("expected", "")), cutoff=0.6)
    return msg


CONTAINERS = ("list_type", "model_type", "dict_type")


def union_noise(entries: list[tuple]) -> set[int]:
    """The lines a union field's other branches add (a field that takes one block or a list, a name or a list):
    pydantic reports every branch; the one the value was meant for is the useful one."""
    def below(path, other):
        return other.startswith((path + ".", path + "["))

    noise = set()
    for i, (path, kind, _, value) in enumerate(entries):
        others = [(p, k) for j, (p, k, _, _) in enumerate(entries) if j != i and (p == path or below(path, p))]
        if not others or kind == "value_error":
            continue
        if any(k == "value_error" and p == path for p, k in others):  # our own message says it
            noise.add(i)
        elif kind in CONTAINERS and any(below(path, p) for p, _ in others):  # it failed inside the block or list
            noise.add(i)
        elif kind == "literal_error" and isinstance(value, (list, dict)):  # no name could be a list
            noise.add(i)
        elif kind in CONTAINERS and isinstance(value, str) and any(k == "literal_error" for _, k in others):
            noise.add(i)  # a name, misspelt
    return noise


def format_validation(err: ValidationError, prefix: str, source: str, model: type | None = None,
                      what: str = "invalid recipe") -> str:
    """The errors of `model.model_validate` one per line, each with its field path; `model` lets an unknown field's
    message list what its block takes."""
    entries = [(field_path(prefix, e["loc"]), e["type"], entry_message(e, model), e.get("input")) for e in err.errors()]
    noise = union_noise(entries)
    entries = [entry for i, entry in enumerate(entries) if i not in noise]
    # one block or a list of them, and the value neither: one line for the two branches
    either = ({path for path, kind, _, _ in entries if kind == "list_type"}
              & {path for path, kind, _, _ in entries if kind in ("model_type", "dict_type")})
    lines = []
    for path, kind, msg, _ in entries:
        if path in either and kind in ("model_type", "dict_type"):
            continue
        if path in either and " (got" in msg:
            msg = "takes a mapping (one block) or a list of them" + msg[msg.index(" (got"):]
        lines.append(f"{path}: {msg}")
    return f"{source}: {what}\n  " + "\n  ".join(dict.fromkeys(lines))
