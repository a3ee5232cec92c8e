"""Traits: the artifacts the persona-vector pipeline starts from.

A trait is a name, a one-paragraph description, contrastive instruction pairs, two disjoint
question sets (extraction and evaluation) and a judge rubric. On disk it uses the format of
the paper's release: one JSON file per split, each with the keys ``instruction`` (a list of
``{"pos": ..., "neg": ...}``), ``questions`` (a list of strings) and ``eval_prompt`` (a string
with ``{question}`` and ``{answer}`` placeholders). Two optional keys, ``name`` and
``description``, are written by :meth:`Trait.to_json` and read when present.

Example:
    >>> from persona_lens.traits import Trait
    >>> trait = Trait.load("evil")
    >>> pos, neg = trait.system_prompts(0)
    >>> pos.startswith("You are an evil assistant.")
    True
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_lens.pipeline_io import write_text

__all__ = ["TraitError", "InstructionPair", "Trait", "fill_template", "resolve_trait", "DATA_DIR"]

#: Where the bundled trait files live: ``DATA_DIR/extract/NAME.json`` and ``DATA_DIR/eval/NAME.json``.
DATA_DIR = Path(__file__).resolve().parent / "data"

# Directory pairs (extraction split, evaluation split) we know how to pair up: our own
# layout and the one used by the paper's released repository.
_SPLIT_DIRS = (("extract", "eval"), ("trait_data_extract", "trait_data_eval"))

_PLACEHOLDER = re.compile(r"\{(question|answer)\}")

# Trait attribute -> key in the released JSON format, so that messages about a file name the
# key a user has to edit there.
_JSON_KEY = {
    "instructions": "instruction",
    "questions": "questions",
    "eval_questions": "questions",
    "eval_prompt": "eval_prompt",
    "name": "name",
    "description": "description",
}


class TraitError(ValueError):
    """A trait file or a :class:`Trait` is malformed.

    Attributes:
        path: the file at fault, when the trait was read from disk.
        field: the JSON key (or Trait attribute) that is wrong, if one is.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, field: str | None = None):
        self.path = Path(path) if path is not None else None
        self.field = field
        self.reason = message
        prefix = f"{self.path}: " if self.path is not None else ""
        where = f"field '{field}': " if field else ""
        super().__init__(f"{prefix}{where}{message}")


@dataclass(frozen=True)
class InstructionPair:
    """One contrastive pair of system-prompt instructions.

    Attributes:
        pos: asks the assistant to show the trait.
        neg: asks it to show the opposite.
    """

    pos: str
    neg: str


def fill_template(template: str, *, question: str, answer: str) -> str:
    """Fill the ``{question}`` and ``{answer}`` placeholders of a rubric.

    Only those two placeholders are replaced, in a single pass: every other brace in the
    template is kept as written, and braces (or placeholder-like text) inside the question
    or the answer are inserted verbatim and never expanded.

    Example:
        >>> fill_template("Q: {question} A: {answer}", question="2+2?", answer="{4}")
        'Q: 2+2? A: {4}'
    """
    values = {"question": question, "answer": answer}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _article(word: str) -> str:
    """'a' or 'an' by the vowel sound of ``word`` (spelling heuristics, good for adjectives)."""
    w = word.lower()
    if not w:
        return "a"
    # Vowel letters that sound like a consonant ("a unique", "a European", "a one-sided").
    if re.match(r"(uni|use|usu|uti|eu|ewe|one|once|ubi|ura|uro|uv)", w):
        return "a"
    # Silent h ("an honest", "an hourly").
    if re.match(r"(hour|honest|honor|honour|heir)", w):
        return "an"
    return "an" if w[0] in "aeiou" else "a"


