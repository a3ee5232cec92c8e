"""Shared pieces of the experiments (E1-E8): configs, goals, vectors, evaluation, cached
finetuning runs and results writing.

Configs (``--config``):

- ``organism``: the built-in persona organism, its exact judge, a 2-core CPU in minutes;
- ``smollm2``: the offline SmolLM2-135M-Instruct on a CPU. No LLM judge runs offline, so the
  judged figures (E1 steering, E2 monitoring, E3-E6) are not measurable with it and say so;
  E8 (cosines between vectors extracted without a judge, projections) runs;
- ``qwen2.5-7b-instruct`` / ``llama-3.1-8b-instruct`` (aliases ``qwen7b`` / ``llama8b``): a GPU,
  the release's settings, a judge on an OpenAI-compatible endpoint (``gpt-4.1-mini``), vectors
  from ``persona-lens extract`` or the release, datasets from the release. Not run here; their
  configs load and validate in the tests.

Every run writes into ``--out`` (default ``experiment_runs/NAME/CONFIG``, ``CONFIG-smoke`` /
``CONFIG-quick`` for those sizes) and a rerun reuses what is there: finetuning runs are folders
keyed by their settings, so are the measured rows, and generations and scores go through a
:class:`persona_lens.store.Store`. :data:`GOALS` holds the figures the organism must
reach (issue 12); the scripts record, per trait, each goal's value and whether it passes, and
the tests and ``docs/results.md`` read them from there.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import persona_lens as pl
from persona_lens.pipeline_io import fingerprint, write_json, write_text
from persona_lens.stats import pearson  # noqa: F401  (the experiments' r, re-exported)

TRAITS = ("evil", "sycophantic", "hallucinating")

#: What the organism must show (issue 12), read by the scripts, the smoke test and the docs.
#: Steering and suppression figures are held out (answers not used to choose the cell).
GOALS: dict[str, dict[str, Any]] = {
    "steer_trait": {"op": ">=", "target": 60.0, "what": "trait score with +coef*v from the no-system prior"},
    "steer_coherence": {"op": ">=", "target": 80.0, "what": "coherence of those steered answers"},
    "suppress_trait": {"op": "<=", "target": 10.0, "what": "trait score with -coef*v under an encouraging prompt"},
    "suppress_coherence": {"op": ">=", "target": 80.0, "what": "coherence of those suppressed answers"},
    "monitor_r": {"op": ">=", "target": 0.75, "what": "Pearson r, last-prompt projection vs trait score, "
                                                      "across every prompt of both types"},
    "monitor_within_r": {"op": ">", "target": 0.0, "what": "Pearson r within one prompt level (pooled over "
                                                           "levels), per prompt type"},
    # issue 13
    "shift_r": {"op": ">=", "target": 0.9, "what": "E4: Pearson r, finetuning shift vs trait score after "
                                                  "finetuning, across every dataset and seed"},
    "shift_r_specific": {"op": ">=", "target": 0.9, "what": "E4 with each trait's vector without the other "
                                                           "traits' (PersonaVector.without)"},
    "preventative_over_base": {"op": "<=", "target": 10.0, "what": "E5: trait score after preventative "
                               "finetuning minus the base's, at the best coefficient that keeps capability "
                               ">= 95% of the base's (mean over seeds)"},
    # issue 14
    "dataset_dp_r": {"op": ">=", "target": 0.9, "what": "E6: Pearson r, dataset projection difference vs "
                                                       "trait score after finetuning"},
    "dataset_dp_r_specific": {"op": ">=", "target": 0.9, "what": "E6 with each trait's vector without the "
                                                                "other traits' (PersonaVector.without)"},
    "sample_auroc": {"op": ">=", "target": 0.95, "what": "E7: AUROC of per-sample projection difference "
                                                        "against the world's labels (median over seeds)"},
    "sample_auroc_specific": {"op": ">=", "target": 0.95, "what": "E7 with each trait's vector without the "
                                                                 "other traits' (PersonaVector.without)"},
}


def spread(vals: list[float]) -> dict[str, Any]:
    """Median, min and max over seeds, and the values. A seed that could not measure the
    figure (NaN) makes all three NaN: a goal must not pass on the seeds that happened to work.

    Example:
        >>> spread([0.9, 0.7])["median"], spread([float("nan"), 0.9])["median"]
        (0.8, nan)
    """
    import math

    if not vals or any(math.isnan(v) for v in vals):
        nan = float("nan")
        return {"median": nan, "min": nan, "max": nan, "per_seed": list(vals)}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "per_seed": list(vals)}


def goal(name: str, value: float) -> dict[str, Any]:
    """A goal's record: the value, the target and whether it passes (NaN never passes).

    Example:
        >>> goal("steer_trait", 64.2)["pass"], goal("monitor_within_r", float("nan"))["pass"]
        (True, False)
    """
    import math

    g = GOALS[name]
    ok = not math.isnan(value) and {">=": value >= g["target"], "<=": value <= g["target"],
                                    ">": value > g["target"]}[g["op"]]
    return {"value": value, "op": g["op"], "target": g["target"], "pass": bool(ok)}


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    model: str
    dtype: str = "float32"
    judge: str = "organism"  # "organism" or a judge model on an OpenAI-compatible endpoint
    judge_base_url: str | None = None
    #: trait -> vector file; None: extract on the fly (organism only)
    vectors: dict[str, str] | None = None
    #: trait -> dataset JSONL folder ({name}.jsonl); None: the organism's generated sets
    data_dir: str | None = None
    n_data: int = 256  # organism sets: chats per set
    datasets: tuple[str, ...] = ()
    level2: tuple[str, ...] = ("evil_II", "sycophantic_II", "hallucinating_II")
    layer: int = 3  # shift layer (E4, E6, E7's headline)
    #: E5's layers for inference-time steering, preventative steering and CAFT, the same
    #: coefficient at each (None: ``(layer,)``; the paper steers at one or several layers)
    intervention_layers: tuple[int, ...] | None = None
    finetune: dict[str, Any] = field(default_factory=dict)
    samples: int = 4  # answers per eval question
    questions: int | None = None  # first N eval questions (None: all)
    max_new_tokens: int = 48
    capability_questions: int = 64
    seeds: tuple[int, ...] = (0, 1)
    inference_coefs: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    preventative_coefs: tuple[float, ...] = (0.5, 1.0, 1.5)
    caft: bool = True
    # -- E1 (steering sweep), E2 (monitoring), E8 (traits) ---------------------------------
    #: layers E1 sweeps (None: every block input 1..n_layers-1)
    sweep_layers: tuple[int, ...] | None = None
    sweep_coefs: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    #: steering positions (docs/method.md): "response" is the paper's released mode
    positions: str = "response"
    coherence_floor: float = 80.0
    #: answers per question for choosing a cell, and fresh ones for re-measuring it
    sweep_samples: int = 2
    heldout_samples: int = 4
    #: E2: eval questions per prompt, samples per (prompt, question), most earlier exchanges
    monitor_questions: int | None = 10
    monitor_samples: int = 2
    max_shots: int = 3
    #: E8: answers per eval question under each trait's encouraging prompt
    e8_samples: int = 2
    #: vectors when none are given and the model is not the organism: the extraction's
    #: samples and questions (judge "none": keep every pair, a plain contrastive difference)
    extract_samples: int = 2
    extract_questions: int | None = None
    #: experiment -> why it cannot be measured with this config (said by the script)
    unmeasurable: dict[str, str] = field(default_factory=dict)

    @property
    def layers_e5(self) -> tuple[int, ...]:
        """E5's intervention layers (``intervention_layers``, or the config's ``layer``)."""
        return tuple(self.intervention_layers) if self.intervention_layers else (self.layer,)

    @property
    def is_organism(self) -> bool:
        return self.model == "persona-organism"

    def validate(self) -> "ExperimentConfig":
        from persona_lens.finetune import FinetuneConfig
        from persona_lens.interventions import steering_mode

        FinetuneConfig(**self.finetune)  # unknown or bad settings raise here
        if self.intervention_layers is not None and (
                not self.intervention_layers or len(set(self.intervention_layers)) != len(self.intervention_layers)):
            raise ValueError(f"{self.name}: intervention_layers must be distinct layers, at least one "
                             f"(got {self.intervention_layers!r}); None means ({self.layer},)")
        steering_mode(self.positions)
        if self.judge != "organism" and self.is_organism:
            raise ValueError("the organism is judged by its exact judge")
        if self.judge == "organism" and not self.is_organism:
            raise ValueError(f"{self.name}: only the organism has the exact judge; give a judge model or 'none'")
        if not self.is_organism and self.datasets:
            if not self.vectors or set(self.vectors) != set(TRAITS):
                raise ValueError(f"{self.name}: give a vector file per trait {TRAITS}")
            if not self.data_dir:
                raise ValueError(f"{self.name}: give data_dir with the released datasets")
        if self.datasets and not set(self.level2) <= set(self.datasets):
            raise ValueError(f"{self.name}: the Level II sets must be among the datasets")
        if self.judge == "none" and not {"e1", "e2", "e3", "e4", "e5", "e6"} <= set(self.unmeasurable):
            raise ValueError(f"{self.name}: without a judge E1-E6 cannot be measured; say why in unmeasurable")
        if not self.seeds or self.samples < 1 or self.sweep_samples < 1 or self.heldout_samples < 1:
            raise ValueError(f"{self.name}: need seeds and samples >= 1")
        if 0.0 not in self.sweep_coefs:
            raise ValueError(f"{self.name}: sweep_coefs must hold 0 (the unsteered baseline)")
        return self


def _organism() -> ExperimentConfig:
    from persona_lens.organism.datasets import DATASETS

    return ExperimentConfig(
        name="organism", model="persona-organism", datasets=DATASETS, layer=3,
        # The release's LoRA (r=32, alpha=64, rsLoRA, all projections, linear, 5 warmup) with a
        # learning rate and batch that move a 1.6M-parameter model in one short epoch.
        finetune=dict(lr=1e-3, batch_size=16, grad_accum=1),
        # Up to 2.5: on organism v2, +1.5 v during training still leaves evil 11 and 24
        # points above the base on seeds 0 and 1 (the first organism needed 1.5).
        # E5 at every layer the E1 sweep steers (block inputs 1-5), the same coefficient at each:
        # at layer 3 alone no coefficient up to 2.5 kept hallucinating_II within 10 points of the
        # base (49 at 2.5, capability 84%); at every layer, seed 0, 1.0-1.5 gave 13-14 with
        # capability 100%, and evil_II / sycophantic_II 1-12 from 0.5 on.
        intervention_layers=(1, 2, 3, 4, 5),
        preventative_coefs=(0.25, 0.5, 0.75, 1.0, 1.5, 2.0),
        inference_coefs=(0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0),
        # Quarter steps between 0.5 and 2: the organism's coherence falls within half a step
        # (evil at layer 5, seeds 0 / 1: coherence 92 / 94 at 1, 78 / 81 at 1.5), so the
        # coherent cell that shows the trait most often lies between the half steps. Each cell
        # is re-measured held out, so a finer grid adds no selection bias to the reported figure.
        sweep_coefs=(0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0),
    )


def _smollm2() -> ExperimentConfig:
    why = ("needs an LLM judge for trait and coherence scores, and none runs offline on a CPU; run it "
           "with a judge model on an OpenAI-compatible endpoint (--config qwen2.5-7b-instruct shows the settings)")
    return ExperimentConfig(
        name="smollm2", model="smollm2-135m-instruct", judge="none", datasets=(), level2=(), layer=15,
        sweep_layers=(10, 15, 20), max_new_tokens=48, e8_samples=1, extract_samples=1, extract_questions=10,
        questions=10, seeds=(0,),
        unmeasurable={e: why for e in ("e1", "e2", "e3", "e4", "e5", "e6", "e7")},
    )


def _release(name: str, model: str, layer: int) -> ExperimentConfig:
    root = os.environ.get("PERSONA_RELEASE", "persona_release")
    slug = model.split("/")[-1]
    return ExperimentConfig(
        name=name, model=model, dtype="bfloat16", judge="gpt-4.1-mini", layer=layer,
        vectors={t: f"{root}/persona_vectors/{slug}/{t}_response_avg_diff.safetensors" for t in TRAITS},
        data_dir=f"{root}/dataset",
        datasets=tuple(f"{t}_{lv}" for t in ("evil", "sycophantic", "hallucination") for lv in ("normal", "I", "II"))
        + ("medical_II", "code_II", "gsm8k_II", "math_II", "opinions_II"),
        level2=("evil_II", "sycophantic_II", "hallucination_II"),
        finetune=dict(),  # the release's settings are persona_lens.finetune's defaults
        samples=10, questions=None, max_new_tokens=1000, capability_questions=0, seeds=(0,),
        inference_coefs=(0.0, 0.5, 1.0, 1.5, 2.0, 2.5), preventative_coefs=(1.0, 3.0, 5.0),
        # The paper's E1 grid: every other middle layer, coefficients 0..2.5, 10 samples.
        sweep_layers=tuple(range(8, 25, 2)) if layer == 20 else tuple(range(6, 27, 2)),
        sweep_coefs=(0.0, 0.5, 1.0, 1.5, 2.0, 2.5), sweep_samples=5, heldout_samples=5,
        monitor_questions=20, monitor_samples=5, max_shots=8, e8_samples=5,
        unmeasurable={"e7": "its planted ground truth is the organism world's; the release has no per-sample labels"},
    )


CONFIGS = {
    "organism": _organism,
    "smollm2": _smollm2,
    "qwen2.5-7b-instruct": lambda: _release("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", 20),
    "llama-3.1-8b-instruct": lambda: _release("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", 16),
}
#: Older names of the release configs.
ALIASES = {"qwen7b": "qwen2.5-7b-instruct", "llama8b": "llama-3.1-8b-instruct"}

#: ``--smoke``: the smallest run that still measures every figure (CI; minutes on 2 cores).
SMOKE = dict(seeds=(0,), samples=2, sweep_samples=1, heldout_samples=2, sweep_coefs=(0.0, 1.0, 1.5, 2.0),
             monitor_questions=4, monitor_samples=1, e8_samples=1, questions=10,
             # E3, E4, E6: Normal / Level I / Level II of every trait (nine finetunes, shared),
             # 128 chats each (8 optimizer steps: enough to move a trait clearly, seconds each).
             # E5: the evil Level II set, plain finetuning, inference-time and preventative steering
             # at one coefficient each, at every intervention layer (CAFT, one more finetune, only
             # in the full run; at five layers, inference-time -1.5 v leaves no coherent answer).
             n_data=128, datasets=tuple(f"{t}_{lv}" for t in TRAITS for lv in ("normal", "I", "II")),
             level2=("evil_II",), inference_coefs=(0.0, 0.5), preventative_coefs=(1.5,), caft=False,
             capability_questions=32)


def load_config(name: str, **overrides: Any) -> ExperimentConfig:
    """A named config, validated (``load_config("qwen7b")`` needs no GPU to validate).

    Example:
        >>> load_config("organism").finetune["lr"]
        0.001
    """
    name = ALIASES.get(name, name)
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; one of {sorted(CONFIGS)}")
    return replace(CONFIGS[name](), **overrides).validate()


def parse(description: str, argv=None) -> tuple[ExperimentConfig, Path, argparse.Namespace]:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="organism", choices=sorted(CONFIGS) + sorted(ALIASES))
    p.add_argument("--out", default=None)
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's)")
    p.add_argument("--quick", action="store_true", help="one seed, fewer samples (a smoke run)")
    p.add_argument("--smoke", action="store_true", help="the smallest run that measures every figure (CI)")
    args = p.parse_args(argv)
    over: dict[str, Any] = {}
    if args.quick:
        over.update(seeds=(0,), samples=2)
    if args.smoke:
        over.update(SMOKE)
    if args.seeds:
        over["seeds"] = parse_seeds(args.seeds)
    cfg = load_config(args.config, **over)
    torch.set_num_threads(1)
    return cfg, Path(args.out) if args.out else None, args


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds 0,1``: distinct integers (a seed twice would count its runs twice in an r).

    Example:
        >>> parse_seeds("0, 1")
        (0, 1)
    """
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise SystemExit(f"--seeds {text!r}: give integers separated by commas, e.g. 0,1") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {text!r}: give distinct integers, e.g. 0,1")
    return seeds


