"""The extraction pipeline: from a trait to persona vectors (docs/method.md, "Extraction").

::

    trait -> contrastive generations -> judge (trait, coherence) -> paired filter
          -> streaming activation means -> per-layer mean difference -> PersonaVector

Everything is written to ``out_dir`` as it is produced and the pipeline is resumable:

- ``responses.jsonl``: one record per generated response (polarity, instruction index,
  question index, sample index, system prompt, question, answer, model, generation
  settings), appended and synced after every generation batch. A rerun skips every record
  whose content key (model, messages, sample, settings) matches, so a killed run loses at
  most the batch in flight.
- ``scores.jsonl``: one record per judge score, keyed by the judge, the kind of score
  (trait / coherence), the rubric and the exact question and answer, so a rerun never asks
  the judge again for a score it already gave (even without the judge's own cache).

Both logs are a :class:`persona_lens.store.Store`. With ``shard=(i, n)`` a run generates
only its share of the responses (into ``responses.shard-i-of-n.jsonl``) and stops; ``n`` such
runs side by side (:func:`persona_lens.scale.extract` runs them on Ray workers), then one run
without ``shard``, give the outputs of a single run.
- ``pairs.csv``: every (pos, neg) pair with its four scores and whether it was kept.
- ``vectors/TRAIT_REDUCTION.safetensors``: one :class:`PersonaVector` per reduction
  (``response_mean`` is the paper's), recomputed only when the kept set changes.
- ``run.json``, ``summary.json``, and ``trait/`` (a copy of the trait's files).

Example:
    On a chat model with an LLM judge (a GPU and an API key)::

        probe = pl.PersonaProbe(pl.load_model("Qwen/Qwen2.5-7B-Instruct", dtype="bfloat16"))
        result = pl.extract(probe, "evil", judge=pl.OpenAIJudge("gpt-4.1-mini"), out_dir="runs/evil")

    and the same call, small, on the persona organism with its exact judge:

    >>> import persona_lens as pl
    >>> result = pl.extract(probe, trait, judge=judge, out_dir="runs/evil", samples=1, questions=4,
    ...                     instructions=2, max_new_tokens=48, progress=False, verbose=False)
    >>> tuple(result.vector.directions.shape)          # response_mean, every layer
    (7, 128)
    >>> float(result.vector.cosine(vec)[2]) > 0.5        # agrees with the larger extraction
    True
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from persona_lens import validate as V
from persona_lens.pipeline_io import (
    JsonlLog,
    derived_seed,
    fingerprint,
    read_json,
    slug,
    write_json,
    write_text,
)
from persona_lens.progress import note as progress_note
from persona_lens.store import KINDS, Prompt, Store, model_key, judge_name as _judge_name
from persona_lens.traits import resolve_trait
from persona_lens.vectors import PersonaVector

if TYPE_CHECKING:
    from persona_lens.judge import Judge
    from persona_lens.probe import PersonaProbe
    from persona_lens.traits import Trait

__all__ = [
    "REDUCTIONS",
    "Thresholds",
    "ExtractionError",
    "Task",
    "Response",
    "KeptPair",
    "ExtractionStats",
    "ExtractionResult",
    "extract",
]

#: The three reductions captured for every kept response (the paper uses ``response_mean``).
REDUCTIONS = ("response_mean", "prompt_mean", "last_prompt")
POLARITIES = ("pos", "neg")


class ExtractionError(RuntimeError):
    """The pipeline cannot go on (for example: no pair survived the filter). Work already
    done stays on disk; a rerun with the same output directory resumes from it."""


@dataclass(frozen=True)
class Thresholds:
    """The paired filter (the paper's defaults).

    A (pos, neg) pair is kept when ``pos trait >= pos_trait``, ``neg trait < neg_trait`` and
    both coherence scores are ``>= coherence``. A missing score (judge refusal) fails.
    """

    pos_trait: float = 50.0
    neg_trait: float = 50.0
    coherence: float = 50.0

    def __post_init__(self) -> None:
        # A NaN threshold would switch its test off (every comparison with NaN is False).
        for name in ("pos_trait", "neg_trait", "coherence"):
            object.__setattr__(self, name, V.number(f"thresholds.{name}", getattr(self, name), min=0, max=100))

    @classmethod
    def coerce(cls, value: "Thresholds | Mapping[str, float] | None") -> "Thresholds":
        """A :class:`Thresholds` from itself, a dict of its fields, or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__), key=str)
            if unknown:
                raise V.InvalidArgument.unknown(str(unknown[0]), value[unknown[0]], cls.__dataclass_fields__,
                                                "threshold")
            return cls(**value)
        raise V.InvalidArgumentType("thresholds", value, "a Thresholds, a dict of its fields, or None")

    def describe(self) -> str:
        return (f"pos trait >= {self.pos_trait:g}, neg trait < {self.neg_trait:g}, "
                f"coherence >= {self.coherence:g} (both)")


