"""The experiments package: configs load and validate (GPU configs included), and a smoke run
of every experiment, E1-E8, on the shipped organism shows the paper's effects, so that a
regression of the organism or of the pipeline fails here.

The smoke run is ``python -m experiments.all --config organism --smoke`` (sizes:
``experiments.common.SMOKE`` and ``experiments.e7_screening.SMOKE``); its wall time is measured
and must stay under the CI budget. E1, E2 and E8 are checked against the goals of issue 12
(``experiments.common.GOALS``); E3-E7 against effects measured on the smoke size with a margin
(each test says the values it was set from), and each has one figure recomputed here from
what the run stored, independently of the script.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from experiments.common import CONFIGS, GOALS, TRAITS, load_config

#: Seconds the smoke run of E1-E8 may take on 2 CPU cores (issue 12: under 5 minutes).
#: Measured on organism v2: 140 s at a load average of about 2 from other jobs (E1 43 s,
#: E3 44 s, the rest 52 s); 506 s with three other heavy jobs saturating both cores.
SMOKE_BUDGET = 300
#: experiment id -> its results folder inside the smoke run
FOLDERS = {"e1": "e1_steering", "e2": "e2_monitoring", "e8": "e8_traits", "e3": "datasets/e3_finetune_traits",
           "e4": "datasets/e4_shift", "e6": "datasets/e6_dataset_dp", "e5": "e5_mitigation", "e7": "e7_screening"}


@pytest.mark.parametrize("name", sorted(CONFIGS) + ["qwen7b", "llama8b"])
def test_every_config_loads_and_validates(name):
    cfg = load_config(name)
    assert cfg.positions == "response"  # the paper's released steering mode
    assert 0.0 in cfg.sweep_coefs and cfg.heldout_samples >= 1
    if cfg.judge == "none":  # SmolLM2 offline: judged figures are documented as not measurable
        assert {"e1", "e2"} <= set(cfg.unmeasurable) and "judge" in cfg.unmeasurable["e1"]
    if name.startswith(("qwen", "llama")):
        assert cfg.judge == "gpt-4.1-mini" and cfg.dtype == "bfloat16" and set(cfg.vectors) == set(TRAITS)


def test_a_bad_config_says_what_to_fix():
    with pytest.raises(ValueError, match="unknown config"):
        load_config("gpt-5")
    with pytest.raises(ValueError, match="sweep_coefs must hold 0"):
        load_config("organism", sweep_coefs=(1.0, 2.0))
    with pytest.raises(ValueError, match="unknown position mode"):
        load_config("organism", positions="answer")
    with pytest.raises(ValueError, match="intervention_layers must be distinct layers"):
        load_config("organism", intervention_layers=(2, 2))


def test_e5_intervenes_at_the_configs_layers():
    # the organism at every layer E1 steers; a release config at its one layer, as released
    assert load_config("organism").layers_e5 == (1, 2, 3, 4, 5)
    assert load_config("qwen7b").layers_e5 == (20,) and load_config("llama8b").layers_e5 == (16,)
    assert load_config("organism", intervention_layers=None).layers_e5 == (3,)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from experiments import all as run_all

    out = tmp_path_factory.mktemp("smoke")
    t0 = time.perf_counter()
    code = run_all.main(["--config", "organism", "--smoke", "--out", str(out)])
    seconds = time.perf_counter() - t0
    record = json.loads((out / "all.json").read_text())
    print(f"\nsmoke run of E1-E8: {seconds:.0f} s (" + ", ".join(
        f"{e} {r['seconds']:.0f} s" for e, r in record["experiments"].items()) + ")")
    results = {e: json.loads((out / f / "results.json").read_text()) for e, f in FOLDERS.items()}
    return out, results, seconds, code


def test_the_smoke_run_fits_the_ci_budget_and_writes_one_report(smoke):
    out, results, seconds, code = smoke
    assert code == 0
    record = json.loads((out / "all.json").read_text())
    assert sorted(record["experiments"]) == sorted(FOLDERS)
    assert all(r["status"] == "ok" for r in record["experiments"].values())
    assert seconds < SMOKE_BUDGET, f"{seconds:.0f} s"
    page = (out / "report.html").read_text()
    n_figs = sum(len(json.loads(p.read_text())) for p in out.rglob("*.plotly.json"))
    # E1 6, E2 6, E8 3, E3 1, E4 1, E6 1, E5 1, E7 2 (the distributions and the AUROC table)
    assert n_figs == 21 and page.count("Plotly.newPlot") == n_figs
    for e, res in results.items():
        assert res["persona_lens_version"] and res["checkpoint"]["sha256_16"], e
    # one checkpoint measured by every script
    assert len({res["checkpoint"]["sha256_16"] for res in results.values()}) == 1
    for e, res in results.items():
        assert res["settings"], e
        assert res["experiment"] == e.upper() and res["title"].startswith(e.upper() + ":"), e


def test_every_issue_goal_is_recorded_and_judged_by_its_own_rule(smoke):
    """E1, E2 (issue 12), E4, E5 (issue 13), E6 and E7 (issue 14) record each goal with its
    value, and "pass" is the goal's rule applied to that value; the report lists them all."""
    out, results, _, _ = smoke
    owners = {"e1": {"steer_trait", "steer_coherence", "suppress_trait", "suppress_coherence"},
              "e2": {"monitor_r", "monitor_within_r"}, "e4": {"shift_r", "shift_r_specific"},
              "e5": {"preventative_over_base"}, "e6": {"dataset_dp_r", "dataset_dp_r_specific"},
              "e7": {"sample_auroc", "sample_auroc_specific"}}
    page = (out / "report.html").read_text()
    for e, names in owners.items():
        goals = results[e]["goals"]
        assert set(goals) == ({"evil"} if e == "e5" else set(TRAITS)), e  # the smoke E5 runs evil_II only
        for trait, recorded in goals.items():
            assert {n.split(" ")[0] for n in recorded} <= names and recorded, (e, trait)
            for name, g in recorded.items():
                rule = GOALS[name.split(" ")[0]]
                v = g["value"]
                ok = not math.isnan(v) and {">=": v >= rule["target"], "<=": v <= rule["target"],
                                            ">": v > rule["target"]}[rule["op"]]
                assert (g["op"], g["target"], g["pass"]) == (rule["op"], rule["target"], ok), (e, trait, name)
                assert name in page
    # the values themselves, from what each script stored beside them
    for t in TRAITS:
        assert results["e4"]["goals"][t]["shift_r"]["value"] == results["e4"]["r"][t]
        assert results["e6"]["goals"][t]["dataset_dp_r"]["value"] == results["e6"]["r"][t]
        assert results["e4"]["goals"][t]["shift_r_specific"]["value"] == results["e4"]["r_specific"][t]
        assert results["e6"]["goals"][t]["dataset_dp_r_specific"]["value"] == results["e6"]["r_specific"][t]
        for name, col in (("sample_auroc", "dP_L3"), ("sample_auroc_specific", "dP_specific_L3")):
            au = sorted(s["traits"][t]["figures"][col]["auroc"] for s in results["e7"]["seeds"])
            assert results["e7"]["goals"][t][name]["value"] == pytest.approx(au[len(au) // 2])
    cell = results["e5"]["sets"]["evil_II"]
    base = cell["base"]
    prev = cell["seeds"]["0"]["preventative"]["1.5"]
    assert prev["capability"] >= 0.95 * base["capability"]
    assert results["e5"]["goals"]["evil"]["preventative_over_base"]["value"] == pytest.approx(
        prev["trait"] - base["trait"])


def test_e1_held_out_figures_are_the_stored_answers_judged_again(smoke):
    """The held-out steering figure, recomputed from the stored answers with the exact judge."""
    from persona_lens.organism import OrganismJudge, load_trait

    out, results, _, _ = smoke
    judge = OrganismJudge()
    for t in TRAITS:
        h = results["e1"]["per_seed"][t]["0"]
        if h["steer_layer"] != h["steer_layer"]:  # no coherent cell: nothing to recompute
            continue
        recs = [json.loads(line) for line in
                (out / "e1_steering" / "seed0" / t / "steer" / "sweep_responses.jsonl").read_text().splitlines()]
        held = [r for r in recs if r.get("heldout") and r["coef"] == h["steer_coef"]]
        assert held and not {r["sample"] for r in held} & set(range(results["e1"]["settings"]["samples"]))
        scores = judge.score_trait(load_trait(t), [(r["question"], r["answer"]) for r in held])
        assert np.mean([s for s in scores if s is not None]) == pytest.approx(h["steer_trait"])


def test_e2_r_is_pearson_of_its_cells(smoke):
    _, results, _, _ = smoke
    for t in TRAITS:
        cells = results["e2"]["traits"][t]["cells"]
        x, y = np.array([c["projection"] for c in cells]), np.array([c["trait"] for c in cells])
        assert results["e2"]["traits"][t]["r_all"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-9)
        levels = results["e2"]["traits"][t]["levels"]["system prompt"]
        assert len(levels) >= 8  # graded from strongly suppressing to strongly encouraging


def test_e8_cosine_is_symmetric_and_one_on_the_diagonal(smoke):
    _, results, _, _ = smoke
    cos = results["e8"]["cosine"]
    for a in TRAITS:
        for l, v in cos[a][a].items():
            assert v == pytest.approx(1.0, abs=1e-5)
        for b in TRAITS:
            assert cos[a][b] == pytest.approx(cos[b][a])


#: Goals the shipped organism (version 2) does not meet at smoke size, with what was measured.
#: Each is a strict xfail: the figure is still computed and shown, and the test fails as soon as
#: the goal is met, so that this list can only shrink. docs/results.md has the full-size runs.
KNOWN_UNMET: dict[tuple[str, str], str] = {
    ("steer", "hallucinating"): "38 at smoke size; 21-35 held out in full runs: the hallucinating vector "
                                "pushes the other traits' words more than wrong facts (docs/organism.md)",
    ("suppress", "hallucinating"): "49 at smoke size; 25 held out in a full run",
    ("suppress", "evil"): "15 at smoke size (20 answers, coefficients up to 2); 1.4-5.3 held out in full runs",
    ("suppress", "sycophantic"): "12.5 at smoke size (20 answers); 0.9 under the mild encouraging prompt and "
                                 "27 under the pipeline's encouraging form, held out, in a full run",
    ("within system prompt", "hallucinating"): "about 0 (-0.05 to 0.0 over layers in a full run): questions about "
                                               "unknown animals invite it, but the reading does not follow",
    ("within many-shot", "evil"): "-0.10 at smoke size",
}


def _unmet(request, kind: str, trait: str) -> None:
    reason = KNOWN_UNMET.get((kind, trait))
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"goal not met by the organism: {reason}"))


