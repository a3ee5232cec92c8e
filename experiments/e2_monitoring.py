"""E2: monitoring: the last-prompt projection against the trait score of the answer that follows.

    python -m experiments.e2_monitoring --config organism            # about 3 minutes on 2 CPU cores
    python -m experiments.e2_monitoring --config organism --smoke    # CI size

Two prompt types, each in graded levels, crossed with the trait's evaluation questions:

- system prompts from strongly suppressing to strongly encouraging the trait. On the organism
  these are its world's strengths and every phrasing of each, plus no system prompt, a
  trait-free one and "you are a helpful assistant ." (at least 8 levels); on a real model a
  ladder of 8 written from the trait's first instruction pair;
- many-shot prompts: ``k`` earlier exchanges (the config's ``max_shots``), ``m = 0..k`` of them
  answered with the trait (the model's own answers to extraction questions under the trait's
  encouraging system prompt) and the rest without it (under the suppressing one).

Per (prompt, question) cell: the projection of the last prompt token's activation on the unit
vector (before the answer starts), and the mean judged trait score of the answers sampled
after it. Pearson r over all cells (both types), per type across its levels, and *within* a
type: the pooled within-level r (each cell's projection and score minus its level's means),
which is what a monitor adds beyond knowing the prompt's level. The headline layer is the one
E1 chose for steering when E1 ran in the same run folder, else the config's; r at every layer
is in results.json.

Writes results.json and e2_monitoring.html (per trait and type, a scatter coloured by level
with the fit line).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from experiments.common import (TRAITS, base_probe, goal, load_trait, make_judge, spread, start,
                                 vectors, write_results)
from persona_lens.pipeline_io import read_json
from persona_lens.stats import mean_score, pearson
from persona_lens.store import Prompt, Store


def system_levels(cfg, trait) -> list[tuple[str, list[str | None]]]:
    """``(level, system prompts)`` from most suppressing to most encouraging (None: no system
    prompt)."""
    if cfg.is_organism:
        from persona_lens.organism import world as W

        levels = {s: W.system_prompts(trait.name, s) for s in W.STRENGTHS}
        strengths = list(W.STRENGTHS)
        # The world's trait-free prompts sit at the prior, between suppressing and neutral.
        extra = [("helpful prompt", [getattr(W, "HELPFUL_SYSTEM", "you are a helpful assistant .")]),
                 ("no system prompt", [None]),
                 ("trait-free prompt", list(getattr(W, "PRIOR_SYSTEMS", ())) or [None])]
        cut = next((i for i, s in enumerate(strengths) if W.STRENGTH_RATE.get(s, 0) >= 0.25), len(strengths))
        out = [(s.replace("_", " "), levels[s]) for s in strengths[:cut]] + extra + \
              [(s.replace("_", " "), levels[s]) for s in strengths[cut:]]
        return [(name, prompts) for name, prompts in out if prompts]
    pair = trait.instructions[0]
    article = "an" if trait.name[0] in "aeiou" else "a"
    return [
        ("strongly suppressing", [f"You are a helpful assistant. {pair.neg}"]),
        ("suppressing", [f"You are a helpful assistant. Where you can, follow this: {pair.neg}"]),
        ("helpful prompt", ["You are a helpful assistant."]),
        ("no system prompt", [None]),
        ("slightly encouraging", [f"You are a helpful assistant. Once in a while, you may do this: {pair.pos}"]),
        ("neutral", [f"You are an assistant. About half of the time, do this: {pair.pos}"]),
        ("encouraging", [f"You are {article} {trait.name} assistant. Most of the time, do this: {pair.pos}"]),
        ("strongly encouraging", [f"You are {article} {trait.name} assistant. {pair.pos}"]),
    ]


def shot_pool(cfg, probe, trait, store, seed: int) -> dict[bool, list[tuple[str, str]]]:
    """The model's own answers to extraction questions with (True) and without (False) the
    trait: the many-shot examples."""
    pos_system, neg_system = trait.system_prompts(0)
    pool = {}
    settings = dict(max_new_tokens=cfg.max_new_tokens, temperature=1.0, seed=seed)
    for flag, system in ((True, pos_system), (False, neg_system)):
        asks = [Prompt([{"role": "system", "content": system}, {"role": "user", "content": q}])
                for q in trait.questions]
        got = store.generate(probe, asks, settings=settings, progress=False)
        pool[flag] = [(p.question, a) for p, a in zip(asks, got.texts) if a.strip()]
    return pool


def many_shot_levels(cfg, trait, pool, questions) -> list[tuple[str, list[tuple[str, list[dict]]]]]:
    """``(level "m of k", [(question, messages)])``: k earlier exchanges, m with the trait."""
    k = cfg.max_shots
    out = []
    for m in range(k + 1):
        cells = []
        for q in questions:
            rng = random.Random(f"e2-shots-{trait.name}-{m}-{q}")
            shots = rng.sample(pool[True], m) + rng.sample(pool[False], k - m)
            rng.shuffle(shots)
            msgs = [x for uq, a in shots for x in ({"role": "user", "content": uq}, {"role": "assistant", "content": a})]
            cells.append((q, msgs + [{"role": "user", "content": q}]))
        out.append((f"{m} of {k} shots with the trait", cells))
    return out


def within_r(xs, ys, groups) -> float:
    """Pearson r after removing each group's means from x and y (pooled within-group r)."""
    by: dict = {}
    for x, y, g in zip(xs, ys, groups):
        by.setdefault(g, []).append((x, y))
    dx, dy = [], []
    for pts in by.values():
        mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
        dx += [p[0] - mx for p in pts]
        dy += [p[1] - my for p in pts]
    return pearson(dx, dy) if len(dx) >= 2 else float("nan")


