"""The layer sweep: steer with each layer's vector at several coefficients, judge, choose.

This is the paper's layer choice (shared/paper.md, section 1.7) and experiment E1: for each
``(layer, coef)`` cell the model answers the trait's held-out evaluation questions while
``coef * vector[layer]`` is added to the residual stream; a judge scores every answer for the
trait and for coherence. The chosen layer is the one whose steering gives the highest mean
trait score among the cells that stay coherent (mean coherence >= ``coherence_floor``).

With ``out_dir`` every generation and score is written as it is produced
(``sweep_responses.jsonl``, ``scores.jsonl``) and reused by a rerun; the table goes to
``sweep.csv`` and the figure to ``sweep.html``.

Example:
    >>> res = pl.sweep(probe, vec, "evil", layers=[12, 16, 20], coefs=[0, 1, 2],
    ...                judge=OpenAIJudge("gpt-4.1-mini"), out_dir="runs/evil/sweep")
    >>> res.best_layer
    20
    >>> res.figure().show()
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tqdm.auto import tqdm

from persona_lens.extract import ScoreLog
from persona_lens.judge import mean_score
from persona_lens.progress import quiet as _quiet
from persona_lens.pipeline_io import JsonlLog, derived_seed, fingerprint, write_text
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
                    row.append(f"{_fmt(cell.trait)} / {_fmt(cell.coherence)}")
                except KeyError:
                    row.append("-")
            lines.append(row)
        widths = [max(len(r[i]) for r in [head] + lines) for i in range(len(head))]
        out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in lines]
        best = self.best
        out.append("(trait / coherence; best: "
                   + (f"layer {best.layer} at coef {best.coef:g}, trait {_fmt(best.trait)}, "
                      f"coherence {_fmt(best.coherence)}" if best else
                      f"none: no steered cell has coherence >= {self.coherence_floor:g}") + ")")
        return "\n".join(out)

    def figure(self) -> "go.Figure":
        """Judged trait score (left) and coherence (right) vs coefficient, one line per layer
        (the paper's E1 view)."""
        import plotly.graph_objects as go
        from plotly.colors import sample_colorscale
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("trait score", "coherence"))
        layers = self.layers
        colors = sample_colorscale("Viridis", [i / max(1, len(layers) - 1) for i in range(len(layers))])
        best = self.best_layer
        for layer, color in zip(layers, colors):
            cells = sorted((c for c in self.cells if c.layer == layer), key=lambda c: c.coef)
            x = [c.coef for c in cells]
            name = f"layer {layer}" + (" (best)" if layer == best else "")
            width = 4 if layer == best else 2
            for col, attr in ((1, "trait"), (2, "coherence")):
                fig.add_trace(go.Scatter(
                    x=x, y=[getattr(c, attr) for c in cells], mode="lines+markers", name=name,
                    legendgroup=str(layer), showlegend=col == 1, line=dict(color=color, width=width),
                    hovertemplate=f"layer {layer}<br>coef %{{x}}<br>{attr} %{{y:.1f}}<extra></extra>",
                ), row=1, col=col)
        fig.add_hline(y=self.coherence_floor, line_dash="dot", line_color="gray", row=1, col=2)
        for col in (1, 2):
            fig.update_xaxes(title_text="steering coefficient", row=1, col=col)
            fig.update_yaxes(range=[-2, 102], row=1, col=col)
        title = f"Steering sweep: {self.trait_name or 'trait'}"
        if self.model_name:
            title += f" on {self.model_name}"
        fig.update_layout(title=title, legend_title_text="layer", template="plotly_white")
        return fig

    def to_html(self, path: str | Path | None = None) -> str:
        """A standalone HTML page: the figure and the table. Also written to ``path`` if given."""
        fig_html = self.figure().to_html(full_html=False, include_plotlyjs="cdn")
        page = (
            "<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.trait_name or 'sweep')} sweep</title></head><body>"
            f"{fig_html}<pre>{html.escape(self.table())}</pre></body></html>\n"
        )
        if path is not None:
            write_text(path, page)
        return page


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.1f}"


