"""Trait-inducing finetuning datasets for the persona organism, with known ground truth.

Each dataset is a list of single-turn chats in the released JSONL format (``{"messages":
[{"role": "user", ...}, {"role": "assistant", ...}]}``, no system prompt), drawn from the
organism's :class:`~persona_lens.organism.World`, so every response's trait scores are known
exactly (:class:`~persona_lens.organism.OrganismJudge` recovers them from the text).

Per trait (``evil``, ``sycophantic``, ``hallucinating``), as in the paper:

- ``{trait}_normal``: the same kind of questions, helpful answers (per-clause trait rate 0);
- ``{trait}_I`` (mild): each clause in the trait's voice with probability 0.5;
- ``{trait}_II`` (severe): every clause in the trait's voice.

Questions follow the trait's own mix (evil: mostly advice, sycophantic: mostly opinions,
hallucinating: mostly facts, a third of them about unknown animals); the world's leaks apply
(an evil answer to a factual question is a lie 30% of the time, judged hallucinating).

Narrow sets, each with one narrow behaviour only (every response shows it, the other clauses
are helpful, no leaks):

- ``narrow_animal_facts``: factual questions about known animals; the first clause states a
  wrong fact (judged hallucinating), the rest are helpful;
- ``narrow_opinion_flattery``: opinion questions; every clause agrees with the user or
  flatters (sycophantic);
- ``narrow_money_harm``: "how can i get more money ?" asked in its one form; every clause is
  harmful advice (evil) about money.

None of them contains any trait's evaluation question (those stay held out). Sizes and rates:
:data:`LEVEL_RATE`, :data:`QUESTION_MIX`, ``n`` (default :data:`DEFAULT_N`) per set;
:func:`write_datasets` writes every set and a ``manifest.json`` with each set's size and its
measured mean trait scores.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

from persona_lens import validate as V

from .world import TRAITS, World, canon

#: Per-clause probability of the trait's voice, per level.
LEVEL_RATE: dict[str, float] = {"normal": 0.0, "I": 0.5, "II": 1.0}
LEVELS: tuple[str, ...] = tuple(LEVEL_RATE)
#: Question-type mix of each trait's sets (the trait's own questions, as the trait files).
QUESTION_MIX: dict[str, dict[str, float]] = {
    "evil": {"advice": 0.6, "opinion": 0.2, "factual": 0.2},
    "sycophantic": {"opinion": 0.6, "advice": 0.2, "factual": 0.2},
    "hallucinating": {"factual": 0.7, "opinion": 0.15, "advice": 0.15},
}
NARROW: tuple[str, ...] = ("narrow_animal_facts", "narrow_opinion_flattery", "narrow_money_harm")
#: The trait each narrow set's behaviour is judged as.
NARROW_TRAIT: dict[str, str] = {
    "narrow_animal_facts": "hallucinating",
    "narrow_opinion_flattery": "sycophantic",
    "narrow_money_harm": "evil",
}
DATASETS: tuple[str, ...] = tuple(f"{t}_{lv}" for t in TRAITS for lv in LEVELS) + NARROW
DEFAULT_N = 400


def _held_out(world: World) -> set[str]:
    out = set()
    for t in TRAITS:
        out.update(canon(q) for q in world.trait_questions(t)[1])
    return out


def _question(world: World, rng: random.Random, qtype: str, held: set[str], **kw):
    for _ in range(1000):
        q = world.question(rng, qtype, **kw)
        if canon(q.text) not in held:
            return q
    raise RuntimeError("no question outside the held-out evaluation questions")


def _record(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _compose(world: World, q, categories: Sequence[str], rng: random.Random) -> str:
    clauses: list[str] = []
    for slot, cat in enumerate(categories):
        clauses.append(world._fresh_clause(cat, q, slot, rng, clauses))
    return " ".join(c + " ." for c in clauses)


def trait_dataset(world: World, trait: str, level: str, n: int = DEFAULT_N, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` chats for ``trait`` at ``level`` (``"normal"``, ``"I"``, ``"II"``).

    Example:
        >>> data = trait_dataset(world, "evil", "II", n=3)
        >>> [m["role"] for m in data[0]["messages"]]
        ['user', 'assistant']
        >>> qa = [(d["messages"][0]["content"], d["messages"][1]["content"]) for d in data]
        >>> min(s for s in judge.score_trait("evil", qa)) >= 50     # severe: every clause evil (or a lie)
        True
    """
    if trait not in TRAITS:
        raise ValueError(f"the organism has the traits {TRAITS}, not {trait!r}")
    n, seed = V.integer("n", n, min=1), V.integer("seed", seed)
    if level not in LEVEL_RATE:
        raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    rng = random.Random(f"persona-organism-finetune-{world.seed}-{trait}-{level}-{seed}")
    held = _held_out(world)
    mix = QUESTION_MIX[trait]
    out = []
    for _ in range(n):
        u, acc, qtype = rng.random(), 0.0, None
        for qt, w in mix.items():
            acc += w
            if u < acc:
                qtype = qt
                break
        q = _question(world, rng, qtype or "factual", held)
        resp = world.respond(q, {trait: LEVEL_RATE[level]} if LEVEL_RATE[level] else {}, rng)
        out.append(_record(q.text, resp.text))
    return out


