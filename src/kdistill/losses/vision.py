"""Patch-feature terms for vision transformers: ViTKD (Yang et al. 2022) and manifold distillation
(Hao et al. 2022).

Both compare patch tokens position by position, so each model's prefix tokens (ViT's CLS, DeiT's CLS +
distillation token) are dropped first, and the two models must cut images into the same patch grid.
Widths may differ. Every image holds the same number of patches, so a mean over patches is also a mean
over images, and the engine weighs these terms by images (`count`).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdistill.errors import PairingError
from kdistill.losses import functional as fn
from kdistill.losses.base import (LayerPairTerm, LossTerm, TermParams, make_projector, register_loss,
                                  sequence_count)
from kdistill.losses.features import LayerSpec
from kdistill.models.arch import ModelInfo
from kdistill.models.layer_map import LayerMap

FEATURES_FIX = ("this term reads the teacher's token features: use a transformer teacher (ViT, DeiT; a convnet has "
                "no tokens), run live (teacher.source: live), whose hidden states can be read")


def hidden_tap(taps: dict, name: str, who: str, where: str) -> torch.Tensor:
    """A (B, tokens, D) hidden-state tap, or a PairingError saying which side lacks it."""
    if name not in taps:
        raise PairingError(f"{where}: the {who} gave no {name} tap; {FEATURES_FIX}")
    hidden = taps[name]
    if hidden.dim() != 3:
        raise PairingError(f"{where}: {who} {name} has shape {tuple(hidden.shape)}, not (batch, tokens, width); "
                           f"{FEATURES_FIX}")
    return hidden


def patch_tokens(taps: dict, name: str, info: ModelInfo, who: str, where: str) -> torch.Tensor:
    return hidden_tap(taps, name, who, where)[:, info.prefix_tokens:]


def same_patch_count(student: torch.Tensor, teacher: torch.Tensor, where: str) -> None:
    if student.shape[1] != teacher.shape[1]:
        raise PairingError(patch_grid_message(student.shape[1], teacher.shape[1], where))


def transformer_student(student: ModelInfo, where: str) -> None:
    if student.num_layers < 1:
        raise PairingError(f"{where}: this term reads the student's patch tokens, and {student.model_type} has no "
                           f"transformer layers (a convnet has no tokens): use a ViT or DeiT student "
                           f"(e.g. blueprint:vit-3x96-p4)")


def same_patch_grid(student: ModelInfo, teacher: ModelInfo, where: str) -> None:
    """The same check from the models' configs, when the term is built (so `validate --full` makes it too)."""
    if student.patches and teacher.patches and student.patches != teacher.patches:
        raise PairingError(patch_grid_message(student.patches, teacher.patches, where))


def patch_grid_message(student: int, teacher: int, where: str) -> str:
    return (f"{where}: the student has {student} patch tokens per image, the teacher {teacher}; this loss pairs "
            f"patches position by position, so give both models the same image_size / patch_size (the same patch "
            f"grid)")


def require_images(batch: dict, where: str) -> None:
    if "pixel_values" not in batch:
        raise PairingError(f"{where}: this loss compares image patches, but the batch has no pixel_values; "
                           f"use it in a stage that trains on images")


def patch_grid(patches: int, batch: dict, where: str) -> tuple[int, int]:
    """(rows, cols) of the patch grid: the image's aspect ratio decides, a square grid is the fallback."""
    pixels = batch.get("pixel_values")
    if pixels is not None and pixels.dim() == 4:
        height, width = pixels.shape[-2:]
        rows = max(1, round(math.sqrt(patches * height / width)))
        if patches % rows == 0:
            return rows, patches // rows
    side = math.isqrt(patches)
    if side * side == patches:
        return side, side
    raise PairingError(f"{where}.generator: {patches} patch tokens do not form a grid matching the images; "
                       f"the generator needs the patch layout of a vision transformer")


def masked_token_count(patches: int, mask_ratio: float) -> int:
    # at least one masked token to generate and one visible token to generate it from
    return max(1, min(patches - 1, round(patches * mask_ratio)))


def random_token_mask(batch: int, patches: int, mask_ratio: float, device=None) -> torch.Tensor:
    """(B, P) bool, True at masked positions: exactly `masked_token_count` per image, drawn per image from
    torch's global RNG so a seeded run masks the same tokens again (MAE-style argsort of uniform noise)."""
    order = torch.rand(batch, patches, device=device).argsort(dim=1)
    masked = torch.zeros(batch, patches, dtype=torch.bool, device=device)
    return masked.scatter_(1, order[:, : masked_token_count(patches, mask_ratio)], True)


def token_correlation(features: torch.Tensor) -> torch.Tensor:
    """(B, P, P) softmax(F·Fᵀ/√D) per image: an attention-style map of which patches resemble which.
    It has no width, so student and teacher compare without a projector."""
    x = features.float()
    return (x @ x.transpose(1, 2) / x.shape[-1] ** 0.5).softmax(-1)


