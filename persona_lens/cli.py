"""The ``persona-lens`` command.

::

    persona-lens extract --model M --trait NAME|PATH [--judge MODEL|none|organism] [--out DIR] ...
    persona-lens sweep --model M --trait T --vector PATH --layers 10-20:2 --coefs 0,1,2 [--out DIR]
    persona-lens generate-trait NAME "DESCRIPTION" [--model gpt-4.1-mini] [--out DIR]
    persona-lens organism train [--out DIR] [--seed N] [--minutes M]
    persona-lens screen DATA --vector V [--vector V2] --layer L [--model M] [--shard i/N] [--drop-top K]
    persona-lens finetune --model M --data FILE.jsonl|organism:SET --out DIR [--vector V --steer 20:5] [--caft 20]
    persona-lens shift --model BASE --tuned RUN_DIR --vector V [--vector V2 ...] [--layers 10-20]
    persona-lens make-datasets [--out DIR] [--n 400] [--seed 0]

Errors the user can fix (unknown trait, malformed trait file, a judge that answers text or
times out, no pair surviving the filter) print one line and exit with status 1; whatever was
finished before the error stays in the output directory and a rerun resumes from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from persona_lens.pipeline_io import slug

PROG = "persona-lens"
DEFAULT_JUDGE = "gpt-4.1-mini"


class UsageError(Exception):
    """A command-line argument is wrong."""


def _known_errors() -> tuple[type[BaseException], ...]:
    from persona_lens.extract import ExtractionError
    from persona_lens.judge import JudgeError
    from persona_lens.traits import TraitError
    from persona_lens.vectors import VectorMismatchError

    # ValueError and OSError: bad arguments, unreadable files, a model name that cannot be
    # loaded. --debug shows the traceback.
    known: tuple[type[BaseException], ...] = (
        UsageError, TraitError, JudgeError, ExtractionError, VectorMismatchError, ValueError, OSError)
    try:
        import openai

        known += (openai.OpenAIError,)
    except ImportError:  # pragma: no cover - openai is a dependency
        pass
    return known


# ----------------------------------------------------------------------------- parsing


def parse_int_list(text: str) -> list[int]:
    """``"10,12,14"``, ``"8-20"`` (inclusive) or ``"8-20:4"`` (step) -> list of ints.

    Example:
        >>> parse_int_list("4,8-12:2")
        [4, 8, 10, 12]
    """
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            step = 1
            if ":" in part:
                part, step_s = part.split(":", 1)
                step = int(step_s)
            if "-" in part:
                a, b = part.split("-", 1)
                if step < 1:
                    raise ValueError
                out.extend(range(int(a), int(b) + 1, step))
            else:
                out.append(int(part))
    except ValueError:
        raise UsageError(f"cannot read {text!r} as layers: use e.g. 12,16,20 or 8-20 or 8-20:2") from None
    if not out:
        raise UsageError(f"no layers in {text!r}")
    return sorted(set(out))


def parse_float_list(text: str) -> list[float]:
    """``"0,0.5,1,2"`` -> list of floats."""
    try:
        out = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"cannot read {text!r} as coefficients: use e.g. 0,0.5,1,1.5,2") from None
    if not out:
        raise UsageError(f"no coefficients in {text!r}")
    return out


def _is_organism(model: str) -> bool:
    from persona_lens.models import ORGANISM

    return model == ORGANISM


def load_trait_arg(name: str, model: str):
    """A trait for ``--trait``: organism traits first when the model is the organism."""
    from persona_lens.traits import resolve_trait

    if _is_organism(model) and "/" not in name and not name.endswith(".json"):
        try:
            from persona_lens import organism
        except ImportError:
            organism = None
        if organism is not None and hasattr(organism, "load_trait"):
            try:
                return organism.load_trait(name)
            except ValueError as e:
                from persona_lens.traits import TraitError

                if isinstance(e, TraitError):
                    raise
                raise UsageError(str(e)) from None
    return resolve_trait(name)


def make_judge(spec: str | None, model: str, base_url: str | None = None, api_key: str | None = None,
               timeout: float = 60.0, cache_dir: str | None = None, retries: int = 6):
    """``--judge``: a model name for an OpenAI-compatible endpoint, ``none`` or ``organism``.

    Default: the organism's exact judge for the organism model, else gpt-4.1-mini.
    """
    if spec is None:
        spec = "organism" if _is_organism(model) and _organism_judge_available() else DEFAULT_JUDGE
    if spec.lower() == "none":
        return None
    if spec.lower() == "organism":
        if not _organism_judge_available():
            raise UsageError("--judge organism needs persona_lens.organism (not available)")
        from persona_lens.organism import OrganismJudge

        return OrganismJudge()
    from persona_lens.judge import OpenAIJudge

    return OpenAIJudge(spec, base_url=base_url, api_key=api_key, timeout=timeout, max_retries=retries,
                       cache_dir=cache_dir if cache_dir else None)


def _organism_judge_available() -> bool:
    try:
        from persona_lens.organism import OrganismJudge  # noqa: F401
    except ImportError:
        return False
    return True


def _load_probe(args: argparse.Namespace):
    from persona_lens.models import load_model
    from persona_lens.probe import PersonaProbe

    print(f"loading {args.model} ...", file=sys.stderr)
    return PersonaProbe(load_model(args.model, dtype=args.dtype, device=args.device))


def _default_out(trait: str, model: str, *sub: str) -> Path:
    return Path("persona_runs").joinpath(slug(trait), slug(model), *sub)


# ----------------------------------------------------------------------------- commands


def cmd_extract(args: argparse.Namespace) -> int:
    from persona_lens.extract import Thresholds, extract

    trait = load_trait_arg(args.trait, args.model)
    judge = make_judge(args.judge, args.model, args.base_url, args.api_key, args.judge_timeout, args.judge_cache,
                       args.judge_retries)
    probe = _load_probe(args)
    out = Path(args.out) if args.out else _default_out(trait.name, args.model)
    result = extract(
        probe, trait, judge, out_dir=out, samples=args.samples, questions=args.questions,
        instructions=args.instructions, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, batch_size=args.batch_size,
        thresholds=Thresholds(args.pos_threshold, args.neg_threshold, args.coherence_threshold),
        seed=args.seed, progress=not args.quiet, verbose=False,
    )
    print(result.summary())
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from persona_lens.sweep import sweep
    from persona_lens.vectors import PersonaVector

    trait = load_trait_arg(args.trait, args.model)
    vector = PersonaVector.load(args.vector)
    if args.judge is not None and args.judge.lower() == "none":
        raise UsageError("a sweep needs a judge: --judge MODEL or --judge organism")
    judge = make_judge(args.judge, args.model, args.base_url, args.api_key, args.judge_timeout, args.judge_cache,
                       args.judge_retries)
    layers = parse_int_list(args.layers)
    coefs = parse_float_list(args.coefs)
    probe = _load_probe(args)
    out = Path(args.out) if args.out else _default_out(trait.name, args.model, "sweep")
    result = sweep(
        probe, vector, trait, layers=layers, coefs=coefs, judge=judge, questions=args.questions,
        samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        coherence_floor=args.coherence_floor, positions=args.positions, batch_size=args.batch_size,
        seed=args.seed, out_dir=out, progress=not args.quiet,
    )
    print(result.table())
    s = result.stats
    print(f"responses: {s['generated']} generated, {s['reused']} reused; judge: {s['judged']} new "
          f"scores, {s['judge_reused']} reused")
    print(f"best layer: {result.best_layer}")
    print(f"wrote {out / 'sweep.csv'} and {out / 'sweep.html'}")
    return 0


def cmd_generate_trait(args: argparse.Namespace) -> int:
    from persona_lens.traits import generate_trait

    client = None
    if args.base_url or args.api_key:
        import openai

        client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key or "EMPTY")
    trait = generate_trait(args.name, args.description, client=client, model=args.model)
    out = Path(args.out) if args.out else Path("traits")
    extract_path, eval_path = trait.to_json(out)
    print(f"trait {trait.name!r}: {len(trait.instructions)} instruction pairs, "
          f"{len(trait.questions)} extraction + {len(trait.eval_questions)} evaluation questions")
    print(f"wrote {extract_path} and {eval_path}")
    print(f"use it with: {PROG} extract --model MODEL --trait {out / trait.name}")
    return 0


def cmd_organism_train(args: argparse.Namespace) -> int:
    try:
        from persona_lens.organism.train import train
    except ImportError as e:
        raise UsageError(f"the organism trainer is not available ({e})") from None
    kwargs: dict[str, Any] = {"seed": args.seed}
    if args.minutes is not None:
        kwargs["minutes"] = args.minutes
    path = train(args.out, **kwargs)
    print(f"organism saved to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from persona_lens.demo import run_demo

    run_demo(
        args.out, trait=args.trait, samples=args.samples, max_new_tokens=args.max_new_tokens,
        seed=args.seed, progress=not args.quiet,
    )
    return 0


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)``: shard 1 of 4 (shards count from 0).

    Example:
        >>> parse_shard("1/4")
        (1, 4)
    """
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"cannot read {text!r} as a shard: use i/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise UsageError(f"shard {text!r}: need 0 <= i < N")
    return i, n


