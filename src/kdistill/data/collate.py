"""Batches of text records to tensors, and BERT-style masking for masked-LM distillation."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from kdistill.errors import ConfigError, DataError


def check_prompts_lead(records: Sequence[dict], where: str) -> None:
    """Completion-only loss masks a record's text after its `prompt`, so the prompt must be where the text starts; a
    prompt/completion table given as `text: completion` would otherwise train on the completions without their
    prompts."""
    for record in records:
        prompt, text = record.get("prompt"), record.get("text", "")
        if prompt and not text.startswith(prompt.rstrip()):
            raise DataError(f"{where}: data.loss_on: completion needs each record's text to start with its prompt, and "
                            f"one does not (prompt {prompt[:40]!r}, text {text[:40]!r}); for a prompt/completion table, "
                            f"give a text field that holds both")


def implied_prompt_length(tokens: int) -> int:
    """A causal-LM record without a `prompt` is prompted with the first half of its tokens (at least one): the
    collator's completion-only mask and the on-policy sampler's prompts both follow this rule."""
    return max(1, tokens // 2)


def fill_id(tokenizer) -> int:
    """The id padding takes: the tokenizer's pad token, else its end token (GPT-2 and Llama tokenizers have no pad
    token), else 0. Padded positions are masked out of every loss, so any id serves."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


def pad_right(encoded: Mapping[str, list[list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Each row padded on the right to the longest, whatever side the tokenizer pads on: the engine, the teacher
    store and the completion masks read a row's tokens from position 0 (a left-padding tokenizer, as many instruct
    models ship, would shift them silently)."""
    longest = max(len(row) for row in encoded["input_ids"])
    encoded = {"attention_mask": [[1] * len(row) for row in encoded["input_ids"]], **encoded}
    fills = {"input_ids": pad, "attention_mask": 0, "token_type_ids": 0}
    return {key: torch.tensor([list(row) + [fills[key]] * (longest - len(row)) for row in rows], dtype=torch.long)
            for key, rows in encoded.items()}


class TextCollator:
    """Tokenize a list of records {"text", ["text_pair"], ["label"]} into one padded batch.

    Pads to the longest sequence in the batch (not to max_length): short batches stay cheap.
    """

    def __init__(self, tokenizer, max_length: int, label_to_id: Mapping[str, int] | None = None,
                 completion_only: bool = False, token_types: bool = True):
        if max_length < 1:
            raise ConfigError(f"max_length must be at least 1, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.label_to_id = dict(label_to_id) if label_to_id is not None else None
        self.completion_only = completion_only
        # False for causal LMs: GPT-2 adds the embedding of token_type_ids (its token 0's, where a BERT tokenizer
        # gives zeros) to every position, which generation, given no token types, never does
        self.token_types = token_types

    def __call__(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not records:
            raise DataError("cannot collate an empty batch")
        texts = [r["text"] for r in records]
        has_pair = ["text_pair" in r for r in records]
        pairs = None
        if any(has_pair):
            if not all(has_pair):
                raise DataError("some records in the batch have a text_pair and some do not; "
                                "a data source must give text_pair for every record or none")
            pairs = [r["text_pair"] for r in records]
        encoded = self.tokenizer(texts, text_pair=pairs, truncation=True, max_length=self.max_length)
        keys = ("input_ids", "attention_mask", "token_type_ids") if self.token_types else ("input_ids", "attention_mask")
        out = pad_right({k: v for k, v in encoded.items() if k in keys}, fill_id(self.tokenizer))
        labels = self._labels(records)
        if labels is not None:
            out["labels"] = labels
        if self.completion_only:
            out["loss_mask"] = self._completion_mask(records, out["input_ids"], out["attention_mask"])
        return out

    def _completion_mask(self, records: Sequence[dict], ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Causal LMs: True at the positions whose next token follows the record's prompt, the mask on-policy
        batches carry for their generated tokens. The prompt's length is where its own tokens stop agreeing with
        the text's, so an end token the tokenizer adds to every text, or a merge across the boundary, does not
        count as prompt."""
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, record in enumerate(records):
            real = attention[row].nonzero().flatten()
            start, tokens = int(real[0]), ids[row, real].tolist()
            if record.get("prompt"):
                prompt = self.tokenizer(record["prompt"], truncation=True, max_length=self.max_length)["input_ids"]
                length = next((i for i, (a, b) in enumerate(zip(prompt, tokens)) if a != b), min(len(prompt), len(tokens)))
            else:
                length = implied_prompt_length(len(tokens))
            # position i predicts token i + 1: from the prompt's last token to the text's last but one
            mask[row, start + max(length, 1) - 1: start + len(tokens) - 1] = True
        if not mask.any():  # the loss would be 0 / 0
            raise DataError(f"data.loss_on: completion: no record of this batch has a token after its prompt within "
                            f"max_length {self.max_length} (first prompt: {records[0].get('prompt')!r}); raise "
                            f"data.max_length or shorten the prompts")
        return mask

    def _labels(self, records: Sequence[dict]) -> torch.Tensor | None:
        if self.label_to_id is None:
            return None
        has_label = [r.get("label") is not None for r in records]
        if not any(has_label):
            return None
        if not all(has_label):
            raise DataError("some records in the batch have a label and some do not; "
                            "every record of a labeled source needs one")
        ids = []
        for r in records:
            # Class indexes are keyed by the label's string form (see sources.label_names).
            key = str(r["label"])
            if key not in self.label_to_id:
                known = ", ".join(list(self.label_to_id)[:20])
                raise DataError(f"label {key!r} is not in the class index built from the "
                                f"training data ({len(self.label_to_id)} classes: {known}...)")
            ids.append(self.label_to_id[key])
        return torch.tensor(ids, dtype=torch.long)


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    tokenizer,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: pick `probability` of real tokens; of those 80% [MASK], 10% random, 10% kept.

    Special tokens and padding are never picked. Returns (masked_input_ids, mlm_labels) where
    labels hold the original id at picked positions and -100 elsewhere. The inputs are not changed.
    All random draws use `generator`, so a seeded generator gives the same masks on every run.
    """
    if tokenizer.mask_token_id is None:
        raise ConfigError("masked-LM needs a tokenizer with a mask token; this one has none")
    if not 0.0 <= probability <= 1.0:
        raise ConfigError(f"mask probability must be in [0, 1], got {probability}")
    out_device = input_ids.device
    # Draw on the generator's device: a CPU generator cannot drive CUDA sampling.
    device = generator.device if generator is not None else out_device
    ids = input_ids.to(device)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=ids.dtype, device=device)
    can_mask = ~torch.isin(ids, special)
    if attention_mask is not None:
        can_mask &= attention_mask.to(device).bool()

    chosen = torch.bernoulli(can_mask.float() * probability, generator=generator).bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    masked = ids.clone()
    to_mask = torch.bernoulli(torch.full(ids.shape, 0.8, device=device), generator=generator).bool()
    to_mask &= chosen
    masked[to_mask] = tokenizer.mask_token_id
    # Half of the remaining 20% get a random token, drawn from ordinary (non-special) vocabulary
    # so that no [CLS] or [SEP] appears mid-sentence.
    to_random = torch.bernoulli(torch.full(ids.shape, 0.5, device=device), generator=generator).bool()
    to_random &= chosen & ~to_mask
    vocab = torch.arange(len(tokenizer), dtype=ids.dtype, device=device)
    ordinary = vocab[~torch.isin(vocab, special)]
    picks = torch.randint(len(ordinary), ids.shape, generator=generator, device=device)
    masked[to_random] = ordinary[picks][to_random]
    return masked.to(out_device), labels.to(out_device)
