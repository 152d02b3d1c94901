"""The recipes of a comparison's variants (compare-pad, compare-lion): the caller's overrides routed to each variant
and checked before anything trains, leaving to the comparison the fields it sets itself."""
from __future__ import annotations

from kdistill.config import Recipe, load_recipe
from kdistill.errors import ConfigError


def split_overrides(sets, variants, command: str) -> dict[str, list[str]]:
    """A comparison's overrides, per variant. `K=V` goes to every variant, `VARIANT:K=V` to that one only (their
    stages can differ: pad and pad-unfiltered train in stages.1, pad-direct in its one stage); a dict
    {variant: [K=V]} is taken as routed. Checked before anything trains."""
    if isinstance(sets, dict):
        unknown = [name for name in sets if name not in variants]
        if unknown:
            raise ConfigError(f"overrides: {unknown[0]!r} is not a variant of {command}; use one of "
                              f"{', '.join(variants)}")
        routed = {name: sets.get(name) or [] for name in variants}
    elif isinstance(sets, (list, tuple)):
        routed = {name: [] for name in variants}
        for item in sets:
            key = str(item).partition("=")[0]
            name, colon, field = key.partition(":")
            if not colon:
                for wanted in routed.values():
                    wanted.append(item)
            elif name in routed:
                routed[name].append(item[len(name) + 1:])
            else:
                raise ConfigError(f"--set {item}: {name!r} is not a variant of {command}; use one of "
                                  f"{', '.join(variants)} (VARIANT:{field}=...), or leave the prefix out for every "
                                  f"variant")
    else:
        routed = {"": sets}  # refused just below, with the shape it takes
    for name, items in routed.items():
        if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
            raise ConfigError(f"overrides: a list of 'KEY=VALUE' strings (VARIANT:KEY=VALUE for one variant), or a "
                              f"dict {{variant: [KEY=VALUE, ...]}}; got {items!r}")
    return {name: list(items) for name, items in routed.items()}


def variant_with_overrides(name: str, sets: list[str], command: str, owned: tuple[str, ...], what: str,
                           output: str | None = None) -> Recipe:
    """The built-in recipe `name` with its overrides; a field in `owned` (at any stage) is the comparison's own, and
    a refusal names the variant (the same --set can suit one, not another)."""
    for item in sets:
        key = item.partition("=")[0].strip()
        if any(key == field or key.endswith("." + field) for field in owned):
            raise ConfigError(f"--set {item}: {command} sets each run's {what} itself (--output, --seeds)")
    try:
        return load_recipe(name, sets, output=output)
    except ConfigError as err:
        raise ConfigError(f"variant {name}: {err}") from None
