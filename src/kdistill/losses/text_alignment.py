"""GPT4Image-style distillation from text: the student's image feature, through a learned projector, is
pulled toward the text embeddings of its class's descriptions (a text encoder is the teacher)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdistill.errors import PairingError
from kdistill.losses.base import LossTerm, TermParams, register_loss, sequence_count


class TextAlignmentParams(TermParams):
    type: Literal["text_alignment"] = "text_alignment"
    texts: str = Field("digits", description="a built-in class text set or a JSON file {label: [descriptions]}")
    encoder: str = Field("packaged:all-MiniLM-L6-v2", description="the sentence encoder that embeds the texts")
    mode: Literal["cosine", "contrastive"] = Field(
        "contrastive", description="cosine: 1 − cos(feature, own class); contrastive: softmax over the classes' "
        "text embeddings, as CLIP-style alignment")
    temperature: float = Field(0.1, gt=0, description="contrastive only")


def embed_texts(encoder: str, texts: list[list[str]]) -> torch.Tensor:
    """One unit vector per class: the normalised mean of its descriptions' sentence embeddings."""
    from kdistill.eval.embeddings import encode
    from kdistill.models.loading import load_model

    loaded = load_model(encoder, "embedding")
    flat = [t for group in texts for t in group]
    vectors = F.normalize(encode(loaded.model, loaded.tokenizer, flat, "mean"), dim=-1)
    out, start = [], 0
    for group in texts:
        out.append(F.normalize(vectors[start:start + len(group)].mean(0), dim=-1))
        start += len(group)
    return torch.stack(out)


@register_loss("text_alignment")
class TextAlignment(LossTerm):
    """Needs no image teacher: the class text embeddings are computed once when the term is built."""

    Params = TextAlignmentParams
    needs_teacher = False

    def __init__(self, params, student, teacher, where="losses"):
        super().__init__(params, student, teacher, where)
        if not student.labels:
            raise PairingError(f"{where}: text_alignment needs a classifier student with named classes")
        from kdistill.data.class_texts import class_texts

        targets = embed_texts(params.encoder, class_texts(params.texts, student.labels, f"{where}.texts"))
        self.register_buffer("targets", targets, persistent=False)
        self.projector = nn.Linear(student.hidden_size, targets.shape[-1])

    def student_taps(self):
        return ["pooled"]

    def count(self, batch):
        return sequence_count(batch)

    def forward(self, s, t, batch):
        if "labels" not in batch:
            raise PairingError(f"{self.where}: text_alignment pulls each image toward its class's texts: it needs labels")
        feature = F.normalize(self.projector(s["pooled"].float()), dim=-1)
        targets = self.targets.to(feature.device)
        if self.params.mode == "cosine":
            return (1 - (feature * targets[batch["labels"]]).sum(-1)).mean()
        return F.cross_entropy(feature @ targets.T / self.params.temperature, batch["labels"])
