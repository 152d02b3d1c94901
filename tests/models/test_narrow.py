"""Truncated init: a narrower student cut out of the teacher, checked weight by weight against slices."""
import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from kdistill.config import StudentConfig
from kdistill.errors import ConfigError
from kdistill.models.student import build_student


def bert():
    torch.manual_seed(0)
    # 4 heads of 8: a student of width 16 keeps 4 heads of 4
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=64, vocab_size=100)).eval()


def narrow(teacher, **extra):
    spec = {"from_teacher": {"layers": [2, 4], "hidden_size": 16, **extra}}
    return build_student(StudentConfig.model_validate(spec), teacher, "embedding", seed=0)


def test_the_residual_stream_keeps_its_first_dimensions():
    teacher = bert()
    student = narrow(teacher)
    assert (student.config.hidden_size, student.config.intermediate_size, student.config.num_attention_heads) == (16, 32, 4)
    assert student.config.num_hidden_layers == 2
    torch.testing.assert_close(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight[:, :16])
    torch.testing.assert_close(student.embeddings.LayerNorm.weight, teacher.embeddings.LayerNorm.weight[:16])
    s, t = student.encoder.layer[1], teacher.encoder.layer[3]  # student layer 2 <- teacher layer 4
    torch.testing.assert_close(s.intermediate.dense.weight, t.intermediate.dense.weight[:32, :16])
    torch.testing.assert_close(s.output.dense.weight, t.output.dense.weight[:16, :32])


def test_each_head_keeps_its_own_first_dimensions():
    teacher = bert()
    student = narrow(teacher)
    s, t = student.encoder.layer[0].attention, teacher.encoder.layer[1].attention
    for h in range(4):  # head h of the student: rows 4h..4h+3 <- teacher rows 8h..8h+3
        for name in ("query", "key", "value"):
            ours, theirs = getattr(s.self, name), getattr(t.self, name)
            torch.testing.assert_close(ours.weight[4 * h:4 * h + 4], theirs.weight[8 * h:8 * h + 4, :16], msg=name)
            torch.testing.assert_close(ours.bias[4 * h:4 * h + 4], theirs.bias[8 * h:8 * h + 4], msg=name)
        torch.testing.assert_close(s.output.dense.weight[:, 4 * h:4 * h + 4], t.output.dense.weight[:16, 8 * h:8 * h + 4])


def test_it_runs_and_the_full_width_is_the_plain_layer_subset():
    teacher = bert()
    ids = torch.randint(0, 100, (2, 7))
    assert narrow(teacher)(input_ids=ids).last_hidden_state.shape == (2, 7, 16)
    full = build_student(StudentConfig.model_validate({"from_teacher": {"layers": [2, 4], "hidden_size": 32}}),
                         teacher, "embedding", seed=0)
    plain = build_student(StudentConfig.model_validate({"from_teacher": {"layers": [2, 4]}}), teacher, "embedding", seed=0)
    assert full.state_dict().keys() == plain.state_dict().keys()
    for name, a in full.state_dict().items():
        torch.testing.assert_close(a, plain.state_dict()[name], msg=name)


def test_bad_widths_and_architectures_are_refused():
    teacher = bert()
    with pytest.raises(ConfigError, match="hidden_size: 18 must split into the teacher's 4 heads"):
        narrow(teacher, hidden_size=18)
    with pytest.raises(ConfigError, match="wider than the teacher's 32"):
        narrow(teacher, hidden_size=64)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100))
    with pytest.raises(ConfigError, match="not 'gpt2'"):
        build_student(StudentConfig.model_validate({"from_teacher": {"layers": [1], "hidden_size": 16}}), gpt2,
                      "causal-lm", seed=0)


def test_an_explicit_feed_forward_width_and_a_classifier_head_are_cut_too():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=64, vocab_size=100, num_labels=3)).eval()
    spec = {"from_teacher": {"layers": [2], "hidden_size": 16, "intermediate_size": 24}}
    student = build_student(StudentConfig.model_validate(spec), teacher, "classification", seed=0)
    assert student.config.intermediate_size == 24
    torch.testing.assert_close(student.bert.encoder.layer[0].intermediate.dense.weight,
                               teacher.bert.encoder.layer[1].intermediate.dense.weight[:24, :16])
    torch.testing.assert_close(student.classifier.weight, teacher.classifier.weight[:, :16])
    torch.testing.assert_close(student.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight[:16, :16])


def test_a_feed_forward_width_alone_is_refused():
    with pytest.raises(ValueError, match="give hidden_size too"):
        StudentConfig.model_validate({"from_teacher": {"layers": [1], "intermediate_size": 24}})
