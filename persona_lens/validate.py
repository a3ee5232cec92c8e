"""Checks for what callers hand the public API, and the one place secrets leave URLs.

Every public entry point checks its numeric, typed and file arguments here before any work
starts, so a bad value ends in one error that names the argument, the value and what is
allowed, never in an error from deep inside torch, sqlite or a tokenizer (or, worse, in a
result computed from a value that means nothing: a NaN threshold, a string iterated
character by character).

Errors:

- :class:`InvalidArgument` (a ``ValueError``): a value out of range or not allowed.
- :class:`InvalidArgumentType` (a ``TypeError`` and an ``InvalidArgument``): a value of the
  wrong type. ``except ValueError`` catches both.
- :class:`ContextLengthError` / :class:`ContextLengthWarning`: input longer than the model's
  context (``PersonaProbe(..., on_context_overflow="warn" | "error")``).
- :class:`NumericalError` (a ``ValueError``): a model produced NaN or inf (activations that
  overflowed under a huge steering coefficient, say) where a number was needed.

The helpers are marked ``no_type_check``: they take anything by design, and the test run's
runtime type checker (jaxtyping + beartype) would only add its cost to every checked value.

Secrets: :func:`redact_url` strips credentials (``user:password@``) and secret-looking query
parameters from a URL; :func:`redact` does it to every URL inside a text. Every URL that is
stored or printed goes through one of them.

Example:
    >>> from persona_lens import validate as V
    >>> V.number("temperature", 0.7, min=0)
    0.7
    >>> V.number("temperature", float("nan"), min=0)
    Traceback (most recent call last):
    ...
    persona_lens.validate.InvalidArgument: temperature must be a finite number >= 0, got nan (float)
    >>> V.redact_url("http://bob:s3cret@example.org/v1?api_key=abc&x=1")
    'http://example.org/v1?api_key=REDACTED&x=1'
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar, no_type_check
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

T = TypeVar("T")

__all__ = [
    "InvalidArgument", "InvalidArgumentType", "ContextLengthError", "ContextLengthWarning",
    "NumericalError", "show", "number", "integer", "is_integer", "boolean", "optional_boolean", "text", "choice",
    "path", "items", "pairs", "mapping", "redact_url", "redact",
]


# ----------------------------------------------------------------------------- errors


class InvalidArgument(ValueError):
    """An argument's value is not allowed.

    Attributes:
        argument: the argument's name as the caller wrote it (``"temperature"``,
            ``"layers[2]"``, ``"thresholds.pos_trait"``).
        value: the value given.
        allowed: what is allowed, in words.
    """

    def __init__(self, argument: str, value: Any, allowed: str, hint: str = "", *, message: str | None = None):
        self.argument, self.value, self.allowed = argument, value, allowed
        super().__init__(message or f"{argument} must be {allowed}, got {show(value)}{hint}")

    @classmethod
    def unknown(cls, argument: str, value: Any, known: Iterable[str], what: str = "argument") -> "InvalidArgument":
        """An argument (or a key) of a name nobody takes, and the names that are taken.

        Example:
            >>> str(InvalidArgument.unknown("temprature", 1.0, ["temperature", "top_p"], "generation setting"))
            "unknown generation setting 'temprature' (= 1.0 (float)); the generation settings are temperature, top_p"
        """
        known = sorted(known)
        return cls(argument, value, f"one of {', '.join(known)}",
                   message=f"unknown {what} {argument!r} (= {show(value)}); the {what}s are {', '.join(known)}")


class InvalidArgumentType(InvalidArgument, TypeError):
    """An argument has the wrong type (also a ``TypeError``)."""


class ContextLengthError(ValueError):
    """An input is longer than the model's context (``on_context_overflow="error"``)."""


class ContextLengthWarning(UserWarning):
    """An input is longer than the model's context (``on_context_overflow="warn"``): the
    model runs, but positions past its context are out of what it was trained on."""


class NumericalError(ValueError):
    """A model produced NaN or inf where a number was needed (the activations overflowed)."""


@no_type_check
def show(value: Any, width: int = 80) -> str:
    """A value as an error message shows it: its repr (cut to ``width``) and its type.

    Example:
        >>> show("2.0"), show(float("inf"))
        ("'2.0' (str)", 'inf (float)')
    """
    try:
        r = " ".join(repr(value).split())  # one line, whatever the repr
    except Exception:  # a repr that raises must not hide the real error
        r = f"<{type(value).__name__}>"
    if len(r) > width:
        r = r[: width - 3] + "..."
    return f"{r} ({type(value).__name__})"


# ----------------------------------------------------------------------------- numbers


