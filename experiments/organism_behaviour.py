"""Behaviour of the persona organism, measured with plain HF tools and the exact judge.

    python -m experiments.organism_behaviour [--checkpoint DIR] [--traits evil,...]

(from the repository root: the plain-HF helpers are the tests' reference,
``tests/reference/organism.py``, which is not part of the installed package).

Prints, per trait: trait score under encouraging / suppressing / no system prompt (eval
questions, temperature 1), helpful capability on known facts, the persona vector's
steering effect (added with no system prompt; subtracted under the encouraging prompt),
and the monitoring correlation (last-prompt-token projection vs trait score over
graded-system-prompt x question cells).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from persona_lens.organism import OrganismJudge, World
from persona_lens.organism.world import (
    INSTRUCTIONS,
    TRAITS,
    neg_system_prompt,
    pos_system_prompt,
)
from tests.reference import organism as B


def trait_questions(trait: str) -> tuple[list[str], list[str]]:
    from persona_lens.organism import trait_paths

    ex, ev = trait_paths(trait)
    return json.loads(ex.read_text())["questions"], json.loads(ev.read_text())["questions"]


def measure_trait(model, tok, judge, world, trait, *, samples=4, layers=None, coefs=(0.5, 1, 1.5, 2), seed=0, verbose=True):
    res: dict = {"trait": trait}
    ex_q, ev_q = trait_questions(trait)
    qtypes = [world.parse_question(q).qtype for q in ev_q]

    def run(system_fn, n=samples, sd=seed):
        prompts, qs = [], []
        for i, q in enumerate(ev_q):
            for s in range(n):
                prompts.append(B.chat(q, system_fn(i, s)))
                qs.append(q)
        rs = B.generate(model, tok, prompts, seed=sd)
        pairs = list(zip(qs, rs))
        return pairs, B.mean(judge.score_trait(trait, pairs)), B.mean(judge.score_coherence(pairs))

    pos = lambda i, s: pos_system_prompt(trait, INSTRUCTIONS[trait][(i + s) % 5][0])  # noqa: E731
    neg = lambda i, s: neg_system_prompt(INSTRUCTIONS[trait][(i + s) % 5][1])  # noqa: E731
    _, res["encouraging"], res["encouraging_coh"] = run(pos)
    _, res["suppressing"], res["suppressing_coh"] = run(neg)
    _, res["none"], res["none_coh"] = run(lambda i, s: None, n=samples * 2)
    res["prior_expected"] = B.prior_rate(world, trait, ev_q)
    for strength in ("encouraging", "suppressing", "neutral"):
        ph = world_system_prompts(trait, strength)
        _, res[f"mild_{strength}"], _ = run(lambda i, s, ph=ph: ph[(i + s) % len(ph)])
    if verbose:
        print(f"[{trait}] pos {res['encouraging']:.1f} (coh {res['encouraging_coh']:.1f})  neg {res['suppressing']:.1f}  "
              f"none {res['none']:.1f} (prior {res['prior_expected']:.1f})  mild enc {res['mild_encouraging']:.1f} "
              f"neutral {res['mild_neutral']:.1f} mild sup {res['mild_suppressing']:.1f}", flush=True)

    # persona vector from the extraction questions (pipeline in miniature)
    pv = B.extract_vector(model, tok, judge, trait, ex_q, samples=2, seed=seed + 10)
    vec = pv.vector
    res["n_kept"] = pv.n_pos
    n_layers = vec.shape[0] - 1
    layers = layers or list(range(1, n_layers))
    res["vector_norms"] = [round(float(vec[l].norm()), 3) for l in range(n_layers + 1)]

    # steering: add with no system prompt; subtract under the encouraging prompt
    sweep = {}
    best = None
    for L in layers:
        for c in coefs:
            with B.steer(model, vec[L], L, c):
                _, sc, coh = run(lambda i, s: None, n=2, sd=seed + 100)
            sweep[(L, c)] = (sc, coh)
            if verbose:
                print(f"  steer +{c} @L{L}: {trait} {sc:.1f} coh {coh:.1f}", flush=True)
            if coh >= 80 and (best is None or sc > best[2]):
                best = (L, c, sc, coh)
    res["steer_add_best"] = best
    res["steer_sweep"] = {f"L{L}_c{c}": v for (L, c), v in sweep.items()}
    sub = {}
    for L in layers:
        for c in coefs:
            with B.steer(model, vec[L], L, -c):
                _, sc, coh = run(pos, n=2, sd=seed + 200)
            sub[(L, c)] = (sc, coh)
            if verbose:
                print(f"  steer -{c} @L{L} under pos: {trait} {sc:.1f} coh {coh:.1f}", flush=True)
    res["steer_sub"] = {f"L{L}_c{c}": v for (L, c), v in sub.items()}
    bsub = max(sub.items(), key=lambda kv: (kv[1][1] >= 80, res["encouraging"] - kv[1][0]))
    res["steer_sub_best"] = (bsub[0][0], bsub[0][1], bsub[1][0], bsub[1][1], res["encouraging"] - bsub[1][0])

    # monitoring: graded system prompts x eval questions, several samples per cell
    cells = []
    for strength, sp in B.graded_prompts(trait):
        for q in ev_q:
            cells.append((strength, sp, q))
    prompts = [B.chat(q, sp) for _, sp, q in cells for _ in range(samples)]
    qs = [q for _, _, q in cells for _ in range(samples)]
    rs = B.generate(model, tok, prompts, seed=seed + 300)
    scores = judge.score_trait(trait, list(zip(qs, rs)))
    acts = B.last_prompt_activations(model, tok, [B.chat(q, sp) for _, sp, q in cells])
    rmon = {}
    for L in range(1, n_layers + 1):
        u = vec[L] / vec[L].norm()
        proj = (acts[:, L] @ u).tolist()
        cell_scores = [B.mean(scores[i * samples : (i + 1) * samples]) for i in range(len(cells))]
        rmon[L] = B.pearson(proj, cell_scores)
    res["monitor_r"] = rmon
    if verbose:
        print(f"  monitor r per layer: " + " ".join(f"L{L}:{r:.3f}" for L, r in rmon.items()), flush=True)
        print(f"  best add: {best}  best sub: {res['steer_sub_best']}", flush=True)
    return res


def world_system_prompts(trait, strength):
    from persona_lens.organism.world import EXTRA_PHRASINGS

    return list(EXTRA_PHRASINGS[trait][strength])


def capability(model, tok, judge, world, samples=2, seed=0):
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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.organism_behaviour", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--traits", default=",".join(TRAITS))
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--layers", default=None, help="comma-separated steering layers (default: all middle ones)")
    ap.add_argument("--coefs", default="0.5,1,1.5,2")
    ap.add_argument("--json", default=None, help="write all numbers here")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    t0 = time.time()
    world = World(0)
    judge = OrganismJudge(world)
    model, tok = B.load(a.checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"organism: {n_params} parameters, {model.config.num_hidden_layers} layers, d_model {model.config.hidden_size}")
    cap, cap_none, dk = capability(model, tok, judge, world)
    print(f"capability (helpful system prompt, known facts): {100 * cap:.1f}%  (no system prompt: {100 * cap_none:.1f}%)  "
          f"'i do not know' on unknown animals: {100 * dk:.1f}%")
    out = {"n_params": n_params, "capability": cap, "capability_no_system": cap_none, "dont_know_unknown": dk, "traits": {}}
    layers = [int(x) for x in a.layers.split(",")] if a.layers else None
    coefs = [float(x) for x in a.coefs.split(",")]
    for trait in a.traits.split(","):
        out["traits"][trait] = measure_trait(model, tok, judge, world, trait, samples=a.samples, layers=layers, coefs=coefs)
    print(f"done in {time.time() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
