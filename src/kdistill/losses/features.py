"""Hint terms on hidden features: per-layer hidden states and pooled sentence embeddings."""
from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import BeforeValidator, Field, model_validator

from kdistill.errors import PairingError, did_you_mean
from kdistill.losses import functional as fn
from kdistill.models.layer_map import PAIRS_EXAMPLE
from kdistill.models.taps import parse_tap, tap_name, tap_spelling
from kdistill.losses.base import (LossTerm, TermParams, layer_map, make_projector, register_loss, same_image_tokens,
                                  sequence_count, skip_cls_count, token_mask)


def layer_spec_shape(value):
    """A misspelt map name or a list of single layers, named with the form a map takes (pydantic's own messages
    list the union's branches)."""
    if isinstance(value, str) and value not in ("uniform", "last"):
        raise ValueError(f"unknown layer map {value!r}{did_you_mean(value, ('uniform', 'last')) or ';'} valid: "
                         f"uniform, last, or {PAIRS_EXAMPLE}")
    if isinstance(value, list) and not all(isinstance(pair, (list, tuple)) for pair in value):
        raise ValueError(f"a layer map is {PAIRS_EXAMPLE}; got {value!r}")
    return value


# an empty map would leave the term nothing to sum (torch.cat of no tensors)
LayerSpec = Annotated[Literal["uniform", "last"] | Annotated[list[tuple[int, int]], Field(min_length=1)],
                      BeforeValidator(layer_spec_shape)]

# Features a hidden term compares (through a projector between hidden widths): per token, or one per sequence.
TOKEN_FEATURES = ("hidden_states", "embeddings", "head_input", "patches")
SEQUENCE_FEATURES = ("pooled", "distillation_token")
PREDICTIONS = ("logits", "cls_logits", "distillation_logits")  # a DeiT head against a teacher's logits
HIDDEN_WIDTH = TOKEN_FEATURES + SEQUENCE_FEATURES + ("lm_head",)  # last dimension the hidden width: projectable

# Taps with no position 0 to leave out: one vector per sequence, or (patches) CLS already cut off.
NO_CLS_POSITION = ("pooled", "cls_logits", "distillation_logits", "distillation_token", "patches")


class SkipCLSParams(TermParams):
    # Mean-pooling teachers (all-MiniLM-L6-v2 and classifiers tuned from it) carry one constant [CLS]
    # vector in most layers; matching it teaches the student a constant that its classifier head reads.
    skip_cls: bool = Field(False, description="leave position 0 ([CLS]) out: its token, or its query row")


class HiddenParams(SkipCLSParams):
    layers: LayerSpec = "uniform"
    projector: Literal["auto", "linear", "none"] = "auto"
    # A random projector is far from any useful map and moves at the student's learning rate: in a few
    # hundred steps it never fits, and a narrow student fed gradients through it settles on the teacher's
    # mean state (docs/results.md). `fit` starts it at the least-squares map on training records instead.
    projector_init: Literal["fit", "random"] = Field(
        "fit", description="fit: the least-squares map from the student's states to the teacher's on 256 "
        "records spread through the training data; random: nn.Linear's default initialisation")
    student_tap: str | None = Field(None, description="compare these two named taps instead of a layer map")
    teacher_tap: str | None = None
    # Centring removes what every token shares, so the distance compares only how tokens differ (a probe
    # for the narrow students' collapse, docs/results.md; it did not cure it there).
    center: bool = Field(False, description="subtract each sequence's mean over its compared tokens from the "
                         "student's and the teacher's states before the distance")
    # MobileBERT's released distillation compares layer-normalised feature maps (docs/encoders/mobilebert.md)
    layer_norm: bool = Field(False, description="normalise each token's state over its features (zero mean, unit "
                             "variance, no learned scale) on both sides before the distance")

    @model_validator(mode="after")
    def taps_in_pairs(self):
        if (self.student_tap is None) != (self.teacher_tap is None):
            given = "student_tap" if self.teacher_tap is None else "teacher_tap"
            raise ValueError(f"{given} names one side of a pair: give both student_tap and teacher_tap (e.g. "
                             f"student_tap: hidden_states[2], teacher_tap: hidden_states[5]), or neither")
        for field in ("student_tap", "teacher_tap"):
            if getattr(self, field) is not None:
                try:
                    tap_spelling(getattr(self, field), field)
                except PairingError as err:
                    raise ValueError(str(err)) from None
        return self


