"""Every built-in recipe runs a couple of steps end to end, on tiny random stand-ins for its teachers."""
import copy
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel,
                          ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification)

from kdistill import distill
from kdistill.config import builtin_recipes
from kdistill.data.corpora import WORDNET_SUPERSENSES

pytestmark = pytest.mark.skipif(not __import__("os").path.exists("/usr/share/wordnet/data.noun"),
                                reason="wordnet-base not installed")


def tiny_config(tokenizer, **extra):
    return BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=96, max_position_embeddings=128, **extra)


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("standins")
    labels = sorted(WORDNET_SUPERSENSES)
    base = _save(BertModel(tiny_config(tokenizer)), tokenizer, root / "base")
    head = tiny_config(tokenizer, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={n: i for i, n in enumerate(labels)})
    classifier = _save(BertForSequenceClassification(head), tokenizer, root / "classifier")
    lm = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=48, n_layer=6, n_head=4, n_positions=128,
                    bos_token_id=101, eos_token_id=102, pad_token_id=0)
    causal = _save(GPT2LMHeadModel(lm), tokenizer, root / "causal-lm")
    digits = {"num_labels": 10, "id2label": {i: str(i) for i in range(10)}, "label2id": {str(i): i for i in range(10)}}
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=48,
                                              num_hidden_layers=6, num_attention_heads=3, intermediate_size=96, **digits))
    vit.save_pretrained(root / "vit")
    cnn = ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                    layer_type="basic", **digits))
    cnn.save_pretrained(root / "cnn")
    IMAGE_STAND_INS.update({"vit": str(root / "vit"), "cnn": str(root / "cnn")})
    return base, classifier, causal


# Image teachers: a ViT or a convnet classifier over the ten digits (students keep their small blueprints).
IMAGE_STAND_INS = {}
IMAGE_TEACHERS = {"recipe:vit-teacher": "vit", "blueprint:vit-6x192-p4": "vit", "recipe:cnn-teacher": "cnn",
                  "blueprint:resnet-small": "cnn"}


def stand_in(ref, base, classifier, causal):
    if ref.startswith("stage:"):
        return ref  # an earlier stage's student stays what it is
    if ref in IMAGE_TEACHERS:
        return IMAGE_STAND_INS[IMAGE_TEACHERS[ref]]
    if ref.startswith(("blueprint:", "recipe:lm-", "recipe:pad-")):
        return causal
    return classifier if ref.startswith("recipe:") else base


def shrink(node, base, classifier, causal):
    """Point teachers at the stand-ins, limit every data source, and cut every stage to 2 steps."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "synthesize" and isinstance(value, dict):
                # a few prompts and short samples; a random stand-in writes no program that prints the
                # answer, so keep every candidate (filter: none) for the next stage to train on
                value["prompts"]["limit"] = 4
                value.update(candidates=2, filter={"type": "none"})
                value.setdefault("sampling", {})["max_new_tokens"] = 8
                shrink(value, base, classifier, causal)
            elif key == "lion" and isinstance(value, dict):
                # two short rounds on a few instructions (the writers and referees are tested in tests/api/test_lion.py)
                value.update(rounds=2, seed_instructions=4, new_instructions=4, eval_limit=4)
                value.setdefault("answers", {})["max_new_tokens"] = 8
                shrink(value, base, classifier, causal)
            elif key == "teacher" and isinstance(value, dict):
                value["model"] = stand_in(str(value.get("model", "")), base, classifier, causal)
            elif key == "from_teacher" and isinstance(value, dict):
                if "model" in value:
                    value["model"] = base
                if "hidden_size" in value:  # a cut of the 48-wide, 12-head stand-in: half of each head
                    value.update(hidden_size=24, intermediate_size=48)
            elif key in ("train", "eval") and isinstance(value, (dict, list)) and (
                    "source" in str(value) or "path" in str(value)):
                for spec in value if isinstance(value, list) else [value]:
                    spec["limit"] = 24
            elif key == "train" and isinstance(value, dict) and "steps" in value:
                value.update(steps=2, batch_size=4, eval_every=None, save_every=None)
            else:
                shrink(value, base, classifier, causal)
    elif isinstance(node, list):
        for item in node:
            shrink(item, base, classifier, causal)


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_builtin_recipe_runs_on_stand_ins(name, teachers, tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))  # blueprints and teacher stores made here
    raw = yaml.safe_load(builtin_recipes()[name].read_text())
    raw = copy.deepcopy(raw)
    shrink(raw, *teachers)
    raw["output"] = str(tmp_path / name)
    student = distill(raw, progress=False)
    assert (student / "kdistill.json").exists() and (student / "config.json").exists()
    if name in SUPERSENSE_STUDENTS:  # loads as a standard classifier that names its 45 classes
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(student)
        assert sorted(model.config.id2label.values()) == sorted(WORDNET_SUPERSENSES)
        assert model.config.num_hidden_layers == SUPERSENSE_STUDENTS[name]


# the encoder recipes' students (layers, from the 6-layer stand-in teacher)
SUPERSENSE_STUDENTS = {"teacher-supersense": 6, "supersense-kd": 3, "distilbert": 3, "minilm": 3, "minilmv2": 3,
                       "prokt": 3, "theseus": 3, "tinybert": 3, "mobilebert": 6}


@pytest.mark.parametrize("name,stage", [("tinybert", "task-intermediate"), ("theseus", "successors")])
def test_a_multi_stage_builtin_recipe_killed_mid_stage_resumes_to_the_same_weights(name, stage, teachers, tmp_path,
                                                                                   monkeypatch, killed_run):
    from safetensors.torch import load_file

    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    raw = copy.deepcopy(yaml.safe_load(builtin_recipes()[name].read_text()))
    shrink(raw, *teachers)
    for block in [raw["train"]] + [s["train"] for s in raw["stages"] if "train" in s]:
        block.update(steps=3, save_every=1)
    straight = distill({**raw, "output": str(tmp_path / "straight")}, progress=False)
    killed_run({**raw, "output": str(tmp_path / "killed")}, step=2, stage=stage)
    resumed = distill({**raw, "output": str(tmp_path / "killed")}, resume=True, progress=False)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_docs_a_recipe_points_to_exist(name):
    for ref in re.findall(r"docs/[\w/.-]+\.md", builtin_recipes()[name].read_text()):
        assert (DOCS.parent / ref).is_file(), f"{name}.yaml refers to {ref}, which does not exist"


# recipe -> (the overview page that links it, its own page beside it)
RECIPE_PAGES = {
    **{name: ("encoders", name) for name in ["teacher-supersense", "supersense-kd", "distilbert", "tinybert",
                                              "mobilebert", "minilm", "theseus", "prokt"]},
    "minilmv2": ("encoders", "minilm"),
    **{name: ("causal-lm", "lm-sft-and-lm-kd") for name in ["lm-sft", "lm-kd"]},
    **{name: ("causal-lm", name) for name in ["seqkd", "gkd", "minillm", "distillm", "taid"]},
    **{name: ("causal-lm", "tvd-and-js") for name in ["tvd", "js"]},
}


@pytest.mark.parametrize("name", sorted(RECIPE_PAGES))
def test_each_encoder_and_causal_lm_recipe_has_its_page_linked_from_the_overview(name):
    overview, page = RECIPE_PAGES[name]
    assert name in builtin_recipes() and (DOCS / overview / f"{page}.md").is_file()
    assert f"[`{name}`]({overview}/{page}.md)" in (DOCS / f"{overview}.md").read_text()
