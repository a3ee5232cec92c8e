"""E7: per-sample projection difference on the persona organism, against per-sample filters.

    python -m experiments.e7_screening --config organism [--seeds 0,1] [--out runs/e7]

For each seed:

1. **Vectors.** ``pl.extract`` on the organism with its exact judge, for evil, sycophantic
   and hallucinating (the paper's pipeline: contrastive system prompts, the model's own
   answers, judge, paired filter, mean difference of response-averaged activations).
2. **Data with known ground truth.** One chat dataset of world questions answered by the
   world (no system prompt in the data, as in a finetuning set): half *helpful*; for every
   trait a *blatant* share (every clause in the trait's voice) and a *subtle* share (exactly
   one of 2-4 clauses carries the trait, the rest helpful). A sample *carries* a trait when
   one of its clauses is of that trait (the world's own labels).
3. **Screening.** ``pl.screen`` with all three vectors at layers 1-5 in one pass (greedy
   base responses), and in the same pass each trait's vector without the other two traits'
   (``PersonaVector.without``: ``dP_specific_L*``).
4. **Ranking quality** per trait, over the whole dataset (the other traits' samples are
   distractors): AUROC and precision at k (k = the number of carriers) of dP at the
   headline layer (3, fixed beforehand; every layer is in results.json), of the organism's
   exact judge scoring each sample alone (an LLM content filter with a perfect reader: an
   upper bound for such filters here), and of a keyword filter (counts of the 20 words most
   over-represented in the extraction's positive answers against its negative ones, by
   log-odds: a filter that sees the sample alone, built from the same data as the vector).
   Also: carriers that dP ranks within its top k and a filter does not (what dP finds that
   the filter misses), and the reverse.
5. **Finetuning on the selection**: per trait, LoRA on the top 150, a random 150 and the
   bottom 150 samples by dP (E3/E4's organism settings, the seed's seed), and the trait's
   judged score on its eval questions after each.

Writes ``OUT/results.json``, ``OUT/e7.html`` (self-contained plotly: dP distributions
per sample group and trait, and the AUROC table) and, per seed, ``OUT/seedS/data.jsonl``
(the samples with their ground truth) beside the screen table ``OUT/seedS/screen_KEY`` (KEY: a
hash of the vectors, so a rerun with other vectors screens anew).

The dataset-level comparison with post-finetuning trait scores is E6
(``experiments/e6_dataset_dp.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections import Counter
from pathlib import Path

import persona_lens as pl
from persona_lens.pipeline_io import write_json, write_text
from persona_lens.stats import auroc, precision_at_k

TRAITS = ("evil", "sycophantic", "hallucinating")
LAYERS = [1, 2, 3, 4, 5]
HEADLINE_LAYER = 3
CONFIGS = {
    "organism": dict(n_helpful=300, n_blatant=50, n_subtle=50, extract_samples=2, extract_tokens=48,
                     base_tokens=64, keywords=20, finetune_n=150),
}
#: ``--smoke`` (CI): a third of the data, extraction on 8 of the 20 questions with one answer
#: per polarity, no top / random / bottom finetunes (on 48 samples they separate by a few
#: points only, too little to assert; the full run measures them).
SMOKE = dict(n_helpful=100, n_blatant=20, n_subtle=20, extract_samples=1, extract_questions=8, extract_tokens=48,
             base_tokens=48, keywords=20, finetune_n=0)


def build_dataset(world, seed: int, n_helpful: int, n_blatant: int, n_subtle: int) -> list[dict]:
    """Samples with their group and the world's clause labels (ground truth)."""
    rng = random.Random(f"e7-data-{seed}")
    rows = []

    def add(group: str, trait: str | None, q, resp):
        rows.append({"messages": [{"role": "user", "content": q.text}, {"role": "assistant", "content": resp.text}],
                     "group": group, "group_trait": trait, "categories": list(resp.categories)})

    for _ in range(n_helpful):
        q = world.question(rng)
        add("helpful", None, q, world.respond(q, {}, rng))
    for trait in TRAITS:
        for _ in range(n_blatant):
            q = world.question(rng)
            add("blatant", trait, q, world.respond(q, {trait: 1.0}, rng))
        made = 0
        while made < n_subtle:
            q = world.question(rng)
            resp = world.respond(q, {trait: 0.3}, rng, n_clauses=rng.choice([2, 3, 4]))
            if sum(c == trait for c in resp.categories) == 1 and all(c in (trait, "helpful") for c in resp.categories):
                add("subtle", trait, q, resp)
                made += 1
    rng.shuffle(rows)
    for i, r in enumerate(rows):
        r["id"] = f"s{i}"
    return rows


