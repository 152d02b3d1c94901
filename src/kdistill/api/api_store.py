"""An API teacher's log-probabilities as a sparse teacher store, so a service can serve logit distillation.

    from kdistill.api.api_store import cache_api_teacher
    cache_api_teacher("my-recipe.yaml", {"base_url": "http://127.0.0.1:8000/v1", "model": "lm-teacher"},
                      vocabulary="runs/lm-teacher/student", k=20)

writes the store the recipe's `teacher: {source: cache, path: STORE}` trains from. How each training text is
scored: the student's tokenizer cuts it exactly as the training collator will (`data.max_length`), and the
token ids go to `/completions` with `echo: true, max_tokens: 0, logprobs: k`: the service returns, for every
prompt token after the first, its top-k log-probabilities given the tokens before it. One filler token is
appended so that the last real position (what follows the whole text, which the loss also uses) is scored
too; causal attention means the filler changes nothing before it.

The returned tokens are token strings; they become indices in the student's vocabulary through the same
tokenizer. The echoed prompt must map back to the ids that were sent, and every top-k token must be in the
tokenizer: otherwise the service uses another tokenizer and its log-probabilities cannot be compared with the
student's, which is refused by name. The tail is log(1 − Σ top-k p): the service does not give the rest.

Services report log-probabilities at temperature 1 (before any sampling temperature), so the store holds
τ = 1; a loss at another temperature is refused when the store is opened. Fingerprints: the teacher is the
service's model id (not its URL, so moving the service keeps the store), the tokenizer and the data are
computed exactly as `kdistill.teachers.cached` computes them for a run.

Every answer is kept in an SQLite cache beside the store (`STORE.teacher.sqlite`): a killed or failed run,
started again, asks only for what is missing.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from kdistill.errors import ConfigError, DataError, KdistillError, PairingError


class ScoringFailed(KdistillError):
    """Some texts could not be scored (service errors or garbage after retries); the rest are cached."""


def api_teacher_fingerprint(model_id: str) -> str:
    from kdistill.teachers.fingerprint import fingerprint_text

    return fingerprint_text("openai-compatible teacher", model_id)


def cache_api_teacher(recipe, api, vocabulary: str | None = None, *, stage_index: int = 0, k: int = 20,
                      out: str | Path | None = None, dtype: str = "float16", max_tokens: int = 0,
                      cache_path: str | Path | None = None, console=None, progress: bool = True) -> Path:
    """Score a recipe stage's training texts with an OpenAI-compatible teacher and write a teacher store.

    recipe      a Recipe, a recipe file or a built-in name (its stage gives the data and `max_length`)
    api         a TeacherAPI, or its settings ({base_url, model, api_key_env, ...} or an APITeacher)
    vocabulary  a model dir / hub id / recipe:NAME whose tokenizer and config define the student's
                vocabulary (default: the stage's teacher.model); they are saved in STORE/teacher
    out         default: the stage's teacher.path when it has one, else OUTPUT/teacher-store
    max_tokens  0 asks for the prompt's scores only; use 1 for a service that refuses 0 (the extra
                generated token is ignored)
    """
    from kdistill.config import Recipe, load_recipe
    from kdistill.engine.build import read_sources
    from kdistill.errors import article
    from kdistill.models.loading import detect_task, load_config, load_tokenizer
    from kdistill.teachers.cached import TEACHER_FILES, data_fingerprints, tokenizer_fingerprint
    from kdistill.teachers.recipe_runs import resolve_teacher
    from kdistill.teachers.store import API_RECORD, StoreWriter
    from kdistill.teachers.store_writer import DTYPES, check_store_output

    bad = ([f"k must be at least 1 (got {k})"] if k < 1 else []) + (
        [f"dtype must be {' or '.join(DTYPES)} (got {dtype!r})"] if dtype not in DTYPES else []) + (
        [f"max_tokens must be at least 0 (got {max_tokens})"] if max_tokens < 0 else [])
    if bad:  # before the service is asked anything
        raise ConfigError("; ".join(bad))
    settings = api_settings(api)  # a key pasted for its variable's name is refused before any data is read
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if not 0 <= stage_index < len(recipe.stages) or recipe.stages[stage_index].data is None:
        raise ConfigError(f"stage {stage_index}: the recipe has no training stage there")
    stage = recipe.stages[stage_index]
    vocabulary = vocabulary or (stage.teacher.model if stage.teacher.source == "live" else None)
    if vocabulary is None:
        raise ConfigError(f"a teacher store from a service needs {VOCABULARY}: the model directory whose tokenizer "
                          "the student uses (the stage's teacher is a store, so it cannot say)")
    path, config = load_config(resolve_teacher(vocabulary, console))
    if detect_task(config) != "causal-lm":  # the store holds next-token log-probabilities of a causal LM
        raise ConfigError(f"a teacher store from a service holds a causal LM's next-token scores, for a causal-LM "
                          f"student; {vocabulary!r} (the vocabulary) is {article(detect_task(config))} model")
    tokenizer = load_tokenizer(path)
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        raise ConfigError(f"vocabulary {vocabulary!r} has no tokenizer")
    out = Path(out or stage.teacher.path or Path(recipe.output) / "teacher-store")
    check_store_output(out)  # before the service is asked (and paid): the writer would refuse it only at the end
    records = read_sources(stage.data.train, "train", "data.train", stage.train.seed)
    if any("text_pair" in r for r in records):
        raise DataError("data.train has text pairs; an API teacher scores single texts (causal LMs)")
    unique = _unique(records)
    cache_file = Path(cache_path or out.with_name(out.name + ".teacher.sqlite"))
    fresh = not cache_file.exists()
    client, owned = _client(settings, cache_file)
    vocab = tokenizer.get_vocab()
    try:
        try:
            client.check()  # a dead service: TeacherUnavailable, before anything is asked
        except KdistillError:
            if owned and fresh:  # nothing was asked: no empty answer cache is left beside the store
                client.close()
                owned = False
                for leftover in (cache_file, Path(f"{cache_file}-wal"), Path(f"{cache_file}-shm")):
                    leftover.unlink(missing_ok=True)
            raise
        sent = [_token_ids(tokenizer, r["text"], stage.data.max_length) for r in unique.values()]
        requests = [score_request(ids, k, max_tokens) for ids in sent]
        # one text first: a service with another tokenizer is named before every text is asked (and paid) for
        first = echoed_scores(client, requests[:1], progress=False)[0]
        check_pairing(first, sent[0], k, vocab, vocabulary)
        answers = [first] + echoed_scores(client, requests[1:], progress=progress)
    finally:
        if owned:
            client.close()
    failed = [(key, a.error) for key, a in zip(unique, answers) if not a.ok]
    refused = [a for a in answers if not a.ok and a.status is not None and 400 <= a.status < 500 and a.status != 429]
    if len(refused) == len(failed) == len(unique):  # the same request again would be refused again
        raise ScoringFailed(f"the service refused every request ({refused[0].error}): asking again will not help; "
                            f"change what is asked (k is {k}, max_tokens {max_tokens}) or the service's settings")
    if failed:
        kept = (f"the answers that came back are cached in {client.cache.path}: run again to ask only for the "
                "missing ones") if client.cache is not None else "run again (with a cache_path, to keep what came back)"
        raise ScoringFailed(f"{len(failed)} of {len(unique)} texts could not be scored (first: {failed[0][1]}); {kept}")
    fingerprints = {"teacher": api_teacher_fingerprint(client.model), "tokenizer": tokenizer_fingerprint(tokenizer),
                    **data_fingerprints(records, str(stage.data.max_length))}
    with StoreWriter(out, k=k, temperature=1.0, fingerprints=fingerprints, dtype=dtype,
                     vocab_size=config.get_text_config().vocab_size, overwrite=True) as writer:
        for (key, record), ids, answer in zip(unique.items(), sent, answers):
            writer.add_topk(key, *stored_topk(answer, ids, k, vocab, f"record {record.get('id', key)}"))
    config.save_pretrained(out / TEACHER_FILES)
    tokenizer.save_pretrained(out / TEACHER_FILES)
    (out / TEACHER_FILES / API_RECORD).write_text(json.dumps(
        {"model": client.model, "k": k, "texts": len(unique), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        indent=1))
    if console is not None:
        console.print(f"teacher store of {client.model} ({len(unique)} texts, top {k}) -> {out}")
    return out


# ---------------------------------------------------------------- requests


def score_request(ids: list[int], k: int, max_tokens: int = 0) -> dict:
    """The text's ids plus a filler (the first id again: any id will do, it is never scored), echoed."""
    return {"prompt": ids + [ids[0]], "echo": True, "max_tokens": max_tokens, "logprobs": k, "temperature": 0}


