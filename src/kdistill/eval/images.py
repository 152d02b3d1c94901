"""Image classifiers: test accuracy, images/second, and per-layer CKA between a student and its teacher."""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from kdistill.errors import DataError
from kdistill.eval.metrics import labelled_records
from kdistill.eval.timing import fastest_passes


def collator_for(model, image_size: int | None = None):
    from kdistill.data.images import ImageCollator, image_shape

    size, channels = image_shape(model.config, image_size)
    return ImageCollator(size, channels)


def pixels_for(model, collate, records: Sequence[dict]) -> torch.Tensor:
    """The records' pixels on the model's device (a model put on a GPU gets its batches there)."""
    return collate(records)["pixel_values"].to(next(model.parameters()).device)


def predict(model, records: Sequence[dict], batch_size: int = 128) -> torch.Tensor:
    collate = collator_for(model)
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(records), batch_size):
            pixels = pixels_for(model, collate, records[start:start + batch_size])
            out.append(model(pixel_values=pixels).logits.argmax(-1))
    return torch.cat(out).cpu()


def image_accuracy(model, records: Sequence[dict], label_names: Sequence[str]) -> float:
    """Share of images whose argmax is their label's class (a DeiT student: the two heads averaged)."""
    labelled, index = labelled_records(model, records, label_names)
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
        batches[name] = [pixels_for(model, collate, records[i:i + batch_size])
                         for i in range(0, len(records), batch_size)]
        model.eval()
        with torch.inference_mode():
            model(pixel_values=batches[name][0])

    def one_pass(name: str, model) -> None:
        for pixels in batches[name]:
            model(pixel_values=pixels)

    with torch.inference_mode():
        best = fastest_passes({name: (model, partial(one_pass, name, model)) for name, model in models.items()}, repeats)
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
            hidden = model(pixel_values=pixels_for(model, collate, records), output_hidden_states=True).hidden_states
        layers = []
        for h in hidden[1:]:
            h = h[:, info.prefix_tokens:] if tokens == "patches" else h[:, :1] if tokens == "cls" else h
            layers.append(h.reshape(h.shape[0], -1).double().cpu())
        features.append(layers)
    return [[float(linear_cka(s, t)) for t in features[1]] for s in features[0]]
