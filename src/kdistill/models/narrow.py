"""Truncated init: a narrower student cut out of a BERT-family teacher's weights.

A random-init narrow student has to learn 30k token embeddings from nothing; cutting the teacher's weights
instead keeps its tokens apart from the first step (in the encoder comparison's short stages that alone did
not stop MobileBERT's students collapsing: docs/results.md). The residual stream
keeps its first `hidden_size` dimensions everywhere (embeddings, layer norms, every projection), and each
attention head its first `hidden_size / heads` dimensions, so head h of the student is a slice of head h
of the teacher (per-head attention losses then compare corresponding heads).
"""
from __future__ import annotations

import copy

import torch

from kdistill.errors import ConfigError

# Parameters whose one dimension is (heads x head size): outputs of the Q/K/V projections (dim 0) and the
# input of the attention output projection (dim 1).
HEAD_DIMS = {"attention.self.query.": 0, "attention.self.key.": 0, "attention.self.value.": 0,
             "attention.output.dense.weight": 1}
SUPPORTED = ("bert",)


def narrow_config(config, hidden_size: int, intermediate_size: int | None, where: str):
    if config.model_type not in SUPPORTED:
        raise ConfigError(f"{where}.hidden_size: cutting a teacher to a narrower width supports "
                          f"{', '.join(SUPPORTED)} encoders, not {config.model_type!r}; use student.config for a "
                          f"random-init narrow student")
    if hidden_size > config.hidden_size:
        raise ConfigError(f"{where}.hidden_size: {hidden_size} is wider than the teacher's {config.hidden_size}")
    if hidden_size % config.num_attention_heads:
        raise ConfigError(f"{where}.hidden_size: {hidden_size} must split into the teacher's "
                          f"{config.num_attention_heads} heads (a multiple of {config.num_attention_heads})")
    ratio = config.intermediate_size / config.hidden_size
    inner = intermediate_size or round(hidden_size * ratio)
    if inner > config.intermediate_size:
        raise ConfigError(f"{where}.intermediate_size: {inner} is wider than the teacher's {config.intermediate_size}")
    narrow = copy.deepcopy(config)
    narrow.hidden_size, narrow.intermediate_size = hidden_size, inner
    return narrow


def cut(key: str, value: torch.Tensor, shape: torch.Size, heads: int) -> torch.Tensor:
    """`value` cut to `shape`: leading slices, except a heads x head-size dimension, cut per head."""
    head_dim = next((d for part, d in HEAD_DIMS.items() if part in key), None)
    out = value
    for dim, size in enumerate(shape):
        if out.shape[dim] == size:
            continue
        if dim == head_dim:
            per_head = out.unflatten(dim, (heads, out.shape[dim] // heads))
            out = per_head.narrow(dim + 1, 0, size // heads).flatten(dim, dim + 1)
        else:
            out = out.narrow(dim, 0, size)
    return out.clone()


def narrow_state(state: dict, student: torch.nn.Module, heads: int) -> dict:
    target = student.state_dict()
    return {key: cut(key, value, target[key].shape, heads) for key, value in state.items()}
