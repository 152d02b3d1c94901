"""Image data: folders of images (one folder per class), and seeded views (the digits corpus is in corpora).

A record is `{"image": float array (C, H, W) in [0, 1]}` or `{"image_path": FILE}`, plus `label` and a
stable `id`. Augmentation is a pure function of a view seed: the seed of record r in epoch e is a hash
of (run seed, r's id, e), so any augmented view can be made again exactly, which is what lets a
teacher store (TinyViT) hold the teacher's outputs on the very views the student later trains on.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kdistill.data.corpora import check_split
from kdistill.errors import ConfigError, DataError, PairingError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_FOLDERS = {"train": ("train",), "eval": ("dev", "eval", "val", "validation"), "test": ("test",)}


# ---------------------------------------------------------------- folders of images


def is_image_record(record: dict) -> bool:
    """Pixels (`image`) or an image file (`image_path`), rather than a text."""
    return "image" in record or "image_path" in record


def is_image_folder(path: str) -> bool:
    """A folder of class folders of images, or of split folders (train/, test/, ...) holding those."""
    root = Path(path)
    subdirs = [d for d in root.iterdir() if d.is_dir()]
    if not subdirs:
        return False
    splits = [d for d in subdirs if any(d.name in names for names in SPLIT_FOLDERS.values())]
    for folder in (splits or subdirs)[:3]:
        inner = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
        if inner:
            return True
    return False


def image_folder(path: str, split: str) -> list[dict]:
    """Records of `path/CLASS/*.png`, or of `path/SPLIT/CLASS/*.png` when split folders exist."""
    root = Path(path)
    split = check_split(split)
    split_dirs = [root / name for name in SPLIT_FOLDERS[split] if (root / name).is_dir()]
    has_splits = any((root / n).is_dir() for names in SPLIT_FOLDERS.values() for n in names)
    if has_splits and not split_dirs:
        raise DataError(f"{path} has split folders but none for split {split!r} "
                        f"(looked for {', '.join(SPLIT_FOLDERS[split])}): add a {SPLIT_FOLDERS[split][0]}/ folder "
                        f"of class folders" + (", which `kdistill compare` scores students on" if split == "test" else
                                               ", or name other data for it in the recipe"))
    base = split_dirs[0] if split_dirs else root
    records = []
    for class_dir in sorted(d for d in base.iterdir() if d.is_dir()):
        for file in sorted(class_dir.rglob("*")):
            if file.suffix.lower() in IMAGE_EXTENSIONS:
                records.append({"image_path": str(file), "label": class_dir.name,
                                "id": str(file.relative_to(root))})
    if not records:
        raise DataError(f"{base} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in class folders")
    return records


def read_image(path: str, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return image_array(img, channels)
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


def image_array(img, channels: int | None = None) -> np.ndarray:
    """(channels, H, W) in [0, 1] from a PIL image; channels None keeps grey images grey and makes others RGB.
    16- and 32-bit grey images are scaled by their own range: PIL's convert("L") clips them at 255, which reads
    a 16-bit image as nearly all white."""
    if channels is None:
        channels = 1 if img.mode in ("1", "L", "F") or img.mode.startswith("I") else 3
    if img.mode.startswith("I"):  # "I;16", "I;16B", "I": integer grey, 16 bits in practice (PNG, TIFF)
        grey = np.asarray(img, dtype=np.float32) / 65535.0
    elif img.mode == "F":  # float grey, taken to be in [0, 1]
        grey = np.asarray(img, dtype=np.float32)
    else:
        array = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    grey = np.clip(grey, 0.0, 1.0)[None]
    return grey if channels == 1 else np.repeat(grey, channels, axis=0)


LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601-2, PIL's weights for RGB -> "L"

JPEG_END = b"\xff\xd9"  # the end-of-image marker a complete JPEG closes with
JPEG_TAIL = 4096  # bytes searched for it: some writers append metadata after it


def check_images_open(records: list[dict], prefix: str = "") -> None:
    """Every image file opened and verified before the first step: a file that is no image, an empty one, a PNG
    cut short (verify reads its chunks' checksums, without decoding) or a JPEG cut short stops the run now
    rather than when its batch comes up, possibly hours in. A JPEG is decoded only when its end marker is not
    near its end, which a complete file's is."""
    from PIL import Image, UnidentifiedImageError

    for record in records:
        path = record.get("image_path")
        if path is None:
            continue
        try:
            with Image.open(path) as img:
                jpeg = img.format == "JPEG"
                img.verify()
            if jpeg and not jpeg_end_near_the_end(path):
                with Image.open(path) as img:
                    img.load()  # PIL says "image file is truncated" if it is
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:  # PIL's verify raises all three
            raise DataError(f"{prefix}data: cannot read image {path} ({err}); remove or replace the file") from None


def jpeg_end_near_the_end(path) -> bool:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - JPEG_TAIL))
        return JPEG_END in f.read()


