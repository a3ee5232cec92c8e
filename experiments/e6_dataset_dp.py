"""E6: the dataset-level projection difference predicts the post-finetuning trait score.

    python -m experiments.e6_dataset_dp --config organism    # about 8 minutes on 2 CPU cores (less if E3/E4 ran)

Screens every dataset of the config (organism: Normal / Level I / Level II per trait and the
three narrow sets) with all three vectors at the config's layer in one pass per dataset
(``pl.screen``, greedy base responses), and correlates each trait's dataset-level dP, before
any finetuning, with the trait score after finetuning on that dataset (the runs and scores
E3 and E4 make, shared through the same --out; each seed's finetune is one point, its
dataset's dP the same for every seed). Writes OUT/e6_dataset_dp/results.json and
e6_dataset_dp.html (one scatter per trait).

The same pass also screens with each trait's vector without the other two traits'
(``PersonaVector.without``; ``r_specific`` and its row of the figure): six columns from one
forward per batch.
"""

from __future__ import annotations

import persona_lens as pl
from experiments.common import (TRAITS, base_probe, dataset, dataset_rows, dataset_trait, finetune_settings, goal,
                                pearson, screen_vectors, start, vectors, write_results)


def main(argv=None) -> dict:
    cfg, root, skipped = start("e6", "datasets", __doc__, argv)
    if skipped is not None:
        return skipped
    rows, base = dataset_rows(cfg, root)
    probe = base_probe(cfg)
    vecs = vectors(cfg, probe, root)
    named, vkey = screen_vectors(vecs)
    dp: dict[str, dict[str, float]] = {}
    dp_specific: dict[str, dict[str, float]] = {}
    for name in cfg.datasets:
        result = pl.screen(probe, dataset(cfg, name), named, [cfg.layer], out_dir=root / "screen" / f"{name}_{vkey}",
                           settings={"max_new_tokens": cfg.max_new_tokens, "temperature": 0.0, "seed": 0},
                           progress=False)
        dp[name] = {t: result.summary["figures"][f"dP_{t}_L{cfg.layer}"]["mean"] for t in TRAITS}
        dp_specific[name] = {t: result.summary["figures"][f"dP_{t}_specific_L{cfg.layer}"]["mean"] for t in TRAITS}
        print(f"{name}: " + ", ".join(f"dP {t} {dp[name][t]:+.1f} (specific {dp_specific[name][t]:+.1f})"
                                      for t in TRAITS), flush=True)
    res: dict = {"experiment": "E6", "title": f"E6: dataset projection difference vs trait score after finetuning ({cfg.name})",
                 "config": cfg.name, "settings": finetune_settings(cfg), "layer": cfg.layer, "base": base,
                 "dataset_dP": dp, "dataset_dP_specific": dp_specific,
                 "rows": [{"dataset": r["dataset"], "seed": r["seed"],
                           "scores": {t: r["scores"][t]["trait"] for t in TRAITS}} for r in rows]}
    for key, table in (("", dp), ("_specific", dp_specific)):
        res["r" + key], res["r_per_seed" + key] = {}, {}
        for t in TRAITS:
            res["r" + key][t] = pearson([table[r["dataset"]][t] for r in rows], [r["scores"][t]["trait"] for r in rows])
            res["r_per_seed" + key][t] = {s: pearson([table[r["dataset"]][t] for r in rows if r["seed"] == s],
                                                     [r["scores"][t]["trait"] for r in rows if r["seed"] == s])
                                          for s in cfg.seeds}
            print(f"{t}{' (specific vector)' if key else ''}: r = {res['r' + key][t]:.3f} (per seed: "
                  + ", ".join(f"{v:.3f}" for v in res["r_per_seed" + key][t].values()) + ")")
    res["goals"] = {t: {"dataset_dp_r": goal("dataset_dp_r", res["r"][t]),
                        "dataset_dp_r_specific": goal("dataset_dp_r_specific", res["r_specific"][t])}
                    for t in TRAITS}
    write_results(root / "e6_dataset_dp", res, figure(res, rows, dp, dp_specific, cfg), "e6_dataset_dp.html")
    return res


def figure(res, rows, dp, dp_specific, cfg):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=len(TRAITS), vertical_spacing=0.16, subplot_titles=[
        f"{t}, the paper's vector: r = {res['r'][t]:.2f}" for t in TRAITS] + [
        f"{t} without the other traits' vectors: r = {res['r_specific'][t]:.2f}" for t in TRAITS])
    for row, (table, what) in enumerate(((dp, "dataset dP"), (dp_specific, "dataset dP, specific vector")), 1):
        for i, t in enumerate(TRAITS, 1):
            fig.add_trace(go.Scatter(
                x=[table[r["dataset"]][t] for r in rows], y=[r["scores"][t]["trait"] for r in rows], mode="markers",
                text=[f"{r['dataset']} (seed {r['seed']})" for r in rows], name=t,
                marker=dict(color=["crimson" if dataset_trait(r["dataset"]) == t else
                                   "orange" if dataset_trait(r["dataset"]) is None else "steelblue" for r in rows])),
                row=row, col=i)
            fig.update_xaxes(title_text=f"{what} at layer {cfg.layer} (activation units)", row=row, col=i)
            fig.update_yaxes(title_text=f"{t} score after finetuning (0-100)", row=row, col=i)
    fig.update_layout(height=850, width=1400, showlegend=False,
                      title=f"E6: dataset-level projection difference before finetuning ({cfg.name}); red: the "
                            "trait's own sets, orange: narrow sets, blue: the other traits' sets")
    return fig


if __name__ == "__main__":
    main()