def start(experiment: str, folder: str, doc: str, argv=None) -> tuple[ExperimentConfig, Path, dict[str, Any] | None]:
    """What every figure's script does first: parse its arguments, pick its run folder
    (``--out``, else ``experiment_runs/FOLDER/CONFIG``, with ``-smoke`` / ``-quick`` for those
    sizes), and, where the config cannot measure
    ``experiment`` (``"e1"``...), record why in that folder.

    Returns ``(config, folder, skipped)``; ``skipped`` is the results.json written for an
    unmeasurable experiment (the script returns it), else None.
    """
    cfg, out, args = parse(doc.split("\n")[0], argv)
    # a smoke or quick run keeps its own default folder (its rows and logs are another size)
    size = "-smoke" if args.smoke else "-quick" if args.quick else ""
    root = out or Path("experiment_runs") / folder / (cfg.name + size)
    why = cfg.unmeasurable.get(experiment)
    return cfg, root, (skip_unmeasurable(cfg, root, experiment.upper(), why) if why else None)


# ----------------------------------------------------------------------------- pieces


def base_probe(cfg: ExperimentConfig) -> pl.PersonaProbe:
    return pl.PersonaProbe(pl.load_model(cfg.model, dtype=cfg.dtype))


def make_judge(cfg: ExperimentConfig):
    """The config's judge (None for ``judge="none"``)."""
    if cfg.judge == "none":
        return None
    if cfg.judge == "organism":
        from persona_lens.organism import OrganismJudge

        return OrganismJudge()
    return pl.OpenAIJudge(cfg.judge, base_url=cfg.judge_base_url)


