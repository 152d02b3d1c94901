"""Quantizing a whole model: structure, ternary -> binary splitting, save/load and the packed 1-bit export."""
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from kdistill.errors import ConfigError
from kdistill.models.loading import load_model
from kdistill.quant import QuantLinear, export_packed, quantize_model, split_ternary_weight
from kdistill.quant.quantizers import binarize, ternarize

SPEC = {"weights": 2, "activations": 8}


@pytest.fixture
def classifier(tokenizer):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def batch(tokenizer):
    return dict(tokenizer(["a small dog", "the binary weights of a layer are signs"], padding=True, return_tensors="pt"))


def test_structure_keeps_embeddings_and_head_in_full_precision(classifier, batch):
    quantize_model(classifier, SPEC)
    quantized = [n for n, m in classifier.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * 6  # Q, K, V, attention output, intermediate, output per layer
    assert isinstance(classifier.classifier, nn.Linear) and isinstance(classifier.bert.pooler.dense, nn.Linear)
    assert all(hasattr(layer.attention.self, "attention_quant") for layer in classifier.bert.encoder.layer)
    assert classifier.config.kdistill_quant["weights"] == 2
    classifier(**batch).logits.sum().backward()  # gradients reach the latent weights
    assert classifier.bert.encoder.layer[0].attention.self.query.weight.grad is not None


def test_binary_inputs_after_the_activation_function_are_unsigned(classifier):
    quantize_model(classifier, {"weights": 1, "activations": 1})
    layer = classifier.bert.encoder.layer[0]
    assert layer.output.dense.input_quant.signed is False  # reads GELU's output: {0, alpha}
    assert layer.intermediate.dense.input_quant.signed and layer.attention.output.dense.input_quant.signed
    assert layer.attention.self.attention_quant.probs.signed is False


def test_quantizing_the_head_too(classifier):
    quantize_model(classifier, {**SPEC, "keep_fp": ["embeddings"]})
    assert isinstance(classifier.classifier, QuantLinear)
    with pytest.raises(ConfigError, match="keep_fp"):
        quantize_model(classifier, {**SPEC, "keep_fp": []})


def test_full_precision_spec_changes_nothing(classifier, batch):
    before = classifier(**batch).logits
    quantize_model(classifier, {"weights": 32, "activations": 32})
    assert torch.allclose(classifier(**batch).logits, before, atol=1e-6)


def test_split_weights_sum_to_the_ternary_weight():
    torch.manual_seed(1)
    w = torch.randn(16, 48) * 0.05
    w[3] = 0.0  # an all-zero row survives too
    w1, w2 = split_ternary_weight(w)
    assert torch.allclose(binarize(w1) + binarize(w2), ternarize(w), atol=1e-7)


def test_split_model_has_the_same_output(classifier, batch):
    quantize_model(classifier, SPEC)
    classifier.train()
    classifier(**batch)  # initialise the activation quantizers
    classifier.eval()
    ternary = classifier(**batch).logits
    quantize_model(classifier, {"weights": 1, "activations": 8})
    layer = classifier.bert.encoder.layer[0].intermediate.dense
    assert layer.is_split and layer.weight_bits == 1
    assert torch.allclose(classifier(**batch).logits, ternary, atol=1e-5)
    with pytest.raises(ConfigError, match="split"):
        quantize_model(classifier, {"weights": 2, "activations": 8})


def test_saved_quantized_student_loads_with_the_same_outputs(classifier, batch, tokenizer, tmp_path):
    quantize_model(classifier, SPEC)
    classifier.train()
    classifier(**batch)
    quantize_model(classifier, {"weights": 1, "activations": 1})  # split, then binary activations
    classifier(**batch)
    classifier.eval()
    expected = classifier(**batch).logits
    classifier.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    loaded = load_model(str(tmp_path / "student"), "classification").model
    assert loaded.bert.encoder.layer[1].output.dense.is_split
    assert torch.allclose(loaded(**batch).logits, expected, atol=1e-6)
    # its saved names and head are the classifier's: another task is refused by name, not by missing tensors
    with pytest.raises(ConfigError, match="quantized classification model and loads only as that task"):
        load_model(str(tmp_path / "student"), "embedding")
    import json

    from kdistill.errors import DataError

    config = json.loads((tmp_path / "student" / "config.json").read_text())
    (tmp_path / "student" / "config.json").write_text(json.dumps({**config, "kdistill_quant": "W1A1"}))
    with pytest.raises(DataError, match="kdistill_quant should be the quantization the model was trained at"):
        load_model(str(tmp_path / "student"), "classification")


def test_a_model_whose_blocks_have_no_linear_layers_is_refused_even_with_its_head_quantized(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdistill.errors import PairingError

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    for keep_fp in (["embeddings", "classifier"], ["embeddings"]):  # the second quantized the LM head alone
        with pytest.raises(PairingError, match="no nn.Linear layers in its blocks"):
            quantize_model(gpt2, {**SPEC, "keep_fp": keep_fp})
    assert not any(isinstance(m, QuantLinear) for m in gpt2.modules())


def test_quantized_embeddings_are_refused_when_the_recipe_is_read():
    from kdistill.config import QuantConfig

    with pytest.raises(ValueError, match="keep 'embeddings' in the list"):
        QuantConfig(weights=1, keep_fp=["classifier"])


def test_packed_export_round_trip_and_size(classifier, batch, tokenizer, tmp_path):
    quantize_model(classifier, {"weights": 1, "activations": 8})
    classifier.train()
    classifier(**batch)
    classifier.eval()
    expected = classifier(**batch).logits
    classifier.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    report = export_packed(str(tmp_path / "student"), str(tmp_path / "packed"))
    assert not (tmp_path / "packed" / "model.safetensors").exists()
    loaded = load_model(str(tmp_path / "packed"), "classification").model
    assert torch.allclose(loaded(**batch).logits, expected, atol=1e-5)
    for (name, ours), theirs in zip(classifier.named_modules(), loaded.modules()):  # each sign, each row's scale
        if isinstance(ours, QuantLinear):
            binary = binarize(ours.weight).detach()
            assert torch.equal(theirs.weight.sign(), binary.sign()), name
            torch.testing.assert_close(theirs.weight.abs(), binary.abs(), rtol=1e-6, atol=0)
    # 1 bit per weight plus a float32 scale per row of 32 or 64 inputs: 1/32 + 4/in_features of FP32
    rows = 2 * (4 * 32 + 64 + 32)  # Q, K, V, attn-out (32 rows each), intermediate (64), output (32), 2 layers
    weights = 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert report["quantized_linear_fp32_bytes"] == weights * 4
    assert report["quantized_linear_packed_bytes"] == weights // 8 + rows * 4


def test_packed_export_refuses_a_non_binary_student(classifier, tokenizer, tmp_path):
    quantize_model(classifier, SPEC)
    classifier.save_pretrained(tmp_path / "ternary")
    tokenizer.save_pretrained(tmp_path / "ternary")
    with pytest.raises(ConfigError, match="1-bit"):
        export_packed(str(tmp_path / "ternary"), str(tmp_path / "packed"))


def test_packed_export_replaces_only_its_own_output(classifier, batch, tokenizer, tmp_path):
    quantize_model(classifier, {"weights": 1, "activations": 8})
    classifier.save_pretrained(tmp_path / "run" / "student")
    tokenizer.save_pretrained(tmp_path / "run" / "student")
    student = str(tmp_path / "run" / "student")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    (tmp_path / "afile").write_text("keep")
    for target, match in [(student, "is the student"), (str(tmp_path / "run"), "holds it"),
                          (f"{student}/packed", "inside it"), (str(user), "not an earlier packed export"),
                          (str(tmp_path / "afile"), "is a file")]:
        with pytest.raises(ConfigError, match=match):
            export_packed(student, target)
    assert (user / "notes.txt").read_text() == "keep" and (tmp_path / "afile").read_text() == "keep"
    assert (tmp_path / "run" / "student" / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        export_packed(str(tmp_path / "missing"), str(tmp_path / "out"))
    export_packed(student, str(tmp_path / "packed"))
    export_packed(student, str(tmp_path / "packed"))  # an earlier export is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "mine", "packed", "run"]
    (tmp_path / "link").symlink_to(tmp_path / "packed")  # a link to it: the export it names is replaced, the link kept
    export_packed(student, str(tmp_path / "link"))
    assert (tmp_path / "link").is_symlink() and (tmp_path / "packed" / "packed.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "link", "mine", "packed", "run"]


def test_a_packed_export_into_a_read_only_folder_is_one_message(classifier, tokenizer, tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from kdistill.errors import OutputError

    quantize_model(classifier, {"weights": 1, "activations": 8})
    classifier.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")

    def read_only(self, *args, **kwargs):  # root ignores chmod: a read-only mount is what refuses it
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(OutputError, match=r"cannot write the export beside .*out \(Read-only file system\)"):
        export_packed(str(tmp_path / "student"), str(tmp_path / "out"))


def test_an_image_student_is_refused_before_it_trains():
    from transformers import ViTConfig, ViTForImageClassification

    from kdistill.errors import PairingError

    vit = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=64, image_size=16, patch_size=4, num_channels=1))
    with pytest.raises(PairingError, match="takes text models .*reads pixel_values"):
        quantize_model(vit, {"weights": 1, "activations": 8})


def test_binary_inputs_are_signed_where_the_mlp_is_gated_or_the_layer_reads_a_layer_norm():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    quantize_model(llama, {"weights": 1, "activations": 1})
    # down_proj reads silu(gate) * up, about half of it negative: {0, alpha} would drop that half
    assert all(m.input_quant.signed for m in llama.modules() if isinstance(m, QuantLinear))
    # an intermediate as wide as the hidden state: only the down projection reads GELU's output
    bert = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=4, intermediate_size=32, num_labels=2))
    quantize_model(bert, {"weights": 1, "activations": 1})
    layer = bert.bert.encoder.layer[0]
    assert layer.intermediate.dense.input_quant.signed and not layer.output.dense.input_quant.signed


def test_a_quantized_llama_student_saves_and_loads_back(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    ids = torch.randint(0, 100, (2, 9))
    quantize_model(llama, {"weights": 2, "activations": 8})
    llama.train()
    llama(input_ids=ids)  # the activation quantizers take their scales from a first batch
    quantize_model(llama, {"weights": 1, "activations": 1})
    llama(input_ids=ids)
    llama.eval()
    expected = llama(input_ids=ids).logits
    llama.save_pretrained(tmp_path / "student")
    loaded = load_model(str(tmp_path / "student"), "causal-lm").model
    assert loaded.model.layers[1].mlp.down_proj.is_split
    assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_a_damaged_or_mismatched_packed_file_is_refused_by_name(classifier, batch, tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    from kdistill.errors import CheckpointError

    quantize_model(classifier, {"weights": 1, "activations": 8})
    classifier.train()
    classifier(**batch)
    classifier.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    export_packed(str(tmp_path / "student"), str(tmp_path / "packed"))
    file = tmp_path / "packed" / "model.packed.safetensors"
    original, key = load_file(file), "bert.encoder.layer.0.attention.self.query.weight"
    # rows cut to one would broadcast to every row, columns cut would unpack as zeros: both loaded silently before
    for change, match in [({f"{key}.bits": original[f"{key}.bits"][:1], f"{key}.scale": original[f"{key}.scale"][:1]},
                           r"\.bits is uint8 \[1, 4\], not uint8 \[32, 4\]"),
                          ({f"{key}.bits": original[f"{key}.bits"][:, :2]}, r"\.bits is uint8 \[32, 2\]"),
                          ({f"{key}.bits": original[f"{key}.bits"].float()}, r"\.bits is float32"),
                          ({f"{key}.scale": original[f"{key}.scale"][:5]}, r"\.scale is float32 \[5\], not one float")]:
        save_file({**original, **{k: v.contiguous() for k, v in change.items()}}, file, metadata={"format": "kdistill-packed-1bit"})
        with pytest.raises(CheckpointError, match=match):
            load_model(str(tmp_path / "packed"), "classification")
    save_file({k: v for k, v in original.items() if k != f"{key}.scale"}, file, metadata={"format": "kdistill-packed-1bit"})
    with pytest.raises(CheckpointError, match=r"no packed weights for .*query\.weight"):
        load_model(str(tmp_path / "packed"), "classification")
    save_file(original, file, metadata={"format": "kdistill-packed-1bit"})
    config = (tmp_path / "packed" / "config.json").read_text()
    (tmp_path / "packed" / "config.json").write_text(config.replace('"intermediate_size": 64', '"intermediate_size": 48'))
    with pytest.raises(CheckpointError, match="not uint8 \\[48, 4\\]|does not match its config"):
        load_model(str(tmp_path / "packed"), "classification")


def test_a_layer_that_cannot_be_split_is_named_with_the_fix(classifier):
    quantize_model(classifier, SPEC)
    query = classifier.bert.encoder.layer[1].attention.self.query
    with torch.no_grad():  # one large weight keeps the row's only non-zero; the 31 zeroed ones outweigh it
        query.weight[0] = 0.6
        query.weight[0, 0] = 10.0
    with pytest.raises(ConfigError, match=r"quant\.split: bert\.encoder\.layer\.1\.attention\.self\.query cannot be "
                                          r"split.*set `split: false`"):
        quantize_model(classifier, {"weights": 1, "activations": 8})
    quantize_model(classifier, {"weights": 1, "activations": 8, "split": False})  # the named fix works


def test_quantized_attention_runs_both_matmuls_on_binary_inputs():
    # W1A1: Q, K, V signed {-a, a}, the probabilities {0, a}, as BiT's forward; written out by hand
    from kdistill.quant.model import AttentionQuant, quantized_attention

    torch.manual_seed(0)
    module = nn.Module()
    module.attention_quant = AttentionQuant(1)
    module.eval()
    for name, alpha in (("query", 1.0), ("key", 1.0), ("value", 0.5), ("probs", 0.4)):
        quantizer = getattr(module.attention_quant, name)
        quantizer.initialized.fill_(True)
        with torch.no_grad():
            quantizer.alpha.fill_(alpha)
            quantizer.beta.zero_()
    q, k, v = torch.randn(3, 1, 2, 4, 4).unbind(0)  # (batch, heads, length, head dim)
    out, weights = quantized_attention(module, q, k, v, None)
    def sign(x):
        return torch.where(x >= 0, 1.0, -1.0)

    p = torch.softmax(sign(q) @ sign(k).transpose(2, 3) / 2.0, -1)
    torch.testing.assert_close(weights, p)
    expected = (0.4 * (p > 0.2).float()) @ (0.5 * sign(v))  # round(clip(p / 0.4, 0, 1)): 1 from p = 0.2
    torch.testing.assert_close(out, expected.transpose(1, 2))
