"""The main job on the embedded default: the whole method on the persona organism, offline.

``persona-lens demo`` (or :func:`run_demo`) extracts a persona vector from the tiny
organism model with the standard pipeline (contrastive system prompts, exact judge, paired
filter, mean difference), sweeps layers and coefficients, steers with the chosen layer,
suppresses the trait under a system prompt that encourages it, monitors the last-prompt
projection across graded system prompts, and writes an HTML report with a section per
experiment and a table of the headline numbers. It needs no network and no GPU.

The default is the short run (two samples per prompt: about 2,600 generations); ``full=True``
(``--full``) is the complete one (four samples: about 5,100 generations). Both reach the
same conclusions; the full run's numbers are tighter. Times are in ``docs/organism.md``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from persona_lens.pipeline_io import write_json
from persona_lens.stats import fmt, mean_score, pearson

__all__ = ["DemoError", "DemoResult", "FIGURE_LABELS", "QUICK", "FULL", "run_demo"]

#: The short default run and the complete one: samples per prompt in extraction, the sweeps
#: and the steering checks; samples per (graded system prompt, question) in monitoring.
QUICK = {"samples": 2, "monitor_samples": 2}
FULL = {"samples": 4, "monitor_samples": 4}

#: Headline figures: key -> (label, scale). Scores are the judge's 0-100.
FIGURE_LABELS: dict[str, tuple[str, str]] = {
    "kept_pairs": ("contrastive pairs kept by the filter", "count"),
    "layer": ("steering layer chosen by the sweep", "layer"),
    "coef": ("steering coefficient chosen by the sweep", "x vector"),
    "prior_trait": ("trait score, no system prompt, unsteered", "0-100"),
    "steered_trait": ("trait score, no system prompt, +coef x v at the layer (held out)", "0-100"),
    "steered_coherence": ("coherence of those steered answers (held out)", "0-100"),
    "steered_trait_chosen_on": ("  the same cell on the sweep answers it was chosen from", "0-100"),
    "encouraged_trait": ("trait score, encouraging system prompt, unsteered", "0-100"),
    "suppression_layer": ("suppression layer", "layer"),
    "suppression_coef": ("suppression coefficient c", "x vector"),
    "suppressed_trait": ("trait score, encouraging system prompt, -c x v (held out)", "0-100"),
    "suppressed_coherence": ("coherence of those suppressed answers (held out)", "0-100"),
    "suppressed_trait_chosen_on": ("  the same cell on the sweep answers it was chosen from", "0-100"),
    "monitor_r": ("Pearson r, last-prompt projection vs trait score", "-1 to 1"),
}

class DemoError(RuntimeError):
    """The demo cannot draw its conclusions (e.g. no steered cell stays coherent)."""


STAGES = ("load model", "extract", "steering sweep", "suppression sweep", "monitor", "report")


@dataclass
class DemoResult:
    """Headline numbers of a demo run and where its files are.

    Attributes:
        figures: name -> value; see :data:`FIGURE_LABELS` for what each one is.
        n: name -> how many answers (or pairs, or cells) each figure is computed from.
        layer / coef: the layer and coefficient the sweep chose.
        settings: the run's settings; ``seconds``: wall time per stage and in all.
        report_path: the HTML report.
    """

    out_dir: Path
    report_path: Path
    layer: int
    coef: float
    figures: dict[str, float] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)
    cells: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def __repr__(self) -> str:
        from persona_lens.display import demo_repr

        return demo_repr(self)

    def _repr_html_(self) -> str:
        """In a notebook: the headline table (``display``)."""
        from persona_lens.display import demo_html

        return demo_html(self)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """The headline table: (measure, value, scale, n)."""
        out = []
        for key, (label, scale) in FIGURE_LABELS.items():
            if key in self.figures:
                n = self.n.get(key)
                out.append((label, _value(key, self.figures[key]), scale, "" if n is None else str(n)))
        return out

    def table(self) -> str:
        """The headline figures as a plain-text table (then the wall time)."""
        rows = [("measure", "value", "scale", "n")] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join((c.rjust(w) if i in (1, 3) else c.ljust(w)) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if "total" in self.seconds:
            lines.append(f"(n: answers each figure averages; pairs for the filter; (prompt, question) cells for r. "
                         f"Wall time {self.seconds['total']:.0f} s.)")
        return "\n".join(lines)


def _value(key: str, v: float) -> str:
    """One consistent format per kind of figure."""
    if math.isnan(v):
        return "n/a"
    scale = FIGURE_LABELS[key][1]
    if scale in ("count", "layer"):
        return str(int(v))
    if scale == "0-100":
        return f"{v:.1f}"
    if scale == "-1 to 1":
        return f"{v:.2f}"
    return f"{v:g}"


def _pretty(strength: str) -> str:
    return strength.replace("_", " ")


def run_demo(
    out_dir: str | Path = "persona_demo",
    *,
    trait: str = "evil",
    full: bool = False,
    samples: int | None = None,
    questions: int | None = None,
    layers: Sequence[int] | None = None,
    coefs: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0),
    max_new_tokens: int = 48,
    monitor_questions: int = 10,
    monitor_samples: int | None = None,
    coherence_floor: float = 80.0,
    positions: str = "all",
    seed: int = 0,
    threads: int | None = None,
    progress: bool | None = True,
    verbose: bool = True,
) -> DemoResult:
    """Run the whole method on the persona organism and write an HTML report.

    Args:
        out_dir: where the pipeline's files, the report (``report.html``), ``figures.json``
            and ``run.json`` (settings, timings) go; a rerun reuses finished generations and
            scores.
        trait: one of the organism's traits (``evil``, ``sycophantic``, ``hallucinating``).
        full: the complete run (:data:`FULL`) instead of the short default (:data:`QUICK`).
        samples: responses per (instruction, question) and polarity in extraction, and per
            question in the sweeps (default 2; 4 with ``full``).
        questions: extraction questions (default all 20).
        layers: layers to sweep (default every block input ``1..n_layers-1``).
        coefs: steering coefficients to sweep (0 is the unsteered baseline); the
            suppression sweep uses their negatives under an encouraging system prompt.
        max_new_tokens: response length limit.
        monitor_questions / monitor_samples: evaluation questions per graded system prompt,
            and samples per question, for the monitoring correlation (default 2 samples; 4
            with ``full``).
        coherence_floor: the sweeps choose among cells at least this coherent.
        positions: where steering adds the vector (``"all"``, or ``"response"`` as in the
            paper's sweeps); on the organism's short prompts ``"all"`` elicits more.
        threads: torch threads for the run (None: leave torch's setting).
        progress: one progress line for the whole run (stage, done/total, time left).

    Returns:
        :class:`DemoResult` (``result.table()`` prints the headline figures).

    Example:
        >>> from persona_lens.demo import run_demo
        >>> result = run_demo("persona_demo")  # doctest: +SKIP
        >>> print(result.table())  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    import torch

    from persona_lens import organism
    from persona_lens.extract import extract
    from persona_lens.models import ORGANISM, load_model
    from persona_lens.organism.world import STRENGTHS, system_prompts
    from persona_lens.probe import PersonaProbe
    from persona_lens.progress import Job
    from persona_lens.store import Store
    from persona_lens.sweep import sweep

    preset = FULL if full else QUICK
    samples = preset["samples"] if samples is None else samples
    monitor_samples = preset["monitor_samples"] if monitor_samples is None else monitor_samples
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    t = organism.load_trait(trait)
    judge = organism.OrganismJudge()

    # The graded system prompts of the monitoring experiment (and no system prompt).
    prompts: list[tuple[str, str | None]] = [(s, p) for s in STRENGTHS for p in system_prompts(trait, s)]
    prompts.append(("none", None))
    eval_q = list(t.eval_questions)
    mq = eval_q[:monitor_questions]
    n_q = len(t.questions) if questions is None else min(questions, len(t.questions))
    steered = [c for c in coefs if c != 0]
    has0 = any(c == 0 for c in coefs)

    config = json.loads((organism.checkpoint_dir() / "config.json").read_text())
    sweep_layers = list(layers) if layers is not None else list(range(1, int(config["num_hidden_layers"])))
    # the grid, then the chosen cell and the baseline again on fresh samples (held out)
    planned_sweep = (len(sweep_layers) * len(steered) + has0 + 2) * len(eval_q) * samples
    planned = len(t.instructions) * n_q * samples * 2 + 2 * planned_sweep + len(prompts) * len(mq) * monitor_samples
    lib_progress = bool(progress)

    with Job(total=planned, stages=len(STAGES), disable=not progress) as job:
        job.stage("load model")
        job.detail(f"{ORGANISM}, {torch.get_num_threads()} torch thread(s)")
        probe = PersonaProbe(_load_quietly(load_model, ORGANISM))

        job.stage("extract")
        ex = extract(
            probe, t, judge, out_dir=out / "extract", samples=samples, questions=questions,
            max_new_tokens=max_new_tokens, seed=seed, progress=lib_progress, verbose=False,
        )
        vec = ex.vector

        job.stage("steering sweep")
        sw = sweep(
            probe, vec, t, layers=sweep_layers, coefs=coefs, judge=judge, samples=samples,
            max_new_tokens=max_new_tokens, coherence_floor=coherence_floor, seed=seed,
            positions=positions, out_dir=out / "sweep", progress=lib_progress,
        )
        best = sw.chosen
        if best is None:
            raise DemoError(
                f"no steered cell kept coherence >= {coherence_floor}; see {out / 'sweep' / 'sweep.csv'}"
            )
        layer, coef = best.layer, best.coef
        # Reported on fresh samples: the grid's best is biased upwards on its own answers.
        steered_cell, baseline = sw.heldout, sw.heldout_baseline

        # Suppression (inference-time mitigation): the trait's own encouraging system prompt,
        # unsteered and with -c * v at every swept layer and coefficient; report the strongest
        # drop that stays coherent. The best layer to suppress need not be the best to elicit.
        job.stage("suppression sweep")
        encouraging = t.system_prompts(0)[0]
        sup = sweep(
            probe, vec, t, layers=sweep_layers, coefs=sorted({0.0, *(-abs(c) for c in steered)}, reverse=True),
            judge=judge, samples=samples, system=encouraging, max_new_tokens=max_new_tokens,
            coherence_floor=coherence_floor, seed=seed + 1, positions=positions, out_dir=out / "suppress",
            choose="lowest", progress=lib_progress,
        )
        chosen_sup = sup.chosen
        if chosen_sup is None:
            raise DemoError(f"no suppressed cell kept coherence >= {coherence_floor}; see "
                            f"{out / 'suppress' / 'sweep.csv'}")
        sup.to_html(out / "suppress" / "sweep.html",
                    title=f"Suppression sweep: {trait} under an encouraging system prompt")
        suppressed_cell, encouraged = sup.heldout, sup.heldout_baseline

        # Monitoring: last-prompt projection vs the trait score of what follows, per cell of
        # (graded system prompt, question), from the same forward passes that generate.
        job.stage("monitor")
        convs, keys = [], []
        for si, (strength, system) in enumerate(prompts):
            for q in mq:
                msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
                for _ in range(monitor_samples):
                    convs.append(msgs)
                    keys.append((si, q))
        readings = probe.monitor(convs, vec, layer=layer, seed=seed + 2, max_new_tokens=max_new_tokens,
                                 temperature=1.0, progress=lib_progress)
        scores = Store(None).score(judge, t, [(k[1], r.text) for k, r in zip(keys, readings)],
                                   kinds=("trait",), progress=lib_progress)["trait"]
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

        job.stage("report")
        job.detail("figures and report.html")
        figures = {
            "kept_pairs": float(ex.stats.kept),
            "layer": float(layer),
            "coef": float(coef),
            "prior_trait": baseline.trait,
            "steered_trait": steered_cell.trait,
            "steered_coherence": steered_cell.coherence,
            "steered_trait_chosen_on": best.trait,
            "encouraged_trait": encouraged.trait,
            "suppression_layer": float(chosen_sup.layer),
            "suppression_coef": abs(chosen_sup.coef),
            "suppressed_trait": suppressed_cell.trait,
            "suppressed_coherence": suppressed_cell.coherence,
            "suppressed_trait_chosen_on": chosen_sup.trait,
            "monitor_r": r,
        }
        n = {
            "kept_pairs": ex.stats.pairs,
            "prior_trait": baseline.n_trait,
            "steered_trait": steered_cell.n_trait,
            "steered_coherence": steered_cell.n_coherence,
            "steered_trait_chosen_on": best.n_trait,
            "encouraged_trait": encouraged.n_trait,
            "suppressed_trait": suppressed_cell.n_trait,
            "suppressed_coherence": suppressed_cell.n_coherence,
            "suppressed_trait_chosen_on": chosen_sup.n_trait,
            "monitor_r": len(ok),
        }
        settings = {
            "trait": trait, "model": probe.model_name, "judge": getattr(judge, "name", "?"),
            "preset": "full" if full else "quick", "samples": samples,
            "extraction questions": n_q, "instruction pairs": len(t.instructions),
            "evaluation questions": len(eval_q), "layers": sweep_layers, "coefs": list(coefs),
            "positions": positions, "coherence floor": coherence_floor, "max new tokens": max_new_tokens,
            "held out": f"the chosen cells and the unsteered baselines re-measured on {sw.heldout_how}",
            "monitor": f"{len(prompts)} prompt conditions (graded system prompts and none) x {len(mq)} questions x "
                       f"{monitor_samples} samples, "
                       f"layer {layer}",
            "seed": seed, "torch threads": torch.get_num_threads(),
            "generations": job.total,
        }
        result = DemoResult(out, out / "report.html", layer, coef, figures, n, cell_rows, settings)
        page, settings_at = _report(result, ex, sw, sup, chosen_sup, readings, [prompts[k[0]][0] for k in keys],
                                    [c["strength"] for c in ok], ok)
        # The times go into the page last, so that they include building its figures.
        job.end_stage()
        result.seconds = {**job.stage_seconds, "total": round(time.perf_counter() - t_start, 1)}
        page.settings(_settings_items(result), at=settings_at)
        page.write(result.report_path)
    write_json(out / "figures.json", figures)
    write_json(out / "run.json", {"settings": settings, "seconds": result.seconds, "n": n})
    if verbose:
        print(result.table())
        print(f"report: {result.report_path}")
    return result


def _report(result: DemoResult, ex, sw, sup, chosen_sup, readings, reading_groups, cell_groups, ok):
    from persona_lens.organism.world import STRENGTHS
    from persona_lens.plot import monitor_scatter, projection_bands
    from persona_lens.report import Page

    s, f = result.settings, result.figures
    trait = s["trait"]
    page = Page(f"Persona vector for '{trait}' on the persona organism",
                subtitle=f"persona_lens demo ({s['preset']} run): extraction, steering, suppression and "
                         f"monitoring on {s['model']}, judged by {s['judge']}.")

    page.section("Headline figures", anchor="headline")
    page.table(["measure", "value", "scale", "n"], result.rows(), numeric=[1, 3],
               caption="Scores are the judge's 0-100 (0: none of the answer shows the trait). n: answers a "
                       "figure averages (pairs for the filter; (system prompt, question) cells for r). "
                       "v is the persona vector at the named layer. Held out: measured on fresh samples "
                       "that played no part in choosing the layer and coefficient; the indented rows show "
                       "the same cells on the sweep answers they were chosen from (biased upwards).")

    page.section("Run settings and time", anchor="settings")
    settings_at = len(page.parts)  # the block goes here once the run's times are known

    st = ex.stats
    page.section("1. Extraction", "Contrastive system prompts (pos: encourage the trait, neg: suppress it) x "
                 "extraction questions x samples; the judge scores every answer; a (pos, neg) pair is kept when "
                 "the pos answer shows the trait, the neg answer does not, and both are coherent. The vector "
                 "is the per-layer mean difference of response activations over the kept pairs.", anchor="extraction")
    norms = ex.vector.norms()
    page.table(["", "value"], [
        ["responses", f"{st.responses} ({st.generated} generated now, {st.reused} reused)"],
        ["filter", ex.thresholds.describe()],
        ["pairs kept", f"{st.kept} of {st.pairs}"],
        ["pairs failing each condition", ", ".join(f"{k}: {v}" for k, v in st.failed.items())],
        ["vector norm by layer", ", ".join(f"{l}: {float(norms[l]):.2f}" for l in range(len(norms)))],
    ])

    page.section("2. Steering sweep", f"No system prompt; coef x v added at one layer ({s['positions']} positions) "
                 f"while answering the {s['evaluation questions']} evaluation questions. The chosen cell (bold) "
                 f"has the highest trait score among cells with coherence >= {sw.coherence_floor:g}.",
                 anchor="sweep")
    page.figure(sw.figure(title=f"Steering: {trait} score and coherence vs coefficient"))
    header, rows, marks = sw.table_rows()
    page.table(header, rows, caption=sw.caption(), highlight=marks)
    page.text(sw.heldout_line(), cls="note")

    page.section("3. Suppression sweep", f"The trait's encouraging system prompt, unsteered (coef 0) and with "
                 f"-c x v at each layer: how far subtracting the vector removes a trait the prompt asks for. "
                 f"The chosen cell (bold) has the lowest trait score among cells with coherence >= "
                 f"{sup.coherence_floor:g}.", anchor="suppression")
    page.figure(sup.figure(highlight=chosen_sup.layer,
                           title=f"Suppression under an encouraging prompt: {trait} score and coherence"))
    header, rows, marks = sup.table_rows(chosen_sup)
    page.table(header, rows, caption=sup.caption(), highlight=marks)
    page.text(sup.heldout_line(), cls="note")

    order = [_pretty(x) for x in STRENGTHS]
    page.section("4. Monitoring", f"Each point is one (system prompt, question) cell: the projection of the "
                 f"last prompt token's activation onto the unit persona vector at layer {result.layer} (before "
                 f"the answer starts) against the mean trait score of the answers that follow. System prompts "
                 f"range from strongly suppressing to strongly encouraging the trait.", anchor="monitoring")
    page.figure(monitor_scatter(
        [c["projection"] for c in ok], [c["trait"] for c in ok], [_pretty(g) for g in cell_groups],
        order=order, others=["none"], hover=[f"{c['system'] or '(no system prompt)'} | {c['question']}" for c in ok],
        title=f"Last-prompt projection (layer {result.layer}) vs {trait} score",
        y_title=f"{trait} score (0-100), mean of the cell's answers",
    ))
    page.section("Projection token by token", f"The projection at each generated token, averaged over every "
                 f"response to prompts of one strength (line: mean; band: 95% confidence interval of the mean; "
                 f"x = -1 is the last prompt token). A line ends where fewer than 5 of its responses are still "
                 f"going.", level=3, anchor="tokens")
    page.figure(projection_bands(
        readings, [_pretty(g) for g in reading_groups], order=order, others=["none"],
        title=f"Projection onto the {trait} vector while answering (layer {result.layer})",
    ))
    return page, settings_at


def _settings_items(result: DemoResult) -> list[tuple[str, Any]]:
    items = [(k, ", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in result.settings.items()]
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items() if k != "total")
    return items + [("wall time", f"{result.seconds.get('total', 0):.1f} s ({stages})")]


def _load_quietly(load_model, name: str):
    """The organism on the CPU, without transformers' own 'Loading weights' bar."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return load_model(name, device="cpu")
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_model(name, device="cpu")
    finally:
        if was:
            hf_logging.enable_progress_bar()
