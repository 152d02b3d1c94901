"""Terms on output distributions: logit KD (Hinton), hard-label cross-entropy, masked-LM."""
from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from kdistill.errors import PairingError
from kdistill.losses import functional as fn
from kdistill.losses.base import LossTerm, TermParams, register_loss, sequence_count, token_count
from kdistill.teachers.cached import SparseLogits


def logits_mask(batch: dict, logits: torch.Tensor) -> torch.Tensor | None:
    """Real positions for per-token logits; None for one distribution per sequence."""
    if logits.dim() == 2:
        return None
    if "loss_mask" in batch:  # on-policy batches: only the positions that predict generated tokens
        return batch["loss_mask"].bool()
    return batch["attention_mask"].bool()


def hard_label_loss(logits: torch.Tensor, batch: dict, task: str) -> torch.Tensor:
    """Cross-entropy against the labels that fit the task: class ids, next tokens, or masked tokens."""
    if task == "masked-lm" or "mlm_labels" in batch:
        return F.cross_entropy(logits.flatten(0, -2).float(), batch["mlm_labels"].flatten(), ignore_index=-100)
    if logits.dim() == 2:
        if "labels" not in batch:
            raise PairingError("a hard-label loss needs labels: give the data source a `label:` field")
        return F.cross_entropy(logits.float(), batch["labels"])
    # causal LM: position i predicts token i+1; the last predicts nothing and is ignored rather than sliced
    # off, since slicing the logits (B·L·V floats) makes a copy of them, and another of their gradient
    targets = F.pad(batch["input_ids"][:, 1:].masked_fill(~next_token_mask(batch), -100), (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def next_token_mask(batch: dict) -> torch.Tensor:
    """Causal LMs, (B, L - 1): the positions scored against their next token. Padding is left out, and so is the
    prompt where the batch has a `loss_mask` (generated batches, data.loss_on: completion)."""
    keep = batch["loss_mask"][:, :-1] if "loss_mask" in batch else batch["attention_mask"][:, 1:]
    return keep.bool()


def hard_label_count(batch: dict, task: str) -> int:
    if task == "masked-lm" or "mlm_labels" in batch:
        return int((batch["mlm_labels"] != -100).sum())
    if task in ("causal-lm",):
        return int(next_token_mask(batch).sum())
    return sequence_count(batch)


class LogitKDParams(TermParams):
    type: Literal["logit_kd"] = "logit_kd"
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.0, ge=0, le=1, description="weight of the hard-label loss; 1-alpha goes to KD")
    divergence: Literal["kl", "reverse_kl", "js", "generalized_jsd", "tvd", "skew_kl", "skew_reverse_kl", "soft_ce",
                        "mse"] = "kl"
    skew: float = Field(0.1, ge=0, le=1, description="alpha of skew_kl / skew_reverse_kl")
    beta: float = Field(0.5, ge=0, le=1, description="β of generalized_jsd (0: forward KL, 1: reverse KL), as GKD")
    tail: Literal["bucket", "uniform"] = Field(
        "bucket", description="teacher stores: the mass outside the stored top k as one more outcome (bucket), or "
        "spread evenly over the other classes (uniform, TinyViT's rule)")
    chunk_size: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None, description="causal LMs: make and consume the logits this many tokens at a time (peak memory "
        "independent of batch × length × vocabulary); auto: as many tokens as a fixed logit budget allows")

    @model_validator(mode="after")
    def chunked_as_it_can_run(self):
        # known from the recipe alone, so said when it is read rather than when the models are paired
        if self.chunk_size is not None and (self.alpha > 0 or self.divergence == "mse"):
            raise ValueError("chunk_size: the chunked path computes the divergence from the LM heads alone: it needs "
                             "alpha 0 and a divergence other than mse (drop chunk_size for those)")
        return self