@no_type_check
def _range_words(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    def fmt(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {fmt(lo)}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {fmt(hi)}")
    return " and ".join(parts)


@no_type_check
def _as_real(value: Any) -> float | None:
    """``value`` as a float if it is a real number (numpy and one-element tensors too)."""
    if isinstance(value, bool) or (type(value).__name__ == "bool_"):
        return None
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except (OverflowError, ValueError):  # an int too large for a float
            return math.inf if value > 0 else -math.inf
    # 0-d (or one-element) torch tensors and numpy arrays of a real dtype.
    if hasattr(value, "dtype") and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        dtype = str(value.dtype)
        if "bool" in dtype or "complex" in dtype:
            return None
        return _as_real(value.item())
    return None


@no_type_check
def number(
    name: str,
    value: Any,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    none_ok: bool = False,
) -> float | None:
    """``value`` as a finite float within the bounds, or an error naming ``name``.

    Booleans, strings and NaN/inf are refused (a string is never parsed: ``"2"`` is a type
    error, not a 2).

    Example:
        >>> number("top_p", 1, min=0, max=1, min_open=True)
        1.0
    """
    if value is None and none_ok:
        return None
    allowed = "a finite number" + (f" {_range_words(min, max, min_open, max_open)}" if (min, max) != (None, None) else "")
    if none_ok:
        allowed += " (or None)"
    x = _as_real(value)
    if x is None:
        raise InvalidArgumentType(name, value, allowed)
    if not math.isfinite(x):
        raise InvalidArgument(name, value, allowed)
    if min is not None and (x < min or (min_open and x == min)):
        raise InvalidArgument(name, value, allowed)
    if max is not None and (x > max or (max_open and x == max)):
        raise InvalidArgument(name, value, allowed)
    return x


@no_type_check
def integer(
    name: str,
    value: Any,
    *,
    min: int | None = None,
    max: int | None = None,
    none_ok: bool = False,
) -> int | None:
    """``value`` as an int within the bounds, or an error naming ``name``.

    Floats are refused even when whole (``3.0``): a count given as a float is usually a
    computed value that went wrong. numpy integers and 0-d integer tensors are accepted.

    Example:
        >>> integer("max_new_tokens", 16, min=1)
        16
    """
    if value is None and none_ok:
        return None
    allowed = "an integer" + (f" {_range_words(min, max, False, False)}" if (min, max) != (None, None) else "")
    if none_ok:
        allowed += " (or None)"
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise InvalidArgumentType(name, value, allowed)
    if hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0 and hasattr(value, "item"):
        if not any(k in str(value.dtype) for k in ("int", "uint")):
            raise InvalidArgumentType(name, value, allowed)
        value = value.item()
    try:
        i = operator.index(value)
    except TypeError:
        raise InvalidArgumentType(name, value, allowed) from None
    if (min is not None and i < min) or (max is not None and i > max):
        raise InvalidArgument(name, value, allowed)
    return i


def is_integer(value: Any) -> bool:
    """Whether :func:`integer` takes ``value`` (an int, a numpy int, a 0-d integer tensor).

    Example:
        >>> is_integer(3), is_integer(3.0), is_integer([3])
        (True, False, False)
    """
    try:
        integer("value", value)
        return True
    except ValueError:
        return False


@no_type_check
def boolean(name: str, value: Any) -> bool:
    """``value`` if it is a bool (numpy bools too), else an error naming ``name``.

    Example:
        >>> boolean("use_cache", True)
        True
    """
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise InvalidArgumentType(name, value, "True or False")


@no_type_check
def optional_boolean(name: str, value: Any) -> bool | None:
    """A bool or None (``progress``-style arguments)."""
    if value is None:
        return None
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise InvalidArgumentType(name, value, "True, False or None")


# ----------------------------------------------------------------------------- other values


@no_type_check
def text(name: str, value: Any, *, empty_ok: bool = True, none_ok: bool = False) -> str | None:
    """``value`` if it is a str (non-empty unless ``empty_ok``), else an error naming ``name``."""
    if value is None and none_ok:
        return None
    allowed = ("a string" if empty_ok else "a non-empty string") + (" (or None)" if none_ok else "")
    if not isinstance(value, str):
        raise InvalidArgumentType(name, value, allowed)
    if not empty_ok and not value.strip():
        raise InvalidArgument(name, value, allowed)
    return value


@no_type_check
def choice(name: str, value: Any, options: Sequence[T]) -> T:
    """``value`` if it is one of ``options``, else an error naming ``name`` and the options."""
    for o in options:
        if type(value) is type(o) and value == o:
            return value
    allowed = "one of " + ", ".join(repr(o) for o in options)
    known_type = any(isinstance(value, type(o)) for o in options)
    raise (InvalidArgument if known_type else InvalidArgumentType)(name, value, allowed)


@no_type_check
def path(name: str, value: Any, *, none_ok: bool = False) -> Path | None:
    """``value`` as a ``Path`` if it is a str or ``os.PathLike`` (not empty)."""
    if value is None and none_ok:
        return None
    allowed = "a path (str or os.PathLike)" + (" or None" if none_ok else "")
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, (str, os.PathLike)):
        raise InvalidArgumentType(name, value, allowed)
    p = os.fspath(value)
    if isinstance(p, bytes) or not p.strip():
        raise InvalidArgument(name, value, "a non-empty path")
    return Path(p)


@no_type_check
def items(name: str, value: Any, *, what: str = "a list", nonempty: bool = False) -> list:
    """``value`` as a list, if it is a list-like collection (any iterable but a string, bytes
    or a mapping: a bare string would otherwise be taken one character at a time).

    Example:
        >>> items("prompts", ("a", "b"))
        ['a', 'b']
        >>> items("prompts", "Hi!")
        Traceback (most recent call last):
        ...
        persona_lens.validate.InvalidArgumentType: prompts must be a list, got 'Hi!' (str); wrap one item in a list: ['Hi!']
    """
    if isinstance(value, (str, bytes, bytearray)):
        raise InvalidArgumentType(name, value, what, f"; wrap one item in a list: [{value!r:.60}]")
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise InvalidArgumentType(name, value, what)
    out = list(value)
    if nonempty and not out:
        raise InvalidArgument(name, value, f"{what} with at least one item")
    return out


def shard(name: str, value: Any, *, none_ok: bool = False) -> tuple[int, int] | None:
    """``value`` as a shard ``(i, n)``: part ``i`` of ``n``, ``0 <= i < n``.

    Example:
        >>> shard("shard", [1, 4])
        (1, 4)
        >>> shard("shard", (4, 4))
        Traceback (most recent call last):
        ...
        persona_lens.validate.InvalidArgument: shard[0] must be an integer >= 0 and <= 3, got 4 (int)
    """
    if value is None and none_ok:
        return None
    what = "a pair (i, n) with 0 <= i < n" + (" (or None)" if none_ok else "")
    pair = items(name, value, what=what)
    if len(pair) != 2:
        raise InvalidArgument(name, value, what)
    n = integer(f"{name}[1]", pair[1], min=1)
    return integer(f"{name}[0]", pair[0], min=0, max=n - 1), n


@no_type_check
def pairs(name: str, value: Any) -> list[tuple[str, str]]:
    """``value`` as a list of ``(question, answer)`` string pairs.

    Example:
        >>> pairs("pairs", [("Hi?", "Hello.")])
        [('Hi?', 'Hello.')]
    """
    out = []
    for i, pair in enumerate(items(name, value, what="a list of (question, answer) pairs")):
        if isinstance(pair, (str, bytes, Mapping)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise InvalidArgumentType(f"pair {i} of {name}", pair, "a (question, answer) pair")
        q, a = pair
        if not isinstance(q, str) or not isinstance(a, str):
            raise InvalidArgumentType(f"pair {i} of {name}", pair, "a (question, answer) pair of two strings")
        out.append((q, a))
    return out


@no_type_check
def mapping(name: str, value: Any, *, what: str = "a mapping (dict)") -> Mapping:
    if not isinstance(value, Mapping):
        raise InvalidArgumentType(name, value, what)
    return value


# ----------------------------------------------------------------------------- secrets

#: Query parameters whose values are secrets wherever they appear in a URL.
_SECRET_PARAMS = re.compile(r"(key|token|secret|password|passwd|pwd|signature|sig|auth|credential)", re.I)
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>]+")


@no_type_check
def redact_url(url: str) -> str:
    """``url`` without credentials: no ``user:password@``, and the value of any query
    parameter named like a secret (``api_key``, ``token``, ``sig``, ...) replaced by
    ``REDACTED``. Anything that does not parse as a URL is returned unchanged.

    Example:
        >>> redact_url("https://user:KEY@host:8000/v1")
        'https://host:8000/v1'
    """
    s = str(url)
    try:
        parts = urlsplit(s)
    except ValueError:
        return re.sub(r"//[^/@\s]*@", "//", s)
    if not parts.scheme or not parts.netloc:
        return s
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAMS.search(k) for k, _ in pairs):
            query = urlencode([(k, "REDACTED" if _SECRET_PARAMS.search(k) else v) for k, v in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@no_type_check
def redact(message: str) -> str:
    """``message`` with every URL in it passed through :func:`redact_url`.

    Example:
        >>> redact("judge at http://bob:pw@localhost:8000/v1 failed")
        'judge at http://localhost:8000/v1 failed'
    """
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(message))
