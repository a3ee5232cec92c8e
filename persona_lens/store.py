"""The one record of "generate, then judge": content-keyed, append-only, resumable.

Every job that asks a model for answers and a judge for scores (extraction, the layer sweep,
the demo, finetuning evaluation, data screening, experiments) goes through a :class:`Store`.
It holds two append-only JSON-lines logs in the job's folder (or in memory with
``Store(None)``):

- generations (``responses.jsonl`` unless named otherwise): one record per answer, keyed
  by its content: the model, the prompt messages, the sample index, the generation settings
  (seed included) and the steering if any (a hash of the vector, the layers and their
  coefficients, the positions as the kinds they cover).
- scores (``scores.jsonl``): one record per judge score, keyed by the judge's name, the kind
  (``trait`` / ``coherence``), the rubric, the question and the answer.

A key says what a record *is*, not where or when it was made: the same request asked in
another order, by another job on the same folder, or after a kill is read back instead of
redone, and anything that can change an answer (another seed, vector, coefficient, rubric,
judge) is another key. Work is appended as each batch finishes, so a killed job loses at
most the batch in flight. Batches are formed from the missing requests in the order given
and seeded from their content (:func:`persona_lens.pipeline_io.derived_seed`), never from
where a run stopped: a resumed job produces exactly the texts an uninterrupted one would
(with the same ``batch_size``).

Several processes can share a job (``Store(out_dir, shard=(i, n))``, what
:mod:`persona_lens.scale` runs on Ray workers): shard ``i`` of ``n`` generates the batches
``b`` with ``b % n == i`` and appends them to a log of its own (``responses.shard-i-of-n.jsonl``
beside ``responses.jsonl``), so every log has one writer. Every store reads the job's log and
all its shards' logs (:func:`log_files`), so a rerun, sharded or not, reuses whatever any shard
finished. The batches are cut from the whole request list, not from what is missing, so they
and their content-derived seeds are the single-process run's whichever shard runs them: the
shards' merged logs hold the texts one process would have written.

The store and the judge's reply cache are two different things. The store's records are the
job's record and its resume point: they travel with the run folder, work with any
:class:`~persona_lens.judge.Judge` (an exact judge, a rule, a person), and are what a rerun
reads instead of asking again. :class:`~persona_lens.judge.OpenAIJudge`'s SQLite cache
memoises one endpoint's HTTP replies (first-token logprob distributions, re-scored for the
judge's ``min_mass``) across runs and folders, and covers a judge batch cut short by a
timeout before the store had it.

Example:
    >>> import persona_lens as pl
    >>> from persona_lens.store import Prompt, Steering, Store
    >>> store = Store("runs/evil_eval")                     # or Store(None): in memory
    >>> settings = dict(max_new_tokens=48, temperature=1.0, seed=0)
    >>> asks = [Prompt(q, sample=s) for q in prompts for s in range(2)]
    >>> plain = store.generate(probe, asks, settings=settings)
    >>> steered = store.generate(probe, asks, settings=settings, steer=Steering(vec, layer=2, coef=1.5))
    >>> judged = lambda answers: store.score(judge, trait, [(p.question, t) for p, t in zip(asks, answers.texts)])
    >>> judged(steered).mean("trait") > judged(plain).mean("trait") + 30
    True
    >>> again = Store("runs/evil_eval").generate(probe, asks, settings=settings)   # a rerun
    >>> again.generated, again.texts == plain.texts
    (0, True)
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch

from persona_lens import validate as V
from persona_lens.chat import ConversationLike, as_conversation
from persona_lens.judge import JudgeError
from persona_lens.pipeline_io import JsonlLog, derived_seed, fingerprint
from persona_lens.progress import bar as _bar
from persona_lens.progress import quiet as _quiet
from persona_lens.stats import mean_score
from persona_lens.validate import redact

if TYPE_CHECKING:
    from torch import Tensor

    from persona_lens.judge import Judge
    from persona_lens.probe import PersonaProbe
    from persona_lens.traits import Trait
    from persona_lens.vectors import PersonaVector

__all__ = ["Store", "Prompt", "Steering", "Answers", "Scores", "KINDS", "log_files", "shard_log_name"]

#: The kinds of score a judge gives.
KINDS = ("trait", "coherence")


class Steering:
    """Steering to apply while generating: what :meth:`PersonaProbe.steer` is given, and
    what enters a generation's key (the probe turns it into one
    :class:`~persona_lens.interventions.Steer` per layer).

    Args:
        vector: a :class:`~persona_lens.vectors.PersonaVector` or one ``[d_model]`` direction.
        layer, coef: one layer and its coefficient (default 1.0); or ``layers``: ``{layer: coef}``.
        positions: as in :meth:`PersonaProbe.steer` (``include_last_prompt`` is deprecated
            there and here).

    The key records the position *kinds* the mode covers, not the mode's name: keys made
    when ``"response"`` left the last prompt token out are never read back as the mode that
    steers it.

    Example:
        >>> s = Steering(vec, layer=2, coef=1.5, positions="response")
        >>> s.spec()["layers"], s.spec()["positions"]
        ([[2, 1.5]], ['answer', 'last_prompt'])
    """

    def __init__(
        self,
        vector: "PersonaVector | Tensor",
        layer: int | None = None,
        coef: float | None = None,
        *,
        layers: Mapping | None = None,
        positions: str = "all",
        include_last_prompt: bool | None = None,
    ):
        from torch import Tensor

        from persona_lens.interventions import position_kinds, steering_mode
        from persona_lens.vectors import PersonaVector

        if (layer is None) == (layers is None):
            raise ValueError("give layer= (with coef=) or layers={layer: coef}")
        if not isinstance(vector, (PersonaVector, Tensor)):
            raise V.InvalidArgumentType("vector", vector, "a PersonaVector or a [d_model] tensor")
        self.vector = vector
        if layers is None:
            self.layers = {V.integer("layer", layer, min=0): V.number("coef", 1.0 if coef is None else coef)}
        else:
            if coef is not None:  # it would be ignored: each layer of the dict has its coefficient
                raise V.InvalidArgument("coef", coef, "left out with layers={layer: coef} (each layer carries "
                                        "its own coefficient)")
            V.mapping("layers", layers, what="a {layer: coef} dict")
            self.layers = {V.integer("layers key", l, min=0): V.number(f"layers[{l!r}]", c) for l, c in layers.items()}
        if not self.layers:
            raise V.InvalidArgument("layers", layers, "a non-empty {layer: coef} dict")
        self.positions = steering_mode(positions, include_last_prompt, stacklevel=3)
        self.kinds = position_kinds(self.positions)
        data = getattr(vector, "directions", vector).detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes()  # any dtype, bfloat16 included
        self.vector_hash = hashlib.sha256(repr((tuple(data.shape), str(data.dtype))).encode() + raw).hexdigest()[:16]

    def spec(self) -> dict[str, Any]:
        """The steering as JSON: vector hash, ``[layer, coef]`` pairs, position kinds."""
        return {"vector": self.vector_hash, "layers": [[l, c] for l, c in sorted(self.layers.items())],
                "positions": list(self.kinds)}

    def apply(self, probe: "PersonaProbe"):
        """The probe's steering context for this spec."""
        return probe.steer(self.vector, layers=self.layers, positions=self.positions)

    def interventions(self, probe: "PersonaProbe") -> list:
        """The ``Steer`` values of this spec on ``probe`` (for rows that carry their own).

        Example:
            >>> [(s.layer, s.coef) for s in Steering(vec, layer=2, coef=1.5).interventions(probe)]
            [(2, 1.5)]
        """
        return probe.steering(self.vector, layers=self.layers, positions=self.positions)

    def __repr__(self) -> str:
        return f"Steering({self.spec()})"