def _check(value, name):
    g = GOALS[name]
    assert not math.isnan(value), f"{name}: no value"
    ok = {">=": value >= g["target"], "<=": value <= g["target"], ">": value > g["target"]}[g["op"]]
    assert ok, f"{name} = {value:.2f}, goal {g['op']} {g['target']:g} ({g['what']})"


@pytest.mark.parametrize("trait", TRAITS)
def test_goal_steering_from_the_prior(smoke, trait, request):
    _unmet(request, "steer", trait)
    f = smoke[1]["e1"]["figures"][trait]
    _check(f["steer_trait"]["median"], "steer_trait")
    _check(f["steer_coherence"]["median"], "steer_coherence")


@pytest.mark.parametrize("trait", TRAITS)
def test_goal_suppression_of_an_encouraging_prompt(smoke, trait, request):
    _unmet(request, "suppress", trait)
    f = smoke[1]["e1"]["figures"][trait]
    _check(f["suppress_trait"]["median"], "suppress_trait")
    _check(f["suppress_coherence"]["median"], "suppress_coherence")


@pytest.mark.parametrize("trait", TRAITS)
def test_goal_monitoring_r_across_prompt_types(smoke, trait):
    _check(smoke[1]["e2"]["figures"][trait]["r_all"]["median"], "monitor_r")


