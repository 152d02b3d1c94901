"""Named views into a model's forward pass ("taps") that loss terms read.

Tap names: `logits`, `embeddings`, `pooled`, `head_input` and `lm_head` (a causal LM's final hidden
states and its output-embedding weight, for losses that make the logits themselves in chunks: asked
without `logits`, the model runs without its LM head), `cls_logits`, `distillation_logits` and
`distillation_token` (a DeiT student's two heads, whose average is its `logits`, and its last-layer
distillation token; `pooled` is the CLS token), and per layer `hidden_states[i]` (0 = embeddings,
i = output of layer i), `patches[i]` (a ViT's patch tokens of hidden_states[i]), `attentions[i]`, `attention_scores[i]`, `queries[i]`, `keys[i]`, `values[i]`
(layers 1..N, negative numbers count from the end). Q/K/V come as (batch, heads, length, head_dim).

Attention is recomputed from the captured Q and K instead of asking the model for it, so the model
keeps its fast attention kernel and every family (BERT, GPT-2, Llama with rotary, ViT) gives the
same thing: `attention_scores` = Q·Kᵀ·scale with masked entries (padding keys, future tokens) set
to 0, and `attentions` = the softmax over allowed keys.
"""
from __future__ import annotations

import inspect
import re
from contextlib import contextmanager

import torch
from torch import nn

from kdistill.errors import PairingError, did_you_mean
from kdistill.models.arch import ModelInfo, find_qkv
from kdistill.models.layer_map import normalise_layer

LAYERED = ("hidden_states", "patches", "attentions", "attention_scores", "queries", "keys", "values")
PLAIN = ("logits", "embeddings", "pooled", "head_input", "lm_head", "cls_logits", "distillation_logits",
         "distillation_token")
TAP_KINDS = LAYERED + PLAIN
ATTENTION_KINDS = ("attentions", "attention_scores", "queries", "keys", "values")
_TAP = re.compile(r"^(\w+)(?:\[(-?\d+)\])?$")


def tap_spelling(name: str, where: str = "tap") -> tuple[str, int | None]:
    """(kind, layer index as written) of a tap name; PairingError for a name no model has (checked on reading a
    recipe, before any model loads)."""
    match = _TAP.match(name.strip())
    kind = match.group(1) if match else name
    if kind not in TAP_KINDS:
        hint = did_you_mean(kind, TAP_KINDS, cutoff=0.6)
        raise PairingError(f"unknown tap {name!r} at {where}{hint or ';'} valid: {', '.join(TAP_KINDS)}")
    index = match.group(2)
    if kind in PLAIN and index is not None:
        raise PairingError(f"tap {name!r} at {where} takes no layer index")
    if kind not in PLAIN and index is None:
        raise PairingError(f"tap {name!r} at {where} needs a layer index, e.g. {kind}[1]")
    return kind, None if index is None else int(index)


def parse_tap(name: str, info: ModelInfo, where: str = "tap") -> tuple[str, int | None]:
    kind, index = tap_spelling(name, where)
    if kind in PLAIN:
        if kind == "logits" and info.task == "embedding":  # known from the recipe: no need to wait for a forward
            raise PairingError(f"tap 'logits' at {where}: this model is loaded as an embedding model (a bare encoder, "
                               f"no head, so no logits); use pooled or hidden_states taps, or load it with a head "
                               f"(teacher.task: masked-lm / classification / causal-lm)")
        return kind, None
    layer = normalise_layer(index, info.num_layers, f"{where} ({name})", allow_embeddings=kind in ("hidden_states", "patches"))
    return kind, layer


