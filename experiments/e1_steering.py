"""E1: steering sweep: judged trait score against the coefficient, one curve per layer, per trait.

    python -m experiments.e1_steering --config organism            # about 2 minutes on 2 CPU cores
    python -m experiments.e1_steering --config organism --smoke    # CI size

For each trait and seed: ``pl.sweep`` adds ``+coef * v`` at each layer (no system prompt; the
config's positions, by default the paper's "response" mode), chooses the most trait-showing
coherent cell, and re-measures it and the unsteered prior on fresh samples; a second sweep
subtracts ``coef * v`` under the trait's encouraging system prompt and chooses the least
trait-showing coherent cell, re-measured the same way. Every reported figure is the held-out
one (the figures on the answers the cell was chosen from are kept beside them). Goals
(``experiments.common.GOALS``) are checked on the median over seeds.

Writes results.json and e1_steering.html (per trait: the steering and the suppression sweep,
trait score and coherence against the coefficient, one line per layer, the held-out cell
marked).
"""

from __future__ import annotations


import persona_lens as pl
from experiments.common import (TRAITS, base_probe, goal, load_trait, make_judge, spread, start,
                                 vectors, write_results)

HEADLINES = ("steer_trait", "steer_coherence", "prior_trait", "steer_trait_chosen_on", "suppress_trait",
             "suppress_coherence", "encouraged_trait", "suppress_trait_chosen_on")


def main(argv=None) -> dict:
    cfg, root, skipped = start("e1", "e1_steering", __doc__, argv)
    if skipped is not None:
        return skipped
    probe, judge = base_probe(cfg), make_judge(cfg)
    vecs = vectors(cfg, probe, root)
    layers = list(cfg.sweep_layers or range(1, probe.n_layers))
    up = list(cfg.sweep_coefs)
    down = sorted({0.0, *(-abs(c) for c in up)}, reverse=True)
    common = dict(judge=judge, layers=layers, samples=cfg.sweep_samples, heldout_samples=cfg.heldout_samples,
                  questions=cfg.questions, max_new_tokens=cfg.max_new_tokens, coherence_floor=cfg.coherence_floor,
                  positions=cfg.positions, progress=False)
    runs: dict = {}
    for seed in cfg.seeds:
        for t in TRAITS:
            trait = load_trait(cfg, t)
            steer = pl.sweep(probe, vecs[t], trait, coefs=up, seed=seed, out_dir=root / f"seed{seed}" / t / "steer",
                             **common)
            encouraging = trait.system_prompts(0)[0]
            sup = pl.sweep(probe, vecs[t], trait, coefs=down, seed=seed, system=encouraging, choose="lowest",
                           out_dir=root / f"seed{seed}" / t / "suppress", **common)
            runs.setdefault(t, {})[seed] = {"steer": steer, "suppress": sup, "encouraging_prompt": encouraging}
            h = headline(steer, sup)
            print(f"seed {seed} {t}: prior {h['prior_trait']:.1f} -> steered {h['steer_trait']:.1f} "
                  f"(coh {h['steer_coherence']:.1f}; {h['steer_trait_chosen_on']:.1f} on the answers it was chosen "
                  f"from) at L{h['steer_layer']} c{h['steer_coef']}; encouraged {h['encouraged_trait']:.1f} -> "
                  f"suppressed {h['suppress_trait']:.1f} (coh {h['suppress_coherence']:.1f}) at L{h['suppress_layer']} "
                  f"c{h['suppress_coef']}", flush=True)
    res: dict = {
        "experiment": "E1", "title": f"E1: steering sweep ({cfg.name})", "config": cfg.name,
        "settings": {"layers": layers, "coefs": up, "suppression_coefs": down, "positions": cfg.positions,
                     "coherence_floor": cfg.coherence_floor, "samples": cfg.sweep_samples,
                     "heldout_samples": cfg.heldout_samples, "questions": cfg.questions,
                     "max_new_tokens": cfg.max_new_tokens, "seeds": list(cfg.seeds), "temperature": 1.0,
                     "heldout": "the chosen cell and the unsteered baseline re-measured on fresh samples"},
        "per_seed": {t: {str(s): {**headline(r["steer"], r["suppress"]),
                                  "steer_sweep": cells(r["steer"]), "suppress_sweep": cells(r["suppress"]),
                                  "encouraging_prompt": r["encouraging_prompt"]}
                         for s, r in by_seed.items()} for t, by_seed in runs.items()},
    }
    res["figures"] = {t: summary(res["per_seed"][t]) for t in TRAITS}
    res["goals"] = {t: {g: goal(g, res["figures"][t][g]["median"]) for g in
                        ("steer_trait", "steer_coherence", "suppress_trait", "suppress_coherence")} for t in TRAITS}
    write_results(root, res, figures(runs, res, cfg), "e1_steering.html")
    return res


