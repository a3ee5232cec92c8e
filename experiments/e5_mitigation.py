"""E5: mitigating trait acquisition: inference-time steering, preventative steering and CAFT.

    python -m experiments.e5_mitigation --config organism   # about 8 minutes on 2 CPU cores

For each Level II set (each with every seed of the config), the trait score (the set's own
trait, eval questions, no system prompt) and the capability (organism: share of known-animal
facts answered right, greedy, helpful system prompt) of:

- the base model, and the model finetuned plainly;
- inference-time steering: the plainly finetuned model generating with ``-coef * v`` at the
  config's intervention layers (response tokens and the last prompt token, as released);
- preventative steering: finetuned with ``+coef * v`` at those layers at every position;
- CAFT: finetuned with the direction projected out at those layers.

The three methods share the layers (``intervention_layers``, or the config's one ``layer``)
and give every layer the same coefficient, so they are compared like for like.

Writes results.json and e5_mitigation.html (trait score and capability vs coefficient, one
column per set).
"""

from __future__ import annotations

import statistics

import persona_lens as pl
from experiments.common import (GOALS, base_probe, capability, dataset_trait, finetune_settings, finetuned, goal,
                                 make_judge, row_path, start, trait_scores, vectors, write_results)


def main(argv=None) -> dict:
    from persona_lens.pipeline_io import read_json, write_json
    from persona_lens.store import Steering, Store

    cfg, root, skipped = start("e5", "mitigation", __doc__, argv)
    if skipped is not None:
        return skipped
    judge, store = make_judge(cfg), Store(root / "store")
    base = base_probe(cfg)
    vecs = vectors(cfg, base, root)
    layers = cfg.layers_e5
    res: dict = {"experiment": "E5", "title": f"E5: inference-time steering, preventative steering and CAFT ({cfg.name})",
                 "config": cfg.name, "layers": list(layers), "sets": {}, "settings": finetune_settings(
        cfg, level2=list(cfg.level2), inference_coefs=list(cfg.inference_coefs),
        preventative_coefs=list(cfg.preventative_coefs), caft=cfg.caft, capability_questions=cfg.capability_questions)}
    for name in cfg.level2:
        trait = dataset_trait(name)
        vec = vecs[trait]
        cell: dict = {"trait": trait, "base": {"trait": trait_scores(cfg, base, judge, store, [trait])[trait]["trait"],
                                               "capability": capability(cfg, base, judge, store)},
                      "seeds": {}}
        for seed in cfg.seeds:
            path = row_path(root, name, seed, cfg, vecs, list(layers), list(cfg.inference_coefs),
                            list(cfg.preventative_coefs), cfg.caft, cfg.capability_questions)
            if path.exists():
                cell["seeds"][seed] = read_json(path)
                continue
            row: dict = {"inference": {}, "preventative": {}}

            def measure(probe, steer=None):
                scores = trait_scores(cfg, probe, judge, store, [trait], steer=steer, seed=seed)[trait]
                return {"trait": scores["trait"], "coherence": scores["coherence"],
                        "capability": capability(cfg, probe, judge, store, steer=steer)}

            tuned = pl.PersonaProbe(pl.load_model(finetuned(cfg, root, name, seed), dtype=cfg.dtype))
            for c in cfg.inference_coefs:
                steer = Steering(vec, layers={l: -c for l in layers}, positions="response") if c else None
                row["inference"][c] = measure(tuned, steer)
            for c in cfg.preventative_coefs:
                run = finetuned(cfg, root, name, seed, vec, steer={l: c for l in layers})
                row["preventative"][c] = measure(pl.PersonaProbe(pl.load_model(run, dtype=cfg.dtype)))
            if cfg.caft:
                run = finetuned(cfg, root, name, seed, vec, caft=list(layers))
                row["caft"] = measure(pl.PersonaProbe(pl.load_model(run, dtype=cfg.dtype)))
            write_json(path, row)
            cell["seeds"][seed] = read_json(path)  # as a resumed run reads it (string keys)
            print(f"{name} seed {seed}: base {cell['base']}; " + "; ".join(
                f"{kind} {c}: {v['trait']:.1f}/{v['capability']}" for kind in ("inference", "preventative")
                for c, v in row[kind].items()) + (f"; caft {row['caft']['trait']:.1f}/{row['caft']['capability']}"
                                                   if "caft" in row else ""), flush=True)
        cell["summary"] = summarize(cell)
        res["sets"][name] = cell
        print(name, cell["summary"], flush=True)
    res["goals"] = {cell["trait"]: {"preventative_over_base": _goal(cell)} for cell in res["sets"].values()}
    write_results(root, res, figure(res, cfg), "e5_mitigation.html")
    return res


def _at(table: dict, c: float):
    """``table``'s entry for coefficient ``c``: keys are floats in a fresh row, strings in one
    read back from JSON."""
    for k, v in table.items():
        if float(k) == float(c):
            return v
    raise KeyError(c)


def _mean(rows, kind, c, key):
    vals = [_at(r[kind], c)[key] for r in rows]
    vals = [v for v in vals if v is not None]
    return statistics.mean(vals) if vals else None


