"""Terms on attention and self-relations: TinyBERT/MobileBERT attention transfer, MiniLM and MiniLMv2."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdistill.errors import PairingError
from kdistill.losses import functional as fn
from kdistill.losses.base import (LossTerm, layer_map, register_loss, same_heads, same_image_tokens, skip_cls_count,
                                  token_mask)
from kdistill.losses.features import LayerSpec, SkipCLSParams


def query_mask(batch: dict, heads: int, taps: dict | None = None, names: list[str] = (),
               skip_cls: bool = False) -> torch.Tensor | None:
    """(B, H, L) real query rows; attention rows of padding tokens are not compared.

    skip_cls drops the row of position 0 as well (the first of the student's tap `names`, shaped
    (B, H, L, ·), sizes it when the batch has no mask). Its key column stays: every other row is the same
    distribution over all keys as without skip_cls, nothing is renormalised, and the mean runs over the
    remaining rows."""
    like = taps[names[0]] if skip_cls and names else None
    mask = token_mask(batch, like, skip_cls)
    if mask is None:
        return None
    return mask[:, None, :].expand(-1, heads, -1)


def relation_logits(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x·xᵀ/√d per head, padding keys pushed to -inf-like so the softmax ignores them."""
    scores = x.float() @ x.float().transpose(-1, -2) / x.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores


class _AttentionParams(SkipCLSParams):
    layers: LayerSpec = "uniform"


class AttentionKLParams(_AttentionParams):
    type: Literal["attention_kl"] = "attention_kl"


class AttentionMSEParams(_AttentionParams):
    type: Literal["attention_mse"] = "attention_mse"
    target: Literal["scores", "probs"] = Field("scores", description="TinyBERT uses the scores before softmax")


class _AttentionTerm(LossTerm):
    tap = "attentions"
    hint = "Use qkv_relation (MiniLMv2 relation heads), which works for any head count."

    def __init__(self, params, student, teacher, where="losses"):
        super().__init__(params, student, teacher, where)
        same_heads(student, teacher, where, self.hint)
        self.map = layer_map(params.layers, student, teacher, where)
        if any(0 in pair for pair in self.map.pairs):
            raise PairingError(f"{where}.layers: attention exists for layers 1..N only, not 0 (the embeddings)")
        same_image_tokens(list(zip(self.student_taps(), self.teacher_taps())), student, teacher, where)

    def student_taps(self):
        return [f"{self.tap}[{s}]" for s, _ in self.map.pairs]

    def teacher_taps(self):
        return [f"{self.tap}[{t}]" for _, t in self.map.pairs]

    def count(self, batch):
        return skip_cls_count(batch, self.params.skip_cls)

    def forward(self, s, t, batch):
        mask = query_mask(batch, self.student_info.num_heads, s, self.student_taps(), self.params.skip_cls)
        return sum(self.distance(s[f"{self.tap}[{a}]"], t[f"{self.tap}[{b}]"], mask, batch) for a, b in self.map.pairs)


@register_loss("attention_kl")
class AttentionKL(_AttentionTerm):
    """KL(teacher ‖ student) of per-head attention distributions, per real query (MobileBERT, MiniLM)."""

    Params = AttentionKLParams

    def distance(self, s, t, rows, batch):
        return fn.kl_div_probs(s, t, rows)


@register_loss("attention_mse")
class AttentionMSE(_AttentionTerm):
    """MSE of attention score matrices (TinyBERT), over the real keys of each real query row."""

    Params = AttentionMSEParams

    def __init__(self, params, student, teacher, where="losses"):
        super().__init__(params, student, teacher, where)
        self.tap = "attention_scores" if params.target == "scores" else "attentions"

    def distance(self, s, t, rows, batch):
        return fn.attention_map_mse(s, t, batch.get("attention_mask"), rows)


class ValueRelationParams(SkipCLSParams):
    type: Literal["value_relation"] = "value_relation"
    layers: LayerSpec = "last"