def cmd_screen(args: argparse.Namespace) -> int:
    from persona_lens.screen import screen
    from persona_lens.vectors import PersonaVector

    vectors = [PersonaVector.load(v) for v in args.vector]
    if args.model is None:
        args.model = vectors[0].model_name
        if not args.model:
            raise UsageError("the vector records no model: give --model")
    layers = parse_int_list(args.layer)
    if args.drop_top is not None and args.threshold is not None:
        raise UsageError("give --drop-top or --threshold, not both")
    probe = _load_probe(args)
    out = Path(args.out) if args.out else Path("persona_runs", "screen", slug(Path(args.data).stem), slug(args.model))
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
    result = screen(
        probe, args.data, vectors, layers, out_dir=out, shard=parse_shard(args.shard), settings=settings,
        chunk_size=args.chunk_size, batch_size=args.batch_size, table_format=args.format,
        drop_top=args.drop_top, threshold=args.threshold, by=args.by, progress=not args.quiet,
    )
    print(f"base responses: {result.generated} generated, {result.reused} reused")
    if not result.complete:
        s = result.summary
        print(f"shard {args.shard} done ({s['chunks_done']} of {s['chunks']} chunks in {out}); the last shard to "
              "finish writes the table")
        return 0
    s = result.summary
    print(f"{s['samples']} samples: " + ", ".join(f"{k} {v}" for k, v in sorted(s["status"].items())))
    print(f"{'column':<24} {'mean dP':>9} {'sem':>8} {'dP > 0':>7}")
    for col, f in s["figures"].items():
        print(f"{col:<24} {f['mean']:>9.3f} {f['sem']:>8.3f} {f['share_positive']:>7.1%}")
    print(f"wrote {result.table} and {out / 'summary.json'}")
    if result.filtered is not None:
        print(f"wrote {result.filtered} without {len(result.dropped)} samples ({s['filter']['by']})")
    return 0


