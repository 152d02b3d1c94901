"""TeacherAPI against the real teacher server and against a scripted, flaky stub service."""
from __future__ import annotations

import json
import logging
import math
import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kdistill.api.client import Failure, TeacherAPI, TeacherRequestError, TeacherUnavailable
from kdistill.api.response_cache import ResponseCache
from kdistill.api.server import TeacherServer
from kdistill.errors import ConfigError

KEY = "sk-kdistill-test-0123456789abcdef"


# ---- a stub service that misbehaves on cue -----------------------------------------------------

class Stub:
    """An OpenAI-ish service whose next answers follow `script`: ("status", code[, headers]),
    ("garbage", raw bytes), ("sleep", seconds); when the script runs out it answers properly."""

    def __init__(self):
        self.script: list[tuple] = []
        self.seen: list[dict] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.answer(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    authorization = self.headers.get("Authorization")
                    stub.seen.append({"path": self.path, "body": body, "authorization": authorization})
                    step = stub.script.pop(0) if stub.script else ("ok",)
                if step[0] == "status":  # a hostile service echoes our Authorization header back
                    error = {"message": f"busy; you sent {authorization}"}
                    return self.answer(step[1], {"error": error}, step[2] if len(step) > 2 else {})
                if step[0] == "garbage":
                    return self.raw(200, step[1], step[2] if len(step) > 2 else {})
                if step[0] == "sleep":
                    time.sleep(step[1])
                text = f"answer to {body.get('prompt') or body['messages'][-1]['content']}"
                self.answer(200, {"choices": [{"index": 0, "text": text, "finish_reason": "stop"}]})

            def answer(self, status, payload, headers=()):
                self.raw(status, json.dumps(payload).encode(), headers)

            def raw(self, status, data, headers=()):
                try:
                    self.send_response(status)
                    for name, value in dict(headers).items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (timeout tests)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub():
    service = Stub()
    yield service
    service.close()


def api(url, model="stub-model", **settings) -> TeacherAPI:
    return TeacherAPI(url, model, **{"backoff_s": 0.01, "timeout_s": 5, **settings})


def test_retries_503_and_429_then_succeeds(stub):
    stub.script = [("status", 503), ("status", 502), ("status", 429, {"Retry-After": "0"})]
    with api(stub.url) as client:
        answer = client.complete("2+2", max_tokens=4)
    assert answer.text == "answer to 2+2" and answer.finish_reason == "stop" and not answer.cached
    assert len(stub.seen) == 4 and client.requests_sent == 4
    assert stub.seen[0]["path"] == "/v1/completions"
    assert stub.seen[0]["body"] == {"model": "stub-model", "prompt": "2+2", "max_tokens": 4}


def test_retry_after_is_honoured(stub, caplog):
    stub.script = [("status", 429, {"Retry-After": "0.4"})]
    with caplog.at_level("INFO", logger="kdistill.api.client"), api(stub.url, backoff_s=0) as client:
        assert client.complete("x").ok
    assert len(stub.seen) == 2
    assert [r.getMessage().split("; ")[-1] for r in caplog.records if "retry" in r.getMessage()] == ["retry 1/5 in 0.40 s"]


def test_a_client_error_fails_at_once_and_exhausted_retries_fail(stub):
    stub.script = [("status", 400)]
    with api(stub.url, max_retries=2) as client:
        with pytest.raises(TeacherRequestError, match="HTTP 400"):
            client.complete("x")
        assert len(stub.seen) == 1
        stub.script = [("status", 503)] * 3
        [failure] = client.map([{"prompt": "y"}], progress=False)
    assert isinstance(failure, Failure) and not failure.ok
    assert (failure.status, failure.attempts) == (503, 3) and "HTTP 503" in failure.error


def test_a_timeout_is_retried(stub):
    stub.script = [("sleep", 1.5)]
    with api(stub.url, timeout_s=0.3) as client:
        answer = client.complete("slow")
    assert answer.text == "answer to slow" and client.requests_sent == 2


def test_garbage_is_a_failure_for_that_item_only_and_is_not_cached(stub, tmp_path):
    cache = tmp_path / "answers.sqlite"
    stub.script = [("garbage", b'{"choices": [{"text": "trunc')]
    with api(stub.url, cache_path=cache, max_concurrency=1) as client:
        results = client.map([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}], progress=False)
        assert [r.ok for r in results] == [False, True, True]
        assert "garbage" in results[0].error
        stub.script = [("garbage", b'{"id": "no choices here"}'), ("garbage", b'{"choices": [{"message": {}}]}')]
        missing = client.map([{"prompt": "d"}, {"messages": [{"role": "user", "content": "e"}]}], progress=False)
        assert [r.ok for r in missing] == [False, False]
        assert len(client.cache) == 2  # b and c
        again = client.map([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}], progress=False)
    assert [r.text for r in again] == ["answer to a", "answer to b", "answer to c"]
    assert [r.cached for r in again] == [False, True, True]


