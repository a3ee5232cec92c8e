"""The one rule for when a long job shows a progress bar."""

from __future__ import annotations


def quiet(progress: bool | None, n_units: int) -> bool:
    """Whether to hide a progress bar: ``progress=None`` shows one only for multi-unit jobs.

    Example:
        >>> quiet(None, 1), quiet(None, 5), quiet(False, 5), quiet(True, 1)
        (True, False, True, False)
    """
    return not progress if progress is not None else n_units <= 1
