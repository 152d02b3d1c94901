"""Generated text, scored: greedy continuations of prompts and ROUGE-L against references."""
from __future__ import annotations

import re
from typing import Sequence

import torch

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens, as ROUGE's default tokenizer (punctuation dropped)."""
    return WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a)·len(b)) time and O(len(b)) memory."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004, β = 1): harmonic mean of LCS precision and recall over words."""
    c, r = words(candidate), words(reference)
    if not c or not r:
        return 0.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 16,
             temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Continuations of each prompt through `transformers`' generate (greedy when temperature is 0),
    cut at the end-of-sequence token.

    Prompts are left-padded so every row continues from its own last token; tokenizers that append an
    end token to every text (WordPiece's [SEP]) have it removed from the prompt first."""
    model.eval()
    eos = model.config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    torch.manual_seed(seed)
    outputs = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p)["input_ids"] for p in prompts[start:start + batch_size]]
        encoded = [ids[:-1] if len(ids) > 1 and ids[-1] == eos else ids for ids in encoded]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=model.device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=model.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
        generated = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                   eos_token_id=eos, pad_token_id=pad, **sampling)
        for row in generated[:, width:].tolist():
            row = row[: row.index(eos)] if eos in row else row
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return outputs


def definition_scores(model, tokenizer, records: Sequence[dict], limit: int = 200, max_new_tokens: int = 32) -> dict:
    """Mean ROUGE-L of greedy definitions for the first `limit` held-out prompts."""
    chosen = list(records[:limit])
    generated = generate(model, tokenizer, [r["prompt"] for r in chosen], max_new_tokens)
    scores = [rouge_l(g, r["reference"]) for g, r in zip(generated, chosen)]
    return {"rouge_l": sum(scores) / max(1, len(scores)), "examples": list(zip([r["prompt"] for r in chosen[:3]],
                                                                                generated[:3]))}
