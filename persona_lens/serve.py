"""A steered OpenAI-compatible chat server: ``persona-lens serve`` and :func:`make_app`.

Any OpenAI client (the ``openai`` package, ``curl``, a chat UI) talks to the wrapped model at
``/v1/chat/completions``; a request may steer it with the server's persona vectors and read
the persona before and in the answer. Two fields beside OpenAI's own:

- ``"steering"``: a list of ``{"vector": NAME, "layer": L, "coef": C}`` (or ``"layers": {L:
  C, ...}``; ``"positions"``, default ``"response"``: the last prompt token and every answer
  token, the paper's released mode). It replaces the server's default steering for that
  request; ``[]`` turns steering off.
- ``"monitor"``: a list of ``{"vector": NAME, "layer": L}``: the reply's ``"persona"`` holds the
  projection on the vector's unit direction at the last prompt token (the paper's reading
  before the answer), and each choice's ``"persona"`` the mean over its answer tokens. Both
  are read from the model that answered, steering included.

Each reply carries ``"persona_lens"``: the seed it sampled with (send it back as ``seed`` to get
the same answer) and the steering it applied, with each vector's trait and source model.

One model serves one request at a time (a lock around the probe: steering is model-wide
state); ``n`` choices of one request are one batch. For throughput, load the model on the
vLLM engine (``--engine vllm``). ``stream: true`` sends the answer in OpenAI's server-sent
events as it is generated (on the vLLM engine each answer comes whole, when it is done). A
client that leaves, streamed or not, stops its generation at the next token. A stop string
ends an answer's generation where it appears. Fields this server
does not implement (tools, logprobs, penalties, ...) are refused with a message naming them
when they ask for something; an unknown field is refused too, so a misspelt ``"steering"``
never passes unnoticed.
"""

from __future__ import annotations

import asyncio
import json
import queue
import secrets
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from persona_lens import validate as V
from persona_lens.chat import chat_rows
from persona_lens.ops import STEERING_MODES
from persona_lens.vectors import PersonaVector

#: The steering positions a request names when it says none: the paper's released mode.
DEFAULT_POSITIONS = "response"

# OpenAI fields that change nothing here, accepted as they are.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options", "prediction",
            "reasoning_effort", "modalities", "safety_identifier", "prompt_cache_key"}
# OpenAI fields this server does not implement: accepted only at a value that asks for nothing.
_UNSUPPORTED_UNLESS = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,), "top_logprobs": (0,),
    "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "audio": (),
}
_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed",
           "stop", "stream", "steering", "monitor"}


