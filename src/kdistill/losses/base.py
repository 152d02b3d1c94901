"""Loss terms: named, weighted losses between student and teacher taps.

A term declares the taps it reads, computes a mean over its own items (tokens, sequences, masked
tokens, ...) and says how many items a batch holds (`count`), so the engine can weight micro-batches
and processes by real item counts and one optimizer step equals one big batch exactly.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from kdistill.config import Strict
from kdistill.errors import PairingError
from kdistill.models.arch import ModelInfo
from kdistill.models.layer_map import LayerMap
from kdistill.registry import Registry

LOSSES: Registry[type["LossTerm"]] = Registry("loss")

# taps with one row per image, not one per token
PER_IMAGE_TAPS = ("pooled", "logits", "cls_logits", "distillation_logits", "distillation_token", "lm_head")


def image_token_rows(kind: str, info: ModelInfo) -> int | None:
    """Token rows per image in an image transformer's tap of this kind; None for text models and per-image taps."""
    if not info.patches or kind in PER_IMAGE_TAPS:
        return None
    return info.patches + (0 if kind == "patches" else info.prefix_tokens)


def same_image_tokens(pairs: list[tuple[str, str]], student: ModelInfo, teacher: ModelInfo, where: str) -> None:
    """Terms that compare tokens position by position need both image models to cut an image into the same
    tokens (torch's own error is a shape mismatch from deep inside the loss)."""
    from kdistill.models.taps import parse_tap

    for a, b in pairs:
        rows = image_token_rows(parse_tap(a, student)[0], student), image_token_rows(parse_tap(b, teacher)[0], teacher)
        if None not in rows and rows[0] != rows[1]:
            raise PairingError(
                f"{where}: the student's {a} has {rows[0]} tokens per image and the teacher's {b} {rows[1]} (student "
                f"{student.prefix_tokens} prefix + {student.patches} patches, teacher {teacher.prefix_tokens} + "
                f"{teacher.patches}), and this loss pairs them position by position: give both models the same patch "
                f"grid (image_size / patch_size) and prefix tokens, or compare patches only (hidden_mse's "
                f"student_tap and teacher_tap: patches[i], vitkd, manifoldkd, cka with tokens: patches)")


def register_loss(name: str):
    def add(cls):
        cls.type_name = name
        return LOSSES.register(name)(cls)

    return add


class TermParams(Strict):
    type: str
    weight: float = Field(1.0, ge=0, description="a negative weight would push the student away from the target")
    name: str | None = None  # how the term is logged; defaults to its type