def echoed_scores(client, requests: list[dict], progress: bool = True) -> list:
    """Each request's Completion (or why it failed), through the client's cache, retries and concurrency
    limit. An answer without echoed log-probabilities fails its item and is dropped from the cache, so
    that running again asks for it again."""
    from kdistill.api.client import Failure

    out = []
    for answer in client.map(requests, progress=progress):
        if answer.ok and (answer.tokens is None or answer.top_logprobs is None):
            if client.cache is not None:
                client.cache.discard(answer.key)
            answer = Failure(answer.key, "garbage response: no echoed logprobs (does the service support echo?)")
        out.append(answer)
    return out


# ---------------------------------------------------------------- reading an answer

VOCABULARY = "a vocabulary (--vocabulary, or vocabulary= in Python)"
ANOTHER_TOKENIZER = ("the teacher uses another tokenizer; logit distillation from it needs a student with the "
                     f"teacher's tokenizer (give its model directory as {VOCABULARY})")


def check_pairing(answer, ids: list[int], k: int, vocab: dict[str, int], vocabulary: str) -> None:
    """The first text's answer, read as every answer will be: a teacher with another tokenizer is refused by name
    (its echo spells other tokens, or it refuses token ids past its own vocabulary). Other failures wait for the
    rest, which may come back."""
    if answer.ok:
        stored_topk(answer, ids, k, vocab, "the first text")
    elif answer.status == 400 and any(word in answer.error.lower() for word in ("token id", "vocab")):
        raise PairingError(f"the service refused the token ids of {vocabulary!r}'s tokenizer ({answer.error[:200]}): "
                           + ANOTHER_TOKENIZER)