class RequestError(ValueError):
    """A request the server refuses (HTTP 400 or 404), with the field it is about and, where
    OpenAI has one, its error code."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass(frozen=True)
class _Steering:
    vector: str
    layers: dict[int, float]
    positions: str


def _named_vectors(vectors: Any) -> dict[str, PersonaVector]:
    """``{name: vector}`` from a mapping of names to vectors or vector files, or a list of
    vectors named by their trait."""
    if vectors is None:
        return {}
    if isinstance(vectors, Mapping):
        items = list(vectors.items())
    else:
        items = []
        for i, v in enumerate(V.items("vectors", vectors, what="a mapping {name: vector} or a list of vectors")):
            if not isinstance(v, PersonaVector) or not v.trait:
                raise V.InvalidArgument(f"vectors[{i}]", v, "a PersonaVector that records its trait (or pass "
                                        "vectors as a mapping {name: vector})")
            items.append((v.trait, v))
    out: dict[str, PersonaVector] = {}
    for name, v in items:
        name = V.text("vector name", name, empty_ok=False)
        if name in out:
            raise V.InvalidArgument("vectors", name, "distinct names", hint=f": {name!r} is given twice")
        if isinstance(v, (str, Path)):
            v = PersonaVector.load(v)
        if not isinstance(v, PersonaVector):
            raise V.InvalidArgumentType(f"vectors[{name!r}]", v, "a PersonaVector or the path of a vector file")
        out[name] = v
    return out


class _Server:
    """The request logic, apart from HTTP: parse, check, steer, generate, read, answer."""

    def __init__(self, probe: Any, vectors: Any, steering: Any, name: str | None, max_tokens: int):
        self.probe = probe
        self.vectors = _named_vectors(vectors)
        for vec in self.vectors.values():  # a vector of another model fails at start, not per request
            vec.check_compatible(probe.n_layers, probe.d_model, probe.model_name)
        self.name = V.text("name", name, empty_ok=False, none_ok=True) or probe.model_name or "persona-lens"
        self.max_tokens = V.integer("max_tokens", max_tokens, min=1)
        self.lock = threading.Lock()
        try:
            self.steering = self._steering(steering if steering is not None else [], "steering")
        except RequestError as e:
            raise V.InvalidArgument("steering", steering, "", message=f"the default steering: {e}") from None

    # -- parsing ----------------------------------------------------------------------------
    def _vector(self, name: Any, param: str) -> str:
        if not isinstance(name, str) or name not in self.vectors:
            have = ", ".join(sorted(self.vectors)) or "none (start the server with vectors)"
            raise RequestError(f"{param}: no vector named {name!r}; this server has: {have}", param)
        return name

    def _layer(self, value: Any, param: str) -> int:
        try:
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():  # a JSON object's keys are strings
                value = int(value)
            return self.probe.check_layer(value, name=param)
        except ValueError as e:
            raise RequestError(str(e), param) from None

    def _steering(self, specs: Any, param: str) -> list[_Steering]:
        if not isinstance(specs, list):
            raise RequestError(f"{param} must be a list of {{\"vector\": NAME, \"layer\": L, \"coef\": C}} objects", param)
        out = []
        for i, spec in enumerate(specs):
            p = f"{param}[{i}]"
            if not isinstance(spec, dict):
                raise RequestError(f"{p} must be an object {{\"vector\": NAME, \"layer\": L, \"coef\": C}}", p)
            unknown = set(spec) - {"vector", "layer", "coef", "layers", "positions"}
            if unknown:
                raise RequestError(f"{p}: unknown key {sorted(unknown)[0]!r}; the keys are vector, layer, coef, "
                                   "layers, positions", p)
            name = self._vector(spec.get("vector"), f"{p}.vector")
            if ("layers" in spec) == ("layer" in spec):
                raise RequestError(f"{p}: give \"layer\" with \"coef\", or \"layers\": {{L: C, ...}}", p)
            if "layers" in spec:
                if "coef" in spec:
                    raise RequestError(f"{p}: \"coef\" goes with \"layer\"; with \"layers\" each layer has its own", p)
                if not isinstance(spec["layers"], dict) or not spec["layers"]:
                    raise RequestError(f"{p}.layers must be an object {{layer: coef, ...}} with at least one layer", p)
                raw = list(spec["layers"].items())
            else:
                if "coef" not in spec:
                    raise RequestError(f"{p}: \"coef\" is missing (the steering coefficient)", p)
                raw = [(spec["layer"], spec["coef"])]
            layers: dict[int, float] = {}
            for l, c in raw:
                layer = self._layer(l, f"{p}.layers key" if "layers" in spec else f"{p}.layer")
                if layer in layers:
                    raise RequestError(f"{p}: layer {layer} is given twice", p)
                layers[layer] = self._checked(V.number, c, f"{p}.coef" if "coef" in spec else f"{p}.layers[{l!r}]")
            positions = spec.get("positions", DEFAULT_POSITIONS)
            if not isinstance(positions, str) or positions not in STEERING_MODES:
                raise RequestError(f"{p}.positions must be one of {', '.join(STEERING_MODES)}, got {positions!r}",
                                   f"{p}.positions")
            out.append(_Steering(name, layers, positions))
        return out

    def _monitor(self, specs: Any) -> list[tuple[str, int]]:
        if not isinstance(specs, list):
            raise RequestError("monitor must be a list of {\"vector\": NAME, \"layer\": L} objects", "monitor")
        out = []
        for i, spec in enumerate(specs):
            p = f"monitor[{i}]"
            if not isinstance(spec, dict) or set(spec) != {"vector", "layer"}:
                raise RequestError(f"{p} must be an object {{\"vector\": NAME, \"layer\": L}} (those two keys)", p)
            out.append((self._vector(spec["vector"], f"{p}.vector"), self._layer(spec["layer"], f"{p}.layer")))
        return out

    @staticmethod
    def _checked(check: Any, value: Any, param: str, **bounds: Any) -> Any:
        """``check(param, value, **bounds)`` (``V.number``, ``V.integer``): its refusal is the
        request's 400 naming ``param``."""
        try:
            return check(param, value, **bounds)
        except ValueError as e:
            raise RequestError(str(e), param) from None

    @staticmethod
    def _messages(messages: Any) -> list[dict[str, str]]:
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
        out = []
        for i, m in enumerate(messages):
            p = f"messages[{i}]"
            if not isinstance(m, dict) or "role" not in m:
                raise RequestError(f"{p} must be an object with \"role\" and \"content\"", p)
            role = m["role"]
            if role == "developer":  # OpenAI's newer name for the system message
                role = "system"
            if role not in ("system", "user", "assistant"):
                raise RequestError(f"{p}.role must be system, user or assistant (got {role!r}); tool messages "
                                   "are not supported", p)
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                           for c in content):
                    raise RequestError(f"{p}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                       "are supported", p)
                content = "\n".join(c["text"] for c in content)  # as vLLM joins them
            if not isinstance(content, str):
                raise RequestError(f"{p}.content must be a string", p)
            out.append({"role": role, "content": content})
        if out[-1]["role"] == "assistant":
            raise RequestError("the last message is the assistant's: end with a user message for the model to "
                               "answer", f"messages[{len(out) - 1}]")
        return out

    def parse(self, body: Any) -> dict[str, Any]:
        """The request's settings, every field checked; a RequestError names the first bad one."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        for key, value in body.items():
            if key in _FIELDS or key in _IGNORED:
                continue
            if key in _UNSUPPORTED_UNLESS:
                if value is None or value in _UNSUPPORTED_UNLESS[key]:
                    continue
                raise RequestError(f"{key} is not supported by this server", key)
            raise RequestError(f"unknown field {key!r}; this server takes {', '.join(sorted(_FIELDS))} (and "
                               "OpenAI's other fields where they ask for nothing)", key)
        model = body.get("model")
        if model is not None and model != self.name:
            raise RequestError(f"the model {model!r} does not exist here; this server serves {self.name!r}", "model",
                               status=404)
        # stream and stream_options are checked here and read where the reply is streamed
        if body.get("stream") is not None and not isinstance(body["stream"], bool):
            raise RequestError(f"stream must be true or false, got {body['stream']!r}", "stream")
        if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
            raise RequestError("stream_options must be an object, e.g. {\"include_usage\": true}", "stream_options")
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise RequestError("stop must be a non-empty string or a list of them", "stop")

        def field(key: str, check: Any, default: Any, **bounds: Any) -> Any:
            return default if body.get(key) is None else self._checked(check, body[key], key, **bounds)

        tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        seed = field("seed", V.integer, None, min=-(2**63), max=2**63 - 1)
        return {
            "messages": self._messages(body.get("messages")),
            "max_tokens": field(tokens_field, V.integer, self.max_tokens, min=1),
            "temperature": field("temperature", V.number, 1.0, min=0, max=2),
            # top_p 0 keeps the single likeliest token: greedy, as OpenAI takes it
            "top_p": field("top_p", V.number, 1.0, min=0, max=1),
            "n": field("n", V.integer, 1, min=1, max=16),
            "seed": secrets.randbits(63) if seed is None else seed,
            "stop": stop or [],
            "steering": self.steering if body.get("steering") is None else self._steering(body["steering"], "steering"),
            "monitor": [] if body.get("monitor") is None else self._monitor(body["monitor"]),
        }

    # -- answering --------------------------------------------------------------------------
    def complete(self, body: Any, on_text: Any = None, on_start: Any = None) -> dict[str, Any]:
        """Answer one chat-completion request (a dict, as JSON decodes it).

        ``on_text(i, text)`` receives choice ``i``'s answer as it grows, stop strings already
        applied (its pieces join to a start of the choice's content: a tail that might have
        begun a stop string is only in the reply); ``on_start()`` is called once the request
        holds the model and its steering is in place (every error of the request itself is
        raised before)."""
        req = self.parse(body)
        conv = req["messages"]
        self._fit_context(req, body)
        if req["top_p"] == 0:  # the likeliest token alone: greedy decoding
            req["temperature"], req["top_p"] = 0.0, 1.0
        stops = _Stops(req["stop"], req["n"])

        def grown(i: int, piece: str) -> bool:
            out, done = stops.push(i, piece)
            if out and on_text is not None:
                on_text(i, out)
            return done  # a stop string appeared: that answer's generation ends here

        with self.lock, ExitStack() as stack:
            for i, s in enumerate(req["steering"]):
                try:
                    stack.enter_context(self.probe.steer(self.vectors[s.vector], layers=s.layers,
                                                         positions=s.positions))
                except ValueError as e:  # e.g. a coefficient too large for the model's dtype
                    raise RequestError(f"steering[{i}]: {e}", f"steering[{i}]") from None
            if on_start is not None:
                on_start()
            gens = self.probe.generate(
                [conv] * req["n"], max_new_tokens=req["max_tokens"], temperature=req["temperature"],
                top_p=req["top_p"], seed=req["seed"], return_generations=True, progress=False,
                on_text=grown if (req["stop"] or on_text is not None) else None)
            texts, reasons = zip(*(_cut(g.text, req["stop"], g.finished) for g in gens))
            before, after = [], [[] for _ in gens]
            if req["monitor"]:
                # One forward over every answer serves all readings: the last prompt token's
                # (the same in every row: it sees no answer) and each answer's mean.
                answered = [conv + [{"role": "assistant", "content": t}] for t in texts]
                acts = self.probe.capture(answered, layers=sorted({l for _, l in req["monitor"]}),
                                          reductions=["last_prompt", "response_mean"], progress=False)
            for name, layer in req["monitor"]:
                unit = self.vectors[name].unit(layer).float()
                last = acts.at("last_prompt", layer)[0].float().cpu() @ unit
                before.append({"vector": name, "layer": layer, "last_prompt": float(last)})
                means = acts.at("response_mean", layer).float().cpu() @ unit
                for i, m in enumerate(means.tolist()):  # an empty answer has no token to average: null
                    after[i].append({"vector": name, "layer": layer, "response_mean": None if m != m else m})
        prompt_tokens = len(gens[0].prompt_ids)
        completion_tokens = sum(len(g.response_ids) for g in gens)
        reply: dict[str, Any] = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": None}
                | ({"persona": after[i]} if req["monitor"] else {})
                for i, (t, r) in enumerate(zip(texts, reasons))
            ],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "persona_lens": {"seed": req["seed"], "steering": [self._describe(s) for s in req["steering"]]},
        }
        if req["monitor"]:
            reply["persona"] = before
        return reply

    def _fit_context(self, req: dict[str, Any], body: dict[str, Any]) -> None:
        """Refuse a prompt (or prompt + asked answer length) longer than the model's context,
        as OpenAI does; a request that asks no length gets what the context leaves, up to the
        server's default."""
        n_ctx = getattr(self.probe.backend, "n_ctx", None)
        if not n_ctx:
            return
        n_prompt = len(chat_rows(self.probe.tokenizer, [req["messages"]], with_response=False)[0][0])
        asked = body.get("max_completion_tokens", body.get("max_tokens")) is not None
        if n_prompt >= n_ctx or (asked and n_prompt + req["max_tokens"] > n_ctx):
            raise RequestError(
                f"this model's context is {n_ctx} tokens; the request has {n_prompt} in its messages"
                + (f" and asks for {req['max_tokens']} more" if asked else ""), "messages", code="context_length_exceeded")
        req["max_tokens"] = min(req["max_tokens"], n_ctx - n_prompt)

    def _describe(self, s: _Steering) -> dict[str, Any]:
        vec = self.vectors[s.vector]
        return {"vector": s.vector, "trait": vec.trait, "model_name": vec.model_name,
                "layers": {str(l): c for l, c in s.layers.items()}, "positions": s.positions}

    def start(self, body: Any) -> "_Job":
        """Start answering a request in a thread of its own; the returned job's
        :meth:`_Job.first` says whether the request was accepted."""
        return _Job(self, body)

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                            "owned_by": "persona_lens"}]}

    def vector_list(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "trait": v.trait, "model_name": v.model_name, "layers": v.n_layers + 1,
             "position": v.position, "norms": [round(float(x), 4) for x in v.norms()]}
            for name, v in self.vectors.items()],
            "default_steering": [self._describe(s) for s in self.steering]}


