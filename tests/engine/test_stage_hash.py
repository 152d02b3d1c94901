"""A checkpoint is tied to its stage by a hash; a field added later with its default must not change it."""
import copy

from kdistill.engine.loop import stage_hash
from kdistill.recipe_loading import build_recipe


def test_default_valued_fields_leave_the_hash_alone(tiny_recipe):
    explicit = copy.deepcopy(tiny_recipe)
    explicit["losses"][1]["skip_cls"] = False  # the default, written out as an older recipe would not
    changed = copy.deepcopy(tiny_recipe)
    changed["losses"][1]["skip_cls"] = True
    base, same, other = (stage_hash(build_recipe(r, "test").stages[0]) for r in (tiny_recipe, explicit, changed))
    assert base == same
    assert base != other
