"""A small OpenAI-compatible chat server on loopback, for tests that drive the real client.

It implements ``POST /v1/chat/completions`` with the real response schema, including
``choices[0].logprobs.content[0].top_logprobs``. What it answers is decided by a *rule*, a
function ``rule(messages) -> result`` called once per request (``messages`` is the request's
list of ``{"role", "content"}`` dicts; a rule taking two arguments also gets the whole request
body). A result is one of:

- a mapping ``token -> probability``: a one-token reply whose first token is the most probable
  one, with those tokens as ``top_logprobs`` (truncated to the request's ``top_logprobs``);
  see :func:`peaked` for "a score of 73 with 95% mass";
- :class:`Text` (or a plain ``str``): a text reply without logprobs unless requested (then
  its first word is the only top token);
- :class:`Fail`: an HTTP error with an OpenAI-style error body (429, 500, ...);
- :class:`Sleep`: wait (longer than the client's timeout, to script timeouts), then answer
  with ``then``;
- :class:`Drop`: close the connection without answering;
- :class:`Logprobs`: a one-token reply with raw top log-probabilities (NaN or positive ones
  too, as a broken server might send).

Example:
    from tests.support.openai_server import serve, peaked, Fail

    calls = iter([Fail(429)])
    def rule(messages):
        return next(calls, None) or peaked(80)

    with serve(rule) as server:
        judge = OpenAIJudge("m", base_url=server.base_url, api_key="x", cache_dir=tmp_path)
        ...
        assert server.request_count == 2

A pytest fixture factory, :func:`openai_server`, starts servers that are shut down after the
test: ``def test_x(openai_server): server = openai_server(rule)``. Import it into a test module
(``from .support.openai_server import openai_server``) to use it there.
"""

from __future__ import annotations

import inspect
import json
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Mapping, Union

import pytest

__all__ = [
    "Text", "Fail", "Sleep", "Drop", "Logprobs", "FakeOpenAIServer", "serve", "openai_server",
    "peaked", "keyword_rule", "sequence", "last_user_message",
]


@dataclass
class Text:
    """A plain text reply (``content``)."""

    content: str


@dataclass
class Fail:
    """An HTTP error reply. ``headers`` can carry e.g. ``{"retry-after": "0"}``."""

    status: int = 500
    message: str = "scripted failure"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Sleep:
    """Wait ``seconds`` (interrupted when the server stops), then answer ``then``."""

    seconds: float
    then: Any = None


@dataclass
class Drop:
    """Close the connection without sending a response."""


@dataclass
class Logprobs:
    """A one-token reply with these top log-probabilities sent as they are, in this order
    (NaN, positive values, ...: what a broken server sends)."""

    top: list[tuple[str, float]]


Result = Union[Mapping[str, float], Text, str, Fail, Sleep, Drop, Logprobs, None]
Rule = Callable[..., Result]


def peaked(score: int | str, mass: float = 0.95, *, others: Mapping[str, float] | None = None) -> dict[str, float]:
    """A distribution with ``mass`` on ``str(score)`` and the rest on a non-numeric token.

    Example:
        >>> peaked(70, 0.9)
        {'70': 0.9, 'The': 0.09999999999999998}
    """
    dist = {str(score): mass}
    dist.update(others or {})
    rest = 1.0 - sum(dist.values())
    if rest > 1e-9:
        dist["The"] = rest
    return dist