def test_the_key_never_leaves_the_header(stub, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KDISTILL_TEST_KEY", KEY)
    cache = tmp_path / "answers.sqlite"
    stub.script = [("status", 503), ("status", 401)]  # both echo the key back in their error body
    with caplog.at_level(logging.DEBUG), api(stub.url, api_key_env="KDISTILL_TEST_KEY", cache_path=cache) as client:
        results = client.map([{"prompt": "p"}, {"prompt": "q"}, {"prompt": "r"}], progress=False)
        failed = [r for r in results if not r.ok]
        with pytest.raises(TypeError, match="TeacherAPI holds an API key"):
            pickle.dumps(client)
        text = repr(client) + repr(results) + "".join(f.error for f in failed)
    assert {s["authorization"] for s in stub.seen} == {f"Bearer {KEY}"}
    assert len(failed) == 1 and "***" in failed[0].error
    assert KEY not in text and KEY not in caplog.text
    for path in tmp_path.iterdir():  # the database and its WAL files
        assert KEY.encode() not in path.read_bytes()


def test_repr_names_an_empty_cache(tmp_path):
    with api("http://127.0.0.1:1", cache_path=tmp_path / "answers.sqlite") as client:
        assert f"cache={str(tmp_path / 'answers.sqlite')!r}" in repr(client)


def test_a_missing_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("KDISTILL_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\$KDISTILL_NO_SUCH_KEY"):
        TeacherAPI("http://127.0.0.1:1", "m", api_key_env="KDISTILL_NO_SUCH_KEY")


def test_a_key_with_a_line_ending_is_sent_bare(stub, monkeypatch, caplog):
    # a .env saved with CRLF endings: httpx refused the "\r" and its error quoted the whole key, escaped
    monkeypatch.setenv("KDISTILL_TEST_KEY", KEY + "\r\n")
    with caplog.at_level(logging.DEBUG), api(stub.url, api_key_env="KDISTILL_TEST_KEY") as client:
        assert client.complete("p").text
    assert {s["authorization"] for s in stub.seen} == {f"Bearer {KEY}"}


@pytest.mark.parametrize("value", [KEY[:6] + "\n" + KEY[6:], "\u201c" + KEY + "\u201d", "   "])
def test_a_key_no_header_can_carry_is_refused_without_echoing_it(monkeypatch, value):
    monkeypatch.setenv("KDISTILL_TEST_KEY", value)
    with pytest.raises(ConfigError, match=r"\$KDISTILL_TEST_KEY .*export the bare key") as err:
        TeacherAPI("http://127.0.0.1:1", "m", api_key_env="KDISTILL_TEST_KEY")
    assert KEY[6:] not in str(err.value) and KEY[:6] not in str(err.value)


def test_bad_requests_are_refused_before_anything_is_sent(stub):
    with api(stub.url) as client:
        for request, message in [({"max_tokens": 3}, "exactly one of"),
                                 ({"prompt": "x", "model": "other"}, r"\.model is set by the client"),
                                 ({"prompt": "x", "stream": True}, r"\.stream is set by the client")]:
            with pytest.raises(ConfigError, match=message):
                client.map([{"prompt": "fine"}, request], progress=False)
    assert stub.seen == []


def test_a_dead_service_gives_one_clear_error():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with api(f"http://127.0.0.1:{port}", backoff_s=0.05) as client:
        with pytest.raises(TeacherUnavailable, match=rf"127\.0\.0\.1:{port}/v1 did not answer.*serve-teacher"):
            client.check(budget_s=1)
    assert time.monotonic() - start < 3


# ---- against the real teacher server -----------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tiny_gpt2_dir):
    server = TeacherServer(tiny_gpt2_dir, port=0).start()
    yield server
    server.stop()


def test_against_the_real_server(teacher):
    with api(teacher.url, model=teacher.model_name) as client:
        assert client.check() == [teacher.model_name]
        answer = client.complete("the cat", max_tokens=4, temperature=0, logprobs=3)
        assert answer.tokens and len(answer.tokens) == len(answer.token_logprobs) == len(answer.top_logprobs)
        assert all(len(top) == 3 and top[0][1] >= top[-1][1] for top in answer.top_logprobs)
        assert answer.usage["completion_tokens"] == len(answer.tokens)
        chat = client.chat([{"role": "user", "content": "hi"}], max_tokens=3, temperature=0, logprobs=True,
                           top_logprobs=2)
        assert isinstance(chat.text, str) and len(chat.top_logprobs[0]) == 2
    with api(teacher.url, model="not-served") as client, pytest.raises(ConfigError, match="not-served"):
        client.check()


def test_each_answer_is_cached_once_and_a_second_run_asks_nothing(teacher, tmp_path):
    cache = tmp_path / "answers.sqlite"
    requests = [{"prompt": f"question {i}", "max_tokens": 4, "temperature": 0} for i in range(5)]
    requests.append(dict(requests[0]))  # asked twice, paid once
    requests += [{"prompt": "sample me", "max_tokens": 6, "temperature": 1.0, "seed": i, "candidate": i}
                 for i in range(3)]
    with api(teacher.url, model=teacher.model_name, cache_path=cache) as client:
        first = client.map(requests, progress=False)
        assert all(r.ok for r in first) and client.requests_sent == 8
        assert len(client.cache) == 8 and first[0] is first[5]
        assert len({r.key for r in first[6:]}) == 3  # several samples of one prompt: distinct rows
    with api(teacher.url, model=teacher.model_name, cache_path=cache) as client:
        second = client.map(requests, progress=False)
    assert client.requests_sent == 0 and all(r.cached for r in second)
    assert [r.text for r in second] == [r.text for r in first]


def test_stopping_the_server_mid_run_loses_nothing_and_pays_once(tiny_gpt2_dir, tmp_path):
    server = TeacherServer(tiny_gpt2_dir, port=0).start()
    cache_path = tmp_path / "answers.sqlite"
    requests = [{"prompt": f"item {i}", "max_tokens": 24, "temperature": 0} for i in range(24)]
    client = api(server.url, model=server.model_name, cache_path=cache_path, max_concurrency=2, max_retries=40,
                 backoff_s=0.05, max_backoff_s=0.2)
    outage = {}

    def kill_then_restart():
        while len(client.cache) < 3:
            time.sleep(0.002)
        server.stop()
        outage["answered_before"] = len(client.cache)
        time.sleep(0.6)
        server.start()

    killer = threading.Thread(target=kill_then_restart)
    killer.start()
    try:
        results = client.map(requests, progress=False)
    finally:
        killer.join()
        server.stop()
        client.close()
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    assert outage["answered_before"] < len(requests)
    assert client.requests_sent > len(requests)  # some were refused while it was down, then retried
    with ResponseCache(cache_path) as cache:
        rows = list(cache.rows())
    assert len(rows) == len(requests) == len({row["key"] for row in rows})
    assert sorted(row["request"]["prompt"] for row in rows) == sorted(r["prompt"] for r in requests)


def test_an_echoed_prompts_first_token_may_have_a_null_log_probability_and_no_other_may():
    from kdistill.api.client import GarbageResponse, _completion

    def answer(values):
        return {"choices": [{"text": "ab", "logprobs": {"tokens": ["a", "b"], "token_logprobs": values,
                                                         "top_logprobs": [None, {"b": -0.5, "c": -1.5}]}}]}

    parsed = _completion("k", "/completions", answer([None, -0.5]), cached=False)
    assert parsed.token_logprobs == [None, -0.5] and parsed.top_logprobs == [[], [("b", -0.5), ("c", -1.5)]]
    with pytest.raises(GarbageResponse, match="malformed logprobs"):
        _completion("k", "/completions", answer([-0.1, None]), cached=False)


def test_a_broken_service_is_given_up_on_not_asked_item_by_item(stub, tmp_path):
    stub.script = [("status", 501)] * 100  # 501: not implemented, never retried
    with api(stub.url, max_concurrency=2, cache_path=tmp_path / "a.sqlite") as client:
        with pytest.raises(TeacherUnavailable, match=r"failed 8 requests in a row .*HTTP 501.*cached in"):
            client.map([{"prompt": str(i)} for i in range(60)], progress=False)
    assert len(stub.seen) < 20  # the 501s once each, and what was in flight; not all 60
    other = Stub()  # a service of its own: nothing of the scenario above can reach it
    other.script = [("status", 404)] + [("ok",)] * 3 + [("status", 404)] * 7 + [("ok",)]
    try:
        with api(other.url, max_concurrency=1) as client:  # scattered failures are items, not a dead service
            results = client.map([{"prompt": str(i)} for i in range(12)], progress=False)
    finally:
        other.close()
    assert [r.ok for r in results] == [False, True, True, True] + [False] * 7 + [True]


def test_giving_up_names_the_fix_for_what_failed(stub):
    """A 400 to every request is a setting the service refuses (it is up); a 501, a service to start or fix."""
    stub.script = [("status", 400)] * 8
    with api(stub.url, max_concurrency=1) as client:
        with pytest.raises(TeacherUnavailable, match=r"HTTP 400.*none was left to ask: the service is up but refuses "
                                                     r"these requests: change the settings it names"):
            client.map([{"prompt": str(i)} for i in range(8)], progress=False)
        stub.script = [("status", 401)] * 8
        with pytest.raises(TeacherUnavailable, match=r"stopped without asking the 2 left: the key is refused"):
            client.map([{"prompt": f"k{i}"} for i in range(10)], progress=False)
        stub.script = [("status", 501)] * 8
        with pytest.raises(TeacherUnavailable, match=r"HTTP 501.*: start it .*\(api.base_url in a recipe's teacher, "
                                                     r"synthesize.teacher, lion.teacher, lion.referee or lion.writer"):
            client.map([{"prompt": f"n{i}"} for i in range(8)], progress=False)


def test_proxy_5xx_are_retried_and_permanent_ones_are_not(stub):
    stub.script = [("status", 520), ("status", 529), ("status", 524)]
    with api(stub.url) as client:
        assert client.complete("x").ok and client.requests_sent == 4
        stub.script = [("status", 505)]
        with pytest.raises(TeacherRequestError, match="HTTP 505"):
            client.complete("y")
        assert client.requests_sent == 5


def test_a_body_that_fails_to_decode_is_asked_again(stub):
    stub.script = [("garbage", b"not gzip at all", {"Content-Encoding": "gzip"})]
    with api(stub.url) as client:
        assert client.complete("x").text == "answer to x" and client.requests_sent == 2


def test_non_finite_log_probabilities_and_odd_indices_are_garbage_not_crashes():
    from kdistill.api.client import GarbageResponse, _completion

    def answer(value, index=0):
        return {"choices": [{"index": index, "text": "a", "logprobs": {"tokens": ["a"], "token_logprobs": [value],
                                                                        "top_logprobs": [{"a": value}]}},
                            {"index": 1, "text": "b"}]}

    assert _completion("k", "/completions", answer(-0.5), cached=False).choices[1].text == "b"
    for value in (float("nan"), float("-inf")):
        with pytest.raises(GarbageResponse, match="not a finite number"):
            _completion("k", "/completions", answer(value), cached=False)
    with pytest.raises(GarbageResponse, match="indices are not all integers"):
        _completion("k", "/completions", answer(-0.5, index="0"), cached=False)


def test_log_probabilities_no_distribution_can_have_are_garbage():
    """A store kept them, with its tail mass at -inf, and trained on them."""
    from kdistill.api.client import GarbageResponse, _completion

    def answer(value, top):
        return {"choices": [{"index": 0, "text": "a", "logprobs": {"tokens": ["a"], "token_logprobs": [value],
                                                                    "top_logprobs": [top]}}]}

    with pytest.raises(GarbageResponse, match="a log-probability is above 0"):
        _completion("k", "/completions", answer(5.0, {"a": 5.0}), cached=False)
    with pytest.raises(GarbageResponse, match="add up to a probability of 3.74"):  # exp(-0.1) + ... + exp(-0.5)
        _completion("k", "/completions", answer(-0.1, {t: -v / 10 for v, t in enumerate("abcde", 1)}), cached=False)
    # a near-certain token rounded to +0.0001, and a top-k holding a rounded 1.002 of the mass, are a service's
    # rounding, not garbage
    rounded = {"a": 1e-4, "b": math.log(0.002)}
    assert _completion("k", "/completions", answer(1e-4, rounded), cached=False).choices[0].text == "a"


def test_a_key_pasted_where_its_variable_name_goes_is_refused_and_not_repeated():
    from kdistill.config import APITeacher

    with pytest.raises(ConfigError) as err:
        TeacherAPI("http://127.0.0.1:1", "m", api_key_env=KEY)
    assert "NAME of the environment variable" in str(err.value) and KEY not in str(err.value)
    with pytest.raises(ValueError) as err:
        APITeacher(base_url="http://127.0.0.1:1", model="m", api_key_env=KEY)
    assert KEY not in str(err.value).replace(f"input_value='{KEY}'", "")  # pydantic's own echo is never printed


def test_a_service_that_wants_a_key_when_none_is_configured_says_so():
    class Locked(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Locked)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with api(f"http://127.0.0.1:{httpd.server_address[1]}") as client:
            with pytest.raises(TeacherUnavailable, match="wants a key .*name that variable in teacher.api.api_key_env"):
                client.check(budget_s=2)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_an_interrupted_map_stops_retrying_what_was_in_flight(stub):
    import os
    import signal

    stub.script = [("status", 503, {"Retry-After": "3"})] * 20
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C half a second in
    # Python's own Ctrl-C, whatever handler an earlier test in this process left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with api(stub.url, max_concurrency=2, max_retries=5) as client:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            client.map([{"prompt": str(i)} for i in range(4)], progress=False)
        for thread in [t for t in threading.enumerate() if t.name.startswith("teacher-api")]:
            thread.join(timeout=10)  # a retry would come 3 s (Retry-After) after its first ask, well inside this
    signal.signal(signal.SIGINT, previous)
    assert len(stub.seen) == 2  # the two in flight, each asked once: not retried after the interrupt


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_the_server_listens_on_the_ipv6_loopback(tiny_gpt2_dir):
    with TeacherServer(tiny_gpt2_dir, host="::1", port=0) as server:
        assert server.url.startswith("http://[::1]:")
        with api(server.url, model=server.model_name) as client:
            assert client.check() == [server.model_name] and client.complete("a", max_tokens=2).ok


def test_a_negative_content_length_is_refused_not_waited_on(teacher):
    host, port = teacher.url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:  # the connection stays open
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}")
        head = conn.recv(4096).decode()
    assert head.startswith("HTTP/1.0 400") or head.startswith("HTTP/1.1 400")