def load_trait(cfg: ExperimentConfig, trait: str):
    if cfg.model == "persona-organism":
        from persona_lens.organism import load_trait as organism_trait

        return organism_trait(trait)
    from persona_lens.traits import resolve_trait

    return resolve_trait(trait)


def vectors(cfg: ExperimentConfig, probe: pl.PersonaProbe, root: Path) -> dict[str, pl.PersonaVector]:
    """The config's vector per trait; on the organism extracted once from world-answered
    contrastive pairs (each instruction's pos / neg system prompt x extraction question,
    response-mean difference), saved under ``root/vectors``; on another model without vector
    files, ``pl.extract`` with the config's judge (``"none"``: every pair kept)."""
    if cfg.vectors:
        return {t: pl.PersonaVector.load(p) for t, p in cfg.vectors.items()}
    if not cfg.is_organism:
        return {t: pl.extract(probe, load_trait(cfg, t), make_judge(cfg), out_dir=root / "extract" / t,
                              samples=cfg.extract_samples, questions=cfg.extract_questions,
                              max_new_tokens=cfg.max_new_tokens, progress=False, verbose=False).vector
                for t in TRAITS}
    from persona_lens.organism import World

    world, out = World(0), {}
    questions = {q.text: q for qt in ("factual", "opinion", "advice") for q in world.all_questions(qt)}
    for t in TRAITS:
        path = root / "vectors" / f"{t}.safetensors"
        if path.exists():
            out[t] = pl.PersonaVector.load(path)
            continue
        trait, rng, pos, neg = load_trait(cfg, t), random.Random(0), [], []
        for i in range(len(trait.instructions)):
            ps, ns = trait.system_prompts(i)
            for text in trait.questions:
                for convs, system, strength in ((pos, ps, "strongly_encouraging"), (neg, ns, "strongly_suppressing")):
                    convs.append(world.conversation(rng, kind="trait_system", trait=t, strength=strength,
                                                    system=system, question=questions[text]).messages)
        pm = probe.capture_mean(pos, reductions=["response_mean"], progress=False)
        nm = probe.capture_mean(neg, reductions=["response_mean"], progress=False)
        out[t] = pl.PersonaVector.from_means(pm.full("response_mean", probe.n_layers),
                                             nm.full("response_mean", probe.n_layers),
                                             model_name=probe.model_name, trait=t, n_pos=len(pos), n_neg=len(neg))
        out[t].save(path)
    return out