def stored_topk(answer, ids: list[int], k: int, vocab: dict[str, int], where: str):
    """(top-k log-probabilities, their indices, log tail mass) for each of the text's positions: position j is
    what the teacher expects after token j, i.e. the top list the echo gives token j + 1."""
    tokens, tops = answer.tokens, answer.top_logprobs
    if len(tokens) < len(ids) + 1 or len(tops) < len(ids) + 1:
        raise ScoringFailed(f"{where}: the service echoed {len(tokens)} tokens for a prompt of {len(ids) + 1}; "
                            "it does not support echo with token-id prompts")
    echoed = [vocab.get(t) for t in tokens[:len(ids)]]
    if echoed != ids:
        j = next(i for i, (a, b) in enumerate(zip(echoed, ids)) if a != b)
        raise PairingError(f"{where}: the teacher reads token id {ids[j]} as {tokens[j]!r}, which is "
                           f"{'not in' if echoed[j] is None else f'id {echoed[j]} of'} the student's tokenizer: "
                           + ANOTHER_TOKENIZER)
    values, indices, tails = [], [], []
    for j in range(len(ids)):
        top = [(v, t) for t, v in tops[j + 1][:k]]  # the client lists them most likely first
        if len(top) < k:
            raise ScoringFailed(f"{where}: the service returned {len(top)} top log-probabilities at position {j}, "
                                f"fewer than k = {k}; ask for a k it supports")
        missing = [t for _, t in top if t not in vocab]
        if missing:
            raise PairingError(f"{where}: the teacher returned token {missing[0]!r}, which the student's tokenizer "
                               "does not have: " + ANOTHER_TOKENIZER)
        values.append([v for v, _ in top])
        indices.append([vocab[t] for _, t in top])
        tails.append(_log_tail(values[-1]))
    return (torch.tensor(values, dtype=torch.float32), torch.tensor(indices, dtype=torch.int32),
            torch.tensor(tails, dtype=torch.float32))


def _log_tail(top: list[float]) -> float:
    """log(1 − Σ exp(top)) without the cancellation of computing 1 − Σ first; -inf when the top k hold it all."""
    total = max(top) + math.log(sum(math.exp(v - max(top)) for v in top))
    return math.log(-math.expm1(total)) if total < 0 else -math.inf


# ---------------------------------------------------------------- helpers


def _unique(records: list[dict]) -> dict[str, dict]:
    from kdistill.teachers.cached import record_key

    return {record_key(r): r for r in records}


def _token_ids(tokenizer, text: str, max_length: int) -> list[int]:
    return tokenizer(text, truncation=True, max_length=max_length)["input_ids"]  # as TextCollator cuts it


def api_settings(api):
    """A TeacherAPI as it is, or its settings checked (APITeacher), with errors that never repeat a value given."""
    from pydantic import ValidationError

    from kdistill.api.client import TeacherAPI
    from kdistill.config import APITeacher
    from kdistill.recipe_errors import format_validation

    if isinstance(api, (TeacherAPI, APITeacher)):
        return api
    try:
        return APITeacher.model_validate(api)
    except ValidationError as err:
        raise ConfigError(format_validation(err, "teacher.api", "the API teacher", APITeacher,
                                            "invalid settings")) from None


def _client(settings, cache_path):
    from kdistill.api.client import TeacherAPI

    if isinstance(settings, TeacherAPI):
        return settings, False
    if settings.chat:
        raise ConfigError("teacher.api.chat: scoring texts needs the completions endpoint (chat has no echo)")
    Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
    return TeacherAPI.from_settings(settings, cache_path), True
