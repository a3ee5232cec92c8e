"""The layer sweep: steer with each layer's vector at several coefficients, judge, choose.

This is the paper's layer choice (docs/method.md, "Extraction", step 7) and experiment E1: for each
``(layer, coef)`` cell the model answers the trait's held-out evaluation questions while
``coef * vector[layer]`` is added to the residual stream; a judge scores every answer for the
trait and for coherence. The chosen layer is the one whose steering gives the highest mean
trait score among the cells that stay coherent (mean coherence >= ``coherence_floor``), or,
for a suppression sweep (``choose="lowest"``), the lowest.

A cell chosen as the best of a grid is biased upwards when it is reported on the answers it
was chosen from (the maximum of noisy means). So the sweep re-measures the chosen cell, and
the unsteered baseline, on answers that played no part in the choice (``heldout``): fresh
samples of the same questions by default, or other questions. :attr:`SweepResult.heldout`
is the figure to report; :attr:`SweepResult.chosen` (on the grid's answers) is kept beside
it to show the size of the selection effect.

With ``out_dir`` every generation and score is written as it is produced
(``sweep_responses.jsonl``, ``scores.jsonl``: a :class:`persona_lens.store.Store`) and reused
by a rerun; the table goes to ``sweep.csv`` and the figure to ``sweep.html``. With
``shard=(i, n)`` a run generates only its share of the grid's answers and stops; ``n`` such runs
(:func:`persona_lens.scale.sweep` runs them on Ray workers), then one without ``shard``, give the
table of a single run.

Example:
    >>> res = pl.sweep(probe, vec, trait, layers=[3, 5], coefs=[0, 1.5], judge=judge, questions=4,
    ...                max_new_tokens=48, out_dir="runs/evil/sweep", progress=False)
    >>> res.cell(3, 1.5).trait > res.cell(3, 0).trait + 30      # steering at layer 3 elicits
    True
    >>> (res.heldout.layer, res.heldout.coef) == (res.chosen.layer, res.chosen.coef)   # re-measured
    True
    >>> res.heldout.trait > res.heldout_baseline.trait + 30      # on answers not used to choose it
    True
    >>> fig = res.figure()                                        # fig.show() in a notebook
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from persona_lens import validate as V
from persona_lens.pipeline_io import write_text
from persona_lens.stats import fmt, mean_score
from persona_lens.store import Prompt, Steering, Store, judge_name
from persona_lens.traits import resolve_trait
from persona_lens.vectors import PersonaVector

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from persona_lens.judge import Judge
    from persona_lens.probe import PersonaProbe
    from persona_lens.traits import Trait

__all__ = ["SweepCell", "SweepResult", "sweep"]


@dataclass
class SweepCell:
    """Mean judged scores of one (layer, coef) cell.

    ``trait`` and ``coherence`` are means over answers that got a score (NaN if none);
    ``n`` answers in all, ``n_trait`` / ``n_coherence`` of them scored.
    """

    layer: int
    coef: float
    trait: float
    coherence: float
    n: int
    n_trait: int
    n_coherence: int


@dataclass
class SweepResult:
    """The sweep table, the chosen layer, and exports.

    Attributes:
        cells: one :class:`SweepCell` per (layer, coef), layers outer.
        coherence_floor: cells below it cannot be chosen.
        choose: ``"highest"`` (steering: :attr:`best`) or ``"lowest"`` (suppression:
            :attr:`lowest`): which cell :attr:`chosen` is.
        heldout / heldout_baseline: the chosen cell and the unsteered baseline re-measured
            on answers not used to choose (None when the sweep was run without
            ``heldout``, or nothing qualified); ``heldout_how`` says which answers.
        trait_name, model_name, judge_name: provenance.
        stats: generations and judge calls made now vs read back from disk.
        out_dir: where results were written (None if in memory only).
    """

    cells: list[SweepCell]
    coherence_floor: float = 50.0
    trait_name: str | None = None
    model_name: str | None = None
    judge_name: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    choose: str = "highest"
    heldout: SweepCell | None = None
    heldout_baseline: SweepCell | None = None
    heldout_how: str | None = None

    @property
    def chosen(self) -> SweepCell | None:
        """The cell the grid chose: :attr:`best` (``choose="highest"``) or :attr:`lowest`."""
        return self.lowest if self.choose == "lowest" else self.best

    def __repr__(self) -> str:
        from persona_lens.display import sweep_repr

        return sweep_repr(self)

    def _repr_html_(self) -> str:
        """In a notebook: the table, the chosen cell marked (``display``)."""
        from persona_lens.display import sweep_html

        return sweep_html(self)

    @property
    def layers(self) -> list[int]:
        return sorted({c.layer for c in self.cells})

    @property
    def coefs(self) -> list[float]:
        return sorted({c.coef for c in self.cells})

    def cell(self, layer: int, coef: float) -> SweepCell:
        for c in self.cells:
            if c.layer == layer and c.coef == coef:
                return c
        raise KeyError(f"no cell for layer {layer}, coef {coef}")

    @property
    def best(self) -> SweepCell | None:
        """The steered cell (coef != 0) with the highest mean trait score among those whose
        mean coherence is at least the floor; None if no cell qualifies."""
        ok = [c for c in self.cells
              if c.coef != 0 and not math.isnan(c.trait) and not math.isnan(c.coherence)
              and c.coherence >= self.coherence_floor]
        return max(ok, key=lambda c: (c.trait, -abs(c.coef)), default=None)

    @property
    def best_layer(self) -> int | None:
        """The layer of :attr:`chosen`: the highest trait score, or the lowest for a
        suppression sweep (``choose="lowest"``); None if no steered cell stays coherent."""
        b = self.chosen
        return None if b is None else b.layer

    def rows(self) -> list[dict[str, Any]]:
        return [dict(layer=c.layer, coef=c.coef, trait=c.trait, coherence=c.coherence, n=c.n,
                     n_trait=c.n_trait, n_coherence=c.n_coherence) for c in self.cells]

    def to_csv(self, path: str | Path | None = None) -> str:
        """The table as CSV text; also written to ``path`` if given."""
        buf = io.StringIO()
        rows = self.rows()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["layer", "coef"])
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
        text = buf.getvalue()
        if path is not None:
            write_text(path, text)
        return text

    def table(self) -> str:
        """A plain-text table (rows: layers; columns: coefs; cells: trait / coherence)."""
        coefs = self.coefs
        head = ["layer"] + [f"coef {c:g}" for c in coefs]
        lines = []
        for layer in self.layers:
            row = [str(layer)]
            for c in coefs:
                try:
                    cell = self.cell(layer, c)
                    row.append(f"{fmt(cell.trait, decimals=1)} / {fmt(cell.coherence, decimals=1)}")
                except KeyError:
                    row.append("-")
            lines.append(row)
        widths = [max(len(r[i]) for r in [head] + lines) for i in range(len(head))]
        out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in lines]
        best = self.chosen
        word = "lowest" if self.choose == "lowest" else "best"
        out.append(f"(trait / coherence; {word}: "
                   + (f"layer {best.layer} at coef {best.coef:g}, trait {fmt(best.trait, decimals=1)}, "
                      f"coherence {fmt(best.coherence, decimals=1)}" if best else
                      f"none: no steered cell has coherence >= {self.coherence_floor:g}") + ")")
        if self.heldout is not None:
            out.append(self.heldout_line())
        return "\n".join(out)

    def heldout_line(self) -> str:
        """One line: the chosen cell on held-out answers, next to its grid figures."""
        h, b, c = self.heldout, self.heldout_baseline, self.chosen
        if h is None or c is None:
            return "held-out: not measured"
        base = f"; unsteered {fmt(b.trait, decimals=1)}" if b is not None else ""
        return (f"held-out ({self.heldout_how}): layer {h.layer} at coef {h.coef:g}: trait "
                f"{fmt(h.trait, decimals=1)}, coherence {fmt(h.coherence, decimals=1)} (n = {h.n}){base}; "
                f"on the answers it was chosen from: trait {fmt(c.trait, decimals=1)}, coherence "
                f"{fmt(c.coherence, decimals=1)}")

    def summary(self) -> dict[str, Any]:
        """The choice and its figures as JSON: on the grid's answers and held out.

        Example:
            >>> res = SweepResult([SweepCell(2, 0.0, 5.0, 99.0, 4, 4, 4), SweepCell(2, 1.5, 70.0, 90.0, 4, 4, 4)],
            ...                   coherence_floor=80)
            >>> res.summary()["chosen"]["trait"], res.summary()["heldout"]
            (70.0, None)
        """
        from dataclasses import asdict

        c = self.chosen
        return {"choose": self.choose, "coherence_floor": self.coherence_floor,
                "chosen": asdict(c) if c is not None else None,
                "heldout": asdict(self.heldout) if self.heldout is not None else None,
                "heldout_baseline": asdict(self.heldout_baseline) if self.heldout_baseline is not None else None,
                "heldout_how": self.heldout_how}

    @property
    def lowest(self) -> SweepCell | None:
        """The steered cell with the lowest mean trait score among those whose mean coherence
        is at least the floor (the smallest ``|coef|`` on a tie): the choice when steering
        suppresses a trait. None if no cell qualifies."""
        ok = [c for c in self.cells
              if c.coef != 0 and not math.isnan(c.trait) and not math.isnan(c.coherence)
              and c.coherence >= self.coherence_floor]
        return min(ok, key=lambda c: (c.trait, abs(c.coef)), default=None)

    def table_rows(self, chosen: SweepCell | None = None) -> tuple[list[str], list[list[str]], list[tuple[int, int]]]:
        """The table for a page: header, rows (layers) of ``trait / coherence`` per
        coefficient, and the ``(row, column)`` of ``chosen`` (default :attr:`chosen`)."""
        chosen = self.chosen if chosen is None else chosen
        coefs = self.coefs
        header = ["layer"] + [f"coef {c:g}" for c in coefs]
        rows, marks = [], []
        for i, layer in enumerate(self.layers):
            row = [str(layer)]
            for j, c in enumerate(coefs, start=1):
                try:
                    cell = self.cell(layer, c)
                except KeyError:
                    row.append("-")
                    continue
                row.append(f"{fmt(cell.trait, decimals=1)} / {fmt(cell.coherence, decimals=1)}")
                if chosen is not None and (cell.layer, cell.coef) == (chosen.layer, chosen.coef):
                    marks.append((i, j))
            rows.append(row)
        return header, rows, marks

    def caption(self) -> str:
        """What the table's cells are, their scale and sample size."""
        ns = sorted({c.n for c in self.cells})
        n = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
        return (f"Each cell: mean trait score / mean coherence of the judged answers (both 0-100; "
                f"n = {n} answers per cell; coef 0 is the unsteered baseline, shared by all layers). "
                f"Cells below coherence {self.coherence_floor:g} cannot be chosen.")

    def figure(self, highlight: int | None = None, *, title: str | None = None) -> "go.Figure":
        """Judged trait score (left) and coherence (right) vs coefficient, one line per layer
        (the paper's E1 view); ``highlight`` (default the :attr:`chosen` layer) is drawn thicker."""
        from persona_lens.plot import sweep_figure

        if title is None:
            title = f"Steering sweep: {self.trait_name or 'trait'}"
            if self.model_name:
                title += f" on {self.model_name}"
        return sweep_figure(
            self.cells, coherence_floor=self.coherence_floor,
            highlight=(self.chosen.layer if self.chosen else None) if highlight is None else highlight, title=title,
            trait_title=f"{self.trait_name} score" if self.trait_name else "trait score",
        )

    def to_html(self, path: str | Path | None = None, *, lowest: bool | None = None, title: str | None = None) -> str:
        """A standalone HTML page: the figure and the table, with plotly.js embedded (it opens
        offline). Also written to ``path`` if given.

        Args:
            lowest: the chosen cell is :attr:`lowest` (a suppression sweep), not :attr:`best`
                (default: as :attr:`choose` says).
            title: the page's and the figure's title.
        """
        from persona_lens.report import Page

        lowest = self.choose == "lowest" if lowest is None else lowest
        chosen = self.lowest if lowest else self.best
        page = Page(title or f"{self.trait_name or 'trait'} sweep",
                    subtitle=f"model {self.model_name or '?'}, judge {self.judge_name or '?'}")
        page.figure(self.figure(highlight=chosen.layer if chosen else None, title=title))
        header, rows, marks = self.table_rows(chosen)
        page.table(header, rows, caption=self.caption(), highlight=marks)
        rule = "lowest" if lowest else "highest"
        page.text(f"chosen ({rule} trait score among cells with coherence >= {self.coherence_floor:g}): "
                  + (f"layer {chosen.layer} at coef {chosen.coef:g}" if chosen else "none"))
        if self.heldout is not None:
            page.text(self.heldout_line() + ". The held-out figure is the one to report: the grid's best cell is "
                      "biased upwards on the answers it was chosen from.")
        text = page.html()
        if path is not None:
            write_text(path, text)
        return text