@dataclass
class Task:
    """One response to generate: a (system prompt, question, sample) of one polarity."""

    id: str
    polarity: str
    instruction: int
    question_index: int
    sample: int
    system: str
    question: str

    def prompt(self) -> list[dict[str, str]]:
        """System and user messages: what the model is asked."""
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.question}]


@dataclass
class Response(Task):
    """One generated response of the contrastive set (one line of ``responses.jsonl``)."""

    answer: str
    model: str
    settings: dict[str, Any]
    batch_seed: int = 0
    n_tokens: int = 0
    finished: bool = True

    def conversation(self) -> list[dict[str, str]]:
        """System, user and assistant messages: what the activations are captured on."""
        return self.prompt() + [{"role": "assistant", "content": self.answer}]

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "Response":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in rec.items() if k in names})


@dataclass
class KeptPair:
    """A (pos, neg) pair and its scores (None: no judge, or no score)."""

    pos: Response
    neg: Response
    pos_trait: float | None = None
    neg_trait: float | None = None
    pos_coherence: float | None = None
    neg_coherence: float | None = None


@dataclass
class ExtractionStats:
    """What a run did; ``generated`` and ``judged`` count only this run's new work.

    Attributes:
        responses: responses the run needs (pairs x 2).
        generated / reused: responses generated now / read back from ``responses.jsonl``.
        stale: records in ``responses.jsonl`` whose inputs or settings no longer match
            (regenerated).
        judged / judge_reused: scores asked from the judge now / read back from ``scores.jsonl``.
        unscored: responses without a trait score (refusal or no number).
        pairs / kept: (pos, neg) pairs in all / kept by the filter.
        failed: pairs failing each condition (a pair may fail several).
        n_pos / n_neg: responses behind the ``response_mean`` means.
        vectors_reused: the vectors were read back (same kept set as before).
        seconds: wall time per phase.
    """

    responses: int = 0
    generated: int = 0
    reused: int = 0
    stale: int = 0
    judged: int = 0
    judge_reused: int = 0
    unscored: int = 0
    pairs: int = 0
    kept: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    n_pos: int = 0
    n_neg: int = 0
    vectors_reused: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class ExtractionResult:
    """What :func:`extract` returns.

    Attributes:
        vectors: one :class:`PersonaVector` per reduction.
        kept: the pairs that passed the filter.
        stats: :class:`ExtractionStats`.
        out_dir, responses_path, scores_path, pairs_path, summary_path: files written.
        vector_paths: reduction -> safetensors file.
    """

    trait: "Trait"
    judge_name: str | None
    vectors: dict[str, PersonaVector]
    kept: list[KeptPair]
    stats: ExtractionStats
    thresholds: Thresholds
    out_dir: Path
    responses_path: Path
    scores_path: Path
    pairs_path: Path
    summary_path: Path
    vector_paths: dict[str, Path]

    @property
    def vector(self) -> PersonaVector:
        """The paper's vector: mean difference over response tokens, every layer."""
        return self.vectors["response_mean"]

    def __repr__(self) -> str:
        from persona_lens.display import extraction_repr

        return extraction_repr(self)

    def _repr_html_(self) -> str:
        """In a notebook: :meth:`summary` (``display``)."""
        from persona_lens.display import extraction_html

        return extraction_html(self)

    def summary(self) -> str:
        """A short human-readable account of the run."""
        s = self.stats
        v = self.vector
        norms = v.norms()
        top = sorted(range(len(norms)), key=lambda l: -float(norms[l]))[:3]
        rows = [
            ("trait", self.trait.name),
            ("model", str(v.model_name)),
            ("responses", f"{s.responses} ({s.generated} generated, {s.reused} reused"
                          + (f", {s.stale} stale regenerated" if s.stale else "") + ")"),
            ("judge", (f"{self.judge_name} ({s.judged} new scores, {s.judge_reused} reused"
                       + (f", {s.unscored} responses without a trait score" if s.unscored else "") + ")")
             if self.judge_name else "none (every pair kept: plain contrastive mean difference)"),
            ("filter", self.thresholds.describe() if self.judge_name else "none"),
            ("pairs kept", f"{s.kept} / {s.pairs}"),
        ]
        if self.judge_name:
            rows.append(("failed", ", ".join(f"{k} {n}" for k, n in s.failed.items())))
        rows += [
            ("samples (pos/neg)", f"{s.n_pos} / {s.n_neg}"),
            ("largest norms", ", ".join(f"layer {l}: {float(norms[l]):.3g}" for l in top)),
            ("vectors", f"{self.vector_paths['response_mean']}"
                        + (" (reused)" if s.vectors_reused else "")),
            ("output", str(self.out_dir)),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {val}" for k, val in rows)


# ---------------------------------------------------------------------------- helpers


def _select(what: str, sel: Any, total: int) -> list[int]:
    if sel is None:
        return list(range(total))
    allowed = f"a count (1..{total}), a list of indices (0..{total - 1}) or None"
    if not isinstance(sel, (str, bytes)) and not hasattr(sel, "__iter__"):
        n = V.integer(what, sel, min=1, max=total)
        return list(range(n))
    given = V.items(what, sel, what=allowed, nonempty=True)
    out = sorted({V.integer(f"{what}[{j}]", i, min=0, max=total - 1) for j, i in enumerate(given)})
    return out


# ---------------------------------------------------------------------------- the pipeline


def extract(
    probe: "PersonaProbe",
    trait: "Trait | str",
    judge: "Judge | None",
    *,
    out_dir: str | Path | None = None,
    samples: int = 10,
    questions: int | Sequence | None = None,
    instructions: int | Sequence | None = None,
    max_new_tokens: int = 1000,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    capture_batch_size: int = 16,
    judge_batch_size: int = 64,
    thresholds: Thresholds | Mapping | None = None,
    layers: int | Sequence | None = None,
    seed: int = 0,
    progress: bool | None = True,
    verbose: bool = True,
    shard: tuple[int, int] | None = None,
) -> "ExtractionResult | ExtractionStats":
    """Extract persona vectors for ``trait`` from ``probe``'s model (the paper's pipeline).

    Args:
        probe: the model to extract from.
        trait: a :class:`~persona_lens.traits.Trait`, a bundled trait name or a path.
        judge: scores trait and coherence (e.g. ``OpenAIJudge("gpt-4.1-mini")``); ``None``
            keeps every pair (plain contrastive mean difference, noted in the metadata).
        out_dir: where everything is written and resumed from; default
            ``persona_runs/TRAIT/MODEL`` in the working directory.
        samples: responses per (instruction, question) and polarity (10 in the paper).
        questions: extraction questions to use: all (None, 20 in the paper), the first N,
            or a list of indices.
        instructions: instruction pairs to use: all (None, 5 in the paper), the first N, or
            a list of indices.
        max_new_tokens: response length limit (1000 in the paper).
        temperature, top_p: sampling settings (the paper samples at temperature 1).
        batch_size: responses per generation batch (each batch is saved when it finishes).
        capture_batch_size: conversations per forward pass when capturing activations.
        judge_batch_size: answers per judge call (each chunk is saved when it returns).
        thresholds: the paired filter, a :class:`Thresholds` or a dict of its fields.
        layers: layers to capture (default all, ``0..n_layers``; others stay zero).
        seed: seeds generation (per batch, derived from this and the batch's first record).
        progress: tqdm bars for generation, judging and capture.
        verbose: print the summary at the end.
        shard: ``(i, n)``: generate only shard ``i``'s share of the responses (every
            ``n``-th generation batch, into a log of its own in ``out_dir``) and return its
            :class:`ExtractionStats`; nothing is judged or captured. Once the ``n`` shards
            are done, a run without ``shard`` reuses all they generated and finishes: the
            same responses, scores and vectors as a run that was never split.

    Returns:
        :class:`ExtractionResult`; ``result.vector`` is the ``response_mean`` vector
        (with ``shard``: the shard's :class:`ExtractionStats`).

    Raises:
        ExtractionError: no pair survived the filter (the message says which thresholds
            failed how often), or no response gave a sample to a mean.
        persona_lens.judge.JudgeError: the judge failed (timeouts, text instead of numbers,
            a wrong number of scores).
            Everything finished before the error is on disk and reused by a rerun.
        persona_lens.traits.TraitError: an unknown or malformed trait.

    Example:
        >>> result = pl.extract(probe, trait, judge=judge, samples=1, questions=2,
        ...                     instructions=2, max_new_tokens=48, progress=False, verbose=False)
        >>> result.stats.kept > 0
        True
        >>> path = result.vector.save("evil.safetensors")

        Split in two (e.g. two jobs on two GPUs), then finished in one process:

        >>> kw = dict(samples=1, questions=2, instructions=2, max_new_tokens=48, batch_size=4,
        ...           progress=False, verbose=False)
        >>> [pl.extract(probe, trait, judge, out_dir="split", shard=(i, 2), **kw).generated for i in range(2)]
        [4, 4]
        >>> whole = pl.extract(probe, trait, judge, out_dir="split", **kw)   # judges, filters, captures
        >>> whole.stats.generated, whole.stats.reused, whole.stats.kept > 0
        (0, 8, True)
    """
    from persona_lens.probe import GenerationSettings, PersonaProbe

    t_start = time.perf_counter()
    if not isinstance(probe, PersonaProbe):
        raise V.InvalidArgumentType("probe", probe, "a PersonaProbe")
    trait = resolve_trait(trait, model=probe.model_name)
    samples = V.integer("samples", samples, min=1)
    # Every setting is checked here, before anything is generated or written.
    gen = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    V.integer("seed", seed)
    for name, value in (("batch_size", batch_size), ("capture_batch_size", capture_batch_size),
                        ("judge_batch_size", judge_batch_size)):
        V.integer(name, value, min=1)
    V.optional_boolean("progress", progress)
    V.boolean("verbose", verbose)
    shard = V.shard("shard", shard, none_ok=True)
    thresholds = Thresholds.coerce(thresholds)
    if judge is not None and not all(callable(getattr(judge, m, None)) for m in ("score_trait", "score_coherence")):
        raise V.InvalidArgumentType("judge", judge, "a Judge (score_trait and score_coherence) or None")
    if layers is not None:
        layers = probe._layers(layers)
    q_idx = _select("questions", questions, len(trait.questions))
    i_idx = _select("instructions", instructions, len(trait.instructions))
    model = probe.model_name or "unnamed-model"
    judge_name = None if judge is None else _judge_name(judge)
    out = V.path("out_dir", out_dir) if out_dir is not None else Path("persona_runs") / slug(trait.name) / slug(model)
    if out.exists() and not out.is_dir():
        raise V.InvalidArgument("out_dir", str(out), "a folder (this is a file)")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature,
                "top_p": gen.top_p, "seed": gen.seed}
    stats = ExtractionStats()

    # Provenance: the trait as used, and the run's settings (written by the run that finishes,
    # not by shards writing side by side).
    if shard is None:
        try:
            trait.to_json(out / "trait")
        except Exception:  # a name unusable as a file name must not stop the run
            pass
        write_json(out / "run.json", {
            "model": model, "trait": trait.name, "judge": judge_name, "settings": settings,
            "samples": samples, "questions": q_idx, "instructions": i_idx,
            "thresholds": asdict(thresholds), "n_layers": probe.n_layers, "d_model": probe.d_model,
        })

    # 1. Contrastive generation.
    tasks: list[Task] = []
    for i in i_idx:
        pos_sys, neg_sys = trait.system_prompts(i)
        for q in q_idx:
            for s in range(samples):
                for pol, system in (("pos", pos_sys), ("neg", neg_sys)):
                    tasks.append(Task(f"{pol}-i{i}-q{q}-s{s}", pol, i, q, s, system, trait.questions[q]))
    stats.responses = len(tasks)
    store = Store(out, shard=shard)
    t0 = time.perf_counter()
    answers = store.generate(
        probe, [Prompt(t.prompt(), sample=t.sample, id=t.id, meta=asdict(t)) for t in tasks],
        settings=settings, batch_size=batch_size, progress=progress,
        desc=f"generate {trait.name}" + (f" (shard {shard[0]} of {shard[1]})" if shard else ""),
        # A batch's seed follows its first slot, as it always has: a seed gives the texts it gave.
        batch_seed=lambda batch: derived_seed(settings["seed"], batch[0].id),
    )
    stats.generated, stats.reused, stats.stale = answers.generated, answers.reused, answers.stale
    if shard is not None:
        stats.seconds["generate"] = stats.seconds["total"] = round(time.perf_counter() - t0, 2)
        if verbose:
            print(f"shard {shard[0]} of {shard[1]}: {answers.generated} responses generated, {answers.reused} "
                  f"reused, {answers.pending} left to other shards ({out})")
        return stats
    responses = {
        t.id: Response(**asdict(t), answer=r["answer"], model=r["model"], settings=r["settings"],
                       batch_seed=r["batch_seed"], n_tokens=r["n_tokens"], finished=r["finished"])
        for t, r in zip(tasks, answers.records)
    }
    stats.seconds["generate"] = round(time.perf_counter() - t0, 2)

    # 2. Judging.
    ordered = [responses[t.id] for t in tasks]
    scores: dict[str, dict[str, float | None]] = {}
    if judge is not None:
        t0 = time.perf_counter()
        got = store.score(
            judge, trait, [(r.question, r.answer) for r in ordered], ids=[r.id for r in ordered],
            batch_size=judge_batch_size, progress=progress, desc=f"judge {trait.name}",
        )
        stats.judged, stats.judge_reused = got.asked, got.reused
        for j, r in enumerate(ordered):
            scores[r.id] = {kind: got[kind][j] for kind in KINDS}
        stats.unscored = sum(s["trait"] is None for s in scores.values())
        stats.seconds["judge"] = round(time.perf_counter() - t0, 2)

    # 3. Paired filter.
    kept, rows, failed = _filter_pairs(responses, tasks, scores, thresholds, judge is not None)
    stats.pairs = len(rows)
    stats.kept = len(kept)
    stats.failed = failed
    pairs_path = write_text(out / "pairs.csv", _pairs_csv(rows))
    if not kept:
        raise ExtractionError(_no_pairs_message(stats, thresholds, judge_name, out))

    # 4. Activations and vectors.
    t0 = time.perf_counter()
    kept_hash = fingerprint(model_key(probe), [(p.pos.id, p.pos.answer, p.neg.id, p.neg.answer) for p in kept],
                            list(layers) if layers is not None else None)
    notes = {
        "judge": judge_name,
        "filter": ("paired judge filter: " + thresholds.describe()) if judge is not None
        else "none: every pair kept (plain contrastive mean difference, no judge)",
        "thresholds": asdict(thresholds) if judge is not None else None,
        "pairs": stats.pairs,
        "kept_pairs": stats.kept,
        "samples": samples,
        "questions": q_idx,
        "instructions": i_idx,
        "generation": settings,
        "kept_hash": kept_hash,
    }
    vec_dir = out / "vectors"
    vector_paths = {r: vec_dir / f"{slug(trait.name)}_{r}.safetensors" for r in REDUCTIONS}
    vectors = _load_cached_vectors(vector_paths, kept_hash, probe)
    if vectors is not None:
        stats.vectors_reused = True
        # The same kept answers give the same numbers; the provenance is this run's (another
        # judge or thresholds can keep the same pairs).
        for r, v in vectors.items():
            if v.notes != {**v.notes, **notes}:
                v.notes = {**v.notes, **notes}
                v.save(vector_paths[r])
    else:
        vectors = _compute_vectors(probe, kept, trait.name, model, notes, layers,
                                   capture_batch_size, progress)
        for r, v in vectors.items():
            v.save(vector_paths[r])
    stats.n_pos = vectors["response_mean"].n_pos or 0
    stats.n_neg = vectors["response_mean"].n_neg or 0
    stats.seconds["vectors"] = round(time.perf_counter() - t0, 2)
    stats.seconds["total"] = round(time.perf_counter() - t_start, 2)

    result = ExtractionResult(
        trait=trait, judge_name=judge_name, vectors=vectors, kept=kept, stats=stats,
        thresholds=thresholds, out_dir=out, responses_path=store.generations_log.path,
        scores_path=store.scores_log.path, pairs_path=pairs_path, summary_path=out / "summary.json",
        vector_paths=vector_paths,
    )
    write_json(result.summary_path, {
        "model": model, "trait": trait.name, "judge": judge_name, "stats": asdict(stats),
        "vectors": {r: str(p) for r, p in vector_paths.items()},
    })
    if verbose:
        print(result.summary())
    return result