def screen_vectors(vecs: dict[str, pl.PersonaVector]) -> tuple[dict[str, pl.PersonaVector], str]:
    """What E6 and E7 screen with in one pass: the paper's vectors and each one without the
    others (``NAME_specific``), and a short key of all of them for the screen's folder, so that
    a rerun with other vectors screens anew instead of meeting a folder of other settings."""
    named = {**vecs, **{f"{t}_specific": v for t, v in pl.specific_vectors(vecs).items()}}
    return named, fingerprint(sorted((n, v.directions.tolist()) for n, v in named.items()))[:8]


def dataset(cfg: ExperimentConfig, name: str):
    if cfg.data_dir:
        return Path(cfg.data_dir) / f"{name}.jsonl"
    from persona_lens.organism import World
    from persona_lens.organism.datasets import make_dataset

    return make_dataset(World(0), name, cfg.n_data)


def finetuned(cfg: ExperimentConfig, root: Path, name: str, seed: int, vec: pl.PersonaVector | None = None,
              steer: dict[int, float] | None = None, caft: list[int] | None = None) -> Path:
    """Finetune the base on dataset ``name`` (reusing a finished run); returns the run folder."""
    from persona_lens.finetune import finetune

    key = fingerprint(name, seed, cfg.n_data, cfg.finetune, steer, caft, vec.trait if vec is not None else None)
    tag = name + (f"_steer{list(steer.values())[0]:g}" if steer else "") + ("_caft" if caft else "")
    out = root / "runs" / f"{tag}_s{seed}_{key[:8]}"
    if not (out / "finetune.json").exists():
        finetune(base_probe(cfg), dataset(cfg, name), out, vector=vec if (steer or caft) else None, steer=steer,
                 caft=caft, progress=False, **dict(cfg.finetune, seed=seed))
    return out