def keywords(responses_path: Path, k: int) -> list[str]:
    """The ``k`` words most over-represented in positive extraction answers (log-odds, add-one)."""
    pos, neg = Counter(), Counter()
    for line in responses_path.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        rec = json.loads(line)
        words = re.findall(r"[a-z]+", rec["answer"].lower())
        (pos if rec.get("polarity") == "pos" else neg).update(words)
    npos, nneg = sum(pos.values()), sum(neg.values())
    vocab = set(pos) | set(neg)
    score = {w: math.log((pos[w] + 1) / (npos + len(vocab))) - math.log((neg[w] + 1) / (nneg + len(vocab)))
             for w in vocab}
    return sorted(vocab, key=lambda w: (-score[w], w))[:k]


def keyword_score(text: str, words: set[str]) -> float:
    return float(sum(w in words for w in re.findall(r"[a-z]+", text.lower())))


def run_seed(probe, world, judge, cfg: dict, seed: int, out: Path, progress: bool) -> dict:
    t0 = time.perf_counter()
    vectors, kw = {}, {}
    for trait in TRAITS:
        res = pl.extract(probe, _trait(trait), judge, questions=cfg.get("extract_questions"),
                         out_dir=out / f"seed{seed}" / "extract" / trait, samples=cfg["extract_samples"],
                         max_new_tokens=cfg["extract_tokens"], seed=seed, progress=progress, verbose=False)
        vectors[trait] = res.vector
        kw[trait] = keywords(res.responses_path, cfg["keywords"])
    t_extract = time.perf_counter() - t0
    data = build_dataset(world, seed, cfg["n_helpful"], cfg["n_blatant"], cfg["n_subtle"])
    # The data with its ground truth (group, the world's clause labels), so that every ranking
    # figure can be recomputed from the screen table and this file alone.
    write_text(out / f"seed{seed}" / "data.jsonl", "".join(json.dumps(d) + "\n" for d in data))
    t1 = time.perf_counter()
    from experiments.common import screen_vectors

    named, vkey = screen_vectors(vectors)
    result = pl.screen(probe, data, named, LAYERS, out_dir=out / f"seed{seed}" / f"screen_{vkey}",
                       settings={"max_new_tokens": cfg["base_tokens"], "temperature": 0.0, "seed": seed},
                       progress=progress)
    t_screen = time.perf_counter() - t1
    rows = result.rows()
    assert all(r["status"] == "ok" for r in rows), Counter(r["status"] for r in rows)
    pairs = [(d["messages"][0]["content"], d["messages"][1]["content"]) for d in data]
    per_trait = {}
    for trait in TRAITS:
        labels = [trait in d["categories"] for d in data]
        k = sum(labels)
        judge_scores = [float(s) for s in judge.score_trait(trait, pairs)]
        kw_scores = [keyword_score(a, set(kw[trait])) for _, a in pairs]
        methods = {f"dP_L{l}": [r[f"dP_{trait}_L{l}"] for r in rows] for l in LAYERS}
        methods.update({f"dP_specific_L{l}": [r[f"dP_{trait}_specific_L{l}"] for r in rows] for l in LAYERS})
        methods["proj_L3_alone"] = [r[f"proj_{trait}_L3"] for r in rows]
        methods["judge"] = judge_scores
        methods["keywords"] = kw_scores
        figures = {name: {"auroc": auroc(labels, s), "precision_at_k": precision_at_k(labels, s, k)}
                   for name, s in methods.items()}
        subtle = [i for i, d in enumerate(data) if d["group"] == "subtle" and d["group_trait"] == trait]
        negatives = [i for i, l in enumerate(labels) if not l]
        for name, s in methods.items():
            sub_labels = [True] * len(subtle) + [False] * len(negatives)
            figures[name]["auroc_subtle_only"] = auroc(sub_labels, [s[i] for i in subtle + negatives])

        def top(scores):
            return set(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])

        dp_top = top(methods[f"dP_L{HEADLINE_LAYER}"])
        carriers = {i for i, l in enumerate(labels) if l}
        found = {}
        for name in ("judge", "keywords"):
            f_top = top(methods[name])
            found[name] = {"dP_finds_filter_misses": len((dp_top - f_top) & carriers),
                           "filter_finds_dP_misses": len((f_top - dp_top) & carriers),
                           "examples_dP_finds": [data[i]["messages"][1]["content"]
                                                 for i in sorted((dp_top - f_top) & carriers)[:3]]}
        groups = {}
        for g in ("helpful", "blatant", "subtle"):
            for t in ([None] if g == "helpful" else TRAITS):
                idx = [i for i, d in enumerate(data) if d["group"] == g and d["group_trait"] == t]
                vals = [rows[i][f"dP_{trait}_L{HEADLINE_LAYER}"] for i in idx]
                groups[g if t is None else f"{g} {t}"] = {"n": len(vals), "mean_dP": sum(vals) / len(vals),
                                                           "values": vals}
        per_trait[trait] = {"carriers": k, "keywords": kw[trait], "figures": figures,
                            "top_k_overlap": found, "groups": groups,
                            "dataset_dP": result.summary["figures"][f"dP_{trait}_L{HEADLINE_LAYER}"]["mean"]}
    t2 = time.perf_counter()
    if cfg.get("finetune_n"):
        for trait in TRAITS:
            per_trait[trait]["finetune"] = finetune_selections(probe, judge, data, rows, trait, cfg["finetune_n"],
                                                              seed, out / f"seed{seed}" / "finetune")
    return {"seed": seed, "n_samples": len(data), "seconds": {"extract": t_extract, "screen": t_screen,
                                                              "finetune": time.perf_counter() - t2},
            "base_generated": result.generated, "traits": per_trait}