_FAIL_NAMES = ("pos trait", "neg trait", "pos coherence", "neg coherence")


def _filter_pairs(
    responses: dict[str, Response],
    tasks: Sequence[Task],
    scores: dict[str, dict[str, float | None]],
    th: Thresholds,
    judged: bool,
) -> tuple[list[KeptPair], list[dict[str, Any]], dict[str, int]]:
    kept: list[KeptPair] = []
    rows: list[dict[str, Any]] = []
    failed = {k: 0 for k in _FAIL_NAMES}
    for t in tasks:
        if t.polarity != "pos":
            continue
        pos = responses[t.id]
        neg = responses[f"neg-i{t.instruction}-q{t.question_index}-s{t.sample}"]
        ps, ns = scores.get(pos.id, {}), scores.get(neg.id, {})
        pair = KeptPair(pos, neg, ps.get("trait"), ns.get("trait"), ps.get("coherence"), ns.get("coherence"))
        reasons = []
        if judged:
            if pair.pos_trait is None or pair.pos_trait < th.pos_trait:
                reasons.append("pos trait")
            if pair.neg_trait is None or pair.neg_trait >= th.neg_trait:
                reasons.append("neg trait")
            if pair.pos_coherence is None or pair.pos_coherence < th.coherence:
                reasons.append("pos coherence")
            if pair.neg_coherence is None or pair.neg_coherence < th.coherence:
                reasons.append("neg coherence")
        for r in reasons:
            failed[r] += 1
        if not reasons:
            kept.append(pair)
        rows.append({
            "instruction": t.instruction, "question_index": t.question_index, "sample": t.sample,
            "pos_trait": pair.pos_trait, "neg_trait": pair.neg_trait,
            "pos_coherence": pair.pos_coherence, "neg_coherence": pair.neg_coherence,
            "kept": not reasons, "failed": ";".join(reasons),
        })
    return kept, rows, failed