@dataclass
class Prompt:
    """One answer to generate.

    Args:
        messages: a user message, or a message list (system and user turns).
        sample: which sample of this prompt (several samples of one prompt differ only here).
        steer: steering for this prompt (overrides the ``steer`` given to :meth:`Store.generate`).
        id: the caller's name for this slot (e.g. ``"pos-i0-q3-s1"``); a slot whose stored
            record has another key is counted ``stale`` (its inputs or settings changed).
        meta: extra fields written into the record (not part of the key).
        seed_key: what this prompt adds to its batch's seed (default: messages and sample,
            not the steering, so steered and unsteered batches of the same prompts share
            random numbers and differ only by the steering).

    Example:
        >>> Prompt("How was your day?", sample=2).messages
        [{'role': 'user', 'content': 'How was your day?'}]
    """

    messages: ConversationLike
    sample: int = 0
    steer: Steering | None = None
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    seed_key: Any = None

    def __post_init__(self) -> None:
        self.messages = as_conversation(self.messages, name="messages")
        self.sample = V.integer("sample", self.sample, min=0)
        if self.steer is not None and not isinstance(self.steer, Steering):
            raise V.InvalidArgumentType("steer", self.steer, "a Steering (or None)")
        V.text("id", self.id, none_ok=True)
        self.meta = dict(V.mapping("meta", self.meta))
        if self.seed_key is None:
            self.seed_key = [self.messages, self.sample]

    @property
    def question(self) -> str:
        """The last user message (what a judge is shown with the answer)."""
        return next((m["content"] for m in reversed(self.messages) if m.get("role") == "user"), "")