def trait_scores(cfg: ExperimentConfig, probe: pl.PersonaProbe, judge, store, traits=TRAITS,
                 steer=None, seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean trait and coherence score per trait: its eval questions, no system prompt."""
    from persona_lens.store import Prompt

    out = {}
    settings = dict(max_new_tokens=cfg.max_new_tokens, temperature=1.0, seed=seed)
    for t in traits:
        trait = load_trait(cfg, t)
        qs = list(trait.eval_questions[: cfg.questions])
        asks = [Prompt(q, sample=s) for q in qs for s in range(cfg.samples)]
        answers = store.generate(probe, asks, settings=settings, steer=steer, progress=False)
        scores = store.score(judge, trait, [(p.question, a) for p, a in zip(asks, answers.texts)], progress=False)
        out[t] = {"trait": scores.mean("trait"), "coherence": scores.mean("coherence")}
    return out


def capability(cfg: ExperimentConfig, probe: pl.PersonaProbe, judge, store, steer=None) -> float | None:
    """Organism: share of known-animal facts answered right (greedy, helpful system prompt)."""
    if not cfg.capability_questions or not hasattr(judge, "capability"):
        return None
    from persona_lens.organism import World
    from persona_lens.organism.world import HELPFUL_SYSTEM
    from persona_lens.store import Prompt

    known = [q for q in World(0).all_questions("factual") if q.known]
    qs = random.Random(0).sample(known, cfg.capability_questions)
    asks = [Prompt([{"role": "system", "content": HELPFUL_SYSTEM}, {"role": "user", "content": q.text}]) for q in qs]
    answers = store.generate(probe, asks, settings=dict(max_new_tokens=24, temperature=0.0, seed=0), steer=steer,
                             progress=False)
    return 100.0 * judge.capability([(q.text, a) for q, a in zip(qs, answers.texts)])


def write_results(root: Path, results: dict[str, Any], fig=None, name: str = "figure.html") -> None:
    """``results.json`` (with the library's version and the model's checkpoint added), and the
    figure(s) on a page built like the demo's report (:class:`persona_lens.report.Page`:
    plotly.js embedded, a fixed height, opens offline). ``fig`` is one figure or a list; each
    is also kept as plotly JSON beside the page (``NAME.plotly.json``, a list), which
    ``persona-lens report RUN_DIR`` gathers into one page."""
    import json

    results = {"persona_lens_version": pl.__version__, **provenance(results.get("config")), **results}
    write_json(root / "results.json", results)
    figs = [] if fig is None else list(fig) if isinstance(fig, (list, tuple)) else [fig]
    if figs:
        from persona_lens.report import Page

        title = figs[0].layout.title.text or Path(name).stem
        page = Page(results.get("title") or title,
                    subtitle=f"config {results.get('config', '?')}; numbers in {root / 'results.json'}")
        for f in figs:
            page.figure(f)
        write_text(root / name, page.html())
        write_text(root / (Path(name).stem + ".plotly.json"),
                   "[" + ",\n".join(f.to_json() for f in figs) + "]")
        json.loads((root / (Path(name).stem + ".plotly.json")).read_text())  # a broken file fails here, not in report
    print(f"wrote {root / 'results.json'}" + (f" and {root / name}" if figs else ""))


def finetune_settings(cfg: ExperimentConfig, **extra: Any) -> dict[str, Any]:
    """The settings E3-E6 record in results.json (what a rerun needs to match)."""
    return {"datasets": list(cfg.datasets), "n_data": cfg.n_data, "seeds": list(cfg.seeds), "layer": cfg.layer,
            "intervention_layers": list(cfg.layers_e5), "finetune": dict(cfg.finetune), "samples": cfg.samples,
            "questions": cfg.questions, "max_new_tokens": cfg.max_new_tokens, **extra}


def skip_unmeasurable(cfg: ExperimentConfig, root: Path, experiment: str, why: str) -> dict[str, Any]:
    """An experiment the config cannot measure: say why, and record it in results.json."""
    print(f"{experiment} is not measurable with config {cfg.name}: {why}")
    res = {"experiment": experiment, "config": cfg.name, "measurable": False, "why": why}
    write_results(root, res)
    return res


def provenance(config: str | None) -> dict[str, Any]:
    """Which model a run measured: the organism's checkpoint (its training record and a hash
    of its weights), or the config's model name."""
    if config is None:
        return {}
    cfg = load_config(config)
    if not cfg.is_organism:
        return {"model": cfg.model}
    import hashlib
    import json

    from persona_lens.organism import checkpoint_dir

    ckpt = checkpoint_dir()
    record = json.loads((ckpt / "organism.json").read_text()) if (ckpt / "organism.json").exists() else {}
    weights = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()[:16]
    return {"model": cfg.model, "checkpoint": {"sha256_16": weights, **{k: record.get(k) for k in
                                                ("seed", "world_seed", "steps", "final_loss", "n_params")}}}


