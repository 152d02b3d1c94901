"""On-policy batches (GKD, Agarwal et al. 2024): with probability λ a micro-batch's texts are replaced by
the student's own continuations of their prompts, and the loss is taken on the generated tokens only.
With `generator: teacher` the teacher writes the continuations instead (sequence-level KD, Kim & Rush 2016).

The prompt of a record is its `prompt` field when it has one (e.g. wordnet-definitions), else the first
half of its tokens. The draw and the sampling are seeded by (seed, step, micro-batch, process), so a
resumed run generates exactly what the uninterrupted one did.
"""
from __future__ import annotations

import torch

from kdistill.data.collate import implied_prompt_length


def cache_argument(model) -> str:
    """`cache` in recent transformers, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _seed(*parts: int) -> int:
    return hash(parts) % 2**62


class OnPolicy:
    def __init__(self, cfg, tokenizer, eos_token_id: int | None, seed: int, positions: int | None = None):
        """`positions`: the fewest positions of the models that read a generated batch; prompts are cut to leave
        room for max_new_tokens in them."""
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.positions = positions
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
            ids = ids[: implied_prompt_length(len(ids))]
        # WordPiece-style tokenizers end every text with their end token: a prompt must not
        return ids[:-1] if len(ids) > 1 and ids[-1] == self.eos else ids

    @torch.no_grad()
    def sample(self, student, records: list[dict], max_length: int, step: int, micro: int, rank: int,
               teacher=None) -> dict:
        """A batch of prompt + sampled continuation, right-padded, with `loss_mask` on the positions
        whose next token was generated."""
        if self.positions is not None:
            max_length = min(max_length, self.positions - self.cfg.max_new_tokens)
        prompts = [self.prompt_ids(r, max_length) for r in records]
        width = max(len(p) for p in prompts)
        device = next(student.parameters()).device
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        torch.manual_seed(_seed(self.seed, step, micro, rank, 2))
        training = student.training
        student.eval()
        if teacher is not None and self.cfg.teacher_mix > 0:
            out, weights = self.mixed_sample(student, teacher, ids, mask)
        else:
            writer = teacher if self.cfg.generator == "teacher" else student
            sampling = ({"do_sample": False} if self.cfg.greedy else
                        {"do_sample": True, "top_k": 0, "temperature": self.cfg.temperature})
            out = writer.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.cfg.max_new_tokens,
                                  eos_token_id=self.eos, pad_token_id=self.pad, **sampling)
            weights = torch.ones(out.shape[0], out.shape[1] - width)
        student.train(training)
        rows, loss_rows, weight_rows = [], [], []
        for prompt, generated, w in zip(prompts, out[:, width:].tolist(), weights.tolist()):
            if self.eos in generated:
                generated = generated[: generated.index(self.eos) + 1]  # keep the end token: it was chosen too
            while generated and generated[-1] == self.pad and self.pad != self.eos:
                generated.pop()
            rows.append(prompt + generated)
            # position i predicts token i + 1: the positions before each generated token
            loss_rows.append([0] * (len(prompt) - 1) + [1] * len(generated) + [0])
            weight_rows.append([1.0] * (len(prompt) - 1) + w[: len(generated)] + [1.0])
        length = max(len(r) for r in rows)
        return {
            "input_ids": torch.tensor([r + [self.pad] * (length - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
            "loss_mask": torch.tensor([m + [0] * (length - len(m)) for m in loss_rows]).bool(),
            "importance": torch.tensor([w + [1.0] * (length - len(w)) for w in weight_rows]),
        }

    def mixed_sample(self, student, teacher, ids: torch.Tensor, mask: torch.Tensor):
        """MiniLLM's teacher-mixed sampling: each token from α·p + (1−α)·q (both at the sampling
        temperature), with the single-step importance weight q(y)/(α·p(y) + (1−α)·q(y)) of the token."""
        alpha, tau = self.cfg.teacher_mix, self.cfg.temperature
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        caches, inputs, weights = [None, None], ids, []
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        for _ in range(self.cfg.max_new_tokens):
            logits = []
            for i, model in enumerate((student, teacher)):
                out = model(input_ids=inputs, attention_mask=mask, position_ids=positions, use_cache=True,
                            **{cache_argument(model): caches[i]})
                caches[i] = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
                logits.append(out.logits[:, -1].float() / tau)
            q, p = torch.softmax(logits[0], -1), torch.softmax(logits[1], -1)
            mixed = alpha * p + (1 - alpha) * q
            token = torch.multinomial(mixed, 1)[:, 0]
            weight = q.gather(1, token[:, None])[:, 0] / mixed.gather(1, token[:, None])[:, 0].clamp_min(1e-12)
            token = torch.where(done, torch.full_like(token, self.pad), token)
            weights.append(weight)
            ids = torch.cat([ids, token[:, None]], 1)
            done |= token == self.eos
            mask = torch.cat([mask, (~done | (token == self.eos)).long()[:, None]], 1)
            positions = positions[:, -1:] + 1
            inputs = token[:, None]
            if bool(done.all()):
                break
        return ids, torch.stack(weights, 1).cpu()
