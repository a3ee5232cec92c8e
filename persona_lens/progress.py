"""Progress display: the rule for when a long step shows a bar, and one display for a job
made of many steps.

Library steps (generation, judging, capture) make their bars with :func:`bar`. Alone, each
is a tqdm bar. Inside a :class:`Job` (the demo is one) they draw nothing themselves: the job
shows one line for the whole run, with the stage's name, what the step is doing, done/total
and the time left, counting the work unit the job names (generated responses by default).
"""

from __future__ import annotations

import contextvars
import sys
import time
from typing import Any

__all__ = ["quiet", "bar", "note", "Job"]

_JOB: contextvars.ContextVar["Job | None"] = contextvars.ContextVar("persona_lens_job", default=None)


def quiet(progress: bool | None, n_units: int) -> bool:
    """Whether to hide a progress bar: ``progress=None`` shows one only for multi-unit jobs.

    Example:
        >>> quiet(None, 1), quiet(None, 5), quiet(False, 5), quiet(True, 1)
        (True, False, True, False)
    """
    return not progress if progress is not None else n_units <= 1


def bar(*, total: int, desc: str, unit: str, disable: bool = False, initial: int = 0) -> Any:
    """A progress bar for one step: tqdm, or inside a :class:`Job` a part of the job's display.

    The object has tqdm's ``update``, ``set_postfix_str``, ``close`` and works as a context
    manager.
    """
    job = _JOB.get()
    if job is not None and not disable:
        return _Part(job, total=total, desc=desc, unit=unit, initial=initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable)


def note(text: str) -> None:
    """A one-line message about the step now running: printed above the bars, or shown as
    the running job's detail."""
    job = _JOB.get()
    if job is not None:
        job.detail(text)
        return
    from tqdm.auto import tqdm

    tqdm.write(text)


class Job:
    """One progress line for a job of several stages: stage name, detail, done/total, ETA.

    Args:
        total: work units the whole job will do (e.g. responses to generate).
        unit: the unit counted; steps whose bars count another unit (judge scores, captured
            conversations) show as the detail but do not advance the count.
        stages: how many stages the job has (shown as ``2/5``).
        disable: show nothing (the job still counts, and its steps draw no bars of their own).
        file: where the line goes (default: stderr).

    Example:
        >>> with Job(total=4, stages=2, disable=True) as job:
        ...     job.stage("first")
        ...     with bar(total=2, desc="generate", unit="resp") as b:
        ...         b.update(2)
        ...     job.stage("second")
        ...     job.advance(2)
        >>> job.done, job.stage_name
        (4, 'second')
    """

    def __init__(self, total: int, *, unit: str = "resp", stages: int | None = None, disable: bool = False,
                 file: Any = None):
        self.total = int(total)
        self.unit = unit
        self.stages = stages
        self.disabled = bool(disable)
        self.done = 0
        self.stage_name = ""
        self.stage_index = 0
        self.started = time.perf_counter()
        self.stage_seconds: dict[str, float] = {}
        self._stage_started = self.started
        self._file = file
        self._bar: Any = None
        self._token: contextvars.Token | None = None

    def __enter__(self) -> "Job":
        if not self.disabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, unit=self.unit, file=self._file or sys.stderr, dynamic_ncols=True,
                             bar_format="{desc}{percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} {unit} "
                                        "[{elapsed}<{remaining}]{postfix}")
        self._token = _JOB.set(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close_stage()
        if self._token is not None:
            _JOB.reset(self._token)
            self._token = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def stage(self, name: str) -> None:
        """Start the next stage (its name leads the line)."""
        self._close_stage()
        self.stage_index += 1
        self.stage_name = name
        self._stage_started = time.perf_counter()
        if self._bar is not None:
            of = f"/{self.stages}" if self.stages else ""
            self._bar.set_description_str(f"[{self.stage_index}{of} {name}] ", refresh=False)
            self._bar.set_postfix_str("", refresh=True)

    def end_stage(self) -> None:
        """Record the current stage's time now (:attr:`stage_seconds`), before the job ends."""
        self._close_stage()
        self.stage_name = ""

    def set_total(self, total: int) -> None:
        """Set the units the whole job will do (once it is known)."""
        self.total = int(total)
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def detail(self, text: str) -> None:
        """What the current stage is doing (shown after the counts)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def advance(self, n: int) -> None:
        """Count ``n`` finished units."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def _close_stage(self) -> None:
        if self.stage_name:
            self.stage_seconds[self.stage_name] = round(
                self.stage_seconds.get(self.stage_name, 0.0) + time.perf_counter() - self._stage_started, 2)
            self._stage_started = time.perf_counter()


class _Part:
    """A step's bar inside a :class:`Job`: counts into the job and names the step."""

    def __init__(self, job: Job, *, total: int, desc: str, unit: str, initial: int):
        self.job, self.total, self.desc, self.unit = job, total, desc, unit
        self.n = initial
        self.postfix = ""
        if initial and unit == job.unit:
            job.advance(initial)
        self._show()

    def _show(self) -> None:
        text = f"{self.desc} {self.n}/{self.total} {self.unit}"
        self.job.detail(f"{self.postfix}: {text}" if self.postfix else text)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.unit == self.job.unit:
            self.job.advance(n)
        self._show()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s
        self._show()

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Part":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