@register_loss("logit_kd")
class LogitKD(LossTerm):
    """alpha·CE(labels, student) + (1-alpha)·τ²·D(teacher ‖ student) at temperature τ (Hinton et al.)."""

    Params = LogitKDParams

    def __init__(self, params, student, teacher, where="losses"):
        super().__init__(params, student, teacher, where)
        if student.logits_per != teacher.logits_per:
            raise PairingError(f"{where}: student logits are per {student.logits_per}, teacher's per {teacher.logits_per}")
        if params.chunk_size is not None:
            if student.task != "causal-lm":  # alpha and the divergence were checked when the params were read
                raise PairingError(f"{where}.chunk_size: the chunked path is for causal-LM students, with alpha 0 "
                                   f"and a divergence other than mse")
            return  # heads padded to different sizes over the one tokenizer are compared on the shared part
        if student.logits_per == "token" and student.vocab_size != teacher.vocab_size:
            raise PairingError(
                f"{where}: student vocabulary ({student.vocab_size}) differs from the teacher's ({teacher.vocab_size}); "
                f"logit losses need the same vocabulary"
            )

    @classmethod
    def store_refusal(cls, params) -> str | None:
        if params.chunk_size:
            return " with chunk_size (the chunked path makes the teacher's logits from its LM head)"
        if params.divergence == "mse":
            return " with divergence mse (it compares whole logit vectors)"
        return None

    def student_taps(self):
        return ["head_input", "lm_head"] if self.params.chunk_size else ["logits"]

    def teacher_taps(self):
        return ["head_input", "lm_head"] if self.params.chunk_size else ["logits"]

    def count(self, batch):
        return token_count(batch) if self.student_info.logits_per == "token" else sequence_count(batch)

    def uses_labels(self):
        return self.params.alpha > 0

    def forward(self, s, t, batch):
        if self.params.chunk_size:
            return self.chunked(s, t, batch)
        zs, zt = s["logits"], t["logits"]
        if isinstance(zt, SparseLogits):  # a teacher store's top-k (teacher.source: cache)
            return self.from_store(zs, zt, batch)
        if zs.shape[-1] != zt.shape[-1]:
            raise PairingError(f"{self.where}: student has {zs.shape[-1]} outputs, teacher {zt.shape[-1]}")
        p = self.params
        divergence = fn.divergence_fn(p.divergence, beta=p.beta, alpha=p.skew)
        soft = divergence(zs, zt, temperature=p.temperature, mask=logits_mask(batch, zs))
        loss = (1 - p.alpha) * p.temperature**2 * soft
        if p.alpha > 0:
            loss = loss + p.alpha * hard_label_loss(zs, batch, self.student_info.task)
        return loss


    def chunked(self, s, t, batch):
        from kdistill.losses.chunked import chunked_divergence

        p = self.params
        w_s, w_t = s["lm_head"], t["lm_head"]
        soft = chunked_divergence(s["head_input"], w_s, t["head_input"], w_t, divergence=p.divergence, beta=p.beta,
                                  alpha=p.skew, temperature=p.temperature, mask=logits_mask(batch, s["head_input"]),
                                  chunk_size=None if p.chunk_size == "auto" else p.chunk_size, vocab_size=min(w_s.shape[0], w_t.shape[0]))
        return p.temperature**2 * soft

    def from_store(self, zs, stored, batch):
        from kdistill.losses.sparse import sparse_divergence

        p = self.params
        if p.divergence == "mse":
            raise PairingError(f"{self.where}: divergence mse needs full teacher logits, not a top-k store")
        if stored.sampled and p.divergence != "kl":
            raise PairingError(f"{self.where}: a sampled teacher store estimates forward KL without bias, not "
                               f"{p.divergence}; use divergence: kl, or a top-k store (`cache-teacher` without --sample)")
        if stored.sampled and p.tail == "uniform":
            raise PairingError(f"{self.where}.tail: uniform spreads the mass outside a top k; a sampled store has "
                               f"no top k (use tail: bucket, or a top-k store)")
        if abs(stored.temperature - p.temperature) > 1e-9:
            raise PairingError(f"{self.where}: the teacher store holds the teacher at temperature "
                               f"{stored.temperature}, this term uses {p.temperature}; rebuild the store")
        soft = sparse_divergence(zs, stored.logprobs, stored.indices, stored.tail, p.divergence, alpha=p.skew,
                                 beta=p.beta, temperature=p.temperature, mask=logits_mask(batch, zs), tail=p.tail)
        loss = (1 - p.alpha) * p.temperature**2 * soft
        if p.alpha > 0:
            loss = loss + p.alpha * hard_label_loss(zs, batch, self.student_info.task)
        return loss


class CrossEntropyParams(TermParams):
    type: Literal["cross_entropy"] = "cross_entropy"


@register_loss("cross_entropy")
class CrossEntropy(LossTerm):
    """The student's own task loss on labels (class ids, next tokens), no teacher involved."""

    Params = CrossEntropyParams
    needs_teacher = False

    def student_taps(self):
        return ["logits"]

    def count(self, batch):
        return hard_label_count(batch, self.student_info.task)

    def uses_labels(self):
        return True

    def forward(self, s, t, batch):
        return hard_label_loss(s["logits"], batch, self.student_info.task)


class MLMParams(TermParams):
    type: Literal["mlm"] = "mlm"


@register_loss("mlm")
class MaskedLM(CrossEntropy):
    """Masked-language-modelling loss on the student (DistilBERT's L_mlm); the batch is masked 80/10/10,
    so the hard-label loss and count inherited from CrossEntropy run over the masked tokens."""

    Params = MLMParams
    needs_mlm = True

    def uses_labels(self):
        return False  # its labels are the masked tokens, made from the text

    def __init__(self, params, student, teacher, where="losses"):
        super().__init__(params, student, teacher, where)
        if student.task != "masked-lm":
            raise PairingError(f"{where}: mlm needs a student with a masked-LM head (this one is loaded as "
                               f"{student.task}): a teacher saved with one (...ForMaskedLM, e.g. BERT) and "
                               f"teacher.task: masked-lm")