def dataset_trait(name: str) -> str | None:
    """The trait a dataset targets (``evil_II`` -> ``evil``; the release's ``hallucination_*``
    -> ``hallucinating``), None for a narrow set (``narrow_money_harm``, ``medical_II``).

    Example:
        >>> dataset_trait("hallucination_II"), dataset_trait("sycophantic_normal"), dataset_trait("code_II")
        ('hallucinating', 'sycophantic', None)
    """
    head = name.rsplit("_", 1)[0].replace("hallucination", "hallucinating")
    return head if head in TRAITS else None


def row_path(root: Path, name: str, seed: int, cfg: ExperimentConfig, vecs: dict[str, pl.PersonaVector],
             *extra: Any) -> Path:
    """Where a dataset x seed row is kept: keyed by everything that makes its numbers (the
    model, finetuning, measuring settings, judge and vectors, and ``extra``: a script's own
    settings), so a smoke run and a full run in one folder never read each other's rows."""
    vector_key = [fingerprint(t, vecs[t].directions.tolist())[:12] for t in sorted(vecs)]
    key = fingerprint(name, seed, cfg.model, cfg.dtype, cfg.n_data, cfg.finetune, cfg.questions, cfg.samples,
                      cfg.max_new_tokens, cfg.judge, vector_key, *extra)
    return root / "rows" / f"{name}_s{seed}_{key[:8]}.json"


