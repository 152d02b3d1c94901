import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from kdistill.config import StudentConfig
from kdistill.errors import ConfigError, PairingError
from kdistill.models.layer_map import LayerMap
from kdistill.models.student import build_student, choose_layers


def bert(layers=6):
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                intermediate_size=64, vocab_size=100)).eval()


def test_choose_layers():
    assert choose_layers("uniform", 3, 6, "s") == [2, 4, 6]
    # where N/n is no whole number, each student layer still copies the teacher layer a `layers: uniform` term
    # compares it with (rounding put 6 -> 4 at [2, 3, 4, 6] against the map's [1, 3, 4, 6])
    assert choose_layers("uniform", 4, 6, "s") == [1, 3, 4, 6]
    assert choose_layers("uniform", 5, 12, "s") == [2, 4, 7, 9, 12]
    assert choose_layers("uniform", 8, 12, "s") == [1, 3, 4, 6, 7, 9, 10, 12]
    assert choose_layers("every_other", None, 6, "s") == [2, 4, 6]
    assert choose_layers("every_other", None, 5, "s") == [1, 3, 5]
    assert choose_layers([1, -1], None, 6, "s") == [1, 6]
    with pytest.raises(PairingError, match="out of range"):
        choose_layers([0, 7], None, 6, "s")
    with pytest.raises(ConfigError, match="s.layers: teacher layer 6 given twice"):  # -1 is layer 6
        choose_layers([6, -1], None, 6, "s")
    with pytest.raises(ValueError, match="num_layers is for layers: uniform"):  # pydantic's, named by load_recipe
        StudentConfig.model_validate({"from_teacher": {"layers": [1, 2], "num_layers": 3}})


def test_from_teacher_copies_embeddings_and_chosen_layers():
    teacher = bert()
    cfg = StudentConfig.model_validate({"from_teacher": {"layers": [1, 3, 5]}})
    student = build_student(cfg, teacher, "embedding", seed=0)
    assert student.config.num_hidden_layers == 3
    torch.testing.assert_close(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    for s, t in enumerate([1, 3, 5]):
        torch.testing.assert_close(student.encoder.layer[s].attention.self.query.weight,
                                   teacher.encoder.layer[t - 1].attention.self.query.weight)
    assert teacher.config.num_hidden_layers == 6  # the teacher is untouched


def test_from_teacher_can_copy_layers_of_another_model(tmp_path):
    pretrained = bert()
    pretrained.save_pretrained(tmp_path / "pretrained")
    torch.manual_seed(5)
    teacher = BertModel(pretrained.config).eval()  # e.g. the same architecture after fine-tuning
    cfg = StudentConfig.model_validate({"from_teacher": {"layers": [2, 4], "model": str(tmp_path / "pretrained")}})
    student = build_student(cfg, teacher, "embedding", seed=0)
    torch.testing.assert_close(student.encoder.layer[1].output.dense.weight,
                               pretrained.encoder.layer[3].output.dense.weight)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    other = StudentConfig.model_validate({"from_teacher": {"layers": [1], "model": str(tmp_path / "gpt2")}})
    with pytest.raises(PairingError, match="same architecture"):
        build_student(other, teacher, "embedding", seed=0)
    # layers_from puts another model's layers between the teacher's embeddings and head: its width must match
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=6, num_attention_heads=4, intermediate_size=32,
                         vocab_size=100)).save_pretrained(tmp_path / "narrow")
    narrow = StudentConfig.model_validate({"from_teacher": {"layers": [2], "layers_from": str(tmp_path / "narrow")}})
    with pytest.raises(PairingError, match="narrow is 16 wide, the teacher 32"):
        build_student(narrow, teacher, "embedding", seed=0)


def test_from_teacher_gpt2_uses_its_own_layer_path():
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0))
    cfg = StudentConfig.model_validate({"from_teacher": {"layers": "uniform", "num_layers": 2}})
    student = build_student(cfg, teacher, "causal-lm", seed=0)
    torch.testing.assert_close(student.transformer.h[1].attn.c_attn.weight, teacher.transformer.h[3].attn.c_attn.weight)


