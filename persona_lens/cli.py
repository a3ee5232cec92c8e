"""The ``persona-lens`` command.

::

    persona-lens demo [--full] [--trait evil] [--out persona_demo]
    persona-lens extract --model M --trait NAME|PATH [--judge MODEL|none|organism] [--out DIR] [--shard i/N] ...
    persona-lens sweep --model M --trait T --vector PATH --layers 10-20:2 --coefs 0,1,2 [--out DIR] [--shard i/N]
    persona-lens generate-trait NAME "DESCRIPTION" [--model gpt-4.1-mini] [--out DIR]
    persona-lens organism train [--out DIR] [--seed N] [--minutes M]
    persona-lens screen DATA --vector V [--vector V2] --layer L [--model M] [--shard i/N] [--drop-top K]
    persona-lens finetune --model M --data FILE.jsonl|organism:SET --out DIR [--vector V --steer 20:5] [--caft 20]
    persona-lens shift --model BASE --tuned RUN_DIR --vector V [--vector V2 ...] [--layers 10-20]
    persona-lens make-datasets [--out DIR] [--n 400] [--seed 0]
    persona-lens report RUN_DIR [--out FILE]

``--help`` answers at once: this module imports nothing heavy (torch, transformers,
TransformerLens, plotly) until a command runs. Flags are checked before any model loads, and
so is the judge: its API key, and that its endpoint answers.

Exit status: 0 done; 1 an error the user can fix (one line on stderr: a bad file, a judge
that fails, no pair surviving the filter), whatever was finished before it stays in the
output directory and a rerun resumes; 2 a bad flag (one line on stderr); 3 an internal error
(a bug: the traceback, then a line saying so); 130 interrupted. ``--debug``, anywhere on the
line, shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

PROG = "persona-lens"
DEFAULT_JUDGE = "gpt-4.1-mini"
ORGANISM_TRAITS = ("evil", "sycophantic", "hallucinating")

EXIT_ERROR, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 1, 2, 3, 130


class UsageError(Exception):
    """A command-line argument is wrong (exit status 2)."""


class CommandError(Exception):
    """A command cannot go on for a reason the user can fix (exit status 1)."""


# Errors a user can fix, by (module, class name): only modules already imported are looked
# at, so that classifying an error imports nothing. ValueError and OSError: bad arguments the
# library rejects, unreadable or corrupt files, a model name that cannot be loaded.
_KNOWN_ERRORS = (
    ("persona_lens.cli", "CommandError"),
    ("persona_lens.traits.trait", "TraitError"),
    ("persona_lens.judge", "JudgeError"),
    ("persona_lens.extract", "ExtractionError"),
    ("persona_lens.vectors", "VectorMismatchError"),
    ("persona_lens.demo", "DemoError"),
    ("persona_lens.backends.vllm", "VLLMUnavailable"),  # --engine vllm without vLLM: its message names the install
    ("openai", "OpenAIError"),
    ("safetensors._safetensors_rust", "SafetensorError"),
    ("builtins", "ValueError"),
    ("builtins", "OSError"),
)

# Python argument names in library messages -> the flags a command-line user types.
_FLAGS = {
    "api_key": "--api-key", "base_url": "--base-url", "questions": "--questions",
    "instructions": "--instructions", "samples": "--samples", "max_new_tokens": "--max-new-tokens",
    "batch_size": "--batch-size", "temperature": "--temperature", "layers": "--layers", "coefs": "--coefs",
    "cache_dir": "--judge-cache", "timeout": "--judge-timeout", "max_retries": "--judge-retries",
    "device": "--device", "dtype": "--dtype",
}


def _known(e: BaseException) -> bool:
    if isinstance(e, CommandError):  # this module's own class: under python -m it is __main__.CommandError
        return True
    for module, name in _KNOWN_ERRORS:
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod is not None else None
        if isinstance(cls, type) and isinstance(e, cls):
            return True
    return type(e).__name__ == "OutOfMemoryError"  # torch.cuda.OutOfMemoryError


def _flag_words(message: str) -> str:
    """A library message in command-line words: ``api_key=...`` -> ``--api-key ...``."""
    return re.sub(r"\b(" + "|".join(_FLAGS) + r")=", lambda m: _FLAGS[m.group(1)] + " ", message)


def error_message(e: BaseException) -> str:
    """One line for a known error."""
    if type(e).__name__ == "OutOfMemoryError":
        return "out of memory on the device: lower --batch-size, or use --dtype bfloat16"
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    return _flag_words(msg)


# ----------------------------------------------------------------------------- flag values


def parse_int_list(text: str) -> list[int]:
    """``"10,12,14"``, ``"8-20"`` (inclusive) or ``"8-20:4"`` (step) -> sorted list of ints.

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
                if step < 1 or int(b) < int(a):
                    raise ValueError
                out.extend(range(int(a), int(b) + 1, step))
            elif step != 1:  # "20:5" is no range: most likely a layer:coef pair given where layers go
                raise ValueError
            else:
                out.append(int(part))
    except ValueError:
        raise UsageError(f"cannot read {text!r} as layers: use e.g. 12,16,20 or 8-20 or 8-20:2 (a step needs a "
                         "range)") from None
    if not out:
        raise UsageError(f"no layers in {text!r}")
    return sorted(set(out))


def parse_float_list(text: str) -> list[float]:
    """``"0,0.5,1,2"`` -> list of finite floats.

    Example:
        >>> parse_float_list("0, 0.5,2")
        [0.0, 0.5, 2.0]
    """
    try:
        out = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"cannot read {text!r} as coefficients: use e.g. 0,0.5,1,1.5,2") from None
    if not out:
        raise UsageError(f"no coefficients in {text!r}")
    if not all(math.isfinite(c) for c in out):
        raise UsageError(f"coefficients must be finite numbers, got {text!r}")
    return out


