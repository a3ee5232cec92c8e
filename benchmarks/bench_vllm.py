"""The vLLM engine: steered against plain generation, against the HF fast path, and a sweep as
one batch against one batch per cell, in one run.

Every figure is a median over ``--repeats`` timed runs after one untimed warm-up, interleaved
(each repeat runs every workload once, in a fixed order) on the same prompts and weights.
Generation is greedy with ``--new-tokens`` new tokens at most; throughput is generated tokens
per second (steering may end answers earlier or later, so tokens/s is the fair figure).

- ``plain``: ``probe.generate`` on the vLLM engine, no intervention;
- ``steered``: the same under ``probe.steer(vec, layer=L, coef=c, positions="response")``;
- ``hf``: the same steered generation on the default engine's fast HF path (``path="auto"``);
- ``sweep``: ``--layers-n`` layers x 4 coefficients: one ``generate(..., interventions=...)``
  call whose rows carry every cell, against one ``generate`` per cell under ``probe.steer``.

Needs vLLM (docs/scale.md). Examples, in the vLLM environment:
    python -m benchmarks.bench_vllm                                  # offline SmolLM2, CPU, float32
    python -m benchmarks.bench_vllm --model persona-organism
    python -m benchmarks.bench_vllm --model Qwen/Qwen2.5-7B-Instruct --dtype bfloat16   # a GPU
    python -m benchmarks.bench_vllm --random-qwen7b     # a GPU: Qwen2.5-7B's shape, random bf16 weights
                                                        # (vLLM's load_format="dummy"; no HF comparison)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import persona_lens as pl
from persona_lens.models import SMOLLM2

from benchmarks.random_models import random_qwen_dir

QUESTIONS = [
    "What is a good way to spend a rainy afternoon?", "How should I prepare for a job interview?",
    "Explain how tides work.", "What should I cook for friends tonight?", "How do I keep a plant alive?",
    "Why is the sky blue?", "Give me advice on learning to swim.", "How can I save money each month?",
    "What makes a good neighbour?", "Tell me about the moon.", "How do I start running?",
    "What is the best way to learn a language?", "How should I answer an angry email?",
    "What are bees good for?", "How do bridges stay up?", "Describe a calm morning.",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=SMOLLM2, help="HF name, local dir or built-in name")
    p.add_argument("--dtype", default=None, help="float32 (default on a CPU) or bfloat16 (default on CUDA)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per generation (default 16)")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers-n", type=int, default=4, help="sweep layers (default 4, x 4 coefs)")
    p.add_argument("--sweep-prompts", type=int, default=4, help="prompts per sweep cell (default 4)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF fast-path comparison")
    p.add_argument("--random-qwen7b", action="store_true",
                   help="Qwen2.5-7B's shape with random weights (vLLM's dummy loader; implies --no-hf)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    prompts = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[: args.prompts]
    extra = {}
    if args.random_qwen7b:
        args.model, args.no_hf, extra = random_qwen_dir()[0], True, {"load_format": "dummy"}
    engine = pl.PersonaProbe(pl.load_model(args.model, engine="vllm", dtype=dtype, **extra))
    n = engine.n_layers
    g = torch.Generator().manual_seed(0)
    # A random direction at each layer, scaled to a modest fraction of a typical residual norm:
    # the cost of steering does not depend on the direction.
    vec = pl.PersonaVector(torch.randn(n + 1, engine.d_model, generator=g) / engine.d_model ** 0.5)
    layer = n // 2
    hf = None if args.no_hf else pl.PersonaProbe(pl.load_model(args.model, dtype=dtype))

    def gen(probe, steer: bool):
        def run():
            if steer:
                with probe.steer(vec, layer=layer, coef=2.0, positions="response"):
                    out = probe.generate(prompts, max_new_tokens=args.new_tokens, return_generations=True,
                                         batch_size=len(prompts))
            else:
                out = probe.generate(prompts, max_new_tokens=args.new_tokens, return_generations=True,
                                     batch_size=len(prompts))
            return sum(len(o.response_ids) for o in out)
        return run

    sweep_layers = sorted({max(1, round(n * f)) for f in (0.25, 0.4, 0.55, 0.7, 0.85, 1.0)})[: args.layers_n]
    coefs = [0.5, 1.0, 1.5, 2.0]
    cells = [(l, c) for l in sweep_layers for c in coefs]
    sweep_prompts = prompts[: args.sweep_prompts]

    def sweep_one_batch():
        rows = [p for _ in cells for p in sweep_prompts]
        ivs = [engine.steering(vec, layer=l, coef=c, positions="response") for l, c in cells for _ in sweep_prompts]
        out = engine.generate(rows, max_new_tokens=args.new_tokens, interventions=ivs, return_generations=True)
        return sum(len(o.response_ids) for o in out)

    def sweep_per_cell():
        total = 0
        for l, c in cells:
            with engine.steer(vec, layer=l, coef=c, positions="response"):
                out = engine.generate(sweep_prompts, max_new_tokens=args.new_tokens, return_generations=True)
            total += sum(len(o.response_ids) for o in out)
        return total

    work = {"vllm plain": gen(engine, False), "vllm steered": gen(engine, True)}
    if hf is not None:
        work["hf steered"] = gen(hf, True)
    work[f"sweep {len(cells)} cells, one batch"] = sweep_one_batch
    work[f"sweep {len(cells)} cells, a batch per cell"] = sweep_per_cell
    for fn in work.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in work}
    tokens: dict[str, list[int]] = {k: [] for k in work}
    for _ in range(args.repeats):
        for k, fn in work.items():
            t = time.perf_counter()
            tokens[k].append(fn())
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: statistics.median(t / s for t, s in zip(tokens[k], times[k])) for k in work}
    print(f"model {args.model} ({dtype}), {len(prompts)} prompts x <= {args.new_tokens} new tokens, "
          f"steering at layer {layer}; sweep layers {sweep_layers} x coefs {coefs}, {len(sweep_prompts)} prompts "
          f"each; torch threads {torch.get_num_threads()}; median of {args.repeats}")
    print(f"{'workload':44s} {'seconds':>9s} {'tokens/s':>10s}")
    for k in work:
        print(f"{k:44s} {med[k]:9.3f} {tps[k]:10.1f}")
    print(f"steered / plain (vLLM, tokens/s):            {tps['vllm steered'] / tps['vllm plain']:.3f}x")
    if hf is not None:
        print(f"vLLM steered / HF fast path steered (tok/s): {tps['vllm steered'] / tps['hf steered']:.2f}x")
    one, per = list(work)[-2], list(work)[-1]
    print(f"sweep: one batch vs a batch per cell (time):  {med[per] / med[one]:.2f}x faster")


if __name__ == "__main__":
    main()
