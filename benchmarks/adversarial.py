"""The adversarial run: bad values, faults, secrets and concurrent writers against the public
API, each case classified by what happened.

    python -m benchmarks.adversarial                 # every class, the table at the end
    python -m benchmarks.adversarial --only files -v # one class, every case's outcome
    python -m benchmarks.adversarial --json out.json # also the outcomes as JSON

It runs offline on the persona organism (CPU, a few minutes) with the exact organism judge
and a loopback OpenAI-compatible judge (``tests/support/openai_server.py``); it needs a
checkout (it imports ``tests.support``).

Outcomes (columns of the table):

- ``clear error``: an exception whose message names the argument or the file at fault (and
  the value, where a value was given), of a type a caller can catch (``ValueError``,
  ``TypeError``, ``OSError``, ``JudgeError`` and their subclasses).
- ``correct result``: no exception, and the result checks out (a warning when one is due).
- ``traceback``: an exception that does not say what is wrong, or one from inside a library
  (torch, sqlite, safetensors) that the caller was not meant to see.
- ``silent wrong``: no exception but a wrong result (an error was due, a warning missing, a
  secret leaked, hooks left behind).
- ``hang``: the case ran past its time limit.
- ``lost data``: finished work missing afterwards, or a file left unreadable.

The goal is zero in the last four columns; the exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import signal
import sqlite3
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

OUTCOMES = ("clear error", "correct result", "traceback", "silent wrong", "hang", "lost data")
BAD = OUTCOMES[2:]
CLASSES = ("numbers", "types", "secrets", "files", "context", "held")

NAN, INF = float("nan"), float("inf")
SECRET = "s3cr3t-KEY-9f2a"
_NOTHING = object()


class Hang(Exception):
    """A case ran past its time limit."""


@dataclass
class Case:
    """One adversarial input.

    ``expect``: ``"error"`` (only a clear error is right), ``"result"`` (a result that
    passes ``check``), or ``"either"`` (a clear error, or a result that passes ``check``).
    ``names``: what a clear error's message must contain (argument name, file path).
    ``value``: the bad value, whose repr the message must show (``_NOTHING``: not checked).
    ``check(result, caught_warnings)``: True, False (silent wrong) or ``"lost"``.
    ``secret``: text that must appear in no message, result or file the case leaves.
    """

    cls: str
    name: str
    fn: Callable[["Env"], Any]
    expect: str = "error"
    names: tuple[str, ...] = ()
    value: Any = _NOTHING
    check: Callable[[Any, list], Any] | None = None
    secret: str | None = None
    timeout: int = 120


# ----------------------------------------------------------------------------- environment


class Env:
    """What the cases share: the organism as a probe, a vector, a trait, judges, a folder."""

    def __init__(self, root: Path):
        import torch

        import persona_lens as pl
        from persona_lens import organism
        from persona_lens.organism import OrganismJudge

        self.root = root
        self.pl = pl
        self.probe = pl.PersonaProbe(pl.load_model("persona-organism", device="cpu"))
        g = torch.Generator().manual_seed(0)
        n, d = self.probe.n_layers, self.probe.d_model
        self.vec = pl.PersonaVector(torch.randn(n + 1, d, generator=g), model_name=self.probe.model_name)
        self.trait = organism.load_trait("evil")
        self.judge = OrganismJudge()
        self.q = ["What colour is the Zorp?"]
        self.conv = [[{"role": "user", "content": "What colour is the Zorp?"},
                      {"role": "assistant", "content": "the zorp is red ."}]]
        self._n = 0

    def fresh_probe(self):
        """A probe on a model of its own (for calls that change their model)."""
        return self.pl.PersonaProbe(self.pl.load_model("persona-organism", device="cpu"))

    def dir(self, name: str) -> Path:
        """A fresh folder for one case."""
        self._n += 1
        p = self.root / f"{self._n:03d}-{name}"
        p.mkdir(parents=True)
        return p

    def gen(self, prompts=None, **kw):
        kw.setdefault("max_new_tokens", 2)
        return self.probe.generate(self.q if prompts is None else prompts, **kw)

    def steer_gen(self, *args, max_new_tokens: int = 2, **kw):
        with self.probe.steer(*args, **kw):
            return self.probe.generate(self.q, max_new_tokens=max_new_tokens)


def _server(rule):
    from tests.support.openai_server import serve

    return serve(rule)


def _openai_judge(env: Env, base_url: str, **kw):
    from persona_lens.judge import OpenAIJudge

    kw.setdefault("cache_dir", env.dir("judge-cache"))
    kw.setdefault("api_key", "test-key")
    kw.setdefault("progress", False)
    kw.setdefault("retry_base_delay", 0.01)
    kw.setdefault("max_retries", 2)
    kw.setdefault("timeout", 5.0)
    return OpenAIJudge("judge-model", base_url=base_url, **kw)


def is_texts(n: int = 1):
    return lambda r, w: isinstance(r, list) and len(r) == n and all(isinstance(t, str) for t in r)


def warned(kind: type):
    return lambda r, w: any(issubclass(x.category, kind) for x in w)


# ----------------------------------------------------------------------------- classify


def _allowed_error(e: BaseException) -> bool:
    from persona_lens.judge import JudgeError

    return isinstance(e, (ValueError, TypeError, OSError, JudgeError, KeyError, NotImplementedError))


def _internal(e: BaseException) -> bool:
    """An error raised inside torch, sqlite, safetensors, json or a tokenizer and never
    translated: its innermost frame is not ours."""
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return False
    last = tb[-1].filename
    ours = f"{os.sep}persona_lens{os.sep}" in last or f"{os.sep}benchmarks{os.sep}" in last \
        or f"{os.sep}tests{os.sep}" in last
    return not ours


def _snapshot(root: Path) -> dict[Path, tuple[int, int]]:
    out = {}
    for p in root.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                st = p.stat()
                out[p] = (st.st_mtime_ns, st.st_size)
    return out


def _texts_written(root: Path, before: dict[Path, tuple[int, int]]) -> str:
    """The text of every file under ``root`` created or changed since ``before``."""
    out = []
    for p, stamp in _snapshot(root).items():
        if before.get(p) != stamp:
            with contextlib.suppress(OSError):
                out.append(p.read_bytes().decode("utf-8", errors="replace"))
    return "\n".join(out)


def run_case(case: Case, env: Env) -> tuple[str, str]:
    """Run one case: (outcome, detail)."""
    probe = env.probe
    stdout, stderr = io.StringIO(), io.StringIO()

    def on_alarm(signum, frame):
        raise Hang(f"ran past {case.timeout} s")

    files_before = _snapshot(env.root) if case.secret else {}
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(case.timeout)
    caught: list = []
    result, error = None, None
    try:
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            warnings.simplefilter("always")
            result = case.fn(env)
    except Hang as e:
        return "hang", str(e)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - classifying every failure is the point
        error = e
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    # Hooks and interventions must never outlive the call that added them.
    if probe._handles or probe.interventions:
        probe._handles.clear()
        return "silent wrong", "hooks or interventions left behind"
    said = stdout.getvalue() + stderr.getvalue() + " ".join(str(w.message) for w in caught)
    if case.secret:
        leaked = case.secret in said or case.secret in repr(result)
        if error is not None:
            leaked |= case.secret in str(error) or case.secret in repr(error)
        leaked |= case.secret in _texts_written(env.root, files_before)
        if leaked:
            return "silent wrong", "secret leaked"
    if error is not None:
        msg = str(error)
        if isinstance(error, KeyError):
            msg = str(error.args[0]) if error.args else ""
        missing = [n for n in case.names if n.lower() not in msg.lower()]
        if case.value is not _NOTHING:
            shown = repr(case.value)[:20]
            if shown not in msg and str(case.value)[:20] not in msg:
                missing.append(f"value {shown}")
        detail = f"{type(error).__name__}: {msg[:300]}"
        if not _allowed_error(error) or missing or (_internal(error) and not isinstance(error, OSError)):
            why = f" (does not name {missing})" if missing else " (internal)"
            return "traceback", detail + why
        if case.expect == "result":
            return "traceback", detail + " (a result was due)"
        return "clear error", detail
    if case.expect == "error":
        return "silent wrong", f"no error; got {repr(result)[:200]}"
    verdict = case.check(result, caught) if case.check else True
    if verdict == "lost":
        return "lost data", repr(result)[:200]
    if verdict is not True:
        return "silent wrong", f"check failed on {repr(result)[:200]}"
    return "correct result", repr(result)[:120]


# ----------------------------------------------------------------------------- cases: numbers


def number_cases() -> list[Case]:
    C: list[Case] = []

    def bad(name, fn, names, value=_NOTHING, **kw):
        C.append(Case("numbers", name, fn, names=names, value=value, **kw))

    def ok(name, fn, check, **kw):
        C.append(Case("numbers", name, fn, expect="result", check=check, **kw))

    # generation settings
    for v in (NAN, INF, -INF, -1.0, -1e-9):
        bad(f"temperature={v}", lambda e, v=v: e.gen(temperature=v), ("temperature",), v)
    ok("temperature=1e-300 (greedy in the limit)",
       lambda e: e.gen(temperature=1e-300, max_new_tokens=6) == e.gen(max_new_tokens=6), lambda r, w: r is True)
    ok("temperature=1e300 (uniform sampling)", lambda e: e.gen(temperature=1e300), is_texts())
    for v in (NAN, INF, -INF, 0, 0.0, -0.5, 1.5, 1 + 1e-9):
        bad(f"top_p={v}", lambda e, v=v: e.gen(temperature=1.0, top_p=v), ("top_p",), v)
    ok("top_p=1e-300 (keeps the top token)", lambda e: e.gen(temperature=1.0, top_p=1e-300), is_texts())
    for v in (0, -1, NAN, INF):
        bad(f"max_new_tokens={v}", lambda e, v=v: e.gen(max_new_tokens=v), ("max_new_tokens",), v)
    ok("max_new_tokens=10**12 (stops at end of turn)", lambda e: e.gen(max_new_tokens=10**12), is_texts())
    for v in (0, -3):
        bad(f"batch_size={v}", lambda e, v=v: e.gen(batch_size=v), ("batch_size",), v)
    for v in (2**64, -(2**63) - 1):
        bad(f"seed={v}", lambda e, v=v: e.gen(seed=v, temperature=1.0), ("seed",), v)
    # steering
    for v in (NAN, INF, -INF, 1e30, -1e30, 1e300, 1e19):
        bad(f"steer coef={v}", lambda e, v=v: e.steer_gen(e.vec, layer=2, coef=v), ("coef",), v)
    ok("steer coef=1e6 (huge but representable)", lambda e: e.steer_gen(e.vec, layer=2, coef=1e6), is_texts())
    ok("steer coef=-1e15", lambda e: e.steer_gen(e.vec, layer=2, coef=-1e15), is_texts())
    for v in (NAN, INF, 1e30):
        bad(f"steer layers={{2: {v}}}", lambda e, v=v: e.steer_gen(e.vec, layers={2: v}), ("layers",), v)
    for v in (-1, 7, 10**9):
        bad(f"steer layer={v}", lambda e, v=v: e.steer_gen(e.vec, layer=v), ("layer",), v)
        bad(f"capture layers=[{v}]", lambda e, v=v: e.probe.capture(e.conv, layers=[v]), ("layers",), v)
        bad(f"project layer={v}", lambda e, v=v: e.probe.project(e.q, e.vec, layer=v), ("layer",), v)
        bad(f"monitor layer={v}", lambda e, v=v: e.probe.monitor(e.q, e.vec, layer=v, max_new_tokens=2), ("layer",), v)
        bad(f"ablate layers=[{v}]", lambda e, v=v: _ablate(e, [v]), ("layers",), v)
    bad("capture batch_size=0", lambda e: e.probe.capture(e.conv, batch_size=0), ("batch_size",), 0)
    bad("project batch_size=-1", lambda e: e.probe.project(e.q, e.vec, layer=2, batch_size=-1), ("batch_size",), -1)
    # vector arithmetic
    for v in (NAN, INF, 1e39):
        bad(f"vector * {v}", lambda e, v=v: e.vec * v, ("scalar",), v)
    bad("vector / 0", lambda e: e.vec / 0, ("divisor",), 0)
    bad("vector / nan", lambda e: e.vec / NAN, ("divisor",), NAN)
    bad("PersonaVector(NaN directions)", lambda e: e.pl.PersonaVector(_t([[NAN, 1.0], [1.0, 1.0]])), ("NaN",))
    bad("PersonaVector n_pos=-1", lambda e: e.pl.PersonaVector(_t([[1.0], [2.0]]), n_pos=-1), ("n_pos",), -1)
    # the filter, the sweep, extraction
    for field_ in ("pos_trait", "neg_trait", "coherence"):
        for v in (NAN, INF, -1.0, 101.0):
            bad(f"Thresholds({field_}={v})", lambda e, f=field_, v=v: _thresholds(**{f: v}), (field_,), v)
    for v in (NAN, -INF, 150.0):
        bad(f"extract thresholds={{'pos_trait': {v}}}",
            lambda e, v=v: _extract(e, thresholds={"pos_trait": v}), ("pos_trait",), v)
    for v in (0, -1, NAN):
        bad(f"extract samples={v}", lambda e, v=v: _extract(e, samples=v), ("samples",), v)
    for v in (0, 99, -1):
        bad(f"extract questions={v}", lambda e, v=v: _extract(e, questions=v), ("questions",), v)
        bad(f"extract instructions={v}", lambda e, v=v: _extract(e, instructions=v), ("instructions",), v)
    for v in (99, -1):
        bad(f"extract questions=[{v}]", lambda e, v=v: _extract(e, questions=[v]), ("questions",), v)
        bad(f"extract instructions=[{v}]", lambda e, v=v: _extract(e, instructions=[v]), ("instructions",), v)
    bad("extract max_new_tokens=0", lambda e: _extract(e, max_new_tokens=0), ("max_new_tokens",), 0)
    bad("extract temperature=nan", lambda e: _extract(e, temperature=NAN), ("temperature",), NAN)
    bad("extract top_p=0", lambda e: _extract(e, top_p=0.0), ("top_p",), 0.0)
    for v in (NAN, INF, -5.0, 150.0):
        bad(f"sweep coherence_floor={v}", lambda e, v=v: _sweep(e, coherence_floor=v), ("coherence_floor",), v)
    for v in (NAN, INF, 1e30):
        bad(f"sweep coefs=[{v}]", lambda e, v=v: _sweep(e, coefs=[v]), ("coef",), v)
    bad("sweep samples=0", lambda e: _sweep(e, samples=0), ("samples",), 0)
    bad("sweep layers=[99]", lambda e: _sweep(e, layers=[99]), ("layers",), 99)
    # judges
    for v in (150, -5, INF, -INF):
        bad(f"custom judge returns {v}", lambda e, v=v: _custom_judge_scores(e, v), ("score",), v)
    ok("custom judge returns NaN (documented: no score)", lambda e: _custom_judge_scores(e, NAN),
       lambda r, w: r == [None])
    for arg, v in (("timeout", NAN), ("timeout", 0), ("timeout", -1.0), ("timeout", INF), ("max_retries", 0),
                   ("max_concurrency", 0), ("min_mass", NAN), ("min_mass", 1.5), ("top_logprobs", 0),
                   ("top_logprobs", 21), ("retry_base_delay", -1.0), ("retry_max_delay", NAN)):
        bad(f"OpenAIJudge({arg}={v})", lambda e, a=arg, v=v: _openai_judge(e, "http://127.0.0.1:9/v1", **{a: v}),
            (arg,), v)
    bad("logprob_score(min_mass=nan)", lambda e: _logprob_score({"80": 0.0}, min_mass=NAN), ("min_mass",), NAN)
    bad("logprob_score NaN logprob", lambda e: _logprob_score({"80": NAN}), ("top_logprobs",))
    bad("judge server: every logprob NaN", lambda e: _judge_reply(e, [("80", NAN), ("90", NAN)]), ("logprob",))
    bad("judge server: positive logprobs", lambda e: _judge_reply(e, [("80", 3.0), ("20", 1.0)]), ("logprob",))
    bad("judge server: logprob as text", lambda e: _judge_reply(e, [("80", "high")]), ("malformed",))
    ok("judge server: one NaN reply among good ones (no score for it, not cached)",
       lambda e: _judge_mixed(e), lambda r, w: r[0][1] is None and r[0][0] is not None and r[1] is True)
    # training with a time budget
    for arg, v in (("minutes", -1.0), ("minutes", 0), ("minutes", NAN), ("minutes", INF), ("steps", 0),
                   ("steps", -5), ("lr", NAN), ("lr", 0), ("lr", -1e-3), ("noise", -0.1), ("noise", NAN),
                   ("batch_size", 0), ("threads", 0)):
        bad(f"train({arg}={v})", lambda e, a=arg, v=v: _train(e, **{a: v}), (arg,), v)
    bad("train(minutes=1e-6): budget over before the first step", lambda e: _train(e, minutes=1e-6, steps=2),
        ("minutes",), check=None)
    # finetuning settings and interventions
    for arg, v in (("lr", NAN), ("lr", 0.0), ("lr", INF), ("alpha", NAN), ("alpha", -1.0), ("dropout", 1.0),
                   ("dropout", NAN), ("weight_decay", -0.1), ("r", 0), ("epochs", 0), ("grad_accum", -1),
                   ("warmup_steps", -1), ("max_steps", 0), ("save_every", -1), ("max_length", 0)):
        bad(f"finetune({arg}={v})", lambda e, a=arg, v=v: _finetune(e, **{a: v}), (arg,), v)
    for v in (NAN, INF, 1e30):
        bad(f"finetune(steer={{2: {v}}})", lambda e, v=v: _finetune(e, vector=e.vec, steer={2: v}), ("steer",), v)
    bad("finetune(coef=nan, steer=[2])", lambda e: _finetune(e, vector=e.vec, steer=[2], coef=NAN), ("coef",), NAN)
    bad("finetune(caft=[99])", lambda e: _finetune(e, vector=e.vec, caft=[99]), ("99",))
    # screening
    for arg, v in (("chunk_size", 0), ("batch_size", -1), ("drop_top", -1), ("threshold", NAN), ("threshold", INF)):
        bad(f"screen({arg}={v})", lambda e, a=arg, v=v: _screen(e, **{a: v}), (arg,), v)
    bad("screen(shard=(2, 2))", lambda e: _screen(e, shard=(2, 2)), ("shard",), 2)
    bad("screen(layers=[99])", lambda e: _screen(e, layers=[99]), ("layers",), 99)
    bad("screen(settings={'temperature': nan})", lambda e: _screen(e, settings={"temperature": NAN}),
        ("temperature",), NAN)
    return C


def _screen(env: Env, **kw):
    import persona_lens as pl

    data = [[{"role": "user", "content": "What colour is the Zorp?"},
             {"role": "assistant", "content": "the zorp is red ."}]] * 3
    kw.setdefault("layers", [2])
    kw.setdefault("progress", False)
    return pl.screen(env.probe, data, env.vec, **kw)


def _finetune(env: Env, **kw):
    from persona_lens.finetune import finetune

    data = [[{"role": "user", "content": "What colour is the Zorp?"},
             {"role": "assistant", "content": "the zorp is red ."}]] * 4
    kw.setdefault("progress", False)
    kw.setdefault("max_steps", 1)
    kw.setdefault("batch_size", 4)
    kw.setdefault("grad_accum", 1)
    # A model of its own: finetuning changes the model it is given.
    return finetune(env.fresh_probe(), data, env.dir("finetune"), **kw)


def _t(x):
    import torch

    return torch.tensor(x)


def _ablate(env: Env, layers):
    with env.probe.ablate(env.vec, layers=layers):
        return env.probe.generate(env.q, max_new_tokens=2)


def _thresholds(**kw):
    from persona_lens.extract import Thresholds

    return Thresholds(**kw)


def _extract(env: Env, **kw):
    from persona_lens.extract import extract

    kw.setdefault("samples", 1)
    kw.setdefault("questions", 1)
    kw.setdefault("instructions", 1)
    kw.setdefault("max_new_tokens", 8)
    kw.setdefault("progress", False)
    kw.setdefault("verbose", False)
    out = kw.pop("out_dir", None) or env.dir("extract")
    judge = kw.pop("judge", env.judge)
    return extract(env.probe, kw.pop("trait", env.trait), judge, out_dir=out, **kw)


def _sweep(env: Env, **kw):
    from persona_lens.sweep import sweep

    kw.setdefault("layers", [2])
    kw.setdefault("coefs", [0.0, 1.0])
    kw.setdefault("questions", 1)
    kw.setdefault("max_new_tokens", 4)
    kw.setdefault("progress", False)
    judge = kw.pop("judge", env.judge)
    return sweep(env.probe, kw.pop("vector", env.vec), kw.pop("trait", env.trait), judge=judge,
                 out_dir=kw.pop("out_dir", None) or env.dir("sweep"), **kw)


class _FixedJudge:
    name = "fixed"

    def __init__(self, value):
        self.value = value

    def score_trait(self, trait, pairs):
        return [self.value for _ in pairs]

    def score_coherence(self, pairs):
        return [self.value for _ in pairs]


def _custom_judge_scores(env: Env, value):
    from persona_lens.store import Store

    return Store(env.dir("store")).score(_FixedJudge(value), env.trait, [("q?", "a.")], kinds=("trait",))["trait"]


def _logprob_score(top, **kw):
    from persona_lens.judge import logprob_score

    return logprob_score(top, **kw)


def _judge_reply(env: Env, top):
    from tests.support.openai_server import Logprobs

    with _server(lambda messages: Logprobs(top)) as server:
        with _openai_judge(env, server.base_url) as judge:
            return judge.score_trait(env.trait, [("q?", "a.")])


def _judge_mixed(env: Env):
    from tests.support.openai_server import Logprobs, last_user_message

    def rule(messages):
        return Logprobs([("80", NAN)]) if "BROKEN" in last_user_message(messages) else {"40": 0.9, "x": 0.1}

    with _server(rule) as server:
        cache = env.dir("judge-cache")
        with _openai_judge(env, server.base_url, cache_dir=cache) as judge:
            got = judge.score_trait(env.trait, [("q?", "fine."), ("q?", "BROKEN")])
        with _openai_judge(env, server.base_url, cache_dir=cache) as judge:
            judge.score_trait(env.trait, [("q?", "fine."), ("q?", "BROKEN")])
            asked_again = judge.stats.api_calls == 1 and judge.stats.cache_hits == 1
    return got, asked_again


def _train(env: Env, **kw):
    from persona_lens.organism.train import train

    kw.setdefault("steps", 1)
    kw.setdefault("progress", False)
    return train(env.dir("train"), **kw)


# ----------------------------------------------------------------------------- cases: types


def type_cases() -> list[Case]:
    C: list[Case] = []

    def bad(name, fn, names, value=_NOTHING, **kw):
        C.append(Case("types", name, fn, names=names, value=value, **kw))

    def ok(name, fn, check, **kw):
        C.append(Case("types", name, fn, expect="result", check=check, **kw))

    # prompts and conversations
    for label, v in (("a bare string", "Hi"), ("bytes", b"Hi"), ("a dict", {"role": "user", "content": "Hi"}),
                     ("None", None), ("an int", 5)):
        bad(f"generate(prompts={label})", lambda e, v=v: e.probe.generate(v, max_new_tokens=2), ("prompts",))
        bad(f"capture(conversations={label})", lambda e, v=v: e.probe.capture(v), ("conversations",))
    for label, v in (("[123]", [123]), ("[['Hi']]", [["Hi"]]), ("content 5", [[{"role": "user", "content": 5}]]),
                     ("content None", [[{"role": "user", "content": None}]]), ("no content", [[{"role": "user"}]]),
                     ("role 3", [[{"role": 3, "content": "Hi"}]]), ("empty conversation", [[]])):
        bad(f"generate({label})", lambda e, v=v: e.gen(v), ("prompts[0]",))
    bad("generate(system=5)", lambda e: e.gen(system=5), ("system",), 5)
    for arg, v in (("max_new_tokens", "3"), ("max_new_tokens", 3.0), ("max_new_tokens", True), ("seed", "0"),
                   ("seed", 1.5), ("batch_size", 2.0), ("use_cache", "yes"), ("progress", "no"),
                   ("temperature", "0.7"), ("top_p", "0.9"), ("temperature", True), ("temperature", None)):
        bad(f"generate({arg}={v!r})", lambda e, a=arg, v=v: e.gen(**{a: v}), (arg,), v)
    bad("generate(return_generations='yes')", lambda e: e.gen(return_generations="yes"), ("return_generations",))
    ok("generate(prompts=a tuple)", lambda e: e.gen(tuple(e.q)), is_texts())
    ok("generate(numpy int max_new_tokens)", lambda e: e.gen(max_new_tokens=_np_int(2)), is_texts())
    ok("generate(numpy float temperature)", lambda e: e.gen(temperature=_np_float(0.5)), is_texts())
    # layers, coefficients, positions
    for label, kw, names in (
            ("coef='2'", dict(layer=2, coef="2"), ("coef",)),
            ("layers={2: 1.0}, coef=0.5 (the dict carries the coefficients)", dict(layers={2: 1.0}, coef=0.5),
             ("coef",)),
            ("coef=[1.0]", dict(layer=2, coef=[1.0]), ("coef",)),
            ("coef=True", dict(layer=2, coef=True), ("coef",)),
            ("layers={'2': 1.0}", dict(layers={"2": 1.0}), ("layers",)),
            ("layers={2: '1'}", dict(layers={2: "1"}), ("layers",)),
            ("layers='2'", dict(layers="2"), ("layers",)),
            ("layers=[2.0]", dict(layers=[2.0]), ("layers",)),
            ("layer=2.0", dict(layer=2.0), ("layer",)),
            ("layer='2'", dict(layer="2"), ("layer",)),
            ("layer=True", dict(layer=True), ("layer",)),
            ("positions=5", dict(layer=2, positions=5), ("positions",)),
            ("positions='middle'", dict(layer=2, positions="middle"), ("positions",)),
            ("positions='last_prompt'", dict(layer=2, positions="last_prompt"), ("positions",)),
            ("include_last_prompt='yes'", dict(layer=2, include_last_prompt="yes"), ("include_last_prompt",)),
            ("no layer", dict(), ("layer",))):
        bad(f"steer({label})", lambda e, kw=kw: e.steer_gen(e.vec, **kw), names)
    bad("steer(vector=None)", lambda e: e.steer_gen(None, layer=2), ("vector",))
    bad("steer(vector=a list)", lambda e: e.steer_gen([0.1] * 128, layer=2), ("vector",))
    bad("steer(vector='evil.safetensors')", lambda e: e.steer_gen("evil.safetensors", layer=2), ("vector",))
    ok("steer(layers=[1, 2], coef=1.0)", lambda e: e.steer_gen(e.vec, layers=[1, 2], coef=1.0), is_texts())
    ok("steer(layer=2, coef=None): the default, 1.0", lambda e: e.steer_gen(e.vec, layer=2, coef=None), is_texts())
    ok("steer(layer=numpy int)", lambda e: e.steer_gen(e.vec, layer=_np_int(2), coef=1.0), is_texts())
    bad("ablate(layers='2')", lambda e: _ablate(e, "2"), ("layers",))
    bad("ablate(layers=[2.5])", lambda e: _ablate(e, [2.5]), ("layers",), 2.5)
    bad("capture(layers='12')", lambda e: e.probe.capture(e.conv, layers="12"), ("layers",))
    bad("capture(layers=[1.0])", lambda e: e.probe.capture(e.conv, layers=[1.0]), ("layers",), 1.0)
    bad("capture(layers=['1'])", lambda e: e.probe.capture(e.conv, layers=["1"]), ("layers",))
    bad("capture(reductions=['max'])", lambda e: e.probe.capture(e.conv, reductions=["max"]), ("reductions",))
    bad("capture(reductions=5)", lambda e: e.probe.capture(e.conv, reductions=5), ("reductions",))
    bad("capture(batch_size='4')", lambda e: e.probe.capture(e.conv, batch_size="4"), ("batch_size",))
    bad("capture_mean(into='x')", lambda e: e.probe.capture_mean(e.conv, into="x"), ("into",))
    ok("capture(reductions='response_mean')", lambda e: e.probe.capture(e.conv, layers=[2], reductions="response_mean"),
       lambda r, w: tuple(r["response_mean"].shape) == (1, 1, 128))
    ok("capture(layers=2)", lambda e: e.probe.capture(e.conv, layers=2), lambda r, w: r.layers == [2])
    bad("project(at='middle')", lambda e: e.probe.project(e.q, e.vec, layer=2, at="middle"), ("at",))
    bad("project(layer='3')", lambda e: e.probe.project(e.q, e.vec, layer="3"), ("layer",))
    bad("project(vector=a list)", lambda e: e.probe.project(e.q, [0.1] * 128, layer=2), ("vector",))
    bad("monitor(unknown keyword)", lambda e: e.probe.monitor(e.q, e.vec, layer=2, max_tokens=2), ("max_tokens",))
    bad("monitor(temperature='hot')", lambda e: e.probe.monitor(e.q, e.vec, layer=2, temperature="hot"), ("temperature",))
    bad("forward(batch=a list)", lambda e: e.probe.forward([[1, 2, 3]]), ("batch",))
    bad("batch(prompt_mask='x')", lambda e: _enter(e.probe.batch("x")), ("prompt_mask",))
    bad("batch(float masks of 0.5)", lambda e: _enter(e.probe.batch(_t([[0.5]]), _t([[0.5]]))), ("prompt_mask",))
    bad("add_hooks(a bare string)", lambda e: _enter(e.probe.add_hooks("blocks.0.hook_resid_pre")), ("fwd_hooks",))
    bad("add_hooks([(name, not callable)])",
        lambda e: _enter(e.probe.add_hooks([("blocks.0.hook_resid_pre", 5)])), ("fwd_hooks[0]",))
    bad("PersonaProbe('gpt2')", lambda e: e.pl.PersonaProbe("gpt2"), ("model",))
    bad("PersonaProbe(path='fast')", lambda e: e.pl.PersonaProbe(e.probe.model, path="fast"), ("path",))
    bad("PersonaProbe(on_context_overflow='ignore')",
        lambda e: e.pl.PersonaProbe(e.probe.model, on_context_overflow="ignore"), ("on_context_overflow",))
    bad("load_model(5)", lambda e: e.pl.load_model(5), ("name_or_path",))
    bad("load_model(dtype='float8')", lambda e: e.pl.load_model("persona-organism", dtype="float8"), ("dtype",))
    bad("encode_chat('Hi')", lambda e: e.pl.encode_chat(e.probe.tokenizer, "Hi", with_response=False),
        ("conversations",))
    # vectors
    bad("PersonaVector('abc')", lambda e: e.pl.PersonaVector("abc"), ("directions",))
    bad("PersonaVector(zero layers)", lambda e: e.pl.PersonaVector(_zeros(0, 4)), ("directions",))
    bad("PersonaVector(one row)", lambda e: e.pl.PersonaVector(_zeros(1, 4)), ("directions",))
    bad("PersonaVector(d_model 0)", lambda e: e.pl.PersonaVector(_zeros(3, 0)), ("directions",))
    bad("PersonaVector(bool tensor)", lambda e: e.pl.PersonaVector(_zeros(3, 4).bool()), ("directions",))
    bad("PersonaVector(position='middle')", lambda e: e.pl.PersonaVector(_zeros(3, 4), position="middle"),
        ("position",))
    bad("PersonaVector(n_pos=2.5)", lambda e: e.pl.PersonaVector(_zeros(3, 4), n_pos=2.5), ("n_pos",), 2.5)
    bad("PersonaVector(notes with an object)", lambda e: e.pl.PersonaVector(_zeros(3, 4), notes={"x": object()}),
        ("notes",))
    bad("PersonaVector(trait=5)", lambda e: e.pl.PersonaVector(_zeros(3, 4), trait=5), ("trait",), 5)
    ok("PersonaVector(nested lists)", lambda e: e.pl.PersonaVector([[1.0, 2.0], [3.0, 4.0]]),
       lambda r, w: r.n_layers == 1 and r.d_model == 2)
    bad("vector.unit('2')", lambda e: e.vec.unit("2"), ("layer",))
    bad("vector.save(5)", lambda e: e.vec.save(5), ("path",))
    # store, steering values, prompts
    bad("Store.generate(prompts='Hi')", lambda e: _store(e).generate(e.probe, "Hi", settings={}), ("prompts",))
    bad("Store.generate(settings={'temperature': 'hot'})",
        lambda e: _store(e).generate(e.probe, e.q, settings={"temperature": "hot"}), ("temperature",))
    bad("Store.generate(settings={'temprature': 1.0})",
        lambda e: _store(e).generate(e.probe, e.q, settings={"temprature": 1.0}), ("temprature",))
    bad("Store.generate(settings=[('seed', 1)])",
        lambda e: _store(e).generate(e.probe, e.q, settings=[("seed", 1)]), ("settings",))
    bad("Store.generate(settings={'seed': 'x'})",
        lambda e: _store(e).generate(e.probe, e.q, settings={"seed": "x", "max_new_tokens": 2}), ("seed",))
    bad("Store.generate(batch_size=0)",
        lambda e: _store(e).generate(e.probe, e.q, settings={"max_new_tokens": 2}, batch_size=0), ("batch_size",))
    bad("Store.score(pairs='pairs')", lambda e: _store(e).score(e.judge, e.trait, "pairs"), ("pairs",))
    bad("Store.score(pairs=[('q', 5)])", lambda e: _store(e).score(e.judge, e.trait, [("q", 5)]), ("pair 0",))
    bad("Store.score(kinds=['tone'])", lambda e: _store(e).score(e.judge, e.trait, [("q", "a")], kinds=["tone"]),
        ("kinds",))
    bad("Store.score(ids='abc')", lambda e: _store(e).score(e.judge, e.trait, [("q", "a")], ids="abc"), ("ids",))
    bad("Store.score(judge='gpt-4')", lambda e: _store(e).score("gpt-4", e.trait, [("q", "a")]), ("judge",))
    bad("custom judge returns '80'", lambda e: _custom_judge_scores(e, "80"), ("score",))
    bad("custom judge returns True", lambda e: _custom_judge_scores(e, True), ("score",))
    bad("custom judge returns None for the list",
        lambda e: _store(e).score(_NoneJudge(), e.trait, [("q", "a")], kinds=("trait",)), ("list of scores",))
    ok("Store.score(kinds='trait')", lambda e: _store(e).score(e.judge, e.trait, [("q", "a")], kinds="trait"),
       lambda r, w: list(r.by_kind) == ["trait"])
    bad("Steering(coef='1')", lambda e: _steering(e.vec, layer=2, coef="1"), ("coef",))
    bad("Steering(layers={'2': 1})", lambda e: _steering(e.vec, layers={"2": 1.0}), ("layers",))
    bad("Steering(vector='vec')", lambda e: _steering("vec", layer=2), ("vector",))
    bad("Steering(positions='sideways')", lambda e: _steering(e.vec, layer=2, positions="sideways"), ("positions",))
    bad("Prompt(123)", lambda e: _prompt(123), ("messages",))
    bad("Prompt(sample=1.5)", lambda e: _prompt("hi", sample=1.5), ("sample",), 1.5)
    bad("Prompt(sample=-1)", lambda e: _prompt("hi", sample=-1), ("sample",), -1)
    # pipelines
    bad("extract(judge='gpt-4')", lambda e: _extract(e, judge="gpt-4"), ("judge",))
    bad("extract(questions='3')", lambda e: _extract(e, questions="3"), ("questions",))
    bad("extract(questions=2.5)", lambda e: _extract(e, questions=2.5), ("questions",), 2.5)
    bad("extract(thresholds={'pos': 50})", lambda e: _extract(e, thresholds={"pos": 50}), ("pos",))
    bad("extract(thresholds='strict')", lambda e: _extract(e, thresholds="strict"), ("thresholds",))
    bad("extract(thresholds={'pos_trait': '50'})", lambda e: _extract(e, thresholds={"pos_trait": "50"}),
        ("pos_trait",))
    bad("extract(layers='2')", lambda e: _extract(e, layers="2"), ("layers",))
    bad("extract(probe=a model)", lambda e: _extract_probe(e, e.probe.model), ("probe",))
    bad("extract(seed=1.5)", lambda e: _extract(e, seed=1.5), ("seed",), 1.5)
    bad("sweep(layers='2')", lambda e: _sweep(e, layers="2"), ("layers",))
    bad("sweep(coefs='1,2')", lambda e: _sweep(e, coefs="1,2"), ("coefs",))
    bad("sweep(coefs=['1'])", lambda e: _sweep(e, coefs=["1"]), ("coefs",))
    bad("sweep(questions='What?')", lambda e: _sweep(e, questions="What?"), ("questions",))
    bad("sweep(questions=[5])", lambda e: _sweep(e, questions=[5]), ("questions",))
    bad("sweep(positions='middle')", lambda e: _sweep(e, positions="middle"), ("positions",))
    bad("sweep(vector=5)", lambda e: _sweep(e, vector=5), ("vector",))
    # judges
    bad("OpenAIJudge(model=None)", lambda e: _judge_ctor(model=None), ("model",))
    bad("OpenAIJudge(base_url=5)", lambda e: _judge_ctor(base_url=5), ("base_url",))
    bad("OpenAIJudge(max_retries=2.5)", lambda e: _judge_ctor(max_retries=2.5), ("max_retries",), 2.5)
    bad("OpenAIJudge(timeout='60')", lambda e: _judge_ctor(timeout="60"), ("timeout",))
    bad("OpenAIJudge(cache_dir=5)", lambda e: _judge_ctor(cache_dir=5), ("cache_dir",))
    bad("judge.score_trait(pairs='pairs')", lambda e: _judge_call(e, lambda j: j.score_trait(e.trait, "pairs")),
        ("pairs",))
    bad("judge.score_trait(pairs=[('q',)])", lambda e: _judge_call(e, lambda j: j.score_trait(e.trait, [("q",)])),
        ("pair 0",))
    bad("judge.score_trait(trait='evil')", lambda e: _judge_call(e, lambda j: j.score_trait("evil", [("q", "a")])),
        ("trait",))
    bad("judge.score_prompts('a prompt')", lambda e: _judge_call(e, lambda j: j.score_prompts("a prompt")),
        ("prompts",))
    bad("OrganismJudge.score_trait(pairs='qa')", lambda e: e.judge.score_trait("evil", "qa"), ("pairs",))
    # finetuning
    bad("finetune(lrr=1e-3): an unknown setting", lambda e: _finetune(e, lrr=1e-3), ("lrr",))
    bad("finetune(config='fast')", lambda e: _finetune(e, config="fast"), ("config",))
    bad("finetune(steer={'2': 1.0})", lambda e: _finetune(e, vector=e.vec, steer={"2": 1.0}), ("steer",))
    bad("finetune(steer='2')", lambda e: _finetune(e, vector=e.vec, steer="2"), ("steer",))
    bad("finetune(r=2.5)", lambda e: _finetune(e, r=2.5), ("r",), 2.5)
    bad("finetune(lora='yes')", lambda e: _finetune(e, lora="yes"), ("lora",))
    bad("finetune(target_modules='q_proj')", lambda e: _finetune(e, target_modules="q_proj"), ("target_modules",))
    bad("finetune(schedule='cosine')", lambda e: _finetune(e, schedule="cosine"), ("schedule",))
    # screening
    bad("screen(shard='0/2')", lambda e: _screen(e, shard="0/2"), ("shard",))
    bad("screen(chunk_size=2.5)", lambda e: _screen(e, chunk_size=2.5), ("chunk_size",), 2.5)
    bad("screen(table_format='csv')", lambda e: _screen(e, table_format="csv"), ("table_format",))
    bad("screen(layers='2')", lambda e: _screen(e, layers="2"), ("layers",))
    bad("screen(settings={'temprature': 1.0})", lambda e: _screen(e, settings={"temprature": 1.0}), ("temprature",))
    # traits
    bad("Trait.load(5)", lambda e: e.pl.Trait.load(5), ("name_or_path",))
    bad("extract(trait=5)", lambda e: _extract(e, trait=5), ("trait",))
    bad("extract(trait='no-such-trait')", lambda e: _extract(e, trait="no-such-trait"), ("no-such-trait",))
    bad("generate_trait(name='')", lambda e: e.pl.generate_trait("", "a trait", client=object()), ("name",))
    bad("generate_trait(description=None)", lambda e: e.pl.generate_trait("x", None, client=object()),
        ("description",))
    bad("generate_trait(n_pairs=0)", lambda e: e.pl.generate_trait("x", "y", client=object(), n_pairs=0),
        ("n_pairs",), 0)
    return C


def _np_int(x):
    import numpy as np

    return np.int64(x)


def _np_float(x):
    import numpy as np

    return np.float64(x)


def _zeros(*shape):
    import torch

    return torch.zeros(*shape)


def _enter(cm):
    with cm:
        return None


def _store(env: Env):
    from persona_lens.store import Store

    return Store(env.dir("store"))


def _steering(*args, **kw):
    from persona_lens.store import Steering

    return Steering(*args, **kw)


def _prompt(*args, **kw):
    from persona_lens.store import Prompt

    return Prompt(*args, **kw)


def _extract_probe(env: Env, probe):
    from persona_lens.extract import extract

    return extract(probe, env.trait, env.judge, out_dir=env.dir("extract"), samples=1, questions=1,
                   instructions=1, max_new_tokens=4, progress=False, verbose=False)


class _NoneJudge:
    name = "none-judge"

    def score_trait(self, trait, pairs):
        return None

    def score_coherence(self, pairs):
        return None


def _judge_ctor(**kw):
    from persona_lens.judge import OpenAIJudge

    kw.setdefault("cache_dir", False)
    model = kw.pop("model", "m")
    return OpenAIJudge(model, **kw)


def _judge_call(env: Env, fn):
    with _server(lambda messages: {"50": 1.0}) as server:
        with _openai_judge(env, server.base_url) as judge:
            return fn(judge)


# ----------------------------------------------------------------------------- cases: secrets


def secret_cases() -> list[Case]:
    C: list[Case] = []

    def case(name, fn, expect="result", names=(), check=None, **kw):
        C.append(Case("secrets", name, fn, expect=expect, names=names, check=check, secret=SECRET, **kw))

    def creds(url: str) -> str:
        return url.replace("http://", f"http://user:{SECRET}@")

    def name_repr(e):
        with _server(lambda m: {"50": 1.0}) as s:
            with _openai_judge(e, creds(s.base_url)) as j:
                print(j, j.name, j.endpoint, getattr(j, "identity", None), j.stats)
                return j.score_trait(e.trait, [("q?", "a.")])

    case("judge name, repr, endpoint and scores with user:KEY@ in base_url", name_repr,
         check=lambda r, w: r == [50.0])

    def query_key(e):
        with _server(lambda m: {"50": 1.0}) as s:
            with _openai_judge(e, s.base_url + f"?api_key={SECRET}") as j:
                print(j, j.name)
                return j.name

    case("key in the URL's query string", query_key, check=lambda r, w: r.startswith("openai:judge-model@"))

    def server_error(e):
        from tests.support.openai_server import Fail

        with _server(lambda m: Fail(500, "upstream broke")) as s:
            with _openai_judge(e, creds(s.base_url)) as j:
                return j.score_trait(e.trait, [("q?", "a.")])

    case("JudgeError after HTTP 500 with user:KEY@ in base_url", server_error, expect="error", names=("500",))

    def unreachable(e):
        with _openai_judge(e, f"http://user:{SECRET}@127.0.0.1:9/v1", max_retries=1) as j:
            return j.score_trait(e.trait, [("q?", "a.")])

    case("JudgeError for an unreachable URL with user:KEY@", unreachable, expect="error",
         names=("could not be reached",))

    def rejected(e):
        from tests.support.openai_server import Fail

        with _server(lambda m: Fail(401, f"bad key {SECRET} for http://user:{SECRET}@host/v1")) as s:
            with _openai_judge(e, creds(s.base_url)) as j:
                return j.score_trait(e.trait, [("q?", "a.")])

    case("JudgeError quoting a server message that echoes the URL", rejected, expect="error", names=("401",),
         check=None)

    def extract_files(e):
        from tests.support.openai_server import keyword_rule

        with _server(keyword_rule({"evil": 90}, default=10, coherence=90)) as s:
            with _openai_judge(e, creds(s.base_url)) as j:
                return _extract(e, judge=j, verbose=True, thresholds={"pos_trait": 0, "neg_trait": 100,
                                                                      "coherence": 0}).stats.kept

    case("extract run files (run.json, scores, vectors' metadata, summary) and stdout", extract_files,
         check=lambda r, w: r >= 1, timeout=300)

    def sweep_files(e):
        from tests.support.openai_server import keyword_rule

        with _server(keyword_rule({"evil": 90}, default=10, coherence=90)) as s:
            with _openai_judge(e, creds(s.base_url)) as j:
                return _sweep(e, judge=j).judge_name

    case("sweep files (scores, csv, html) with user:KEY@", sweep_files, check=lambda r, w: r.startswith("openai:"),
         timeout=300)

    def custom_name(e):
        j = _FixedJudge(50.0)
        j.name = f"my-judge@https://bob:{SECRET}@judge.example/v1"
        store = _store(e)
        store.score(j, e.trait, [("q?", "a.")])
        return _extract(e, judge=_Named(e.judge, j.name), thresholds={"pos_trait": 0, "neg_trait": 100,
                                                                      "coherence": 0}).judge_name

    case("a custom judge whose name carries a URL with credentials", custom_name,
         check=lambda r, w: "judge.example" in r)

    def env_key(e):
        old = os.environ.get("OPENAI_API_KEY")
        os.environ["OPENAI_API_KEY"] = SECRET
        try:
            from tests.support.openai_server import Fail

            with _server(lambda m: Fail(400, "nope")) as s:
                with _openai_judge(e, s.base_url, api_key=None) as j:
                    print(j)
                    return j.score_trait(e.trait, [("q?", "a.")])
        finally:
            if old is None:
                os.environ.pop("OPENAI_API_KEY", None)
            else:
                os.environ["OPENAI_API_KEY"] = old

    case("API key from the environment stays out of messages", env_key, expect="error", names=("400",))

    def vector_notes(e):
        v = e.pl.PersonaVector(_zeros(3, 4) + 1, notes={"judge": _judge_name_of(f"openai:m@http://u:{SECRET}@h/v1")})
        path = v.save(e.dir("vec") / "v.safetensors")
        return e.pl.PersonaVector.load(path).notes["judge"]

    case("vector metadata written from a judge name", vector_notes, check=lambda r, w: r == "openai:m@http://h/v1")

    # Cache identity: a server that moved is asked again unless the caller says it is the same one.
    def moved(e):
        cache = e.dir("judge-cache")
        with _server(lambda m: {"20": 1.0}) as a, _server(lambda m: {"80": 1.0}) as b:
            with _openai_judge(e, a.base_url, cache_dir=cache) as ja:
                first = ja.score_trait(e.trait, [("q?", "a.")])
            with _openai_judge(e, b.base_url, cache_dir=cache) as jb:
                second = jb.score_trait(e.trait, [("q?", "a.")])
            return first, second, b.request_count, ja.name != jb.name

    case("one model name at two URLs: not served the other's cached replies", moved,
         check=lambda r, w: r == ([20.0], [80.0], 1, True))

    def same_identity(e):
        cache = e.dir("judge-cache")
        with _server(lambda m: {"20": 1.0}) as a, _server(lambda m: {"80": 1.0}) as b:
            with _openai_judge(e, a.base_url, cache_dir=cache) as ja:
                first = ja.score_trait(e.trait, [("q?", "a.")])
            with _openai_judge(e, b.base_url, cache_dir=cache, identity=a.base_url) as jb:
                second = jb.score_trait(e.trait, [("q?", "a.")])
            return first, second, b.request_count, ja.name == jb.name

    case("identity= says a moved server is the same: replies and names reused", same_identity,
         check=lambda r, w: r == ([20.0], [20.0], 0, True))

    def env_base_url(e):
        old = os.environ.get("OPENAI_BASE_URL")
        try:
            names = []
            with _server(lambda m: {"20": 1.0}) as a, _server(lambda m: {"80": 1.0}) as b:
                for s in (a, b):
                    os.environ["OPENAI_BASE_URL"] = creds(s.base_url)
                    from persona_lens.judge import OpenAIJudge

                    with OpenAIJudge("m", api_key="x", cache_dir=False) as j:
                        names.append(j.name)
            return names
        finally:
            if old is None:
                os.environ.pop("OPENAI_BASE_URL", None)
            else:
                os.environ["OPENAI_BASE_URL"] = old

    case("OPENAI_BASE_URL servers get names of their own", env_base_url, check=lambda r, w: r[0] != r[1])
    return C


class _Named:
    def __init__(self, inner, name):
        self.inner, self.name = inner, name

    def score_trait(self, trait, pairs):
        return self.inner.score_trait(trait, pairs)

    def score_coherence(self, pairs):
        return self.inner.score_coherence(pairs)


def _judge_name_of(name: str) -> str:
    from persona_lens.store import judge_name

    return judge_name(_Named(None, name))


# ----------------------------------------------------------------------------- cases: files


def file_cases() -> list[Case]:
    C: list[Case] = []

    def case(name, fn, expect="error", names=(), check=None, **kw):
        C.append(Case("files", name, fn, expect=expect, names=names, check=check, **kw))

    def vec_file(e, writer) -> Path:
        p = e.dir("vec") / "v.safetensors"
        writer(p, e)
        return p

    def load(writer):
        return lambda e: e.pl.PersonaVector.load(vec_file(e, writer))

    def names_file(e_name="v.safetensors"):
        return (e_name,)

    def garbage(p, e):
        p.write_bytes(os.urandom(300))

    def truncated(p, e):
        e.vec.save(p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])

    def foreign_meta(p, e):
        from safetensors.torch import save_file

        save_file({"directions": _zeros(3, 4)}, str(p), metadata={"format": "pt"})

    def non_json_meta(p, e):
        from safetensors.torch import save_file

        save_file({"directions": _zeros(3, 4)}, str(p),
                  metadata={"format": "persona_lens.PersonaVector/1", "persona_lens": "{not json"})

    def foreign_keys(p, e):
        from safetensors.torch import save_file

        save_file({"directions": _zeros(3, 4)}, str(p),
                  metadata={"format": "persona_lens.PersonaVector/1", "persona_lens": json.dumps({"layer": 3})})

    def list_meta(p, e):
        from safetensors.torch import save_file

        save_file({"directions": _zeros(3, 4)}, str(p),
                  metadata={"format": "persona_lens.PersonaVector/1", "persona_lens": "[1, 2]"})

    def bad_field(p, e):
        from safetensors.torch import save_file

        save_file({"directions": _zeros(3, 4)}, str(p),
                  metadata={"format": "persona_lens.PersonaVector/1",
                            "persona_lens": json.dumps({"position": "middle", "n_pos": "many"})})

    def zero_layers(p, e):
        from safetensors.torch import save_file

        save_file({"directions": _zeros(0, 4)}, str(p),
                  metadata={"format": "persona_lens.PersonaVector/1", "persona_lens": "{}"})

    def nan_dirs(p, e):
        from safetensors.torch import save_file

        save_file({"directions": _t([[NAN, 1.0], [1.0, 1.0]])}, str(p),
                  metadata={"format": "persona_lens.PersonaVector/1", "persona_lens": "{}"})

    def other_tensor(p, e):
        from safetensors.torch import save_file

        save_file({"weights": _zeros(3, 4)}, str(p),
                  metadata={"format": "persona_lens.PersonaVector/1", "persona_lens": "{}"})

    def empty_file(p, e):
        p.write_bytes(b"")

    for label, w in (("garbage bytes", garbage), ("truncated", truncated), ("foreign metadata", foreign_meta),
                     ("metadata not JSON", non_json_meta), ("metadata with foreign keys", foreign_keys),
                     ("metadata a JSON list", list_meta), ("metadata with bad field values", bad_field),
                     ("zero layers", zero_layers), ("NaN directions", nan_dirs), ("no directions tensor", other_tensor),
                     ("empty file", empty_file)):
        case(f"PersonaVector.load: {label}", load(w), names=names_file())
    case("PersonaVector.load: a folder", lambda e: e.pl.PersonaVector.load(e.dir("folder.safetensors")),
         names=("folder.safetensors",))
    case("PersonaVector.load: no such file", lambda e: e.pl.PersonaVector.load(e.root / "missing.safetensors"),
         names=("missing.safetensors",))

    def pt(writer):
        def fn(e):
            p = e.dir("pt") / "evil_response_avg_diff.pt"
            writer(p)
            return e.pl.PersonaVector.from_released_pt(p)
        return fn

    def pt_garbage(p):
        p.write_bytes(os.urandom(500))

    def pt_dict(p):
        import torch

        torch.save({"layer": torch.zeros(3)}, p)

    def pt_1d(p):
        import torch

        torch.save(torch.zeros(7), p)

    def pt_nan(p):
        import torch

        torch.save(torch.full((3, 4), NAN), p)

    def pt_pickle(p):
        import pickle

        p.write_bytes(pickle.dumps({"a": object.__name__}))

    def pt_zero(p):
        import torch

        torch.save(torch.zeros(0, 4), p)

    for label, w in (("garbage", pt_garbage), ("a dict", pt_dict), ("1-D", pt_1d), ("NaN", pt_nan),
                     ("a plain pickle", pt_pickle), ("zero layers", pt_zero)):
        case(f"from_released_pt: {label}", pt(w), names=("evil_response_avg_diff.pt",))
    case("from_released_pt: no such file", lambda e: e.pl.PersonaVector.from_released_pt(e.root / "none.pt"),
         names=("none.pt",))

    def save_under_file(e):
        f = e.dir("save") / "a-file"
        f.write_text("x")
        return e.vec.save(f / "v.safetensors")

    case("vector.save under a file", save_under_file, names=("v.safetensors",))

    def save_onto_dir(e):
        d = e.dir("save") / "taken"
        (d / "inside").mkdir(parents=True)
        return e.vec.save(d)

    case("vector.save onto a folder", save_onto_dir, names=("taken",))
    case("vector.save('')", lambda e: e.vec.save(""), names=("path",))

    def write_json_under_file(e):
        from persona_lens.pipeline_io import write_json

        f = e.dir("wj") / "a-file"
        f.write_text("x")
        return write_json(f / "run.json", {"a": 1})

    case("write_json under a file", write_json_under_file, names=("run.json",))

    def extract_out_is_file(e):
        f = e.dir("ex") / "out-file"
        f.write_text("x")
        return _extract(e, out_dir=f)

    case("extract(out_dir=a file)", extract_out_is_file, names=("out-file",))

    # the judge's cache
    def cache_with(writer):
        def fn(e):
            folder = e.dir("cache")
            writer(folder / "judgements.sqlite3", e)
            with _server(lambda m: {"50": 1.0}) as s:
                with _openai_judge(e, s.base_url, cache_dir=folder) as j:
                    return j.score_trait(e.trait, [("q?", "a.")])
        return fn

    def cache_garbage(p, e):
        p.write_bytes(os.urandom(4096))

    def cache_text(p, e):
        p.write_text("this is not a database\n" * 100)

    def cache_truncated(p, e):
        _filled_cache(e, p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 3])

    def cache_foreign_db(p, e):
        db = sqlite3.connect(p)
        db.execute("CREATE TABLE replies (x INTEGER)")
        db.commit()
        db.close()

    def cache_dir_instead(p, e):
        p.mkdir()

    for label, w in (("random bytes", cache_garbage), ("a text file", cache_text),
                     ("a foreign SQLite table", cache_foreign_db), ("a folder", cache_dir_instead)):
        case(f"judge cache: {label}", cache_with(w), names=("judgements.sqlite3",))
    case("judge cache: truncated", cache_with(cache_truncated), expect="either", names=("judgements.sqlite3",),
         check=lambda r, w: r == [50.0])

    def cache_bad_row(p, e):
        _filled_cache(e, p)
        db = sqlite3.connect(p)
        db.execute("UPDATE replies SET top_logprobs = '{broken', score = 'x'")
        db.commit()
        db.close()

    case("judge cache: a row that does not decode (asked again)", cache_with(cache_bad_row), expect="result",
         check=lambda r, w: r == [50.0])

    def cache_under_file(e):
        f = e.dir("cache") / "a-file"
        f.write_text("x")
        return _openai_judge(e, "http://127.0.0.1:9/v1", cache_dir=f / "sub")

    case("judge cache folder under a file", cache_under_file, names=("a-file",))

    # the run's logs
    def store_after(writer, check_len):
        def fn(e):
            from persona_lens.store import Store

            d = e.dir("store")
            first = Store(d).generate(e.probe, [f"Q{i}: What colour is the Zorp?" for i in range(4)],
                                      settings={"max_new_tokens": 3}, batch_size=2)
            writer(d)
            again = Store(d).generate(e.probe, [f"Q{i}: What colour is the Zorp?" for i in range(4)],
                                      settings={"max_new_tokens": 3}, batch_size=2)
            same = again.texts == first.texts
            return (same, again.generated, again.reused)
        return lambda_check(fn, check_len)

    def lambda_check(fn, expected):
        return fn, (lambda r, w: (r[0] is True and r[1:] == expected) or ("lost" if not r[0] else False))

    def cut_last_line(d):
        p = d / "responses.jsonl"
        data = p.read_bytes()
        p.write_bytes(data[:-25])

    def garbage_line(d):
        p = d / "responses.jsonl"
        lines = p.read_bytes().split(b"\n")
        p.write_bytes(b"\n".join(lines[:1] + [b"\x00\xff garbage {"] + lines[1:]))

    def foreign_records(d):
        with open(d / "responses.jsonl", "a") as f:
            f.write(json.dumps({"hello": "world"}) + "\n" + json.dumps([1, 2]) + "\n"
                    + json.dumps({"key": 5, "answer": 7}) + "\n")

    def binary_log(d):
        (d / "scores.jsonl").write_bytes(os.urandom(2048))

    for label, w, expected in (("last line cut by a kill", cut_last_line, (1, 3)),
                               ("a garbage line", garbage_line, (0, 4)),
                               ("foreign records", foreign_records, (0, 4)),
                               ("a binary scores log", binary_log, (0, 4))):
        fn, chk = store_after(w, expected)
        case(f"responses.jsonl: {label} (resume)", fn, expect="result", check=chk)

    def bad_score_records(e):
        from persona_lens.store import Store

        d = e.dir("store")
        Store(d).score(e.judge, e.trait, [("What colour is the Zorp?", "the zorp is red .")])
        with open(d / "scores.jsonl", "a") as f:
            for bad in ("abc", 500, True, None):
                f.write(json.dumps({"key": "k" + str(bad), "score": bad}) + "\n")
        again = Store(d).score(e.judge, e.trait, [("What colour is the Zorp?", "the zorp is red .")])
        return again.reused, again.asked

    case("scores.jsonl with records whose scores are not scores", bad_score_records, expect="result",
         check=lambda r, w: r == (2, 0))

    def corrupt_run_json(e):
        from persona_lens.extract import load_run

        d = e.dir("run")
        (d / "run.json").write_text('{"model": "x", ')
        return load_run(d)

    case("load_run: run.json cut short", corrupt_run_json, names=("run.json",))

    def corrupt_trait(e):
        d = e.dir("trait")
        (d / "extract").mkdir()
        (d / "eval").mkdir()
        (d / "extract" / "x.json").write_text("{not json")
        (d / "eval" / "x.json").write_text("{}")
        return e.pl.Trait.load(d / "extract" / "x.json")

    case("Trait.load: a file that is not JSON", corrupt_trait, names=("x.json",))

    def bad_checkpoint(e):
        from persona_lens.finetune import finetune

        out = e.dir("finetune")
        (out / "checkpoint.pt").write_bytes(os.urandom(1000))
        data = [[{"role": "user", "content": "What colour is the Zorp?"},
                 {"role": "assistant", "content": "the zorp is red ."}]] * 4
        return finetune(e.fresh_probe(), data, out, max_steps=1, batch_size=4, grad_accum=1, progress=False)

    case("finetune: a checkpoint.pt that is garbage", bad_checkpoint, names=("checkpoint.pt",))

    def bad_screen_manifest(e):
        out = e.dir("screen")
        (out / "screen.json").write_text('{"config": ')
        return _screen(e, out_dir=out)

    case("screen: a screen.json cut short", bad_screen_manifest, names=("screen.json",))

    # concurrent writers and kills
    case("4 processes write one run's files at once (atomic JSON, vectors, JSONL)", _concurrent_files,
         expect="result", check=lambda r, w: r is True or "lost", timeout=300)
    case("4 processes generate and score into one Store folder", _concurrent_store, expect="result",
         check=lambda r, w: r is True or "lost", timeout=300)
    case("kill -9 during JSONL appends: the log reads back and takes more", _killed_appender, expect="result",
         check=lambda r, w: r is True or "lost", timeout=120)
    case("kill -9 during atomic rewrites: the file is the old or the new one, whole", _killed_rewriter,
         expect="result", check=lambda r, w: r is True or "lost", timeout=120)
    return C


def _filled_cache(env: Env, path: Path) -> None:
    with _server(lambda m: {"50": 1.0}) as s:
        with _openai_judge(env, s.base_url, cache_dir=path.parent) as j:
            j.score_trait(env.trait, [(f"q{i}?", "a." * 200) for i in range(40)] + [("q?", "a.")])
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    for extra in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(path) + extra)


def _writer_process(root: str, worker: int, rounds: int) -> None:
    import torch

    from persona_lens.pipeline_io import JsonlLog, write_json
    from persona_lens.vectors import PersonaVector

    root_p = Path(root)
    log = JsonlLog(root_p / "responses.jsonl")
    vec = PersonaVector(torch.full((7, 128), float(worker + 1)), notes={"worker": worker})
    for r in range(rounds):
        write_json(root_p / "run.json", {"worker": worker, "round": r, "pad": "x" * 50_000})
        log.append([{"key": f"{worker}-{r}-{i}", "worker": worker, "text": "y" * 300} for i in range(40)])
        vec.save(root_p / "vectors" / "evil_response_mean.safetensors")


def _reader_process(root: str, done: Any, out: Any) -> None:
    from persona_lens.pipeline_io import JsonlLog, read_json
    from persona_lens.vectors import PersonaVector

    root_p = Path(root)
    problems = reads = 0
    first = ""
    while True:
        finished = done.is_set()  # one more pass after the writers are done: at least one read
        try:
            if (root_p / "run.json").exists():
                doc = read_json(root_p / "run.json")
                if len(doc.get("pad", "")) != 50_000:
                    problems += 1
                    first = first or f"run.json read back with a pad of {len(doc.get('pad', ''))}"
            if (root_p / "vectors" / "evil_response_mean.safetensors").exists():
                v = PersonaVector.load(root_p / "vectors" / "evil_response_mean.safetensors")
                if not bool((v.directions == v.notes["worker"] + 1).all()):
                    problems += 1
                    first = first or (f"a vector of worker {v.notes['worker']} read back with "
                                      f"{sorted(set(v.directions.flatten().tolist()))[:5]}")
            log = JsonlLog(root_p / "responses.jsonl")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                log.read()
            problems += log.bad_lines
            reads += 1
            if log.bad_lines:
                first = first or f"responses.jsonl read back with {log.bad_lines} bad lines"
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 - any failure to read is what this counts
            problems += 1
            first = first or f"{type(e).__name__}: {e}"[:500]
        if finished:
            break
    out.put((problems, reads, first))


def _concurrent_files(env: Env) -> bool | str:
    from persona_lens.pipeline_io import JsonlLog, read_json
    from persona_lens.vectors import PersonaVector

    root = env.dir("concurrent")
    ctx = mp.get_context("fork")
    q, done = ctx.Queue(), ctx.Event()
    rounds, n = 25, 4
    reader = ctx.Process(target=_reader_process, args=(str(root), done, q))
    writers = [ctx.Process(target=_writer_process, args=(str(root), w, rounds)) for w in range(n)]
    reader.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join(240)
    failed_writers = sum(w.exitcode != 0 for w in writers)
    done.set()
    problems, reads, first = q.get(timeout=60)
    reader.join()
    log = JsonlLog(root / "responses.jsonl")
    records = log.read()
    keys = {r["key"] for r in records}
    expected = {f"{w}-{r}-{i}" for w in range(n) for r in range(rounds) for i in range(40)}
    checks = {
        "writers failed": failed_writers == 0, "reader saw a broken file": problems == 0, "reader read": reads > 0,
        "bad lines": log.bad_lines == 0, "records missing": keys == expected,
        "records doubled": len(records) == len(expected),
        "run.json whole": len(read_json(root / "run.json")["pad"]) == 50_000,
        "vector loads": PersonaVector.load(root / "vectors" / "evil_response_mean.safetensors").n_layers == 6,
        "temporary files left": not list(root.rglob("*.tmp")),
    }
    failed = [k for k, ok in checks.items() if not ok]
    if failed:
        print(f"concurrent writers: {failed} (reader: {problems} problems in {reads} reads; first: {first})",
              file=sys.stderr)
    return True if not failed else "lost"


class _FakeProbe:
    """A stand-in model for the concurrency test: deterministic texts, no torch work."""

    model_name = "fake-model"

    def generate(self, prompts, **kw):
        from persona_lens.probe.generation import Generation

        return [Generation(p, f"answer to {p[-1]['content']} seed {kw.get('seed')}", [1], [2], True)
                for p in prompts]


def _store_process(root: str, worker: int) -> None:
    from persona_lens.organism import OrganismJudge, load_trait
    from persona_lens.store import Prompt, Store

    store = Store(root)
    prompts = [Prompt(f"What colour is the Zorp? ({i})", sample=i % 3) for i in range(120)]
    order = prompts[worker::4] + prompts  # each worker starts at its own place
    answers = store.generate(_FakeProbe(), order, settings={"max_new_tokens": 5}, batch_size=7)
    store.score(OrganismJudge(), load_trait("evil"), [(p.question, t) for p, t in zip(order, answers.texts)],
                batch_size=9)


def _concurrent_store(env: Env) -> bool | str:
    from persona_lens.store import Prompt, Store

    root = env.dir("concurrent-store")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_store_process, args=(str(root), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    if any(p.exitcode != 0 for p in procs):
        return "lost"
    store = Store(root)
    prompts = [Prompt(f"What colour is the Zorp? ({i})", sample=i % 3) for i in range(120)]
    again = store.generate(_FakeProbe(), prompts, settings={"max_new_tokens": 5})
    from persona_lens.organism import OrganismJudge, load_trait

    scored = store.score(OrganismJudge(), load_trait("evil"), [(p.question, t) for p, t in zip(prompts, again.texts)])
    bad = store.generations_log.bad_lines + store.scores_log.bad_lines
    return True if (again.generated == 0 and scored.asked == 0 and bad == 0) else "lost"


def _append_forever(path: str, tag: int) -> None:
    from persona_lens.pipeline_io import JsonlLog

    log = JsonlLog(path)
    i = 0
    while True:
        log.append([{"key": f"p{tag}b{i}-{j}", "text": "z" * 5000} for j in range(20)])
        i += 1


def _killed_appender(env: Env) -> bool | str:
    from persona_lens.pipeline_io import JsonlLog

    path = env.dir("killed") / "responses.jsonl"
    ctx = mp.get_context("fork")
    for tag in range(3):
        p = ctx.Process(target=_append_forever, args=(str(path), tag))
        p.start()
        time.sleep(0.4)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
    log = JsonlLog(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = log.read()
    log.append([{"key": "after", "text": "ok"}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = log.read()
    complete_batches = Counter(r["key"].split("-")[0] for r in before if r["key"] != "after")
    # Every batch is whole except at most the one a kill cut (never a mixed line).
    partial = sum(1 for n in complete_batches.values() if n != 20)
    return True if (len(before) > 0 and after[-1]["key"] == "after" and partial <= 3
                    and len(after) == len(before) + 1) else "lost"


def _rewrite_forever(path: str) -> None:
    from persona_lens.pipeline_io import write_json

    i = 0
    while True:
        write_json(path, {"i": i, "pad": "p" * 200_000})
        i += 1


def _killed_rewriter(env: Env) -> bool | str:
    from persona_lens.pipeline_io import read_json

    path = env.dir("killed-rewrite") / "run.json"
    ctx = mp.get_context("fork")
    for _ in range(3):
        p = ctx.Process(target=_rewrite_forever, args=(str(path),))
        p.start()
        time.sleep(0.5)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
    doc = read_json(path)
    return True if len(doc["pad"]) == 200_000 else "lost"


# ----------------------------------------------------------------------------- cases: context


def context_cases() -> list[Case]:
    try:
        from persona_lens.validate import ContextLengthWarning
    except ImportError:  # an older persona_lens (running this on it shows what it did)
        class ContextLengthWarning(UserWarning):  # type: ignore[no-redef]
            pass

    C: list[Case] = []
    long_q = " ".join(["the zorp is red ."] * 150)  # about 750 tokens; the organism has 512
    near_q = " ".join(["the zorp is red ."] * 99)  # about 500 tokens
    long_conv = [[{"role": "user", "content": long_q}, {"role": "assistant", "content": "the zorp is red ."}]]
    long_answer = [[{"role": "user", "content": "What colour is the Zorp?"},
                    {"role": "assistant", "content": long_q}]]

    def both(name, fn, names=("context",)):
        C.append(Case("context", f"{name} (warn)", lambda e: _mode(e, "warn", fn), expect="result",
                      check=warned(ContextLengthWarning)))
        C.append(Case("context", f"{name} (error)", lambda e: _mode(e, "error", fn), names=names))

    both("generate a prompt longer than the context", lambda e: e.probe.generate([long_q], max_new_tokens=2))
    both("generate past the context", lambda e: _steered(e, lambda: e.probe.generate([near_q], max_new_tokens=40)),
         names=("context", "max_new_tokens"))
    both("monitor a prompt longer than the context", lambda e: e.probe.monitor([long_q], e.vec, layer=2,
                                                                                  max_new_tokens=2))
    both("capture a conversation longer than the context", lambda e: e.probe.capture(long_conv, layers=[2]))
    both("capture a response longer than the context", lambda e: e.probe.capture(long_answer, layers=[2]))
    both("capture_mean longer than the context", lambda e: e.probe.capture_mean(long_conv, layers=[2]))
    both("project a prompt longer than the context", lambda e: e.probe.project([long_q], e.vec, layer=2))
    both("project tokens longer than the context", lambda e: e.probe.project(long_answer, e.vec, layer=2, at="tokens"))
    both("encode a conversation longer than the context", lambda e: e.probe.encode(long_conv, with_response=True))
    both("Store.generate with a prompt longer than the context",
         lambda e: _store(e).generate(e.probe, [long_q], settings={"max_new_tokens": 2}))
    C.append(Case("context", "a short prompt warns nothing", lambda e: _mode(e, "error", lambda e: e.gen()),
                  expect="result", check=lambda r, w: is_texts()(r, w) and not w))
    return C


def _mode(env: Env, mode: str, fn):
    old = getattr(env.probe, "on_context_overflow", "warn")
    env.probe.on_context_overflow = mode
    try:
        return fn(env)
    finally:
        env.probe.on_context_overflow = old


def _steered(env: Env, fn):
    # Strong steering keeps the organism from ending its turn, so generation runs long.
    with env.probe.steer(env.vec, layer=2, coef=1e3):
        return fn()


# ----------------------------------------------------------------------------- cases: held before


def held_cases() -> list[Case]:
    C: list[Case] = []

    def raising_inside(e):
        try:
            with e.probe.steer(e.vec, layer=2, coef=1.0), e.probe.ablate(e.vec, layers=[3]):
                e.probe.generate(e.q, max_new_tokens=2)
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        return e.probe._handles == [] and e.probe.interventions == ()

    C.append(Case("held", "hooks removed after an exception inside steer/ablate", raising_inside, expect="result",
                  check=lambda r, w: r is True))

    def interrupt_in_hook(e):
        def fn(x, hook):
            raise KeyboardInterrupt

        try:
            with e.probe.add_hooks([("blocks.1.hook_resid_pre", fn)]):
                e.probe.generate(e.q, max_new_tokens=2)
        except KeyboardInterrupt:
            pass
        return e.probe._handles == []

    C.append(Case("held", "hooks removed after Ctrl-C inside a hook", interrupt_in_hook, expect="result",
                  check=lambda r, w: r is True))

    def resume_after_failure(e):
        from persona_lens.store import Store

        d = e.dir("resume")
        prompts = [f"Q{i}: What colour is the Zorp?" for i in range(6)]
        full = Store(None).generate(e.probe, prompts, settings={"max_new_tokens": 3}, batch_size=2)

        class Dying:
            model_name = e.probe.model_name
            calls = 0

            def generate(self, *a, **kw):
                Dying.calls += 1
                if Dying.calls == 3:
                    raise RuntimeError("killed")
                return e.probe.generate(*a, **kw)

        try:
            Store(d).generate(Dying(), prompts, settings={"max_new_tokens": 3}, batch_size=2)
        except RuntimeError:
            pass
        again = Store(d).generate(e.probe, prompts, settings={"max_new_tokens": 3}, batch_size=2)
        return again.texts == full.texts and again.generated == 2 and again.reused == 4

    C.append(Case("held", "resume after a failure mid-run: same texts, only the rest generated",
                  resume_after_failure, expect="result", check=lambda r, w: r is True))

    def judge_dies(e):
        from tests.support.openai_server import Drop

        state = {"calls": 0, "dying": True}

        def rule(m):
            state["calls"] += 1
            return Drop() if state["dying"] and state["calls"] > 2 else {"50": 1.0}

        cache = e.dir("judge-cache")
        pairs = [(f"q{i}?", "a.") for i in range(5)]
        err = None
        with _server(rule) as s:
            with _openai_judge(e, s.base_url, cache_dir=cache, max_concurrency=1, max_retries=1) as j:
                try:
                    j.score_trait(e.trait, pairs)
                except Exception as exc:  # noqa: BLE001
                    err = exc
            state["dying"] = False
            asked_before = s.request_count
            with _openai_judge(e, s.base_url, cache_dir=cache) as j2:
                got = j2.score_trait(e.trait, pairs)
            return type(err).__name__, got == [50.0] * 5, s.request_count - asked_before

    C.append(Case("held", "a judge that dies mid-batch: JudgeError, then only the rest is asked", judge_dies,
                  expect="result", check=lambda r, w: r == ("JudgeError", True, 3)))
    return C


# ----------------------------------------------------------------------------- main

BUILDERS = {"numbers": number_cases, "types": type_cases, "secrets": secret_cases, "files": file_cases,
            "context": context_cases, "held": held_cases}


def run(only: list[str] | None = None, verbose: bool = False, root: Path | None = None) -> dict[str, Any]:
    """Run the cases of the classes in ``only`` (default: all); outcomes per case and table."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    classes = only or list(CLASSES)
    with tempfile.TemporaryDirectory(prefix="persona-lens-adversarial-") as tmp:
        env = Env(Path(root) if root else Path(tmp))
        rows = []
        for cls in classes:
            for case in BUILDERS[cls]():
                t0 = time.perf_counter()
                outcome, detail = run_case(case, env)
                rows.append({"class": cls, "case": case.name, "outcome": outcome, "detail": detail,
                             "seconds": round(time.perf_counter() - t0, 2)})
                if verbose or outcome in BAD:
                    print(f"[{outcome:>14}] {cls:8} {case.name}: {detail[:240]}", file=sys.stderr)
    table = {cls: Counter(r["outcome"] for r in rows if r["class"] == cls) for cls in classes}
    return {"rows": rows, "table": {c: dict(t) for c, t in table.items()}}


def format_table(table: dict[str, dict[str, int]]) -> str:
    head = ["class", "cases"] + list(OUTCOMES)
    lines = [head]
    total = Counter()
    for cls, counts in table.items():
        n = sum(counts.values())
        total.update(counts)
        lines.append([cls, str(n)] + [str(counts.get(o, 0)) for o in OUTCOMES])
    lines.append(["all", str(sum(total.values()))] + [str(total.get(o, 0)) for o in OUTCOMES])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in lines[1:]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=CLASSES, help="run one class (repeatable)")
    ap.add_argument("--json", help="write every case's outcome to this file")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case's outcome")
    a = ap.parse_args(argv)
    res = run(a.only, a.verbose)
    print(format_table(res["table"]))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    bad = sum(r["outcome"] in BAD for r in res["rows"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
