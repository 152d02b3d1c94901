"""Taps against the model's own eager attention, for each family the engine supports."""
import pytest
import torch
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          ViTConfig, ViTModel)

from kdistill.errors import PairingError
from kdistill.models.arch import model_info
from kdistill.models.taps import TapReader, parse_tap

FAMILIES = {
    "bert": ("embedding", lambda: BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=64, vocab_size=100, attn_implementation="eager"))),
    "gpt2": ("causal-lm", lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0,
                                                              eos_token_id=0, attn_implementation="eager"))),
    "llama": ("causal-lm", lambda: LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                                 num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                                                                 attn_implementation="eager"))),
    "vit": ("embedding", lambda: ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=64, image_size=16, patch_size=4, num_channels=1,
                                                     attn_implementation="eager"))),
}


def make(family):
    torch.manual_seed(0)
    task, build = FAMILIES[family]
    model = build().eval()
    info = model_info(model, task)
    if family == "vit":
        batch = {"pixel_values": torch.randn(2, 1, 16, 16)}
    else:
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 5:] = 0
        batch = {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": mask}
    return model, info, batch


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_attentions_equal_the_models_eager_attention(family):
    model, info, batch = make(family)
    taps = TapReader(model, info)(batch, ["attentions[1]", "attentions[-1]"])
    with torch.no_grad():
        ref = model(**batch, output_attentions=True).attentions
    real = batch.get("attention_mask", torch.ones(2, taps["attentions[1]"].shape[-1]))
    for layer in (1, 2):
        ours, theirs = taps[f"attentions[{layer}]"], ref[layer - 1]
        rows = real.bool()[:, None, :, None].expand_as(ours)  # padding query rows are undefined in the model
        torch.testing.assert_close(ours[rows], theirs[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_quantized_students_attentions_are_those_its_forward_computes(family):
    from kdistill.quant import quantize_model

    model, _, batch = make(family)
    quantize_model(model, {"weights": 1, "activations": 1})
    model.train()
    model(**batch)  # the activation quantizers take their scales from a first batch
    model.eval()
    info = model_info(model, FAMILIES[family][0])
    ours = TapReader(model, info)(batch, ["attentions[2]"])["attentions[2]"]
    with torch.no_grad():
        theirs = model(**batch, output_attentions=True).attentions[1]  # softmax of the quantized Q and K's scores
    rows = batch["attention_mask"].bool()[:, None, :, None].expand_as(ours)
    torch.testing.assert_close(ours[rows], theirs[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tap_shapes(family):
    model, info, batch = make(family)
    names = ["hidden_states[0]", "hidden_states[2]", "embeddings", "pooled", "queries[1]", "keys[2]", "values[2]",
             "attention_scores[1]"]
    taps = TapReader(model, info)(batch, names)
    b, length = 2, taps["hidden_states[0]"].shape[1]
    assert taps["hidden_states[2]"].shape == (b, length, 32)
    assert taps["pooled"].shape == (b, 32)
    assert taps["queries[1]"].shape == (b, 4, length, 8)
    assert taps["attention_scores[1]"].shape == (b, 4, length, length)
    torch.testing.assert_close(taps["embeddings"], taps["hidden_states[0]"])


def test_hidden_states_match_model_output_and_mean_pooling():
    model, info, batch = make("bert")
    taps = TapReader(model, info)(batch, ["hidden_states[2]", "pooled"])
    with torch.no_grad():
        last = model(**batch).last_hidden_state
    torch.testing.assert_close(taps["hidden_states[2]"], last)
    mask = batch["attention_mask"][1].bool()
    torch.testing.assert_close(taps["pooled"][1], last[1][mask].mean(0))


def test_attention_scores_are_qk_scaled_with_masked_entries_zero():
    model, info, batch = make("bert")
    taps = TapReader(model, info)(batch, ["attention_scores[1]", "queries[1]", "keys[1]"])
    q, k = taps["queries[1]"], taps["keys[1]"]
    ref = q @ k.transpose(-1, -2) / 8 ** 0.5
    scores = taps["attention_scores[1]"]
    torch.testing.assert_close(scores[0], ref[0])
    assert torch.all(scores[1, :, :, 5:] == 0)
    torch.testing.assert_close(scores[1, :, :, :5], ref[1, :, :, :5])


def test_queries_keys_and_values_are_the_layers_own_projections_split_into_heads():
    model, info, batch = make("bert")
    names = [f"{kind}[2]" for kind in ("queries", "keys", "values")] + ["hidden_states[1]"]
    taps = TapReader(model, info)(batch, names)
    attention = model.encoder.layer[1].attention.self
    with torch.no_grad():
        for kind, projection in (("queries", attention.query), ("keys", attention.key), ("values", attention.value)):
            heads = projection(taps["hidden_states[1]"]).view(2, 7, 4, 8).transpose(1, 2)
            torch.testing.assert_close(taps[f"{kind}[2]"], heads, msg=kind)


def test_logits_tap_on_bare_encoder_is_a_clear_error():
    model, info, batch = make("bert")
    with pytest.raises(PairingError, match="no logits"):
        TapReader(model, info)(batch, ["logits"])
    # and before any forward, from the task alone: validate --full reads the taps' names, not their values
    assert info.task == "embedding"
    with pytest.raises(PairingError, match=r"tap 'logits' at losses\[0\]: this model is loaded as an embedding model"):
        TapReader(model, info).canonical(["logits"], "losses[0]")


@pytest.mark.parametrize("name, match", [
    ("hiden_states[1]", "did you mean 'hidden_states'"),
    ("hidden_states[3]", "out of range"),
    ("attentions[0]", "out of range"),
    ("attentions", "needs a layer index"),
    ("pooled[1]", "takes no layer index"),
])
def test_bad_tap_names(name, match):
    _, info, _ = make("bert")
    with pytest.raises(PairingError, match=match):
        parse_tap(name, info)


def test_negative_layers_count_from_the_end():
    _, info, _ = make("bert")
    assert parse_tap("hidden_states[-1]", info) == ("hidden_states", 2)
    assert parse_tap("attentions[-2]", info) == ("attentions", 1)
