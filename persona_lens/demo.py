"""The main job on the embedded default: the whole method on the persona organism, offline.

``persona-lens demo`` (or :func:`run_demo`) extracts a persona vector from the tiny
organism model with the standard pipeline (contrastive system prompts, exact judge, paired
filter, mean difference), sweeps layers and coefficients, steers with the chosen layer,
monitors the last-prompt projection across graded system prompts, and writes an HTML report
with the figures and a table of the headline numbers. It needs no network and no GPU.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from persona_lens.pipeline_io import write_json, write_text
from persona_lens.stats import fmt, mean_score, pearson
from persona_lens.store import Store


@dataclass
class DemoResult:
    """Headline numbers of a demo run and where its files are.

    Attributes:
        figures: name -> value; see :data:`FIGURE_LABELS` for what each one is.
        layer / coef: the layer and coefficient the sweep chose.
        report_path: the HTML report.
    """

    out_dir: Path
    report_path: Path
    layer: int
    coef: float
    figures: dict[str, float] = field(default_factory=dict)
    cells: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        """The headline figures as a plain-text table."""
        width = max(len(v) for v in FIGURE_LABELS.values())
        lines = [f"{'figure'.ljust(width)}  value", f"{'-' * width}  -----"]
        for key, label in FIGURE_LABELS.items():
            if key in self.figures:
                lines.append(f"{label.ljust(width)}  {fmt(self.figures[key])}")
        return "\n".join(lines)


FIGURE_LABELS = {
    "kept_pairs": "pairs kept by the filter",
    "layer": "chosen layer",
    "coef": "chosen coefficient",
    "prior_trait": "trait score, no system prompt",
    "steered_trait": "trait score, no system prompt, +coef*v",
    "steered_coherence": "coherence, no system prompt, +coef*v",
    "encouraged_trait": "trait score, encouraging prompt",
    "suppression_layer": "suppression layer",
    "suppression_coef": "suppression coefficient c",
    "suppressed_trait": "trait score, encouraging prompt, -c*v",
    "suppressed_coherence": "coherence, encouraging prompt, -c*v",
    "monitor_r": "Pearson r, last-prompt projection vs trait",
    "seconds": "wall time (s)",
}


def run_demo(
    out_dir: str | Path = "persona_demo",
    *,
    trait: str = "evil",
    samples: int = 4,
    questions: int | None = None,
    layers: Sequence[int] | None = None,
    coefs: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0),
    max_new_tokens: int = 48,
    monitor_questions: int = 10,
    monitor_samples: int = 4,
    coherence_floor: float = 80.0,
    positions: str = "all",
    seed: int = 0,
    progress: bool | None = True,
    verbose: bool = True,
) -> DemoResult:
    """Run the whole method on the persona organism and write an HTML report.

    Args:
        out_dir: where the pipeline's files, the report (``report.html``) and
            ``figures.json`` go; a rerun reuses finished generations and scores.
        trait: one of the organism's traits (``evil``, ``sycophantic``, ``hallucinating``).
        samples: responses per (instruction, question) and polarity in extraction, and per
            question in the sweep and the steering checks.
        questions: extraction questions (default all 20).
        layers: layers to sweep (default every block input ``1..n_layers-1``).
        coefs: steering coefficients to sweep (0 is the unsteered baseline).
        max_new_tokens: response length limit.
        monitor_questions / monitor_samples: evaluation questions per graded system prompt,
            and samples per question, for the monitoring correlation.
        coherence_floor: the sweep chooses among cells at least this coherent.
        positions: where steering adds the vector (``"all"``, or ``"response"`` as in the
            paper's sweeps); on the organism's short prompts ``"all"`` elicits more.

    Returns:
        :class:`DemoResult` (``result.table()`` prints the headline figures).

    Example:
        >>> from persona_lens.demo import run_demo
        >>> result = run_demo("persona_demo")
        >>> print(result.table())
    """
    import plotly.graph_objects as go

    from persona_lens import organism
    from persona_lens.extract import extract
    from persona_lens.models import ORGANISM, load_model
    from persona_lens.organism.world import STRENGTHS, system_prompts
    from persona_lens.plot import projection_curve
    from persona_lens.probe import PersonaProbe
    from persona_lens.sweep import sweep

    t0 = time.perf_counter()
    out = Path(out_dir)
    probe = PersonaProbe(load_model(ORGANISM, device="cpu"))
    t = organism.load_trait(trait)
    judge = organism.OrganismJudge()
    checks = Store(None)  # scores of the steering and monitoring checks below
    gen = dict(max_new_tokens=max_new_tokens, temperature=1.0, progress=progress)

    ex = extract(
        probe, t, judge, out_dir=out / "extract", samples=samples, questions=questions,
        max_new_tokens=max_new_tokens, seed=seed, progress=progress, verbose=False,
    )
    vec = ex.vector
    sweep_layers = list(layers) if layers is not None else list(range(1, probe.n_layers))
    sw = sweep(
        probe, vec, t, layers=sweep_layers, coefs=coefs, judge=judge, samples=samples,
        max_new_tokens=max_new_tokens, coherence_floor=coherence_floor, seed=seed,
        positions=positions, out_dir=out / "sweep", progress=progress,
    )
    best = sw.best
    if best is None:
        raise RuntimeError(
            f"no steered cell kept coherence >= {coherence_floor}; see {out / 'sweep' / 'sweep.csv'}"
        )
    layer, coef = best.layer, best.coef
    baseline = sw.cell(layer, 0.0) if 0.0 in sw.coefs else None

    # Suppression (inference-time mitigation): the trait's own encouraging system prompt,
    # unsteered and with -c * v at every swept layer and coefficient; report the strongest
    # drop that stays coherent. The best layer to suppress need not be the best to elicit.
    eval_q = list(t.eval_questions)
    qs = [q for q in eval_q for _ in range(samples)]
    encouraging = t.system_prompts(0)[0]
    enc_texts = probe.generate(qs, system=encouraging, seed=seed + 1, **gen)
    encouraged = checks.score(judge, t, list(zip(qs, enc_texts)), kinds=("trait",)).mean("trait")
    suppression = []
    for sup_layer in sweep_layers:
        for c in sorted(c for c in coefs if c > 0):
            with probe.steer(vec, layer=sup_layer, coef=-c, positions=positions):
                texts = probe.generate(qs, system=encouraging, seed=seed + 1, **gen)
            got = checks.score(judge, t, list(zip(qs, texts)))
            suppression.append((sup_layer, c, got.mean("trait"), got.mean("coherence")))
    coherent = [s for s in suppression if s[3] >= coherence_floor] or suppression
    sup_layer, sup_coef, suppressed, suppressed_coh = min(coherent, key=lambda s: (s[2], s[1]))

    # Monitoring: last-prompt projection vs the trait score of what follows, per cell of
    # (graded system prompt, question), from the same forward passes that generate.
    prompts: list[tuple[str, str | None]] = [(s, p) for s in STRENGTHS for p in system_prompts(trait, s)]
    prompts.append(("none", None))
    mq = eval_q[:monitor_questions]
    convs, keys = [], []
    for si, (strength, system) in enumerate(prompts):
        for q in mq:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
            for _ in range(monitor_samples):
                convs.append(msgs)
                keys.append((si, q))
    readings = probe.monitor(convs, vec, layer=layer, seed=seed + 2, **gen)
    scores = checks.score(judge, t, [(k[1], r.text) for k, r in zip(keys, readings)], kinds=("trait",))["trait"]
    cells: dict[tuple[int, str], dict[str, list]] = {}
    for k, r, s in zip(keys, readings, scores):
        c = cells.setdefault(k, {"proj": [], "score": []})
        c["proj"].append(r.last_prompt)
        c["score"].append(s)
    cell_rows = [
        {"strength": prompts[si][0], "system": prompts[si][1], "question": q,
         "projection": sum(c["proj"]) / len(c["proj"]), "trait": mean_score(c["score"])[0]}
        for (si, q), c in cells.items()
    ]
    ok = [c for c in cell_rows if not math.isnan(c["trait"])]
    r = pearson([c["projection"] for c in ok], [c["trait"] for c in ok])

    figures = {
        "kept_pairs": float(ex.stats.kept),
        "layer": float(layer),
        "coef": float(coef),
        "prior_trait": baseline.trait if baseline else math.nan,
        "steered_trait": best.trait,
        "steered_coherence": best.coherence,
        "encouraged_trait": encouraged,
        "suppression_layer": float(sup_layer),
        "suppression_coef": sup_coef,
        "suppressed_trait": suppressed,
        "suppressed_coherence": suppressed_coh,
        "monitor_r": r,
        "seconds": round(time.perf_counter() - t0, 1),
    }

    scatter = go.Figure()
    for strength in [p[0] for p in prompts if p[0] != "none"] + ["none"]:
        pts = [c for c in ok if c["strength"] == strength]
        if pts:
            scatter.add_trace(go.Scatter(
                x=[c["projection"] for c in pts], y=[c["trait"] for c in pts], mode="markers",
                name=strength, text=[f"{c['system']} | {c['question']}" for c in pts],
            ))
    scatter.update_layout(
        title=f"Monitoring: last-prompt projection (layer {layer}) vs {trait} score, r = {r:.2f}",
        xaxis_title="projection onto the unit persona vector", yaxis_title=f"{trait} score",
        template="plotly_white",
    )
    examples = [i for i, k in enumerate(keys) if k[1] == mq[0] and i % monitor_samples == 0]
    curve = projection_curve(
        [readings[i] for i in examples], labels=[prompts[keys[i][0]][0] for i in examples],
        title=f"Projection token by token while answering: {mq[0]!r}",
    )

    result = DemoResult(out, out / "report.html", layer, coef, figures, cell_rows)
    write_json(out / "figures.json", figures)
    write_text(result.report_path, _report(result, trait, ex.summary(), sw, [sw.figure(), scatter, curve]))
    if verbose:
        print(result.table())
        print(f"report: {result.report_path}")
    return result


def _report(result: DemoResult, trait: str, extraction_summary: str, sw, figures) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{html.escape(fmt(result.figures[k]))}</td></tr>"
        for k, label in FIGURE_LABELS.items() if k in result.figures
    )
    parts = [
        "<html><head><meta charset='utf-8'><title>persona_lens demo</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
        "td,th{padding:2px 10px;border-bottom:1px solid #ddd}</style></head><body>",
        f"<h1>Persona vector for '{html.escape(trait)}' on the persona organism</h1>",
        f"<h2>Headline figures</h2><table><tr><th>figure</th><th>value</th></tr>{rows}</table>",
        f"<h2>Extraction</h2><pre>{html.escape(extraction_summary)}</pre>",
        f"<h2>Layer sweep</h2><pre>{html.escape(sw.table())}</pre>",
    ]
    for i, fig in enumerate(figures):
        # Embed plotly.js once so the report opens offline.
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    parts.append("</body></html>")
    return "\n".join(parts)
