"""Linear CKA (Kornblith et al. 2019): how alike two sets of features are, whatever their widths.

`linear_cka` is a plain function on two (n, d) matrices, so evaluation can report per-layer CKA between
any two models without a loss term; the `cka` term turns it into a loss, Σ over layer pairs of 1 − CKA.
"""
from __future__ import annotations

from typing import Literal

import torch

from kdistill.errors import PairingError
from kdistill.losses.base import LayerPairTerm, TermParams, register_loss
from kdistill.losses.features import LayerSpec
from kdistill.losses.vision import hidden_tap, same_patch_grid
from kdistill.models.arch import ModelInfo


def linear_cka(x, y) -> torch.Tensor:
    """CKA(x, y) = ‖yᵀx‖_F² / (‖xᵀx‖_F ‖yᵀy‖_F) after centring each column, for x (n, d1) and
    y (n, d2) whose rows are the same n examples. In [0, 1]; 1 for x against itself; unchanged by
    rotations, isotropic scaling and shifts of either side; a side with no variance gives 0. Takes
    tensors or arrays; computes in at least float32 and is differentiable. This is the plain (biased)
    HSIC estimator: with few rows and many columns it leans toward 1."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs x (n, d1) and y (n, d2) with the same rows, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError("linear_cka needs at least 2 rows (examples) to centre")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    tiny = torch.finfo(dtype).tiny  # keeps sqrt differentiable at 0 without moving any real value
    x, y = x.to(dtype), y.to(dtype)
    x, y = x - x.mean(0), y - y.mean(0)
    # CKA ignores overall scale: bringing each side to unit norm (through its largest entry, so the
    # squares cannot overflow either) keeps the fourth powers below float32's range
    x, y = unit_norm(x, tiny), unit_norm(y, tiny)
    cross = (y.T @ x).pow(2).sum()
    self_x = ((x.T @ x).pow(2).sum() + tiny).sqrt()
    self_y = ((y.T @ y).pow(2).sum() + tiny).sqrt()
    return cross / (self_x * self_y).clamp_min(tiny)


def unit_norm(x: torch.Tensor, tiny: float) -> torch.Tensor:
    x = x / x.abs().amax().clamp_min(tiny)
    return x / (x.pow(2).sum() + tiny).sqrt()


def token_rows(hidden: torch.Tensor, info: ModelInfo, tokens: str, mask: torch.Tensor | None) -> torch.Tensor:
    """The (n, D) rows one model contributes: its token 0 per example (cls), its tokens after the prefix
    (patches), or every token (all); padding tokens (attention_mask 0) are left out."""
    if tokens == "cls":
        return hidden[:, 0]
    start = info.prefix_tokens if tokens == "patches" else 0
    hidden = hidden[:, start:]
    if mask is None:
        return hidden.reshape(-1, hidden.shape[-1])
    return hidden[mask[:, start:].bool()]


class CKAParams(TermParams):
    type: Literal["cka"] = "cka"
    layers: LayerSpec = "uniform"
    tokens: Literal["cls", "patches", "all"] = "all"


@register_loss("cka")
class CKA(LayerPairTerm):
    """Σ over layer pairs of 1 − linear CKA between student and teacher hidden states, the rows being the
    batch's tokens (or its CLS tokens). Widths may differ: CKA compares the examples' similarity
    structure, not the features, so there is no projector. CKA is a batch statistic, not a per-example
    mean, so small batches give noisy, upward-biased values."""

    Params = CKAParams

    def __init__(self, params, student, teacher, where="losses"):
        super().__init__(params, student, teacher, where)
        if params.tokens == "all" and student.prefix_tokens != teacher.prefix_tokens:
            raise PairingError(
                f"{where}.tokens: the student has {student.prefix_tokens} prefix tokens and the teacher "
                f"{teacher.prefix_tokens} (e.g. ViT's CLS against DeiT's CLS + distillation token), so their "
                f"token rows do not pair; use tokens: patches (or cls)"
            )
        if params.tokens != "cls":
            same_patch_grid(student, teacher, f"{where}.tokens")

    def forward(self, s, t, batch):
        mask = batch.get("attention_mask")
        total = 0.0
        for a, b in self.map.pairs:
            xs = token_rows(hidden_tap(s, f"hidden_states[{a}]", "student", self.where),
                            self.student_info, self.params.tokens, mask)
            xt = token_rows(hidden_tap(t, f"hidden_states[{b}]", "teacher", self.where),
                            self.teacher_info, self.params.tokens, mask)
            if xs.shape[0] != xt.shape[0]:
                raise PairingError(
                    f"{self.where}.tokens: the student gives {xs.shape[0]} {self.params.tokens} rows for this "
                    f"batch, the teacher {xt.shape[0]}; CKA pairs them row by row, so give both models the same "
                    f"patch grid / tokenizer, or use tokens: cls"
                )
            total = total + (1.0 - linear_cka(xs, xt))
        return total


__all__ = ["CKA", "linear_cka"]
