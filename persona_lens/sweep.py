"""The layer sweep: steer with each layer's vector at several coefficients, judge, choose.

This is the paper's layer choice (docs/method.md, "Extraction", step 7) and experiment E1: for each
``(layer, coef)`` cell the model answers the trait's held-out evaluation questions while
``coef * vector[layer]`` is added to the residual stream; a judge scores every answer for the
trait and for coherence. The chosen layer is the one whose steering gives the highest mean
trait score among the cells that stay coherent (mean coherence >= ``coherence_floor``).

With ``out_dir`` every generation and score is written as it is produced
(``sweep_responses.jsonl``, ``scores.jsonl``: a :class:`persona_lens.store.Store`) and reused
by a rerun; the table goes to ``sweep.csv`` and the figure to ``sweep.html``.

Example:
    >>> res = pl.sweep(probe, vec, trait, layers=[2, 3], coefs=[0, 1.5], judge=judge, questions=4,
    ...                max_new_tokens=48, out_dir="runs/evil/sweep", progress=False)
    >>> res.cell(2, 1.5).trait > res.cell(2, 0).trait + 30      # steering at layer 2 elicits
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
        """The layer of :attr:`best` (None if no steered cell stays coherent)."""
        b = self.best
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
        best = self.best
        out.append("(trait / coherence; best: "
                   + (f"layer {best.layer} at coef {best.coef:g}, trait {fmt(best.trait, decimals=1)}, "
                      f"coherence {fmt(best.coherence, decimals=1)}" if best else
                      f"none: no steered cell has coherence >= {self.coherence_floor:g}") + ")")
        return "\n".join(out)

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
        coefficient, and the ``(row, column)`` of ``chosen`` (default :attr:`best`)."""
        chosen = self.best if chosen is None else chosen
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
        (the paper's E1 view); ``highlight`` (default :attr:`best_layer`) is drawn thicker."""
        from persona_lens.plot import sweep_figure

        if title is None:
            title = f"Steering sweep: {self.trait_name or 'trait'}"
            if self.model_name:
                title += f" on {self.model_name}"
        return sweep_figure(
            self.cells, coherence_floor=self.coherence_floor,
            highlight=self.best_layer if highlight is None else highlight, title=title,
            trait_title=f"{self.trait_name} score" if self.trait_name else "trait score",
        )

    def to_html(self, path: str | Path | None = None, *, lowest: bool = False, title: str | None = None) -> str:
        """A standalone HTML page: the figure and the table, with plotly.js embedded (it opens
        offline). Also written to ``path`` if given.

        Args:
            lowest: the chosen cell is :attr:`lowest` (a suppression sweep), not :attr:`best`.
            title: the page's and the figure's title.
        """
        from persona_lens.report import Page

        chosen = self.lowest if lowest else self.best
        page = Page(title or f"{self.trait_name or 'trait'} sweep",
                    subtitle=f"model {self.model_name or '?'}, judge {self.judge_name or '?'}")
        page.figure(self.figure(highlight=chosen.layer if chosen else None, title=title))
        header, rows, marks = self.table_rows(chosen)
        page.table(header, rows, caption=self.caption(), highlight=marks)
        rule = "lowest" if lowest else "highest"
        page.text(f"chosen ({rule} trait score among cells with coherence >= {self.coherence_floor:g}): "
                  + (f"layer {chosen.layer} at coef {chosen.coef:g}" if chosen else "none"))
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
    positions: str = "response",
    include_last_prompt: bool | None = None,
    batch_size: int = 32,
    judge_batch_size: int = 64,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool | None = True,
) -> SweepResult:
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
        positions: where to steer (see :meth:`PersonaProbe.steer`): ``"response"`` (the
            default, the paper's: the last prompt token and every generated token),
            ``"response_only"``, ``"all"`` or ``"prompt"``. ``include_last_prompt`` is
            deprecated.
        out_dir: cache and outputs (``sweep_responses.jsonl``, ``scores.jsonl``,
            ``sweep.csv``, ``sweep.html``); None keeps everything in memory.

    Returns:
        :class:`SweepResult` with ``best_layer``, ``figure()``, ``to_csv()``, ``to_html()``.
    """
    from persona_lens.interventions import steering_mode
    from persona_lens.probe import GenerationSettings, PersonaProbe

    if not isinstance(probe, PersonaProbe):
        raise V.InvalidArgumentType("probe", probe, "a PersonaProbe")
    trait = resolve_trait(trait)
    if not isinstance(vector, PersonaVector):
        vector = PersonaVector.load(V.path("vector", vector))
    layers = [probe.check_layer(l, name=f"layers[{i}]") for i, l in
              enumerate(V.items("layers", layers, what="a list of layers", nonempty=True))]
    coefs = [V.number(f"coefs[{i}]", c) for i, c in
             enumerate(V.items("coefs", coefs, what="a list of steering coefficients", nonempty=True))]
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
    if not all(callable(getattr(judge, m, None)) for m in ("score_trait", "score_coherence")):
        raise V.InvalidArgumentType("judge", judge, "a Judge (score_trait and score_coherence)")
    if questions is None:
        qs = list(trait.eval_questions)
    elif not isinstance(questions, (str, bytes)) and not hasattr(questions, "__iter__"):
        qs = list(trait.eval_questions[: V.integer("questions", questions, min=1)])
    else:
        qs = [V.text(f"questions[{i}]", q, empty_ok=False) for i, q in
              enumerate(V.items("questions", questions, what="a list of question strings, a count or None"))]
    if not qs:
        raise ValueError(f"trait {trait.name!r} has no evaluation questions; pass questions=[...]")
    if system is not None:
        system = V.text("system", system, empty_ok=False)
    base_settings = {"max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature, "seed": gen.seed}

    out = V.path("out_dir", out_dir, none_ok=True)
    if out is not None:
        if out.exists() and not out.is_dir():
            raise V.InvalidArgument("out_dir", str(out), "a folder (this is a file)")
        out.mkdir(parents=True, exist_ok=True)
    store = Store(out, generations="sweep_responses.jsonl")

    # One prompt per (cell, question, sample); coef 0 is unsteered, so every layer's baseline
    # has the same keys and is generated once. The seed key is (question, sample) alone:
    # common random numbers, so cells differ only by the steering.
    work: list[tuple[int, float, list[Prompt]]] = []
    for layer in layers:
        for coef in coefs:
            steer = None if coef == 0 else Steering(vector, layer=layer, coef=coef, positions=positions)
            prompts = [Prompt(question if system is None else
                              [{"role": "system", "content": system}, {"role": "user", "content": question}],
                              sample=s, steer=steer, seed_key=(q, s),
                              meta={"layer": layer if coef != 0 else None, "coef": coef, "question_index": q,
                                    "question": question})
                       for q, question in enumerate(qs) for s in range(samples)]
            work.append((layer, coef, prompts))
    all_prompts = [p for _, _, prompts in work for p in prompts]
    t0 = time.perf_counter()
    answers = store.generate(probe, all_prompts, settings=base_settings, batch_size=batch_size,
                             progress=progress, desc=f"sweep generate {trait.name}")
    gen_seconds = time.perf_counter() - t0

    # Judging: every distinct answer once.
    unique = {k: (p.question, text) for p, k, text in zip(all_prompts, answers.keys, answers.texts)}
    got = store.score(judge, trait, list(unique.values()), ids=list(unique), batch_size=judge_batch_size,
                      progress=progress, desc=f"sweep judge {trait.name}")
    by_key = {k: (got["trait"][i], got["coherence"][i]) for i, k in enumerate(unique)}

    cells = []
    keys = iter(answers.keys)
    for layer, coef, prompts in work:
        cell_keys = [next(keys) for _ in prompts]
        t_mean, n_t = mean_score([by_key[k][0] for k in cell_keys])
        c_mean, n_c = mean_score([by_key[k][1] for k in cell_keys])
        cells.append(SweepCell(layer, coef, t_mean, c_mean, len(cell_keys), n_t, n_c))
    result = SweepResult(
        cells=cells, coherence_floor=coherence_floor, trait_name=trait.name,
        model_name=probe.model_name or "unnamed-model", judge_name=judge_name(judge),
        stats={"generated": answers.generated, "reused": answers.reused, "judged": got.asked,
               "judge_reused": got.reused, "generate_seconds": round(gen_seconds, 2)},
        out_dir=out,
    )
    if out is not None:
        result.to_csv(out / "sweep.csv")
        result.to_html(out / "sweep.html")
    return result
