"""Sentence embeddings from any text model, and how faithfully a student's match a teacher's.

Fidelity is three views of the same question, from strict to lenient:
  cosine        the student puts each text where the teacher does (needs equal widths);
  spearman      the student orders all pairs of texts by similarity as the teacher does;
  recall_at_k   the student finds the same nearest neighbours (what retrieval actually sees).
The last two compare similarity structure only, so they also work across different widths.
"""
from __future__ import annotations

import inspect
import math
import warnings
from functools import partial
from typing import Sequence

import torch

from kdistill.data.collate import fill_id, pad_right
from kdistill.errors import DataError, PairingError
from kdistill.eval.timing import fastest_passes
from kdistill.models.taps import pool


def pad_id(model, tokenizer) -> int:
    # any id works under the attention mask, but a sequence classifier finds its last token by the config's pad id,
    # so that one comes first; then the tokenizer's pad, end token or 0, as training pads
    value = getattr(getattr(model, "config", None), "pad_token_id", None)
    return value if isinstance(value, int) else fill_id(tokenizer)


def tokenize(model, tokenizer, texts: Sequence[str], max_length: int,
             pairs: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded tensors for one batch, with only the inputs the model's forward accepts.

    Padding by hand (not `padding=True`) works for tokenizers without a pad token and always pads
    on the right, so position ids stay those of the unpadded text and 'last' pooling is exact.
    """
    if tokenizer is None:
        raise DataError(f"{type(model).__name__} has no tokenizer in its directory; "
                        "text evaluation needs one (save it with tokenizer.save_pretrained)")
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:  # a text longer than the model's positions would not run
        max_length = min(max_length, positions)
    enc = tokenizer(list(texts), text_pair=list(pairs) if pairs is not None else None,
                    truncation=True, max_length=max_length)
    longest = max(len(ids) for ids in enc["input_ids"])
    if longest == 0:
        raise DataError("every text in a batch tokenized to nothing; drop empty texts first")
    accepted = set(inspect.signature(model.forward).parameters)
    device = next(model.parameters()).device
    padded = pad_right({key: enc[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in enc},
                       pad_id(model, tokenizer))
    return {key: value.to(device) for key, value in padded.items() if key in accepted}


def _hidden(model, inputs: dict, ask: bool) -> torch.Tensor | None:
    if ask:
        return model(**inputs, output_hidden_states=True, return_dict=True).hidden_states[-1]
    return getattr(model(**inputs, return_dict=True), "last_hidden_state", None)


def encode(model, tokenizer, texts: Sequence[str], pooling: str, batch_size: int = 64,
           max_length: int = 128) -> torch.Tensor:
    """Pooled last-layer embeddings, float32 [n, d] on the CPU, not normalised."""
    model.eval()
    chunks = []
    # Bare encoders return last_hidden_state; models with a head (classifier, LM) only give hidden
    # states on request, which costs memory for every layer, so ask only once the first batch shows
    # it is needed.
    ask = False
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            inputs = tokenize(model, tokenizer, texts[start:start + batch_size], max_length)
            hidden = _hidden(model, inputs, ask)
            if hidden is None:
                ask = True
                hidden = _hidden(model, inputs, ask)
            chunks.append(pool(hidden, inputs.get("attention_mask"), pooling).float().cpu())
    if not chunks:
        raise DataError("no texts to encode")
    return torch.cat(chunks)


# ---------------------------------------------------------------- fidelity


def _unit(emb: torch.Tensor) -> torch.Tensor:
    emb = torch.as_tensor(emb).detach().to(torch.float64).cpu()
    return emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)


def mean_cosine(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> float:
    if student_emb.shape[1] != teacher_emb.shape[1]:
        raise PairingError(
            f"cosine needs equal widths: the student's embeddings have {student_emb.shape[1]} "
            f"dimensions and the teacher's {teacher_emb.shape[1]}; compare spearman and recall "
            "instead, or add a projection to the student")
    return float((_unit(student_emb) * _unit(teacher_emb)).sum(1).mean())


def _finite(value: float) -> float | None:
    # NaN is not JSON; a correlation of constant similarities is undefined, so say so with None.
    return None if value is None or math.isnan(value) else float(value)


def fidelity(student_emb: torch.Tensor, teacher_emb: torch.Tensor, k: int = 10) -> dict:
    """{"cosine", "spearman", f"recall_at_{k}", "n"} between two embeddings of the same texts.

    When the widths differ, "cosine" is None and "cosine_error" says why (mean_cosine raises the
    PairingError); the other two compare similarity structure and are still computed.
    """
    from scipy.stats import spearmanr

    if student_emb.shape[0] != teacher_emb.shape[0]:
        raise PairingError(f"fidelity needs embeddings of the same texts: the student has "
                           f"{student_emb.shape[0]} rows and the teacher {teacher_emb.shape[0]}")
    n = student_emb.shape[0]
    result: dict = {}
    try:
        result["cosine"] = mean_cosine(student_emb, teacher_emb)
    except PairingError as err:
        result["cosine"], result["cosine_error"] = None, str(err)
    s, t = _unit(student_emb), _unit(teacher_emb)
    sim_s, sim_t = s @ s.T, t @ t.T
    rows, cols = torch.triu_indices(n, n, offset=1)
    if len(rows) >= 2:
        with warnings.catch_warnings():  # constant input warns and returns NaN, handled below
            warnings.simplefilter("ignore")
            rho = spearmanr(sim_s[rows, cols].numpy(), sim_t[rows, cols].numpy()).statistic
        result["spearman"] = _finite(float(rho))
    else:
        result["spearman"] = None
    result[f"recall_at_{k}"] = _neighbour_recall(sim_s, sim_t, k)
    result["n"] = n
    return result


def _neighbour_recall(sim_s: torch.Tensor, sim_t: torch.Tensor, k: int) -> float | None:
    n = sim_s.shape[0]
    if k >= n - 1:  # a text is never its own neighbour, so every other text would be one: 1.0 by construction
        return None
    eye = torch.eye(n, dtype=torch.bool)
    top_s = sim_s.masked_fill(eye, -math.inf).topk(k, dim=1).indices
    top_t = sim_t.masked_fill(eye, -math.inf).topk(k, dim=1).indices
    hits = torch.zeros(n, n, dtype=torch.bool)
    hits.scatter_(1, top_t, True)
    return float(hits.gather(1, top_s).sum(1).double().div(k).mean())


# ---------------------------------------------------------------- speed


def compare_speed(models: dict, texts: Sequence[str], batch_size: int = 64, max_length: int = 128,
                  repeats: int = 3) -> dict[str, float]:
    """Texts/second of each {name: (model, tokenizer, pooling)} on the same texts.

    Every model gets a warm-up batch first (lazy init, allocator, kernel choice). The timed passes
    are interleaved, one per model per round, so a neighbour's load on a shared machine falls on
    all models alike instead of on whichever ran second; each model keeps its best round, the one
    least disturbed. torch's thread count is left as the caller set it.
    """
    if not texts:
        raise DataError("no texts to time")
    for model, tokenizer, pooling in models.values():
        encode(model, tokenizer, texts[:batch_size], pooling, batch_size, max_length)
    best = fastest_passes({name: (model, partial(encode, model, tokenizer, texts, pooling, batch_size, max_length))
                           for name, (model, tokenizer, pooling) in models.items()}, repeats)
    return {name: len(texts) / max(seconds, 1e-9) for name, seconds in best.items()}


def encode_speed(model, tokenizer, texts: Sequence[str], pooling: str, batch_size: int = 64,
                 max_length: int = 128, repeats: int = 3) -> float:
    """Texts/second encoding `texts` (best of `repeats` passes after a warm-up batch)."""
    return compare_speed({"model": (model, tokenizer, pooling)}, texts, batch_size, max_length,
                         repeats)["model"]
