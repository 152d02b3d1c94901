"""On-policy batches (GKD, Agarwal et al. 2024): with probability λ a micro-batch's texts are replaced by
the student's own continuations of their prompts, and the loss is taken on the generated tokens only.

The prompt of a record is its `prompt` field when it has one (e.g. wordnet-definitions), else the first
half of its tokens. The draw and the sampling are seeded by (seed, step, micro-batch, process), so a
resumed run generates exactly what the uninterrupted one did.
"""
from __future__ import annotations

import torch


def _seed(*parts: int) -> int:
    return hash(parts) % 2**62


class OnPolicy:
    def __init__(self, cfg, tokenizer, eos_token_id: int | None, seed: int):
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.eos = eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_token_id or 0)

    def wants(self, step: int, micro: int, rank: int) -> bool:
        draw = torch.rand((), generator=torch.Generator().manual_seed(_seed(self.seed, step, micro, rank, 1)))
        return bool(draw < self.cfg.fraction)

    def prompt_ids(self, record: dict, max_length: int) -> list[int]:
        if record.get("prompt"):
            ids = self.tokenizer(record["prompt"], truncation=True, max_length=max_length)["input_ids"]
        else:
            ids = self.tokenizer(record["text"], truncation=True, max_length=max_length)["input_ids"]
            ids = ids[: max(1, len(ids) // 2)]
        # WordPiece-style tokenizers end every text with their end token: a prompt must not
        return ids[:-1] if len(ids) > 1 and ids[-1] == self.eos else ids

    @torch.no_grad()
    def sample(self, student, records: list[dict], max_length: int, step: int, micro: int, rank: int) -> dict:
        """A batch of prompt + sampled continuation, right-padded, with `loss_mask` on the positions
        whose next token was generated."""
        prompts = [self.prompt_ids(r, max_length) for r in records]
        width = max(len(p) for p in prompts)
        device = next(student.parameters()).device
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        torch.manual_seed(_seed(self.seed, step, micro, rank, 2))
        training = student.training
        student.eval()
        out = student.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0,
                               temperature=self.cfg.temperature, max_new_tokens=self.cfg.max_new_tokens,
                               eos_token_id=self.eos, pad_token_id=self.pad)
        student.train(training)
        rows, loss_rows = [], []
        for prompt, generated in zip(prompts, out[:, width:].tolist()):
            if self.eos in generated:
                generated = generated[: generated.index(self.eos) + 1]  # keep the end token: it was chosen too
            while generated and generated[-1] == self.pad and self.pad != self.eos:
                generated.pop()
            rows.append(prompt + generated)
            # position i predicts token i + 1: the positions before each generated token
            loss_rows.append([0] * (len(prompt) - 1) + [1] * len(generated) + [0])
        length = max(len(r) for r in rows)
        return {
            "input_ids": torch.tensor([r + [self.pad] * (length - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
            "loss_mask": torch.tensor([m + [0] * (length - len(m)) for m in loss_rows]).bool(),
        }