class HiddenMSEParams(HiddenParams):
    type: Literal["hidden_mse"] = "hidden_mse"


class HiddenCosineParams(HiddenParams):
    type: Literal["hidden_cosine"] = "hidden_cosine"


class _HiddenTerm(LossTerm):
    """Sum over mapped layer pairs of a per-token distance between (projected) hidden states.

    skip_cls leaves position 0 out of the token mask: the mean runs over the other real tokens. It is
    refused (PairingError) for taps with no position 0 to leave out (pooled, cls/distillation heads
    and token, patches without CLS), and a 2-D (per-sequence) tap met at run time raises ValueError,
    rather than silently comparing the whole vector.
    """

    distance = staticmethod(fn.masked_mse)

    def __init__(self, params, student, teacher, where="losses"):
        super().__init__(params, student, teacher, where)
        if params.student_tap is not None:
            # canonical names (negative layers resolved) are the keys the tap reader produces
            self.pairs = [(tap_name(*parse_tap(params.student_tap, student, f"{where}.student_tap")),
                           tap_name(*parse_tap(params.teacher_tap, teacher, f"{where}.teacher_tap")))]
            projectable = check_tap_pair(params, student, teacher, where)
            if params.layer_norm and not projectable:
                raise PairingError(f"{where}.layer_norm: it standardises hidden states over their features, and "
                                   f"{params.student_tap!r} holds no hidden states; leave layer_norm out")
        else:
            pairs = layer_map(params.layers, student, teacher, where).pairs
            self.pairs = [(f"hidden_states[{a}]", f"hidden_states[{b}]") for a, b in pairs]
            projectable = True
        if params.skip_cls:
            kinds = {parse_tap(name, info)[0] for pair in self.pairs for name, info in zip(pair, (student, teacher))}
            if kinds & set(NO_CLS_POSITION):
                raise PairingError(f"{where}.skip_cls: tap kind(s) {sorted(kinds & set(NO_CLS_POSITION))} have no "
                                   f"[CLS] position to leave out; use hidden_states[i] taps or skip_cls: false")
        same_image_tokens(self.pairs, student, teacher, where)
        self.projector = (make_projector(params.projector, student.hidden_size, teacher.hidden_size, where)
                          if projectable else None)

    def student_taps(self):
        return [a for a, _ in self.pairs]

    def teacher_taps(self):
        return [b for _, b in self.pairs]

    def count(self, batch):
        return skip_cls_count(batch, self.params.skip_cls)

    def fits_projector(self):
        return self.projector is not None and self.params.projector_init == "fit"

    def projector_rows(self, s, t, batch):
        """One map for every layer pair (the projector is shared), fitted on the tokens the loss compares."""
        xs, ys = [], []
        for a, b in self.pairs:
            hs, ht = s[a], t[b]
            if hs.dim() == 3:
                mask = token_mask(batch, hs, self.params.skip_cls)
                hs, ht = (hs[mask], ht[mask]) if mask is not None else (hs.flatten(0, 1), ht.flatten(0, 1))
            xs.append(hs)
            ys.append(ht)
        return torch.cat(xs), torch.cat(ys)

    def forward(self, s, t, batch):
        skip = self.params.skip_cls
        total = 0.0
        for a, b in self.pairs:
            hs, ht = s[a], t[b]
            if self.projector is not None:
                hs = self.projector(hs)
            if skip and hs.dim() != 3:
                raise ValueError(f"{self.where}.skip_cls: tap {a!r} has shape {tuple(hs.shape)}, one vector per "
                                 f"sequence with no [CLS] position; set skip_cls: false for it")
            # pooled taps are one vector per sequence: no token mask applies
            mask = token_mask(batch, hs, skip) if hs.dim() == 3 else None
            if self.params.center:
                hs, ht = centred(hs, mask, self.where, a), centred(ht, mask, self.where, b)
            if self.params.layer_norm:
                hs, ht = F.layer_norm(hs, hs.shape[-1:]), F.layer_norm(ht, ht.shape[-1:])
            total = total + self.distance(hs, ht, mask)
        return total


