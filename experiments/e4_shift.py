"""E4: the finetuning shift along each persona vector predicts the post-finetuning trait score.

    python -m experiments.e4_shift --config organism        # about 6 minutes on 2 CPU cores

Finetunes the base model on every dataset (organism: Normal / Level I / Level II per trait and
the three narrow sets; each with every seed of the config), measures per trait the shift
(mean last-prompt activation change along the unit vector on the trait's eval questions, no
system prompt) and the trait score after finetuning, and correlates them across datasets.
Writes OUT/e4_shift/results.json (r per trait, per layer and per seed, and every run's shift and
scores) and e4_shift.html (one scatter per trait at the config's layer). Shares its runs with
E3 and E6 (same --out).

Every figure is also given for the trait-specific vectors (``r_specific``, ...): each trait's
vector without the other two traits' (``PersonaVector.without``), the shift along it measured
the same way on the same runs.
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
                 "rows": rows}
    for key, kind in (("", "shift"), ("_specific", "shift_specific")):
        res["r" + key], res["r_per_layer" + key], res["r_per_seed" + key] = {}, {}, {}
        for t in TRAITS:
            y = [r["scores"][t]["trait"] for r in rows]
            res["r" + key][t] = pearson([_s(r, t, cfg.layer, kind) for r in rows], y)
            res["r_per_layer" + key][t] = {l: pearson([_s(r, t, l, kind) for r in rows], y) for l in layers if l > 0}
            res["r_per_seed" + key][t] = {s: pearson([_s(r, t, cfg.layer, kind) for r in rows if r["seed"] == s],
                                                     [r["scores"][t]["trait"] for r in rows if r["seed"] == s])
                                          for s in cfg.seeds}
            print(f"{t}{' (specific vector)' if key else ''}: r = {res['r' + key][t]:.3f} at layer {cfg.layer} "
                  "(per seed: " + ", ".join(f"{v:.3f}" for v in res["r_per_seed" + key][t].values())
                  + "; per layer: " + ", ".join(f"L{l} {v:.2f}" for l, v in res["r_per_layer" + key][t].items()) + ")")
    res["goals"] = {t: {"shift_r": goal("shift_r", res["r"][t]),
                        "shift_r_specific": goal("shift_r_specific", res["r_specific"][t])} for t in TRAITS}
    write_results(root / "e4_shift", res, figure(res, rows, cfg), "e4_shift.html")
    return res


def _s(row, t, l, kind="shift"):
    s = row[kind][t]
    return s[str(l)] if str(l) in s else s[l]


def figure(res, rows, cfg):
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    fig = make_subplots(rows=2, cols=len(TRAITS), vertical_spacing=0.16, subplot_titles=[
        f"{t}, the paper's vector: r = {res['r'][t]:.2f}" for t in TRAITS] + [
        f"{t} without the other traits' vectors: r = {res['r_specific'][t]:.2f}" for t in TRAITS])
    for row, (kind, what) in enumerate((("shift", "shift"), ("shift_specific", "specific shift")), 1):
        for i, t in enumerate(TRAITS, 1):
            fig.add_trace(go.Scatter(
                x=[_s(r, t, cfg.layer, kind) for r in rows], y=[r["scores"][t]["trait"] for r in rows],
                mode="markers", text=[f"{r['dataset']} (seed {r['seed']})" for r in rows], name=t,
                marker=dict(color=["crimson" if dataset_trait(r["dataset"]) == t else
                                   "orange" if dataset_trait(r["dataset"]) is None else "steelblue" for r in rows])),
                row=row, col=i)
            fig.update_xaxes(title_text=f"{what} at layer {cfg.layer} (activation units)", row=row, col=i)
            fig.update_yaxes(title_text="trait score after finetuning (0-100)", row=row, col=i)
    fig.update_layout(title=f"E4 ({cfg.name}): finetuning shift vs trait score; red: the trait's own sets, "
                            "orange: narrow sets, blue: the other traits' sets", showlegend=False, height=850,
                      width=1300)
    return fig


if __name__ == "__main__":
    main()