def _pairs_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    fields = ["instruction", "question_index", "sample", "pos_trait", "neg_trait",
              "pos_coherence", "neg_coherence", "kept", "failed"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in fields})
    return buf.getvalue()


def _no_pairs_message(stats: ExtractionStats, th: Thresholds, judge_name: str | None, out: Path) -> str:
    f = stats.failed
    parts = [
        f"pos trait >= {th.pos_trait:g} failed {f.get('pos trait', 0)}",
        f"neg trait < {th.neg_trait:g} failed {f.get('neg trait', 0)}",
        f"pos coherence >= {th.coherence:g} failed {f.get('pos coherence', 0)}",
        f"neg coherence >= {th.coherence:g} failed {f.get('neg coherence', 0)}",
    ]
    unscored = f" ({stats.unscored} responses had no trait score)" if stats.unscored else ""
    return (
        f"no (pos, neg) pair passed the filter: {stats.responses} responses generated, "
        f"{stats.pairs} pairs judged by {judge_name}; {'; '.join(parts)}{unscored}. "
        f"Scores per pair are in {out / 'pairs.csv'}; try more samples, lower thresholds or "
        "another judge (a rerun reuses every generation and score)"
    )


def _load_cached_vectors(paths: dict[str, Path], kept_hash: str, probe: "PersonaProbe") -> dict[str, PersonaVector] | None:
    if not all(p.exists() for p in paths.values()):
        return None
    out = {}
    for r, p in paths.items():
        try:
            v = PersonaVector.load(p)
        except (ValueError, FileNotFoundError):
            return None
        if (v.notes.get("kept_hash") != kept_hash or v.n_layers != probe.n_layers
                or v.d_model != probe.d_model or v.position != r):
            return None
        out[r] = v
    return out


