"""BERT-of-Theseus module replacement: the schedule, which blocks run, and the exported successor-only model."""
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from kdistill.config import Theseus
from kdistill.errors import PairingError
from kdistill.models.theseus import TheseusLayers, build_theseus, successor_only


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


BATCH = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}


def test_schedule_rises_linearly_to_one():
    layers = TheseusLayers([torch.nn.Linear(2, 2)], [[torch.nn.Linear(2, 2)]], start=0.5, full_at_step=100)
    assert layers.replace_rate == 0.5
    layers.after_step(40, 125)
    assert layers.replace_rate == pytest.approx(0.5 + 0.5 * 40 / 100)
    layers.after_step(150, 125)
    assert layers.replace_rate == 1.0
    fresh = TheseusLayers([torch.nn.Linear(2, 2)], [[torch.nn.Linear(2, 2)]], start=0.5, full_at_step=100)
    fresh.load_method_state(layers.method_state())
    assert fresh.replace_rate == 1.0


def test_each_module_draws_on_its_own_and_the_rate_reaches_one_at_full_at(teacher):
    # the paper's Bernoulli(p) per module and forward pass: at p = 0.5 each module is replaced about half the time,
    # and the two modules agree only about half the time (one shared draw would make them always agree)
    hybrid = build_theseus(Theseus(modules=2, start=0.5, full_at=0.8), teacher, steps=100)
    layers = hybrid.bert.encoder.layer
    successors = [layers[0], layers[1]]
    hybrid.train()
    torch.manual_seed(1)
    runs = [list(layers) for _ in range(2000)]  # the blocks of 2,000 forward passes
    picks = [[any(s is block for block in run) for s in successors] for run in runs]
    replaced = [sum(p[i] for p in picks) / len(picks) for i in range(2)]
    agree = sum(p[0] == p[1] for p in picks) / len(picks)
    assert replaced == pytest.approx([0.5, 0.5], abs=0.04) and agree == pytest.approx(0.5, abs=0.04)
    assert layers.full_at_step == 80  # full_at x steps
    layers.after_step(40, 100)
    assert layers.replace_rate == pytest.approx(0.75)
    layers.after_step(80, 100)
    assert layers.replace_rate == 1.0


def test_which_blocks_run(teacher):
    hybrid = build_theseus(Theseus(modules=2, start=0.0), teacher, steps=10)
    layers = hybrid.bert.encoder.layer
    assert len(layers) == 2 and hybrid.config.num_hidden_layers == 2
    with torch.no_grad():
        reference = teacher(**BATCH).logits
        hybrid.train()
        layers.replace_rate = 0.0  # every module keeps its predecessor blocks: the teacher itself
        torch.testing.assert_close(hybrid(**BATCH).logits, reference)
        layers.replace_rate = 1.0
        only_successors = hybrid(**BATCH).logits
        hybrid.eval()  # eval runs the successors whatever the rate
        torch.testing.assert_close(hybrid(**BATCH).logits, only_successors)
    # predecessors are frozen; successors, embeddings and head train
    trainable = {n for n, p in hybrid.named_parameters() if p.requires_grad}
    assert not any("predecessors" in n for n in trainable) and any(n.startswith("bert.encoder.layer.0.") for n in trainable)


def test_successors_start_as_the_top_block_of_each_group(teacher):
    hybrid = build_theseus(Theseus(modules=2), teacher, steps=10)
    torch.testing.assert_close(hybrid.bert.encoder.layer[1].output.dense.weight,
                               teacher.bert.encoder.layer[3].output.dense.weight)


def test_successors_first_copy_the_teachers_first_blocks(teacher):
    """The paper's code starts successor i as teacher block i; its baseline is that same layer subset."""
    from kdistill.compare_runs import baseline_of
    from kdistill.recipe_loading import load_recipe

    hybrid = build_theseus(Theseus(modules=2, successors="first"), teacher, steps=10)
    for i in range(2):
        torch.testing.assert_close(hybrid.bert.encoder.layer[i].output.dense.weight,
                                   teacher.bert.encoder.layer[i].output.dense.weight)
    recipe = load_recipe({
        "name": "t", "teacher": {"model": "packaged:all-MiniLM-L6-v2"},
        "student": {"theseus": {"modules": 3, "successors": "first"}},
        "data": {"train": {"source": "wordnet-supersense"}}, "losses": [{"type": "cross_entropy"}]})
    assert baseline_of(recipe).stages[0].student.from_teacher.layers == [1, 2, 3]