def _methods(rows) -> dict:
    """Per method and coefficient, trait and capability averaged over ``rows`` (one per seed)."""
    keys = lambda kind: sorted({float(k) for r in rows for k in r[kind]})  # noqa: E731
    out = {kind: {c: {k: _mean(rows, kind, c, k) for k in ("trait", "capability")}
                  for c in keys(kind)} for kind in ("inference", "preventative")}
    if all("caft" in r for r in rows):
        out["caft"] = {}
        for k in ("trait", "capability"):
            vals = [r["caft"][k] for r in rows if r["caft"][k] is not None]  # capability: None where unmeasured
            out["caft"][k] = statistics.mean(vals) if vals else None
    return out


def _keeps_capability(v, base) -> bool:
    """Capability >= 95% of the base's (always, where the config measures none)."""
    return base["capability"] is None or (v["capability"] is not None and v["capability"] >= 0.95 * base["capability"])


def _choose(methods, base) -> tuple[float | None, float | None]:
    """(the mildest preventative coef keeping the trait within the goal's 10 points of the base
    with :func:`_keeps_capability`, the mildest inference coef reaching the trait score that coef
    gives), either None where none does."""
    within = GOALS["preventative_over_base"]["target"]
    ok = [c for c, v in methods["preventative"].items()
          if v["trait"] <= base["trait"] + within and _keeps_capability(v, base)]
    if not ok:
        return None, None
    target = methods["preventative"][min(ok)]["trait"]
    reach = [c for c, v in methods["inference"].items() if v["trait"] <= target]
    return min(ok), (min(reach) if reach else None)


def _goal(cell) -> dict:
    """The goal's value: held out where there are two or more seeds (per seed, the coefficient
    chosen on the other seeds' runs, measured on this seed's; the mean over seeds, NaN where a
    seed's choice found no coefficient), else on the runs it was chosen from, and said so."""
    summary, base = cell["summary"], cell["base"]
    held = summary.get("heldout")
    if not held:
        return goal("preventative_over_base", _over_base(summary, base)) | {
            "note": "one seed: chosen on the runs it is measured on"}
    over = [h["preventative"]["trait"] - base["trait"] if h["preventative"] is not None else float("nan")
            for h in held.values()]
    return goal("preventative_over_base", statistics.mean(over)) | {
        "note": f"held out, mean over {len(over)} seeds"}


def _over_base(methods, base) -> float:
    """The lowest trait score above the base's among the preventative coefficients that
    :func:`_keeps_capability` (NaN where none does)."""
    ok = [v["trait"] - base["trait"] for v in methods["preventative"].values() if _keeps_capability(v, base)]
    return min(ok) if ok else float("nan")


def summarize(cell) -> dict:
    """Per method, mean over seeds, and the coefficients :func:`_choose` picks on that mean;
    ``heldout``: per seed, the coefficients chosen on the other seeds' finetuning runs and
    answers, with their figures on this seed's runs, which played no part in the choice."""
    seeds = list(cell["seeds"])
    out = _methods(list(cell["seeds"].values()))
    out["preventative_ok"], out["inference_matching"] = _choose(out, cell["base"])
    if len(seeds) > 1:
        out["heldout"] = {}
        for s in seeds:
            chosen, matching = _choose(_methods([cell["seeds"][o] for o in seeds if o != s]), cell["base"])
            own = _methods([cell["seeds"][s]])
            out["heldout"][s] = {
                "preventative_coef": chosen,
                "preventative": own["preventative"].get(chosen) if chosen is not None else None,
                "inference_coef": matching,
                "inference": own["inference"].get(matching) if matching is not None else None,
            }
    return out


def figure(res, cfg):
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    names = list(res["sets"])
    layers = cfg.layers_e5
    fig = make_subplots(rows=2, cols=len(names), subplot_titles=names + [""] * len(names))
    for i, name in enumerate(names, 1):
        s = res["sets"][name]["summary"]
        base = res["sets"][name]["base"]
        for kind, colour in (("inference", "steelblue"), ("preventative", "crimson")):
            xs = list(s[kind])
            for row, key in ((1, "trait"), (2, "capability")):
                fig.add_trace(go.Scatter(x=xs, y=[s[kind][c][key] for c in xs], mode="lines+markers",
                                         name=kind, line=dict(color=colour), showlegend=(i == 1 and row == 1)),
                              row=row, col=i)
        for row, key in ((1, "trait"), (2, "capability")):
            if "caft" in s:
                fig.add_trace(go.Scatter(x=[0], y=[s["caft"][key]], mode="markers", name="CAFT",
                                         marker=dict(color="green", size=11, symbol="diamond"),
                                         showlegend=(i == 1 and row == 1)), row=row, col=i)
            if base[key] is not None:
                fig.add_hline(y=base[key], line_dash="dot", line_color="grey", row=row, col=i)
        where = f"layer {layers[0]}" if len(layers) == 1 else "each of layers " + ", ".join(map(str, layers))
        fig.update_xaxes(title_text=f"coefficient ({where})", row=2, col=i)
    fig.update_yaxes(title_text="trait score", row=1, col=1)
    fig.update_yaxes(title_text="capability (%)", row=2, col=1)
    fig.update_layout(title=f"E5 ({cfg.name}): finetuning on Level II sets; dotted: base model", height=700,
                      width=1300)
    return fig


if __name__ == "__main__":
    main()
