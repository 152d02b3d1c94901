"""The reference tables in docs/ name every field of every registered part, each with its default: a field added to a
params model without a line in the docs fails here."""
from pathlib import Path

import pytest

from kdistill.api.filters import FILTERS
from kdistill.api.instruction_writers import WRITERS
from kdistill.api.referees import REFEREES
from kdistill.losses import LOSSES

DOCS = Path(__file__).resolve().parents[1] / "docs"
COMMON = ("type", "weight", "name")  # every loss takes these; recipes.md says so once
FREE_TEXT = ("system", "template")  # long prompts: the docs say what they hold, not the text


def table_row(doc: str, first_cell: str) -> str:
    rows = [line for line in (DOCS / doc).read_text().splitlines()
            if line.startswith("|") and first_cell in line.split("|")[1]]
    assert len(rows) == 1, f"{doc}: expected one table row for {first_cell}, found {len(rows)}"
    return rows[0]


def undocumented(params, row: str) -> list[str]:
    """Fields the row leaves out, or names without a default in brackets after them."""
    missing = []
    for field in params.model_fields:
        if field in COMMON or (field in FREE_TEXT and f"`{field}`" in row):
            continue
        if f"`{field}` (" not in row and f"`{field}` ({field}" not in row:
            missing.append(field)
    return missing


@pytest.mark.parametrize("name", LOSSES.names())
def test_each_loss_parameter_is_in_the_recipe_reference_with_its_default(name):
    row = table_row("recipes.md", f"`{name}`")
    assert undocumented(LOSSES.get(name).Params, row) == []


@pytest.mark.parametrize("registry, kind", [(REFEREES, "referee"), (WRITERS, "writer")])
def test_each_lion_part_field_is_in_lion_md_with_its_default(registry, kind):
    for name in registry.names():
        row = table_row("lion.md", f"{kind} `{name}`")
        assert undocumented(registry.get(name).Params, row) == [], name


def test_the_loss_table_defaults_are_the_models_defaults():
    # a default the docs give that the code no longer has is as wrong as a missing one; checked for the scalars
    import re

    wrong = []
    for name in LOSSES.names():
        row = table_row("recipes.md", f"`{name}`")
        for field, info in LOSSES.get(name).Params.model_fields.items():
            match = re.search(rf"`{field}` \(([-\w.]+)", row)
            if match and isinstance(info.default, (int, float)) and not isinstance(info.default, bool):
                try:
                    if float(match.group(1)) != float(info.default):
                        wrong.append(f"{name}.{field}: docs {match.group(1)}, code {info.default}")
                except ValueError:
                    pass
    assert wrong == []


def yaml_snippets():
    import re

    import yaml

    found = []
    for path in sorted(DOCS.rglob("*.md")) + [DOCS.parent / "README.md"]:
        for i, match in enumerate(re.finditer(r"```yaml\n(.*?)```", path.read_text(), re.S)):
            snippet = yaml.safe_load(match.group(1))
            if isinstance(snippet, dict):
                found.append(pytest.param(snippet, id=f"{path.name}-{i}"))
    return found


@pytest.mark.parametrize("snippet", yaml_snippets())
def test_every_recipe_snippet_in_the_docs_validates(snippet):
    # a whole recipe as written, or a fragment (teacher/student, stages, quant) laid over a plain one
    from kdistill.config import load_recipe

    base = {"name": "t", "teacher": {"model": "packaged:all-MiniLM-L6-v2"},
            "student": {"from_teacher": {"layers": [1, 3, 5]}}, "data": {"train": {"source": "stdlib-docstrings"}},
            "losses": [{"type": "hidden_mse"}], "train": {"steps": 10}, "output": "runs/t"}
    load_recipe(snippet if "name" in snippet else {**base, **snippet})


def test_every_train_on_policy_and_quant_field_is_in_the_recipe_reference():
    # the blocks a recipe sets most: a field added to their models without a word in recipes.md fails here
    from kdistill.config import OnPolicyConfig, QuantConfig, TrainConfig

    text = (DOCS / "recipes.md").read_text()
    train = text.split("\ntrain:", 1)[1].split("\noutput:", 1)[0]  # the reference's train block
    missing = [f"train.{f}" for f in TrainConfig.model_fields if f"  {f}:" not in train and f"# {f}:" not in train]
    for block, model in (("on_policy", OnPolicyConfig), ("quant", QuantConfig)):
        assert f"{block}: {{" in text, block
        fields = text.split(f"{block}: {{", 1)[1].split("}", 1)[0]
        missing += [f"{block}.{f}" for f in model.model_fields if f not in fields]
    assert missing == []


def test_the_train_block_defaults_in_the_recipe_reference_are_the_models_defaults():
    # "# ...; default X" beside a field of the reference's train block
    import re

    from kdistill.config import TrainConfig

    block = (DOCS / "recipes.md").read_text().split("\ntrain:", 1)[1].split("\noutput:", 1)[0]
    stated = dict(re.findall(r"^\s+(\w+): .*default ([-\w.]+)", block, re.M))
    assert {"steps", "lr", "warmup", "schedule", "eval_every", "save_every"} <= set(stated)
    for field, value in stated.items():
        default = TrainConfig.model_fields[field].default
        assert (None if value == "none" else value) == default or (
            isinstance(default, (int, float)) and float(value) == float(default)), field