def parse_layer_coefs(text: str, coef: float) -> dict[int, float]:
    """``"20:5"`` / ``"16:2,20:3"`` (layer:coef) or plain layers sharing ``coef``.

    Example:
        >>> parse_layer_coefs("16:2,20:3", 1.0), parse_layer_coefs("4-6", 0.5)
        ({16: 2.0, 20: 3.0}, {4: 0.5, 5: 0.5, 6: 0.5})
    """
    if ":" in text and "-" not in text:
        try:
            return {int(l): float(c) for l, c in (part.split(":") for part in text.split(",") if part.strip())}
        except ValueError:
            raise UsageError(f"cannot read {text!r} as layer:coef pairs, e.g. 20:5 or 16:2,20:3") from None
    return {l: coef for l in parse_int_list(text)}


def _training_data(spec: str):
    """``--data``: a JSONL file, or ``organism:SET`` (generated from the organism's world)."""
    if spec.startswith("organism:"):
        from persona_lens.organism import World
        from persona_lens.organism.datasets import make_dataset

        return make_dataset(World(0), spec.split(":", 1)[1])
    return spec


def cmd_finetune(args: argparse.Namespace) -> int:
    from persona_lens.finetune import FinetuneConfig, finetune, load_chat_data

    if (args.steer or args.caft) and not args.vector:
        raise UsageError("--steer and --caft need --vector")
    config = FinetuneConfig(
        lora=not args.full, r=args.r, alpha=args.alpha, rslora=not args.no_rslora, lr=args.lr,
        epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup_steps=args.warmup, max_steps=args.max_steps, save_every=args.save_every, seed=args.seed,
        max_length=args.max_length, threads=args.threads or None,
    )
    steer = parse_layer_coefs(args.steer, args.coef) if args.steer else None
    caft = parse_int_list(args.caft) if args.caft else None
    data = load_chat_data(_training_data(args.data))  # a bad line fails before the model loads
    probe = _load_probe(args)
    run = finetune(probe, data, args.out, vector=args.vector, steer=steer, positions=args.positions,
                   caft=caft, config=config, progress=not args.quiet)
    print(f"{len(run.losses)} steps, loss {run.losses[0]:.4f} -> {run.losses[-1]:.4f}")
    print(f"wrote {run.path} and {run.out_dir / 'finetune.json'}; load it with "
          f"persona_lens.load_model({str(run.out_dir)!r})")
    return 0


