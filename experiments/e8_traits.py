"""E8: how the traits' persona vectors relate: cosine similarity per layer, and projections
of each trait's answers on every vector.

    python -m experiments.e8_traits --config organism      # under a minute on 2 CPU cores
    python -m experiments.e8_traits --config smollm2       # vectors extracted without a judge

Cosine similarity between every pair of traits' vectors at every layer. Then, for each trait,
the model answers the trait's evaluation questions under the trait's encouraging system prompt
(and, as the reference, under its suppressing one); each answer's activations, averaged over
its tokens and read without the system prompt (what the answer itself carries), are projected
on every trait's unit vector at every layer. Needs no judge.

Writes results.json and e8_traits.html (cosine matrices at the middle layer, cosine per layer,
and the mean projection of each trait's answers on each vector per layer).
"""

from __future__ import annotations

import torch

from experiments.common import TRAITS, base_probe, load_trait, start, vectors, write_results
from persona_lens.store import Prompt, Store


def main(argv=None) -> dict:
    cfg, root, skipped = start("e8", "e8_traits", __doc__, argv)
    if skipped is not None:
        return skipped
    probe = base_probe(cfg)
    vecs = vectors(cfg, probe, root)
    layers = list(range(1, probe.n_layers + 1))
    cosine = {a: {b: {l: float(vecs[a].cosine(vecs[b], layer=l)) for l in layers} for b in TRAITS} for a in TRAITS}
    units = {t: torch.stack([vecs[t].unit(l) for l in layers]) for t in TRAITS}
    store = Store(root / "store")
    settings = dict(max_new_tokens=cfg.max_new_tokens, temperature=1.0, seed=cfg.seeds[0])
    proj: dict = {}
    for t in TRAITS:
        trait = load_trait(cfg, t)
        questions = list(trait.eval_questions[: cfg.questions])
        for side, system in zip(("encouraged", "suppressed"), trait.system_prompts(0)):
            asks = [Prompt([{"role": "system", "content": system}, {"role": "user", "content": q}], sample=s)
                    for q in questions for s in range(cfg.e8_samples)]
            got = store.generate(probe, asks, settings=settings, progress=False)
            convs = [[{"role": "user", "content": p.question}, {"role": "assistant", "content": a}]
                     for p, a in zip(asks, got.texts) if a.strip()]
            acts = probe.capture(convs, layers=layers, reductions=["response_mean"], progress=False)["response_mean"]
            proj.setdefault(t, {})[side] = {
                b: {l: float(v) for l, v in zip(layers, torch.einsum("nld,ld->l", acts.float(), units[b].float())
                                               / len(convs))} for b in TRAITS}
            proj[t][side]["n"] = len(convs)
    mid = layers[len(layers) // 2]
    res = {"experiment": "E8", "title": f"E8: traits' vectors compared ({cfg.name})", "config": cfg.name,
           "settings": {"layers": layers, "samples": cfg.e8_samples, "questions": cfg.questions,
                        "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seeds[0], "middle_layer": mid,
                        "answers": "under each trait's encouraging (and suppressing) system prompt, "
                                   "projected without the system prompt"},
           "cosine": cosine, "projection": proj,
           "figures": {"cosine_middle_layer": {f"{a}~{b}": cosine[a][b][mid] for i, a in enumerate(TRAITS)
                                               for b in TRAITS[i + 1:]},
                       "own_vector_separation_middle_layer": {
                           t: proj[t]["encouraged"][t][mid] - proj[t]["suppressed"][t][mid] for t in TRAITS}}}
    for pair, c in res["figures"]["cosine_middle_layer"].items():
        print(f"cosine at layer {mid}: {pair} {c:+.2f}")
    for t in TRAITS:
        print(f"{t} answers (encouraged) on each vector at layer {mid}: "
              + ", ".join(f"{b} {proj[t]['encouraged'][b][mid]:+.2f}" for b in TRAITS)
              + f" (suppressed answers on their own vector {proj[t]['suppressed'][t][mid]:+.2f})")
    write_results(root, res, figures(res, cfg), "e8_traits.html")
    return res


def figures(res: dict, cfg) -> list:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers, mid = res["settings"]["layers"], res["settings"]["middle_layer"]
    cos, proj = res["cosine"], res["projection"]
    z = [[cos[a][b][mid] for b in TRAITS] for a in TRAITS]
    heat = go.Figure(go.Heatmap(
        z=z, x=list(TRAITS), y=list(TRAITS), zmin=-1, zmax=1, colorscale="RdBu_r", colorbar=dict(title="cosine"),
        text=[[f"{v:.2f}" for v in row] for row in z], texttemplate="%{text}",
        hovertemplate="%{y} vs %{x}<br>cosine %{z:.3f}<br>layer " + str(mid) + "<extra></extra>"))
    heat.update_layout(title=f"E8 ({cfg.name}): cosine similarity between persona vectors at layer {mid}",
                       xaxis_title="trait", yaxis_title="trait", height=440, template="plotly_white")
    lines = go.Figure()
    for i, a in enumerate(TRAITS):
        for b in TRAITS[i + 1:]:
            lines.add_trace(go.Scatter(x=layers, y=[cos[a][b][l] for l in layers], mode="lines+markers",
                                       name=f"{a} vs {b}",
                                       hovertemplate=f"{a} vs {b}<br>layer %{{x}}<br>cosine %{{y:.3f}}<extra></extra>"))
    lines.update_layout(title=f"E8 ({cfg.name}): cosine similarity between persona vectors, layer by layer",
                        xaxis_title="layer (residual stream entering block L)", yaxis_title="cosine similarity",
                        yaxis_range=[-1, 1], legend_title_text="pair", height=440, template="plotly_white")
    pf = make_subplots(rows=1, cols=len(TRAITS), subplot_titles=[f"on the {b} vector" for b in TRAITS],
                       shared_yaxes=True)
    colors = {"evil": "crimson", "sycophantic": "darkorange", "hallucinating": "royalblue"}
    for c, b in enumerate(TRAITS, start=1):
        for t in TRAITS:
            for side, dash in (("encouraged", "solid"), ("suppressed", "dot")):
                pf.add_trace(go.Scatter(
                    x=layers, y=[proj[t][side][b][l] for l in layers], mode="lines+markers", name=f"{t} ({side})",
                    legendgroup=f"{t}-{side}", showlegend=c == 1, line=dict(color=colors.get(t), dash=dash),
                    hovertemplate=(f"answers under the {side.replace('ed', 'ing')} {t} prompt "
                                   f"(n = {proj[t][side]['n']})<br>projected on the {b} vector<br>layer %{{x}}: "
                                   f"%{{y:.2f}}<extra></extra>")), row=1, col=c)
        pf.update_xaxes(title_text="layer", row=1, col=c)
    pf.update_yaxes(title_text="mean projection on the unit vector", row=1, col=1)
    pf.update_layout(title=f"E8 ({cfg.name}): each trait's answers projected on every persona vector "
                           "(solid: encouraging prompt, dotted: suppressing prompt)",
                     legend_title_text="answers", height=480, template="plotly_white")
    return [heat, lines, pf]


if __name__ == "__main__":
    main()
