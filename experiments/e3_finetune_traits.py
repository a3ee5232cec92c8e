"""E3: every trait's score after finetuning on every dataset (the datasets x traits table).

    python -m experiments.e3_finetune_traits --config organism   # shares E4's runs (same --out)

Also answers: does a narrow set (one narrow behaviour only) move a trait absent from its
data? Writes OUT/e3_finetune_traits/results.json (mean and spread over seeds per cell, the base
model's row) and e3_finetune_traits.html (a heatmap); OUT keeps the finetuning runs E4 and
E6 share.
"""

from __future__ import annotations

import statistics

from experiments.common import TRAITS, dataset_rows, finetune_settings, start, write_results


def main(argv=None) -> dict:
    cfg, root, skipped = start("e3", "datasets", __doc__, argv)
    if skipped is not None:
        return skipped
    rows, base = dataset_rows(cfg, root)
    table: dict = {}
    for name in cfg.datasets:
        cells = [r for r in rows if r["dataset"] == name]
        table[name] = {t: {"mean": statistics.mean(c["scores"][t]["trait"] for c in cells),
                           "min": min(c["scores"][t]["trait"] for c in cells),
                           "max": max(c["scores"][t]["trait"] for c in cells),
                           "coherence": statistics.mean(c["scores"][t]["coherence"] for c in cells)}
                       for t in TRAITS}
    base_scores = {t: base["scores"][t]["trait"] for t in TRAITS}
    w = max(len(n) for n in table)
    print(f"{'dataset':<{w}}  " + "  ".join(f"{t:>22}" for t in TRAITS))
    print(f"{'(base model)':<{w}}  " + "  ".join(f"{base_scores[t]:>22.1f}" for t in TRAITS))
    for name, row in table.items():
        print(f"{name:<{w}}  " + "  ".join(
            f"{row[t]['mean']:>10.1f} [{row[t]['min']:5.1f}-{row[t]['max']:5.1f}]" for t in TRAITS))
    res = {"experiment": "E3", "title": f"E3: every trait's score after finetuning on every dataset ({cfg.name})",
           "config": cfg.name, "settings": finetune_settings(cfg), "seeds": list(cfg.seeds), "base": base_scores,
           "table": table}
    write_results(root / "e3_finetune_traits", res, figure(res), "e3_finetune_traits.html")
    return res


def figure(res):
    import plotly.graph_objects as go

    names = ["(base)"] + list(res["table"])
    z = [[res["base"][t] for t in TRAITS]] + [[res["table"][n][t]["mean"] for t in TRAITS] for n in res["table"]]
    fig = go.Figure(go.Heatmap(z=z, x=list(TRAITS), y=names, colorscale="Reds", zmin=0, zmax=100,
                               text=[[f"{v:.0f}" for v in row] for row in z], texttemplate="%{text}"))
    fig.update_layout(title=f"E3 ({res['config']}): trait score after finetuning (mean over seeds {res['seeds']})",
                      height=600, width=700, yaxis=dict(autorange="reversed"))
    return fig


if __name__ == "__main__":
    main()
