"""Small on-disk helpers for resumable pipelines: append-only JSONL logs and atomic writes.

A pipeline writes every finished unit of work (a generated response, a judge score) as one
JSON line, flushed and synced per batch, so a killed run loses at most the batch in flight.
A run started again reads the log back and skips what is already there. A line cut short by
a kill is ignored on reading, and the next append starts on a fresh line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A short, stable hex digest of JSON-serialisable parts (dict keys sorted).

    Example:
        >>> fingerprint("evil", {"b": 1, "a": 2}) == fingerprint("evil", {"a": 2, "b": 1})
        True
    """
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed derived from ``parts`` (for per-batch seeds that survive a resume)."""
    return int(fingerprint(*parts), 16) % (2**31 - 1)


def slug(text: str) -> str:
    """A file-name-safe version of ``text``: a hub name keeps its owner
    ("Qwen/Qwen2.5-7B" -> "Qwen--Qwen2.5-7B"), a local path keeps its last part.

    Example:
        >>> slug("Qwen/Qwen2.5-7B-Instruct")
        'Qwen--Qwen2.5-7B-Instruct'
    """
    text = str(text)
    if os.path.isabs(text) or text.startswith(".") or os.path.exists(text):
        text = Path(text).name or text
    text = text.replace("/", "--").replace("\\", "--")
    text = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._-")
    return text or "unnamed"


class JsonlLog:
    """An append-only JSON-lines file.

    Args:
        path: the file (created on the first append, with its parent folders).

    Example:
        >>> log = JsonlLog("scores.jsonl")
        >>> log.append([{"id": "a", "score": 1.0}])
        >>> log.append([{"id": "b", "score": None}])
        >>> log.read()
        [{'id': 'a', 'score': 1.0}, {'id': 'b', 'score': None}]
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.bad_lines = 0

    def read(self) -> list[dict[str, Any]]:
        """All complete records in file order. Unreadable lines (a line cut short by a kill)
        are skipped and counted in ``bad_lines``."""
        self.bad_lines = 0
        if not self.path.exists():
            return []
        out = []
        with self.path.open("r", encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    self.bad_lines += 1
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
                else:
                    self.bad_lines += 1
        if self.bad_lines:
            warnings.warn(
                f"{self.path}: skipped {self.bad_lines} unreadable line(s) (a run cut short while "
                "writing); that work is redone",
                stacklevel=2,
            )
        return out

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records and sync them to disk before returning."""
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prefix = ""
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    prefix = "\n"  # the last write was cut short: start on a fresh line
        with self.path.open("a", encoding="utf-8") as f:
            f.write(prefix + "".join(lines))
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (temporary file, then rename)."""
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