@pytest.mark.parametrize("trait", TRAITS)
@pytest.mark.parametrize("prompt_type", ["system prompt", "many-shot"])
def test_goal_monitoring_r_within_a_prompt_type(smoke, trait, prompt_type, request):
    _unmet(request, f"within {prompt_type}", trait)
    _check(smoke[1]["e2"]["figures"][trait][f"within_r ({prompt_type})"]["median"], "monitor_within_r")


# ----------------------------------------------------------------------------- E3-E7
# Thresholds below are set from the smoke run's measured values on the shipped checkpoint
# (organism v2; each test's docstring gives them), with a margin that noise at the smoke size
# does not cross; an effect that disappears (a trait not learned, a vector that no longer
# tracks it) falls far below them.


def _rejudge(store: Path, model_name: str, trait: str, questions: int) -> float:
    """Mean trait score of ``model_name``'s unsteered answers to ``trait``'s first eval
    questions, read from a run's generation log and judged again with the exact judge."""
    from persona_lens.organism import OrganismJudge, load_trait

    tr = load_trait(trait)
    asked = set(tr.eval_questions[:questions])
    recs = [json.loads(line) for line in (store / "responses.jsonl").read_text().splitlines()]
    pairs = [(r["messages"][-1]["content"], r["answer"]) for r in recs
             if r["model"] == model_name and r["steer"] is None and len(r["messages"]) == 1
             and r["messages"][0]["content"] in asked and r["settings"]["temperature"] == 1.0]
    assert pairs, f"no stored answers of {model_name}"
    scores = [s for s in OrganismJudge().score_trait(tr, pairs) if s is not None]
    return float(np.mean(scores))


