"""The main job, `persona-lens demo`, on the shipped persona organism: the issue's thresholds,
measured through the library's own pipeline (extract -> sweep -> steer -> suppress -> monitor),
on the short default run; and the report a reader gets."""

from __future__ import annotations

import json
import re

import pytest

from persona_lens.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "figures.json").read_text())


def test_demo_writes_report_and_figures(demo):
    out, figures = demo
    assert (out / "extract" / "vectors").is_dir()
    assert (out / "sweep" / "sweep.csv").exists() and (out / "suppress" / "sweep.csv").exists()
    assert figures["kept_pairs"] > 0
    assert "seconds" not in figures  # results only; the run's settings and times are in run.json
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["preset"] == "quick" and run["settings"]["samples"] == 2
    assert run["seconds"]["total"] > 0 and {"extract", "steering sweep", "monitor"} <= set(run["seconds"])


def test_report_has_a_section_per_experiment_and_opens_offline(demo):
    out, _ = demo
    html = (out / "report.html").read_text()
    headings = re.findall(r"<h[23][^>]*>([^<]+)</h[23]>", html)
    assert headings == ["Headline figures", "Run settings and time", "1. Extraction", "2. Steering sweep",
                        "3. Suppression sweep", "4. Monitoring", "Projection token by token"]
    # four figures, plotly.js embedded once, nothing fetched from the network, fixed heights
    assert html.count("Plotly.newPlot") == 4
    assert len(re.findall(r"\* plotly\.js v[\d.]+", html)) == 1
    assert not re.search(r"<script[^>]+src=", html)
    assert re.findall(r'<div style="height:(\d+)px; width:100%;">', html) == ["440"] * 4
    # the headline table: units, scale and n; wall time is not a result
    headline = html[html.index("Headline figures"):html.index("Run settings and time")]
    assert "<th>scale</th><th>n</th>" in headline and "0-100" in headline
    assert "wall time" not in headline.lower()
    settings = html[html.index("Run settings and time"):html.index("1. Extraction")]
    assert "wall time" in settings and "torch threads" in settings
    # the suppression sweep has its own table, negative coefficients
    suppression = html[html.index("3. Suppression sweep"):html.index("4. Monitoring")]
    assert "<table" in suppression and "coef -1.5" in suppression and "class='best'" in suppression
    for page in ("sweep", "suppress"):
        sub = (out / page / "sweep.html").read_text()
        assert not re.search(r"<script[^>]+src=", sub) and "Plotly.newPlot" in sub
    f = json.loads((out / "figures.json").read_text())
    suppress_page = (out / "suppress" / "sweep.html").read_text()
    assert (f"chosen (lowest trait score among cells with coherence &gt;= 80): layer {int(f['suppression_layer'])} "
            f"at coef -{f['suppression_coef']:g}") in suppress_page


def test_steering_raises_the_trait_from_the_prior(demo):
    _, f = demo
    assert f["prior_trait"] <= 20, f
    assert f["steered_trait"] >= 60, f
    assert f["steered_coherence"] >= 80, f


def test_subtracting_under_an_encouraging_prompt_lowers_the_trait(demo):
    _, f = demo
    assert f["encouraged_trait"] >= 80, f
    assert f["encouraged_trait"] - f["suppressed_trait"] >= 50, f


def test_last_prompt_projection_predicts_the_trait(demo):
    _, f = demo
    assert f["monitor_r"] >= 0.75, f


def test_rerun_reuses_every_generation_and_score_and_shows_one_progress_line(demo, capsys):
    out, f = demo
    run = json.loads((out / "extract" / "summary.json").read_text())
    assert main(["demo", "--out", str(out)]) == 0
    again = json.loads((out / "extract" / "summary.json").read_text())
    assert again["stats"]["generated"] == 0 and again["stats"]["reused"] == run["stats"]["responses"]
    assert json.loads((out / "figures.json").read_text())["layer"] == f["layer"]
    err = capsys.readouterr().err
    stages = re.findall(r"\[(\d)/6 ([a-z ]+)\]", err)
    assert [s for i, s in sorted(set(stages))] == ["load model", "extract", "steering sweep",
                                                   "suppression sweep", "monitor", "report"]
    assert "generate:" not in err and "judge:" not in err  # no bar of its own from any step
    assert re.search(r"2720/2720 resp", err)  # 2,560 for the sweeps and the rest, 160 held out


def test_full_is_the_complete_run(monkeypatch, tmp_path):
    import persona_lens.demo as demo_module

    seen = {}

    def fake(out, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(demo_module, "run_demo", fake)
    assert main(["demo", "--full", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert seen["full"] is True and seen["samples"] is None and seen["threads"] == 1
    assert demo_module.FULL["samples"] == 4 and demo_module.QUICK["samples"] == 2
