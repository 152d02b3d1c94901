"""A teacher with its own architecture code (trust_remote_code): refused unless the recipe trusts it, and then
trusted on every path that loads it, not only the first (the store's skeleton, the teacher server)."""
import json
import shutil
from pathlib import Path

import pytest

from kdistill import distill
from kdistill.config import load_recipe
from kdistill.errors import KdistillError
from kdistill.teachers.store_build import cache_teacher

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
    with pytest.raises(KdistillError, match="custom code") as refused:
        distill(lm_recipe(custom_teacher, text_file, tmp_path, "untrusted"), progress=False)
    assert "set trust_remote_code: true under the recipe's teacher" in str(refused.value)
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


def test_the_next_stage_loads_the_student_of_a_trusted_custom_teacher(custom_teacher, text_file, tmp_path):
    recipe = lm_recipe(custom_teacher, text_file, tmp_path, "two", trust_remote_code=True)
    step = {"losses": recipe.pop("losses"), "train": recipe.pop("train")}
    recipe["stages"] = [{"name": "first", **step}, {"name": "second", **step}]
    student = distill(recipe, progress=False)  # the second stage starts from the first one's saved student
    assert (student / "modeling_tinyx.py").exists()
    assert json.loads((student / "config.json").read_text())["architectures"] == ["TinyXForCausalLM"]


BERT_CODE = {"configuration_tinyb.py": """from transformers import BertConfig


class TinyBConfig(BertConfig):
    model_type = "tinyb"
""", "modeling_tinyb.py": """from transformers import BertForSequenceClassification

from .configuration_tinyb import TinyBConfig


class TinyBForSequenceClassification(BertForSequenceClassification):
    config_class = TinyBConfig
"""}


@pytest.fixture
def custom_classifier(make_classifier, tmp_path):
    teacher = Path(make_classifier(tmp_path / "teacher"))
    config = json.loads((teacher / "config.json").read_text())
    config.update(model_type="tinyb", architectures=["TinyBForSequenceClassification"],
                  auto_map={"AutoConfig": "configuration_tinyb.TinyBConfig",
                            "AutoModelForSequenceClassification": "modeling_tinyb.TinyBForSequenceClassification"})
    (teacher / "config.json").write_text(json.dumps(config))
    for name, code in BERT_CODE.items():
        (teacher / name).write_text(code)
    return teacher


def test_compare_scores_the_students_of_a_trusted_custom_teacher(custom_classifier, tmp_path):
    import yaml

    from kdistill.compare import compare

    teacher = custom_classifier
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} thing {i}", "y": w}) + "\n"
                            for i in range(4) for w in ("red", "green", "blue")))
    recipe = {"name": "custom-kd", "teacher": {"model": str(teacher), "trust_remote_code": True},
              "student": {"from_teacher": {"layers": [2, 4]}},
              "data": {"train": {"path": str(data), "label": "y"}, "eval": {"path": str(data), "label": "y"},
                       "max_length": 16},
              "losses": [{"type": "logit_kd"}], "train": {"steps": 1, "batch_size": 4}}
    path = tmp_path / "custom-kd.yaml"
    path.write_text(yaml.safe_dump(recipe))
    report = compare([str(path)], seeds=1, output=str(tmp_path / "runs"), results=str(tmp_path / "results.md"))
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) >= {"custom-kd", "custom-kd-baseline"}
    assert all(len(rows[name]["score"]) == 1 for name in ("custom-kd", "custom-kd-baseline"))
    assert rows["custom-kd"]["unseen"] and rows["custom-kd"]["speedup"] is not None


def test_kdistill_eval_runs_a_custom_architecture_only_when_trusted(custom_classifier, tmp_path):
    from typer.testing import CliRunner

    from kdistill.cli import app

    data = tmp_path / "labelled.csv"
    data.write_text("sentence,colour\n" + "".join(f"a {c} thing {i},{c}\n" for i in range(3) for c in ("red", "blue")))
    args = ["eval", "--student", str(custom_classifier), "--data", str(data), "--text", "sentence", "--label",
            "colour", "--no-speed", "--output", str(tmp_path / "r.json")]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "custom code" in refused.output and not (tmp_path / "r.json").exists()
    trusted = CliRunner().invoke(app, args + ["--trust-remote-code"])
    assert trusted.exit_code == 0, trusted.output
    assert json.loads((tmp_path / "r.json").read_text())["datasets"][str(data)]["n"] == 6