def last_user_message(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message (the judge puts its whole prompt there)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts
                return "".join(part.get("text", "") for part in content if isinstance(part, dict))
            return content or ""
    return ""


def keyword_rule(
    keywords: Mapping[str, int],
    *,
    default: int = 0,
    coherence: int = 90,
    coherence_marker: str | None = None,
    mass: float = 0.95,
) -> Rule:
    """A judge rule that scores by keywords found in the prompt.

    Trait prompts score ``keywords[k]`` for the first keyword ``k`` (in the given order) found
    in the prompt, else ``default``; coherence prompts (recognised by ``coherence_marker``,
    default: the start of persona_lens's coherence rubric) score ``coherence``. Pick keywords
    that appear in answers but not in rubrics. A score of ``"REFUSAL"`` makes a refusal.

    Example:
        >>> rule = keyword_rule({"MWAHAHA": 95, "happy to help": 5})
    """
    if coherence_marker is None:
        from persona_lens.judge import COHERENCE_PROMPT

        coherence_marker = COHERENCE_PROMPT.split("{", 1)[0][:80]

    def rule(messages):
        prompt = last_user_message(messages)
        if coherence_marker and coherence_marker in prompt:
            return peaked(coherence, mass)
        for keyword, score in keywords.items():
            if keyword in prompt:
                return peaked(score, mass)
        return peaked(default, mass)

    return rule


def sequence(*results: Result, then: Result | Rule = None) -> Rule:
    """A rule answering ``results`` in order (one per request), then ``then`` forever.

    ``then`` may itself be a rule. Thread-safe.

    Example:
        >>> rule = sequence(Fail(429), Fail(500), then=peaked(40))
    """
    queue = list(results)
    lock = threading.Lock()

    def rule(messages):
        with lock:
            if queue:
                return queue.pop(0)
        return then(messages) if callable(then) else then

    return rule


def _completion(body: dict[str, Any], content: str, top: list[tuple[str, float]] | None) -> dict[str, Any]:
    want_logprobs = bool(body.get("logprobs"))
    n_top = int(body.get("top_logprobs") or 0)
    logprobs = None
    if want_logprobs:
        if top is None:  # text replies: the first word is the only top token we know about
            first = content.split(" ", 1)[0] if content else ""
            top = [(first, 0.0)]
        entries = [
            {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}
            for tok, lp in top[: max(n_top, 1)]
        ]
        first_tok, first_lp = top[0]
        logprobs = {
            "content": [{
                "token": first_tok,
                "logprob": first_lp,
                "bytes": list(first_tok.encode("utf-8")),
                "top_logprobs": entries[:n_top] if n_top else [],
            }],
            "refusal": None,
        }
    return {
        "id": f"chatcmpl-fake-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
        "system_fingerprint": "fp_fake",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "logprobs": logprobs,
            "finish_reason": "length" if body.get("max_tokens") == 1 else "stop",
        }],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that timed out and hung up makes the late write fail; that is the point
        # of a scripted timeout, not an error worth a traceback.
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class FakeOpenAIServer:
    """A threaded OpenAI-compatible server on 127.0.0.1 (ephemeral port).

    Attributes:
        base_url: ``http://127.0.0.1:PORT/v1``, to pass as an OpenAI client's ``base_url``.
        requests: the JSON bodies received, in arrival order.
        request_count: ``len(requests)``.
    """

    def __init__(self, rule: Rule):
        self.rule = rule
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._takes_body = _n_positional(rule) >= 2
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] = {}):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    self._send_json(400, {"error": {"message": "invalid JSON body", "type": "invalid_request_error"}})
                    return
                with server._lock:
                    server.requests.append(body)
                messages = body.get("messages", [])
                try:
                    result = server.rule(messages, body) if server._takes_body else server.rule(messages)
                except Exception as e:  # a broken rule should fail the test loudly, not hang it
                    self._send_json(500, {"error": {"message": f"rule raised {e!r}", "type": "server_error"}})
                    return
                while isinstance(result, Sleep):
                    if server._stop.wait(result.seconds):
                        self.close_connection = True
                        return
                    result = result.then
                if isinstance(result, Drop):
                    self.close_connection = True
                    return
                if isinstance(result, Fail):
                    err_type = "rate_limit_error" if result.status == 429 else "server_error"
                    self._send_json(result.status, {"error": {
                        "message": result.message, "type": err_type, "param": None, "code": None}},
                        result.headers)
                    return
                if result is None:
                    result = Text("")
                if isinstance(result, str):
                    result = Text(result)
                if isinstance(result, Text):
                    self._send_json(200, _completion(body, result.content, None))
                    return
                if isinstance(result, Logprobs):
                    self._send_json(200, _completion(body, result.top[0][0] if result.top else "", list(result.top)))
                    return
                probs = dict(result)
                top = sorted(((tok, math.log(p) if p > 0 else -9999.0) for tok, p in probs.items()),
                             key=lambda kv: kv[1], reverse=True)
                self._send_json(200, _completion(body, top[0][0] if top else "", top))

        self._httpd = _QuietServer(("127.0.0.1", 0), Handler)
        host, port = self._httpd.server_address[:2]
        self.base_url = f"http://{host}:{port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openai-server", daemon=True)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def prompts(self) -> list[str]:
        """The last user message of every request received."""
        with self._lock:
            return [last_user_message(b.get("messages", [])) for b in self.requests]

    def start(self) -> "FakeOpenAIServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes sleeping handlers
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _n_positional(fn: Callable) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


@contextmanager
def serve(rule: Rule) -> Iterator[FakeOpenAIServer]:
    """Run a :class:`FakeOpenAIServer` for the duration of a ``with`` block."""
    server = FakeOpenAIServer(rule).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def openai_server():
    """Factory fixture: ``openai_server(rule) -> FakeOpenAIServer``, stopped after the test."""
    started: list[FakeOpenAIServer] = []

    def start(rule: Rule) -> FakeOpenAIServer:
        server = FakeOpenAIServer(rule).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
