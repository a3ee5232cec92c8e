"""The README's and the docs' examples against the library as it is.

* The README quickstart runs as written on the offline SmolLM2, every output its comments show
  is the output it gives, and it shows the effects its text claims (the steered answer in the
  persona's dialect, the persona's system prompt read higher before the answer).
* Every Python example in README.md and docs/ names modules, functions, methods, attributes and
  keyword arguments that exist (most of them need a GPU or an API key to run).
* Every command line in README.md and docs/ parses with its command's own parser.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import re
import shlex
import types
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced_blocks(path: Path, langs: tuple[str, ...]) -> list[tuple[int, str]]:
    """(first line number, text) of each fenced block in one of ``langs``."""
    out, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            if m.group(1) in langs:
                out.append((i + 2, "\n".join(lines[i + 1:j])))
            i = j + 1
        else:
            i += 1
    return out


# ---------------------------------------------------------------------------------------
# The README quickstart, run
# ---------------------------------------------------------------------------------------

#: Words of the pirate dialect the README's vector is made of (and of the steered answers).
PIRATE = re.compile(r"\b(?:arr|matey|ahoy|aye|ye|ye'll|ye're|ain't|scallywag|timbers)\b", re.I)


def quickstart() -> tuple[int, str]:
    text = (ROOT / "README.md").read_text()
    line = text[: text.index("## Quickstart")].count("\n") + 1
    return next((n, b) for n, b in fenced_blocks(ROOT / "README.md", ("python",)) if n > line)


def shown_output(lines: list[str], end: int) -> str | None:
    """The ``# output`` comment right under a statement that ends on line ``end`` (1-based)."""
    if end < len(lines):
        m = re.match(r"^# ([\[('\"{]|tensor\().*$", lines[end])
        if m:
            return lines[end][2:]
    return None


@pytest.mark.smollm
def test_readme_quickstart_runs_as_written_and_shows_its_effects(tmp_path, monkeypatch):
    import plotly.graph_objects as go
    import torch

    start, code = quickstart()
    shown: list[go.Figure] = []
    monkeypatch.setattr(go.Figure, "show", lambda self, *a, **k: shown.append(self))
    monkeypatch.chdir(tmp_path)

    lines = code.splitlines()
    checker, flags = doctest.OutputChecker(), doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    ns: dict = {}
    values: list[tuple[str, object]] = []
    compared = 0
    for stmt in ast.parse(code).body:
        src = ast.get_source_segment(code, stmt)
        where = f"README.md line {start + stmt.lineno - 1}"
        if isinstance(stmt, ast.Expr):
            value = eval(compile(ast.Expression(stmt.value), where, "eval"), ns)
            values.append((src, value))
            want = shown_output(lines, stmt.end_lineno)
            if want is not None:
                got = repr(value)
                assert checker.check_output(want + "\n", got + "\n", flags), f"{where}: {src}\n shows {want}\n gives {got}"
                compared += 1
        else:
            exec(compile(ast.Module([stmt], []), where, "exec"), ns)
    assert compared >= 4, "the quickstart's output comments were not found"

    # Steering moves the answer into the persona's dialect; the same question unsteered has none of it.
    unsteered = next(v for s, v in values if s.startswith('probe.generate(["Tell me about the sea."]'))
    assert not PIRATE.search(unsteered[0]), unsteered
    assert len(PIRATE.findall(ns["steered"][0])) >= 2, ns["steered"]
    # The persona's system prompt reads higher on the vector before any answer, by a margin.
    proj = next(v for s, v in values if s.startswith("probe.project(asked"))
    assert proj.shape == (2,) and float(proj[0]) > 1.5 * float(proj[1]) > 0, proj
    # What the quickstart saves is the vector it built, and the plot is the readings' curve.
    import persona_lens as pl

    saved = pl.PersonaVector.load(tmp_path / "pirate.safetensors")
    assert torch.equal(saved.directions, ns["vec"].directions) and saved.trait == "pirate"
    assert len(shown) == 1 and len(ns["readings"]) == 1
    # The notebook display of that reading covers SmolLM2's byte-level tokens, every one found.
    from persona_lens.display import token_pieces

    r = ns["readings"][0]
    pieces = token_pieces(r.response_tokens, r.text)
    assert "".join(p for p, found in pieces if found) == r.text, pieces
    assert r._repr_html_().count("<span title=") == len(r.response_tokens)


# ---------------------------------------------------------------------------------------
# Every Python example: the names it uses exist, the keywords it passes are accepted
# ---------------------------------------------------------------------------------------


class Instance:
    """An expression known to evaluate to an instance of one of ``classes``."""

    def __init__(self, *classes: type):
        self.classes = classes
        self.name = " | ".join(c.__name__ for c in classes)

    def has(self, name: str) -> bool:
        return any(_has_attr(c, name) for c in self.classes)

    def member(self, name: str):
        for c in self.classes:
            if hasattr(c, name):
                return c, inspect.getattr_static(c, name)
        return None, None


class _LibraryNames(dict):
    """Names a postponed annotation may use: its module's, then the package's (lazy) exports."""

    def __missing__(self, name):
        import persona_lens

        try:
            return getattr(persona_lens, name)
        except AttributeError:
            raise KeyError(name) from None