def headline(steer, sup) -> dict:
    nan = float("nan")
    g = lambda cell, k: getattr(cell, k) if cell is not None else nan  # noqa: E731
    return {"steer_trait": g(steer.heldout, "trait"), "steer_coherence": g(steer.heldout, "coherence"),
            "prior_trait": g(steer.heldout_baseline, "trait"), "steer_trait_chosen_on": g(steer.chosen, "trait"),
            "steer_layer": g(steer.chosen, "layer"), "steer_coef": g(steer.chosen, "coef"),
            "suppress_trait": g(sup.heldout, "trait"), "suppress_coherence": g(sup.heldout, "coherence"),
            "encouraged_trait": g(sup.heldout_baseline, "trait"), "suppress_trait_chosen_on": g(sup.chosen, "trait"),
            "suppress_layer": g(sup.chosen, "layer"), "suppress_coef": g(sup.chosen, "coef"),
            "n_heldout": g(steer.heldout, "n")}


def cells(sw) -> dict:
    return {"cells": sw.rows(), **sw.summary()}


def summary(per_seed: dict) -> dict:
    """Median, min and max over seeds of each headline figure."""
    return {k: spread([r[k] for r in per_seed.values()]) for k in HEADLINES}


def figures(runs: dict, res: dict, cfg) -> list:
    import plotly.graph_objects as go

    from persona_lens.plot import sweep_figure

    s = res["settings"]
    note = (f"positions {s['positions']}, {s['samples']} sample(s) per question, "
            f"{cfg.max_new_tokens} new tokens, temperature 1")
    out = []
    for t, by_seed in runs.items():
        seed = min(by_seed)
        for kind, label in (("steer", "+coef x v, no system prompt"),
                            ("suppress", "-coef x v under the encouraging system prompt")):
            sw = by_seed[seed][kind]
            h = sw.heldout
            title = (f"E1 {t}: {label} (seed {seed})<br><sup>held out: "
                     + (f"layer {h.layer}, coef {h.coef:g}: {t} {h.trait:.1f}, coherence {h.coherence:.1f} (n = {h.n}); "
                        f"on its own sweep answers {sw.chosen.trait:.1f}" if h is not None else "no coherent cell")
                     + "</sup>")
            fig = sweep_figure(sw.cells, coherence_floor=sw.coherence_floor,
                               highlight=sw.chosen.layer if sw.chosen else None, title=title,
                               coef_title="steering coefficient (x vector)", trait_title=f"{t} score", note=note)
            if h is not None:
                for col, attr in ((1, "trait"), (2, "coherence")):
                    fig.add_trace(go.Scatter(
                        x=[h.coef], y=[getattr(h, attr)], mode="markers", name="chosen cell, held out",
                        legendgroup="heldout", showlegend=col == 1,
                        marker=dict(symbol="star", size=16, color="crimson", line=dict(width=1, color="black")),
                        hovertemplate=(f"held out ({sw.heldout_how})<br>layer {h.layer}, coef {h.coef:g}<br>"
                                       f"{attr} %{{y:.1f}} (n = {h.n})<extra></extra>")), row=1, col=col)
            fig.update_yaxes(title_text=f"{t} score (0-100)", row=1, col=1)
            fig.update_yaxes(title_text="coherence (0-100)", row=1, col=2)
            out.append(fig)
    return out


if __name__ == "__main__":
    main()
