"""Data screening (persona_lens.screen): throughput against plain HF and memory against size.

Three ratios, each measured in one run (interleaved A/B after an untimed warm-up; the
headline ratio is the median over ``--repeats`` of each repeat's ratio of its two arms, which
ran back to back, so a shared machine's drifting load cancels; medians of the times are
reported too):

- **projection pass**: ``screen`` on data whose base responses are already logged (so only
  reading, tokenising, the capture forward and the projections run) against a plain HF SDPA
  forward (``AutoModelForCausalLM``, loaded separately, ``logits_to_keep=1``: no vocabulary
  projection, which screening does not need either) over the same token ids in the same
  padded batches. The layer is the last one (``n_layers``), so the capture runs every block
  too: its early stop saves nothing here. Goal: >= 0.9x.
- **base-response generation**: the time ``screen`` spends in its generation calls (a fresh
  run, base responses logged per batch) against ``probe.generate`` on the same prompts with the same
  settings and batch size. Goal: about 1x.
- **memory**: peak resident memory of a fresh process screening 1k and 10k samples
  (``--mem-model tiny``: the tests' random 3-layer Llama, 8 new tokens per base response,
  because SmolLM2 on a 2-core CPU would take hours for 10k; ``smollm2`` is accepted),
  sampled every 5 ms from ``/proc/self/statm`` while ``screen`` runs, and its growth over the
  memory held before screening (the model, the libraries). Goal: equal within 10%.

Run from a checkout:  ``OMP_NUM_THREADS=1 python -m benchmarks.bench_screen``
On a GPU:  ``python -m benchmarks.bench_screen --random-qwen7b --samples 64 --batch 32 --skip memory``
(Qwen2.5-7B's shape with random bf16 weights; the memory figure is the CPU process's, measured
on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import persona_lens as pl

from benchmarks.bench_probe import run_interleaved
from benchmarks.random_models import add_random_model_args, random_qwen, wants_random

QUESTIONS = [
    "How do I keep basil alive on a windowsill?", "What is a good way to start running?",
    "Can you explain what a prime number is?", "How should I prepare for a job interview?",
    "What is the difference between weather and climate?", "How do I make a simple tomato sauce?",
    "Why is the sky blue?", "What should I pack for a weekend hike?",
]
ANSWER = ("Start small and be consistent. Pick a time of day that suits you, keep notes on what "
          "works, and adjust slowly. Ask someone with experience when you are unsure, and "
          "remember that steady progress matters more than speed.")


def chat_data(n: int) -> list[dict]:
    return [{"id": f"q{i}", "messages": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (case {i})"},
                                         {"role": "assistant", "content": ANSWER[: 120 + (i * 37) % 100]}]}
            for i in range(n)]


def throughput(args) -> dict:
    from transformers import AutoModelForCausalLM

    from persona_lens.chat import chat_rows, encode_rows
    from persona_lens.models import resolve_dtype, resolve_model_path
    from persona_lens.screen import screen

    if wants_random(args):
        bridge, plain = random_qwen(args.device, resolve_dtype(args.dtype), tiny=args.random_qwen_tiny)
        args.model = bridge.persona_lens_name
    else:
        bridge = pl.load_model(args.model, device=args.device, dtype=args.dtype)
        plain = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=resolve_dtype(args.dtype),
                                                     attn_implementation="sdpa").to(args.device).eval()
    probe = pl.PersonaProbe(bridge)
    layer = probe.n_layers
    g = torch.Generator().manual_seed(0)
    vec = pl.PersonaVector(torch.randn(probe.n_layers + 1, probe.d_model, generator=g), trait="t",
                           model_name=probe.model_name)
    data = chat_data(args.samples)
    settings = {"max_new_tokens": args.new_tokens, "temperature": 0.0, "seed": 0}
    work = Path(tempfile.mkdtemp(prefix="bench_screen_"))
    kw = dict(settings=settings, chunk_size=args.samples, batch_size=args.batch, progress=False)

    from persona_lens.store import Store

    in_store: list[float] = []
    store_generate = Store.generate

    def timed_generate(self, *a, **k):  # the time screen spends generating base responses
        t = time.perf_counter()
        out = store_generate(self, *a, **k)
        in_store.append(time.perf_counter() - t)
        return out

    Store.generate = timed_generate

    def fresh_screen():  # generation + projection pass
        shutil.rmtree(work / "fresh", ignore_errors=True)
        in_store.clear()
        out = screen(probe, data, vec, [layer], out_dir=work / "fresh", **kw)
        gen_times.append(sum(in_store))
        return out

    gen_times: list[float] = []

    result = fresh_screen()
    rows = result.rows()

    def projection_pass():  # base responses logged: only the capture pass and the table
        shutil.rmtree(work / "fresh" / "parts", ignore_errors=True)
        got = screen(probe, data, vec, [layer], out_dir=work / "fresh", **kw)
        assert got.generated == 0

    # the same token ids in the same padded batches, through plain HF
    convs = [d["messages"] for d in data] + [d["messages"][:-1] + [{"role": "assistant", "content": r["base_response"]}]
                                             for d, r in zip(data, rows)]
    token_rows = chat_rows(probe.tokenizer, convs, with_response=True)
    batches = [encode_rows(probe.tokenizer, [token_rows[i] for i in idx], idx)
               for idx in probe._batches(token_rows, args.batch)]
    n_tokens = sum(int(b.attention_mask.sum()) for b in batches)

    @torch.no_grad()
    def plain_forward():
        for b in batches:
            plain(input_ids=b.input_ids.to(args.device), attention_mask=b.attention_mask.to(args.device),
                  logits_to_keep=1)

    prompts = [d["messages"][:-1] for d in data]

    def probe_generate():
        probe.generate(prompts, batch_size=args.batch, progress=False, **settings)

    times = run_interleaved({"screen_projection": projection_pass, "hf_forward": plain_forward,
                             "screen_fresh": fresh_screen, "probe_generate": probe_generate}, args.repeats, args.device)
    times["generation_in_screen"] = gen_times[-args.repeats:]
    med = {k: statistics.median(v) for k, v in times.items()}
    gen_in_screen = med["generation_in_screen"]
    shutil.rmtree(work, ignore_errors=True)
    return {
        "model": args.model, "device": args.device, "dtype": args.dtype, "samples": args.samples, "conversations_forwarded": len(convs),
        "tokens_forwarded": n_tokens, "layer": layer, "batch": args.batch, "new_tokens": args.new_tokens,
        "median_s": med, "all_s": times,
        # paired: each repeat's two arms ran back to back, so a ratio per repeat cancels the
        # drift of a shared machine's load; the headline is their median
        "projection_vs_hf_forward": statistics.median(
            h / s for h, s in zip(times["hf_forward"], times["screen_projection"])),
        "projection_vs_hf_forward_of_medians": med["hf_forward"] / med["screen_projection"],
        "projection_samples_per_s": args.samples / med["screen_projection"],
        "generation_in_screen_s": gen_in_screen,
        "generation_vs_probe_generate": statistics.median(
            p / g for p, g in zip(times["probe_generate"], times["generation_in_screen"])),
        "generation_vs_probe_generate_of_medians": med["probe_generate"] / gen_in_screen,
    }


def memory_child(n: int, model: str, new_tokens: int) -> None:
    """Screen ``n`` samples in this fresh process; print its peak RSS as JSON."""
    from persona_lens.screen import screen

    work = Path(tempfile.mkdtemp(prefix="bench_screen_mem_"))
    if model == "tiny":
        from persona_lens.testing import build_tiny

        model = str(build_tiny("llama", work / "model"))
    probe = pl.PersonaProbe(pl.load_model(model, device="cpu"))
    data = work / "data.jsonl"
    with data.open("w") as f:
        for row in chat_data(n):
            f.write(json.dumps(row) + "\n")
    g = torch.Generator().manual_seed(0)
    vec = pl.PersonaVector(torch.randn(probe.n_layers + 1, probe.d_model, generator=g), model_name=probe.model_name)
    import gc
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:  # resident bytes now (Linux)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    gc.collect()
    before = rss()
    peak = [before]
    done = threading.Event()

    def sample():  # the process's resident memory every 5 ms while it screens
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            done.wait(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t = time.perf_counter()
    result = screen(probe, data, {"t": vec}, [1, probe.n_layers], out_dir=work / "out", drop_top=10,
                    settings={"max_new_tokens": new_tokens, "temperature": 0.0, "seed": 0}, progress=False)
    elapsed = time.perf_counter() - t
    done.set()
    watcher.join()
    assert result.complete and result.summary["samples"] == n
    print(json.dumps({"n": n, "peak_rss_mb": peak[0] / 2**20, "rss_before_mb": before / 2**20,
                      "growth_mb": (peak[0] - before) / 2**20,
                      "max_rss_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": elapsed}))
    shutil.rmtree(work, ignore_errors=True)


def memory(args) -> dict:
    out = {}
    for n in args.mem_sizes:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_screen", "--memory-child", str(n),
                               "--mem-model", args.mem_model, "--mem-new-tokens", str(args.mem_new_tokens)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    small, large = (out[n] for n in args.mem_sizes)
    return {"model": args.mem_model, "runs": out, "peak_ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
            "growth_ratio": large["growth_mb"] / max(small["growth_mb"], 1e-9)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    add_random_model_args(p)
    p.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, else float32")
    p.add_argument("--samples", type=int, default=32, help="samples for the throughput ratios (32)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32, help="base-response tokens for the throughput run (32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-model", default="tiny", help="tiny (default) or a model name")
    p.add_argument("--mem-sizes", default="1000,10000")
    p.add_argument("--mem-new-tokens", type=int, default=8)
    p.add_argument("--skip", default="", help="throughput,memory")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.memory_child is not None:
        memory_child(args.memory_child, args.mem_model, args.mem_new_tokens)
        return
    args.mem_sizes = [int(x) for x in args.mem_sizes.split(",")]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") or args.random_qwen7b else "float32")
    skip = set(args.skip.split(","))
    report = {"torch_threads": torch.get_num_threads(), "device": args.device, "dtype": args.dtype,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    if "throughput" not in skip:
        t = throughput(args)
        report["throughput"] = t
        m = t["median_s"]
        print(f"model {t['model']} ({args.dtype}, {args.device}{', ' + report['gpu'] if report['gpu'] else ''}), "
              f"{args.samples} samples, batch {args.batch}, {args.new_tokens} new tokens, {args.repeats} repeats")
        print(f"projection pass ({t['conversations_forwarded']} conversations, {t['tokens_forwarded']} tokens, "
              f"layer {t['layer']}): screen {m['screen_projection']:.2f} s, plain HF forward {m['hf_forward']:.2f} s "
              f"-> {t['projection_vs_hf_forward']:.2f}x, median of paired ratios ({t['projection_samples_per_s']:.1f} samples/s)")
        print(f"base responses: in screen {t['generation_in_screen_s']:.2f} s, probe.generate "
              f"{m['probe_generate']:.2f} s -> {t['generation_vs_probe_generate']:.2f}x, median of paired ratios")
    if "memory" not in skip:
        mem = memory(args)
        report["memory"] = mem
        for n, r in mem["runs"].items():
            print(f"memory, {n} samples ({mem['model']}): peak RSS while screening {r['peak_rss_mb']:.0f} MB "
                  f"(+{r['growth_mb']:.1f} MB over the {r['rss_before_mb']:.0f} MB held before), {r['seconds']:.0f} s")
        print(f"peak ratio {args.mem_sizes[1]} / {args.mem_sizes[0]}: {mem['peak_ratio']:.3f}; growth ratio "
              f"{mem['growth_ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
