"""`train.head_init: fit`: the student's classifier starts as the least-squares map from its own features to
the teacher's logits (to one-hot labels when the stage reads no teacher), not where it was built.

Why: hint stages make a narrow student's features linearly readable for the task (a least-squares probe on
TinyBERT's pooled features onto the teacher's logits reads 0.50 of the test glosses before its layer stages
and 0.58 after them, where the recipe with a random head ended at 0.48: benchmarks/head_probe.py), and a
prediction stage that starts from a random head spends its few hundred steps finding what one solve gives
before step 1 (docs/encoders/tinybert.md).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from kdistill.errors import ConfigError
from kdistill.losses.base import LeastSquares

HEAD_FIT_RECORDS = 4096  # a 45-way head over a few hundred features: tens of records per weight column


def classifier_layer(student: nn.Module) -> nn.Linear:
    """The linear layer that writes the student's class logits: the last one with num_labels outputs
    (BERT's and ViT's `classifier`, RoBERTa's `classifier.out_proj`, a causal LM's `score`)."""
    num_labels = getattr(student.config, "num_labels", None)
    found = [m for m in student.modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if not num_labels or not found:
        raise ConfigError(f"train.head_init: fit needs a classification student (a linear head with num_labels "
                          f"outputs); {type(student).__name__} has none. Leave head_init out of this stage")
    return found[-1]


@contextmanager
def head_inputs(layer: nn.Linear) -> Iterator[list[torch.Tensor]]:
    """A list that receives what `layer` reads on each forward while the block is open."""
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        hook.remove()


@torch.no_grad()
def fit_head(layer: nn.Linear, read: Callable[[dict], None], batches: Iterable[dict],
             targets: Callable[[dict], torch.Tensor]) -> None:
    """Run `read` (a student forward) over `batches`, collect what the head `layer` reads and
    `targets(batch)`, and solve the head in place."""
    sums = LeastSquares()
    with head_inputs(layer) as seen:
        for batch in batches:
            seen.clear()  # the sums keep what the solve needs; the features need not outlive their batch
            read(batch)
            features = seen[-1]
            if features.dim() != 2:
                raise ConfigError(f"train.head_init: fit fits heads that read one vector per record; this "
                                  f"student's head reads shape {tuple(features.shape)} (a token-level head)")
            sums.add(features, targets(batch))
    sums.solve_into(layer)


def head_targets(batch: dict, teacher_logits: torch.Tensor | None, num_labels: int) -> torch.Tensor:
    """The teacher's logits less each row's mean (softmax reads no row offset, so the fit should not spend
    itself on one), else the labels one-hot."""
    if teacher_logits is not None:
        return teacher_logits - teacher_logits.mean(-1, keepdim=True)
    if "labels" not in batch:
        raise ConfigError("train.head_init: fit needs the teacher's logits or labels, and this stage reads "
                          "neither; leave head_init out of it")
    return nn.functional.one_hot(batch["labels"].long(), num_labels).float()


__all__ = ["HEAD_FIT_RECORDS", "classifier_layer", "fit_head", "head_inputs", "head_targets"]