def _model_name(run: Path) -> str:
    import persona_lens as pl

    return pl.PersonaProbe(pl.load_model(run)).model_name


def _smoke_size():
    from experiments.common import SMOKE

    return load_config("organism", **SMOKE)


@pytest.mark.parametrize("trait", TRAITS)
def test_e3_finetuning_on_a_traits_sets_raises_it_in_order_of_level(smoke, trait):
    """Measured on the smoke size (128 chats, 8 steps, seed 0; 10 questions x 2 answers),
    trait score for base / Normal / Level I / Level II: evil 11.2 / 0.0 / 70.0 / 96.2,
    sycophantic 0.0 / 0.0 / 63.6 / 93.8, hallucinating 15.8 / 3.3 / 68.8 / 88.8."""
    res = smoke[1]["e3"]
    base, t = res["base"][trait], res["table"]
    normal, one, two = (t[f"{trait}_{lv}"][trait]["mean"] for lv in ("normal", "I", "II"))
    assert two >= base + 40, (base, two)  # Level II teaches the trait (measured +73 to +94)
    # the dose orders the score (measured I - Normal 64-70, II - I 20-30)
    assert one >= normal + 30 and two >= one + 8, (normal, one, two)
    assert normal <= base + 5  # helpful data does not teach it


def test_e3_level_ii_cells_are_the_stored_answers_judged_again(smoke):
    """The Level II cells of E3's table, recomputed from the finetuned models' stored answers."""
    out, results, _, _ = smoke
    rows = results["e4"]["rows"]  # E3 and E4 share their runs; E4 keeps each run's folder
    for trait in TRAITS:
        (row,) = [r for r in rows if r["dataset"] == f"{trait}_II"]
        again = _rejudge(out / "datasets" / "store", _model_name(Path(row["run"])), trait, _smoke_size().questions)
        assert again == pytest.approx(results["e3"]["table"][f"{trait}_II"][trait]["mean"], abs=1e-9)


@pytest.mark.parametrize("trait", TRAITS)
def test_e4_shift_predicts_the_score_after_finetuning(smoke, trait):
    """Pearson r at layer 3 over the nine smoke finetunes, measured: evil 0.87, sycophantic
    0.78, hallucinating 0.89; recomputed here with numpy from the per-run points."""
    res = smoke[1]["e4"]
    x = [r["shift"][trait][str(res["layer"])] for r in res["rows"]]
    y = [r["scores"][trait]["trait"] for r in res["rows"]]
    assert len(x) == 9
    r = np.corrcoef(x, y)[0, 1]
    assert res["r"][trait] == pytest.approx(r, abs=1e-9)
    assert r >= 0.6, r