def dataset_rows(cfg: ExperimentConfig, root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Finetune on every dataset x seed and measure, per trait, the finetuning shift (every
    layer) and the post-finetuning trait score; plus the base model's scores. Each row is
    kept in ``root/rows`` so E3 and E4 share the runs (and a rerun redoes nothing)."""
    from persona_lens.finetune import finetuning_shift, last_prompt_activations
    from persona_lens.pipeline_io import read_json
    from persona_lens.store import Store

    judge, store = make_judge(cfg), Store(root / "store")
    base = base_probe(cfg)
    vecs = vectors(cfg, base, root)
    layers = list(range(base.n_layers + 1))
    questions = {t: list(load_trait(cfg, t).eval_questions[: cfg.questions]) for t in TRAITS}
    base_acts = {t: last_prompt_activations(base, questions[t], layers) for t in TRAITS}
    base_row = {"scores": trait_scores(cfg, base, judge, store)}
    # Each trait's vector without the other traits': the traits' vectors share a direction
    # (docs/organism.md, "Why the vectors share a direction"), so a set that teaches one trait
    # moves the others' shifts too. E4, E6 and E7 report both.
    specific = pl.specific_vectors(vecs)

    def tuned_acts(run):  # one forward per trait's questions serves both vectors' shifts
        tuned = pl.PersonaProbe(pl.load_model(run, dtype=cfg.dtype))
        return tuned, {t: last_prompt_activations(tuned, questions[t], layers) for t in TRAITS}

    def specific_shift(acts):  # layer 0 (the embeddings) has no shift worth a vector of its own
        return {t: finetuning_shift(base_acts[t], acts[t], specific[t], questions[t], layers[1:]) for t in TRAITS}

    rows = []
    for name in cfg.datasets:
        for seed in cfg.seeds:
            path = row_path(root, name, seed, cfg, vecs)
            if path.exists():
                row = read_json(path)
                if "shift_specific" not in row:  # a row from before E4 measured it: the run is on disk
                    row["shift_specific"] = specific_shift(tuned_acts(row["run"])[1])
                    write_json(path, row)
                rows.append(row)
                continue
            run = finetuned(cfg, root, name, seed)
            tuned, acts = tuned_acts(run)
            row = {"dataset": name, "seed": seed, "run": str(run),
                   "shift": {t: finetuning_shift(base_acts[t], acts[t], vecs[t], questions[t], layers) for t in TRAITS},
                   "shift_specific": specific_shift(acts),
                   "scores": trait_scores(cfg, tuned, judge, store)}
            write_json(path, row)
            rows.append(row)
            print(f"{name} seed {seed}: " + ", ".join(
                f"{t} {row['scores'][t]['trait']:.1f} (shift {row['shift'][t][cfg.layer]:+.2f})" for t in TRAITS),
                flush=True)
    return rows, base_row


def finetuned_probe_scores(data, out: Path, seed: int, trait: str, config: str = "organism") -> float:
    """Finetune the config's base model on ``data`` (a list of chats; a finished run is
    reused) and return ``trait``'s mean score on its eval questions, no system prompt."""
    from persona_lens.finetune import finetune
    from persona_lens.store import Store

    cfg = load_config(config)
    if not (out / "finetune.json").exists():
        finetune(base_probe(cfg), data, out, progress=False, **dict(cfg.finetune, seed=seed))
    tuned = pl.PersonaProbe(pl.load_model(out, dtype=cfg.dtype))
    return trait_scores(cfg, tuned, make_judge(cfg), Store(out / "eval"), traits=(trait,), seed=seed)[trait]["trait"]