def _compute_vectors(
    probe: "PersonaProbe",
    kept: Sequence[KeptPair],
    trait_name: str,
    model: str,
    notes: dict[str, Any],
    layers: Sequence[int] | None,
    batch_size: int,
    progress: bool | None,
) -> dict[str, PersonaVector]:
    means = {}
    for pol in POLARITIES:
        convs = [(p.pos if pol == "pos" else p.neg).conversation() for p in kept]
        if progress is not False:
            progress_note(f"capturing activations of {len(convs)} {pol} responses")
        means[pol] = probe.capture_mean(convs, layers=layers, reductions=REDUCTIONS,
                                        batch_size=batch_size, progress=progress)
    vectors = {}
    for r in REDUCTIONS:
        n_pos, n_neg = means["pos"].counts.get(r, 0), means["neg"].counts.get(r, 0)
        if n_pos == 0 or n_neg == 0:
            raise ExtractionError(
                f"no {'positive' if n_pos == 0 else 'negative'} sample contributed to the {r} mean "
                "(every kept response is empty); raise max_new_tokens or check the generations")
        vectors[r] = PersonaVector.from_means(
            means["pos"].full(r, probe.n_layers), means["neg"].full(r, probe.n_layers),
            model_name=model, trait=trait_name, position=r, n_pos=n_pos, n_neg=n_neg,
            notes=dict(notes, skipped_empty={"pos": means["pos"].skipped.get(r, 0),
                                             "neg": means["neg"].skipped.get(r, 0)}),
        )
    return vectors


def iter_responses(path: str | Path) -> Iterable[Response]:
    """Read ``responses.jsonl`` back as :class:`Response` records (latest line per id), with
    the shards' logs beside it (``responses.shard-i-of-N.jsonl``) merged as a Store merges them."""
    from persona_lens.store import log_files

    path = Path(path)
    latest: dict[str, dict[str, Any]] = {}
    for log in log_files(path.parent, path.name):
        for rec in JsonlLog(log).read():
            if "id" in rec:
                latest[rec["id"]] = rec
    return [Response.from_record(r) for r in latest.values()]


def load_run(out_dir: str | Path) -> dict[str, Any]:
    """The ``run.json`` of an extraction run."""
    return read_json(Path(out_dir) / "run.json")