def test_config_student_is_random_and_narrower():
    teacher = bert()
    cfg = StudentConfig.model_validate({"config": {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 32}})
    a = build_student(cfg, teacher, "embedding", seed=1)
    b = build_student(cfg, teacher, "embedding", seed=1)
    assert a.config.hidden_size == 16 and a.config.num_hidden_layers == 2
    torch.testing.assert_close(a.encoder.layer[0].output.dense.weight, b.encoder.layer[0].output.dense.weight)
    other = build_student(cfg, teacher, "embedding", seed=2)  # random: another seed, other weights
    assert not torch.equal(a.encoder.layer[0].output.dense.weight, other.encoder.layer[0].output.dense.weight)


def test_config_student_unknown_field():
    cfg = StudentConfig.model_validate({"config": {"num_hiden_layers": 2}})
    with pytest.raises(ConfigError, match=r"student.config: 'num_hiden_layers' \(did you mean 'num_hidden_layers'\?\) "
                                          r"is not a field of the teacher's BertConfig"):
        build_student(cfg, bert(), "embedding", seed=0)
    cfg = StudentConfig.model_validate({"config": {"model_type": "gpt2", "num_hidden_layers": 2}})
    with pytest.raises(ConfigError, match=r"student.config.model_type: a student from config keeps the teacher's "
                                          r"architecture \(bert\)"):  # it was built as a BERT, saying nothing
        build_student(cfg, bert(), "embedding", seed=0)


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", -32, r"student.config.hidden_size: -32 is not a size or count; give 1 or more"),  # torch's error
    ("num_hidden_layers", 0, r"student.config.num_hidden_layers: 0 is not a size or count"),  # a 0-layer student
    ("hidden_size", "16", r"student.config.hidden_size: '16' is str, and the field is a whole number \(the "
                          r"teacher's is 32\); write it without quotes"),  # the config dataclass's own traceback
    ("num_attention_heads", True, r"num_attention_heads: True is bool"),
])
def test_config_student_values_of_the_wrong_kind_are_named(field, value, message):
    cfg = StudentConfig.model_validate({"config": {field: value}})
    with pytest.raises(ConfigError, match=message):
        build_student(cfg, bert(), "embedding", seed=0)


def test_config_student_null_lets_transformers_derive_the_field():
    """GPT-2's n_inner: null is 4 * n_embd; a Llama's head_dim: null is hidden / heads after narrowing."""
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=256, vocab_size=100, n_positions=32))
    cfg = StudentConfig.model_validate({"config": {"n_embd": 32, "n_inner": None}})
    student = build_student(cfg, teacher, "causal-lm", seed=0)
    assert student.config.n_inner is None and student.transformer.h[0].mlp.c_fc.nf == 4 * 32


def test_model_student_from_directory(tmp_path):
    bert(2).save_pretrained(tmp_path)
    cfg = StudentConfig.model_validate({"model": str(tmp_path)})
    student = build_student(cfg, bert(), "embedding", seed=0)
    assert student.config.num_hidden_layers == 2


def test_layer_map():
    assert LayerMap.uniform(3, 6).pairs == ((1, 2), (2, 4), (3, 6))
    assert LayerMap.uniform(4, 6).pairs[-1] == (4, 6)
    assert LayerMap.resolve("last", 3, 6).pairs == ((3, 6),)
    assert LayerMap.resolve([[1, 2], [-1, -1]], 3, 6).pairs == ((1, 2), (3, 6))
    with pytest.raises(PairingError, match="teacher layer"):
        LayerMap.resolve([[1, 9]], 3, 6)


def test_a_layer_pair_given_twice_is_refused():
    # [3, 6] and [-1, -1] are one pair for a 3-layer student of a 6-layer teacher
    with pytest.raises(PairingError, match=r"the pair \[-1, -1\] is student layer 3 -> teacher layer 6, already listed"):
        LayerMap.resolve([[3, 6], [-1, -1]], 3, 6)