# ---------------------------------------------------------------- seeded views


def view_seed(run_seed: int, record_id: str, epoch: int) -> int:
    """The augmentation seed of one record in one epoch (63-bit, the same on every machine)."""
    digest = hashlib.sha1(f"{run_seed}:{record_id}:{epoch}".encode()).hexdigest()
    return int(digest[:15], 16)


def view_params(seed: int, shift: float, rotate: float, scale: tuple[float, float]) -> tuple[float, float, float, float]:
    """(angle in radians, shift x, shift y as fractions of the half-size, scale) drawn from `seed`."""
    u = torch.rand(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
    angle = math.radians((2 * u[0] - 1) * rotate)
    return angle, (2 * u[1] - 1) * shift * 2, (2 * u[2] - 1) * shift * 2, scale[0] + u[3] * (scale[1] - scale[0])


def affine_views(images: torch.Tensor, params: list[tuple[float, float, float, float]]) -> torch.Tensor:
    """Rotate, scale and shift each image (B, C, H, W) by its own parameters; outside is filled with 0."""
    thetas = []
    for angle, tx, ty, scale in params:
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        thetas.append([[cos, -sin, tx], [sin, cos, ty]])
    theta = torch.tensor(thetas, dtype=images.dtype, device=images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class ImageCollator:
    """Records to `pixel_values` (B, C, S, S), resized and normalised, plus `labels`.

    A record with a `view_seed` is augmented with that seed (training); one without is not (eval, test).
    """

    def __init__(self, image_size: int, channels: int, label_to_id: Mapping[str, int] | None = None,
                 augment=None, mean: float = 0.5, std: float = 0.5):
        self.image_size, self.channels = image_size, channels
        self.label_to_id = dict(label_to_id) if label_to_id is not None else None
        self.augment, self.mean, self.std = augment, mean, std

    def images(self, records: Sequence[dict]) -> torch.Tensor:
        out = []
        for r in records:
            array = r["image"] if "image" in r else read_image(r["image_path"], self.channels)
            x = torch.as_tensor(np.asarray(array, dtype=np.float32))
            if x.shape[0] != self.channels:
                if x.shape[0] == 1:
                    x = x.expand(self.channels, -1, -1)
                elif self.channels == 1 and x.shape[0] == 3:  # the luma PIL's convert("L") gives a file's image
                    x = (x * LUMA.view(3, 1, 1)).sum(0, keepdim=True)
                else:
                    raise DataError(f"record {r.get('id')} has {x.shape[0]} channels; the model takes {self.channels}")
            # antialiased, as PIL's bilinear resize in the saved image processor is (it matters only when shrinking)
            out.append(F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bilinear",
                                     align_corners=False, antialias=True)[0])
        return torch.stack(out)

    def __call__(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not records:
            raise DataError("cannot collate an empty batch")
        x = self.images(records)
        seeded = [i for i, r in enumerate(records) if "view_seed" in r]
        if self.augment is not None and seeded:
            a = self.augment
            params = [view_params(records[i]["view_seed"], a.shift, a.rotate, tuple(a.scale)) for i in seeded]
            x[seeded] = affine_views(x[seeded], params)
        batch = {"pixel_values": (x - self.mean) / self.std}
        if self.label_to_id is not None and all(r.get("label") is not None for r in records):
            try:
                batch["labels"] = torch.tensor([self.label_to_id[str(r["label"])] for r in records])
            except KeyError as err:
                raise DataError(f"label {err.args[0]!r} is not one of the {len(self.label_to_id)} classes "
                                f"of the training data") from None
        return batch


def image_shape(config, data_size: int | None) -> tuple[int, int]:
    """(image size, channels) the model takes: the recipe's data.image_size, else the model's own."""
    size = data_size or getattr(config, "image_size", None)
    if size is None:
        raise ConfigError("data.image_size: this image model's config has no image_size; give data.image_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size), int(getattr(config, "num_channels", 3))


def fixed_input(config) -> tuple[int | None, int | None]:
    """(image size, channels) a model is fixed to: a patch model's size (its positions), any model's channels."""
    size = getattr(config, "image_size", None) if getattr(config, "patch_size", None) else None
    return (size[0] if isinstance(size, (list, tuple)) else size), getattr(config, "num_channels", None)


def check_models_agree(models: dict) -> None:
    """Teacher and student fixed to different inputs cannot share a batch, whatever data.image_size says: name the
    way out (a student built from the teacher takes its input) rather than a size one of them then refuses."""
    if len(models) != 2:
        return
    (first, a), (second, b) = ((where, fixed_input(model.config)) for where, model in models.items())
    clashes = [(x, y, unit) for x, y, unit in ((a[0], b[0], "px"), (a[1], b[1], "-channel")) if None not in (x, y)
               and x != y]
    if clashes:
        def said(side):
            return " ".join(f"{side[0]}×{side[0]}" if unit == "px" else f"{side[1]}-channel" for *_, unit in clashes)

        raise PairingError(f"{first} takes {said(a)} images and {second} {said(b)}: they cannot read the same batch. "
                           f"A student built from the teacher takes the teacher's input (`student: {{config: "
                           f"{{num_hidden_layers: 3, hidden_size: 192}}}}`, or `from_teacher: {{layers: [...]}}`); "
                           f"or pair a student made for the teacher's images")


def check_image_fits(models: dict, collator: ImageCollator, records: dict[str, list[dict]], prefix: str = "") -> None:
    """Images the models can read, named before the first step (the models' own errors come from deep inside
    their forward): image records in each split ({"train": ..., "eval": ...}), each model's channel count, and a
    ViT's fixed input size."""
    for split, rows in records.items():
        text = next((r for r in rows if not is_image_record(r)), None)
        if text is not None:
            raise DataError(f"{prefix}data.{split}: an image model {'trains' if split == 'train' else 'is scored'} on "
                            f"images (a folder of class folders, a table with `image: FIELD`, or the digits corpus), "
                            f"but a record has none: {str(text.get('text', text))[:60]!r}")
    check_models_agree(models)
    for where, model in models.items():
        config = model.config
        channels = getattr(config, "num_channels", None)
        if channels is not None and channels != collator.channels:
            raise PairingError(f"{where} reads {channels}-channel images and the data is made {collator.channels}-"
                               f"channel for the other model: pair models with the same channels")
        size = getattr(config, "image_size", None) if getattr(config, "patch_size", None) else None
        if size is not None and size != collator.image_size:  # patch models have a fixed number of positions
            raise PairingError(f"{where} takes {size}×{size} images, but they are resized to {collator.image_size}×"
                               f"{collator.image_size} (data.image_size, else the student's size): set "
                               f"data.image_size to {size}, or pair models of one input size")


def image_processor(image_size: int, channels: int, mean: float = 0.5, std: float = 0.5):
    """The preprocessing ImageCollator does (bilinear resize, scale to [0, 1], normalise), as a transformers
    image processor saved with the student, so `AutoImageProcessor.from_pretrained(DIR)` prepares images alike."""
    try:  # the PIL implementation: torchvision (the default backend) does not install beside our torch
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor

    return Processor(size={"height": image_size, "width": image_size}, image_mean=[mean] * channels,
                     image_std=[std] * channels, resample=2, do_convert_rgb=channels == 3)


__all__ = ["image_processor", "ImageCollator", "affine_views", "check_images_open", "image_folder", "image_shape",
           "is_image_folder", "is_image_record", "read_image", "view_params", "view_seed"]