def _return_type(obj) -> Instance | None:
    if inspect.isclass(obj):
        return Instance(obj)
    fn = obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)
    hint = getattr(fn, "__annotations__", {}).get("return")
    for _ in range(2):  # postponed annotations (twice: a quoted one under `from __future__`)
        if isinstance(hint, str):
            try:
                hint = eval(hint, {}, _LibraryNames(getattr(fn, "__globals__", {})))
            except Exception:  # a hint that does not resolve: the type stays unknown
                return None
    classes = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if classes and all(inspect.isclass(c) and c.__module__.startswith("persona_lens") for c in classes):
        return Instance(*classes)
    return None


def _has_attr(cls: type, name: str) -> bool:
    if hasattr(cls, name):
        return True
    for klass in cls.__mro__:
        if name in getattr(klass, "__annotations__", {}) or name in getattr(klass, "__dataclass_fields__", {}):
            return True
    return False


class ExampleChecker(ast.NodeVisitor):
    """Resolves ``pl.x.y(...)``, imported names and variables bound to the library's objects;
    anything else (third-party clients, literals) stays unknown and unchecked."""

    def __init__(self, where: str):
        self.where, self.env, self.problems = where, {}, []

    def problem(self, node: ast.AST, text: str) -> None:
        self.problems.append(f"{self.where} line +{node.lineno}: {text}")

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] == "persona_lens":
                self.env[a.asname or a.name.split(".")[0]] = importlib.import_module(a.name if a.asname else "persona_lens")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if not (node.module or "").startswith("persona_lens"):
            return
        mod = importlib.import_module(node.module)
        for a in node.names:
            if hasattr(mod, a.name):
                self.env[a.asname or a.name] = getattr(mod, a.name)
            else:
                try:
                    self.env[a.asname or a.name] = importlib.import_module(f"{node.module}.{a.name}")
                except ImportError:
                    self.problem(node, f"`from {node.module} import {a.name}`: no such name")

    def visit_Assign(self, node: ast.Assign) -> None:
        value = self.resolve(node.value)
        for t in node.targets:
            if isinstance(t, ast.Name):
                self.env[t.id] = value

    def visit_With(self, node: ast.With) -> None:
        for item in node.items:
            self.resolve(item.context_expr)
        for stmt in node.body:
            self.visit(stmt)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.env[node.name] = None

    def visit_Expr(self, node: ast.Expr) -> None:
        self.resolve(node.value)

    def generic_visit(self, node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.resolve(child)
            else:
                self.visit(child)

    def resolve(self, node: ast.expr):
        """The object (module, class, function) or :class:`Instance` an expression stands
        for, where the library defines it; None where unknown. Checks on the way."""
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            if isinstance(base, types.ModuleType):
                if not hasattr(base, node.attr):
                    try:
                        return importlib.import_module(f"{base.__name__}.{node.attr}")
                    except ImportError:
                        self.problem(node, f"`{base.__name__}` has no `{node.attr}`")
                        return None
                return getattr(base, node.attr)
            if isinstance(base, Instance):
                if not base.has(node.attr):
                    self.problem(node, f"`{base.name}` has no attribute `{node.attr}`")
                    return None
                cls, member = base.member(node.attr)
                if isinstance(member, property):
                    return _return_type(member)
                if inspect.isfunction(member):  # a method: bound to a stand-in for the instance
                    return types.MethodType(member, object())
                if isinstance(member, (staticmethod, classmethod)):
                    return getattr(cls, node.attr)
                return None
            if inspect.isclass(base):
                if not hasattr(base, node.attr):
                    self.problem(node, f"`{base.__name__}` has no `{node.attr}`")
                    return None
                return getattr(base, node.attr)
            return None
        if isinstance(node, ast.Call):
            func = self.resolve(node.func)
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                self.resolve(arg)
            if func is None or isinstance(func, (Instance, types.ModuleType)):
                return None
            self.check_call(node, func)
            return _return_type(func)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.resolve(child)
        return None

    def check_call(self, node: ast.Call, func) -> None:
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return
        try:
            sig = inspect.signature(func)
        except (TypeError, ValueError):
            return
        try:
            sig.bind(*[object()] * len(node.args), **{k.arg: object() for k in node.keywords})
        except TypeError as e:
            name = ast.unparse(node.func)
            self.problem(node, f"`{name}(...)` does not match `{getattr(func, '__qualname__', name)}{sig}`: {e}")


def python_examples() -> list[tuple[str, str]]:
    return [(f"{p.relative_to(ROOT)}:{n}", code) for p in DOCS for n, code in fenced_blocks(p, ("python",))]


EXAMPLES = python_examples()


@pytest.mark.parametrize("where,code", EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_python_example_uses_the_library_as_it_is(where, code):
    checker = ExampleChecker(where)
    # Examples in docs/ continue the page's earlier ones (`probe`, `vec`, ...): names they use
    # without defining are the library's usual objects.
    import persona_lens as pl

    checker.env.update(pl=pl, probe=Instance(pl.PersonaProbe), vec=Instance(pl.PersonaVector))
    checker.visit(ast.parse(code))
    assert not checker.problems, "\n".join(checker.problems)


def test_the_example_checker_catches_what_it_is_for():
    """The check above could pass by checking nothing: each kind of drift is caught here."""
    import persona_lens as pl

    bad = {
        "pl.no_such_function()": "has no `no_such_function`",
        "probe.generate(['q'], max_tokens=3)": "does not match",
        "v = pl.PersonaVector.load('x')\nv.no_such_method()": "has no attribute",
        "probe.steer(vec, layer=3, colour=1)": "does not match",
        "from persona_lens.judge import NoJudge": "no such name",
        "pl.PersonaVector.from_means(1, 2, 3, 4, 5, 6, 7)": "does not match",
    }
    for code, expect in bad.items():
        checker = ExampleChecker("t")
        checker.env.update(pl=pl, probe=Instance(pl.PersonaProbe), vec=Instance(pl.PersonaVector))
        checker.visit(ast.parse(code))
        assert any(expect in p for p in checker.problems), (code, checker.problems)
    good = ExampleChecker("t")
    good.env.update(pl=pl, probe=Instance(pl.PersonaProbe), vec=Instance(pl.PersonaVector))
    good.visit(ast.parse("with probe.steer(vec, layer=3, coef=1.0, positions='response'):\n"
                         "    texts = probe.generate(['q'], max_new_tokens=4)\nr = pl.extract\n"))
    assert good.problems == []


# ---------------------------------------------------------------------------------------
# Every command line parses
# ---------------------------------------------------------------------------------------


class _Parsed(Exception):
    pass


class _Refused(Exception):
    pass


def _words(line: str) -> list[str] | None:
    """A command line's words up to any shell plumbing; None unless it runs one of ours."""
    if not line.lstrip().startswith(("persona-lens", "python -m ")):
        return None
    words = shlex.split(line, comments=True)
    for stop in ("|", "&&", ";", ">", "2>&1"):
        if stop in words:
            words = words[: words.index(stop)]
    ours = words[:1] == ["persona-lens"] or (
        words[:2] == ["python", "-m"] and len(words) > 2 and words[2].startswith(("experiments.", "persona_lens")))
    return words if ours and len(words) > 1 else None


def command_lines() -> list[tuple[str, list[str], bool]]:
    """(where, words, whole) for each command of ours in the docs: the lines of shell blocks
    (continuations joined; ``whole``: they must parse as they are) and the inline code spans
    in the text (often a fragment: only their flags and values must parse)."""
    out = []
    for p in DOCS:
        name = p.relative_to(ROOT)
        for n, block in fenced_blocks(p, ("bash", "sh", "shell", "")):
            lines = block.splitlines()
            i = 0
            while i < len(lines):
                first, line = i, lines[i]
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1] + " " + lines[i]
                i += 1
                words = None if "..." in line else _words(line)
                if words:
                    out.append((f"{name}:{n + first}", words, True))
        for k, line in enumerate(p.read_text().splitlines()):
            for span in re.findall(r"`([^`]+)`", line):
                placeholder = re.search(r"\b[A-Z]{2,}\b|\.\.\.|\bi/N\b", span)  # RUN, COMMAND, i/N
                words = None if placeholder else _words(span)
                if words and any(w.startswith("--") for w in words):
                    out.append((f"{name}:{k + 1} `{span}`", words, False))
    return out


def parse_only(words: list[str], monkeypatch) -> None:
    """Parse a command line with its own parser, and stop before it runs; :class:`_Refused`
    with argparse's message where the parser refuses it."""
    import argparse

    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    def refuse(self, message):
        raise _Refused(message)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(argparse.ArgumentParser, "error", refuse)
    if words[0] == "persona-lens" or words[2] in ("persona_lens", "persona_lens.cli"):
        from persona_lens import cli

        monkeypatch.setattr(cli._Parser, "error", refuse)  # its own one-line usage errors
        argv, main = words[1 if words[0] == "persona-lens" else 3:], cli.main
    else:
        argv, main = words[3:], importlib.import_module(words[2]).main
    with pytest.raises(_Parsed):
        main(argv)


COMMANDS = command_lines()


@pytest.mark.parametrize("where,words,whole", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_command_in_the_docs_parses(where, words, whole, monkeypatch):
    try:
        parse_only(words, monkeypatch)
    except _Refused as e:
        # A span in the text may leave out what the command requires; nothing else.
        if whole or "arguments are required" not in str(e):
            raise AssertionError(f"{where}: {' '.join(words)}: {e}") from None


def test_commands_are_found_and_a_wrong_flag_is_refused():
    found = [w for _, w, _ in COMMANDS]
    assert ["persona-lens", "demo", "--out", "persona_demo"] in found
    assert any(w[:3] == ["python", "-m", "experiments.e7_screening"] for w in found)
    for bad in (["persona-lens", "demo", "--no-such-flag"], ["python", "-m", "experiments.e1_steering", "--config", "gpt5"]):
        with pytest.MonkeyPatch.context() as mp, pytest.raises(_Refused):
            parse_only(bad, mp)
