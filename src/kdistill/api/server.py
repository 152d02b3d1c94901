"""`kdistill serve-teacher`: an OpenAI-compatible HTTP server over a local Hugging Face causal LM.

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` (legacy format, ``logprobs: k`` up to 20; prompts as
text or token ids; ``echo: true`` scores the prompt too, and with ``max_tokens: 0`` only the prompt) and
``POST /v1/chat/completions`` (``logprobs: true, top_logprobs: k``). Log-probabilities are the
model's own log-softmax at each generated position (before temperature or top-p), so they can feed
logit distillation. Tokens are the tokenizer's own token strings (``convert_ids_to_tokens``), which
map back to ids exactly. Standard library server, no authentication, so loopback only unless the
caller says otherwise; requests are generated one at a time under a lock.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kdistill.api.local_model import BadRequest, LocalModel, Sample
from kdistill.errors import ConfigError, KdistillError, article

log = logging.getLogger("kdistill.api.server")

MAX_LOGPROBS = 20
MAX_CANDIDATES = 16
MAX_BODY_BYTES = 8 << 20
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "user"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


class ThreadingHTTPServer6(ThreadingHTTPServer):
    """The standard server is IPv4 only; an IPv6 address (::1) needs its own address family."""
    address_family = socket.AF_INET6


class TeacherServer(LocalModel):
    """``TeacherServer(model_dir, port=0).start()`` serves in a background thread; ``.url`` is the base
    URL (with ``/v1``); ``.stop()`` stops accepting (requests in flight finish) and ``.start()`` again
    resumes on the same port."""

    def __init__(self, model_dir: str, host: str = "127.0.0.1", port: int = 8000, *, allow_remote: bool = False,
                 model_name: str | None = None, max_tokens_limit: int = 1024, trust_remote_code: bool = False):
        if not allow_remote and not is_loopback(host):
            raise ConfigError(f"host {host!r} is not a loopback address and the teacher server has no "
                              "authentication: serve on 127.0.0.1, or pass allow_remote=True (--allow-remote) "
                              "to expose it on purpose")
        from kdistill.models.loading import detect_task, load_config, load_model

        task = detect_task(load_config(model_dir, trust_remote_code)[1])
        if task != "causal-lm":  # loaded as one anyway, it would answer from a randomly initialised LM head
            raise ConfigError(f"{model_dir} is {article(task)} model; the teacher server generates text, so it needs a "
                              f"causal LM (a GPT-2 or Llama directory, or recipe:lm-teacher)")
        loaded = load_model(model_dir, task="causal-lm", trust_remote_code=trust_remote_code)
        self.model, self.tokenizer = loaded.model.eval(), loaded.tokenizer
        if self.tokenizer is None:
            raise ConfigError(f"{model_dir} has no tokenizer; the teacher server needs one to read prompts")
        self.model_name = model_name or Path(model_dir.rstrip("/")).name
        self.host, self.port, self.max_tokens_limit = host, port, max_tokens_limit
        self.generate_lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def bind(self) -> ThreadingHTTPServer:
        handler = type("Handler", (RequestHandler,), {"teacher": self})
        try:
            server = ThreadingHTTPServer6 if ":" in self.host else ThreadingHTTPServer
            self._httpd = server((self.host, self.port), handler)
        except OSError as err:
            if err.errno == errno.EADDRINUSE or err.errno == errno.EACCES:
                fix = "pick another port with --port, or stop what is using it"
            else:  # a name that does not resolve, or an address that is not this machine's
                fix = "--host must be an address of this machine (127.0.0.1 or ::1, or 0.0.0.0 for every one)"
            raise KdistillError(f"cannot listen on {self.host}:{self.port} ({err.strerror}): {fix}") from None
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]  # port 0 -> the free port the OS chose
        return self._httpd

    def start(self) -> TeacherServer:
        httpd = self.bind()
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="teacher-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = self._thread = None

    def __enter__(self) -> TeacherServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the protocol -------------------------------------------------------------------------

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "kdistill"}]}

    def completions(self, body: dict) -> dict:
        check_fields(body, COMPLETION_FIELDS)
        echo = body.get("echo", False)
        if echo not in (True, False):
            raise BadRequest("echo must be true or false", "echo")
        prompts = self.prompt_ids(body.get("prompt"))
        k = body.get("logprobs")
        if k is not None and (not is_int(k) or not 0 <= k <= MAX_LOGPROBS):
            raise BadRequest(f"logprobs must be an integer from 0 to {MAX_LOGPROBS}", "logprobs")
        settings = self.sampling(body, default_max_tokens=16, min_tokens=0 if echo else 1)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for ids in prompts:
            prompt_tokens += len(ids)
            samples = self.generate(ids, settings, 0 if k is None else k)  # checks the context first
            scored = self.score(ids, k or 0) if echo else None  # what the model gives the prompt's own tokens
            for sample in samples:
                completion_tokens += len(sample.token_ids)
                if scored is not None:  # OpenAI's echo: the prompt, then the completion, in text and logprobs
                    sample = Sample(ids + sample.token_ids, self.tokenizer.decode(ids) + sample.text,
                                    sample.finish_reason, scored.logprobs + sample.logprobs, scored.top + sample.top)
                choices.append({"index": len(choices), "text": sample.text, "finish_reason": sample.finish_reason,
                                "logprobs": None if k is None else self.legacy_logprobs(sample)})
        return self.envelope("cmpl", "text_completion", choices, prompt_tokens, completion_tokens)

    def prompt_ids(self, prompt) -> list[list[int]]:
        """Prompts as OpenAI takes them: a string, a list of strings, a list of token ids (one prompt, used
        exactly as given) or a list of such lists."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)):
            prompt = [prompt]
        vocab = self.model.config.get_text_config().vocab_size
        if not prompt or not isinstance(prompt, list) or not all(
                isinstance(p, str) or (isinstance(p, list) and p and all(is_int(t) and 0 <= t < vocab for t in p))
                for p in prompt):
            raise BadRequest(f"prompt must be a string, a list of strings, a non-empty list of token ids in "
                             f"[0, {vocab}) or a list of such lists", "prompt")
        return [self.encode(p) if isinstance(p, str) else list(p) for p in prompt]

    def chat(self, body: dict) -> dict:
        check_fields(body, CHAT_FIELDS)
        messages = body.get("messages")
        if (not isinstance(messages, list) or not messages or
                not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                        for m in messages)):
            raise BadRequest("messages must be a non-empty list of {role, content} objects with string values",
                             "messages")
        if body.get("logprobs") not in (None, True, False):
            raise BadRequest("logprobs must be true or false in chat completions", "logprobs")
        k = body.get("top_logprobs")
        if k is not None and (not is_int(k) or not 0 <= k <= MAX_LOGPROBS or not body.get("logprobs")):
            raise BadRequest(f"top_logprobs must be an integer from 0 to {MAX_LOGPROBS}, with logprobs: true",
                             "top_logprobs")
        if "max_completion_tokens" in body:
            body = {**body, "max_tokens": body["max_completion_tokens"]}
        settings = self.sampling(body, default_max_tokens=None)  # None: until the end token or the context is full
        ids = self.encode_chat(messages)
        choices, completion_tokens = [], 0
        for sample in self.generate(ids, settings, k or 0):
            completion_tokens += len(sample.token_ids)
            choices.append({"index": len(choices), "message": {"role": "assistant", "content": sample.text},
                            "finish_reason": sample.finish_reason,
                            "logprobs": self.chat_logprobs(sample) if body.get("logprobs") else None})
        return self.envelope("chatcmpl", "chat.completion", choices, len(ids), completion_tokens)

    def envelope(self, prefix: str, kind: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def sampling(self, body: dict, default_max_tokens: int | None, min_tokens: int = 1) -> dict:
        if body.get("stream"):
            raise BadRequest("stream: true is not supported; ask without streaming", "stream")
        if body.get("model") not in (None, self.model_name):
            raise BadRequest(f"model {body['model']!r} is not served here; this server serves "
                             f"{self.model_name!r}", "model", status=404)
        settings = {"max_tokens": body.get("max_tokens", default_max_tokens),
                    "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
                    "n": body.get("n", 1), "seed": body.get("seed"), "stop": body.get("stop")}
        if settings["max_tokens"] is not None and (not is_int(settings["max_tokens"])
                                                   or not min_tokens <= settings["max_tokens"] <= self.max_tokens_limit):
            raise BadRequest(f"max_tokens must be an integer from {min_tokens} to {self.max_tokens_limit}"
                             + (" (0 only with echo: true)" if min_tokens else ""), "max_tokens")
        if not is_number(settings["temperature"]) or not 0 <= settings["temperature"] <= 2:
            raise BadRequest("temperature must be a number from 0 to 2", "temperature")
        if not is_number(settings["top_p"]) or not 0 < settings["top_p"] <= 1:
            raise BadRequest("top_p must be a number in (0, 1]", "top_p")
        if not is_int(settings["n"]) or not 1 <= settings["n"] <= MAX_CANDIDATES:
            raise BadRequest(f"n must be an integer from 1 to {MAX_CANDIDATES}", "n")
        # torch.manual_seed's range: a larger one raised inside the model and was answered as a 500
        if settings["seed"] is not None and not (is_int(settings["seed"]) and -2**63 <= settings["seed"] < 2**64):
            raise BadRequest("seed must be an integer from -2**63 to 2**64 - 1", "seed")
        stop = settings["stop"]
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest("stop must be a non-empty string or a list of up to 4 of them", "stop")
        settings["stop"] = stop
        return settings

    # ---- the model ----------------------------------------------------------------------------

    def legacy_logprobs(self, sample: Sample) -> dict:
        return {"tokens": [self.token(t) for t in sample.token_ids], "token_logprobs": sample.logprobs,
                "top_logprobs": [None if top is None else {self.token(i): lp for i, lp in top} for top in sample.top]}

    def chat_logprobs(self, sample: Sample) -> dict:
        def entry(token_id, logprob):
            token = self.token(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                            for t, lp, top in zip(sample.token_ids, sample.logprobs, sample.top)]}


