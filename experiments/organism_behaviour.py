"""Behaviour of the persona organism, measured with plain HF tools and the exact judge.

    python -m experiments.organism_behaviour [--checkpoint DIR] [--traits evil,...] [--json OUT]

(from the repository root: the plain-HF helpers are the tests' reference,
``tests/reference/organism.py``, which is not part of the installed package).

Prints, per trait: trait score with no system prompt, under the pipeline's encouraging form
and under the other encouraging phrasings; the persona vector's steering effect in the
release's "response" mode (added with no system prompt; subtracted under both encouraging
prompts), each cell chosen on one sampling (coherence >= 85) and re-measured on a fresh
sampling (held out); and the monitoring correlation (last-prompt-token projection vs the
cell's mean trait score over graded system prompt x question cells), across all cells and
within each strength (pooled). Capability of the helpful persona first.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from persona_lens.organism import OrganismJudge, World
from persona_lens.organism.world import EXTRA_PHRASINGS, INSTRUCTIONS, TRAITS, pos_system_prompt
from tests.reference import organism as B

COEFS = (1, 1.5, 2, 2.5, 3)
#: Coherence a cell needs to be chosen; held-out coherence is reported beside it.
CHOOSE_COHERENCE = 85


def trait_questions(trait: str) -> tuple[list[str], list[str]]:
    from persona_lens.organism import trait_paths

    ex, ev = trait_paths(trait)
    return json.loads(ex.read_text())["questions"], json.loads(ev.read_text())["questions"]


def capability(model, tok, judge, world, samples=1, seed=0):
    qs = [q.text for q in world.all_questions("factual") if q.known]
    prompts = [B.chat(q, B.HELPFUL_SYSTEM) for q in qs for _ in range(samples)]
    rs = B.generate(model, tok, prompts, seed=seed + 500)
    pairs = list(zip([q for q in qs for _ in range(samples)], rs))
    cap = judge.capability(pairs)
    prompts = [B.chat(q) for q in qs for _ in range(samples)]
    rs = B.generate(model, tok, prompts, seed=seed + 501)
    cap_none = judge.capability(list(zip([q for q in qs for _ in range(samples)], rs)))
    unk = [q.text for q in world.all_questions("factual") if not q.known]
    rs = B.generate(model, tok, [B.chat(q, B.HELPFUL_SYSTEM) for q in unk], seed=seed + 502)
    dk = sum(judge.clauses(q, r)[0].kind == "dont_know" if judge.clauses(q, r) else False for q, r in zip(unk, rs)) / len(unk)
    return cap, cap_none, dk


def _pooled_within(groups, xs, ys):
    """Pearson r after removing each group's means (the within-group correlation)."""
    by: dict = {}
    for g, x, y in zip(groups, xs, ys):
        by.setdefault(g, []).append((x, y))
    dx, dy = [], []
    for pts in by.values():
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        dx += [x - mx for x, _ in pts]
        dy += [y - my for _, y in pts]
    return B.pearson(dx, dy)


