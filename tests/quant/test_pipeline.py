"""Quantization-aware recipes end to end on a tiny classifier: precision per stage, ternary -> binary
splitting between stages, a finished stage teaching the next, resume mid-pipeline, packed export."""
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdistill import distill
from kdistill.cli import app
from kdistill.compare import evaluation_points
from kdistill.config import load_recipe
from kdistill.errors import ConfigError
from kdistill.models.loading import load_model
from kdistill.quant import QuantLinear

LABELS = ("red", "green", "blue")


@pytest.fixture
def pipeline(tmp_path, make_classifier):
    teacher = make_classifier(tmp_path / "teacher")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"a {w} thing number {i}", "y": w}) + "\n"
                            for i in range(8) for w in LABELS))
    kd = [{"type": "logit_kd", "temperature": 1.0, "divergence": "soft_ce"}, {"type": "hidden_mse", "projector": "none"}]
    return {
        "name": "tiny-binarybert", "teacher": {"model": teacher},
        "student": {"from_teacher": {"layers": [1, 2, 3, 4]}},
        "data": {"train": {"path": str(data), "label": "y"}, "eval": {"path": str(data), "label": "y"}, "max_length": 16},
        "losses": kd, "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "save_every": 1},
        "stages": [{"name": "fp"},
                   {"name": "ternary", "quant": {"weights": 2, "activations": 8}},
                   {"name": "binary", "quant": {"weights": 1, "activations": 8}},
                   {"name": "w1a1", "quant": {"weights": 1, "activations": 1}, "teacher": {"model": "stage:binary"}}],
        "output": str(tmp_path / "run"),
    }


def weights(student_dir):
    return load_model(str(student_dir), "classification").model.state_dict()


def test_each_stage_trains_at_its_precision(pipeline):
    student = distill(pipeline, progress=False)
    run = Path(pipeline["output"])
    ternary = load_model(str(run / "stages" / "ternary" / "student"), "classification").model
    layer = ternary.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, QuantLinear) and layer.weight_bits == 2 and not layer.is_split
    final = load_model(str(student), "classification").model
    layer = final.bert.encoder.layer[0].attention.self.query
    assert layer.weight_bits == 1 and layer.is_split and layer.activation_bits == 1
    meta = json.loads((student / "kdistill.json").read_text())
    assert meta["teacher"].endswith("stages/binary/student")  # the W1A8 student taught the W1A1 one
    recipe = load_recipe(pipeline)
    assert evaluation_points(recipe) == [(" [FP32]", 0), (" [W2A8]", 1), (" [W1A8]", 2), (" [W1A1]", 3)]


def test_resume_mid_pipeline_continues_at_the_right_stage_and_precision(pipeline, tmp_path, killed_run):
    straight = distill({**pipeline, "output": str(tmp_path / "straight")}, progress=False)
    killed = {**pipeline, "output": str(tmp_path / "killed")}
    killed_run(killed, step=2, stage="binary")  # dies inside the first binary stage, after a checkpoint
    assert (tmp_path / "killed" / "stages" / "ternary" / "student").exists()
    assert not (tmp_path / "killed" / "stages" / "binary" / "student").exists()
    resumed = distill(killed, resume=True, progress=False)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and any("weight_split" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_teacher_must_name_an_earlier_stage(pipeline):
    pipeline["stages"][1]["teacher"] = {"model": "stage:w1a1"}
    with pytest.raises(ConfigError, match=r"stages\[1\]\.teacher\.model.*earlier stage"):
        load_recipe(pipeline)


def test_bad_precision_names_the_field(pipeline):
    pipeline["stages"][1]["quant"] = {"weights": 3}
    with pytest.raises(ConfigError, match=r"quant\.weights"):
        load_recipe(pipeline)


def test_cli_packed_export(pipeline, tmp_path):
    pipeline["stages"] = pipeline["stages"][:3]
    student = distill(pipeline, progress=False)
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(Path(pipeline["output"])), str(tmp_path / "packed"), "--packed"])
    assert result.exit_code == 0, result.output
    assert "packed" in result.output and (tmp_path / "packed" / "model.packed.safetensors").exists()
    assert "replacing" not in result.output
    again = runner.invoke(app, ["export", str(Path(pipeline["output"])), str(tmp_path / "packed"), "--packed"])
    said = " ".join(again.output.split())
    assert again.exit_code == 0 and f"replacing the earlier export in {tmp_path / 'packed'}" in said
    original = load_model(str(student), "classification")
    packed = load_model(str(tmp_path / "packed"), "classification").model
    batch = dict(original.tokenizer(["a red thing number 3"], return_tensors="pt"))
    assert torch.allclose(packed(**batch).logits, original.model(**batch).logits, atol=1e-5)
    refused = runner.invoke(app, ["export", str(Path(pipeline["output"]) / "stages" / "fp" / "student"),
                                  str(tmp_path / "p2"), "--packed"])
    assert refused.exit_code == 2 and "not a quantized student" in refused.output
    missing = runner.invoke(app, ["export", str(tmp_path / "nothing"), str(tmp_path / "p3")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    into_run = runner.invoke(app, ["export", str(Path(pipeline["output"])), str(Path(pipeline["output"])), "--packed"])
    assert into_run.exit_code == 2 and "holds it" in into_run.output and student.exists()


def test_a_precision_order_the_engine_cannot_train_is_refused_when_the_recipe_is_read():
    from kdistill.config import load_recipe
    from kdistill.errors import ConfigError

    base = {"name": "q", "output": "/tmp/q", "student": {"from_teacher": {"layers": [1]}},
            "teacher": {"model": "packaged:all-MiniLM-L6-v2", "task": "classification"},
            "data": {"train": {"source": "wordnet-supersense"}}, "losses": [{"type": "cross_entropy"}]}

    def stages(*quants):
        return {**base, "stages": [{"name": f"s{i}", **({"quant": q} if q else {})} for i, q in enumerate(quants)]}

    w2, w1 = {"weights": 2, "activations": 8}, {"weights": 1, "activations": 8}
    load_recipe(stages(None, w2, w1))  # full precision, ternary, then split to binary: BinaryBERT's order
    with pytest.raises(ConfigError, match=r"stages\[2\].quant: stages\[1\] quantized the student"):
        load_recipe(stages(None, w1, None))  # it stayed quantized, whatever the stage seemed to say
    with pytest.raises(ConfigError, match=r"stages\[2\].quant.weights: an earlier stage split .* cannot become 2-bit"):
        load_recipe(stages(w2, w1, w2))  # refused after two stages had trained, before


def test_a_later_stage_that_cannot_quantize_the_student_is_refused_before_the_first_trains(tiny_gpt2_dir, text_file,
                                                                                          tmp_path):
    from kdistill.errors import PairingError

    recipe = {"name": "q-gpt2", "teacher": {"model": tiny_gpt2_dir}, "student": {"from_teacher": {"layers": [1]}},
              "data": {"train": {"path": text_file, "text": "sentence"}, "max_length": 16},
              "losses": [{"type": "logit_kd"}], "train": {"steps": 2, "batch_size": 4},
              "stages": [{"name": "fp"}, {"name": "q", "quant": {"weights": 1, "activations": 8}}],
              "output": str(tmp_path / "run")}
    with pytest.raises(PairingError, match=r"stages\[1\]\.quant: GPT2LMHeadModel has no nn.Linear layers"):
        distill(recipe)
    assert not (tmp_path / "run" / "stages").exists()  # the fp stage never trained
