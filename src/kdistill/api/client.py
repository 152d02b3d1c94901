"""A client for OpenAI-compatible teacher services: retries, a concurrency limit and a durable cache.

Built on httpx rather than the ``openai`` SDK: we need our own retry and backoff policy, our own
concurrency limit and a cache that survives a killed run, which the SDK would only get in the way
of, and httpx is one small dependency. ``TeacherAPI.map`` asks many questions at once and returns
one result per question, in order: a :class:`Completion`, or a :class:`Failure` recording why that
one item could not be answered (a run never dies for one bad item).

The API key is read from the environment variable named by ``api_key_env`` and sent only as a Bearer
header: it is not logged, cached, pickled, or shown in any message or repr.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import httpx

from kdistill.api.response_cache import ResponseCache, request_key
from kdistill.api.responses import (  # noqa: F401 - Choice is re-exported: kdistill.api and tests take it from here
    Choice, Completion, Failure, GarbageResponse, _completion, _error_message, _retry_after)
from kdistill.config_api import ENV_NAME_RULE, is_env_name
from kdistill.errors import ConfigError, KdistillError

log = logging.getLogger("kdistill.api.client")

SERVE_HINT = ("start it (for a local model: `kdistill serve-teacher MODEL_DIR --port N`) or fix its address "
              "(api.base_url in a recipe's teacher, synthesize.teacher, lion.teacher, lion.referee or lion.writer "
              "block; --base-url on the command line)")


# Busy or briefly failing: worth another try (408, 429 and every 5xx, proxies' 520-529 included). 501 (not
# implemented), 505 (HTTP version) and the other 4xx are permanent.
PERMANENT_5XX = frozenset({501, 505})


def is_retried(status: int) -> bool:
    return status in (408, 429) or (500 <= status < 600 and status not in PERMANENT_5XX)


class TeacherUnavailable(KdistillError):
    """The teacher service cannot be reached or refuses us (checked before a run spends anything)."""


class TeacherRequestError(KdistillError):
    """One request failed after its retries (``complete``/``chat``; ``map`` records a Failure instead)."""


class _Failed(Exception):
    def __init__(self, problem: str, status: int | None, attempts: int):
        super().__init__(problem)
        self.problem, self.status, self.attempts = problem, status, attempts


class TeacherAPI:
    """``TeacherAPI("http://127.0.0.1:8000/v1", "my-model")``; ``base_url`` with or without ``/v1``."""

    @classmethod
    def for_part(cls, own, fallback, cache_path, where: str, what: str) -> "TeacherAPI":
        """The client of a part with its own optional `api:` block (a judge, a writer), else the teacher's."""
        from kdistill.config import APITeacher
        from kdistill.errors import ConfigError

        if own is None and fallback is None:
            raise ConfigError(f"{where}.api: {what} needs a chat service: give {where}.api "
                              "({base_url, model, ...}) or a lion.teacher.api to reuse")
        return cls.from_settings(APITeacher.model_validate(own) if own is not None else fallback, cache_path)

    @classmethod
    def from_settings(cls, api, cache_path=None) -> "TeacherAPI":
        """A client for a recipe's `api:` block (config.APITeacher)."""
        return cls(api.base_url, api.model, api_key_env=api.api_key_env, max_concurrency=api.max_concurrency,
                   timeout_s=api.timeout_s, max_retries=api.max_retries,
                   cache_path=str(cache_path) if cache_path else None)

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, max_concurrency: int = 4,
                 timeout_s: float = 60, max_retries: int = 5, backoff_s: float = 0.5, cache_path: str | None = None,
                 max_backoff_s: float = 60):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"teacher.api.base_url {base_url!r} must start with http:// or https://")
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ConfigError("teacher.api: max_concurrency must be >= 1, max_retries >= 0, timeout_s > 0 "
                              "and backoff_s >= 0")
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.model, self.api_key_env = model, api_key_env
        self.max_concurrency, self.timeout_s, self.max_retries = max_concurrency, timeout_s, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._secret = _read_key(api_key_env)
        headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
        self._http = httpx.Client(timeout=timeout_s, headers=headers,
                                  limits=httpx.Limits(max_connections=max_concurrency))
        self._slots = threading.BoundedSemaphore(max_concurrency)  # shared by map and direct callers
        self.cache = ResponseCache(cache_path) if cache_path else None
        self.requests_sent = 0  # HTTP requests actually made, retries included
        self._counting = threading.Lock()

    def __repr__(self) -> str:
        return (f"TeacherAPI(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"cache={str(self.cache.path) if self.cache is not None else None!r})")  # an empty cache is falsy

    def __getstate__(self):
        raise TypeError("TeacherAPI holds an API key and open connections and is not pickled; "
                        "create one per process from the same settings")

    def close(self) -> None:
        self._http.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> TeacherAPI:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- asking --------------------------------------------------------------------------------

    def complete(self, prompt: str, *, candidate: int = 0, **sampling) -> Completion:
        """One legacy completion; raises TeacherRequestError if it fails after its retries."""
        return self._one({"prompt": prompt, "candidate": candidate, **sampling})

    def chat(self, messages: list[dict], *, candidate: int = 0, **sampling) -> Completion:
        """One chat completion; raises TeacherRequestError if it fails after its retries."""
        return self._one({"messages": messages, "candidate": candidate, **sampling})

    def map(self, requests: list[dict], progress: bool = True,
            give_up_after: int | None = None) -> list[Completion | Failure]:
        """Ask every request ({"prompt": ...} or {"messages": ...}, sampling settings, optional
        "candidate"), ``max_concurrency`` at a time; results come back in order. Identical requests
        are asked once. Each answer is cached the moment it arrives.

        One bad item is a Failure in the results, but ``give_up_after`` failures in a row (default
        max(8, 2 * max_concurrency)) mean the service itself is broken (a wrong endpoint, a server
        answering 501 or 500 to everything): the rest is not asked and TeacherUnavailable is raised."""
        prepared = [self._prepare(request, f"requests[{i}]") for i, request in enumerate(requests)]
        unique = {key: (endpoint, body) for key, endpoint, body in prepared}
        answers: dict[str, Completion | Failure] = {}
        failed = cached = in_a_row = 0
        give_up_after = give_up_after or max(8, 2 * self.max_concurrency)
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("cached {task.fields[cached]} · failed {task.fields[failed]}"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="teacher-api")
        stop = threading.Event()  # set when this map ends early: its requests in flight retry no more
        try:
            with Progress(*columns, disable=not progress) as bar:
                task = bar.add_task(f"teacher {self.model}", total=len(unique), cached=0, failed=0)
                futures = {pool.submit(self._ask_safely, key, endpoint, body, stop): key
                           for key, (endpoint, body) in unique.items()}
                for future in as_completed(futures):
                    answer = answers[futures[future]] = future.result()
                    failed += not answer.ok
                    cached += bool(answer.ok and answer.cached)
                    in_a_row = 0 if answer.ok else in_a_row + 1
                    bar.update(task, advance=1, cached=cached, failed=failed)
                    if in_a_row >= give_up_after:
                        # the requests already sent finish (at most max_concurrency) before the client may close
                        stop.set()
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise TeacherUnavailable(self._gave_up(in_a_row, answer, len(unique) - len(answers)))
        except BaseException:  # Ctrl-C: drop what has not started; finished answers are already cached
            stop.set()  # and what is in flight is not retried (a request still runs out its timeout)
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return [answers[key] for key, _, _ in prepared]

    def _gave_up(self, in_a_row: int, last: Failure, left: int) -> str:
        kept = (f"the answers that came back are cached in {self.cache.path}, so a new run asks only for the rest"
                if self.cache is not None else "nothing was cached (no cache_path)")
        stopped = f"stopped without asking the {left} left" if left else "none was left to ask"
        if last.status in (401, 403):
            fix = "the key is refused: check the variable named by api_key_env"
        elif last.status is not None and 400 <= last.status < 500 and last.status not in (404, 408, 429):
            # the service is up and refuses what is asked: starting it or moving it would not help
            fix = ("the service is up but refuses these requests: change the settings it names (e.g. a --k above "
                   "its top-logprobs limit, or a model it does not serve)")
        else:
            fix = SERVE_HINT
        return (f"the teacher API at {self.base_url} failed {in_a_row} requests in a row (last: {last.error}); "
                f"{stopped}: {fix}; {kept}")

    def check(self, budget_s: float = 10) -> list[str]:
        """One GET /models (retried within ``budget_s``): the ids the service lists. Raises
        TeacherUnavailable when it does not answer or refuses the key, ConfigError when it answers but
        does not list ``model``."""
        try:
            response = self._send("GET", "/models", None, deadline=time.monotonic() + budget_s,
                                  timeout=min(self.timeout_s, budget_s))
        except _Failed as err:
            if err.status in (401, 403) and self.api_key_env is None:
                raise TeacherUnavailable(f"the teacher API at {self.base_url} wants a key ({err.problem}): export it "
                                         "in an environment variable and name that variable in "
                                         "teacher.api.api_key_env") from None
            if err.status in (401, 403):
                raise TeacherUnavailable(f"the teacher API at {self.base_url} refused the key in "
                                         f"${self.api_key_env} ({err.problem}): put a valid key in that "
                                         "environment variable") from None
            if err.status == 404:  # it is up; some services just do not list models
                return []
            raise TeacherUnavailable(f"the teacher API at {self.base_url} did not answer ({err.problem}, "
                                     f"{err.attempts} attempts): {SERVE_HINT}") from None
        try:
            ids = [m["id"] for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise TeacherUnavailable(f"{self.base_url}/models did not answer like an OpenAI-compatible service: "
                                     f"{SERVE_HINT}") from None
        if ids and self.model not in ids:
            raise ConfigError(f"model {self.model!r} (teacher.api.model in a recipe, --model on the command line) is "
                              f"not served at {self.base_url}; it serves: {', '.join(ids[:20])}")
        return ids

    # ---- one request ---------------------------------------------------------------------------

    def _prepare(self, request: dict, where: str) -> tuple[str, str, dict]:
        if not isinstance(request, dict):
            raise ConfigError(f"{where} must be a dict with a prompt or messages")
        request = dict(request)
        candidate = request.pop("candidate", 0)
        if ("prompt" in request) == ("messages" in request):
            raise ConfigError(f"{where} needs exactly one of 'prompt' (completions) or 'messages' (chat)")
        for reserved in ("model", "stream"):
            if request.get(reserved) not in (None, False):
                raise ConfigError(f"{where}.{reserved} is set by the client (from teacher.api.model; "
                                  "streaming is not used): remove it")
        if not isinstance(candidate, int):
            raise ConfigError(f"{where}.candidate must be an integer (which sample of this request)")
        endpoint = "/chat/completions" if "messages" in request else "/completions"
        body = {"model": self.model, **request}
        return request_key(endpoint, body, candidate), endpoint, body

    def _one(self, request: dict) -> Completion:
        answer = self._ask(*self._prepare(request, "request"))
        if not answer.ok:
            raise TeacherRequestError(f"the teacher API at {self.base_url} could not answer: {answer.error}")
        return answer

    def _ask_safely(self, key: str, endpoint: str, body: dict, stop: threading.Event) -> Completion | Failure:
        try:
            return self._ask(key, endpoint, body, stop)
        except Exception as err:  # a bug must cost one item, not the run (and is logged in full)
            log.exception("teacher request %s failed unexpectedly", key[:12])
            return Failure(key, self._redact(f"{type(err).__name__}: {err}"))

    def _ask(self, key: str, endpoint: str, body: dict, stop: threading.Event | None = None) -> Completion | Failure:
        if self.cache is not None and (payload := self.cache.get(key)) is not None:
            return _completion(key, endpoint, payload, cached=True)
        try:
            response = self._send("POST", endpoint, body, stop=stop)
        except _Failed as err:
            log.warning("teacher request %s failed: %s", key[:12], err.problem)
            return Failure(key, err.problem, err.status, err.attempts)
        try:
            payload = response.json()
            answer = _completion(key, endpoint, payload, cached=False)
            if self.cache is not None:  # refuses NaN anywhere in the answer (JSON has none)
                self.cache.put(key, endpoint, body, payload)
        except (ValueError, GarbageResponse) as err:  # not cached: a later run asks again
            problem = f"garbage response: {self._redact(str(err))[:300]}"
            log.warning("teacher request %s: %s", key[:12], problem)
            return Failure(key, problem, response.status_code)
        return answer

    def _send(self, method: str, path: str, body: dict | None, *, deadline: float | None = None,
              timeout: float | None = None, stop: threading.Event | None = None) -> httpx.Response:
        """The request with retries: timeouts, connection errors, undecodable bodies and the statuses that
        is_retried names are retried with exponential backoff and jitter (or the server's Retry-After); other
        errors fail at once."""
        attempts = 0
        while True:
            if stop is not None and stop.is_set():
                raise _Failed("not asked: the run was stopped", None, attempts)
            attempts += 1
            status, retry_after = None, None
            try:
                with self._slots:
                    with self._counting:
                        self.requests_sent += 1
                    response = self._http.request(method, self.base_url + path, json=body,
                                                  timeout=timeout or self.timeout_s)
            except httpx.TimeoutException:
                problem = f"no answer within {timeout or self.timeout_s:g} s"
            except httpx.TransportError as err:
                problem = f"connection failed ({type(err).__name__}: {self._redact(str(err))[:200]})"
            except httpx.DecodingError as err:  # a body mangled on the way (bad gzip): asked again
                problem = f"an answer that could not be decoded ({self._redact(str(err))[:200]})"
            else:
                if response.status_code < 400:
                    return response
                status, retry_after = response.status_code, _retry_after(response)
                problem = f"HTTP {status}: {self._redact(_error_message(response))[:300]}"
                if not is_retried(status):
                    raise _Failed(problem, status, attempts)
            if retry_after is None:  # exponential, with jitter so parallel workers do not retry in step
                retry_after = self.backoff_s * 2 ** (attempts - 1) * random.uniform(0.5, 1.5)
            delay = min(retry_after, self.max_backoff_s)
            if attempts > self.max_retries or (deadline is not None and time.monotonic() + delay >= deadline):
                raise _Failed(problem, status, attempts)
            log.info("%s %s: %s; retry %d/%d in %.2f s", method, path, problem, attempts, self.max_retries, delay)
            if stop.wait(delay) if stop is not None else time.sleep(delay):
                raise _Failed(f"{problem}; not retried: the run was stopped", status, attempts)

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


def _read_key(env: str | None) -> str | None:
    if env is None:
        return None
    if not is_env_name(env):  # most likely the key itself, pasted in: not repeated here
        raise ConfigError(ENV_NAME_RULE)
    value = os.environ.get(env)
    if not value:
        raise ConfigError(f"teacher.api.api_key_env names ${env}, which is not set: export the API key in that "
                          "environment variable (keys are read from the environment only, never from files)")
    # a .env saved with CRLF endings leaves a "\r" that httpx refuses to send, and its error quotes the header
    # escaped, past the redaction: strip the ends, and refuse what no header can hold without echoing the value
    value = value.strip()
    if not value or not value.isascii() or not value.isprintable():
        raise ConfigError(f"${env} (teacher.api.api_key_env) holds characters an HTTP header cannot carry (a line "
                          "break, a non-ASCII quote pasted with the key, or only spaces): export the bare key")
    return value


