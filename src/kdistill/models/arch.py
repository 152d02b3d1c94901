"""What the engine needs to know about a model's shape, found generically from its modules.

Rather than a table per family, the transformer blocks are found as the ModuleList whose length is
the configured number of layers, and the Q/K/V projections by their conventional names. That covers
BERT-likes, GPT-2, Llama-likes and ViT with one code path.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kdistill.errors import PairingError

QKV_NAMES = {
    "split": (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin")),
    "fused": ("c_attn", "qkv_proj", "Wqkv", "query_key_value"),
}


PREFIX_TOKENS = {"vit": 1, "deit": 2}


@dataclass
class ModelInfo:
    model_type: str
    task: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int | None
    is_decoder: bool
    layers_path: str  # e.g. "encoder.layer": where the transformer blocks live
    pooling: str  # mean | cls | last
    # ViTs put special tokens before the patch tokens: CLS (ViT), CLS + distillation (DeiT)
    prefix_tokens: int = 0
    patches: int = 0  # an image transformer's patch tokens per image, after its prefix tokens
    labels: list[str] | None = None  # a classifier's class names in output order

    @property
    def logits_per(self) -> str:
        """Whether the logits tap is one distribution per token or per sequence."""
        return "token" if self.task in ("causal-lm", "masked-lm") else "sequence"


def config_value(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def layer_count(config) -> int | None:
    """The number of transformer blocks, whatever the family calls it (BERT, GPT-2, T5-style names)."""
    return config_value(config, "num_hidden_layers", "n_layer", "num_layers")


def find_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    candidates = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == num_layers and name
    ]
    if not candidates:
        raise PairingError(f"could not find the {num_layers} transformer blocks of {type(model).__name__}")
    # The shortest path is the main stack (not e.g. a list nested inside each block).
    return min(candidates, key=lambda c: c[0].count("."))


def find_qkv(block: nn.Module):
    """('split', (q, k, v), attention_module) or ('fused', qkv, attention_module) for one block."""
    # a quantized attention's own query/key/value quantizers (kdistill.quant's attention_quant) are no projections
    modules = {name: mod for name, mod in block.named_modules() if "attention_quant" not in name.split(".")}
    for q, k, v in QKV_NAMES["split"]:
        for name in modules:
            if name.endswith("." + q) or name == q:
                prefix = name[: -len(q)]
                if prefix + k in modules and prefix + v in modules:
                    parent = modules.get(prefix.rstrip("."), block)
                    return "split", (modules[name], modules[prefix + k], modules[prefix + v]), parent
    for fused in QKV_NAMES["fused"]:
        for name, mod in modules.items():
            if name.split(".")[-1] == fused:
                parent = modules.get(name.rsplit(".", 1)[0] if "." in name else "", block)
                return "fused", mod, parent
    raise PairingError(f"could not find the Q/K/V projections in {type(block).__name__}")


def model_info(model: nn.Module, task: str, pooling: str | None = None) -> ModelInfo:
    config = model.config
    num_layers = layer_count(config)
    if num_layers is None or config_value(config, "num_attention_heads", "n_head", "n_heads") is None:
        return convolutional_info(config, task)
    hidden = config_value(config, "hidden_size", "n_embd", "d_model", "dim")
    heads = config_value(config, "num_attention_heads", "n_head", "n_heads")
    kv_heads = config_value(config, "num_key_value_heads", default=heads)
    head_dim = config_value(config, "head_dim", default=hidden // heads)
    is_decoder = task == "causal-lm" or bool(getattr(config, "is_decoder", False))
    path, _ = find_layers(model, num_layers)
    if pooling is None:
        pooling = "last" if is_decoder else ("cls" if config.model_type in ("vit", "deit") else "mean")
    return ModelInfo(
        model_type=config.model_type, task=task, num_layers=num_layers, hidden_size=hidden,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        vocab_size=getattr(config, "vocab_size", None), is_decoder=is_decoder,
        layers_path=path, pooling=pooling, prefix_tokens=PREFIX_TOKENS.get(config.model_type, 0),
        patches=patch_count(config), labels=class_names(config, task),
    )


def patch_count(config) -> int:
    """Patch tokens per image of a ViT-style model (its fixed image_size over patch_size, squared); 0 for text."""
    size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if not size or not patch:
        return 0
    size, patch = (v[0] if isinstance(v, (list, tuple)) else v for v in (size, patch))
    return (size // patch) ** 2


def class_names(config, task: str) -> list[str] | None:
    if task not in ("classification", "image-classification") or not getattr(config, "id2label", None):
        return None
    return [str(config.id2label[i]) for i in range(len(config.id2label))]


def convolutional_info(config, task: str) -> ModelInfo:
    """A model without transformer blocks (a ResNet teacher): only its logits and pooled output are taps."""
    widths = config_value(config, "hidden_sizes", default=None)
    hidden = widths[-1] if widths else config_value(config, "hidden_size", default=0)
    return ModelInfo(model_type=config.model_type, task=task, num_layers=0, hidden_size=hidden, num_heads=0,
                     num_kv_heads=0, head_dim=0, vocab_size=None, is_decoder=False, layers_path="", pooling="mean")
