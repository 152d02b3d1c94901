"""Generators of a synthesize stage: who writes the candidates, keyed by the kind of `synthesize.teacher`.

- `model`: a local causal LM (a directory, hub id, `recipe:NAME`, `blueprint:NAME`), sampled in-process
  through transformers' `generate`, several prompts and all their candidates in one batch.
- `api`: an OpenAI-compatible service through :class:`kdistill.api.TeacherAPI` (retries, concurrency
  limit, durable SQLite cache), e.g. `kdistill serve-teacher` over a local model, or a hosted one.

A generator answers ``sample(prompts, seeds, n, sampling)`` with ``n`` :class:`Sample` per prompt. A
sample the generator could not produce (the service failed after its retries) carries ``error``: the
stage records it and asks again when resumed. Seeds make candidates reproducible: the API generator
sends ``seed + j`` for candidate ``j`` of a prompt (and the cache keys on it); the local one seeds each
batch from its prompts' seeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kdistill.registry import Registry

GENERATORS: Registry[Callable] = Registry("generator")


@dataclass(frozen=True)
class Sample:
    text: str
    finish_reason: str | None = None
    mean_logprob: float | None = None  # mean log p per generated token, before temperature
    error: str | None = None           # set when there is no text because the generator failed


def generator_kind(teacher) -> str:
    return "api" if teacher.api is not None else "model"


def make_generator(teacher, cache_path: str | Path | None = None, console=None, where: str = "synthesize.teacher"):
    return GENERATORS.get(generator_kind(teacher), where)(teacher, cache_path=cache_path, console=console, where=where)


@GENERATORS.register("model")
class LocalGenerator:
    """A causal LM sampled in this process. With a cache, each batch's answers are stored (keyed by the
    weights' fingerprint, the prompts, the settings and the seed), so two runs that share it, such as
    the filtered and unfiltered PaD variants, sample once."""

    def __init__(self, teacher, cache_path=None, console=None, where="synthesize.teacher"):
        from kdistill.models.loading import load_model
        from kdistill.teachers.fingerprint import fingerprint_tensors
        from kdistill.teachers.recipe_runs import resolve_teacher

        path = resolve_teacher(teacher.model, console)  # recipe:NAME is trained once, then reused
        loaded = load_model(path, "causal-lm")
        if loaded.tokenizer is None:
            from kdistill.errors import ConfigError

            raise ConfigError(f"{where}.model: {teacher.model} has no tokenizer; a generator needs one")
        self.model, self.tokenizer = loaded.model.eval(), loaded.tokenizer
        self.fingerprint = fingerprint_tensors(self.model.state_dict())[:16]
        self.id = f"{teacher.model} ({self.fingerprint})"
        self.cache = None
        if cache_path is not None:
            from kdistill.api.response_cache import ResponseCache

            self.cache = ResponseCache(cache_path)

    def check(self) -> None:
        pass  # loaded in __init__: nothing else can be missing

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def sample(self, prompts: list[str], seeds: list[int], n: int, sampling, logprobs: bool = False) -> list[list[Sample]]:
        from kdistill.api.response_cache import request_key

        settings = sampling.model_dump(exclude={"seed"})
        seed = hash_seeds(seeds)
        key = request_key("local-generate", {"model": self.fingerprint, "prompts": prompts, "n": n, **settings}, seed)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return [[Sample(**s) for s in row] for row in hit["samples"]]
        samples = self._generate(prompts, n, sampling, seed)
        if self.cache is not None:
            self.cache.put(key, "local-generate", {"prompts": prompts, "n": n, **settings, "seed": seed},
                           {"samples": [[s.__dict__ for s in row] for row in samples]})
        return samples

    def _generate(self, prompts: list[str], n: int, sampling, seed: int) -> list[list[Sample]]:
        import torch

        model, tokenizer = self.model, self.tokenizer
        eos = model.config.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        encoded = []
        for prompt in prompts:
            ids = tokenizer(prompt)["input_ids"]
            encoded.append(ids[:-1] if len(ids) > 1 and ids[-1] == eos else ids)  # WordPiece/BPE end token
        width = max(len(ids) for ids in encoded)
        room = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
        max_new = min(sampling.max_new_tokens, room - width) if room else sampling.max_new_tokens
        if max_new < 1:
            from kdistill.errors import DataError

            raise DataError(f"a prompt of {width} tokens leaves no room in the generator's context of {room}")
        rows = [ids for ids in encoded for _ in range(n)]
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows], device=model.device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=model.device)
        options = ({"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
                   if sampling.temperature > 0 else {"do_sample": False})
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new,
                                 eos_token_id=eos, pad_token_id=pad, return_dict_in_generate=True,
                                 output_logits=True, **options)
        generated = out.sequences[:, width:]
        logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # raw logits: before temperature
        picked = logprobs.gather(-1, generated.unsqueeze(-1)).squeeze(-1)
        samples = []
        for row, tokens in enumerate(generated.tolist()):
            end = tokens.index(eos) if eos in tokens else len(tokens)
            text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
            mean = float(picked[row, :end].mean()) if end else None
            samples.append(Sample(text, "stop" if end < len(tokens) else "length", mean))
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]


@GENERATORS.register("api")
class APIGenerator:
    """An OpenAI-compatible service. Each candidate is its own request (`candidate: j`, `seed: seed + j`), so
    a resumed run finds every answer it already paid for in the cache."""

    def __init__(self, teacher, cache_path=None, console=None, where="synthesize.teacher"):
        from kdistill.api.client import TeacherAPI

        api = teacher.api
        self.api = api
        self.client = TeacherAPI.from_settings(api, cache_path)
        self.id = f"{self.client.base_url} {api.model}"

    def check(self) -> None:
        self.client.check()  # a dead service: TeacherUnavailable, before anything is asked

    def close(self) -> None:
        self.client.close()

    def sample(self, prompts: list[str], seeds: list[int], n: int, sampling, logprobs: bool = False) -> list[list[Sample]]:
        requests = []
        for prompt, seed in zip(prompts, seeds):
            for j in range(n):
                body = {"max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                        "top_p": sampling.top_p, "seed": seed + j, "candidate": j}
                if self.api.chat:
                    body["messages"] = [{"role": "user", "content": prompt}]
                    if logprobs:
                        body["logprobs"] = True
                else:
                    body["prompt"] = prompt
                    if logprobs:
                        body["logprobs"] = 1
                requests.append(body)
        answers = self.client.map(requests, progress=False)
        samples = []
        for answer in answers:
            if not answer.ok:
                samples.append(Sample("", error=answer.error))
                continue
            values = answer.token_logprobs
            mean = sum(values) / len(values) if values else None
            samples.append(Sample(answer.text, answer.finish_reason, mean))
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]


def hash_seeds(seeds: list[int]) -> int:
    """One torch seed for a batch, from its prompts' seeds (the same batch gets the same seed in every run)."""
    import hashlib

    text = ",".join(str(s) for s in seeds)
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