def sweep(
    probe: "PersonaProbe",
    vector: PersonaVector | str | Path,
    trait: "Trait | str",
    *,
    layers: Sequence,
    coefs: Sequence,
    judge: "Judge",
    questions: Sequence | int | None = None,
    system: str | None = None,
    samples: int = 1,
    max_new_tokens: int = 1000,
    temperature: float = 1.0,
    coherence_floor: float = 50.0,
    choose: str = "highest",
    heldout: "str | int | Sequence | None" = "samples",
    heldout_samples: int | None = None,
    positions: str = "response",
    include_last_prompt: bool | None = None,
    batch_size: int = 32,
    judge_batch_size: int = 64,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool | None = True,
    shard: tuple[int, int] | None = None,
) -> "SweepResult | dict[str, Any]":
    """Steer at each layer with each coefficient, judge the answers, and pick a layer.

    Args:
        probe: the model.
        vector: a :class:`PersonaVector` (or a path to one).
        trait: the trait (its ``eval_prompt`` is the rubric; its ``eval_questions`` the
            default questions).
        layers: layers to try.
        coefs: steering coefficients (the paper sweeps about 0..2.5). A coefficient of 0 is
            the unsteered baseline, generated once and shared by all layers.
        judge: scores trait and coherence.
        questions: question strings, the first N evaluation questions, or None for all.
        system: a system prompt in front of every question (e.g. one that encourages the
            trait, to measure how far negative coefficients suppress it); None: none.
        samples: answers per question and cell.
        max_new_tokens, temperature: generation settings. Every cell uses the same seeds for
            the same (question, sample), so cells differ only by the steering.
        coherence_floor: cells with a lower mean coherence cannot be chosen.
        choose: ``"highest"`` (steering towards the trait) or ``"lowest"`` (suppression, with
            negative coefficients): which coherent cell is chosen.
        heldout: answers to re-measure the chosen cell and the baseline on, none of them
            used to choose: ``"samples"`` (default: ``heldout_samples`` fresh samples of the
            same questions, sample indices after the grid's; not at temperature 0, where they
            would repeat the grid's answers), a list of other questions, a count (that many of
            the trait's evaluation questions the grid does not use, in order), or None (no
            re-measurement).
        heldout_samples: answers per question for the re-measurement (default ``samples``).
        positions: where to steer (see :meth:`PersonaProbe.steer`): ``"response"`` (the
            default, the paper's: the last prompt token and every generated token),
            ``"response_only"``, ``"all"`` or ``"prompt"``. ``include_last_prompt`` is
            deprecated.
        out_dir: cache and outputs (``sweep_responses.jsonl``, ``scores.jsonl``,
            ``sweep.csv``, ``sweep.html``); None keeps everything in memory.
        shard: ``(i, n)``: generate only shard ``i``'s share of the grid's answers (every
            ``n``-th generation batch, into a log of its own in ``out_dir``) and return the
            counts (``generated``, ``reused``, ``pending``: left to other shards); nothing is
            judged. Once the ``n`` shards are done, a run without ``shard`` reuses them, judges,
            chooses and re-measures the chosen cell: the table of a run never split.

    Returns:
        :class:`SweepResult` with ``chosen``, ``heldout``, ``figure()``, ``to_csv()``,
        ``to_html()`` (with ``shard``: the shard's counts).

    Example:
        >>> kw = dict(layers=[3, 5], coefs=[0, 1.5], judge=judge, questions=4, max_new_tokens=48, progress=False)
        >>> [pl.sweep(probe, vec, trait, out_dir="split", shard=(i, 2), **kw)["generated"] for i in range(2)]
        [8, 4]
        >>> res = pl.sweep(probe, vec, trait, out_dir="split", **kw)       # judges, chooses, re-measures
        >>> res.stats["reused"], res.cell(3, 1.5).trait > res.cell(3, 0).trait + 30
        (12, True)
    """
    from persona_lens.interventions import steering_mode
    from persona_lens.probe import GenerationSettings, PersonaProbe

    if not isinstance(probe, PersonaProbe):
        raise V.InvalidArgumentType("probe", probe, "a PersonaProbe")
    trait = resolve_trait(trait, model=probe.model_name)
    if not isinstance(vector, PersonaVector):
        vector = PersonaVector.load(V.path("vector", vector))
    layers = [probe.check_layer(l, name=f"layers[{i}]") for i, l in
              enumerate(V.items("layers", layers, what="a list of layers", nonempty=True))]
    coefs = [V.number(f"coefs[{i}]", c) for i, c in
             enumerate(V.items("coefs", coefs, what="a list of steering coefficients", nonempty=True))]
    for name, values in (("layers", layers), ("coefs", coefs)):
        if len(set(values)) != len(values):  # a cell twice would be measured twice and shown twice
            twice = sorted({v for v in values if values.count(v) > 1})
            raise V.InvalidArgument(name, values, "distinct values", f": {twice[0]:g} is given twice")
    checked = probe._vector(vector)
    for i, c in enumerate(coefs):
        for layer in layers:
            probe._check_steer_size(checked, layer, c, f"coefs[{i}]")
    samples = V.integer("samples", samples, min=1)
    gen = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    V.integer("seed", seed)
    coherence_floor = V.number("coherence_floor", coherence_floor, min=0, max=100)
    positions = steering_mode(positions, include_last_prompt, stacklevel=3)
    V.integer("batch_size", batch_size, min=1)
    V.integer("judge_batch_size", judge_batch_size, min=1)
    V.optional_boolean("progress", progress)
    shard = V.shard("shard", shard, none_ok=True)
    if shard is not None and out_dir is None:
        raise ValueError("a sharded sweep needs out_dir (the shards' logs meet there)")
    if not all(callable(getattr(judge, m, None)) for m in ("score_trait", "score_coherence")):
        raise V.InvalidArgumentType("judge", judge, "a Judge (score_trait and score_coherence)")
    if questions is None:
        qs = list(trait.eval_questions)
    elif not isinstance(questions, (str, bytes)) and not hasattr(questions, "__iter__"):
        n_q = V.integer("questions", questions, min=1)
        if n_q > len(trait.eval_questions):
            raise V.InvalidArgument("questions", questions, f"at most {len(trait.eval_questions)} (trait "
                                    f"{trait.name!r} has that many evaluation questions)")
        qs = list(trait.eval_questions[:n_q])
    else:
        qs = [V.text(f"questions[{i}]", q, empty_ok=False) for i, q in
              enumerate(V.items("questions", questions, what="a list of question strings, a count or None"))]
    if not qs:
        raise ValueError(f"trait {trait.name!r} has no evaluation questions; pass questions=[...]")
    if system is not None:
        system = V.text("system", system, empty_ok=False)
    choose = V.choice("choose", choose, ("highest", "lowest"))
    heldout_samples = samples if heldout_samples is None else V.integer("heldout_samples", heldout_samples, min=1)
    if heldout is None:
        hq, first_sample, how = [], 0, None
    elif heldout == "samples":
        if gen.temperature == 0:
            # greedy decoding gives the grid's own answers again: nothing would be held out
            raise V.InvalidArgument("heldout", heldout, "held-out questions (a count or a list) or None at "
                                    "temperature 0", hint=": fresh samples of greedy decoding repeat the grid's "
                                    "answers; or sample with temperature > 0")
        hq, first_sample = qs, samples
        how = f"{heldout_samples} fresh sample(s) of each of the {len(qs)} questions"
    elif isinstance(heldout, (str, bytes)):
        raise V.InvalidArgument("heldout", heldout, "'samples', a list of questions, a count or None")
    elif not hasattr(heldout, "__iter__"):
        n_held = V.integer("heldout", heldout, min=1)
        grid = set(qs)
        others = [q for q in trait.eval_questions if q not in grid]  # in order: the ones after the grid's first
        hq, first_sample = others[:n_held], 0
        if len(hq) < n_held:
            raise V.InvalidArgument("heldout", heldout, f"at most {len(others)} (the evaluation questions the "
                                    f"grid does not use)")
        how = f"{len(hq)} other question(s) x {heldout_samples} sample(s)"
    else:
        hq = [V.text(f"heldout[{i}]", q, empty_ok=False) for i, q in
              enumerate(V.items("heldout", heldout, what="'samples', a list of questions, a count or None"))]
        if not hq or set(hq) & set(qs):
            raise V.InvalidArgument("heldout", heldout, "a non-empty list of questions the grid does not use")
        first_sample = 0
        how = f"{len(hq)} other question(s) x {heldout_samples} sample(s)"
    base_settings = {"max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature, "seed": gen.seed}

    out = V.path("out_dir", out_dir, none_ok=True)
    if out is not None:
        if out.exists() and not out.is_dir():
            raise V.InvalidArgument("out_dir", str(out), "a folder (this is a file)")
        out.mkdir(parents=True, exist_ok=True)
    store = Store(out, generations="sweep_responses.jsonl", shard=shard)

    def cell_prompts(layer: int, coef: float, questions: list[str], sample_ids: range,
                     heldout: bool = False) -> list[Prompt]:
        steer = None if coef == 0 else Steering(vector, layer=layer, coef=coef, positions=positions)
        return [Prompt(question if system is None else
                       [{"role": "system", "content": system}, {"role": "user", "content": question}],
                       sample=s, steer=steer, seed_key=("held-out", question, s) if heldout else (q, s),
                       meta={"layer": layer if coef != 0 else None, "coef": coef, "question_index": q,
                             "question": question, **({"heldout": True} if heldout else {})})
                for q, question in enumerate(questions) for s in sample_ids]

    totals = {"generated": 0, "reused": 0, "judged": 0, "judge_reused": 0, "generate_seconds": 0.0}

    def generate(work: list[tuple[int, float, list[Prompt]]], what: str):
        t0 = time.perf_counter()
        answers = store.generate(probe, [p for _, _, prompts in work for p in prompts], settings=base_settings,
                                 batch_size=batch_size, progress=progress, desc=f"{what} generate {trait.name}")
        totals["generate_seconds"] += time.perf_counter() - t0
        return answers

    def measure(work: list[tuple[int, float, list[Prompt]]], what: str) -> list[SweepCell]:
        all_prompts = [p for _, _, prompts in work for p in prompts]
        answers = generate(work, what)
        # Judging: every distinct answer once.
        unique = {k: (p.question, text) for p, k, text in zip(all_prompts, answers.keys, answers.texts)}
        got = store.score(judge, trait, list(unique.values()), ids=list(unique), batch_size=judge_batch_size,
                          progress=progress, desc=f"{what} judge {trait.name}")
        for k, v in (("generated", answers.generated), ("reused", answers.reused), ("judged", got.asked),
                     ("judge_reused", got.reused)):
            totals[k] += v
        by_key = {k: (got["trait"][i], got["coherence"][i]) for i, k in enumerate(unique)}
        cells, keys = [], iter(answers.keys)
        for layer, coef, prompts in work:
            cell_keys = [next(keys) for _ in prompts]
            t_mean, n_t = mean_score([by_key[k][0] for k in cell_keys])
            c_mean, n_c = mean_score([by_key[k][1] for k in cell_keys])
            cells.append(SweepCell(layer, coef, t_mean, c_mean, len(cell_keys), n_t, n_c))
        return cells

    # One prompt per (cell, question, sample); coef 0 is unsteered, so every layer's baseline
    # has the same keys and is generated once. The seed key is (question, sample) alone:
    # common random numbers, so cells differ only by the steering.
    grid = [(layer, coef, cell_prompts(layer, coef, qs, range(samples))) for layer in layers for coef in coefs]
    if shard is not None:
        # The held-out cell depends on every shard's judged grid: the run that finishes measures it.
        answers = generate(grid, f"sweep (shard {shard[0]} of {shard[1]})")
        return {"generated": answers.generated, "reused": answers.reused, "pending": answers.pending,
                "generate_seconds": round(totals["generate_seconds"], 2)}
    cells = measure(grid, "sweep")
    result = SweepResult(
        cells=cells, coherence_floor=coherence_floor, trait_name=trait.name,
        model_name=probe.model_name or "unnamed-model", judge_name=judge_name(judge), out_dir=out, choose=choose,
    )
    chosen = result.chosen
    if how is not None and chosen is not None:
        held = range(first_sample, first_sample + heldout_samples)
        result.heldout, result.heldout_baseline = measure(
            [(chosen.layer, chosen.coef, cell_prompts(chosen.layer, chosen.coef, hq, held, heldout=True)),
             (chosen.layer, 0.0, cell_prompts(chosen.layer, 0.0, hq, held, heldout=True))], "held-out")
        result.heldout_how = how
    result.stats = {**totals, "generate_seconds": round(totals["generate_seconds"], 2)}
    if out is not None:
        result.to_csv(out / "sweep.csv")
        result.to_html(out / "sweep.html")
    return result
