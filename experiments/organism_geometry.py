"""Where the organism's persona vectors share their direction, measured on world-written answers.

    python -m experiments.organism_geometry [--checkpoint DIR] [--questions N] [--json OUT]

(from the repository root, like ``experiments.organism_behaviour``: the activations come from
the tests' plain-HF reference, ``tests/reference/organism.py``).

Every trait's vector is measured against the same pole, the helpful answer, so whatever
separates helpful answers from *any* trait's answers is in all three vectors. This script
says how much, per layer, without sampling from the model (the world writes every answer, so
the figures do not move with a sampling seed):

* ``cos``: cosine between two traits' contrastive vectors in the experiments' form (the
  trait's encouraging system prompt and a trait answer, against its suppressing prompt and
  a helpful answer; ``experiments.common.vectors``);
* ``cos_answer`` / ``cos_prompt``: the same with only the answer changed (the suppressing
  prompt on both sides) and with only the system prompt changed (a helpful answer on both
  sides); ``full_vs_answer``: cosine between a trait's full vector and its answer-only one,
  i.e. how much of the vector the answer carries;
* ``pole_ratio``: with no system prompt, the response-mean activation of helpful answers
  (H) and of each trait's answers (T_t), c the traits' centre: |H - c| / mean_t |T_t - c|.
  Three traits at right angles around H give 0.71 (the vectors T_t - H share nothing); a
  regular simplex (H one more vertex, as far from the others as they are from each other)
  gives sqrt(2) = 1.41, where the vectors share cosine 0.5. With the traits placed alike
  around H, ratio^2 = (1 + 3 cos / (1 - cos)) / 2, cos the cosine between two T_t - H:
  ``cos_nosys``, which is measured too. ``pole_ratio_shared_frames``: the same with H from
  helpful answers that use none of the clause frames only the helpful voice has (``let me
  know if you have more questions``, ...), to see whether those frames' words make the
  distance.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from pathlib import Path

import torch

from persona_lens.organism import World, load_trait
from persona_lens.organism.world import CLAUSES, STRENGTH_RATE, TRAITS
from tests.reference import organism as B


def cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Cosine between two per-layer vectors ``[layers + 1, d_model]`` at layers 1..n."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)[1:].tolist()


def pole_ratio(pole: torch.Tensor, others: list[torch.Tensor]) -> float:
    """|pole - c| / mean |other - c|, c the others' centre: 0.71 for three others at right
    angles around the pole, 1.41 for a regular simplex.

    >>> import torch
    >>> round(pole_ratio(torch.zeros(3), list(torch.eye(3))), 2)
    0.71
    """
    c = torch.stack(others).double().mean(0)
    return float((pole.double() - c).norm() / torch.stack([(o.double() - c).norm() for o in others]).mean())


def helpful_only_frames() -> list[re.Pattern]:
    """The clause frames no trait's voice uses, as patterns over a clause."""
    voices: dict[str, set[str]] = {}
    for category, templates in CLAUSES.items():
        for t in templates:
            voices.setdefault(t.frame or t.text, set()).add(category)
    return [re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(f)) + "$") for f, v in voices.items() if v == {"helpful"}]


def _mean(model, tok, rows: list[tuple[list, str]]) -> torch.Tensor:
    acts, _ = B.activations(model, tok, [r[0] for r in rows], [r[1] for r in rows])
    return acts.mean(0)  # [layers + 1, d_model]


def measure(checkpoint: str | None = None, n_questions: int = 120, seed: int = 0) -> dict:
    model, tok = B.load(checkpoint)
    world, rng = World(0), random.Random(seed)
    # a trait's answers as the world writes them under its strongest prompt (every clause in
    # the shipped world)
    top = STRENGTH_RATE["strongly_encouraging"]
    every = [q for qt in ("factual", "opinion", "advice") for q in world.all_questions(qt)]
    by_text = {q.text: q for q in every}
    full, answer, prompt = {}, {}, {}
    for t in TRAITS:
        trait = load_trait(t)
        rows = {k: [] for k in ("pos", "neg", "neg_trait_answer", "pos_helpful_answer")}
        for i in range(len(trait.instructions)):
            ps, ns = trait.system_prompts(i)
            for text in trait.questions:
                q = by_text[text]
                for _ in range(2):
                    rt, rh = world.respond(q, {t: top}, rng).text, world.respond(q, {}, rng).text
                    rows["pos"].append((B.chat(text, ps), rt))
                    rows["neg"].append((B.chat(text, ns), rh))
                    rows["neg_trait_answer"].append((B.chat(text, ns), rt))
                    rows["pos_helpful_answer"].append((B.chat(text, ps), rh))
        m = {k: _mean(model, tok, v) for k, v in rows.items()}
        full[t] = m["pos"] - m["neg"]
        answer[t] = m["neg_trait_answer"] - m["neg"]
        prompt[t] = m["pos_helpful_answer"] - m["neg"]
    qs = list(every)
    rng.shuffle(qs)
    qs = qs[:n_questions]
    poles = {}
    for v in ("helpful",) + TRAITS:
        rates = {} if v == "helpful" else {v: top}
        poles[v] = _mean(model, tok, [(B.chat(q.text), world.respond(q, rates, rng).text) for q in qs for _ in range(2)])
    only = helpful_only_frames()
    plain: list[tuple[list, str]] = []
    while len(plain) < 2 * len(qs):
        q = rng.choice(qs)
        r = world.respond(q, {}, rng)
        if not any(p.match(c) for p in only for c in r.clauses):
            plain.append((B.chat(q.text), r.text))
    poles["helpful_shared_frames"] = _mean(model, tok, plain)
    layers = range(1, full[TRAITS[0]].shape[0])
    pairs = [f"{a}~{b}" for a, b in itertools.combinations(TRAITS, 2)]
    out: dict = {"checkpoint": checkpoint or "shipped", "layers": list(layers), "pairs": pairs}
    for name, vecs in (("cos", full), ("cos_answer", answer), ("cos_prompt", prompt),
                       ("cos_nosys", {t: poles[t] - poles["helpful"] for t in TRAITS})):
        out[name] = {p: cosines(vecs[a], vecs[b]) for p, (a, b) in zip(pairs, itertools.combinations(TRAITS, 2))}
    out["full_vs_answer"] = {t: cosines(full[t], answer[t]) for t in TRAITS}
    for name, pole in (("pole_ratio", "helpful"), ("pole_ratio_shared_frames", "helpful_shared_frames")):
        out[name] = [pole_ratio(poles[pole][l], [poles[t][l] for t in TRAITS]) for l in layers]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.organism_geometry", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="organism checkpoint folder (default: the shipped one)")
    ap.add_argument("--questions", type=int, default=120, help="questions for the no-system-prompt poles")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = measure(args.checkpoint, args.questions)
    fmt = lambda xs: " ".join(f"{x:4.2f}" for x in xs)  # noqa: E731
    print("layers " + " ".join(f"{l:4d}" for l in res["layers"]))
    print(f"pole_ratio (helpful's distance from the traits' centre / theirs): {fmt(res['pole_ratio'])}")
    print(f"pole_ratio_shared_frames (helpful answers without helpful-only frames): {fmt(res['pole_ratio_shared_frames'])}")
    for name in ("cos", "cos_answer", "cos_prompt", "cos_nosys"):
        for p in res["pairs"]:
            print(f"{name:11s} {p:28s} {fmt(res[name][p])}")
    for t in TRAITS:
        print(f"full_vs_answer {t:25s} {fmt(res['full_vs_answer'][t])}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
