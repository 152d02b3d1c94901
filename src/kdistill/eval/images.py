"""Image classifiers: test accuracy, images/second, and per-layer CKA between a student and its teacher."""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from kdistill.errors import DataError


def collator_for(model, image_size: int | None = None):
    from kdistill.data.images import ImageCollator, image_shape

    size, channels = image_shape(model.config, image_size)
    return ImageCollator(size, channels)


def predict(model, records: Sequence[dict], batch_size: int = 128) -> torch.Tensor:
    collate = collator_for(model)
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(records), batch_size):
            pixels = collate(records[start:start + batch_size])["pixel_values"]
            out.append(model(pixel_values=pixels).logits.argmax(-1))
    return torch.cat(out)


def image_accuracy(model, records: Sequence[dict], label_names: Sequence[str]) -> float:
    """Share of images whose argmax is their label's class (a DeiT student: the two heads averaged)."""
    index = {str(name): i for i, name in enumerate(label_names)}
    labelled = [r for r in records if r.get("label") is not None]
    if not labelled:
        raise DataError("accuracy needs labelled images")
    unknown = sorted({str(r["label"]) for r in labelled} - set(index))
    if unknown:
        raise DataError(f"labels {', '.join(unknown[:10])} are not among the model's {len(index)} classes")
    target = torch.tensor([index[str(r["label"])] for r in labelled])
    return float((predict(model, labelled) == target).float().mean())


def image_speed(models: dict, records: Sequence[dict], batch_size: int = 128, repeats: int = 3) -> dict[str, float]:
    """Images/second of each {name: model} on the same images: warm-up first, then interleaved timed
    passes (a neighbour's load falls on all models alike), best pass per model."""
    if not records:
        raise DataError("no images to time")
    batches = {}
    for name, model in models.items():
        collate = collator_for(model)
        batches[name] = [collate(records[i:i + batch_size])["pixel_values"] for i in range(0, len(records), batch_size)]
        model.eval()
        with torch.inference_mode():
            model(pixel_values=batches[name][0])
    best = {name: math.inf for name in models}
    with torch.inference_mode():
        for _ in range(max(1, repeats)):
            for name, model in models.items():
                start = time.perf_counter()
                for pixels in batches[name]:
                    model(pixel_values=pixels)
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(records) / max(seconds, 1e-9) for name, seconds in best.items()}


def layer_cka(student, teacher, records: Sequence[dict], tokens: str = "all", limit: int = 256) -> list[list[float]]:
    """Linear CKA between every student layer and every teacher layer (rows: student layers 1..N,
    columns: teacher layers 1..M) on up to `limit` images, features flattened over the chosen tokens."""
    from kdistill.losses.cka import linear_cka
    from kdistill.models.arch import model_info

    records = list(records[:limit])
    features = []
    for model in (student, teacher):
        info = model_info(model, "image-classification")
        collate = collator_for(model)
        model.eval()
        with torch.inference_mode():
            hidden = model(pixel_values=collate(records)["pixel_values"], output_hidden_states=True).hidden_states
        layers = []
        for h in hidden[1:]:
            h = h[:, info.prefix_tokens:] if tokens == "patches" else h[:, :1] if tokens == "cls" else h
            layers.append(h.reshape(h.shape[0], -1).double())
        features.append(layers)
    return [[float(linear_cka(s, t)) for t in features[1]] for s in features[0]]
