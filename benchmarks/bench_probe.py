"""PersonaProbe's fast HF path against the TransformerLens bridge and plain HF, in one run.

Every comparison is interleaved A/B in one process on the same weights: each repeat runs
every workload once, in a fixed order, and the table shows medians over repeats (after one
untimed warm-up run of each). Workloads:

- generation (greedy, ``--batch`` prompts of about ``--prompt-tokens`` tokens, exactly
  ``--new-tokens`` new tokens, end-of-sequence ignored on every side): plain HF ``generate``
  (SDPA, no hooks, the model loaded separately with ``AutoModelForCausalLM``) against
  ``PersonaProbe.generate`` steered at one layer and at four layers, on the fast path
  (``path="auto"``, which picks ``"hf"``) and on the bridge (``path="bridge"``);
- monitoring: ``probe.monitor`` at one layer against the same unsteered generation;
- capture: ``capture_mean`` at every layer over one batch of conversations (fast path,
  bridge; the pipeline's three reductions: response mean, prompt mean, last prompt token)
  against a plain HF SDPA forward of the same padded batch (``logits_to_keep=1``: the
  transformer without the vocabulary projection, which capture does not need either), the
  same forward plus the chat encoding that ``capture_mean`` does from conversations, and the
  released code's ``get_hidden_p_and_r`` (one text at a time, ``output_hidden_states=True``,
  three reductions per layer each copied to the CPU);
- memory: peak extra memory of ``capture_mean`` over N and 4N conversations, and of
  ``capture`` (which returns every sample's activations) for contrast (CUDA:
  ``torch.cuda.max_memory_allocated``; CPU: the running sum of torch's allocations and
  frees recorded by ``torch.profiler`` with ``profile_memory=True``).

Examples (in the repository root):
    python -m benchmarks.bench_probe                         # offline SmolLM2 on the CPU
    python -m benchmarks.bench_probe --random-qwen7b         # GPU: random Qwen2.5-7B shape, bf16
    python -m benchmarks.bench_probe --model Qwen/Qwen2.5-7B-Instruct --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import persona_lens as pl
from persona_lens.models import resolve_dtype, resolve_model_path

from benchmarks.random_models import add_random_model_args, random_qwen, wants_random

TEXT = (
    "The committee met on a grey morning to review the harbour plans. Engineers described "
    "the new breakwater, the dredging schedule and the cost of moving the ferry terminal. "
    "Several fishermen asked how the works would change the currents near the old pier, and "
    "a teacher wanted to know whether the beach would stay open for the summer school. The "
    "chair promised written answers within a month and thanked everyone for coming. "
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=pl.models.SMOLLM2, help="HF name, local checkpoint dir or built-in name")
    add_random_model_args(p)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", default=None,
                   help="prompts per generation / conversations per capture (CPU 8, CUDA 32); "
                        "a comma-separated list (32,128) measures each on the same loaded weights")
    p.add_argument("--prompt-tokens", type=int, default=None, help="about this many prompt tokens per row (CPU 32, CUDA 64)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (CPU 32, CUDA 128)")
    p.add_argument("--response-tokens", type=int, default=None, help="response tokens per captured conversation (default: --new-tokens)")
    p.add_argument("--mem-samples", type=int, default=None, help="N for the N vs 4N memory check (default: the batch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: gen,monitor,capture,memory")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = str(args.device).startswith("cuda")
    args.dtype = resolve_dtype(args.dtype or ("bfloat16" if cuda or args.random_qwen7b else "float32"))
    args.batches = [int(b) for b in str(args.batch).split(",")] if args.batch else [32 if cuda else 8]
    args.prompt_tokens = args.prompt_tokens or (64 if cuda else 32)
    args.new_tokens = args.new_tokens or (128 if cuda else 32)
    args.response_tokens = args.response_tokens or args.new_tokens
    args.skip = {s for s in args.skip.split(",") if s}
    return args


# -- models ------------------------------------------------------------------------------
def load_pair(args):
    """(bridge, plain HF model) with the same weights."""
    from transformers import AutoModelForCausalLM

    if wants_random(args):
        return random_qwen(args.device, args.dtype, tiny=args.random_qwen_tiny)
    bridge = pl.load_model(args.model, dtype=args.dtype, device=args.device)
    plain = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(args.model), dtype=args.dtype, attn_implementation="sdpa"
    ).to(args.device).eval()
    return bridge, plain


def ignore_eos(probe: pl.PersonaProbe) -> None:
    """Benchmark only: generate exactly max_new_tokens on every backend of the probe."""
    for backend in (probe.backend, probe._fast):
        if backend is not None:
            backend.eos_token_ids = lambda: set()


# -- data --------------------------------------------------------------------------------
def texts(tokenizer, n: int, length: int, offset: int = 0) -> list[str]:
    ids = tokenizer(TEXT * 64, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[offset + 7 * i : offset + 7 * i + length]).strip() for i in range(n)]


def make_prompts(probe, n, prompt_tokens):
    overhead = len(pl.chat.prompt_ids(probe.tokenizer, [{"role": "user", "content": "x"}])) - 1
    return texts(probe.tokenizer, n, max(1, prompt_tokens - overhead))


def make_conversations(probe, n, prompt_tokens, response_tokens):
    prompts = make_prompts(probe, n, prompt_tokens)
    answers = texts(probe.tokenizer, n, response_tokens, offset=301)
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]


# -- measurement -------------------------------------------------------------------------
def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_interleaved(workloads: dict[str, Callable[[], object]], repeats: int, device) -> dict[str, list[float]]:
    times = {k: [] for k in workloads}
    for fn in workloads.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in workloads.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def peak_extra_memory(fn: Callable[[], object], device) -> int:
    """Peak memory above the level at the start of the call, in bytes."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # CPU: torch's allocator reports each allocation to the profiler (attributed to the op
    # that made it) and each free; the running sum in time order peaks at the answer.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def table(rows: list[tuple[str, list[float], str, str]]) -> str:
    w = max(len(r[0]) for r in rows)
    out = [f"{'workload':<{w}}  {'median s':>9}  {'min s':>7}  {'throughput (median)':>20}  ratio (medians)"]
    for name, ts, thr, ratio in rows:
        out.append(f"{name:<{w}}  {statistics.median(ts):>9.3f}  {min(ts):>7.3f}  {thr:>20}  {ratio}")
    return "\n".join(out)