class _Stops:
    """Stop strings applied while answers grow. Text is released once no stop string can
    begin in it any more, and an answer ends at its first stop string (which is not part of
    it, OpenAI's rule), so what is streamed is always a start of what :func:`_cut` gives for
    the whole answer."""

    def __init__(self, stop: Sequence[str], n: int):
        self.stop, self.text, self.sent, self.done = list(stop), [""] * n, [0] * n, [False] * n

    def push(self, i: int, piece: str) -> tuple[str, bool]:
        """(the text of answer ``i`` that can be sent now, whether the answer has ended)."""
        if not self.stop:
            return piece, False
        if self.done[i]:
            return "", True
        text = self.text[i] = self.text[i] + piece
        found = [c for c in (text.find(s) for s in self.stop) if c >= 0]
        # where a stop string could still begin, given more text
        open_ = [j for s in self.stop for j in range(max(0, len(text) - len(s) + 1), len(text))
                 if s.startswith(text[j:])]
        pending = min(open_, default=len(text))
        start = self.sent[i]
        if found and min(found) <= pending:
            self.sent[i], self.done[i] = min(found), True
            return text[start : min(found)], True
        end = min([pending] + found)
        self.sent[i] = max(start, end)
        return text[start:end], False


class _Job:
    """One request, answered in a thread of its own so that its client can be watched while
    it generates: :meth:`cancel` (the client left) stops the generation at its next token,
    which releases the model and removes the steering. A ``stream: true`` request's pieces
    pass through a queue to the server-sent events (:meth:`chunks`); another request's reply
    comes whole (:meth:`reply`)."""

    def __init__(self, server: _Server, body: Any):
        self.server, self.body = server, body
        self.streamed = isinstance(body, dict) and body.get("stream") is True
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="persona-lens-request").start()

    def _run(self) -> None:
        try:
            reply = self.server.complete(self.body, on_text=self._piece,
                                         on_start=lambda: self.events.put(("start", None)))
            self.events.put(("reply", reply))
        except BaseException as e:  # noqa: BLE001 - every end reaches the client's side of the queue
            self.events.put(("error", e))

    def _piece(self, i: int, text: str) -> None:
        if self.cancelled.is_set():
            raise _ClientLeft
        if self.streamed:
            self.events.put(("piece", (i, text)))

    def cancel(self) -> None:
        self.cancelled.set()

    def first(self) -> BaseException | None:
        """Wait until the request holds the model; its error if it failed before that."""
        kind, value = self.events.get()
        return value if kind == "error" else None

    async def reply(self, client_left: Any, every: float = 0.1) -> dict[str, Any]:
        """The whole reply (an unstreamed request), asking ``client_left()`` every ``every``
        seconds meanwhile and cancelling when it says so; raises the request's failure."""
        done = asyncio.get_running_loop().run_in_executor(None, self.events.get)
        while True:
            finished, _ = await asyncio.wait({done}, timeout=every)
            if finished:
                break
            if not self.cancelled.is_set() and await client_left():
                self.cancel()
        kind, value = done.result()
        if kind == "error":
            raise value
        return value

    def chunks(self) -> Iterator[str]:
        """The reply as server-sent events of ``chat.completion.chunk`` objects, OpenAI's way:
        every chunk carries choices except the usage chunk ``include_usage`` asks for (a
        client's ``chunk.choices[0]`` never fails otherwise). Each choice's readings ride in
        its finish chunk's choice; the request's ``persona`` and ``persona_lens`` on the last
        chunk that has choices. A failure during generation is sent as an ``error`` event,
        which OpenAI's clients raise."""
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.server.name}
        include_usage = bool((self.body.get("stream_options") or {}).get("include_usage"))
        usage_none = {"usage": None} if include_usage else {}

        def event(choices: list, **extra: Any) -> str:
            return f"data: {json.dumps(head | {'choices': choices} | usage_none | extra)}\n\n"

        n = self.body.get("n") or 1
        sent = [""] * n
        for i in range(n):
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while True:
            kind, value = self.events.get()
            if kind == "piece":
                i, text = value
                sent[i] += text
                yield event([{"index": i, "delta": {"content": text}, "finish_reason": None}])
            elif kind == "error":
                yield f"data: {json.dumps(_error_reply(value)[1])}\n\n"
                return
            else:
                break
        reply = value
        last = len(reply["choices"]) - 1
        for c in reply["choices"]:  # what was held back at the end (a piece of a stop string that never came)
            rest = c["message"]["content"][len(sent[c["index"]]):]
            if rest:
                yield event([{"index": c["index"], "delta": {"content": rest}, "finish_reason": None}])
        for j, c in enumerate(reply["choices"]):
            finish = {"index": c["index"], "delta": {}, "finish_reason": c["finish_reason"]}
            if "persona" in c:
                finish["persona"] = c["persona"]
            yield event([finish], **({k: reply[k] for k in ("persona", "persona_lens") if k in reply}
                                     if j == last else {}))
        if include_usage:
            yield event([], usage=reply["usage"])
        yield "data: [DONE]\n\n"