def test_successors_from_another_model_and_their_baseline_start_alike(teacher, tmp_path):
    """`layers_from`: the successors copy another model's blocks (a pretrained checkpoint), the rest stays the
    teacher's; the baseline compare builds from the option is that very student, weight for weight."""
    from kdistill.compare_runs import baseline_of
    from kdistill.config import StudentConfig
    from kdistill.models.student import build_student

    torch.manual_seed(1)
    donor = BertForSequenceClassification(teacher.config).eval()  # another model of the same architecture
    donor.save_pretrained(tmp_path / "donor")
    spec = Theseus(modules=2, layers_from=str(tmp_path / "donor"))
    hybrid = build_student(StudentConfig(theseus=spec), teacher, "classification", seed=0, steps=10)
    for i, block in enumerate((donor.bert.encoder.layer[1], donor.bert.encoder.layer[3])):
        torch.testing.assert_close(hybrid.bert.encoder.layer[i].output.dense.weight, block.output.dense.weight)
    torch.testing.assert_close(hybrid.bert.encoder.layer.predecessors[1][1].output.dense.weight,
                               teacher.bert.encoder.layer[3].output.dense.weight)
    torch.testing.assert_close(hybrid.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)

    recipe = load_recipe_with(StudentConfig(theseus=spec))
    base_spec = baseline_of(recipe).stages[0].student
    assert base_spec.from_teacher.layers_from == str(tmp_path / "donor")
    base = build_student(base_spec, teacher, "classification", seed=0)
    exported = successor_only(hybrid).state_dict()
    assert exported.keys() == base.state_dict().keys()
    for key, value in base.state_dict().items():
        torch.testing.assert_close(exported[key], value, msg=key)


def load_recipe_with(student):
    from kdistill.recipe_loading import load_recipe

    return load_recipe({"name": "t", "teacher": {"model": "packaged:all-MiniLM-L6-v2"},
                        "student": student.model_dump(exclude_none=True),
                        "data": {"train": {"source": "wordnet-supersense"}}, "losses": [{"type": "cross_entropy"}]})


def test_export_is_a_plain_shallow_model(teacher, tmp_path):
    hybrid = build_theseus(Theseus(modules=2), teacher, steps=10).eval()
    with torch.no_grad():
        expected = hybrid(**BATCH).logits
    plain = successor_only(hybrid)
    plain.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(**BATCH).logits, expected)


def test_modules_must_divide_the_layers(teacher):
    with pytest.raises(PairingError, match="does not divide"):
        build_theseus(Theseus(modules=3), teacher, steps=10)


def teacher_and_data(tmp_path, tokenizer):
    """A 4-layer, 2-label teacher saved in tmp_path/teacher and 16 labeled records; returns the data path."""
    import json

    torch.manual_seed(0)
    labels = ["a", "b"]
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=32, num_labels=2, id2label=dict(enumerate(labels)),
                        label2id={n: i for i, n in enumerate(labels)})
    BertForSequenceClassification(config).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"word {i}", "label": labels[i % 2]}) + "\n" for i in range(16)))
    return data


def test_theseus_run_resumes_exactly(tmp_path, tokenizer, killed_run):
    """The replacement draws and the rate are restored on resume: same weights as an uninterrupted run."""
    import json

    from safetensors.torch import load_file

    from kdistill import distill

    data = teacher_and_data(tmp_path, tokenizer)
    recipe = {"name": "th", "teacher": {"model": str(tmp_path / "teacher")},
              "student": {"theseus": {"modules": 2, "start": 0.3, "full_at": 1.0}},
              "data": {"train": {"path": str(data), "label": "label"}, "max_length": 8},
              "losses": [{"type": "cross_entropy"}], "train": {"steps": 6, "batch_size": 4, "save_every": 2}}
    straight = distill({**recipe, "output": str(tmp_path / "a")}, progress=False)
    killed_run({**recipe, "output": str(tmp_path / "b")}, step=3)
    state = json.loads((tmp_path / "b" / "checkpoints" / "main" / "step-0000002" / "state.json").read_text())
    assert any(v.get("replace_rate") == pytest.approx(0.3 + 0.7 * 2 / 6) for v in state["method"].values())
    resumed = distill({**recipe, "output": str(tmp_path / "b")}, resume=True, progress=False)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and not any("predecessors" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_step_that_runs_only_frozen_blocks_is_no_error(tmp_path, tokenizer):
    """With the embeddings and head frozen (as the reference code trains only the successors), a step that
    draws every predecessor has nothing to train; it must pass, not fail in backward, and leave the
    successors as they were."""
    from safetensors.torch import load_file

    from kdistill import distill

    data = teacher_and_data(tmp_path, tokenizer)
    recipe = {"name": "th", "teacher": {"model": str(tmp_path / "teacher")},
              "student": {"theseus": {"modules": 2, "start": 0.0, "full_at": 1.0}},
              "data": {"train": {"path": str(data), "label": "label"}, "max_length": 8},
              "losses": [{"type": "cross_entropy"}],
              "train": {"steps": 1, "batch_size": 4, "weight_decay": 0.0,
                        "freeze": ["bert.embeddings.*", "bert.pooler.*", "classifier.*"]},
              "output": str(tmp_path / "out")}
    out = distill(recipe, progress=False)  # p = 0 at step 0: every module runs its predecessors
    exported = load_file(str(out / "model.safetensors"))
    teacher = BertForSequenceClassification.from_pretrained(tmp_path / "teacher").state_dict()
    for i, source in enumerate([1, 3]):  # successor i is a copy of group i's top block, untouched
        key = f"bert.encoder.layer.{i}.attention.self.query.weight"
        assert torch.equal(exported[key], teacher[f"bert.encoder.layer.{source}.attention.self.query.weight"])