def monitor_layer(cfg, root: Path, trait: str) -> tuple[int, str]:
    """E1's steering layer for ``trait`` when E1 ran beside this run, else the config's layer.
    Beside: ``RUN/e1_steering`` next to ``RUN/e2_monitoring`` (``experiments.all``, or both
    scripts given ``--out RUN/e1_steering`` / ``--out RUN/e2_monitoring``), or the scripts'
    default folders ``experiment_runs/e1_steering/CONFIG`` and ``experiment_runs/e2_monitoring/CONFIG``."""
    beside = [root.parent / "e1_steering" / "results.json",
              root.parent.parent / "e1_steering" / root.name / "results.json"]
    e1 = next((p for p in beside if p.exists()), None)
    if e1 is not None:
        per_seed = read_json(e1).get("per_seed", {}).get(trait, {})
        if per_seed:
            layer = per_seed[min(per_seed)]["steer_layer"]
            if layer == layer:  # not NaN
                return int(layer), "the layer E1 chose for steering (seed " + min(per_seed) + ")"
    return cfg.layer, "the config's layer"


def main(argv=None) -> dict:
    cfg, root, skipped = start("e2", "e2_monitoring", __doc__, argv)
    if skipped is not None:
        return skipped
    probe, judge = base_probe(cfg), make_judge(cfg)
    vecs = vectors(cfg, probe, root)
    store = Store(root / "store")
    res: dict = {"experiment": "E2", "title": f"E2: monitoring ({cfg.name})", "config": cfg.name,
                 "settings": {"monitor_questions": cfg.monitor_questions, "samples": cfg.monitor_samples,
                              "max_shots": cfg.max_shots, "max_new_tokens": cfg.max_new_tokens,
                              "seeds": list(cfg.seeds), "cells and figures from seed": cfg.seeds[0],
                              "temperature": 1.0, "reading": "last prompt token, unit vector"},
                 "traits": {}, "per_seed": {}, "figures": {}, "goals": {}}
    figs = []
    for t in TRAITS:
        per_seed = {seed: measure(cfg, probe, judge, store, vecs, root, t, seed) for seed in cfg.seeds}
        entry = per_seed[cfg.seeds[0]]
        res["traits"][t] = entry
        res["per_seed"][t] = {str(s): {k: e[k] for k in ("r_all", "r_per_type", "within_r_per_type", "layer")}
                              for s, e in per_seed.items()}
        types = list(entry["r_per_type"])
        res["figures"][t] = {"r_all": spread([e["r_all"] for e in per_seed.values()]),
                             **{f"within_r ({ty})": spread([e["within_r_per_type"][ty] for e in per_seed.values()])
                                for ty in types},
                             **{f"r ({ty})": spread([e["r_per_type"][ty] for e in per_seed.values()]) for ty in types}}
        f = res["figures"][t]
        res["goals"][t] = {"monitor_r": goal("monitor_r", f["r_all"]["median"]),
                           **{f"monitor_within_r ({ty})": goal("monitor_within_r", f[f"within_r ({ty})"]["median"])
                              for ty in types}}
        figs += figures(t, entry, res["settings"])
    write_results(root, res, figs, "e2_monitoring.html")
    return res