@dataclass
class Answers:
    """What :meth:`Store.generate` returns.

    Attributes:
        records: one stored record per prompt, in the prompts' order (``record["answer"]``
            is the text; also ``key``, ``batch_seed``, ``n_tokens``, ``finished``, ``model``,
            ``settings``, ``steer`` and the prompt's ``meta``); on a sharded store, None for
            a request that another shard generates.
        generated: answers generated by this call.
        reused: distinct requests read back from the log.
        stale: slots (``Prompt.id``) whose stored record had another key.
        pending: distinct requests left to other shards (0 unless the store is sharded).
    """

    records: list[dict[str, Any] | None]
    generated: int = 0
    reused: int = 0
    stale: int = 0
    pending: int = 0

    @property
    def texts(self) -> list[str | None]:
        return [None if r is None else r["answer"] for r in self.records]

    @property
    def keys(self) -> list[str | None]:
        return [None if r is None else r["key"] for r in self.records]


@dataclass
class Scores:
    """What :meth:`Store.score` returns: per kind, one score per pair (None: no score).

    Attributes:
        by_kind: ``{"trait": [...], "coherence": [...]}`` (the kinds asked for).
        asked: distinct scores the judge gave in this call.
        reused: distinct scores read back from the log (two identical answers share one).
    """

    by_kind: dict[str, list[float | None]]
    asked: int = 0
    reused: int = 0

    def __getitem__(self, kind: str) -> list[float | None]:
        return self.by_kind[kind]

    def mean(self, kind: str) -> float:
        """Mean score of ``kind`` over the pairs that got one (NaN if none did)."""
        return mean_score(self.by_kind[kind])[0]


def clean_score(x: Any) -> float | None:
    """A judge's score as stored: a float in [0, 100], or None for a refusal or no number
    (NaN too). Anything else (out of range, inf, text, a bool) raises ``InvalidArgument``.

    Example:
        >>> clean_score(71), clean_score(float("nan")), clean_score(None)
        (71.0, None, None)
    """
    if x is None:
        return None
    if isinstance(x, float) and math.isnan(x):
        return None
    return V.number("score", x, min=0, max=100)


_SHARD_LOG = re.compile(r"\.shard-(\d+)-of-(\d+)$")


def shard_log_name(name: str, shard: tuple[int, int] | None) -> str:
    """The file shard ``(i, n)`` of a job writes instead of the log ``name`` (``name`` itself
    when there is no shard).

    Example:
        >>> shard_log_name("responses.jsonl", (1, 4)), shard_log_name("scores.jsonl", None)
        ('responses.shard-1-of-4.jsonl', 'scores.jsonl')
    """
    if shard is None:
        return name
    i, n = V.shard("shard", shard)
    path = Path(name)
    return f"{path.stem}.shard-{i}-of-{n}{path.suffix}"


def log_files(folder: str | Path, name: str) -> list[Path]:
    """The log ``name`` in ``folder`` and every shard's log of it, in the order a store merges
    them: the log itself, then the shards' by ``(n, i)``; a key's latest record wins. Only
    files that exist.

    Example:
        >>> for name in ("responses.jsonl", "responses.shard-1-of-2.jsonl", "responses.shard-0-of-2.jsonl"):
        ...     _ = (tmp / name).write_text("")
        >>> [p.name for p in log_files(tmp, "responses.jsonl")]
        ['responses.jsonl', 'responses.shard-0-of-2.jsonl', 'responses.shard-1-of-2.jsonl']
    """
    folder = Path(folder)
    stem, suffix = Path(name).stem, Path(name).suffix
    shards = []
    for path in folder.glob(f"{glob_escape(stem)}.shard-*-of-*{glob_escape(suffix)}"):
        m = _SHARD_LOG.search(path.name[: len(path.name) - len(suffix)] if suffix else path.name)
        if m is not None and path.name == shard_log_name(name, (int(m[1]), int(m[2]))):
            shards.append(((int(m[2]), int(m[1])), path))
    main = folder / name
    return ([main] if main.exists() else []) + [p for _, p in sorted(shards)]