# -- the benchmark -----------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from importlib.metadata import version

    bridge, plain = load_pair(args)
    fast = pl.PersonaProbe(bridge)  # path="auto"
    slow = pl.PersonaProbe(bridge, path="bridge")
    for probe in (fast, slow):
        ignore_eos(probe)
    plain.generation_config.eos_token_id = None
    n, device = fast.n_layers, args.device
    name = torch.cuda.get_device_name() if str(device).startswith("cuda") else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"model {fast.model_name}: {n} layers, d_model {fast.d_model}, {args.dtype}, {device} ({name})")
    print(f"torch {torch.__version__}, transformers {version('transformers')}, transformer-lens {version('transformer-lens')}")
    print(f"fast path attention: {fast._fast.attn_implementation}; bridge: {bridge.original_model.config._attn_implementation}")

    g = torch.Generator().manual_seed(0)
    directions = torch.randn(n + 1, fast.d_model, generator=g)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    vec = pl.PersonaVector(directions, model_name=fast.model_name)
    for B in args.batches:
        print()
        measure(args, B, fast, slow, plain, vec)


def measure(args, B: int, fast, slow, plain, vec) -> None:
    """Every section for one batch size; prints its table and findings."""
    n, P, N, device = fast.n_layers, args.prompt_tokens, args.new_tokens, args.device
    one = {n // 2: 4.0}
    several = {l: 2.0 for l in (n // 4, n // 2, (3 * n) // 4, n - 1)}
    rows: list[tuple[str, list[float], str, str]] = []
    findings: list[str] = []
    med = lambda xs: statistics.median(xs)  # noqa: E731

    prompts = make_prompts(fast, B, P)
    batch = fast.encode(prompts, with_response=False).to(device)
    pad = fast.tokenizer.pad_token_id if fast.tokenizer.pad_token_id is not None else 0
    print(f"generation: batch {B}, prompt tokens {batch.input_ids.shape[1]} (padded), new tokens {N}, repeats {args.repeats}")

    def hf_generate():
        with torch.no_grad():
            out = plain.generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=N,
                do_sample=False, pad_token_id=pad,
            )
        assert out.shape[1] == batch.input_ids.shape[1] + N
        return out

    def steered(probe, plan):
        def fn():
            with probe.steer(vec, layers=plan, positions="response"):
                out = probe.generate(prompts, max_new_tokens=N, batch_size=B, return_generations=True)
            assert all(len(o.response_ids) == N for o in out)
            return out

        return fn

    if "gen" not in args.skip:
        work = {
            "HF generate (sdpa, no hooks)": hf_generate,
            "probe.generate fast, steer 1 layer": steered(fast, one),
            "probe.generate bridge, steer 1 layer": steered(slow, one),
            "probe.generate fast, steer 4 layers": steered(fast, several),
            "probe.generate bridge, steer 4 layers": steered(slow, several),
        }
        times = run_interleaved(work, args.repeats, device)
        base = med(times["HF generate (sdpa, no hooks)"])
        for k, ts in times.items():
            rows.append((k, ts, f"{B * N / med(ts):.1f} new tok/s", f"{base / med(ts):.2f}x HF"))
        steered(fast, one)()
        findings.append(f"auto path chose: {fast.last_path}")
        a, b = steered(fast, several)(), steered(slow, several)()
        findings.append(f"steered greedy tokens fast == bridge: {[x.response_ids for x in a] == [x.response_ids for x in b]}")
        plain_tokens = hf_generate()[:, batch.input_ids.shape[1]:].tolist()
        mine = [o.response_ids for o in fast.generate(prompts, max_new_tokens=N, batch_size=B, return_generations=True)]
        findings.append(f"unsteered greedy tokens fast == HF generate: {mine == plain_tokens}")

    if "monitor" not in args.skip:
        work = {
            "probe.generate fast, no hooks": lambda: fast.generate(prompts, max_new_tokens=N, batch_size=B),
            "probe.monitor fast, 1 layer": lambda: fast.monitor(prompts, vec, layer=n // 2, max_new_tokens=N, batch_size=B),
        }
        times = run_interleaved(work, args.repeats, device)
        base = med(times["probe.generate fast, no hooks"])
        for k, ts in times.items():
            rows.append((k, ts, f"{B * N / med(ts):.1f} new tok/s", f"{med(ts) / base:.3f}x time of generate"))

    if "capture" not in args.skip:
        convs = make_conversations(fast, B, P, args.response_tokens)
        cbatch = fast.encode(convs, with_response=True).to(device)
        tokens = int(cbatch.attention_mask.sum())
        print(f"capture: {B} conversations, {tokens} tokens ({tuple(cbatch.input_ids.shape)} padded), 3 reductions at all {n + 1} layers")

        def hf_forward(b=None):
            b = cbatch if b is None else b
            with torch.no_grad():
                return plain(input_ids=b.input_ids, attention_mask=b.attention_mask, logits_to_keep=1)

        def one_at_a_time():
            """Reference means: HF hidden states of each conversation alone, same token ids."""
            means = []
            with torch.no_grad():
                for row in range(B):
                    real = cbatch.attention_mask[row].bool()
                    ids = cbatch.input_ids[row][real][None]
                    resp = cbatch.response_mask[row][real]
                    hs = plain(input_ids=ids, output_hidden_states=True).hidden_states
                    means.append(torch.stack([h[0][resp].float().mean(0) for h in hs]).cpu())
            return torch.stack(means).mean(0)

        tok = fast.tokenizer
        prompt_texts = [tok.apply_chat_template(c[:-1], add_generation_prompt=True, tokenize=False) for c in convs]
        answers = [c[-1]["content"] for c in convs]

        def released():
            """The released code's get_hidden_p_and_r: one text at a time, every hidden state,
            three reductions per layer each copied to the CPU (run under no_grad here, which
            only helps it)."""
            out = {k: [[] for _ in range(n + 1)] for k in ("prompt_avg", "response_avg", "prompt_last")}
            with torch.no_grad():
                for prompt, answer in zip(prompt_texts, answers):
                    inputs = tok(prompt + answer, return_tensors="pt", add_special_tokens=False).to(device)
                    prompt_len = len(tok.encode(prompt, add_special_tokens=False))
                    hs = plain(**inputs, output_hidden_states=True).hidden_states
                    for layer in range(n + 1):
                        out["prompt_avg"][layer].append(hs[layer][:, :prompt_len].mean(dim=1).cpu())
                        out["response_avg"][layer].append(hs[layer][:, prompt_len:].mean(dim=1).cpu())
                        out["prompt_last"][layer].append(hs[layer][:, prompt_len - 1].cpu())
            return out

        three = ("response_mean", "prompt_mean", "last_prompt")  # what the pipeline captures
        # capture_mean starts from conversations, so its time includes the chat template and
        # tokenization; the second baseline pays for the same encoding before its forward.
        work = {
            "HF forward (sdpa, same batch)": hf_forward,
            "HF forward + chat encoding": lambda: hf_forward(fast.encode(convs, with_response=True).to(device)),
            "capture_mean fast, all layers": lambda: fast.capture_mean(convs, reductions=three, batch_size=B, progress=False),
            "capture_mean bridge, all layers": lambda: slow.capture_mean(convs, reductions=three, batch_size=B, progress=False),
            "released method (1 at a time)": released,
        }
        times = run_interleaved(work, args.repeats, device)
        base = med(times["HF forward (sdpa, same batch)"])
        base_enc = med(times["HF forward + chat encoding"])
        rel = med(times["released method (1 at a time)"])
        for k, ts in times.items():
            rows.append((k, ts, f"{tokens / med(ts):.0f} tok/s",
                         f"{base / med(ts):.2f}x HF fwd, {base_enc / med(ts):.2f}x HF fwd+enc, {rel / med(ts):.1f}x released"))
        a = fast.capture_mean(convs, batch_size=B, progress=False).mean("response_mean")
        b = slow.capture_mean(convs, batch_size=B, progress=False).mean("response_mean")
        r = one_at_a_time()
        findings.append(f"capture means fast vs bridge: max abs diff {float((a - b).abs().max()):.2e}")
        findings.append(f"capture means fast vs HF hidden states one at a time (layers < {n}): max abs diff {float((a[:n] - r[:n]).abs().max()):.2e}")

    if "memory" not in args.skip:
        M = args.mem_samples or B
        small = make_conversations(fast, M, P, args.response_tokens)
        big = small * 4
        fast.capture_mean(small[:2], batch_size=B, progress=False)
        what = "CUDA max_memory_allocated" if str(device).startswith("cuda") else "torch CPU allocations"
        for label, method in (("capture_mean", fast.capture_mean), ("capture (per sample, for contrast)", fast.capture)):
            m1 = peak_extra_memory(lambda: method(small, batch_size=B, progress=False), device)
            m4 = peak_extra_memory(lambda: method(big, batch_size=B, progress=False), device)
            findings.append(f"{label} peak memory ({what}): {M} samples {m1 / 2**20:.2f} MiB, {4 * M} samples {m4 / 2**20:.2f} MiB")

    print()
    if rows:
        print(table(rows))
        print()
    for f in findings:
        print(f)


if __name__ == "__main__":
    main()