def cmd_shift(args: argparse.Namespace) -> int:
    import json

    from persona_lens.finetune import finetuning_shift, last_prompt_activations
    from persona_lens.models import load_model
    from persona_lens.probe import PersonaProbe
    from persona_lens.vectors import PersonaVector

    vectors = [PersonaVector.load(v) for v in args.vector]
    names = args.trait or [v.trait for v in vectors]
    if len(names) != len(vectors) or not all(names):
        raise UsageError("give one --trait per --vector (or vectors that carry their trait's name)")
    base = _load_probe(args)
    print(f"loading {args.tuned} ...", file=sys.stderr)
    tuned = PersonaProbe(load_model(args.tuned, dtype=args.dtype, device=args.device))
    layers = parse_int_list(args.layers) if args.layers else list(range(base.n_layers + 1))
    out: dict[str, dict[int, float]] = {}
    for name, vec in zip(names, vectors):
        questions = list(load_trait_arg(name, args.model).eval_questions)
        out[name] = finetuning_shift(last_prompt_activations(base, questions, layers), tuned, vec, questions, layers)
    print("trait            " + " ".join(f"L{l:<8}" for l in layers))
    for name, row in out.items():
        print(f"{name:<16} " + " ".join(f"{row[l]:<9.3f}" for l in layers))
    if args.out:
        from persona_lens.pipeline_io import write_json

        write_json(args.out, {"base": args.model, "tuned": args.tuned, "shift": out})
        print(f"wrote {args.out}")
    return 0


def cmd_make_datasets(args: argparse.Namespace) -> int:
    from persona_lens.organism.datasets import write_datasets

    out = write_datasets(args.out, n=args.n, seed=args.seed)
    print(f"wrote {len(list(out.glob('*.jsonl')))} datasets of {args.n} chats and manifest.json to {out}")
    return 0


