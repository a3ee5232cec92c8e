"""Figures, pages and the job progress line: what a reader of the demo's report and of
sweep.html sees (the look itself is checked by eye in a browser)."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import pytest

from persona_lens import plot
from persona_lens.progress import Job, bar, note
from persona_lens.report import Page
from persona_lens.sweep import SweepCell, SweepResult


@dataclass
class FakeReading:
    response_projections: list[float]
    prompt_projections: list[float]
    layer: int = 2
    response_tokens: tuple = ()

    @property
    def last_prompt(self) -> float:
        return self.prompt_projections[-1]


def rgb(color: str) -> tuple[float, ...]:
    return tuple(float(v) for v in re.findall(r"[\d.]+", color)[:3])


def test_monitor_scatter_one_entry_per_group_on_one_scale_with_fit():
    order = ["strongly suppressing", "neutral", "strongly encouraging"]
    groups = [g for g in order for _ in range(4)] + ["none"] * 2
    x = [float(i) for i in range(len(groups))]
    y = [5.0 * i for i in range(len(groups))]
    fig = plot.monitor_scatter(x, y, groups, order=order, others=["none"])
    names = [t.name for t in fig.data]
    assert names == [*order, "none", "fit, r = 1.00"]  # one legend entry per group, no repeats
    colors = [t.marker.color for t in fig.data[:3]]
    assert len(set(colors)) == 3 and fig.data[3].marker.color == plot.OTHER_COLOR
    # one sequential scale: darkness grows with strength
    brightness = [sum(rgb(c)) for c in colors]
    assert brightness == sorted(brightness, reverse=True)
    assert "r = 1.00" in fig.layout.title.text and "n = 14" in fig.layout.title.text
    assert fig.layout.height == plot.HEIGHT


def test_projection_bands_draw_a_mean_and_band_per_group_not_a_line_per_response():
    # as a real Reading: response_projections[0] is read at the last prompt token (last_prompt)
    readings = [FakeReading([0.5, 1.0, 2.0, 3.0], [0.5]) for _ in range(6)]
    readings += [FakeReading([5.0, 10.0, 20.0] + [30.0] * (i % 3), [5.0]) for i in range(6)]
    groups = ["low"] * 6 + ["high"] * 6
    fig = plot.projection_bands(readings, groups, order=["low", "high"], min_responses=2)
    lines = [t for t in fig.data if t.mode == "lines"]
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(lines) == 2 and len(bands) == 2
    low = next(t for t in lines if t.name.startswith("low"))
    assert low.name == "low (n=6)"
    assert list(low.x) == [-1, 0, 1, 2] and list(low.y) == [0.5, 1.0, 2.0, 3.0]  # each reading once
    high = next(t for t in lines if t.name.startswith("high"))
    # token 2 and 3 exist in 4 and 2 of the 6 "high" responses: the mean is over those
    assert list(high.x) == [-1, 0, 1, 2, 3] and list(high.customdata) == [6, 6, 6, 4, 2]
    with pytest.raises(ValueError):
        plot.projection_bands(readings, groups[:-1])


def test_sweep_figure_marks_the_chosen_layer_and_keeps_a_fixed_height():
    cells = [dict(layer=l, coef=c, trait=10 * c + l, coherence=90.0, n=8) for l in (1, 2, 3) for c in (0, 1, 2)]
    fig = plot.sweep_figure(cells, highlight=2, title="t")
    legend = [t.name for t in fig.data if t.showlegend]
    assert legend == ["layer 1", "layer 2 (chosen)", "layer 3"]
    assert fig.layout.height == plot.HEIGHT
    assert all(list(t.customdata) == [8, 8, 8] for t in fig.data)


def sweep_result(coefs=(0.0, 1.0, 2.0)) -> SweepResult:
    cells = [SweepCell(l, c, trait=10 * abs(c) + l, coherence=95 - 10 * abs(c), n=4, n_trait=4, n_coherence=4)
             for l in (1, 2) for c in coefs]
    return SweepResult(cells, coherence_floor=80, trait_name="evil", model_name="m", judge_name="j")


def test_sweep_html_opens_offline_and_has_the_table():
    page = sweep_result().to_html()
    assert not re.search(r"<script[^>]+src=", page)  # nothing loaded from the network
    assert len(re.findall(r"\* plotly\.js v[\d.]+", page)) == 1 and page.count("Plotly.newPlot") == 1
    assert "<table" in page and "n = 4 answers per cell" in page and "0-100" in page
    assert re.findall(r'<div style="height:(\d+)px; width:100%;">', page) == ["440"]


def test_lowest_is_the_suppression_choice():
    res = sweep_result(coefs=(0.0, -1.0, -2.0))
    assert res.best.coef == -1.0 and res.best.layer == 2  # highest trait among coherent cells
    low = res.lowest
    assert (low.layer, low.coef) == (1, -1.0)  # coef -2 has coherence 75 < 80
    header, rows, marks = res.table_rows(low)
    assert header == ["layer", "coef -2", "coef -1", "coef 0"] and marks == [(0, 2)]
    page = res.to_html(lowest=True, title="Suppression")
    assert "chosen (lowest trait score among cells with coherence &gt;= 80): layer 1 at coef -1" in page
    assert "<title>Suppression</title>" in page and "layer 1 (chosen)" in page


def test_page_embeds_plotly_once_for_many_figures():
    page = Page("t", subtitle="s")
    page.section("One", "intro")
    for _ in range(3):
        page.figure(plot.sweep_figure([dict(layer=1, coef=0, trait=1.0, coherence=2.0, n=1)]))
    page.table(["a", "b"], [["<x>", "1"]], caption="units", numeric=[1], highlight=[(0, 1)])
    page.settings([("seed", 0)])
    html = page.html()
    assert html.count("Plotly.newPlot") == 3
    assert len(re.findall(r"\* plotly\.js v[\d.]+", html)) == 1  # plotly.js once, for three figures
    assert not re.search(r"<script[^>]+src=", html)
    assert "&lt;x&gt;" in html and "class='num best'" in html and "<caption>units</caption>" in html


def test_job_counts_every_step_on_one_line():
    buf = io.StringIO()
    with Job(total=10, stages=2, file=buf) as job:
        job.stage("first")
        with bar(total=6, desc="generate", unit="resp", initial=2) as b:  # 2 reused, 4 generated
            b.set_postfix_str("layer 3 coef 1")
            b.update(4)
        with bar(total=50, desc="judge", unit="score") as b:  # another unit: shown, not counted
            b.update(50)
        note("capturing activations")
        job.stage("second")
        b = bar(total=4, desc="generate", unit="resp")
        b.update(4)
        b.close()
    assert job.done == 10 and set(job.stage_seconds) == {"first", "second"}
    text = buf.getvalue()
    assert "[1/2 first]" in text and "[2/2 second]" in text and "10/10" in text
    assert "layer 3 coef 1: generate 6/6 resp" in text


def test_bars_outside_a_job_are_tqdm_and_a_disabled_job_draws_nothing(capsys):
    from tqdm.auto import tqdm

    b = bar(total=2, desc="x", unit="resp", disable=True)
    assert isinstance(b, tqdm)
    b.close()
    with Job(total=3, disable=True) as job:
        job.stage("a")
        with bar(total=3, desc="generate", unit="resp") as b:
            b.update(3)
    assert job.done == 3  # counted, but nothing drawn
    out, err = capsys.readouterr()
    assert out == "" and "generate" not in err


def test_experiment_pages_are_report_pages(tmp_path, capsys):
    import plotly.graph_objects as go

    from experiments.common import write_results

    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
    fig.update_layout(title="E4 (organism): shift vs score")
    write_results(tmp_path, {"config": "organism"}, fig, "e4.html")
    html = (tmp_path / "e4.html").read_text()
    assert "<title>E4 (organism): shift vs score</title>" in html and "config organism" in html
    assert len(re.findall(r"\* plotly\.js v[\d.]+", html)) == 1 and not re.search(r"<script[^>]+src=", html)
    assert re.findall(r'<div style="height:(\d+)px; width:100%;">', html) == ["440"]
    assert (tmp_path / "results.json").exists()