def sincos_positions(rows: int, cols: int, width: int, device=None) -> torch.Tensor:
    """(rows·cols, width) fixed 2-D sin-cos positions (as in MAE), zero-padded when width % 4 != 0."""
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1))
    r = torch.arange(rows, device=device, dtype=torch.float32).repeat_interleave(cols)[:, None] * freqs
    c = torch.arange(cols, device=device, dtype=torch.float32).repeat(rows)[:, None] * freqs
    table = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)
    return F.pad(table, (0, width - table.shape[1]))


class ConvGenerator(nn.Module):
    """ViTKD's generator: 3×3 conv, ReLU, 3×3 conv over the patch grid. Neighbouring patches are what
    a masked position is generated from, and the convolution knows which patches neighbour it."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1))

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, p, d = tokens.shape
        image = tokens.transpose(1, 2).reshape(b, d, *grid)  # token r·cols + c sits at row r, column c
        return self.net(image).flatten(2).transpose(1, 2)


class AttentionGenerator(nn.Module):
    """One pre-norm transformer block. Attention alone cannot tell one mask token from another, so fixed
    2-D positions are added first (fixed, not learned: the patch count is only known at the first batch)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                                batch_first=True, norm_first=True)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        positions = sincos_positions(*grid, tokens.shape[-1], tokens.device).to(tokens.dtype)
        return self.block(tokens + positions)


def resolve_pair(spec, student: ModelInfo, teacher: ModelInfo, where: str) -> tuple[int, int]:
    spec = "last" if spec == "last" else [list(spec)]
    return LayerMap.resolve(spec, student.num_layers, teacher.num_layers, where).pairs[0]


def default_shallow(student: ModelInfo, teacher: ModelInfo) -> list[tuple[int, int]]:
    """ViTKD mimics the first two blocks of each model; the last student layer stays with the deep part,
    so a 2-layer student mimics one layer and a 1-layer student none."""
    return [(i, i) for i in range(1, min(2, student.num_layers - 1, teacher.num_layers - 1) + 1)]


class ViTKDParams(TermParams):
    type: Literal["vitkd"] = "vitkd"
    shallow: list[tuple[int, int]] | None = Field(
        None, description="[student_layer, teacher_layer] pairs to mimic; default [[1, 1], [2, 2]] (fewer for "
                          "students under 3 layers); [] turns mimicking off")
    deep: tuple[int, int] | Literal["last"] = Field("last", description="[student_layer, teacher_layer] to generate")
    projector: Literal["auto", "linear", "correlation"] = Field(
        "auto", description="shallow mimicking: auto = a learned linear map where widths differ (ViTKD's code), "
                            "linear = always one, correlation = compare softmax(F·Fᵀ/√D) token maps")
    mask_ratio: float = Field(0.5, gt=0, lt=1, description="share of the deep layer's patch tokens masked")
    generator: Literal["conv", "attention"] = "conv"
    alpha: float = Field(1.0, ge=0, description="weight of the shallow (mimicking) MSE, summed over pairs")
    beta: float = Field(0.1, ge=0, description="weight of the deep (generation) MSE; α:β = 10:1 as in ViTKD")