def measure_trait(model, tok, judge, world, trait, *, seed=0, verbose=True):
    res: dict = {"trait": trait}
    ex, ev = trait_questions(trait)
    say = print if verbose else (lambda *a, **k: None)

    def run(sysfn, n, sd):
        prompts = [B.chat(q, sysfn(i, s)) for i, q in enumerate(ev) for s in range(n)]
        pairs = list(zip([q for q in ev for _ in range(n)], B.generate(model, tok, prompts, seed=sd)))
        return B.mean(judge.score_trait(trait, pairs)), B.mean(judge.score_coherence(pairs))

    pv = B.extract_vector(model, tok, judge, trait, ex, samples=2, seed=seed + 10)
    vec = pv.vector
    n_layers = vec.shape[0] - 1
    res["n_kept"] = pv.n_pos
    res["vector_norms"] = [round(float(vec[L].norm()), 3) for L in range(n_layers + 1)]
    pos = lambda i, s: pos_system_prompt(trait, INSTRUCTIONS[trait][(i + s) % 5][0])  # noqa: E731
    enc = EXTRA_PHRASINGS[trait]["encouraging"]
    mild = lambda i, s: enc[(i + s) % len(enc)]  # noqa: E731
    res["none"], _ = run(lambda i, s: None, 4, seed + 1)
    res["pos"], _ = run(pos, 2, seed + 2)
    res["encouraging"], _ = run(mild, 2, seed + 3)
    res["prior_expected"] = B.prior_rate(world, trait, ev)
    say(f"[{trait}] none {res['none']:.1f} (world {res['prior_expected']:.1f}) pos {res['pos']:.1f} "
        f"encouraging {res['encouraging']:.1f} kept {pv.n_pos}", flush=True)

    def sweep(sign, sysfn, n, sd, better):
        grid, best = {}, None
        for L in range(1, n_layers):
            for c in COEFS:
                with B.steer(model, vec[L], L, sign * c, positions="response"):
                    grid[f"L{L}_c{c}"] = sc, coh = run(sysfn, n, sd)
                if coh >= CHOOSE_COHERENCE and (best is None or better(sc, best[2])):
                    best = (L, c, sc, coh)
        if best is None:  # no coherent cell: nothing chosen, nothing to re-measure
            nan = float("nan")
            return {"grid": grid, "layer": None, "coef": None, "chosen_on": (nan, nan), "held_out": (nan, nan)}
        L, c = best[:2]
        with B.steer(model, vec[L], L, sign * c, positions="response"):
            held = run(sysfn, 4, sd + 355)
        return {"grid": grid, "layer": L, "coef": c, "chosen_on": best[2:], "held_out": held}

    res["add"] = sweep(+1, lambda i, s: None, 2, seed + 100, lambda a, b: a > b)
    res["sub_pos"] = sweep(-1, pos, 2, seed + 200, lambda a, b: a < b)
    res["sub_encouraging"] = sweep(-1, mild, 2, seed + 200, lambda a, b: a < b)
    for k in ("add", "sub_pos", "sub_encouraging"):
        r = res[k]
        say(f"  {k}: L{r['layer']} c{r['coef']} chosen-on {r['chosen_on'][0]:.1f} (coh {r['chosen_on'][1]:.1f}) "
            f"held-out {r['held_out'][0]:.1f} (coh {r['held_out'][1]:.1f})", flush=True)

    cells = [(s, sp, q) for s, sp in B.graded_prompts(trait) for q in ev]
    ns = 4
    rs = B.generate(model, tok, [B.chat(q, sp) for _, sp, q in cells for _ in range(ns)], seed=seed + 300)
    scores = judge.score_trait(trait, list(zip([q for _, _, q in cells for _ in range(ns)], rs)))
    cell_scores = [B.mean(scores[i * ns : (i + 1) * ns]) for i in range(len(cells))]
    acts = B.last_prompt_activations(model, tok, [B.chat(q, sp) for _, sp, q in cells])
    res["monitor_r"], res["monitor_within_r"] = {}, {}
    for L in range(1, n_layers + 1):
        proj = (acts[:, L] @ (vec[L] / vec[L].norm())).tolist()
        res["monitor_r"][L] = B.pearson(proj, cell_scores)
        res["monitor_within_r"][L] = _pooled_within([c[0] for c in cells], proj, cell_scores)
    say("  monitor r " + " ".join(f"L{L}:{r:.2f}" for L, r in res["monitor_r"].items())
        + "\n  within-strength r " + " ".join(f"L{L}:{r:.2f}" for L, r in res["monitor_within_r"].items()), flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.organism_behaviour", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--traits", default=",".join(TRAITS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write all numbers here")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    world = World(0)
    judge = OrganismJudge(world)
    model, tok = B.load(a.checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"organism: {n_params} parameters, {model.config.num_hidden_layers} layers, d_model {model.config.hidden_size}")
    cap, cap_none, dk = capability(model, tok, judge, world, seed=a.seed)
    print(f"capability (helpful system prompt, known facts): {100 * cap:.1f}%  (no system prompt: {100 * cap_none:.1f}%)  "
          f"'i do not know' on unknown animals: {100 * dk:.1f}%", flush=True)
    out = {"n_params": n_params, "capability": cap, "capability_no_system": cap_none, "dont_know_unknown": dk, "traits": {}}
    for trait in a.traits.split(","):
        out["traits"][trait] = measure_trait(model, tok, judge, world, trait, seed=a.seed)
    print(f"done in {time.time() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