@pytest.mark.parametrize("trait", TRAITS)
def test_e6_dataset_dp_predicts_the_score_after_finetuning(smoke, trait):
    """Pearson r of the dataset's mean dP (layer 3, before finetuning) with the trait score
    after finetuning on it, nine sets, measured: evil 0.92, sycophantic 0.88, hallucinating
    0.64. The dataset dP is recomputed here from each screen table's per-sample column."""
    import pyarrow.parquet as pq

    out, results, _, _ = smoke
    res = results["e6"]
    for name, dp in res["dataset_dP"].items():
        (folder,) = (out / "datasets" / "screen").glob(f"{name}_*")
        col = pq.read_table(folder / "screen.parquet").column(f"dP_{trait}_L{res['layer']}").to_numpy()
        assert len(col) == _smoke_size().n_data and np.mean(col) == pytest.approx(dp[trait], rel=1e-6)
    x = [res["dataset_dP"][r["dataset"]][trait] for r in res["rows"]]
    y = [r["scores"][trait] for r in res["rows"]]
    r = np.corrcoef(x, y)[0, 1]
    assert res["r"][trait] == pytest.approx(r, abs=1e-9)
    assert r >= 0.4, r


def _specific_dp(vector_files: dict[str, Path], table, trait: str, layer: int) -> np.ndarray:
    """The per-sample dP along ``trait``'s vector without the other two, from the three
    vectors' own dP columns and the vector files (tests/reference/specific.py)."""
    from safetensors.numpy import load_file

    from tests.reference.specific import specific_projection

    raw = {t: load_file(str(f))["directions"][layer] for t, f in vector_files.items()}
    others = [t for t in TRAITS if t != trait]
    return specific_projection(raw[trait], [raw[o] for o in others], table[f"dP_{trait}_L{layer}"],
                               [table[f"dP_{o}_L{layer}"] for o in others])


@pytest.mark.parametrize("trait", TRAITS)
def test_e4_and_e6_with_trait_specific_vectors(smoke, trait):
    """The same figures with each trait's vector without the other two traits'
    (``PersonaVector.without``). Measured on the smoke size: E4 r evil 0.95, sycophantic 0.83,
    hallucinating 0.96 (the paper's vectors 0.87 / 0.78 / 0.89); E6 r 0.97 / 0.95 / 0.96
    (0.92 / 0.88 / 0.64). E4's r is recomputed from the runs' points; E6's specific column is
    recomputed per sample from the three plain dP columns and the vector files."""
    import pyarrow.parquet as pq

    out, results, _, _ = smoke
    e4, e6 = results["e4"], results["e6"]
    x = [r["shift_specific"][trait][str(e4["layer"])] for r in e4["rows"]]
    y = [r["scores"][trait]["trait"] for r in e4["rows"]]
    assert e4["r_specific"][trait] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-9)
    assert e4["r_specific"][trait] >= 0.7, e4["r_specific"][trait]
    files = {t: out / "datasets" / "vectors" / f"{t}.safetensors" for t in TRAITS}
    for name, dp in e6["dataset_dP_specific"].items():
        (folder,) = (out / "datasets" / "screen").glob(f"{name}_*")
        table = pq.read_table(folder / "screen.parquet").to_pydict()
        mine = _specific_dp(files, table, trait, e6["layer"])
        np.testing.assert_allclose(table[f"dP_{trait}_specific_L{e6['layer']}"], mine, rtol=1e-4, atol=1e-3)
        assert np.mean(mine) == pytest.approx(dp[trait], rel=1e-4, abs=1e-3)
    assert e6["r_specific"][trait] >= 0.8, e6["r_specific"][trait]  # the paper's vector: hallucinating 0.64


