"""Task metrics (accuracy, perplexity) and model footprint (parameters, bytes on disk)."""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from kdistill.errors import DataError, PairingError
from kdistill.eval.embeddings import tokenize


def accuracy(model, tokenizer, records: Sequence[dict], label_names: Sequence[str],
             batch_size: int = 64, max_length: int = 128) -> float:
    """Share of records whose argmax logit is the id of their label in `label_names`.

    Labels are matched by their string form, as `kdistill.data.label_names` builds class indexes.
    """
    labelled, index = labelled_records(model, records, label_names)
    predicted = predictions(model, tokenizer, labelled, batch_size, max_length)
    return sum(p == index[str(r["label"])] for p, r in zip(predicted, labelled)) / len(labelled)


def labelled_records(model, records: Sequence[dict], label_names: Sequence[str]) -> tuple[list[dict], dict[str, int]]:
    """The records that carry a label, and each label's class id, refusing labels the model cannot predict."""
    index = {str(name): i for i, name in enumerate(label_names)}
    num_labels = getattr(model.config, "num_labels", None)
    if num_labels is not None and len(index) > num_labels:
        raise PairingError(f"{len(index)} label names but {type(model).__name__} predicts only "
                           f"{num_labels} classes")
    labelled = [r for r in records if r.get("label") is not None]
    if not labelled:
        raise DataError("accuracy needs labelled records; this data has no label field "
                        "(name it with `label: FIELD` in the data source)")
    unknown = sorted({str(r["label"]) for r in labelled} - set(index))
    if unknown:
        raise DataError(f"labels {', '.join(map(repr, unknown[:10]))} are not among the model's "
                        f"{len(index)} classes ({', '.join(list(index)[:10])}...)")
    return labelled, index


def predictions(model, tokenizer, records: Sequence[dict], batch_size: int = 64, max_length: int = 128) -> list[int]:
    """The class id a classifier predicts (its argmax logit) for each record, in the records' order."""
    # by length, so each batch pads to nearly its own length: on test sets of mixed lengths that is
    # the larger part of the time
    order = sorted(range(len(records)),
                   key=lambda i: len(records[i]["text"]) + len(records[i].get("text_pair") or ""))
    out = [0] * len(records)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = [records[i] for i in order[start:start + batch_size]]
            pairs = [r["text_pair"] for r in chunk] if "text_pair" in chunk[0] else None
            inputs = tokenize(model, tokenizer, [r["text"] for r in chunk], max_length, pairs)
            predicted = model(**inputs, return_dict=True).logits.argmax(-1).tolist()
            for i, p in zip(order[start:start + batch_size], predicted):
                out[i] = p
    return out


def perplexity(model, tokenizer, texts: Sequence[str], batch_size: int = 16,
               max_length: int = 128) -> float:
    """exp of the mean next-token NLL over every predicted token of every text.

    Weighted by tokens, not by batch: averaging per-batch means (what `labels=` gives) would let a
    batch of short texts count as much as a batch of long ones.
    """
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            inputs = tokenize(model, tokenizer, texts[start:start + batch_size], max_length)
            inputs.pop("token_type_ids", None)  # as in training and generation (data.collate: GPT-2 would add them)
            logits = model(**inputs, return_dict=True).logits[:, :-1].float()
            targets = inputs["input_ids"][:, 1:]
            # Right padding: a target is real exactly when its own mask is set.
            mask = inputs["attention_mask"][:, 1:].bool() if "attention_mask" in inputs \
                else torch.ones_like(targets, dtype=torch.bool)
            nll = F.cross_entropy(logits[mask], targets[mask], reduction="sum")
            total += float(nll)
            count += int(mask.sum())
    if count == 0:
        raise DataError("perplexity needs texts of at least two tokens; every text here is shorter")
    mean = total / count
    return math.exp(mean) if mean < 700 else math.inf  # math.exp overflows past ~709


def count_parameters(model) -> int:
    """Distinct parameters (tied weights, such as shared input/output embeddings, count once)."""
    return sum(p.numel() for p in model.parameters())


def non_embedding_parameters(model) -> int:
    """Parameters outside the embedding tables: the ones each token's compute touches."""
    import torch

    embedded = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embedded)


# Trainer and Accelerate artefacts that end in .bin but are not model weights.
NOT_WEIGHTS = ("optimizer", "scheduler", "training_args", "rng_state", "random_states")


def size_on_disk(directory: str | os.PathLike | None) -> int | None:
    """Bytes of *.safetensors and *.bin weight files under `directory`, or None if it is not a
    local directory (a hub id). Checkpoint folders of a run directory are skipped: they hold
    earlier copies of the same model, not part of it."""
    if not directory or not os.path.isdir(directory):
        return None
    total = 0
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(("checkpoint", "."))]
        for name in files:
            if name.endswith((".safetensors", ".bin")) and not name.startswith(NOT_WEIGHTS):
                total += os.path.getsize(os.path.join(root, name))
    return total


class Stopwatch:
    seconds: float = 0.0


@contextmanager
def stopwatch() -> Iterator[Stopwatch]:
    """`with stopwatch() as sw: ...` then `sw.seconds` (perf_counter, so immune to clock changes)."""
    watch = Stopwatch()
    start = time.perf_counter()
    try:
        yield watch
    finally:
        watch.seconds = time.perf_counter() - start