def tap_name(kind: str, layer: int | None = None) -> str:
    return kind if layer is None else f"{kind}[{layer}]"


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, length, width = x.shape
    return x.view(b, length, heads, width // heads).transpose(1, 2)


def allowed_keys(mask: torch.Tensor | None, length: int, causal: bool, device) -> torch.Tensor | None:
    """Boolean (B|1, 1, L, L): which keys each query may attend to."""
    allowed = None
    if mask is not None:
        allowed = mask.bool()[:, None, None, :].expand(-1, 1, length, -1)
    if causal:
        tri = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        allowed = tri if allowed is None else allowed & tri
    return allowed


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    if mode == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(1) if mode == "mean" else hidden[:, -1]
    if mode == "last":
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (mask.long() * positions).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class TapReader:
    """Reads the requested taps of one model in a single forward pass."""

    def __init__(self, model: nn.Module, info: ModelInfo):
        self.model = model
        self.info = info
        self.blocks = model.get_submodule(info.layers_path)
        self.inputs = set(inspect.signature(model.forward).parameters)

    def canonical(self, names, where: str = "tap") -> set[str]:
        return {tap_name(*parse_tap(n, self.info, where)) for n in names}

    def __call__(self, batch: dict, names) -> dict[str, torch.Tensor]:
        parsed = [parse_tap(n, self.info) for n in names]
        attn_layers = sorted({layer for kind, layer in parsed if kind in ATTENTION_KINDS})
        need_hidden = any(kind in ("hidden_states", "patches", "embeddings", "distillation_token") for kind, _ in parsed)
        need_hidden |= any(k == "pooled" for k, _ in parsed) and self.info.task not in ("embedding",)
        model, accepted = self.model, self.inputs
        headless = any(k == "head_input" for k, _ in parsed) and not any(k == "logits" for k, _ in parsed)
        if headless:  # the base model's last hidden state is what the LM head reads: no B×L×V logits
            model = self.model.base_model
            accepted = set(inspect.signature(model.forward).parameters)
        inputs = {k: v for k, v in batch.items() if k in accepted}
        with self._capture(attn_layers) as captured:
            out = model(**inputs, output_hidden_states=need_hidden or None, return_dict=True)
        mask = batch.get("attention_mask")
        taps = {}
        for kind, layer in parsed:
            taps[tap_name(kind, layer)] = self._tap(kind, layer, out, captured, mask)
        return taps

    def _tap(self, kind, layer, out, captured, mask):
        if kind == "logits":
            if getattr(out, "logits", None) is None:
                raise PairingError(
                    f"{type(self.model).__name__} has no logits (a bare encoder); use pooled or hidden_states taps, "
                    f"or load it with a head (teacher.task: masked-lm / classification / causal-lm)"
                )
            return out.logits
        if kind in ("cls_logits", "distillation_logits"):
            value = getattr(out, kind, None)
            if value is None:
                raise PairingError(f"{type(self.model).__name__} has no {kind}: it needs a distillation token and "
                                   f"head (DeiTForImageClassificationWithTeacher, e.g. blueprint:deit-3x96-p4)")
            return value
        if kind == "head_input":
            if getattr(out, "last_hidden_state", None) is None:
                raise PairingError("head_input needs the model's own last hidden state; ask for it without `logits`")
            return out.last_hidden_state
        if kind == "lm_head":
            head = self.model.get_output_embeddings()
            if head is None or getattr(head, "bias", None) is not None:
                raise PairingError(f"{type(self.model).__name__} has no bias-free output embedding (LM head) to read")
            return head.weight
        if kind == "hidden_states":
            return out.hidden_states[layer]
        if kind == "patches":  # a ViT's patch tokens, without its CLS (and DeiT's distillation) token
            return out.hidden_states[layer][:, self.info.prefix_tokens:]
        if kind == "distillation_token":
            if self.info.prefix_tokens < 2:
                raise PairingError(f"{type(self.model).__name__} has no distillation token (a DeiT model has one)")
            return out.hidden_states[-1][:, 1]
        if kind == "embeddings":
            return out.hidden_states[0]
        if kind == "pooled":
            last = getattr(out, "last_hidden_state", None)
            return pool(last if last is not None else out.hidden_states[-1], mask, self.info.pooling)
        q, k, v, scale = self._qkv(captured[layer])
        if kind == "queries":
            return q
        if kind == "keys":
            return k
        if kind == "values":
            return v
        scores = q @ k.transpose(-1, -2) * scale
        allowed = allowed_keys(mask, scores.shape[-1], self.info.is_decoder, scores.device)
        if kind == "attention_scores":
            return scores if allowed is None else scores.masked_fill(~allowed, 0.0)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        return scores.softmax(-1)

    def _qkv(self, record):
        info = self.info
        if "fused" in record:
            q, k, v = record["fused"].split(info.num_heads * info.head_dim, dim=-1)
        else:
            q, k, v = record["q"], record["k"], record["v"]
        q, k, v = split_heads(q, info.num_heads), split_heads(k, info.num_kv_heads), split_heads(v, info.num_kv_heads)
        rotary = record.get("position_embeddings")
        if rotary is not None:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            q, k = apply_rotary_pos_emb(q, k, *rotary)
        quant = record.get("quant")
        if quant is not None:  # a quantized student's scores are those of its quantized Q and K (BinaryBERT's stage I)
            q, k, v = quant.query(q), quant.key(k), quant.value(v)
        if info.num_kv_heads != info.num_heads:  # grouped-query attention: share K/V across head groups
            repeat = info.num_heads // info.num_kv_heads
            k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        return q, k, v, record.get("scale", info.head_dim ** -0.5)

    @contextmanager
    def _capture(self, layers):
        captured = {layer: {} for layer in layers}
        handles = []

        def keep(record, key):
            def hook(_module, _args, output):
                record[key] = output

            return hook

        def keep_rotary(record):
            def hook(_module, _args, kwargs):
                if kwargs.get("position_embeddings") is not None:
                    record["position_embeddings"] = kwargs["position_embeddings"]

            return hook

        try:
            for layer in layers:
                record = captured[layer]
                style, mods, attn = find_qkv(self.blocks[layer - 1])
                if style == "fused":
                    handles.append(mods.register_forward_hook(keep(record, "fused")))
                else:
                    for key, mod in zip("qkv", mods):
                        handles.append(mod.register_forward_hook(keep(record, key)))
                if getattr(attn, "scaling", None) is not None:
                    record["scale"] = attn.scaling
                if getattr(attn, "attention_quant", None) is not None:
                    record["quant"] = attn.attention_quant
                handles.append(attn.register_forward_pre_hook(keep_rotary(record), with_kwargs=True))
            yield captured
        finally:
            for handle in handles:
                handle.remove()