@register_loss("value_relation")
class ValueRelation(LossTerm):
    """MiniLM: KL(teacher ‖ student) of softmax(V·Vᵀ/√d_head) per head; hidden sizes may differ."""

    Params = ValueRelationParams

    def __init__(self, params, student, teacher, where="losses"):
        super().__init__(params, student, teacher, where)
        same_heads(student, teacher, where, "Use qkv_relation with relations: [v] and relation heads instead.")
        self.map = layer_map(params.layers, student, teacher, where)
        same_image_tokens(list(zip(self.student_taps(), self.teacher_taps())), student, teacher, where)

    def student_taps(self):
        return [f"values[{s}]" for s, _ in self.map.pairs]

    def teacher_taps(self):
        return [f"values[{t}]" for _, t in self.map.pairs]

    def count(self, batch):
        return skip_cls_count(batch, self.params.skip_cls)

    def forward(self, s, t, batch):
        mask = batch.get("attention_mask")  # padding keys; skip_cls never touches keys
        rows = query_mask(batch, self.student_info.num_heads, s, self.student_taps(), self.params.skip_cls)
        total = 0.0
        for a, b in self.map.pairs:
            zs, zt = relation_logits(s[f"values[{a}]"], mask), relation_logits(t[f"values[{b}]"], mask)
            total = total + fn.kl_div(zs, zt, mask=rows)
        return total


class QKVRelationParams(SkipCLSParams):
    type: Literal["qkv_relation"] = "qkv_relation"
    layers: LayerSpec = "last"
    relations: list[Literal["q", "k", "v"]] = Field(["q", "k", "v"], min_length=1)
    relation_heads: int | None = Field(None, ge=1, description="default: the teacher's head count")


@register_loss("qkv_relation")
class QKVRelation(LossTerm):
    """MiniLMv2: Q-Q, K-K, V-V self-relations with heads re-split into `relation_heads`, any width."""

    Params = QKVRelationParams
    taps_of = {"q": "queries", "k": "keys", "v": "values"}

    def __init__(self, params, student, teacher, where="losses"):
        super().__init__(params, student, teacher, where)
        self.map = layer_map(params.layers, student, teacher, where)
        same_image_tokens(list(zip(self.student_taps(), self.teacher_taps())), student, teacher, where)
        self.heads = params.relation_heads or teacher.num_heads
        for who, info in (("student", student), ("teacher", teacher)):
            width = info.num_heads * info.head_dim
            if width % self.heads:
                raise PairingError(
                    f"{where}.relation_heads: {self.heads} does not divide the {who}'s attention width {width}; "
                    f"choose a common divisor of both widths"
                )

    def student_taps(self):
        return [f"{self.taps_of[r]}[{a}]" for a, _ in self.map.pairs for r in self.params.relations]

    def teacher_taps(self):
        return [f"{self.taps_of[r]}[{b}]" for _, b in self.map.pairs for r in self.params.relations]

    def resplit(self, x: torch.Tensor) -> torch.Tensor:
        b, h, length, d = x.shape
        merged = x.transpose(1, 2).reshape(b, length, h * d)
        return merged.view(b, length, self.heads, h * d // self.heads).transpose(1, 2)

    def count(self, batch):
        return skip_cls_count(batch, self.params.skip_cls)

    def forward(self, s, t, batch):
        mask = batch.get("attention_mask")  # padding keys; skip_cls never touches keys
        rows = query_mask(batch, self.heads, s, self.student_taps(), self.params.skip_cls)
        total = 0.0
        for a, b in self.map.pairs:
            for r in self.params.relations:
                kind = self.taps_of[r]
                zs = relation_logits(self.resplit(s[f"{kind}[{a}]"]), mask)
                zt = relation_logits(self.resplit(t[f"{kind}[{b}]"]), mask)
                total = total + fn.kl_div(zs, zt, mask=rows)
        return total


__all__ = ["AttentionKL", "AttentionMSE", "ValueRelation", "QKVRelation"]