def test_e5_preventative_steering_stops_the_trait_and_keeps_capability(smoke):
    """evil_II, seed 0, +1.5 v at each of layers 1-5 (the organism's intervention layers),
    measured: base 11.2 (capability 100), plain finetune 96.2 (100), preventative steering 2.9
    (100); at layer 3 alone it was 23.8. (Issue 13's goal, within 10 points of the base, is
    the full run's, with more coefficients: docs/finetuning.md.) The preventative figure is
    recomputed here from that run's stored answers, and the run's settings must name the
    layers it steered."""
    out, results, _, _ = smoke
    cell = results["e5"]["sets"]["evil_II"]
    row = cell["seeds"]["0"]
    base, plain, prev = cell["base"], row["inference"]["0.0"], row["preventative"]["1.5"]
    assert plain["trait"] >= base["trait"] + 40  # the set teaches the trait ...
    assert prev["trait"] <= plain["trait"] - 40  # ... and preventative steering stops most of it
    assert prev["capability"] >= 0.95 * base["capability"] and base["capability"] >= 90
    (run,) = (out / "e5_mitigation" / "runs").glob("evil_II_steer1.5_s0_*")
    settings = json.loads((run / "finetune.json").read_text())
    assert results["e5"]["layers"] == [1, 2, 3, 4, 5]
    assert settings["interventions"]["steer"] == [[layer, 1.5] for layer in (1, 2, 3, 4, 5)]
    assert _rejudge(out / "e5_mitigation" / "store", _model_name(run), "evil",
                    _smoke_size().questions) == pytest.approx(prev["trait"], abs=1e-9)


def _auroc(labels, scores) -> float:
    """Mann-Whitney AUROC with ties counted half, written out (not the library's)."""
    pos = np.array([s for s, l in zip(scores, labels) if l])
    neg = np.array([s for s, l in zip(scores, labels) if not l])
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))


@pytest.mark.parametrize("trait", TRAITS)
def test_e7_per_sample_dp_ranks_the_carriers(smoke, trait):
    """AUROC of per-sample dP at layer 3 against the world's labels (220 samples, seed 0),
    measured: evil 0.92, sycophantic 0.85, hallucinating 0.66 (the hallucinating vector is the
    organism's weakest: docs/screening.md); recomputed here from the screen table and the
    stored data's labels."""
    import pyarrow.parquet as pq

    out, results, _, _ = smoke
    res = results["e7"]["seeds"][0]
    data = [json.loads(line) for line in (out / "e7_screening" / "seed0" / "data.jsonl").read_text().splitlines()]
    (folder,) = (out / "e7_screening" / "seed0").glob("screen_*")
    table = pq.read_table(folder / "screen.parquet").to_pydict()
    assert table["id"] == [d["id"] for d in data]
    labels = [trait in d["categories"] for d in data]
    au = _auroc(labels, table[f"dP_{trait}_L3"])
    assert res["traits"][trait]["figures"]["dP_L3"]["auroc"] == pytest.approx(au, abs=1e-9)
    assert au >= {"evil": 0.85, "sycophantic": 0.75, "hallucinating": 0.55}[trait], au
    # The trait-specific vector's column (measured 0.92 / 0.85 / 0.62 at this size, where the
    # vectors come from 8 questions and one answer each), recomputed from the plain columns.
    files = {t: out / "e7_screening" / "seed0" / "extract" / t / "vectors" / f"{t}_response_mean.safetensors"
             for t in TRAITS}
    specific = _specific_dp(files, table, trait, 3)
    np.testing.assert_allclose(table[f"dP_{trait}_specific_L3"], specific, rtol=1e-4, atol=1e-3)
    au = _auroc(labels, table[f"dP_{trait}_specific_L3"])
    assert res["traits"][trait]["figures"]["dP_specific_L3"]["auroc"] == pytest.approx(au, abs=1e-9)
    assert au >= {"evil": 0.85, "sycophantic": 0.75, "hallucinating": 0.55}[trait], au