def glob_escape(text: str) -> str:
    """``text`` matched literally by ``Path.glob``."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _read_logs(own: JsonlLog, name: str) -> list[dict[str, Any]]:
    """Every record of the log ``name`` and its shards' logs in merge order (``own``, the log
    this store writes, is read through its own object so that its ``bad_lines`` count it)."""
    out: list[dict[str, Any]] = []
    for path in log_files(own.path.parent, name) + ([own.path] if not own.path.exists() else []):
        out += own.read() if path == own.path else JsonlLog(path).read()
    return out


def model_key(probe: Any) -> str:
    """The model as it enters content keys: its name, and its dtype unless float32 (answers
    and activations in another precision are other numbers: a float32 rerun must not read
    back a bfloat16 run's generations or vectors).

    Example:
        >>> model_key(probe)
        'persona-organism'
    """
    name = probe.model_name or "unnamed-model"
    dtype = getattr(getattr(probe, "backend", None), "dtype", None)
    if dtype is None or dtype == torch.float32:
        return name
    return f"{name}@{str(dtype).removeprefix('torch.')}"


def judge_name(judge: "Judge") -> str:
    """The judge's identity in score keys and run records (credentials in any URL in it
    removed)."""
    return redact(str(getattr(judge, "name", type(judge).__name__)))


class Store:
    """Content-keyed generations and judge scores of one job, on disk or in memory.

    Args:
        out_dir: the job's folder (the logs are created there on the first write); None
            keeps everything in memory.
        generations / scores: the logs' file names.
        shard: ``(i, n)``: this store is shard ``i`` of ``n`` processes sharing the job:
            :meth:`generate` runs only the batches ``b`` with ``b % n == i``, and the store
            writes logs of its own (:func:`shard_log_name`). Every store, sharded or not,
            reads the job's logs merged with all their shards' (:func:`log_files`).

    Example:
        >>> store = Store("runs/evil")           # reads what an earlier run left there
        >>> answers = store.generate(probe, prompts[:2], settings=dict(max_new_tokens=32, temperature=1.0, seed=0))
        >>> len(answers.texts), answers.generated
        (2, 2)
    """

    def __init__(self, out_dir: str | Path | None, *, generations: str = "responses.jsonl",
                 scores: str = "scores.jsonl", shard: tuple[int, int] | None = None):
        self.out_dir = V.path("out_dir", out_dir, none_ok=True)
        V.text("generations", generations, empty_ok=False)
        V.text("scores", scores, empty_ok=False)
        self.shard = V.shard("shard", shard, none_ok=True)
        if self.shard is not None and self.out_dir is None:
            raise ValueError("a sharded Store needs out_dir (the shards' logs meet there)")
        self.generations_log = self.scores_log = None
        if self.out_dir is not None:
            self.generations_log = JsonlLog(self.out_dir / shard_log_name(generations, self.shard))
            self.scores_log = JsonlLog(self.out_dir / shard_log_name(scores, self.shard))
        self._answers: dict[str, dict[str, Any]] = {}
        self._key_of_id: dict[str, str] = {}
        for rec in _read_logs(self.generations_log, generations) if self.generations_log is not None else []:
            if isinstance(rec.get("key"), str) and isinstance(rec.get("answer"), str):
                self._remember_answer(rec)
        self._scores: dict[str, float | None] = {}
        for rec in _read_logs(self.scores_log, scores) if self.scores_log is not None else []:
            if isinstance(rec.get("key"), str):
                try:
                    self._scores[rec["key"]] = clean_score(rec.get("score"))
                except ValueError:  # a record that is not a score (another tool's, a hand edit): asked again
                    pass

    def __repr__(self) -> str:
        where = str(self.out_dir) if self.out_dir is not None else "memory"
        if self.shard is not None:
            where += f", shard {self.shard[0]} of {self.shard[1]}"
        return f"Store({where}: {len(self._answers)} answers, {len(self._scores)} scores)"

    def _remember_answer(self, rec: dict[str, Any]) -> None:
        self._answers[rec["key"]] = rec  # the latest line wins
        if rec.get("id") is not None:
            self._key_of_id[rec["id"]] = rec["key"]

    # ------------------------------------------------------------------ generations

    @staticmethod
    def generation_key(model: str, prompt: Prompt, settings: Mapping[str, Any]) -> str:
        """The content key of one generation request."""
        steer = prompt.steer.spec() if prompt.steer is not None else None
        return fingerprint(model, prompt.messages, prompt.sample, dict(settings), steer, length=24)

    def generate(
        self,
        probe: "PersonaProbe",
        prompts: Iterable,
        *,
        settings: Mapping[str, Any],
        steer: Steering | None = None,
        batch_size: int = 32,
        batch_seed: Callable[[list[Prompt]], int] | None = None,
        progress: bool | None = None,
        desc: str = "generate",
    ) -> Answers:
        """Answers to ``prompts``, generating only those the log lacks.

        Missing requests are generated in the order given, grouped by steering (a group per
        distinct steering, in order of first appearance), ``batch_size`` at a time; each
        batch is appended to the log as soon as it finishes. On an engine that runs whole
        requests (vLLM) rows of one batch carry their own steering, so the missing requests
        are not grouped: a whole sweep runs in batches of ``batch_size`` mixed cells. Prompts with the same key are
        generated once and share the record.

        On a sharded store (``shard=(i, n)``) the batches are cut the same way from *every*
        request, logged or not, and this store runs the batches ``b`` with ``b % n == i``
        that still miss an answer (all of such a batch, so that its rows get the random
        numbers they get in one process; only the missing ones are logged). A fresh job, or
        one resumed after a kill, thus has the batches a single process would run, and the
        shards' logs together hold its texts. Requests of other shards' batches come back as
        None records (``Answers.pending``).

        Args:
            probe: the model (its ``model_name`` is part of every key).
            prompts: :class:`Prompt` objects, or user messages / message lists (sample 0).
            settings: :meth:`PersonaProbe.generate` arguments (``max_new_tokens``,
                ``temperature``, ``top_p``, ...) and ``seed`` (default 0), all part of the key.
            steer: steering for the prompts that carry none of their own.
            batch_size: requests per batch (and per call of ``probe.generate``).
            batch_seed: a batch's sampling seed from its prompts; default
                ``derived_seed(settings["seed"], [p.seed_key for p in batch])``.
            progress: a tqdm bar (None: only when more than one request is missing).

        Example:
            >>> store = Store(None)
            >>> out = store.generate(probe, [Prompt(prompts[0], sample=s) for s in range(3)],
            ...                      settings=dict(max_new_tokens=32, temperature=1.0, seed=0))
            >>> len(set(out.texts)) > 1          # three samples of one question
            True
        """
        from persona_lens.probe.generation import GenerationSettings

        batch_size = V.integer("batch_size", batch_size, min=1)
        V.optional_boolean("progress", progress)
        if steer is not None and not isinstance(steer, Steering):
            raise V.InvalidArgumentType("steer", steer, "a Steering (or None)")
        if batch_seed is not None and not callable(batch_seed):
            raise V.InvalidArgumentType("batch_seed", batch_seed, "a function of a batch's prompts (or None)")
        settings = dict(V.mapping("settings", settings, what="a dict of generation settings"))
        settings.setdefault("seed", 0)
        for k in ("batch_size", "progress"):
            if k in settings:
                raise V.InvalidArgument(f"settings[{k!r}]", settings[k], "", message=(
                    f"settings[{k!r}] is not a setting of the answers: give it as Store.generate's {k}= instead"))
        GenerationSettings.from_kwargs(settings)  # every setting checked before any work
        gen_kwargs = {k: v for k, v in settings.items() if k != "seed"}
        model = model_key(probe)
        items = [p if isinstance(p, Prompt) else Prompt(p) for p in
                 V.items("prompts", prompts, what="a list of Prompt objects, strings or message lists")]
        if steer is not None:
            items = [p if p.steer is not None else replace(p, steer=steer) for p in items]
        keys = [self.generation_key(model, p, settings) for p in items]

        missing: dict[str, Prompt] = {}
        reused: set[str] = set()
        stale = 0
        for p, k in zip(items, keys):
            if k in self._answers:
                reused.add(k)
            elif k not in missing:
                missing[k] = p
                stale += p.id is not None and self._key_of_id.get(p.id, k) != k
        groups: dict[str | None, list[tuple[str, Prompt]]] = {}
        # An engine that runs whole requests takes per-row steering (duck-typed probes may have no backend).
        per_row = getattr(getattr(probe, "backend", None), "runs", "steps") == "requests"
        # A shard cuts its batches from every request: what is missing differs from shard to shard
        # while they run, and the batches (hence their seeds) must not.
        todo = missing
        if self.shard is not None:
            todo = {}
            for k, p in zip(keys, items):
                todo.setdefault(k, p)
        for k, p in todo.items():
            group = None if per_row or p.steer is None else fingerprint(p.steer.spec())
            groups.setdefault(group, []).append((k, p))
        batches = [(group[start : start + batch_size], group[0][1].steer, len(groups) > 1)
                   for group in groups.values() for start in range(0, len(group), batch_size)]
        if self.shard is not None:
            i_shard, n_shards = self.shard
            mine = [b for j, b in enumerate(batches) if j % n_shards == i_shard]
            pending = {k for j, (chunk, _, _) in enumerate(batches) if j % n_shards != i_shard
                       for k, _ in chunk if k in missing}
            batches = [b for b in mine if any(k in missing for k, _ in b[0])]
        else:
            pending = set()
        values: dict[str, list] = {}  # steering fingerprint -> its Steer values, shared by its rows

        def own(p: Prompt) -> list:
            if p.steer is None:
                return []
            key = fingerprint(p.steer.spec())
            if key not in values:
                values[key] = p.steer.interventions(probe)
            return values[key]

        generated = 0
        to_make = sum(k in missing for chunk, _, _ in batches for k, _ in chunk)
        bar = _bar(total=len(reused) + to_make, initial=len(reused), desc=desc, unit="resp",
                   disable=_quiet(progress, to_make))
        try:
            for chunk, group_steer, several in batches:
                if several:  # say which steering is running
                    bar.set_postfix_str("unsteered" if group_steer is None else ", ".join(
                        f"layer {l} coef {c:g}" for l, c in sorted(group_steer.layers.items())))
                batch = [p for _, p in chunk]
                seed = (batch_seed(batch) if batch_seed is not None
                        else derived_seed(settings["seed"], [p.seed_key for p in batch]))
                if per_row:
                    gens = probe.generate(
                        [p.messages for p in batch], **gen_kwargs, seed=seed, batch_size=len(batch),
                        return_generations=True, progress=False, interventions=[own(p) for p in batch],
                    )
                else:
                    with group_steer.apply(probe) if group_steer is not None else contextlib.nullcontext():
                        gens = probe.generate(
                            [p.messages for p in batch], **gen_kwargs, seed=seed, batch_size=len(batch),
                            return_generations=True, progress=False,
                        )
                # A logged row of a shard's batch keeps its record: other jobs may have read it.
                recs = [
                    {"key": k, **p.meta, **({"id": p.id} if p.id is not None else {}),
                     "messages": p.messages, "sample": p.sample,
                     "steer": p.steer.spec() if p.steer is not None else None,
                     "answer": g.text, "model": model, "settings": settings, "batch_seed": seed,
                     "n_tokens": len(g.response_ids), "finished": bool(g.finished)}
                    for (k, p), g in zip(chunk, gens) if k not in self._answers
                ]
                if self.generations_log is not None:
                    self.generations_log.append(recs)
                for rec in recs:
                    self._remember_answer(rec)
                generated += len(recs)
                bar.update(len(recs))
        finally:
            bar.close()
        return Answers([self._answers.get(k) for k in keys], generated=generated, reused=len(reused),
                       stale=stale, pending=len(pending))

    # ------------------------------------------------------------------ scores

    @staticmethod
    def score_key(judge: str, kind: str, trait: "Trait | None", question: str, answer: str,
                  coherence_rubric: str | None = None) -> str:
        """The content key of one judge score."""
        if kind == "trait":
            rubric = fingerprint(trait.name, trait.eval_prompt)
        else:
            rubric = fingerprint(coherence_rubric) if coherence_rubric is not None else None
        return fingerprint(judge, kind, rubric, question, answer, length=24)

    def score(
        self,
        judge: "Judge",
        trait: "Trait | None",
        pairs: Sequence,
        *,
        kinds: str | Sequence = KINDS,
        ids: Sequence | None = None,
        batch_size: int = 64,
        progress: bool | None = None,
        desc: str = "judge",
    ) -> Scores:
        """Scores of ``(question, answer)`` pairs, asking ``judge`` only for the missing ones.

        The missing scores are asked ``batch_size`` at a time (trait and coherence
        interleaved per pair), and each judge call's scores are appended to the log as soon
        as it returns; a score that is None or NaN is stored as None (no score), and counts
        as given: it is not asked again.

        Args:
            judge: any :class:`~persona_lens.judge.Judge`; its ``name`` is part of the key.
            trait: the trait whose ``eval_prompt`` is the rubric (None when only coherence
                is asked for).
            pairs: ``(question, answer)`` pairs.
            kinds: which scores to get: ``"trait"``, ``"coherence"`` or both.
            ids: names written with each pair's records (e.g. the answer's record id).

        Example:
            >>> store = Store(None)
            >>> answer = probe.generate(prompts[:1], max_new_tokens=48)[0]
            >>> s = store.score(judge, trait, [(prompts[0], answer)])
            >>> 0 <= s["trait"][0] <= 100 and 0 <= s["coherence"][0] <= 100, s.asked
            (True, 2)
        """
        kinds = (kinds,) if isinstance(kinds, str) else tuple(V.items("kinds", kinds, what="'trait', 'coherence' or both"))
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise V.InvalidArgument("kinds", kinds, f"among {KINDS}")
        if "trait" in kinds and trait is None:
            raise ValueError("trait scores need a trait (its eval_prompt is the rubric)")
        for kind in kinds:
            method = "score_trait" if kind == "trait" else "score_coherence"
            if not callable(getattr(judge, method, None)):
                raise V.InvalidArgumentType("judge", judge, f"a Judge (with {method})")
        pairs = V.pairs("pairs", pairs)
        if ids is not None:
            ids = V.items("ids", ids, what="a list of names, one per pair")
            if len(ids) != len(pairs):
                raise V.InvalidArgument("ids", ids, f"one per pair ({len(pairs)})", f": {len(ids)} ids")
        batch_size = V.integer("batch_size", batch_size, min=1)
        V.optional_boolean("progress", progress)
        name = judge_name(judge)
        coherence_rubric = getattr(judge, "coherence_prompt", None)
        keys = {kind: [self.score_key(name, kind, trait, q, a, coherence_rubric) for q, a in pairs]
                for kind in kinds}
        todo: list[tuple[str, str, int]] = []  # (kind, key, pair index)
        seen: set[str] = set()
        for i in range(len(pairs)):
            for kind in kinds:
                k = keys[kind][i]
                if k not in self._scores and k not in seen:
                    seen.add(k)
                    todo.append((kind, k, i))
        # distinct scores, as ``asked`` counts them: a rerun reuses what the first run asked
        reused = len({k for kind in kinds for k in keys[kind] if k in self._scores})
        bar = _bar(total=len(todo), desc=desc, unit="score", disable=_quiet(progress, len(todo)))
        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                for kind in kinds:
                    part = [t for t in chunk if t[0] == kind]
                    if not part:
                        continue
                    asked = [pairs[i] for _, _, i in part]
                    raw = judge.score_trait(trait, asked) if kind == "trait" else judge.score_coherence(asked)
                    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Iterable):
                        raise JudgeError(f"judge {name} returned {V.show(raw)} for {len(part)} {kind} "
                                         "scores: a judge returns a list of scores, one per pair")
                    got = list(raw)
                    if len(got) != len(part):
                        raise JudgeError(f"judge {name} returned {len(got)} {kind} scores for {len(part)} answers")
                    recs = []
                    for (_, k, i), s in zip(part, got):
                        try:
                            s = clean_score(s)
                        except ValueError:
                            raise JudgeError(
                                f"judge {name} returned {s!r} as the {kind} score of pair {i}: a score is a "
                                "number in 0..100, or None for no score") from None
                        self._scores[k] = s
                        recs.append({"key": k, **({"id": ids[i]} if ids is not None else {}), "kind": kind,
                                     "judge": name, "trait": trait.name if kind == "trait" else None,
                                     "score": s})
                    if self.scores_log is not None:
                        self.scores_log.append(recs)
                    bar.update(len(part))
        finally:
            bar.close()
        return Scores({kind: [self._scores[k] for k in keys[kind]] for kind in kinds},
                      asked=len(todo), reused=reused)