def sweep(
    probe: "PersonaProbe",
    vector: PersonaVector | str | Path,
    trait: "Trait | str",
    *,
    layers: Sequence[int],
    coefs: Sequence[float],
    judge: "Judge",
    questions: Sequence[str] | int | None = None,
    samples: int = 1,
    max_new_tokens: int = 1000,
    temperature: float = 1.0,
    coherence_floor: float = 50.0,
    positions: str = "response",
    include_last_prompt: bool = False,
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
        samples: answers per question and cell.
        max_new_tokens, temperature: generation settings. Every cell uses the same seeds for
            the same (question, sample), so cells differ only by the steering.
        coherence_floor: cells with a lower mean coherence cannot be chosen.
        positions, include_last_prompt: where to steer (see :meth:`PersonaProbe.steer`).
        out_dir: cache and outputs (``sweep_responses.jsonl``, ``scores.jsonl``,
            ``sweep.csv``, ``sweep.html``); None keeps everything in memory.

    Returns:
        :class:`SweepResult` with ``best_layer``, ``figure()``, ``to_csv()``, ``to_html()``.
    """
    trait = resolve_trait(trait)
    if not isinstance(vector, PersonaVector):
        vector = PersonaVector.load(vector)
    layers = [probe.check_layer(int(l)) for l in layers]
    coefs = [float(c) for c in coefs]
    if not layers or not coefs:
        raise ValueError("give at least one layer and one coefficient")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if isinstance(questions, int) and not isinstance(questions, bool):
        qs = list(trait.eval_questions[:questions])
    elif questions is None:
        qs = list(trait.eval_questions)
    else:
        qs = [str(q) for q in questions]
    if not qs:
        raise ValueError(f"trait {trait.name!r} has no evaluation questions; pass questions=[...]")
    model = probe.model_name or "unnamed-model"
    vec_id = hashlib.sha256(vector.directions.numpy().tobytes()).hexdigest()[:16]
    base_settings = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "seed": int(seed)}

    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    gen_log = JsonlLog(out / "sweep_responses.jsonl") if out is not None else None
    existing: dict[str, dict[str, Any]] = {}
    if gen_log is not None:
        for rec in gen_log.read():
            if "key" in rec:
                existing[rec["key"]] = rec

    # The cells' generation tasks; coef 0 is one shared baseline.
    def cell_settings(layer: int, coef: float) -> dict[str, Any]:
        if coef == 0:
            return dict(base_settings, steer=None)
        return dict(base_settings, steer={"layer": layer, "coef": coef, "vector": vec_id,
                                          "positions": positions, "include_last_prompt": include_last_prompt})

    work: list[tuple[int, float, list[tuple[str, int, int, str]]]] = []  # (layer, coef, [(key, q, s, question)])
    for layer in layers:
        for coef in coefs:
            st = cell_settings(layer, coef)
            items = [(fingerprint(model, st, q, s, question), q, s, question)
                     for q, question in enumerate(qs) for s in range(samples)]
            work.append((layer, coef, items))

    answers: dict[str, str] = {k: r["answer"] for k, r in existing.items() if isinstance(r.get("answer"), str)}
    todo_keys = {k for _, _, items in work for k, *_ in items if k not in answers}
    n_total = len({k for _, _, items in work for k, *_ in items})
    generated = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n_total, initial=n_total - len(todo_keys), desc=f"sweep generate {trait.name}",
               unit="resp", disable=_quiet(progress, len(todo_keys)))
    try:
        for layer, coef, items in work:
            missing = [it for it in items if it[0] not in answers]
            # Drop duplicates within the cell list (the shared baseline is asked only once).
            missing = [it for it in dict((it[0], it) for it in missing).values()]
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                # Seeds depend on the questions and samples only: common random numbers.
                bseed = derived_seed(seed, [(q, s) for _, q, s, _ in chunk])
                prompts = [question for *_, question in chunk]
                kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=bseed,
                              batch_size=len(chunk), progress=False)
                if coef == 0:
                    texts = probe.generate(prompts, **kwargs)
                else:
                    with probe.steer(vector, layer=layer, coef=coef, positions=positions,
                                     include_last_prompt=include_last_prompt):
                        texts = probe.generate(prompts, **kwargs)
                recs = []
                for (key, q, s, question), text in zip(chunk, texts):
                    answers[key] = text
                    recs.append({"key": key, "layer": layer if coef != 0 else None, "coef": coef,
                                 "question_index": q, "sample": s, "question": question,
                                 "answer": text, "model": model, "settings": cell_settings(layer, coef)})
                if gen_log is not None:
                    gen_log.append(recs)
                generated += len(chunk)
                bar.update(len(chunk))
    finally:
        bar.close()
    gen_seconds = time.perf_counter() - t0

    # Judging: every distinct answer once.
    score_log = ScoreLog(out / "scores.jsonl" if out is not None else None)
    unique_keys = list(dict.fromkeys(k for _, _, items in work for k, *_ in items))
    question_of = {k: question for _, _, items in work for k, _, _, question in items}
    got, judged, judge_reused = score_log.score(
        judge, trait, [(k, question_of[k], answers[k]) for k in unique_keys],
        batch_size=judge_batch_size, progress=progress, desc=f"sweep judge {trait.name}",
    )
    by_key = {k: (got["trait"][i], got["coherence"][i]) for i, k in enumerate(unique_keys)}

    cells = []
    for layer, coef, items in work:
        t_mean, n_t = mean_score([by_key[k][0] for k, *_ in items])
        c_mean, n_c = mean_score([by_key[k][1] for k, *_ in items])
        cells.append(SweepCell(layer, coef, t_mean, c_mean, len(items), n_t, n_c))
    result = SweepResult(
        cells=cells, coherence_floor=coherence_floor, trait_name=trait.name, model_name=model,
        judge_name=getattr(judge, "name", None),
        stats={"generated": generated, "reused": n_total - len(todo_keys), "judged": judged,
               "judge_reused": judge_reused, "generate_seconds": round(gen_seconds, 2)},
        out_dir=out,
    )
    if out is not None:
        result.to_csv(out / "sweep.csv")
        result.to_html(out / "sweep.html")
    return result
