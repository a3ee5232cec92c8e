"""Small on-disk helpers for resumable pipelines: append-only JSONL logs and atomic writes.

A pipeline writes every finished unit of work (a generated response, a judge score) as one
JSON line, flushed and synced per batch, so a killed run loses at most the batch in flight.
A run started again reads the log back and skips what is already there. A line cut short by
a kill is ignored on reading, and the next append starts on a fresh line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


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
        with self.path.open("rb") as raw:
            with _locked(raw.fileno(), exclusive=False):
                content = raw.read()
        # Split on newlines only: a record's text may hold U+2028 and the like, which
        # str.splitlines would also break at.
        for line in content.decode("utf-8", errors="replace").split("\n"):
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
        """Append records and sync them to disk before returning.

        The records go down in one ``write`` under an exclusive lock on the file, so writers
        in several processes never interleave their lines, and a reader (which takes a
        shared lock) sees whole appends only.
        """
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        if not lines:
            return
        data = "".join(lines).encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            with _locked(fd, exclusive=True):
                end = os.lseek(fd, 0, os.SEEK_END)
                if end > 0 and os.pread(fd, 1, end - 1) != b"\n":
                    data = b"\n" + data  # the last write was cut short: start on a fresh line
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(fd: int, *, exclusive: bool) -> Iterator[None]:
    """An advisory lock on an open file for the block (no-op where ``fcntl`` is missing)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (a temporary file of its own in the same folder, then a rename)."""
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically (a temporary file of its own in the same folder, then a rename)."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one, whole.

    The data goes to a temporary file with a name of its own in the target's folder (so
    writers in several processes never share one), is synced, and is renamed over ``path``.
    A failure removes the temporary file and raises an ``OSError`` that names ``path``.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path of its own next to ``path``, renamed over ``path`` when the block
    ends without an error (and removed when it does not). For writers that take a file
    name (``torch.save``, ``save_pretrained`` of a single file).

    Example:
        >>> with atomic_path("/tmp/example.bin") as tmp:
        ...     _ = tmp.write_bytes(b"all or nothing")
        >>> open("/tmp/example.bin", "rb").read()
        b'all or nothing'
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _naming(e, path) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: setting it is process-wide, not safe to do per write


def _naming(e: OSError, path: Path) -> OSError:
    """``e`` (same class, same errno) with a message that says which file was being written."""
    if e.errno is None:
        return OSError(f"cannot write {path}: {e}")
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
    return type(e)(e.errno, f"cannot write {path}: {e.strerror or e}{where}")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a file that is not JSON raises a ``ValueError`` naming it."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