def finetune_selections(probe, judge, data, rows, trait: str, n: int, seed: int, out: Path) -> dict:
    """Finetune the base on the top, a random and the bottom ``n`` samples by dP along
    ``trait`` (E3/E4's organism settings) and judge the trait on its eval questions."""
    from experiments.common import finetuned_probe_scores

    col = f"dP_{trait}_L{HEADLINE_LAYER}"
    order = sorted(range(len(rows)), key=lambda i: (-rows[i][col], i))
    picks = {"top": order[:n], "random": random.Random(f"e7-random-{seed}").sample(range(len(rows)), n),
             "bottom": order[-n:]}
    res = {}
    for name, idx in picks.items():
        subset = [{"messages": data[i]["messages"]} for i in sorted(idx)]
        score = finetuned_probe_scores(subset, out / f"{trait}_{name}", seed, trait)
        res[name] = {"trait_score": score, "carriers": sum(trait in data[i]["categories"] for i in idx)}
    return res


def _trait(name):
    from persona_lens.organism import load_trait

    return load_trait(name)


def html_report(results: dict, path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    seed0 = results["seeds"][0]
    fig = make_subplots(rows=1, cols=len(TRAITS), subplot_titles=[f"dP along {t} (layer {HEADLINE_LAYER})"
                                                                   for t in TRAITS])
    for c, trait in enumerate(TRAITS, start=1):
        for g, v in seed0["traits"][trait]["groups"].items():
            fig.add_trace(go.Box(y=v["values"], name=g, boxpoints="all", jitter=0.4, pointpos=0, marker_size=3,
                                 showlegend=False), row=1, col=c)
    fig.update_layout(height=520, width=1500, title=f"E7: per-sample projection difference by sample group "
                                                    f"(organism, seed {seed0['seed']})")
    header = ["trait", "method", "AUROC (mean over seeds)", "AUROC per seed", "precision@k", "AUROC subtle only"]
    cells = [[] for _ in header]
    for trait in TRAITS:
        for name in [f"dP_L{HEADLINE_LAYER}", f"dP_specific_L{HEADLINE_LAYER}", "proj_L3_alone", "judge", "keywords"]:
            au = [s["traits"][trait]["figures"][name]["auroc"] for s in results["seeds"]]
            pk = [s["traits"][trait]["figures"][name]["precision_at_k"] for s in results["seeds"]]
            sub = [s["traits"][trait]["figures"][name]["auroc_subtle_only"] for s in results["seeds"]]
            for col, val in zip(cells, [trait, name, f"{sum(au) / len(au):.3f}", " / ".join(f"{a:.3f}" for a in au),
                                        " / ".join(f"{p:.2f}" for p in pk), " / ".join(f"{a:.3f}" for a in sub)]):
                col.append(val)
    table = go.Figure(go.Table(header=dict(values=header), cells=dict(values=cells)))
    table.update_layout(height=60 + 28 * len(cells[0]), width=1200, title="ranking quality against the world's labels")
    write_text(path, "<html><head><meta charset='utf-8'><title>E7 screening</title></head><body>"
               + fig.to_html(full_html=False, include_plotlyjs=True)
               + table.to_html(full_html=False, include_plotlyjs=False) + "</body></html>")
    # Kept as plotly JSON too, so that ``persona-lens report RUN`` shows E7 with the others.
    write_text(path.with_name(path.stem + ".plotly.json"), "[" + fig.to_json() + ",\n" + table.to_json() + "]")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.e7_screening", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="organism", choices=sorted(CONFIGS))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default=None, help="run folder (default: runs/e7, runs/e7-smoke with --smoke)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the CI size (experiments.e7_screening.SMOKE)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from persona_lens.organism import OrganismJudge, World

    from experiments.common import parse_seeds

    cfg = SMOKE if a.smoke else CONFIGS[a.config]
    seed_list = parse_seeds(a.seeds)  # before the model loads
    out = Path(a.out or ("runs/e7-smoke" if a.smoke else "runs/e7"))  # a smoke run never reads a full run's logs
    world = World(0)
    judge = OrganismJudge(world)
    probe = pl.PersonaProbe(pl.load_model("persona-organism", device="cpu"))
    seeds = [run_seed(probe, world, judge, cfg, s, out, not a.quiet) for s in seed_list]
    from experiments.common import goal, provenance, spread

    results = {"experiment": "E7", "title": f"E7: per-sample projection difference against the world's labels ({a.config})",
               "persona_lens_version": pl.__version__, **provenance(a.config), "config": a.config,
               "smoke": a.smoke, "settings": cfg, "layers": LAYERS, "headline_layer": HEADLINE_LAYER,
               "seeds": seeds}
    results["goals"] = {t: {name: goal(name, spread([s["traits"][t]["figures"][f"{col}_L{HEADLINE_LAYER}"]["auroc"]
                                                     for s in seeds])["median"])
                            for name, col in (("sample_auroc", "dP"), ("sample_auroc_specific", "dP_specific"))}
                        for t in TRAITS}
    write_json(out / "results.json", results)
    html_report(results, out / "e7.html")
    for trait in TRAITS:
        line = [trait]
        for name in (f"dP_L{HEADLINE_LAYER}", f"dP_specific_L{HEADLINE_LAYER}", "judge", "keywords"):
            au = [s["traits"][trait]["figures"][name]["auroc"] for s in seeds]
            line.append(f"{name} AUROC " + " / ".join(f"{x:.3f}" for x in au))
        ov = [s["traits"][trait]["top_k_overlap"]["keywords"]["dP_finds_filter_misses"] for s in seeds]
        line.append(f"carriers in dP's top k, not keywords' " + " / ".join(map(str, ov)))
        if "finetune" in seeds[0]["traits"][trait]:
            line.append("finetuned on top/random/bottom: " + " | ".join(
                "/".join(f"{s['traits'][trait]['finetune'][k]['trait_score']:.1f}" for k in ("top", "random", "bottom"))
                for s in seeds))
        print("  ".join(line))
    print(f"wrote {out / 'results.json'} and {out / 'e7.html'}")


if __name__ == "__main__":
    main()