def check_tap_pair(params, student, teacher, where: str) -> bool:
    """Two named taps must hold the same kind of tensor: a (B, H, L, L) attention map against (B, L, D) states
    broadcasts into a loss of nothing, and a per-sequence vector against per-token states fails inside torch.
    Returns whether a projector can map between them (their last dimension is the models' hidden width)."""
    kinds = [parse_tap(name, info)[0] for name, info in ((params.student_tap, student), (params.teacher_tap, teacher))]
    groups = [next((g for g in (TOKEN_FEATURES, SEQUENCE_FEATURES, PREDICTIONS) if k in g), (k,)) for k in kinds]
    if groups[0] != groups[1]:
        raise PairingError(f"{where}: student_tap {params.student_tap!r} and teacher_tap {params.teacher_tap!r} hold "
                           f"different kinds of tensor ({describe(kinds[0])} against {describe(kinds[1])}); pair "
                           f"per-token states ({', '.join(TOKEN_FEATURES)}) with per-token states, "
                           f"{' / '.join(SEQUENCE_FEATURES)} with each other, predictions ({', '.join(PREDICTIONS)}) "
                           f"with predictions, or a tap with one of its own kind")
    if kinds[0] in HIDDEN_WIDTH:
        return True
    if params.projector == "linear":  # its last dimension is no hidden width (classes, keys, a head's size)
        raise PairingError(f"{where}.projector: a projector maps hidden states between widths, and {kinds[0]} taps "
                           f"are no hidden states; leave projector at auto (none is made for them)")
    return False


def describe(kind: str) -> str:
    if kind in TOKEN_FEATURES:
        return "per-token states (B, L, D)"
    if kind in SEQUENCE_FEATURES:
        return "one vector per sequence (B, D)"
    return f"{kind} taps"


def centred(x, mask, where: str, tap: str):
    """Each sequence's states minus their mean over the tokens the loss compares."""
    if x.dim() != 3:
        raise ValueError(f"{where}.center: tap {tap!r} has one vector per sequence; nothing to centre")
    if mask is None:
        return x - x.mean(dim=1, keepdim=True)
    weights = mask.to(x.dtype).unsqueeze(-1)
    mean = (x * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    return x - mean


@register_loss("hidden_mse")
class HiddenMSE(_HiddenTerm):
    Params = HiddenMSEParams


@register_loss("hidden_cosine")
class HiddenCosine(_HiddenTerm):
    Params = HiddenCosineParams
    distance = staticmethod(fn.masked_cosine_distance)


class EmbeddingParams(TermParams):
    projector: Literal["auto", "linear", "none"] = "auto"


class EmbeddingCosineParams(EmbeddingParams):
    type: Literal["embedding_cosine"] = "embedding_cosine"


class EmbeddingMSEParams(EmbeddingParams):
    type: Literal["embedding_mse"] = "embedding_mse"
    scale: float = Field(1.0, gt=0, description="multiplies both embeddings first (MSE on small vectors is tiny)")


class _EmbeddingTerm(LossTerm):
    """Distance between pooled sentence embeddings (the model's own pooling), one item per sequence."""

    def __init__(self, params, student, teacher, where="losses"):
        super().__init__(params, student, teacher, where)
        self.projector = make_projector(params.projector, student.hidden_size, teacher.hidden_size, where)

    def student_taps(self):
        return ["pooled"]

    def teacher_taps(self):
        return ["pooled"]

    def count(self, batch):
        return sequence_count(batch)

    def pair(self, s, t):
        es = s["pooled"] if self.projector is None else self.projector(s["pooled"])
        return es, t["pooled"]


@register_loss("embedding_cosine")
class EmbeddingCosine(_EmbeddingTerm):
    Params = EmbeddingCosineParams

    def forward(self, s, t, batch):
        return fn.masked_cosine_distance(*self.pair(s, t))


@register_loss("embedding_mse")
class EmbeddingMSE(_EmbeddingTerm):
    Params = EmbeddingMSEParams

    def forward(self, s, t, batch):
        es, et = self.pair(s, t)
        return fn.masked_mse(es * self.params.scale, et * self.params.scale)