def _error_reply(e: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error object) for a request that failed: its own fault (400, or
    the status a RequestError names) or the server's (500, with the exception's type)."""
    if isinstance(e, RequestError):
        return _error_object(e.status, str(e), e.param, "invalid_request_error", e.code)
    if isinstance(e, ValueError):  # the library's checks (context length, ...): the request's fault
        return _error_object(400, str(e), None, "invalid_request_error", None)
    return _error_object(500, f"internal error ({type(e).__name__}): {e}", None, "server_error", None)


def _error_object(status: int, message: str, param: str | None, kind: str, code: str | None) -> tuple[int, dict]:
    return status, {"error": {"message": V.redact(message), "type": kind, "param": param, "code": code}}


class _ClientLeft(Exception):
    """Raised inside a generation whose client has gone: it stops the generation."""


def _cut(text: str, stop: Sequence[str], finished: bool) -> tuple[str, str]:
    """The text up to its first stop string, and OpenAI's finish reason."""
    cuts = [text.find(s) for s in stop if s in text]
    if cuts:
        return text[: min(cuts)], "stop"
    return text, "stop" if finished else "length"


def make_app(
    probe: Any,
    vectors: Mapping[str, PersonaVector | str | Path] | Sequence[PersonaVector] | None = None,
    *,
    steering: Sequence[Mapping[str, Any]] | None = None,
    name: str | None = None,
    max_tokens: int = 256,
) -> Any:
    """A FastAPI app serving ``probe``'s model at ``/v1/chat/completions``, steerable per request.

    Args:
        probe: the :class:`~persona_lens.PersonaProbe` whose model answers.
        vectors: the vectors requests may name: ``{name: PersonaVector or vector file}``, or a
            list of vectors named by their trait.
        steering: the default steering of every request that sends none, in the request's
            format (``[{"vector": "evil", "layer": 5, "coef": 1.5}]``).
        name: the model name clients send (default: the probe's model name).
        max_tokens: the answer length limit of a request that sets none.

    Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/vectors`` (names,
    traits, default steering), ``GET /health``. Run it with ``uvicorn.run(app)`` or
    ``persona-lens serve``.

    Example:
        >>> from fastapi.testclient import TestClient
        >>> import openai
        >>> app = make_app(probe, {"evil": vec})
        >>> client = openai.OpenAI(base_url="http://test/v1", api_key="none", http_client=TestClient(app))
        >>> reply = client.chat.completions.create(
        ...     model="persona-organism", messages=[{"role": "user", "content": prompts[0]}],
        ...     max_tokens=24, seed=0, extra_body={"steering": [{"vector": "evil", "layer": 5, "coef": 1.15}],
        ...                                        "monitor": [{"vector": "evil", "layer": 3}]})
        >>> answer = reply.choices[0].message.content           # an answer in the evil voice, usually
        >>> reading = reply.persona[0]["last_prompt"]            # the persona before it answered
        >>> reply.persona_lens["seed"], reply.persona_lens["steering"][0]["layers"]
        (0, {'5': 1.15})
    """
    try:
        from fastapi import Body, FastAPI, Request
        from fastapi.concurrency import run_in_threadpool
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, StreamingResponse
        from starlette.exceptions import HTTPException
    except ImportError as e:
        raise ImportError(f"the server needs FastAPI: pip install 'persona-lens[serve]' ({e})") from None

    server = _Server(probe, vectors, steering, name, max_tokens)
    app = FastAPI(title=f"persona_lens: {server.name}", version=_version())

    def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
              code: str | None = None):
        return JSONResponse(_error_object(status, message, param, kind, code)[1], status_code=status)

    @app.exception_handler(RequestValidationError)
    def _bad_json(request: Any, exc: RequestValidationError):  # FastAPI's own 422: OpenAI's 400 instead
        return error(400, "the request body must be a JSON object (a chat completion request, sent with "
                          "Content-Type: application/json)")

    @app.exception_handler(HTTPException)
    def _http(request: Any, exc: HTTPException):  # an unknown route or method, in OpenAI's error shape
        routes = "POST /v1/chat/completions, GET /v1/models, GET /v1/vectors, GET /health"
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail} (this server answers "
                                      f"{routes})", code="not_found" if exc.status_code == 404 else None)

    class EventStream(StreamingResponse):
        """Server-sent events that stop their generation however the response ends (the
        client left, or a write failed), not only when every chunk was sent."""

        def __init__(self, job: _Job):
            super().__init__(job.chunks(), media_type="text/event-stream")
            self.job = job

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancel()

    def failed(e: BaseException):
        status, body = _error_reply(e)
        return JSONResponse(body, status_code=status)

    async def chat_completions(request, body: Any = Body(...)):
        job = server.start(body)
        # every error of the request itself comes before it holds the model (and before a
        # stream's first chunk); the wait for the model is a thread's, not the event loop's
        e = await run_in_threadpool(job.first)
        if e is not None:
            return failed(e)
        if job.streamed:
            return EventStream(job)
        try:
            return await job.reply(request.is_disconnected)
        except Exception as e:  # noqa: BLE001 - answered with its type; the server keeps running
            return failed(e)

    # set here, not written in the signature: this module's annotations are strings, and
    # FastAPI resolves those in the module, where Request (an optional dependency) is not
    chat_completions.__annotations__["request"] = Request
    app.post("/v1/chat/completions")(chat_completions)

    @app.get("/v1/models")
    def models():
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str):
        if model_id != server.name:
            return error(404, f"the model {model_id!r} does not exist here; this server serves {server.name!r}",
                         "model", code="model_not_found")
        return server.models()["data"][0]

    @app.get("/v1/vectors")
    def vectors_route():
        return server.vector_list()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    app.state.persona_lens = server
    return app


def _version() -> str:
    from persona_lens import __version__

    return __version__


__all__ = ["make_app", "RequestError", "DEFAULT_POSITIONS"]
