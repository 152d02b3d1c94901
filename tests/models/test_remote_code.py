"""A teacher with its own architecture code (trust_remote_code): refused unless the recipe trusts it, and then
trusted on every path that loads it, not only the first (the store's skeleton, the teacher server)."""
import json
import shutil

import pytest

from kdistill import distill
from kdistill.config import load_recipe
from kdistill.errors import KdistillError
from kdistill.teachers.cached import cache_teacher

CONFIG_CODE = """from transformers import GPT2Config


class TinyXConfig(GPT2Config):
    model_type = "tinyx"
"""
MODEL_CODE = """from transformers import GPT2LMHeadModel

from .configuration_tinyx import TinyXConfig


class TinyXForCausalLM(GPT2LMHeadModel):
    config_class = TinyXConfig
"""


@pytest.fixture
def custom_teacher(tiny_gpt2_dir, tmp_path):
    folder = tmp_path / "tinyx"
    shutil.copytree(tiny_gpt2_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tinyx", architectures=["TinyXForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tinyx.TinyXConfig",
                            "AutoModelForCausalLM": "modeling_tinyx.TinyXForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_tinyx.py").write_text(CONFIG_CODE)
    (folder / "modeling_tinyx.py").write_text(MODEL_CODE)
    return str(folder)


def lm_recipe(teacher, text_file, tmp_path, name, **teacher_fields):
    return {"name": "lm", "teacher": {"model": teacher, **teacher_fields}, "student": {"config": {"n_layer": 1}},
            "data": {"train": {"path": text_file, "text": "sentence", "limit": 8}, "max_length": 24},
            "losses": [{"type": "logit_kd"}], "train": {"steps": 1, "batch_size": 4}, "output": str(tmp_path / name)}


def test_a_trusted_custom_teacher_trains_live_and_from_its_store(custom_teacher, text_file, tmp_path):
    with pytest.raises(KdistillError, match="custom code"):
        distill(lm_recipe(custom_teacher, text_file, tmp_path, "untrusted"), progress=False)
    recipe = lm_recipe(custom_teacher, text_file, tmp_path, "live", trust_remote_code=True)
    assert (distill(recipe, progress=False) / "config.json").exists()
    store = cache_teacher(load_recipe(recipe), k=4, out=str(tmp_path / "store"))
    from_store = {**recipe, "teacher": {"source": "cache", "path": str(store), "trust_remote_code": True},
                  "output": str(tmp_path / "from-store")}
    assert (distill(from_store, progress=False) / "config.json").exists()
    assert (store / "teacher" / "modeling_tinyx.py").exists()  # what the skeleton above was built from


def test_the_teacher_server_loads_a_custom_teacher_when_trusted(custom_teacher):
    from kdistill.api.server import TeacherServer

    with pytest.raises(KdistillError, match="custom code"):
        TeacherServer(custom_teacher, port=0)
    server = TeacherServer(custom_teacher, port=0, trust_remote_code=True)
    assert type(server.model).__name__ == "TinyXForCausalLM"
