"""The model side of the teacher server: prompts to token ids, sampling with the model's own log-probabilities,
scoring a prompt, and cutting a generation at its end token or stop string. kdistill.api.server puts the
HTTP protocol around it.
"""
from __future__ import annotations

from dataclasses import dataclass


class BadRequest(Exception):
    """A request the client must change; answered with 400 and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class Sample:
    token_ids: list[int]
    text: str
    finish_reason: str             # "stop" (end token or stop string) or "length"
    logprobs: list[float]          # log p(token) at each position
    top: list[list[tuple[int, float]]]  # the k most likely (id, log p) at each position


class LocalModel:
    """Generation and scoring over `self.model` and `self.tokenizer` (a Hugging Face causal LM), one request at
    a time under `self.generate_lock`; `self.max_tokens_limit` bounds an open-ended request."""

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"]
        eos = self.model.config.eos_token_id
        if len(ids) > 1 and ids[-1] == eos:  # WordPiece appends [SEP]: the model would see the text as ended
            ids = ids[:-1]
        return ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):  # the template adds any special tokens itself
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return self.encode("\n".join(lines + ["assistant:"]))

    def generate(self, prompt_ids: list[int], settings: dict, top_k: int) -> list[Sample]:
        import torch

        config = self.model.config.get_text_config()
        room = getattr(config, "max_position_embeddings", None) or len(prompt_ids) + self.max_tokens_limit
        if settings["max_tokens"] == 0:  # echo only: the prompt is scored, nothing is generated
            if len(prompt_ids) > room:
                raise BadRequest(f"the prompt ({len(prompt_ids)} tokens) exceeds the model's context of {room} "
                                 "tokens", "prompt")
            return [Sample([], "", "length", [], []) for _ in range(settings["n"])]
        max_tokens = settings["max_tokens"] or min(self.max_tokens_limit, room - len(prompt_ids))
        if len(prompt_ids) + max_tokens > room or max_tokens < 1:
            raise BadRequest(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) "
                             f"exceeds the model's context of {room} tokens", "max_tokens")
        eos = self.model.generation_config.eos_token_id
        eos = config.eos_token_id if eos is None else eos
        eos_ids = sorted(set(eos if isinstance(eos, list) else [] if eos is None else [eos]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
        inputs = torch.tensor([prompt_ids] * settings["n"], device=self.model.device)
        sampling = ({"do_sample": True, "temperature": float(settings["temperature"]),
                     "top_p": float(settings["top_p"]), "top_k": 0}
                    if settings["temperature"] > 0 else {"do_sample": False})
        with self.generate_lock, torch.inference_mode():
            if settings["seed"] is not None:  # global RNG, hence inside the lock
                torch.manual_seed(settings["seed"])
            out = self.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                      max_new_tokens=max_tokens, pad_token_id=pad,
                                      eos_token_id=eos_ids or None, return_dict_in_generate=True,
                                      output_logits=True, **sampling)
        rows = out.sequences[:, len(prompt_ids):]
        logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # raw logits: before temperature/top-p
        picked = logprobs.gather(-1, rows.unsqueeze(-1)).squeeze(-1).tolist()
        if top_k:
            values, ids = logprobs.topk(top_k, dim=-1)
            top = [[list(zip(i, v)) for i, v in zip(row_ids, row_values)]
                   for row_ids, row_values in zip(ids.tolist(), values.tolist())]
        else:
            top = [[[] for _ in row] for row in picked]
        samples = []
        for row, tokens in enumerate(rows.tolist()):
            count, text, finish = self.cut(tokens, set(eos_ids), settings["stop"])
            samples.append(Sample(tokens[:count], text, finish, picked[row][:count], top[row][:count]))
        return samples

    def score(self, prompt_ids: list[int], top_k: int) -> Sample:
        """The prompt's own tokens as the model sees them, one forward pass: for each token after the first,
        its log p given the tokens before it and the k most likely there (the first token has none)."""
        import torch

        with self.generate_lock, torch.inference_mode():
            ids = torch.tensor([prompt_ids], device=self.model.device)
            logprobs = self.model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        picked = logprobs.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()
        top = [[]] * len(picked)
        if top_k:
            values, indices = logprobs.topk(top_k, dim=-1)
            top = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        return Sample(prompt_ids, "", "length", [None] + picked, [None] + top)

    def cut(self, tokens: list[int], eos_ids: set[int], stop: list[str]) -> tuple[int, str, str]:
        """Where a generated row ends: at its end token, or at the token that completes a stop string
        (the text stops before the stop string). Returns (tokens kept, text, finish reason)."""
        end = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        count, finish = (end, "stop") if end is not None else (len(tokens), "length")
        text = self.tokenizer.decode(tokens[:count], skip_special_tokens=True)
        if stop and any(s in text for s in stop):
            for kept in range(1, count + 1):
                partial = self.tokenizer.decode(tokens[:kept], skip_special_tokens=True)
                hits = [partial.index(s) for s in stop if s in partial]
                if hits:
                    return kept, partial[:min(hits)], "stop"
        return count, text, finish

    def token(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(token_id))
