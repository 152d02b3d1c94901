"""Quantize a transformer by config: linear layers become QuantLinear, attention inputs get quantizers.

The spec is stored in the model's config (`kdistill_quant`), so a saved quantized student is rebuilt
with the same structure when it is loaded again (the next stage, `kdistill eval`, the packed export).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdistill.errors import ConfigError, PairingError
from kdistill.models.arch import config_value, find_layers, find_qkv, layer_count
from kdistill.quant.linear import QuantLinear, split_layer
from kdistill.quant.quantizers import activation_quantizer

ATTENTION_IMPL = "kdistill_quant"
HEAD_NAMES = ("classifier", "pooler", "score", "lm_head", "cls.")


class AttentionQuant(nn.Module):
    """Quantizers for the two attention matmuls: Q·K^T (signed) and P·V (P unsigned, V signed)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.query = activation_quantizer(bits, signed=True)
        self.key = activation_quantizer(bits, signed=True)
        self.value = activation_quantizer(bits, signed=True)
        self.probs = activation_quantizer(bits, signed=False) if bits == 1 else activation_quantizer(bits)


def quantized_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with the module's AttentionQuant applied to the matmul inputs."""
    quant = getattr(module, "attention_quant", None)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if quant is not None:
        query, key, value = quant.query(query), quant.key(key), quant.value(value)
    if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat the shared K/V heads
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[..., : key.shape[-2]]
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    probs = quant.probs(weights) if quant is not None else weights
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), weights


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_IMPL, quantized_attention)
    AttentionMaskInterface.register(ATTENTION_IMPL, eager_mask)  # additive float masks, as eager attention takes


def spec_label(spec: dict) -> str:
    return f"W{spec['weights']}A{spec['activations']}"


def _quantizable(model: nn.Module, encoder_path: str, keep_fp: list[str]) -> list[tuple[str, nn.Module]]:
    keep_head = "classifier" in keep_fp
    chosen = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, QuantLinear)):
            continue
        in_encoder = name.startswith(encoder_path + ".")
        in_head = any(h in name for h in HEAD_NAMES) and not in_encoder
        if in_encoder or (in_head and not keep_head):
            chosen.append((name, mod))
    return chosen


GATES = ("gate_proj", "gate_up_proj", "w3", "wi_1")  # a gated MLP (SwiGLU, GeGLU) multiplies by a signed branch
DOWN_PROJECTIONS = ("output.dense", "ffn.lin2", "mlp.fc2", "mlp.dense_4h_to_h")  # BERT/RoBERTa, DistilBERT, others


