"""What a teacher service answers, parsed: a Completion with its Choices, or a Failure saying why not.
A 200 answer that cannot be used (not JSON, no choices, non-finite log-probabilities) is a GarbageResponse,
which the client turns into a Failure and never caches."""
from __future__ import annotations

import email.utils
import json
import math
import time
from dataclasses import dataclass, field

import httpx


class GarbageResponse(ValueError):
    """A 200 answer that is not a usable completion: not JSON, no choices, wrong types."""


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str | None
    tokens: list[str] | None = None                            # present when logprobs were asked for
    token_logprobs: list[float | None] | None = None          # None: an echoed prompt's first token
    top_logprobs: list[list[tuple[str, float]]] | None = None  # per position, most likely first


@dataclass(frozen=True)
class Completion:
    key: str                  # the cache key of the request
    choices: list[Choice]
    usage: dict = field(default_factory=dict)
    cached: bool = False      # answered from the cache, no request made
    ok = True

    # the first choice, for the common n = 1 case
    text = property(lambda self: self.choices[0].text)
    finish_reason = property(lambda self: self.choices[0].finish_reason)
    tokens = property(lambda self: self.choices[0].tokens)
    token_logprobs = property(lambda self: self.choices[0].token_logprobs)
    top_logprobs = property(lambda self: self.choices[0].top_logprobs)


@dataclass(frozen=True)
class Failure:
    key: str
    error: str                # what went wrong, in words
    status: int | None = None  # the HTTP status, when there was one
    attempts: int = 1
    ok = False


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # an HTTP date
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip() or response.reason_phrase


def _completion(key: str, endpoint: str, payload, cached: bool) -> Completion:
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or not choices:
        raise GarbageResponse(f"no choices in {json.dumps(payload)[:200]}")
    indices = [c.get("index", 0) if isinstance(c, dict) else 0 for c in choices]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise GarbageResponse(f"choice indices are not all integers: {indices[:8]}")
    ordered = [c for _, c in sorted(zip(indices, choices), key=lambda pair: pair[0])]
    parsed = [_chat_choice(c) if endpoint == "/chat/completions" else _legacy_choice(c) for c in ordered]
    usage = payload.get("usage")
    return Completion(key, parsed, usage if isinstance(usage, dict) else {}, cached)


def _legacy_choice(choice) -> Choice:
    if not isinstance(choice, dict) or not isinstance(choice.get("text"), str):
        raise GarbageResponse("a choice has no text")
    logprobs = choice.get("logprobs")
    if not logprobs:
        return Choice(choice["text"], choice.get("finish_reason"))
    try:
        # echo: true gives the prompt's first token a null log-probability (nothing comes before it)
        tokens = list(logprobs["tokens"])
        values = [None if v is None and i == 0 else float(v) for i, v in enumerate(logprobs["token_logprobs"])]
        tops = [sorted(((str(t), float(v)) for t, v in (top or {}).items()), key=lambda p: -p[1])
                for top in logprobs.get("top_logprobs") or [None] * len(tokens)]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise GarbageResponse("malformed logprobs") from None
    if not len(tokens) == len(values) == len(tops):
        raise GarbageResponse("logprobs lists of different lengths")
    _check_logprobs(values, tops)
    return Choice(choice["text"], choice.get("finish_reason"), tokens, values, tops)


def _chat_choice(choice) -> Choice:
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise GarbageResponse("a choice has no message content")
    logprobs = choice.get("logprobs")
    if not logprobs:
        return Choice(message["content"], choice.get("finish_reason"))
    try:
        content = logprobs["content"]
        tokens, values = [str(e["token"]) for e in content], [float(e["logprob"]) for e in content]
        tops = [[(str(t["token"]), float(t["logprob"])) for t in e.get("top_logprobs") or []] for e in content]
    except (KeyError, TypeError, ValueError):
        raise GarbageResponse("malformed logprobs") from None
    _check_logprobs(values, tops)
    return Choice(message["content"], choice.get("finish_reason"), tokens, values, tops)


MASS_SLACK = 0.01  # services round their log-probabilities; a real top-k never holds much more than all the mass


def _check_logprobs(values: list, tops: list) -> None:
    # NaN or infinity cannot be cached as JSON, and a store or loss built on them would be NaN
    if not all(math.isfinite(v) for v in values if v is not None) or \
            not all(math.isfinite(v) for top in tops for _, v in top):
        raise GarbageResponse("a log-probability is not a finite number (NaN or infinity)")
    # a store would keep such values and train on a 'distribution' that is none, its tail mass at -inf
    if any(v > math.log1p(MASS_SLACK) for v in values if v is not None):
        raise GarbageResponse("a log-probability is above 0 (a probability above 1)")
    for top in tops:
        if top and sum(math.exp(v) for _, v in top) > 1 + MASS_SLACK:
            raise GarbageResponse(f"one position's top log-probabilities add up to a probability of "
                                  f"{sum(math.exp(v) for _, v in top):.2f}, more than 1")