class RequestHandler(BaseHTTPRequestHandler):
    teacher: TeacherServer  # set on the subclass TeacherServer.bind makes
    server_version = "kdistill-teacher"

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            return self.reply(200, self.teacher.models())
        self.reply_error(HTTPStatus.NOT_FOUND, f"no route GET {self.path}; try /v1/models")

    def do_POST(self) -> None:
        routes = {"/v1/completions": self.teacher.completions, "/v1/chat/completions": self.teacher.chat}
        route = routes.get(self.path.rstrip("/"))
        if route is None:
            return self.reply_error(HTTPStatus.NOT_FOUND, f"no route POST {self.path}; try {', '.join(routes)}")
        try:
            return self.reply(200, route(self.read_json()))
        except BadRequest as err:
            return self.reply_error(err.status, str(err), err.param)
        except Exception as err:  # a bug, but one request must not take the server down
            log.exception("request failed")
            return self.reply_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(err).__name__}",
                                    kind="server_error")

    def read_json(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:  # read(-1) would wait for the client to close the connection
                raise ValueError(length)
        except ValueError:
            raise BadRequest("the request needs a Content-Length header (a byte count >= 0)") from None
        if length > MAX_BODY_BYTES:
            raise BadRequest(f"the request body is over {MAX_BODY_BYTES >> 20} MB", status=413)
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRequest(f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def reply_error(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        self.reply(int(status), {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def log_message(self, format: str, *args) -> None:
        pass  # the default prints to stderr; log_request below writes our one line

    def log_request(self, code="-", size="-") -> None:
        # method, path and status only: never headers, so never an Authorization key
        log.info("%s %s %s %s", self.client_address[0], self.command, self.path.split("?")[0], code)


def check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unsupported field(s) {', '.join(unknown)}; supported: {', '.join(sorted(allowed))}",
                         unknown[0])


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, *, allow_remote: bool = False,
          model_name: str | None = None, max_tokens_limit: int = 1024, trust_remote_code: bool = False,
          console=None) -> None:
    """Serve until Ctrl-C (the `kdistill serve-teacher` command)."""
    say = console.print if console is not None else print
    teacher = TeacherServer(model_dir, host, port, allow_remote=allow_remote, model_name=model_name,
                            max_tokens_limit=max_tokens_limit, trust_remote_code=trust_remote_code)
    httpd = teacher.bind()
    if not logging.getLogger().handlers and not log.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO)
    say(f"serving {teacher.model_name!r} at {teacher.url} (OpenAI-compatible; Ctrl-C to stop)")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        say("stopped")
    finally:
        httpd.server_close()