def activation_readers(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> set[str]:
    """The linear layers whose input is an activation function's output, almost non-negative (GELU, ReLU), so a
    binary input quantizer there takes {0, alpha}. Only an ungated MLP's down projection, known by its name, or
    else as the one layer reading the intermediate width where that differs from the hidden width; a gated MLP's
    reads act(gate) * up, about half negative (Llama's down_proj)."""
    if any(name.rpartition(".")[2] in GATES for name, _ in model.named_modules()):
        return set()
    inner = config_value(model.config, "intermediate_size", "n_inner", default=None) or 0
    hidden = config_value(model.config, "hidden_size", "n_embd", default=None)
    return {name for name, mod in layers if "attention" not in name and "attn" not in name
            and (name.endswith(DOWN_PROJECTIONS) or (inner != hidden and mod.in_features == inner))}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def check_quantizable(model: nn.Module, where: str = "quant") -> None:
    """A model quantization-aware training takes: a text model whose blocks compute with nn.Linear layers."""
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        # transformers saves ViT-family weights under other names than its modules carry, which our loader of
        # quantized students does not translate: such a student would train and then not load back
        raise PairingError(f"{where}: quantization-aware training takes text models (BERT- and Llama-style); "
                           f"{type(model).__name__} reads {model.main_input_name} and is not supported yet")
    path, _ = find_layers(model, layer_count(model.config))
    if not any(isinstance(mod, (nn.Linear, QuantLinear)) for mod in model.get_submodule(path).modules()):
        # the head alone is not a quantized model
        raise PairingError(f"{where}: {type(model).__name__} has no nn.Linear layers in its blocks to quantize "
                           f"(GPT-2's blocks are Conv1D; BERT- and Llama-style models are supported)")


def quantize_model(model: nn.Module, spec: dict, where: str = "quant") -> nn.Module:
    """Apply `spec` ({weights, activations, keep_fp, attention, split}) in place and return the model.

    A model that is already quantized moves to the new precision: ternary -> binary splits each weight
    (BinaryBERT) when `split` is on; a new activation width gets fresh quantizers."""
    weights, acts = spec["weights"], spec["activations"]
    keep_fp = list(spec.get("keep_fp", ["embeddings", "classifier"]))
    if "embeddings" not in keep_fp:
        raise ConfigError(f"{where}.keep_fp: quantized embeddings are not supported; keep 'embeddings' in the list")
    check_quantizable(model, where)
    path, blocks = find_layers(model, layer_count(model.config))
    layers = _quantizable(model, path, keep_fp)
    after_activation = activation_readers(model, layers)
    for name, mod in layers:
        if isinstance(mod, nn.Linear):
            signed = name not in after_activation
            _set_module(model, name, QuantLinear.from_linear(mod, weights, acts, signed_input=signed))
            continue
        if mod.weight_bits == 2 and weights == 1 and spec.get("split", True):
            try:
                split_layer(mod)
            except ValueError as err:  # a row whose few kept weights are outweighed by its zeroed ones
                raise ConfigError(f"{where}.split: {name} cannot be split into two binary halves with the same output "
                                  f"({err}); set `split: false` in that stage's quant block to binarize it directly"
                                  ) from None
        elif mod.is_split and weights != 1:
            raise ConfigError(f"{where}.weights: {name} was split into two binary halves; it cannot become {weights}-bit")
        else:
            mod.weight_bits = weights
        mod.set_activation_bits(acts)
    quantize_attention = acts < 32 and spec.get("attention", True)
    for block in blocks:
        _, _, attention = find_qkv(block)
        current = getattr(attention, "attention_quant", None)
        if quantize_attention and (current is None or current.bits != acts):
            attention.attention_quant = AttentionQuant(acts).to(next(model.parameters()).device)
        elif not quantize_attention and current is not None:
            del attention.attention_quant
    if quantize_attention:
        _register_attention()
        model.set_attn_implementation(ATTENTION_IMPL)
    model.config.kdistill_quant = {"weights": weights, "activations": acts, "keep_fp": keep_fp,
                                   "attention": bool(spec.get("attention", True)), "split": bool(spec.get("split", True)),
                                   "split_layers": any(isinstance(m, QuantLinear) and m.is_split for m in model.modules())}
    return model


def rebuild_quantized(model: nn.Module, spec: dict) -> nn.Module:
    """The structure of a saved quantized model (before its weights are loaded): split layers included."""
    if spec.get("split_layers"):  # it was ternary, then split: rebuild that history so the keys line up
        quantize_model(model, {**spec, "weights": 2})
    return quantize_model(model, spec)


def calibrate(model: nn.Module, batch: dict) -> None:
    """Initialise the activation quantizers from one batch, the same on every process."""
    training = model.training
    model.train()
    with torch.no_grad():
        model(**batch)
    model.train(training)


def is_quantized(model: nn.Module) -> bool:
    return getattr(model.config, "kdistill_quant", None) is not None


def read_safetensors_dir(path: str) -> dict:
    """The state dict of a saved model directory (one file or an index of shards)."""
    import json

    from safetensors.torch import load_file

    root = Path(path)
    if (root / "model.safetensors").exists():
        return load_file(root / "model.safetensors")
    index = root / "model.safetensors.index.json"
    if not index.exists():
        raise FileNotFoundError(f"{path} has no model.safetensors")
    state = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(root / shard))
    return state


def load_quantized(path: str, config, auto_class, **config_updates) -> nn.Module:
    """A saved quantized student: the architecture from its config, the quantized structure from
    `kdistill_quant`, then every saved tensor (latent weights, split halves, quantizer parameters)."""
    for key, value in config_updates.items():
        setattr(config, key, value)
    model = auto_class.from_config(config)
    rebuild_quantized(model, config.kdistill_quant)
    from kdistill.quant.packing import PACKED_FILE, unpack_into

    if (Path(path) / PACKED_FILE).exists():  # a real 1-bit export
        unpack_into(model, path)
        return model.eval()
    state = read_safetensors_dir(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise PairingError(f"{path}: the saved quantized model does not match its config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