@register_loss("vitkd")
class ViTKD(LossTerm):
    """ViTKD: the shallow layers mimic the teacher's patch features (MSE through a projector); the deep
    layer's student patches, projected to teacher width with a random share replaced by a learned mask
    token, go through a small generator that must produce the teacher's deep features (MSE on the masked
    positions). Projectors, mask token and generator train with the student and are not exported."""

    Params = ViTKDParams

    def __init__(self, params, student, teacher, where="losses"):
        transformer_student(student, where)
        super().__init__(params, student, teacher, where)
        if teacher.num_layers < 1:
            raise PairingError(f"{where}: the teacher has no transformer layers to read features from; {FEATURES_FIX}")
        same_patch_grid(student, teacher, where)
        shallow = default_shallow(student, teacher) if params.shallow is None else [list(p) for p in params.shallow]
        self.shallow = LayerMap.resolve(shallow, student.num_layers, teacher.num_layers, f"{where}.shallow").pairs
        self.deep = resolve_pair(params.deep, student, teacher, f"{where}.deep")
        ds, dt = student.hidden_size, teacher.hidden_size
        if params.projector == "correlation":
            self.mimic_projectors = None
        else:
            projectors = [make_projector(params.projector, ds, dt, f"{where}.projector") for _ in self.shallow]
            self.mimic_projectors = nn.ModuleList(p or nn.Identity() for p in projectors)
        self.align = make_projector("auto", ds, dt, where) or nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(dt))
        if params.generator == "conv":
            self.generator = ConvGenerator(dt)
        else:
            self.generator = AttentionGenerator(dt, teacher.num_heads if dt % teacher.num_heads == 0 else 1)

    def student_taps(self):
        return list(dict.fromkeys(f"hidden_states[{a}]" for a, _ in [*self.shallow, self.deep]))

    def teacher_taps(self):
        return list(dict.fromkeys(f"hidden_states[{b}]" for _, b in [*self.shallow, self.deep]))

    def count(self, batch):
        return sequence_count(batch)

    def pair(self, s: dict, t: dict, layers: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        fs = patch_tokens(s, f"hidden_states[{layers[0]}]", self.student_info, "student", self.where)
        ft = patch_tokens(t, f"hidden_states[{layers[1]}]", self.teacher_info, "teacher", self.where)
        same_patch_count(fs, ft, self.where)
        return fs, ft

    def mimic_loss(self, s: dict, t: dict) -> torch.Tensor:
        total = 0.0
        for i, layers in enumerate(self.shallow):
            fs, ft = self.pair(s, t, layers)
            if self.mimic_projectors is None:
                total = total + fn.masked_mse(token_correlation(fs), token_correlation(ft))
            else:
                total = total + fn.masked_mse(self.mimic_projectors[i](fs), ft)
        return total

    def generation_loss(self, s: dict, t: dict, batch: dict) -> torch.Tensor:
        fs, ft = self.pair(s, t, self.deep)
        x = self.align(fs)
        b, p, d = x.shape
        masked = random_token_mask(b, p, self.params.mask_ratio, x.device)
        x = torch.where(masked[..., None], self.mask_token.to(x.dtype).expand(b, p, d), x)
        generated = self.generator(x, patch_grid(p, batch, self.where))
        # ViTKD scores the masked positions only: the visible ones could be copied through
        return fn.masked_mse(generated, ft, masked)

    def forward(self, s, t, batch):
        require_images(batch, self.where)
        total = self.params.beta * self.generation_loss(s, t, batch)
        if self.shallow:
            total = total + self.params.alpha * self.mimic_loss(s, t)
        return total


def normalised_patches(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def sample_patches(total: int, samples: int, device=None) -> torch.Tensor:
    """Indices of `samples` distinct patches among all B·P of a batch (all of them when fewer), drawn from
    torch's global RNG so a seeded run draws the same ones."""
    return torch.randperm(total, device=device)[:samples]


def relation_gap(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """‖M_S − M_T‖_F² divided by the number of entries (the mean squared entry difference)."""
    return (student_map - teacher_map).pow(2).mean()


def intra_image_gap(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Per image, the P×P cosine map between its patches."""
    return relation_gap(fs @ fs.transpose(1, 2), ft @ ft.transpose(1, 2))


def inter_image_gap(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Per patch position, the B×B cosine map between the images' patches at that position."""
    fs, ft = fs.transpose(0, 1), ft.transpose(0, 1)
    return relation_gap(fs @ fs.transpose(1, 2), ft @ ft.transpose(1, 2))


def random_patch_gap(fs: torch.Tensor, ft: torch.Tensor, samples: int) -> torch.Tensor:
    """The K×K cosine map between K patches drawn from the whole batch (the same K on both sides)."""
    picked = sample_patches(fs.shape[0] * fs.shape[1], samples, fs.device)
    xs, xt = fs.reshape(-1, fs.shape[-1])[picked], ft.reshape(-1, ft.shape[-1])[picked]
    return relation_gap(xs @ xs.T, xt @ xt.T)


class ManifoldKDParams(TermParams):
    type: Literal["manifoldkd"] = "manifoldkd"
    layers: LayerSpec = "uniform"
    intra: float = Field(4.0, ge=0, description="weight of the intra-image map (P×P per image); w_patch in the "
                                                 "paper's code")
    inter: float = Field(0.1, ge=0, description="weight of the inter-image map (B×B per patch position); w_sample")
    random: float = Field(0.2, ge=0, description="weight of the map of K patches sampled across the batch; w_rand")
    samples: int = Field(192, ge=2, description="K, the patches sampled for the random map")


@register_loss("manifoldkd")
class ManifoldKD(LayerPairTerm):
    """Fine-grained manifold distillation: patch features are L2-normalised along the width and their
    cosine relation maps (intra-image, inter-image, randomly sampled) are matched by mean squared
    difference, averaged over the layer pairs. The maps have no width, so no projector is needed."""

    Params = ManifoldKDParams
    teacher_fix = FEATURES_FIX

    def __init__(self, params, student, teacher, where="losses"):
        transformer_student(student, where)
        super().__init__(params, student, teacher, where)
        same_patch_grid(student, teacher, where)

    def forward(self, s, t, batch):
        require_images(batch, self.where)
        p = self.params
        total = 0.0
        for a, b in self.map.pairs:
            fs = patch_tokens(s, f"hidden_states[{a}]", self.student_info, "student", self.where)
            ft = patch_tokens(t, f"hidden_states[{b}]", self.teacher_info, "teacher", self.where)
            same_patch_count(fs, ft, self.where)
            fs, ft = normalised_patches(fs), normalised_patches(ft)
            total = total + p.intra * intra_image_gap(fs, ft) + p.inter * inter_image_gap(fs, ft)
            if p.random:  # skip the draw when unused: it would move the RNG for nothing
                total = total + p.random * random_patch_gap(fs, ft, p.samples)
        # averaged, not summed, over layers (as the paper's code): the weights keep their meaning at any depth
        return total / len(self.map.pairs)


__all__ = ["ViTKD", "ManifoldKD", "random_token_mask", "token_correlation", "patch_tokens"]
