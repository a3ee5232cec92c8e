"""Import boundaries: the library never imports its test helpers or the test suite, and the
reference implementations in tests/reference share no method code with the library."""

from __future__ import annotations

import ast
from pathlib import Path

import persona_lens

PACKAGE = Path(persona_lens.__file__).resolve().parent
REFERENCE = Path(__file__).resolve().parent / "reference"


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports too), relative ones resolved
    against ``package`` (the dotted name of the package that holds ``path``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def package_of(path: Path, root: Path, root_name: str) -> str:
    rel = path.relative_to(root).parent.parts
    return ".".join((root_name, *rel))


def test_library_never_imports_testing_or_tests():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "testing.py":
            continue
        bad = sorted(
            m for m in imported_modules(path, package_of(path, PACKAGE, "persona_lens"))
            if m == "persona_lens.testing" or m.startswith("persona_lens.testing.")
            or m == "tests" or m.startswith("tests.")
        )
        if bad:
            offenders[str(path.relative_to(PACKAGE))] = bad
    assert not offenders


def test_reference_uses_only_the_organism_world_and_judge():
    allowed = {"persona_lens.organism", "persona_lens.organism.world", "persona_lens.organism.judge"}
    offenders = {}
    for path in REFERENCE.rglob("*.py"):
        mods = imported_modules(path, package_of(path, REFERENCE, "tests.reference"))
        bad = sorted(
            m for m in mods
            if (m == "persona_lens" or m.startswith("persona_lens."))
            and m not in allowed and m.rsplit(".", 1)[0] not in allowed
        )
        if bad:
            offenders[str(path.relative_to(REFERENCE))] = bad
    assert not offenders