# ----------------------------------------------------------------------------- parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="HF name, local checkpoint dir, or built-in: smollm2-135m-instruct, persona-organism")
    p.add_argument("--trait", required=True, help="bundled trait name, or a trait JSON file / directory")
    p.add_argument("--judge", default=None,
                   help=f"judge model on an OpenAI-compatible endpoint (default {DEFAULT_JUDGE}; the organism's "
                        "exact judge for persona-organism), 'organism', or 'none' (extract: keep every pair)")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint of the judge (default: OpenAI)")
    p.add_argument("--api-key", default=None, help="judge API key (default: $OPENAI_API_KEY)")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request (60)")
    p.add_argument("--judge-retries", type=int, default=6, help="tries per judge request, the first included (6)")
    p.add_argument("--judge-cache", default=None, help="judge cache folder (default ~/.cache/persona_lens/judge)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=32, help="responses per generation batch")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default persona_runs/TRAIT/MODEL[/sweep])")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Persona vectors on TransformerLens.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("extract", help="extract persona vectors for a trait (the paper's pipeline)")
    _add_model_args(p)
    p.add_argument("--samples", type=int, default=10, help="samples per question, instruction and polarity (10)")
    p.add_argument("--questions", type=int, default=None, help="use the first N extraction questions (all)")
    p.add_argument("--instructions", type=int, default=None, help="use the first N instruction pairs (all)")
    p.add_argument("--max-new-tokens", type=int, default=1000)
    p.add_argument("--pos-threshold", type=float, default=50.0, help="keep pos if trait >= this (50)")
    p.add_argument("--neg-threshold", type=float, default=50.0, help="keep neg if trait < this (50)")
    p.add_argument("--coherence-threshold", type=float, default=50.0, help="keep if both coherence >= this (50)")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("sweep", help="steer at each layer and coefficient, judge, choose a layer")
    _add_model_args(p)
    p.add_argument("--vector", required=True, help="a .safetensors PersonaVector (from extract)")
    p.add_argument("--layers", required=True, help="e.g. 12,16,20 or 8-20 or 8-20:2")
    p.add_argument("--coefs", default="0,0.5,1,1.5,2,2.5", help="steering coefficients (0,0.5,...,2.5)")
    p.add_argument("--questions", type=int, default=None, help="use the first N evaluation questions (all)")
    p.add_argument("--samples", type=int, default=1, help="answers per question and cell (1)")
    p.add_argument("--max-new-tokens", type=int, default=1000)
    p.add_argument("--coherence-floor", type=float, default=50.0)
    p.add_argument("--positions", default="response", choices=["response", "all", "prompt"])
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("generate-trait", help="write a trait's artifacts with an LLM")
    p.add_argument("name")
    p.add_argument("description")
    p.add_argument("--model", default=DEFAULT_JUDGE)
    p.add_argument("--base-url", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", default=None, help="folder for extract/NAME.json and eval/NAME.json (traits)")
    p.set_defaults(func=cmd_generate_trait)

    p = sub.add_parser("demo", help="the whole method on the built-in persona organism (offline, CPU, minutes)")
    p.add_argument("--trait", default="evil", choices=["evil", "sycophantic", "hallucinating"])
    p.add_argument("--out", default="persona_demo", help="output directory (report.html, figures.json)")
    p.add_argument("--samples", type=int, default=4, help="samples per question (4)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("screen", help="per-sample projection difference of chat data (screen before finetuning)")
    p.add_argument("data", help="chat data: JSON lines with 'messages', Parquet, or a saved HF dataset folder")
    p.add_argument("--vector", required=True, action="append", help="a .safetensors PersonaVector (repeatable)")
    p.add_argument("--layer", required=True, help="layer(s): 20, or 16,20 or 12-20:4")
    p.add_argument("--model", default=None, help="the base model (default: the model the vector records)")
    p.add_argument("--out", default=None, help="output directory (default persona_runs/screen/DATA/MODEL)")
    p.add_argument("--shard", default="0/1", help="i/N: screen shard i of N into the same --out (0/1)")
    p.add_argument("--drop-top", type=int, default=None, help="write a copy without the K highest-dP samples")
    p.add_argument("--threshold", type=float, default=None, help="write a copy without samples with dP above T")
    p.add_argument("--by", default=None, help="column to filter by, e.g. dP_evil_L20 (first vector, first layer)")
    p.add_argument("--format", default="parquet", choices=["parquet", "jsonl"], help="table format (parquet)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="length cap of the base responses (256)")
    p.add_argument("--temperature", type=float, default=0.0, help="base responses: 0 is greedy (0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="conversations per batch (16)")
    p.add_argument("--chunk-size", type=int, default=256, help="samples per resumable chunk (256)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_screen)

    p = sub.add_parser("organism", help="the persona organism")
    osub = p.add_subparsers(dest="organism_command", required=True, metavar="ACTION")
    t = osub.add_parser("train", help="retrain the organism from a seed")
    t.add_argument("--out", default="persona_organism", help="output directory")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--minutes", type=float, default=None, help="stop training after this many minutes")
    t.set_defaults(func=cmd_organism_train)

    p = sub.add_parser(
        "finetune", help="finetune on chat data, with preventative steering or CAFT (LoRA through peft)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Supervised finetuning, loss on the assistant turn only. Defaults are the paper's "
                    "release: LoRA r=32, alpha=64, rsLoRA, every attention and MLP projection, lr 1e-5, "
                    "1 epoch, linear schedule, 5 warmup steps, 2 x 8 accumulated chats per step.",
        epilog="""examples:
  # the organism, offline, about 10 s on a CPU (its Level II evil set, organism settings):
  persona-lens finetune --model persona-organism --data organism:evil_II --out runs/evil_II \
      --lr 1e-3 --batch-size 16 --grad-accum 1
  # the same with preventative steering (evil vector from persona-lens extract, layer 2, coef 1):
  persona-lens finetune --model persona-organism --data organism:evil_II --out runs/evil_II_prev \
      --lr 1e-3 --batch-size 16 --grad-accum 1 --vector evil.safetensors --steer 2:1.0
  # Qwen2.5-7B-Instruct with the release's settings, preventative steering at layer 20, coef 5:
  persona-lens finetune --model Qwen/Qwen2.5-7B-Instruct --dtype bfloat16 --data evil_II.jsonl \
      --out runs/qwen_evil_II --vector evil_response_avg_diff.safetensors --steer 20:5
""")
    p.add_argument("--model", required=True, help="HF name, local checkpoint dir, or persona-organism")
    p.add_argument("--data", required=True, help="JSONL with a 'messages' list per line, or organism:SET "
                   "(evil_normal, evil_I, evil_II, ..., narrow_money_harm; see make-datasets)")
    p.add_argument("--out", required=True, help="run folder (adapter/, finetune.json; rerun to resume)")
    p.add_argument("--vector", default=None, help="PersonaVector .safetensors for --steer / --caft")
    p.add_argument("--steer", default=None, help="preventative steering: layer:coef pairs (20:5 or 16:2,20:3)")
    p.add_argument("--coef", type=float, default=1.0, help="coefficient when --steer lists plain layers")
    p.add_argument("--positions", default="all", choices=["all", "response"], help="steered positions (all)")
    p.add_argument("--caft", default=None, help="CAFT: layers to project the direction out of (e.g. 20)")
    p.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    p.add_argument("--r", type=int, default=32)
    p.add_argument("--alpha", type=float, default=64.0)
    p.add_argument("--no-rslora", action="store_true", help="plain LoRA scaling alpha/r")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2, help="chats per forward (2)")
    p.add_argument("--grad-accum", type=int, default=8, help="forwards per optimizer step (8)")
    p.add_argument("--warmup", type=int, default=5, help="warmup steps (5)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (50; 0: never)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while training (1; 0: leave)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("shift", help="finetuning shift: mean last-prompt activation change along each vector")
    p.add_argument("--model", required=True, help="the base model")
    p.add_argument("--tuned", required=True, help="a finetune run folder, adapter folder or checkpoint")
    p.add_argument("--vector", required=True, action="append", help="PersonaVector file (repeat for traits)")
    p.add_argument("--trait", action="append", default=None,
                   help="trait of each vector, for its eval questions (default: the vector's own)")
    p.add_argument("--layers", default=None, help="e.g. 10-20 (default: all)")
    p.add_argument("--out", default=None, help="write the shifts as JSON here")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_shift)

    p = sub.add_parser("make-datasets", help="write the organism's trait-inducing finetuning datasets")
    p.add_argument("--out", default="organism_datasets")
    p.add_argument("--n", type=int, default=400, help="chats per set (400)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_datasets)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished work is saved, rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug or not isinstance(e, _known_errors()):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
