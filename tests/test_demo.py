"""The main job, `persona-lens demo`, on the shipped persona organism: the issue's thresholds,
measured through the library's own pipeline (extract -> sweep -> steer -> monitor)."""

from __future__ import annotations

import json

import pytest

from persona_lens.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "figures.json").read_text())


def test_demo_writes_report_and_figures(demo):
    out, figures = demo
    html = (out / "report.html").read_text()
    assert "Headline figures" in html and "plotly" in html.lower()
    assert (out / "extract" / "vectors").is_dir()
    assert (out / "sweep" / "sweep.csv").exists()
    assert figures["kept_pairs"] > 0


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


def test_rerun_reuses_every_generation_and_score(demo, capsys):
    out, f = demo
    run = json.loads((out / "extract" / "summary.json").read_text())
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    again = json.loads((out / "extract" / "summary.json").read_text())
    assert again["stats"]["generated"] == 0 and again["stats"]["reused"] == run["stats"]["responses"]
    assert json.loads((out / "figures.json").read_text())["layer"] == f["layer"]
