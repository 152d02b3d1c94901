"""The recipe's data blocks: where a stage's records come from (built-in corpora, files, datasets), their
augmentation and how they are batched; with Strict, the base of every recipe block, and `suggest` for unknown
names. kdistill.config re-exports them."""
from __future__ import annotations

import os
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from kdistill.errors import did_you_mean

# a file or folder the user names: `~` means their home, as in a shell (it made a folder named ~ in the working one)
UserPath = Annotated[str, AfterValidator(os.path.expanduser)]


def takes_bool(annotation) -> bool:
    """Whether a field of this type means a yes/no anywhere in it (pydantic would read `true` as 1 for a number)."""
    if annotation is bool or annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return any(isinstance(v, bool) for v in get_args(annotation))
    if origin in (Union, UnionType, Annotated):
        return any(takes_bool(a) for a in get_args(annotation))
    return False


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_no_for_numbers(cls, value, info):
        if isinstance(value, bool) and not takes_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{str(value).lower()} is a yes/no; this field takes a number or a name")
        return value


def suggest(name: str, valid, kind: str) -> str:
    return f"unknown {kind} {name!r}{did_you_mean(name, valid)} valid: {', '.join(valid)}"


class Augment(Strict):
    copies: int = Field(4, ge=1, description="augmented copies per record (the original is kept)")
    replace_prob: float = Field(0.4, gt=0, le=1, description="chance of replacing each word with a synonym")


class DataSource(Strict):
    source: str | None = None
    path: UserPath | None = None
    dataset: str | None = None
    config: str | None = None
    split: str | None = None
    text: str = "text"
    label: str | None = None
    text_pair: str | None = None
    image: str | None = Field(None, description="the field holding an image file's path (relative to the data "
                              "file's folder) or a dataset's image column: the records are images, not texts")
    limit: int | None = Field(None, ge=1, description="the first N records (of the split)")
    sample: int | None = Field(None, ge=1, description="N records drawn at random, the same N every run (a fixed "
                               "seed, not train.seed, so every seed and baseline sees them), in the source's order")
    augment: Augment | None = Field(None, description="TinyBERT-style WordNet synonym replacement (train only)")

    @model_serializer(mode="wrap")
    def _absent_when_unset(self, handler):
        # `sample` and `image` came after checkpoints, teacher stores and compare baselines were keyed by a source's
        # dump: unset, they dump as if they did not exist, so those keys stay as they were
        dumped = handler(self)
        for later in ("sample", "image"):
            if isinstance(dumped, dict) and dumped.get(later) is None:
                dumped.pop(later, None)
        return dumped

    @model_validator(mode="after")
    def exactly_one(self):
        given = [k for k in ("source", "path", "dataset") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of source, path, dataset (got {given or 'none'})")
        if self.source is not None:
            from kdistill.data.corpora import CORPORA

            if self.source not in CORPORA:
                raise ValueError(suggest(self.source, CORPORA.names(), "corpus"))
        return self


class ImageAugment(Strict):
    """Random views of training images, seeded per image and epoch so any view can be replayed."""
    shift: float = Field(0.1, ge=0, le=0.5, description="largest shift, as a fraction of the image size")
    rotate: float = Field(10.0, ge=0, le=180, description="largest rotation in degrees")
    scale: tuple[float, float] = Field((0.9, 1.1), description="range of the zoom factor")
    seed: int = Field(0, description="views come from this seed, not train.seed, so one teacher store of the "
                      "views serves every training seed")

    @model_validator(mode="after")
    def ordered(self):
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be [low, high] with 0 < low <= high, got {list(self.scale)}")
        return self


class DataConfig(Strict):
    train: DataSource | list[DataSource]
    eval: DataSource | list[DataSource] | None = None
    max_length: int = Field(128, ge=8)
    eval_limit: int = Field(256, ge=1, description="eval records used during training")
    group_by_length: bool = Field(False, description="batch texts of similar length together (less padding)")
    loss_on: Literal["all", "completion"] = Field(
        "all", description="causal LMs: the positions of a data batch the loss is taken on: every token, or only those "
        "that predict the tokens after each record's `prompt` (after the first half of its tokens where it has none, "
        "as on-policy prompts are cut), like TRL's completion-only loss")
    image_size: int | None = Field(None, ge=4, description="images: resize to this (default: the model's image_size)")
    image_augment: ImageAugment | None = Field(None, description="images: seeded random views for training")

    @model_validator(mode="after")
    def augment_trains_only(self):
        sources = self.eval if isinstance(self.eval, list) else [self.eval] if self.eval is not None else []
        if any(s.augment is not None for s in sources):  # evaluation reads the plain records
            raise ValueError("eval: augment makes copies of training records only; move it to data.train")
        return self
