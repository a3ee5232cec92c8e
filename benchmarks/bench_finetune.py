"""The cost of preventative steering and CAFT in a finetuning step, in one run.

One LoRA training step (the release's adapter: r=32, alpha=64, rsLoRA, every attention and
MLP projection; forward, backward, AdamW step) of ``persona_lens.finetune`` on the same model
and the same batch, three ways, interleaved A/B/C in one process: no intervention, with
preventative steering (``coef * v`` added at every position of one layer), and with CAFT (the
direction projected out at one layer). Each repeat runs every workload once in a fixed order
after one untimed warm-up each; the table shows medians over repeats and each workload's
speed relative to the plain step (plain median / median: 1.00 is free, 0.95 is 5% slower).

    python -m benchmarks.bench_finetune                      # offline SmolLM2-135M on the CPU
    python -m benchmarks.bench_finetune --model Qwen/Qwen2.5-7B-Instruct --dtype bfloat16
    python -m benchmarks.bench_finetune --random-qwen7b      # a GPU: Qwen2.5-7B's shape, random bf16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

import persona_lens as pl
from persona_lens.finetune import FinetuneConfig, FinetuneRun, Interventions
from persona_lens.models import SMOLLM2, resolve_dtype

from benchmarks.bench_probe import run_interleaved
from benchmarks.random_models import add_random_model_args, random_qwen, wants_random


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=SMOLLM2)
    add_random_model_args(p)
    p.add_argument("--dtype", default=None, help="default: float32, or bfloat16 with --random-qwen7b")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=4, help="conversations per step (4)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--layer", type=int, default=None, help="steered layer (default: n_layers // 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: leave)")
    return p.parse_args(argv)


def conversations(n: int) -> list[list[dict[str, str]]]:
    q = ("How should I plan a week of meals on a small budget, with two children who do not like "
         "vegetables and a long commute that leaves little time for cooking?")
    a = ("Start with a few cheap staples: rice, oats, beans, eggs and frozen vegetables. Cook a large "
         "pot of soup or chili on Sunday and freeze portions. Hide vegetables in sauces, let the "
         "children choose one new food each week, and keep quick meals like omelettes ready.")
    return [[{"role": "user", "content": f"{q} (case {i})"}, {"role": "assistant", "content": a}] for i in range(n)]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if args.random_qwen7b else "float32")
    if wants_random(args):
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        bridge, _ = random_qwen(device, resolve_dtype(args.dtype), tiny=args.random_qwen_tiny,
                                plain_copy=False)
        args.model = bridge.persona_lens_name
    else:
        bridge = pl.load_model(args.model, dtype=args.dtype, device=args.device)
    probe = pl.PersonaProbe(bridge)
    layer = args.layer if args.layer is not None else probe.n_layers // 2
    g = torch.Generator().manual_seed(0)
    vec = pl.PersonaVector(torch.randn(probe.n_layers + 1, probe.d_model, generator=g))
    config = FinetuneConfig(batch_size=args.batch, grad_accum=1, warmup_steps=0, lr=1e-5, save_every=0,
                            threads=None, deterministic=False, max_steps=10_000)
    data = conversations(args.batch)
    run = FinetuneRun(probe, data, tempfile.mkdtemp(), config, Interventions())
    run.prepare()
    plans = {
        "plain LoRA step": Interventions(),
        f"+ preventative steering (L{layer}, all positions)": Interventions(vec, steer={layer: 4.0}),
        f"+ CAFT (L{layer})": Interventions(vec, caft=[layer]),
    }

    def workload(iv):
        def fn():
            run.iv = iv
            run.optimizer_step(0)
        return fn

    times = run_interleaved({name: workload(iv) for name, iv in plans.items()}, args.repeats, probe.device)
    base = statistics.median(times["plain LoRA step"])
    print(f"model {args.model} ({args.dtype}, {probe.device}), {args.batch} conversations per step, "
          f"LoRA r=32 on {len(run.targets)} projection types, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats (medians)")
    w = max(len(k) for k in times)
    print(f"{'workload':<{w}}  {'median s':>9}  {'min s':>7}  speed vs plain (medians, mins)")
    low = min(times["plain LoRA step"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<{w}}  {med:>9.3f}  {min(ts):>7.3f}  {base / med:>6.3f}x  {low / min(ts):>6.3f}x")


if __name__ == "__main__":
    main()