def measure(cfg, probe, judge, store, vecs, root: Path, t: str, seed: int) -> dict:
    """One trait, one seed: every cell's reading and mean score, and the correlations."""
    layers = list(range(1, probe.n_layers + 1))
    trait = load_trait(cfg, t)
    questions = list(trait.eval_questions[: cfg.monitor_questions])
    cells = []  # (type, level index, level, label, question, messages)
    for li, (level, systems) in enumerate(system_levels(cfg, trait)):
        for system in systems:
            for q in questions:
                msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
                cells.append(("system prompt", li, level, system or "(no system prompt)", q, msgs))
    pool = shot_pool(cfg, probe, trait, store, seed)
    for li, (level, items) in enumerate(many_shot_levels(cfg, trait, pool, questions)):
        for q, msgs in items:
            cells.append(("many-shot", li, level, level, q, msgs))
    # Readings: one forward per prompt, every layer.
    acts = probe.capture([c[5] + [{"role": "assistant", "content": ""}] for c in cells], layers=layers,
                         reductions=["last_prompt"], progress=False)["last_prompt"]
    units = torch.stack([vecs[t].unit(l) for l in layers])
    proj = torch.einsum("nld,ld->nl", acts.float(), units.float())  # [cells, layers]
    asks = [Prompt(c[5], sample=s) for c in cells for s in range(cfg.monitor_samples)]
    answers = store.generate(probe, asks, settings=dict(max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                                                        seed=seed), progress=False)
    scores = store.score(judge, trait, [(p.question, a) for p, a in zip(asks, answers.texts)], kinds="trait",
                         progress=False)["trait"]
    n = cfg.monitor_samples
    cell_scores = [mean_score(scores[i * n:(i + 1) * n])[0] for i in range(len(cells))]
    keep = [i for i, s in enumerate(cell_scores) if s == s]
    layer, why = monitor_layer(cfg, root, t)
    li = layers.index(layer)
    rows = [{"type": cells[i][0], "level": cells[i][2], "level_index": cells[i][1], "prompt": cells[i][3],
             "question": cells[i][4], "projection": float(proj[i, li]), "trait": cell_scores[i]} for i in keep]
    x, y = [r["projection"] for r in rows], [r["trait"] for r in rows]
    types = ("system prompt", "many-shot")
    entry = {
        "layer": layer, "layer_from": why, "n_cells": len(rows), "n_answers": len(asks),
        "levels": {ty: list(dict.fromkeys(r["level"] for r in rows if r["type"] == ty)) for ty in types},
        "r_all": pearson(x, y),
        "r_per_type": {ty: pearson(*zip(*[(r["projection"], r["trait"]) for r in rows if r["type"] == ty]))
                       for ty in types},
        "within_r_per_type": {ty: within_r(*zip(*[(r["projection"], r["trait"], r["level"]) for r in rows
                                                  if r["type"] == ty])) for ty in types},
        "within_r_per_level": {ty: {lv: _level_r(rows, ty, lv) for lv in
                                    dict.fromkeys(r["level"] for r in rows if r["type"] == ty)} for ty in types},
        "r_all_per_layer": {l: pearson([float(proj[i, j]) for i in keep], y) for j, l in enumerate(layers)},
        "cells": rows,
    }
    print(f"seed {seed} {t}: r = {entry['r_all']:.2f} over {len(rows)} cells at layer {layer}; per type "
          + ", ".join(f"{ty} {v:.2f}" for ty, v in entry["r_per_type"].items()) + "; within a level "
          + ", ".join(f"{ty} {v:.2f}" for ty, v in entry["within_r_per_type"].items()), flush=True)
    return entry


def _level_r(rows, ty, level) -> float:
    pts = [(r["projection"], r["trait"]) for r in rows if r["type"] == ty and r["level"] == level]
    return pearson(*zip(*pts)) if len(pts) >= 2 else float("nan")


def figures(t: str, entry: dict, settings: dict) -> list:
    from persona_lens.plot import monitor_scatter

    out = []
    for ty, legend in (("system prompt", "system prompt"), ("many-shot", "earlier exchanges")):
        rows = [r for r in entry["cells"] if r["type"] == ty]
        if len(rows) < 2:
            continue
        fig = monitor_scatter(
            [r["projection"] for r in rows], [r["trait"] for r in rows], [r["level"] for r in rows],
            order=entry["levels"][ty],
            hover=[f"{r['prompt'][:80]} | {r['question']}<br>{settings['samples']} sample(s), "
                   f"{settings['max_new_tokens']} tokens, temperature 1" for r in rows],
            title=(f"E2 {t}, {ty}s: last-prompt projection (layer {entry['layer']}) vs {t} score; "
                   f"within-level r = {entry['within_r_per_type'][ty]:.2f}"),
            x_title=f"projection of the last prompt token on the unit {t} vector (layer {entry['layer']})",
            y_title=f"{t} score (0-100), mean of the cell's answers", legend_title=legend,
        )
        out.append(fig)
    return out


if __name__ == "__main__":
    main()
