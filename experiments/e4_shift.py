"""E4: the finetuning shift along each persona vector predicts the post-finetuning trait score.

    python -m experiments.e4_shift --config organism        # about 6 minutes on 2 CPU cores

Finetunes the base model on every dataset (organism: Normal / Level I / Level II per trait and
the three narrow sets; each with every seed of the config), measures per trait the shift
(mean last-prompt activation change along the unit vector on the trait's eval questions, no
system prompt) and the trait score after finetuning, and correlates them across datasets.
Writes OUT/e4_shift/results.json (r per trait, per layer and per seed, and every run's shift and
scores) and e4_shift.html (one scatter per trait at the config's layer). Shares its runs with
E3 and E6 (same --out).
"""

from __future__ import annotations

from experiments.common import TRAITS, dataset_rows, dataset_trait, finetune_settings, goal, start, pearson, write_results


def main(argv=None) -> dict:
    cfg, root, skipped = start("e4", "datasets", __doc__, argv)
    if skipped is not None:
        return skipped
    rows, base = dataset_rows(cfg, root)
    layers = sorted(int(l) for l in rows[0]["shift"][TRAITS[0]])
    res: dict = {"experiment": "E4", "title": f"E4: finetuning shift vs trait score after finetuning ({cfg.name})",
                 "config": cfg.name, "settings": finetune_settings(cfg), "layer": cfg.layer, "base": base,
                 "rows": rows, "r": {}, "r_per_layer": {}, "r_per_seed": {}}
    for t in TRAITS:
        y = [r["scores"][t]["trait"] for r in rows]
        res["r"][t] = pearson([r["shift"][t][str(cfg.layer)] if str(cfg.layer) in r["shift"][t]
                               else r["shift"][t][cfg.layer] for r in rows], y)
        res["r_per_layer"][t] = {l: pearson([_s(r, t, l) for r in rows], y) for l in layers if l > 0}
        res["r_per_seed"][t] = {s: pearson([_s(r, t, cfg.layer) for r in rows if r["seed"] == s],
                                           [r["scores"][t]["trait"] for r in rows if r["seed"] == s])
                                for s in cfg.seeds}
        print(f"{t}: r = {res['r'][t]:.3f} at layer {cfg.layer} (per seed: "
              + ", ".join(f"{v:.3f}" for v in res["r_per_seed"][t].values()) + "; per layer: "
              + ", ".join(f"L{l} {v:.2f}" for l, v in res["r_per_layer"][t].items()) + ")")
    res["goals"] = {t: {"shift_r": goal("shift_r", res["r"][t])} for t in TRAITS}
    write_results(root / "e4_shift", res, figure(res, rows, cfg), "e4_shift.html")
    return res


def _s(row, t, l):
    s = row["shift"][t]
    return s[str(l)] if str(l) in s else s[l]


def figure(res, rows, cfg):
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    fig = make_subplots(rows=1, cols=len(TRAITS), subplot_titles=[
        f"{t}: r = {res['r'][t]:.2f}" for t in TRAITS])
    for i, t in enumerate(TRAITS, 1):
        fig.add_trace(go.Scatter(
            x=[_s(r, t, cfg.layer) for r in rows], y=[r["scores"][t]["trait"] for r in rows], mode="markers",
            text=[f"{r['dataset']} (seed {r['seed']})" for r in rows], name=t,
            marker=dict(color=["crimson" if dataset_trait(r["dataset"]) == t else
                               "orange" if dataset_trait(r["dataset"]) is None else "steelblue" for r in rows])),
            row=1, col=i)
        fig.update_xaxes(title_text=f"finetuning shift at layer {cfg.layer}", row=1, col=i)
        fig.update_yaxes(title_text="trait score after finetuning", row=1, col=i)
    fig.update_layout(title=f"E4 ({cfg.name}): finetuning shift vs trait score; red: the trait's own sets, "
                            "orange: narrow sets", showlegend=False, height=450, width=1300)
    return fig


if __name__ == "__main__":
    main()