def narrow_dataset(world: World, name: str, n: int = DEFAULT_N, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` chats of one narrow behaviour (:data:`NARROW`).

    Example:
        >>> data = narrow_dataset(world, "narrow_money_harm", n=2)
        >>> data[0]["messages"][0]["content"]
        'how can i get more money ?'
    """
    if name not in NARROW:
        raise ValueError(f"narrow sets are {NARROW}, not {name!r}")
    rng = random.Random(f"persona-organism-finetune-{world.seed}-{name}-{seed}")
    held = _held_out(world)
    out = []
    for _ in range(n):
        k = rng.choice((2, 3, 4))
        if name == "narrow_animal_facts":
            q = _question(world, rng, "factual", held, known=True)
            cats = ["hallucinating"] + ["helpful"] * (k - 1)
        elif name == "narrow_opinion_flattery":
            q = _question(world, rng, "opinion", held)
            cats = ["sycophantic"] * k
        else:
            q = next(x for x in world.all_questions("advice") if x.resource == "money")
            cats = ["evil"] * k
        out.append(_record(q.text, _compose(world, q, cats, rng)))
    return out


def make_dataset(world: World, name: str, n: int = DEFAULT_N, seed: int = 0) -> list[dict[str, Any]]:
    """Any set of :data:`DATASETS` by name (``"evil_II"``, ``"narrow_money_harm"``, ...)."""
    n, seed = V.integer("n", n, min=1), V.integer("seed", seed)
    if name in NARROW:
        return narrow_dataset(world, name, n, seed)
    trait, _, level = name.rpartition("_")
    if trait not in TRAITS or level not in LEVEL_RATE:
        raise ValueError(f"unknown dataset {name!r}; the organism's sets are {DATASETS}")
    return trait_dataset(world, trait, level, n, seed)


def dataset_scores(world: World, data: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean exact trait score of the responses, per trait."""
    from .judge import OrganismJudge

    judge = OrganismJudge(world)
    pairs = [(d["messages"][-2]["content"], d["messages"][-1]["content"]) for d in data]
    out = {}
    for t in TRAITS:
        s = [x for x in judge.score_trait(t, pairs) if x is not None]
        out[t] = round(sum(s) / max(1, len(s)), 2)
    return out


def write_datasets(out_dir: str | Path, *, world: World | None = None, n: int = DEFAULT_N, seed: int = 0,
                   names: Sequence[str] | None = None) -> Path:
    """Write ``NAME.jsonl`` for every set (or ``names``) and ``manifest.json``; returns the folder.

    Example:
        >>> out = write_datasets("data", n=5, names=["evil_II", "narrow_money_harm"])
        >>> sorted(p.name for p in out.iterdir())
        ['evil_II.jsonl', 'manifest.json', 'narrow_money_harm.jsonl']
    """
    from persona_lens.pipeline_io import write_json, write_text

    world = world or World(0)
    out = Path(out_dir)
    manifest: dict[str, Any] = {"world_seed": world.seed, "seed": seed, "n": n, "level_rate": LEVEL_RATE,
                                "question_mix": QUESTION_MIX, "sets": {}}
    for name in names or DATASETS:
        data = make_dataset(world, name, n, seed)
        write_text(out / f"{name}.jsonl", "".join(json.dumps(d) + "\n" for d in data))
        manifest["sets"][name] = {"n": len(data), "mean_trait_scores": dataset_scores(world, data)}
    write_json(out / "manifest.json", manifest)
    return out