class LossTerm(nn.Module):
    Params: ClassVar[type[TermParams]] = TermParams
    type_name: ClassVar[str] = ""
    needs_mlm: ClassVar[bool] = False  # the batch must carry masked input_ids and mlm_labels
    needs_teacher: ClassVar[bool] = True

    @classmethod
    def store_refusal(cls, params: TermParams) -> str | None:
        """None when a term with these params can train beside a teacher store (top-k log-probabilities, as
        SparseLogits), or needs no teacher; else why not, as a phrase after the term's name ("" when the term
        needs the live teacher whatever its params). A class method, so a recipe is checked before an automatic
        store is built for it."""
        return "" if cls.needs_teacher else None

    def __init__(self, params: TermParams, student: ModelInfo, teacher: ModelInfo, where: str = "losses"):
        super().__init__()
        self.params = params
        self.student_info = student
        self.teacher_info = teacher
        self.where = where
        self.weight = params.weight

    @property
    def name(self) -> str:
        return self.params.name or self.type_name

    def student_taps(self) -> list[str]:
        raise NotImplementedError

    def uses_labels(self) -> bool:
        """Whether a classifier's batches must carry class labels for this term (checked once the data is read, so
        unlabelled data fails before training, not at its first step)."""
        return False

    def teacher_taps(self) -> list[str]:
        return []

    def count(self, batch: dict) -> int:
        """How many items this term's mean runs over in `batch` (default: real tokens; the generated positions of an
        on-policy batch; one per image)."""
        return token_count(batch)

    def forward(self, s: dict, t: dict, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    # Extension points for methods with a schedule (TAID's α, Theseus' replacement rate): `after_step`
    # runs once per optimizer step with every term's value for that step (averaged over all micro-batches
    # and processes); `method_state` is saved in every checkpoint and handed back on resume.
    def after_step(self, step: int, total_steps: int, parts: dict[str, float] | None = None) -> None:
        pass

    def method_state(self) -> dict:
        return {}

    def load_method_state(self, state: dict) -> None:
        pass

    # Extension point for terms with a learned map between student and teacher features (`self.projector`):
    # before the first step the engine collects the rows they return over a few batches and sets the
    # projector to the least-squares map between them.
    def fits_projector(self) -> bool:
        return False

    def projector_rows(self, s: dict, t: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def token_count(batch: dict) -> int:
    if "loss_mask" in batch:  # on-policy batches count the generated positions only
        return int(batch["loss_mask"].sum())
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    pixels = batch["pixel_values"]
    return int(pixels.shape[0])


def sequence_count(batch: dict) -> int:
    key = "input_ids" if "input_ids" in batch else "pixel_values"
    return int(batch[key].shape[0])


def make_projector(kind: str, student_width: int, teacher_width: int, where: str) -> nn.Module | None:
    """FitNets' learned W when widths differ (or always, with `projector: linear`); trained with the student,
    dropped on export."""
    if kind == "linear" or (kind == "auto" and student_width != teacher_width):
        return nn.Linear(student_width, teacher_width)
    if student_width != teacher_width:
        raise PairingError(
            f"{where}: student width {student_width} differs from teacher width {teacher_width} "
            f"and projector is 'none'; set projector: auto (a learned linear map)"
        )
    return None


class LeastSquares:
    """Running sums for the ridge least-squares map x -> y (rows are items), so a fit can see many batches
    in memory that does not grow with them (an LLM's 256 × 2,048 tokens would not fit as rows)."""

    def __init__(self):
        self.n, self.sx, self.sy, self.xx, self.xy = 0, 0.0, 0.0, 0.0, 0.0

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        self.n += x.shape[0]
        self.sx, self.sy = self.sx + x.sum(0), self.sy + y.sum(0)
        self.xx, self.xy = self.xx + x.T @ x, self.xy + x.T @ y

    @torch.no_grad()
    def solve_into(self, layer: nn.Linear, ridge: float = 1e-3) -> None:
        """The ridge is relative to the features' mean variance, so fewer items than features still give
        a finite map."""
        x_mean, y_mean = self.sx / self.n, self.sy / self.n
        gram = self.xx - self.n * torch.outer(x_mean, x_mean)  # the centred sums
        cross = self.xy - self.n * torch.outer(x_mean, y_mean)
        gram = gram + torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device) * (
            ridge * gram.diagonal().mean() + 1e-12)
        weight = torch.linalg.solve(gram, cross)  # (in, out)
        layer.weight.copy_(weight.T.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_((y_mean - x_mean @ weight).to(layer.bias.dtype))


def layer_map(spec, student: ModelInfo, teacher: ModelInfo, where: str) -> LayerMap:
    return LayerMap.resolve(spec, student.num_layers, teacher.num_layers, f"{where}.layers")


def same_heads(student: ModelInfo, teacher: ModelInfo, where: str, hint: str) -> None:
    if student.num_heads != teacher.num_heads:
        raise PairingError(
            f"{where}: student has {student.num_heads} attention heads, teacher {teacher.num_heads}; "
            f"this loss compares heads one to one. {hint}"
        )



class LayerPairTerm(LossTerm):
    """A term over mapped (student layer, teacher layer) pairs of hidden states, one item per sequence or
    image (ManifoldKD, CKA): the teacher must have layers, and the map at least one pair."""

    teacher_fix = "use a transformer teacher (a convnet has no layers of tokens), run live (teacher.source: live)"

    def __init__(self, params, student, teacher, where="losses"):
        super().__init__(params, student, teacher, where)
        if teacher.num_layers < 1:
            raise PairingError(f"{where}: the teacher has no transformer layers to read hidden states from; "
                               f"{self.teacher_fix}")
        self.map = layer_map(params.layers, student, teacher, where)
        if not self.map.pairs:
            raise PairingError(f"{where}.layers: no layer pairs; give at least one [student_layer, teacher_layer]")

    def student_taps(self):
        return [f"hidden_states[{a}]" for a, _ in self.map.pairs]

    def teacher_taps(self):
        return [f"hidden_states[{b}]" for _, b in self.map.pairs]

    def count(self, batch):
        return sequence_count(batch)


def token_mask(batch: dict, like: torch.Tensor, skip_cls: bool = False) -> torch.Tensor | None:
    """Boolean (B, L) over the tokens (rows) of `like`, shaped (B, ..., L, D): the batch's attention mask,
    None when it has none. With skip_cls, position 0 is False as well; position 0 is [CLS] in the
    right-padded BERT-style batches these terms see."""
    mask = batch.get("attention_mask")
    if not skip_cls:
        return None if mask is None else mask.bool()
    if mask is None:
        if like is None:  # no tap read (an empty layer map): no rows to size, none compared
            return None
        keep = torch.ones(like.shape[0], like.shape[-2], dtype=torch.bool, device=like.device)
    else:
        keep = mask.bool().clone()  # .bool() of a bool mask is the batch's own tensor: never write into it
    keep[:, 0] = False
    return keep


def skip_cls_count(batch: dict, skip_cls: bool) -> int:
    """The term's items (real tokens, or query rows per head) less the position-0 ones skip_cls leaves
    out, so micro-batches are still weighted by what each mean really ran over."""
    n = token_count(batch)
    if not skip_cls:
        return n
    key = "loss_mask" if "loss_mask" in batch else "attention_mask"
    if key in batch:
        return n - int(batch[key][:, 0].bool().sum())
    return n  # images count one item per image either way (every image has the same tokens)