def _int_type(lo: int, what: str, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return v

    parse.__name__ = "int"
    return parse


def _float_type(lo: float | None = None, hi: float | None = None, *, open_lo: bool = False, what: str = ""):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if (lo is not None and (v < lo or (open_lo and v == lo))) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v

    parse.__name__ = "float"
    return parse


def _layers_type(text: str) -> list[int]:
    try:
        return parse_int_list(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _heldout_type(text: str) -> str | int | None:
    if text in ("samples", "none"):
        return None if text == "none" else text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use samples, a number of questions (>= 1) or none")
    return n


def _coefs_type(text: str) -> list[float]:
    try:
        return parse_float_list(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_DEVICE_RE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")


def _device_type(text: str) -> str:
    if not _DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda, cuda:N or mps")
    return text


POSITIVE = _int_type(1, ">= 1")
NONNEG = _int_type(0, ">= 0")
SCORE = _float_type(0.0, 100.0, what="a score from 0 to 100")
TEMPERATURE = _float_type(0.0, what=">= 0")
SECONDS = _float_type(0.0, open_lo=True, what="> 0")


def check_device(device: str | None) -> None:
    """Refuse a device this machine lacks, before a model is loaded."""
    if device is None or device == "cpu":
        return
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise UsageError(f"--device {device}: CUDA is not available here ({why}); use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    elif kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    elif kind == "xpu":
        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise UsageError(f"--device {device}: XPU is not available here; use --device cpu")


# ----------------------------------------------------------------------------- traits and judges


def load_trait_arg(name: str, model: str):
    """A trait for ``--trait``: organism traits first when the model is the organism."""
    from persona_lens.traits import resolve_trait

    return resolve_trait(name, model=model)


def make_judge(spec: str | None, model: str, base_url: str | None = None, api_key: str | None = None,
               timeout: float = 60.0, cache_dir: str | None = None, retries: int = 6):
    """``--judge``: a model name for an OpenAI-compatible endpoint, ``none`` or ``organism``.

    Default: the organism's exact judge for the organism model, else gpt-4.1-mini.
    """
    from persona_lens.traits.trait import _is_organism

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


def _api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("OPENAI_API_KEY")


def _base_url(args: argparse.Namespace) -> str | None:
    return args.base_url or os.environ.get("OPENAI_BASE_URL")


def check_judge(judge: Any, args: argparse.Namespace) -> None:
    """Before a model is loaded: the judge has an API key, and its endpoint answers and
    accepts the key (``GET /models``). Any other answer (a server without ``/models``)
    passes; so does everything with ``--no-judge-check``."""
    from persona_lens.judge import OpenAIJudge
    from persona_lens.models import base_model_name
    from persona_lens.traits.trait import _is_organism

    if not isinstance(judge, OpenAIJudge):
        return
    base_url = _base_url(args)
    if _api_key(args) is None and not base_url:
        raise UsageError(
            f"the judge {judge.model} needs an API key: pass --api-key KEY or set OPENAI_API_KEY; for a local "
            "OpenAI-compatible server pass --base-url URL; or choose --judge none (extract: keep every pair)"
            + (" or --judge organism" if _is_organism(base_model_name(args.model)) else ""))
    if args.no_judge_check:
        return
    import httpx

    url = (base_url or "https://api.openai.com/v1").rstrip("/") + "/models"
    key = _api_key(args) or "EMPTY"
    try:
        reply = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=min(args.judge_timeout, 15.0))
    except httpx.HTTPError as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CommandError(
            f"cannot reach the judge at {judge.endpoint} ({reason}): check --base-url and the network "
            "(--no-judge-check skips this check, e.g. when every score is already cached)") from None
    if reply.status_code in (401, 403):
        raise CommandError(
            f"the judge at {judge.endpoint} refused the API key (HTTP {reply.status_code}): check --api-key or "
            "OPENAI_API_KEY")
    if reply.status_code == 200:
        try:
            served = {m.get("id") for m in reply.json().get("data", [])}
        except (ValueError, AttributeError, TypeError):
            served = set()
        if served and judge.model not in served:
            print(f"{PROG}: warning: the judge endpoint {judge.endpoint} does not list the model "
                  f"{judge.model!r} (it lists {len(served)} models, e.g. {sorted(str(s) for s in served)[:3]})",
                  file=sys.stderr)


def _check_model(name: str) -> str:
    """A misspelt or missing model fails here; returns the model the traits and the judge
    must fit: the base of a finetune run or adapter folder, else ``name``."""
    from persona_lens.models import base_model_name, check_model_name

    check_model_name(name)
    return base_model_name(name)


def _load_probe(args: argparse.Namespace):
    from persona_lens.models import load_model
    from persona_lens.probe import PersonaProbe

    print(f"loading {args.model} ...", file=sys.stderr)
    if getattr(args, "quiet", False):  # transformers' own "Loading weights" bar too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    engine = getattr(args, "engine", "transformer_lens")
    if engine != "transformer_lens":
        return PersonaProbe(load_model(args.model, dtype=args.dtype, engine=engine))
    return PersonaProbe(load_model(args.model, dtype=args.dtype, device=args.device))


def _default_out(trait: str, model: str, *sub: str) -> Path:
    from persona_lens.pipeline_io import slug

    return Path("persona_runs").joinpath(slug(trait), slug(model), *sub)


def _load_vector(path: str):
    """``--vector``: a PersonaVector file, or a one-line error naming it."""
    if not Path(path).is_file():
        raise CommandError(f"--vector {path}: no vector file there")
    from persona_lens.vectors import PersonaVector

    return PersonaVector.load(path)


def _shard_type(text: str) -> str:
    try:
        parse_shard(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _check_count(flag: str, value: int | None, available: int, what: str) -> None:
    if value is not None and value > available:
        raise UsageError(f"{flag} {value}: the trait has {available} {what}")


# ----------------------------------------------------------------------------- commands


def cmd_extract(args: argparse.Namespace) -> int:
    base = _check_model(args.model)  # a misspelt model fails before the judge is asked about
    trait = load_trait_arg(args.trait, base)
    _check_count("--questions", args.questions, len(trait.questions), "extraction questions")
    _check_count("--instructions", args.instructions, len(trait.instructions), "instruction pairs")
    judge = make_judge(args.judge, base, args.base_url, args.api_key, args.judge_timeout, args.judge_cache,
                       args.judge_retries)
    if args.shard is None:  # a shard only generates: its judge is not asked
        check_judge(judge, args)
    check_device(args.device)
    probe = _load_probe(args)
    from persona_lens.extract import Thresholds, extract

    out = Path(args.out) if args.out else _default_out(trait.name, args.model)
    result = extract(
        probe, trait, judge, out_dir=out, samples=args.samples, questions=args.questions,
        instructions=args.instructions, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, batch_size=args.batch_size,
        thresholds=Thresholds(args.pos_threshold, args.neg_threshold, args.coherence_threshold),
        seed=args.seed, progress=not args.quiet, verbose=False,
        shard=None if args.shard is None else parse_shard(args.shard),
    )
    if args.shard is not None:
        _shard_done(args.shard, result.generated, result.reused, out)
        return 0
    print(result.summary())
    return 0


def _shard_done(shard: str, generated: int, reused: int, out: Path) -> None:
    print(f"shard {shard}: {generated} responses generated, {reused} reused (in {out}); when every shard is "
          "done, run the same command without --shard to judge and finish")


def cmd_sweep(args: argparse.Namespace) -> int:
    base = _check_model(args.model)  # a misspelt model fails before the judge is asked about
    trait = load_trait_arg(args.trait, base)
    _check_count("--questions", args.questions, len(trait.eval_questions), "evaluation questions")
    if args.judge is not None and args.judge.lower() == "none":
        raise UsageError("a sweep needs a judge: --judge MODEL or --judge organism")
    vector = _load_vector(args.vector)
    _check_vector_layers("--layers", args.layers, vector)
    judge = make_judge(args.judge, base, args.base_url, args.api_key, args.judge_timeout, args.judge_cache,
                       args.judge_retries)
    if args.shard is None:  # a shard only generates: its judge is not asked
        check_judge(judge, args)
    check_device(args.device)
    probe = _load_probe(args)
    from persona_lens.sweep import sweep

    out = Path(args.out) if args.out else _default_out(trait.name, args.model, "sweep")
    result = sweep(
        probe, vector, trait, layers=args.layers, coefs=args.coefs, judge=judge, questions=args.questions,
        samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        coherence_floor=args.coherence_floor, positions=args.positions, batch_size=args.batch_size,
        seed=args.seed, out_dir=out, progress=not args.quiet, heldout=args.heldout,
        choose=args.choose or ("lowest" if all(c <= 0 for c in args.coefs) else "highest"),
        shard=None if args.shard is None else parse_shard(args.shard),
    )
    if args.shard is not None:
        _shard_done(args.shard, result["generated"], result["reused"], out)
        return 0
    print(result.table())
    s = result.stats
    print(f"responses: {s['generated']} generated, {s['reused']} reused; judge: {s['judged']} new "
          f"scores, {s['judge_reused']} reused")
    print(f"best layer: {result.best_layer}" + (" (the lowest trait score: suppression)" if result.choose == "lowest"
                                                 else ""))
    print(f"wrote {out / 'sweep.csv'} and {out / 'sweep.html'}")
    return 0


def cmd_generate_trait(args: argparse.Namespace) -> int:
    if _api_key(args) is None and not _base_url(args):
        raise UsageError("writing a trait needs an LLM: pass --api-key KEY or set OPENAI_API_KEY, or --base-url URL "
                         "for a local OpenAI-compatible server")
    from persona_lens.traits import generate_trait

    client = None
    if args.base_url or args.api_key:
        import openai

        client = openai.OpenAI(base_url=args.base_url, api_key=_api_key(args) or "EMPTY")
    trait = generate_trait(args.name, args.description, client=client, model=args.model)
    out = Path(args.out)
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
        raise CommandError(f"the organism trainer is not available ({e})") from None
    kwargs: dict[str, Any] = {"seed": args.seed}
    if args.minutes is not None:
        kwargs["minutes"] = args.minutes
    path = train(args.out, **kwargs)
    print(f"organism saved to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from persona_lens.demo import run_demo

    threads = args.threads
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        threads = 1  # the organism is 128 wide: more threads only add synchronisation (docs/organism.md)
    run_demo(
        args.out, trait=args.trait, full=args.full, samples=args.samples, max_new_tokens=args.max_new_tokens,
        seed=args.seed, threads=threads, positions=args.positions, progress=not args.quiet,
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


def split_vector_arg(spec: str) -> tuple[str | None, str]:
    """``--vector [NAME=]PATH`` as ``(NAME or None, PATH)``.

    Example:
        >>> split_vector_arg("runs/evil.safetensors"), split_vector_arg("kind=runs/helpful.safetensors")
        ((None, 'runs/evil.safetensors'), ('kind', 'runs/helpful.safetensors'))
    """
    name, path = spec.split("=", 1) if "=" in spec else (None, spec)
    if name == "" or not path:
        raise UsageError(f"--vector {spec!r}: use PATH or NAME=PATH")
    return name, path


def _load_named_vectors(specs: Sequence[str], *, by_trait: bool) -> dict[str, Any]:
    """``--vector [NAME=]PATH`` values, loaded (a bad file fails before the model loads) and
    named: NAME, else (``by_trait``) the vector's trait when no other unnamed vector has it,
    else the file's name before its first dot."""
    loaded = [(name, path, _load_vector(path)) for name, path in map(split_vector_arg, specs)]
    traits = [v.trait for name, _, v in loaded if name is None]
    out: dict[str, Any] = {}
    for name, path, vec in loaded:
        if name is None:
            name = vec.trait if by_trait and vec.trait and traits.count(vec.trait) == 1 \
                else Path(path).name.split(".")[0]
        if name in out:
            raise UsageError(f"--vector: the name {name!r} is given twice; name them: --vector NAME=PATH")
        out[name] = vec
    return out


def _specific(named: dict[str, Any]) -> dict[str, Any]:
    """``--specific``: each vector without the others (``specific_vectors``), named
    ``NAME_specific``; needs two vectors or more (vectors of other shapes fail there)."""
    from persona_lens.vectors import specific_vectors

    if len(named) < 2:
        raise UsageError("--specific projects the other vectors out of each one: give two --vector or more")
    return {f"{n}_specific": v for n, v in specific_vectors(named).items()}


def _check_vector_layers(flag: str, layers: Sequence[int], vector: Any) -> None:
    """Layers out of the vector's range fail here, before the model loads (a vector has its
    model's layers)."""
    bad = [l for l in layers if l > vector.n_layers]
    if bad:
        raise UsageError(f"{flag} {','.join(map(str, bad))}: the vector has layers 0..{vector.n_layers} (layer "
                         f"{bad[0]} is out of range)")


def cmd_screen(args: argparse.Namespace) -> int:
    from persona_lens.screen import screen

    if args.drop_top is not None and args.threshold is not None:
        raise UsageError("give --drop-top or --threshold, not both")
    if not Path(args.data).exists():
        raise CommandError(f"{args.data}: no chat data there")
    named = _load_named_vectors(args.vector, by_trait=True)
    vectors = list(named.values())
    if args.specific:
        named.update(_specific(named))
    if args.model is None:
        args.model = vectors[0].model_name
        if not args.model:
            raise UsageError("the vector records no model: give --model")
    layers = args.layer
    _check_vector_layers("--layer", layers, vectors[0])
    check_device(args.device)
    probe = _load_probe(args)
    from persona_lens.pipeline_io import slug

    out = Path(args.out) if args.out else Path("persona_runs", "screen", slug(Path(args.data).stem), slug(args.model))
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
    result = screen(
        probe, args.data, named, layers, out_dir=out, shard=parse_shard(args.shard), settings=settings,
        chunk_size=args.chunk_size, batch_size=args.batch_size, table_format=args.format,
        drop_top=args.drop_top, threshold=args.threshold, by=args.by, progress=not args.quiet,
    )
    print(f"base responses: {result.generated} generated, {result.reused} reused")
    if not result.complete:
        s = result.summary
        print(f"shard {args.shard} done ({s['chunks_done']} of {s['chunks']} chunks in {out}); the last shard to "
              "finish writes the table")
        if s.get("chunks_stale"):
            print(f"{s['chunks_stale']} chunk(s) in {out} were screened from other data (the file changed): rerun "
                  "the other shards to redo them", file=sys.stderr)
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


def parse_layer_coefs(text: str, coef: float | None) -> dict[int, float]:
    """``"20:5"`` / ``"16:2,20:3"`` (layer:coef) or plain layers sharing ``coef`` (default
    1.0; ``coef`` with pairs is refused, as it would be ignored).

    Example:
        >>> parse_layer_coefs("16:2,20:-3", None), parse_layer_coefs("4-6", 0.5)
        ({16: 2.0, 20: -3.0}, {4: 0.5, 5: 0.5, 6: 0.5})
    """
    parts = [part.strip() for part in text.split(",") if part.strip()]
    # "L:C" pairs (a "-" after the ":" is a negative coefficient, 20:-2), or plain layers
    if any(":" in part and "-" in part.split(":", 1)[0] for part in parts):
        # "3-5:2" reads as layers 3 and 5 (a range with a step) but looks like layers 3-5 at coef 2
        raise UsageError(f"{text!r} is ambiguous: give layer:coef pairs (3:2,4:2,5:2), or layers with --coef "
                         "(--steer 3-5 --coef 2; a step in a range, 3-5:2, is not taken here)")
    if any(":" in part for part in parts):
        if coef is not None:
            raise UsageError(f"--coef goes with plain layers (--steer 16,20 --coef 2); {text!r} gives each layer "
                             "its coefficient")
        try:
            pairs = [part.split(":") for part in parts]
            out = {int(l): float(c) for l, c in pairs}
        except ValueError:
            raise UsageError(f"cannot read {text!r} as layer:coef pairs, e.g. 20:5, 16:2,20:3 or 20:-2") from None
        if len(out) != len(pairs):
            raise UsageError(f"{text!r} names a layer twice")
        return out
    return {l: 1.0 if coef is None else coef for l in parse_int_list(text)}


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
    if args.vector and not (args.steer or args.caft):
        raise UsageError("--vector is used only with --steer LAYER:COEF (preventative steering) or --caft LAYER; "
                         "give one of them, or leave --vector out for plain finetuning")
    config = FinetuneConfig(
        lora=not args.full, r=args.r, alpha=args.alpha, rslora=not args.no_rslora, lr=args.lr,
        epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup_steps=args.warmup, max_steps=args.max_steps, save_every=args.save_every, seed=args.seed,
        max_length=args.max_length, threads=args.threads or None,
    )
    steer = parse_layer_coefs(args.steer, args.coef) if args.steer else None
    caft = args.caft
    if args.vector is not None:
        vec = _load_vector(args.vector)  # a missing or corrupt file fails before the model loads
        _check_vector_layers("--steer", list(steer or {}), vec)
        _check_vector_layers("--caft", list(caft or []), vec)
    data = load_chat_data(_training_data(args.data))  # a bad line fails before the model loads
    check_device(args.device)
    probe = _load_probe(args)
    run = finetune(probe, data, args.out, vector=args.vector, steer=steer, positions=args.positions,
                   caft=caft, config=config, progress=not args.quiet)
    print(f"{len(run.losses)} steps, loss {run.losses[0]:.4f} -> {run.losses[-1]:.4f}"
          + (" (a finished run of these data and settings was there already: nothing trained)" if run.reused else ""))
    print(f"{'reused' if run.reused else 'wrote'} {run.path} and {run.out_dir / 'finetune.json'}; load it with "
          f"persona_lens.load_model({str(run.out_dir)!r})")
    return 0


def cmd_shift(args: argparse.Namespace) -> int:
    import json

    from persona_lens.finetune import finetuning_shift, last_prompt_activations
    from persona_lens.models import load_model
    from persona_lens.probe import PersonaProbe

    vectors = [_load_vector(v) for v in args.vector]
    _check_vector_layers("--layers", args.layers or [], vectors[0])
    names = args.trait or [v.trait for v in vectors]
    if len(names) != len(vectors) or not all(names):
        raise UsageError("give one --trait per --vector (or vectors that carry their trait's name)")
    traits = {name: load_trait_arg(name, args.model) for name in names}  # an unknown trait fails first
    # one row per vector: two vectors of one trait are told apart by their files
    labels = [n if names.count(n) == 1 else f"{n} ({Path(p).name})" for n, p in zip(names, args.vector)]
    if len(set(labels)) != len(labels):
        raise UsageError("--vector: the same vector file is given twice")
    if args.specific:
        specific = _specific(dict(zip(labels, vectors)))
        names, vectors, labels = names * 2, vectors + list(specific.values()), labels + list(specific)
    check_device(args.device)
    base = _load_probe(args)
    print(f"loading {args.tuned} ...", file=sys.stderr)
    tuned = PersonaProbe(load_model(args.tuned, dtype=args.dtype, device=args.device))
    layers = args.layers if args.layers else list(range(base.n_layers + 1))
    for vec in vectors:  # a vector from another model fails before any forward
        vec.check_compatible(tuned.n_layers, tuned.d_model, None)
    # each model's activations once per trait, however many vectors (or --specific rows) read them
    acts = {side: {name: last_prompt_activations(probe, list(trait.eval_questions), layers)
                   for name, trait in traits.items()} for side, probe in (("base", base), ("tuned", tuned))}
    out: dict[str, dict[int, float]] = {}
    for label, name, vec in zip(labels, names, vectors):
        out[label] = finetuning_shift(acts["base"][name], acts["tuned"][name], vec,
                                      list(traits[name].eval_questions), layers)
    width = max(16, *(len(label) + 1 for label in labels))
    print(f"{'trait':<{width}} " + " ".join(f"L{l:<8}" for l in layers))
    for label, row in out.items():
        print(f"{label:<{width}} " + " ".join(f"{row[l]:<9.3f}" for l in layers))
    if args.out:
        from persona_lens.pipeline_io import write_json

        write_json(args.out, {"base": args.model, "tuned": args.tuned, "shift": out})
        print(f"wrote {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from persona_lens.report import run_report

    path = run_report(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0


def parse_steer_spec(text: str, names: Sequence[str], positions: str) -> dict[str, Any]:
    """``--steer NAME@LAYER:COEF[,LAYER:COEF]`` as the server's steering spec.

    Example:
        >>> parse_steer_spec("evil@5:-1.5", ["evil"], "response")
        {'vector': 'evil', 'layers': {5: -1.5}, 'positions': 'response'}
    """
    name, sep, cells = text.partition("@")
    if not sep or ":" not in cells:
        raise UsageError(f"--steer {text!r}: use NAME@LAYER:COEF, e.g. evil@20:1.5 or evil@16:1,20:-0.5")
    if name not in names:
        raise UsageError(f"--steer {text!r}: no --vector named {name!r} (the vectors: {', '.join(names) or 'none'})")
    return {"vector": name, "layers": parse_layer_coefs(cells, None), "positions": positions}


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from persona_lens.serve import make_app
    except ImportError as e:
        raise CommandError(f"the server needs FastAPI and uvicorn: pip install 'persona-lens[serve]' ({e})") from None
    vectors = _load_named_vectors(args.vector or [], by_trait=False)
    steering = [parse_steer_spec(s, list(vectors), args.positions) for s in args.steer or []]
    for spec in steering:
        _check_vector_layers(f"--steer {spec['vector']}@", list(spec["layers"]), vectors[spec["vector"]])
    check_device(args.device)
    probe = _load_probe(args)
    app = make_app(probe, vectors, steering=steering, name=args.name, max_tokens=args.max_tokens)
    server = app.state.persona_lens
    url = f"http://{args.host}:{args.port}/v1"
    print(f"serving {server.name!r} at {url} (vectors: {', '.join(vectors) or 'none'}; default steering: "
          + (", ".join(args.steer) if args.steer else "none") + ")", file=sys.stderr)
    if vectors:
        first = next(iter(vectors))
        print(f"try: curl {url}/chat/completions -H 'Content-Type: application/json' -d '{{\"model\": "
              f"\"{server.name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}], \"steering\": "
              f"[{{\"vector\": \"{first}\", \"layer\": {probe.n_layers // 2}, \"coef\": 1.0}}]}}'", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


def cmd_make_datasets(args: argparse.Namespace) -> int:
    from persona_lens.organism.datasets import write_datasets

    out = write_datasets(args.out, n=args.n, seed=args.seed)
    print(f"wrote {len(list(out.glob('*.jsonl')))} datasets of {args.n} chats and manifest.json to {out}")
    return 0


# ----------------------------------------------------------------------------- parser


class _Formatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" not in text and action.option_strings and not isinstance(default, list)
                and not any(default is v for v in (None, False, argparse.SUPPRESS))):
            text += " (default: %(default)s)"
        return text


class _RawFormatter(_Formatter, argparse.RawDescriptionHelpFormatter):
    """:class:`_Formatter` that keeps the epilog's lines (command examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" not in text:  # a description: wrap it like any other
            return argparse.HelpFormatter._fill_text(self, text, width, indent)
        return "".join(indent + line for line in text.splitlines(keepends=True))


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (status 2), naming the help to read."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[name-defined]  # noqa: F821
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _common() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    # SUPPRESS: a subcommand that is not given --debug keeps what the main parser read.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of every error")
    return p


def _add_runtime_args(p: argparse.ArgumentParser, *, engine: bool = False) -> None:
    """Where and how the model runs: --dtype, --device and (for jobs that can use it) --engine."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model weights' dtype")
    p.add_argument("--device", type=_device_type, default=None,
                   help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    if engine:
        p.add_argument("--engine", default="transformer_lens", choices=["transformer_lens", "vllm"],
                       help="what runs the model: transformer_lens (default) or vllm (generation at scale; "
                            "docs/scale.md)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="HF name, local checkpoint dir, or built-in: smollm2-135m-instruct, persona-organism")
    p.add_argument("--trait", required=True, help="bundled trait name, or a trait JSON file / directory")
    p.add_argument("--judge", default=None,
                   help=f"judge model on an OpenAI-compatible endpoint, 'organism' (the organism's exact judge), "
                        f"or 'none' (extract: keep every pair) (default: {DEFAULT_JUDGE}; organism for "
                        "--model persona-organism)")
    p.add_argument("--base-url", default=None,
                   help="the judge's OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else OpenAI)")
    p.add_argument("--api-key", default=None, help="the judge's API key (default: $OPENAI_API_KEY)")
    p.add_argument("--no-judge-check", action="store_true",
                   help="do not ask the judge's endpoint before loading the model (e.g. every score is cached)")
    p.add_argument("--judge-timeout", type=SECONDS, default=60.0, metavar="S", help="seconds per judge request")
    p.add_argument("--judge-retries", type=POSITIVE, default=6, metavar="N",
                   help="tries per judge request, the first included")
    p.add_argument("--judge-cache", default=None, metavar="DIR",
                   help="judge reply cache folder (default: $PERSONA_LENS_CACHE/judge, else "
                        "~/.cache/persona_lens/judge)")
    _add_runtime_args(p, engine=True)
    p.add_argument("--batch-size", type=POSITIVE, default=32, metavar="N", help="responses per generation batch")
    p.add_argument("--temperature", type=TEMPERATURE, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of every sampling batch")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default: persona_runs/TRAIT/MODEL, /sweep for a sweep)")
    p.add_argument("--shard", type=_shard_type, default=None, metavar="i/N",
                   help="generate only shard i of N into the same --out (jobs side by side, a log each); then "
                        "the command without --shard judges and finishes, as one run would (default: no shard, "
                        "the whole job; docs/scale.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    ap = _Parser(prog=PROG, description="Persona vectors on TransformerLens. Start with: persona-lens demo",
                 formatter_class=_Formatter, epilog="Each command's options: persona-lens COMMAND --help")
    ap.add_argument("--debug", action="store_true", default=False, help="show the traceback of every error")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help: str, description: str | None = None, raw: bool = False) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description or help, parents=[common],
                              formatter_class=_RawFormatter if raw else _Formatter)

    p = add("demo", "the whole method on the built-in persona organism (offline, CPU, about a minute)",
            "Extract a persona vector on the built-in persona organism, sweep layers and coefficients, "
            "steer, suppress and monitor, and write an HTML report. Offline, CPU only. The default is a "
            "short run (2 samples per prompt); --full is the complete one (4 samples, about twice as long).")
    p.add_argument("--full", action="store_true", help="the complete run: 4 samples per prompt")
    p.add_argument("--trait", default="evil", choices=list(ORGANISM_TRAITS), help="the organism trait")
    p.add_argument("--out", default="persona_demo", metavar="DIR",
                   help="output directory: report.html, figures.json, run.json and the pipeline's files")
    p.add_argument("--samples", type=POSITIVE, default=None, metavar="N",
                   help="samples per prompt (default: 2; 4 with --full)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=48, metavar="N", help="response length limit")
    p.add_argument("--positions", default="all", choices=["all", "response", "response_only", "prompt"],
                   help="where the sweeps steer: all = every position, response = the last prompt token and "
                        "every generated token (the paper's released mode), response_only = the generated tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of every sampling batch")
    p.add_argument("--threads", type=POSITIVE, default=None, metavar="N",
                   help="torch threads (default: $OMP_NUM_THREADS if set, else 1: the organism is too small "
                        "to gain from more)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_demo)

    p = add("extract", "extract persona vectors for a trait (the paper's pipeline)")
    _add_model_args(p)
    p.add_argument("--samples", type=POSITIVE, default=10, metavar="N",
                   help="samples per question, instruction and polarity")
    p.add_argument("--questions", type=POSITIVE, default=None, metavar="N",
                   help="use the first N extraction questions (default: all)")
    p.add_argument("--instructions", type=POSITIVE, default=None, metavar="N",
                   help="use the first N instruction pairs (default: all)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=1000, metavar="N", help="response length limit")
    p.add_argument("--pos-threshold", type=SCORE, default=50.0, metavar="SCORE",
                   help="keep a pair only if its pos answer's trait score is >= this")
    p.add_argument("--neg-threshold", type=SCORE, default=50.0, metavar="SCORE",
                   help="keep a pair only if its neg answer's trait score is < this")
    p.add_argument("--coherence-threshold", type=SCORE, default=50.0, metavar="SCORE",
                   help="keep a pair only if both answers' coherence is >= this")
    p.set_defaults(func=cmd_extract)

    p = add("sweep", "steer at each layer and coefficient, judge, choose a layer")
    _add_model_args(p)
    p.add_argument("--vector", required=True, metavar="PATH", help="a .safetensors persona vector (from extract)")
    p.add_argument("--layers", required=True, type=_layers_type, help="layers to try, e.g. 12,16,20 or 8-20 or 8-20:2")
    p.add_argument("--coefs", type=_coefs_type, default=parse_float_list("0,0.5,1,1.5,2,2.5"),
                   help="steering coefficients, 0 = unsteered (default: 0,0.5,1,1.5,2,2.5)")
    p.add_argument("--questions", type=POSITIVE, default=None, metavar="N",
                   help="use the first N evaluation questions (default: all)")
    p.add_argument("--samples", type=POSITIVE, default=1, metavar="N", help="answers per question and cell")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=1000, metavar="N", help="response length limit")
    p.add_argument("--coherence-floor", type=SCORE, default=50.0, metavar="SCORE",
                   help="only cells with at least this mean coherence can be chosen")
    p.add_argument("--choose", default=None, choices=["highest", "lowest"],
                   help="choose the coherent cell with the highest trait score (steering towards the trait) "
                        "or the lowest (suppression) (default: lowest when every --coefs value is <= 0, else "
                        "highest)")
    p.add_argument("--heldout", type=_heldout_type, default="samples", metavar="samples|N|none",
                   help="re-measure the chosen cell on answers not used to choose it: samples = fresh samples "
                        "of the same questions (needs --temperature > 0), N = N evaluation questions the grid "
                        "does not use (with --questions), none = no re-measurement")
    p.add_argument("--positions", default="response", choices=["response", "response_only", "all", "prompt"],
                   help="where steering adds the vector: response = the last prompt token and every generated "
                        "token (the paper's released mode), response_only = the generated tokens alone, all = "
                        "every position, prompt = the prompt tokens")
    p.set_defaults(func=cmd_sweep)

    p = add("generate-trait", "write a trait's artifacts with an LLM",
            "Ask an LLM for a trait's instruction pairs, questions and evaluation prompt, and write them "
            "as extract/NAME.json and eval/NAME.json.")
    p.add_argument("name", help="the trait's name, one word (e.g. curious)")
    p.add_argument("description", help="what the trait is, in a sentence or two (quote it)")
    p.add_argument("--model", default=DEFAULT_JUDGE, help="the LLM that writes the trait")
    p.add_argument("--base-url", default=None,
                   help="its OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else OpenAI)")
    p.add_argument("--api-key", default=None, help="its API key (default: $OPENAI_API_KEY)")
    p.add_argument("--out", default="traits", metavar="DIR", help="folder for extract/NAME.json and eval/NAME.json")
    p.set_defaults(func=cmd_generate_trait)

    p = add("screen", "per-sample projection difference of chat data (screen before finetuning)",
            "For each sample of chat data: the projection of its response onto each vector, minus that of "
            "the base model's own response to the same prompt (dP). Resumable in chunks; shards of one "
            "--out can run in parallel.")
    p.add_argument("data", help="chat data: JSON lines with 'messages', Parquet, or a saved HF dataset folder")
    p.add_argument("--vector", required=True, action="append", metavar="[NAME=]PATH",
                   help="a .safetensors persona vector (repeat for several); NAME names its columns, dP_NAME_L20 "
                        "(default: the vector's trait, or its file's name when two vectors share a trait)")
    p.add_argument("--layer", required=True, type=_layers_type, help="layer(s): 20, or 16,20 or 12-20:4")
    p.add_argument("--specific", action="store_true",
                   help="also screen along each vector without the others (PersonaVector.without), columns "
                        "dP_NAME_specific_L20: traits' vectors share directions, so data that teaches one trait "
                        "moves the others' dP too")
    p.add_argument("--model", default=None, help="the base model (default: the model the vector records)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: "
                   "persona_runs/screen/DATA/MODEL)")
    p.add_argument("--shard", type=_shard_type, default="0/1", metavar="i/N",
                   help="screen shard i of N into the same --out")
    p.add_argument("--drop-top", type=POSITIVE, default=None, metavar="K",
                   help="write a copy without the K highest-dP samples (default: no copy)")
    p.add_argument("--threshold", type=_float_type(), default=None, metavar="T",
                   help="write a copy without samples with dP above T (default: no copy)")
    p.add_argument("--by", default=None, metavar="COLUMN",
                   help="column to filter by, e.g. dP_evil_L20 (default: first vector, first layer)")
    p.add_argument("--format", default="parquet", choices=["parquet", "jsonl"], help="table format")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=256, metavar="N",
                   help="length cap of the base responses")
    p.add_argument("--temperature", type=TEMPERATURE, default=0.0, help="base responses' temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of every sampling batch")
    p.add_argument("--batch-size", type=POSITIVE, default=16, metavar="N", help="conversations per batch")
    p.add_argument("--chunk-size", type=POSITIVE, default=256, metavar="N", help="samples per resumable chunk")
    _add_runtime_args(p, engine=True)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_screen)

    p = add("organism", "the persona organism: retrain it")
    osub = p.add_subparsers(dest="organism_command", required=True, metavar="ACTION", parser_class=_Parser)
    t = osub.add_parser("train", help="retrain the organism from a seed", description="Retrain the organism "
                        "from a seed.", parents=[common], formatter_class=_Formatter)
    t.add_argument("--out", default="persona_organism", metavar="DIR", help="output directory")
    t.add_argument("--seed", type=int, default=0, help="training seed")
    t.add_argument("--minutes", type=SECONDS, default=None, help="stop training after this many minutes "
                   "(default: no limit)")
    t.set_defaults(func=cmd_organism_train)

    p = add("finetune", "finetune on chat data, with preventative steering or CAFT (LoRA through peft)",
            "Supervised finetuning, loss on the assistant turn only. Defaults are the paper's release: LoRA "
            "r=32, alpha=64, rsLoRA, every attention and MLP projection, lr 1e-5, 1 epoch, linear schedule, "
            "5 warmup steps, 2 x 8 accumulated chats per step.", raw=True)
    p.epilog = """examples:
  # the organism, offline, about 10 s on a CPU (its Level II evil set, organism settings):
  persona-lens finetune --model persona-organism --data organism:evil_II --out runs/evil_II \\
      --lr 1e-3 --batch-size 16 --grad-accum 1
  # the same with preventative steering at layer 3, coef 1 (the vector that
  # persona-lens extract --model persona-organism --trait evil writes):
  persona-lens finetune --model persona-organism --data organism:evil_II --out runs/evil_II_prev \\
      --lr 1e-3 --batch-size 16 --grad-accum 1 --steer 3:1.0 \\
      --vector persona_runs/evil/persona-organism/vectors/evil_response_mean.safetensors
  # Qwen2.5-7B-Instruct with the release's settings, preventative steering at layer 20, coef 5
  # (the release's evil_response_avg_diff.pt converted with PersonaVector.from_released_pt):
  persona-lens finetune --model Qwen/Qwen2.5-7B-Instruct --dtype bfloat16 --data evil_II.jsonl \\
      --out runs/qwen_evil_II --vector evil_response_avg_diff.safetensors --steer 20:5
"""
    p.add_argument("--model", required=True, help="HF name, local checkpoint dir, or persona-organism")
    p.add_argument("--data", required=True, help="JSONL with a 'messages' list per line, or organism:SET "
                   "(evil_normal, evil_I, evil_II, ..., narrow_money_harm; see make-datasets)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (adapter/, finetune.json; rerun to resume)")
    p.add_argument("--vector", default=None, metavar="PATH",
                   help="persona vector .safetensors for --steer / --caft (default: none)")
    p.add_argument("--steer", default=None, metavar="L:C",
                   help="preventative steering: layer:coef pairs, 20:5 or 16:2,20:3 (default: none)")
    p.add_argument("--coef", type=_float_type(), default=None,
                   help="coefficient when --steer lists plain layers (default: 1.0)")
    p.add_argument("--positions", default="all", choices=["all", "response", "response_only", "prompt"],
                   help="steered positions during training: all (as released for preventative steering), "
                        "response (the last prompt token and the answer tokens: the paper's released steering "
                        "mode at inference), response_only (the answer tokens) or prompt (the prompt tokens)")
    p.add_argument("--caft", type=_layers_type, default=None, metavar="LAYERS",
                   help="CAFT: layers to project the direction out of, e.g. 20 (default: none)")
    p.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    p.add_argument("--r", type=POSITIVE, default=32, help="LoRA rank")
    p.add_argument("--alpha", type=_float_type(0.0, open_lo=True, what="> 0"), default=64.0, help="LoRA alpha")
    p.add_argument("--no-rslora", action="store_true", help="plain LoRA scaling alpha/r")
    p.add_argument("--lr", type=_float_type(0.0, open_lo=True, what="> 0"), default=1e-5, help="learning rate")
    p.add_argument("--epochs", type=POSITIVE, default=1, help="passes over the data")
    p.add_argument("--batch-size", type=POSITIVE, default=2, metavar="N", help="chats per forward")
    p.add_argument("--grad-accum", type=POSITIVE, default=8, metavar="N", help="forwards per optimizer step")
    p.add_argument("--warmup", type=NONNEG, default=5, metavar="N", help="warmup steps")
    p.add_argument("--max-steps", type=POSITIVE, default=None, metavar="N",
                   help="stop after N optimizer steps (default: the epochs' steps)")
    p.add_argument("--max-length", type=POSITIVE, default=2048, metavar="N", help="tokens per chat at most")
    p.add_argument("--save-every", type=NONNEG, default=50, metavar="N", help="checkpoint every N steps (0: never)")
    p.add_argument("--threads", type=NONNEG, default=1, metavar="N", help="torch threads while training (0: leave)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and initialisation")
    _add_runtime_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)

    p = add("shift", "finetuning shift: mean last-prompt activation change along each vector")
    p.add_argument("--model", required=True, help="the base model")
    p.add_argument("--tuned", required=True, help="a finetune run folder, adapter folder or checkpoint")
    p.add_argument("--vector", required=True, action="append", metavar="PATH",
                   help="persona vector .safetensors (repeat for several traits)")
    p.add_argument("--trait", action="append", default=None,
                   help="trait of each vector, for its eval questions (default: the vector's own)")
    p.add_argument("--layers", type=_layers_type, default=None, help="e.g. 10-20 (default: all)")
    p.add_argument("--specific", action="store_true",
                   help="also the shift along each vector without the others (PersonaVector.without), rows "
                        "NAME_specific, on NAME's eval questions")
    p.add_argument("--out", default=None, metavar="FILE", help="write the shifts as JSON here (default: print only)")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_shift)

    p = add("report", "one HTML page with every experiment's figures and goals found in a run folder",
            "Gather every results.json under RUN_DIR (written by python -m experiments.NAME or "
            "experiments.all) with the figures kept beside it, and write one page.")
    p.add_argument("run_dir", help="the run folder the experiments wrote into")
    p.add_argument("--out", default=None, metavar="FILE", help="the page (default: RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)

    p = add("serve", "serve the model over an OpenAI-compatible API, steerable per request",
            "An OpenAI-compatible chat server (/v1/chat/completions) whose requests may steer the model "
            "with the given persona vectors and read its persona: 'steering': [{'vector': NAME, 'layer': L, "
            "'coef': C}] and 'monitor': [{'vector': NAME, 'layer': L}] beside OpenAI's fields. docs/serve.md.",
            raw=True)
    p.epilog = """examples:
  # the organism with its evil vector, steered at layer 5 unless a request says otherwise:
  persona-lens serve --model persona-organism \\
      --vector evil=persona_runs/evil/persona-organism/vectors/evil_response_mean.safetensors \\
      --steer evil@5:1.15
  # then, from Python:
  #   client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
  #   client.chat.completions.create(model="persona-organism", messages=[...],
  #       extra_body={"steering": [{"vector": "evil", "layer": 5, "coef": -1.5}]})
"""
    p.add_argument("--model", required=True, help="HF name, local checkpoint dir, or persona-organism")
    p.add_argument("--vector", action="append", default=None, metavar="[NAME=]PATH",
                   help="a persona vector requests may name (repeat; default name: the file's, before its "
                        "first dot) (default: none)")
    p.add_argument("--steer", action="append", default=None, metavar="NAME@L:C",
                   help="default steering of requests that send none: vector@layer:coef, e.g. evil@20:1.5 or "
                        "evil@16:1,20:-0.5 (repeat for several vectors) (default: none)")
    p.add_argument("--positions", default="response", choices=["response", "response_only", "all", "prompt"],
                   help="where --steer adds: response = the last prompt token and every answer token (the "
                        "paper's released mode), response_only, all or prompt")
    p.add_argument("--name", default=None, help="the model name clients send (default: the model's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_int_type(1, "in 1..65535", hi=65535), default=8000, help="port to listen on")
    p.add_argument("--max-tokens", type=POSITIVE, default=256, metavar="N",
                   help="answer length limit of a request that sets none")
    _add_runtime_args(p, engine=True)
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    p.set_defaults(func=cmd_serve)

    p = add("make-datasets", "write the organism's trait-inducing finetuning datasets")
    p.add_argument("--out", default="organism_datasets", metavar="DIR", help="output folder")
    p.add_argument("--n", type=POSITIVE, default=400, help="chats per set")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated chats")
    p.set_defaults(func=cmd_make_datasets)
    return ap


# Flags whose value may start with "-": argparse takes "--coefs -2,-1,0" for a flag "-2,-1,0"
# (only a lone number like -2 passes as a value), so such a value is joined to its flag.
_NEGATIVE_OK = ("--coefs", "--coef", "--threshold", "--seed", "--steer")


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    """``["--coefs", "-2,-1,0"]`` -> ``["--coefs=-2,-1,0"]`` for the flags of ``_NEGATIVE_OK``.

    Example:
        >>> _join_negative_values(["sweep", "--coefs", "-2,-1,0", "--layers", "3"])
        ['sweep', '--coefs=-2,-1,0', '--layers', '3']
    """
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _NEGATIVE_OK and i + 1 < len(argv) and re.match(r"^-[\d.]", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 error, 2 usage, 3 bug, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    except SystemExit as e:  # --help (0) or a bad flag (2, already reported)
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished work is saved, rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as e:
        if debug:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if debug:
            raise
        if _known(e):
            print(f"{PROG}: error: {error_message(e)}", file=sys.stderr)
            return EXIT_ERROR
        import traceback

        traceback.print_exc()
        print(f"{PROG}: internal error ({type(e).__name__}): this is a bug in persona_lens; please report it "
              "with the traceback above", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
