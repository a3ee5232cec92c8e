"""E6: the dataset-level projection difference predicts the post-finetuning trait score.

    python -m experiments.e6_dataset_dp --config organism    # about 8 minutes on 2 CPU cores (less if E3/E4 ran)

Screens every dataset of the config (organism: Normal / Level I / Level II per trait and the
three narrow sets) with all three vectors at the config's layer in one pass per dataset
(``pl.screen``, greedy base responses), and correlates each trait's dataset-level dP, before
any finetuning, with the trait score after finetuning on that dataset (the runs and scores
E3 and E4 make, shared through the same --out; each seed's finetune is one point, its
dataset's dP the same for every seed). Writes OUT/e6_dataset_dp/results.json and
e6_dataset_dp.html (one scatter per trait).
"""

from __future__ import annotations

import persona_lens as pl
from experiments.common import (TRAITS, base_probe, dataset, dataset_rows, dataset_trait, finetune_settings, goal,
                                pearson, start, vectors, write_results)


def main(argv=None) -> dict:
    cfg, root, skipped = start("e6", "datasets", __doc__, argv)
    if skipped is not None:
        return skipped
    rows, base = dataset_rows(cfg, root)
    probe = base_probe(cfg)
    vecs = vectors(cfg, probe, root)
    dp: dict[str, dict[str, float]] = {}
    for name in cfg.datasets:
        result = pl.screen(probe, dataset(cfg, name), vecs, [cfg.layer], out_dir=root / "screen" / name,
                           settings={"max_new_tokens": cfg.max_new_tokens, "temperature": 0.0, "seed": 0},
                           progress=False)
        dp[name] = {t: result.summary["figures"][f"dP_{t}_L{cfg.layer}"]["mean"] for t in TRAITS}
        print(f"{name}: " + ", ".join(f"dP {t} {dp[name][t]:+.1f}" for t in TRAITS), flush=True)
    res: dict = {"experiment": "E6", "title": f"E6: dataset projection difference vs trait score after finetuning ({cfg.name})",
                 "config": cfg.name, "settings": finetune_settings(cfg), "layer": cfg.layer, "base": base,
                 "dataset_dP": dp, "r": {}, "r_per_seed": {},
                 "rows": [{"dataset": r["dataset"], "seed": r["seed"],
                           "scores": {t: r["scores"][t]["trait"] for t in TRAITS}} for r in rows]}
    for t in TRAITS:
        res["r"][t] = pearson([dp[r["dataset"]][t] for r in rows], [r["scores"][t]["trait"] for r in rows])
        res["r_per_seed"][t] = {s: pearson([dp[r["dataset"]][t] for r in rows if r["seed"] == s],
                                           [r["scores"][t]["trait"] for r in rows if r["seed"] == s])
                                for s in cfg.seeds}
        print(f"{t}: r = {res['r'][t]:.3f} (per seed: "
              + ", ".join(f"{v:.3f}" for v in res["r_per_seed"][t].values()) + ")")
    res["goals"] = {t: {"dataset_dp_r": goal("dataset_dp_r", res["r"][t])} for t in TRAITS}
    write_results(root / "e6_dataset_dp", res, figure(res, rows, dp, cfg), "e6_dataset_dp.html")
    return res


def figure(res, rows, dp, cfg):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(TRAITS), subplot_titles=[f"{t}: r = {res['r'][t]:.2f}" for t in TRAITS])
    for i, t in enumerate(TRAITS, 1):
        fig.add_trace(go.Scatter(
            x=[dp[r["dataset"]][t] for r in rows], y=[r["scores"][t]["trait"] for r in rows], mode="markers",
            text=[f"{r['dataset']} (seed {r['seed']})" for r in rows], name=t,
            marker=dict(color=["crimson" if dataset_trait(r["dataset"]) == t else
                               "orange" if dataset_trait(r["dataset"]) is None else "steelblue" for r in rows])),
            row=1, col=i)
        fig.update_xaxes(title_text=f"dataset dP at layer {cfg.layer}", row=1, col=i)
        fig.update_yaxes(title_text=f"{t} score after finetuning", row=1, col=i)
    fig.update_layout(height=480, width=1400, showlegend=False,
                      title=f"E6: dataset-level projection difference before finetuning ({cfg.name})")
    return fig


if __name__ == "__main__":
    main()