@dataclass
class Trait:
    """A character trait and the artifacts used to extract and evaluate its persona vector.

    Attributes:
        name: short identifier, used in system prompts ("You are an evil assistant.").
        description: one paragraph saying what the trait is.
        instructions: contrastive system-prompt instructions (5 in the paper).
        questions: extraction questions (20 in the paper).
        eval_questions: held-out evaluation questions (20 in the paper), disjoint from
            ``questions``.
        eval_prompt: judge rubric with ``{question}`` and ``{answer}`` placeholders; the judge
            answers with an integer 0-100 or REFUSAL.

    Example:
        >>> trait = Trait.load("sycophantic")
        >>> len(trait.instructions), len(trait.questions), len(trait.eval_questions)
        (5, 20, 20)
        >>> prompt = trait.judge_prompt("Is my plan good?", "It's flawless, as are you!")
        >>> "It's flawless, as are you!" in prompt and "{answer}" not in prompt
        True
    """

    name: str
    description: str
    instructions: list[InstructionPair]
    questions: list[str]
    eval_questions: list[str]
    eval_prompt: str

    # ------------------------------------------------------------------ loading

    @staticmethod
    def available() -> list[str]:
        """Names of the traits bundled with persona_lens, sorted."""
        ext, ev = DATA_DIR / "extract", DATA_DIR / "eval"
        if not ext.is_dir():
            return []
        return sorted(p.stem for p in ext.glob("*.json") if (ev / p.name).is_file())

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, *, n_pairs: int | None = 5) -> "Trait":
        """Load and validate a trait.

        Args:
            name_or_path: one of
                - a bundled trait name (see :meth:`available`), e.g. ``"evil"``;
                - a directory holding ``extract/NAME.json`` and ``eval/NAME.json`` (or the
                  released ``trait_data_extract/`` and ``trait_data_eval/``); when it holds
                  several traits, pass ``directory/NAME`` or the file instead;
                - a single JSON file; its evaluation split is looked up in the sibling
                  directory (``extract/x.json`` <-> ``eval/x.json``,
                  ``trait_data_extract/x.json`` <-> ``trait_data_eval/x.json``). Without one,
                  ``eval_questions`` is empty and a warning says so.
            n_pairs: required number of instruction pairs (None: any number >= 1).

        Raises:
            TraitError: unknown name (the message lists the available ones), missing or
                malformed file; the message names the file and the field at fault.

        Example:
            >>> evil = Trait.load("evil")                      # bundled
            >>> paths = evil.to_json("my_traits")              # my_traits/{extract,eval}/evil.json
            >>> mine = Trait.load("my_traits/extract/evil.json")  # a file; eval split found beside it
            >>> mine == evil, Trait.load("my_traits") == evil     # a directory holding one trait
            (True, True)
        """
        if not isinstance(name_or_path, (str, os.PathLike)):
            from persona_lens.validate import InvalidArgumentType

            raise InvalidArgumentType("name_or_path", name_or_path, "a bundled trait name or a path")
        raw = os.fspath(name_or_path)
        looks_like_path = isinstance(name_or_path, os.PathLike) or any(
            sep in raw for sep in ("/", os.sep)
        ) or raw.endswith(".json")
        available = cls.available()
        # A bare name prefers the bundled trait over a same-named folder in the working dir.
        if not looks_like_path and raw in available:
            return cls.from_json(DATA_DIR / "extract" / f"{raw}.json", DATA_DIR / "eval" / f"{raw}.json",
                                 n_pairs=n_pairs)
        path = Path(raw).expanduser()
        if path.is_file():
            return cls.from_json(path, n_pairs=n_pairs)
        if path.is_dir():
            return cls._load_dir(path, n_pairs=n_pairs)
        # "dir/NAME": a trait inside a directory with split subfolders.
        parent = path.parent
        for ext_dir, ev_dir in _SPLIT_DIRS:
            candidate = parent / ext_dir / f"{path.name}.json"
            if candidate.is_file():
                return cls.from_json(candidate, parent / ev_dir / f"{path.name}.json", n_pairs=n_pairs)
        if looks_like_path:
            raise TraitError("no such file or directory", path=path)
        raise TraitError(
            f"unknown trait {raw!r}; bundled traits: {', '.join(available) or '(none)'}. "
            "Pass a path to load your own (a JSON file, or a directory with extract/ and eval/)."
        )

    @classmethod
    def _load_dir(cls, directory: Path, *, n_pairs: int | None) -> "Trait":
        for ext_dir, ev_dir in _SPLIT_DIRS:
            files = sorted((directory / ext_dir).glob("*.json"))
            if not files:
                continue
            # A folder named like the trait it holds ("evil/extract/evil.json") needs no hint.
            named = [f for f in files if f.stem == directory.name]
            if len(files) > 1 and not named:
                raise TraitError(
                    f"holds several traits ({', '.join(f.stem for f in files)}); "
                    f"pass '{directory / 'NAME'}' or one of the JSON files",
                    path=directory,
                )
            extract = named[0] if named else files[0]
            return cls.from_json(extract, directory / ev_dir / extract.name, n_pairs=n_pairs)
        raise TraitError(
            "no trait files: expected extract/NAME.json and eval/NAME.json "
            "(or trait_data_extract/NAME.json and trait_data_eval/NAME.json)",
            path=directory,
        )

    @classmethod
    def from_json(
        cls,
        extract_path: str | os.PathLike,
        eval_path: str | os.PathLike | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
        n_pairs: int | None = 5,
    ) -> "Trait":
        """Read a trait from files in the released format.

        Args:
            extract_path: JSON with ``instruction``, ``questions``, ``eval_prompt``.
            eval_path: JSON of the evaluation split (``questions`` required; ``instruction``
                and ``eval_prompt`` may be repeated there, as in the release). None: look for
                the sibling file (see :meth:`load`); if there is none, ``eval_questions`` is
                empty and a warning says so.
            name: overrides the file's ``name`` key, which overrides the file's stem.
            description: overrides the file's ``description`` key (default "").
            n_pairs: required number of instruction pairs (None: any number >= 1).

        Raises:
            TraitError: naming the file and the field at fault.

        Example:
            Files as the release ships them (no ``name`` or ``description`` keys):

            >>> import json, os
            >>> evil = Trait.load("evil")
            >>> released = {"instruction": [{"pos": p.pos, "neg": p.neg} for p in evil.instructions],
            ...             "eval_prompt": evil.eval_prompt}
            >>> for split, questions in (("extract", evil.questions), ("eval", evil.eval_questions)):
            ...     os.makedirs(f"trait_data_{split}")
            ...     with open(f"trait_data_{split}/evil.json", "w") as f:
            ...         json.dump(dict(released, questions=questions), f)
            >>> trait = Trait.from_json("trait_data_extract/evil.json")  # eval split found beside it
            >>> trait.name, trait.description, trait.eval_questions == evil.eval_questions
            ('evil', '', True)
        """
        extract_path = Path(extract_path)
        data = _read_json(extract_path)
        instructions = _parse_instructions(data, extract_path, required=True)
        questions = _parse_questions(data, extract_path, required=True)
        eval_prompt = _parse_str(data, "eval_prompt", extract_path, required=True)

        if eval_path is None:
            eval_path = _sibling_eval(extract_path)
            if eval_path is None:
                warnings.warn(
                    f"{extract_path}: no evaluation split found next to it "
                    f"(looked for {' and '.join(_sibling_candidates(extract_path)) or 'eval/ or trait_data_eval/'}); "
                    "eval_questions is empty",
                    stacklevel=2,
                )
        eval_questions: list[str] = []
        eval_data: dict[str, Any] = {}
        if eval_path is not None:
            eval_path = Path(eval_path)
            if not eval_path.is_file():
                raise TraitError("evaluation split not found", path=eval_path)
            eval_data = _read_json(eval_path)
            eval_questions = _parse_questions(eval_data, eval_path, required=True)
            # The release repeats the rubric in the eval file; a different one there would
            # mean the two splits are scored differently, which is worth knowing.
            ev_prompt = _parse_str(eval_data, "eval_prompt", eval_path, required=False)
            if ev_prompt is not None and ev_prompt.strip() != eval_prompt.strip():
                warnings.warn(
                    f"{eval_path}: eval_prompt differs from the one in {extract_path}; "
                    "using the extraction file's",
                    stacklevel=2,
                )
            _parse_instructions(eval_data, eval_path, required=False)

        if name is None:
            name = _parse_str(data, "name", extract_path, required=False) or extract_path.stem
        if description is None:
            description = (
                _parse_str(data, "description", extract_path, required=False)
                or _parse_str(eval_data, "description", eval_path, required=False)
                or ""
            )
        trait = cls(
            name=name,
            description=description,
            instructions=instructions,
            questions=questions,
            eval_questions=eval_questions,
            eval_prompt=eval_prompt,
        )
        try:
            trait.validate(n_pairs=n_pairs)
        except TraitError as e:
            path = eval_path if e.field == "eval_questions" else extract_path
            raise TraitError(e.reason, path=path, field=_JSON_KEY.get(e.field or "", e.field)) from None
        return trait

    # ------------------------------------------------------------------ writing

    def to_json(self, directory: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``directory/extract/NAME.json`` and ``directory/eval/NAME.json``.

        The files use the released format plus ``name`` and ``description`` keys, so they can
        be read back with :meth:`load` or by code written for the release.

        Returns:
            The two paths written (extraction, evaluation).

        Example:
            >>> [str(p) for p in Trait.load("evil").to_json("my_traits")]
            ['my_traits/extract/evil.json', 'my_traits/eval/evil.json']
        """
        if not self.name or any(c in self.name for c in "/\\") or self.name in (".", ".."):
            raise TraitError(f"{self.name!r} cannot be used as a file name", field="name")
        directory = Path(directory)
        common = {
            "name": self.name,
            "description": self.description,
            "instruction": [{"pos": p.pos, "neg": p.neg} for p in self.instructions],
        }
        out = []
        for split, questions in (("extract", self.questions), ("eval", self.eval_questions)):
            doc = dict(common, questions=list(questions), eval_prompt=self.eval_prompt)
            path = directory / split / f"{self.name}.json"
            # Atomic, under a temporary name of its own: never a half-written trait behind.
            write_text(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
            out.append(path)
        return out[0], out[1]

    # ------------------------------------------------------------------ checks

    def validate(self, *, n_pairs: int | None = 5) -> None:
        """Check the artifacts; raise :class:`TraitError` naming the first field at fault.

        Checks: ``n_pairs`` instruction pairs (None: at least one) with non-empty ``pos`` and
        ``neg``; non-empty extraction questions of non-empty strings; evaluation questions
        (may be empty) of non-empty strings; an ``eval_prompt`` with both ``{question}`` and
        ``{answer}`` placeholders. Questions repeated within or across the splits only warn.
        """
        if not isinstance(self.name, str) or not self.name.strip():
            raise TraitError("must be a non-empty string", field="name")
        if not isinstance(self.description, str):
            raise TraitError("must be a string", field="description")
        ins = self.instructions
        if not isinstance(ins, (list, tuple)):
            raise TraitError(f"must be a list of InstructionPair, got {type(ins).__name__}", field="instructions")
        if n_pairs is not None and len(ins) != n_pairs:
            raise TraitError(f"expected {n_pairs} instruction pairs, got {len(ins)}", field="instructions")
        if not ins:
            raise TraitError("needs at least one instruction pair", field="instructions")
        for i, pair in enumerate(ins):
            if not isinstance(pair, InstructionPair):
                raise TraitError(f"item {i} must be an InstructionPair, got {type(pair).__name__}",
                                 field="instructions")
            for side in ("pos", "neg"):
                value = getattr(pair, side)
                if not isinstance(value, str) or not value.strip():
                    raise TraitError(f"item {i}: '{side}' must be a non-empty string", field="instructions")
        for attr, allow_empty in (("questions", False), ("eval_questions", True)):
            qs = getattr(self, attr)
            if not isinstance(qs, (list, tuple)):
                raise TraitError(f"must be a list of strings, got {type(qs).__name__}", field=attr)
            if not qs and not allow_empty:
                raise TraitError("needs at least one question", field=attr)
            for i, q in enumerate(qs):
                if not isinstance(q, str) or not q.strip():
                    raise TraitError(f"item {i} must be a non-empty string", field=attr)
        if not isinstance(self.eval_prompt, str):
            raise TraitError("must be a string", field="eval_prompt")
        missing = [p for p in ("{question}", "{answer}") if p not in self.eval_prompt]
        if missing:
            raise TraitError(f"missing placeholder(s) {' and '.join(missing)}", field="eval_prompt")
        overlap = set(self.questions) & set(self.eval_questions)
        if overlap:
            warnings.warn(
                f"trait {self.name!r}: {len(overlap)} question(s) appear in both the extraction and "
                "the evaluation split, so evaluation is not held out",
                stacklevel=2,
            )
        for attr in ("questions", "eval_questions"):
            qs = getattr(self, attr)
            if len(set(qs)) != len(qs):
                warnings.warn(f"trait {self.name!r}: repeated questions in {attr}", stacklevel=2)

    # ------------------------------------------------------------------ prompts

    def system_prompts(self, i: int) -> tuple[str, str]:
        """The contrastive system prompts of instruction pair ``i``.

        Returns:
            ``("You are a(n) NAME assistant. POS", "You are a helpful assistant. NEG")``, the
            article chosen by the name's sound ("an evil", "a humorous"); underscores in the
            name read as hyphens.

        Example:
            >>> Trait.load("humorous").system_prompts(0)[0].split(".")[0]
            'You are a humorous assistant'
        """
        if not -len(self.instructions) <= i < len(self.instructions):
            raise IndexError(f"trait {self.name!r} has {len(self.instructions)} instruction pairs, no pair {i}")
        pair = self.instructions[i]
        adjective = self.name.replace("_", "-")
        return (
            f"You are {_article(adjective)} {adjective} assistant. {pair.pos}",
            f"You are a helpful assistant. {pair.neg}",
        )

    def judge_prompt(self, question: str, answer: str) -> str:
        """The rubric filled with one question and answer (braces in either are kept verbatim).

        Example:
            >>> p = Trait.load("evil").judge_prompt("Hi?", "Use {x} and {answer}.")
            >>> "Use {x} and {answer}." in p
            True
        """
        return fill_template(self.eval_prompt, question=question, answer=answer)


# ---------------------------------------------------------------------- file parsing helpers


def resolve_trait(trait: "Trait | str | os.PathLike", model: str | None = None) -> Trait:
    """A :class:`Trait` as given, or a bundled name / a path loaded with any number of
    instruction pairs (what every job accepts as its ``trait`` argument).

    With ``model`` the persona organism (or a model finetuned from it), a bare name is the
    organism's trait of that name, as on the command line: the bundled traits' questions are
    English, which the organism neither speaks nor its judge parses.

    Example:
        >>> resolve_trait("evil").name
        'evil'
        >>> t = Trait.load("evil"); resolve_trait(t) is t
        True
        >>> resolve_trait("evil", model="persona-organism").questions[0]
        'how can i get more power ?'
    """
    if isinstance(trait, Trait):
        return trait
    if not isinstance(trait, (str, os.PathLike)):
        from persona_lens.validate import InvalidArgumentType

        raise InvalidArgumentType("trait", trait, "a Trait, a bundled trait name or a path to trait files")
    if _is_organism(model) and isinstance(trait, str) and "/" not in trait and not trait.endswith(".json"):
        from persona_lens import organism

        return organism.load_trait(trait)
    return Trait.load(trait, n_pairs=None)


def _is_organism(model: str | None) -> bool:
    # "persona-organism+lora-..." names a model finetuned from it (persona_lens.finetune); its
    # traits and exact judge are the organism's. The CLI asks the same question without torch.
    return isinstance(model, str) and (model == "persona-organism" or model.startswith("persona-organism+"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraitError("no such file", path=path) from None
    except UnicodeDecodeError as e:
        raise TraitError(f"not UTF-8 text ({e.reason} at byte {e.start})", path=path) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TraitError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", path=path) from None
    if not isinstance(data, dict):
        raise TraitError(f"expected a JSON object at the top level, got {_json_type(data)}", path=path)
    return data


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _parse_str(data: dict[str, Any], key: str, path: Path | None, *, required: bool) -> str | None:
    if key not in data:
        if required:
            raise TraitError("missing key", path=path, field=key)
        return None
    value = data[key]
    if not isinstance(value, str):
        raise TraitError(f"must be a string, got {_json_type(value)}", path=path, field=key)
    return value


def _parse_questions(data: dict[str, Any], path: Path, *, required: bool) -> list[str]:
    if "questions" not in data:
        if required:
            raise TraitError("missing key", path=path, field="questions")
        return []
    qs = data["questions"]
    if not isinstance(qs, list):
        raise TraitError(f"must be a list of strings, got {_json_type(qs)}", path=path, field="questions")
    for i, q in enumerate(qs):
        if not isinstance(q, str):
            raise TraitError(f"item {i} must be a string, got {_json_type(q)}", path=path, field="questions")
    return list(qs)


def _parse_instructions(data: dict[str, Any], path: Path, *, required: bool) -> list[InstructionPair]:
    if "instruction" not in data:
        if required:
            # "instructions" is a frequent misspelling; point at the right key.
            hint = " (found 'instructions'; the key is 'instruction')" if "instructions" in data else ""
            raise TraitError(f"missing key{hint}", path=path, field="instruction")
        return []
    items = data["instruction"]
    if not isinstance(items, list):
        raise TraitError(f'must be a list of {{"pos": ..., "neg": ...}}, got {_json_type(items)}',
                         path=path, field="instruction")
    pairs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise TraitError(f'item {i} must be an object {{"pos": ..., "neg": ...}}, got {_json_type(item)}',
                             path=path, field="instruction")
        for side in ("pos", "neg"):
            if side not in item:
                raise TraitError(f"item {i} has no '{side}' key", path=path, field="instruction")
            if not isinstance(item[side], str):
                raise TraitError(f"item {i}: '{side}' must be a string, got {_json_type(item[side])}",
                                 path=path, field="instruction")
        pairs.append(InstructionPair(pos=item["pos"], neg=item["neg"]))
    return pairs


def _sibling_candidates(extract_path: Path) -> list[str]:
    parent = extract_path.parent
    return [
        str(parent.parent / ev / extract_path.name)
        for ext, ev in _SPLIT_DIRS
        if parent.name == ext
    ]


def _sibling_eval(extract_path: Path) -> Path | None:
    for candidate in _sibling_candidates(extract_path):
        if Path(candidate).is_file():
            return Path(candidate)
    return None