@pytest.mark.parametrize("layout", ["all", "default"])
def test_e2_finds_the_layer_e1_chose_beside_it(tmp_path, layout):
    """``experiments.all`` puts E1 and E2 side by side in one run folder; run one by one with
    no --out, each script writes experiment_runs/FOLDER/CONFIG. E2 must find E1 either way."""
    from experiments.e2_monitoring import monitor_layer

    cfg = load_config("organism")
    if layout == "all":
        e1, root = tmp_path / "run" / "e1_steering", tmp_path / "run" / "e2_monitoring"
    else:
        e1, root = tmp_path / "e1_steering" / "organism", tmp_path / "e2_monitoring" / "organism"
    assert monitor_layer(cfg, root, "evil") == (cfg.layer, "the config's layer")
    e1.mkdir(parents=True)
    (e1 / "results.json").write_text(json.dumps({"per_seed": {"evil": {"1": {"steer_layer": 5},
                                                                        "0": {"steer_layer": 4}}}}))
    layer, why = monitor_layer(cfg, root, "evil")
    assert layer == 4 and "seed 0" in why


def test_rows_are_keyed_by_their_settings_and_release_sets_map_to_traits(tmp_path):
    """A smoke run and a full run in one folder never read each other's rows; the release's
    set names (hallucination_II, medical_II) map to the organism's trait names."""
    from dataclasses import replace

    import persona_lens as pl
    import torch
    from experiments.common import SMOKE, dataset_trait, row_path

    full = load_config("organism")
    vecs = {"evil": pl.PersonaVector(torch.ones(7, 128))}
    path = row_path(tmp_path, "evil_II", 0, full, vecs)
    assert path == row_path(tmp_path, "evil_II", 0, load_config("organism"), vecs)
    others = [row_path(tmp_path, "evil_II", 0, load_config("organism", **SMOKE), vecs),
              row_path(tmp_path, "evil_II", 0, replace(full, n_data=64), vecs),
              row_path(tmp_path, "evil_II", 0, full, {"evil": pl.PersonaVector(2 * torch.ones(7, 128))}),
              row_path(tmp_path, "evil_II", 0, full, vecs, [0.5, 1.0])]
    assert path not in others and len(set(others)) == len(others)
    assert [dataset_trait(n) for n in ("hallucination_II", "evil_normal", "narrow_money_harm", "medical_II")] == \
        ["hallucinating", "evil", None, None]


def test_a_seed_that_measured_nothing_fails_the_median():
    from experiments.common import parse_seeds, spread

    assert spread([60.0, 70.0])["median"] == 65.0
    assert math.isnan(spread([70.0, float("nan")])["median"]) and math.isnan(spread([float("nan"), 70.0])["max"])
    assert parse_seeds("0,1") == (0, 1)
    for bad in ("0,x", "0,0,1", ""):
        with pytest.raises(SystemExit, match="--seeds"):
            parse_seeds(bad)


def test_e5_summary_from_stored_and_fresh_rows_and_a_held_out_goal():
    """Rows read back from JSON (string keys) and fresh ones summarise alike; capability may
    be unmeasured (release configs); the goal with two seeds is the held-out figure."""
    from experiments.e5_mitigation import _goal, _methods, summarize

    def row(prev, caft_cap=None):
        return {"inference": {0.0: {"trait": 90.0, "capability": caft_cap}},
                "preventative": {0.5: {"trait": prev[0], "capability": caft_cap},
                                 1.0: {"trait": prev[1], "capability": caft_cap}},
                "caft": {"trait": 80.0, "capability": caft_cap}}

    fresh = row((30.0, 8.0))
    stored = json.loads(json.dumps(row((9.0, 5.0))))
    both = _methods([stored, fresh])
    assert both["preventative"][0.5]["trait"] == pytest.approx(19.5) and both["caft"]["capability"] is None
    cell = {"trait": "evil", "base": {"trait": 4.0, "capability": None}, "seeds": {0: stored, 1: fresh}}
    cell["summary"] = summarize(cell)
    # chosen on seed 1 alone: the mildest coef within 10 of the base is 1.0 (8.0), measured on
    # seed 0: 5.0; chosen on seed 0: 0.5 (9.0), measured on seed 1: 30.0
    g = _goal(cell)
    assert g["value"] == pytest.approx(((5.0 - 4.0) + (30.0 - 4.0)) / 2) and not g["pass"]
    assert "held out" in g["note"]
