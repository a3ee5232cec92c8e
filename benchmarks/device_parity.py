"""Parity of PersonaProbe with plain HF on a given device and dtype (bf16 on CUDA by default).

The CPU test suite checks float32 parity; this script checks the same things where tests
cannot run: on a GPU, in bf16. For each model (tiny random Llama and Qwen2 checkpoints, the
persona organism, the offline SmolLM2 if installed, or ``--model``) it prints

- capture: max |probe response-mean - HF ``output_hidden_states`` response-mean| per layer,
  relative to the activations' scale (bf16 tolerance: about 1e-2);
- steering: the share of rows whose steered greedy tokens equal HF ``generate`` with the same
  vector added by a plain torch hook on decoder layer L-1 (bf16 eager vs SDPA attention can
  split near-ties, so a few differing rows late in long generations are expected);
- fast path vs bridge: the share of rows whose steered greedy tokens agree (the bridge runs
  eager attention, so bf16 near-ties may split here too);
- cached vs uncached: the share of rows whose greedy tokens agree;
- the path the probe ran and where its tensors live.

Run with ``python -m benchmarks.device_parity [--device cuda] [--dtype bfloat16] [--model M]``
in the repository root.
Exits non-zero if capture parity misses ``--tol`` on any model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import persona_lens as pl
from persona_lens.models import resolve_dtype, resolve_model_path

CONVS = [
    [{"role": "user", "content": "How do I boil an egg?"},
     {"role": "assistant", "content": "Put it in boiling water for seven minutes, then cool it."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}],
]
PROMPTS = ["What is the capital of France?", "Name three fruits.", "Why is the sky blue?", "Count to five."]


def check(label: str, path: str, device: str, dtype: torch.dtype, new_tokens: int, tol: float) -> bool:
    from transformers import AutoModelForCausalLM

    probe = pl.PersonaProbe(pl.load_model(path, device=device, dtype=dtype))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    n = probe.n_layers
    acts = probe.capture(CONVS, reductions=["response_mean"], batch_size=2)
    worst = 0.0
    for i, conv in enumerate(CONVS):
        b = probe.encode([conv], with_response=True).to(device)
        with torch.no_grad():
            hs = hf(b.input_ids, output_hidden_states=True).hidden_states
        for layer in range(n):
            ref = hs[layer][0][b.response_mask[0]].float().mean(0).cpu()
            err = (acts["response_mean"][i, layer] - ref).abs().max() / ref.abs().max().clamp(min=1e-6)
            worst = max(worst, float(err))
    layer = n // 2
    g = torch.Generator().manual_seed(0)
    vec = pl.PersonaVector(torch.randn(n + 1, probe.d_model, generator=g))
    # A push of half the activations' typical norm changes the text without making every
    # next-token distribution flat (flat ones make bf16 near-ties, and so divergence, common).
    coef = 0.5 * float(acts["response_mean"][:, layer].norm(dim=-1).mean()) / float(vec[layer].norm())
    direction = (coef * vec[layer]).to(device=device, dtype=dtype)

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + direction
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    batch = probe.encode(PROMPTS, with_response=False).to(device)

    def hf_texts() -> list[str]:
        with torch.no_grad():
            out = hf.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=probe.tokenizer.pad_token_id)
        return [probe.tokenizer.decode(r, skip_special_tokens=True).strip() for r in out[:, batch.input_ids.shape[1]:]]

    plain_same = sum(a == b for a, b in zip(probe.generate(PROMPTS, max_new_tokens=new_tokens), hf_texts()))
    handle = hf.model.layers[layer - 1].register_forward_hook(hook)
    try:
        expected = hf_texts()
    finally:
        handle.remove()
    with probe.steer(vec, layer=layer, coef=coef):
        steered = probe.generate(PROMPTS, max_new_tokens=new_tokens)
        path_used = probe.last_path
        uncached = probe.generate(PROMPTS, max_new_tokens=new_tokens, use_cache=False)
    bridge = pl.PersonaProbe(probe.model, path="bridge")
    with bridge.steer(vec, layer=layer, coef=coef):
        on_bridge = bridge.generate(PROMPTS, max_new_tokens=new_tokens)
    same_bridge = sum(a == b for a, b in zip(steered, on_bridge)) / len(PROMPTS)
    same_hf = sum(a == b for a, b in zip(steered, expected)) / len(PROMPTS)
    same_cache = sum(a == b for a, b in zip(steered, uncached)) / len(PROMPTS)
    print(f"{label:<24} layers {n:>3}  capture max rel err {worst:.2e}  "
          f"unsteered == HF {plain_same / len(PROMPTS):.0%}  "
          f"steered == HF hook {same_hf:.0%}  fast == bridge {same_bridge:.0%}  cached == uncached {same_cache:.0%}  "
          f"path {path_used}  device {probe.device}")
    return worst <= tol


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--model", action="append", default=None, help="HF name or local dir (repeatable)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--tol", type=float, default=None, help="capture tolerance (bf16 3e-2, fp32 1e-4)")
    args = p.parse_args(argv)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    tol = args.tol if args.tol is not None else (1e-4 if dtype == torch.float32 else 3e-2)
    models = [(Path(m).name, m) for m in args.model or []]
    if not models:
        from persona_lens.testing import build_tiny

        tmp = Path(tempfile.mkdtemp())
        models = [(f"tiny random {a}", str(build_tiny(a, tmp / a))) for a in ("llama", "qwen2")]
        # Trained weights that ship in the repository: peaked next-token distributions, so
        # token agreement means something even where SmolLM2 cannot be installed.
        models.append((pl.models.ORGANISM, str(resolve_model_path(pl.models.ORGANISM))))
        try:
            models.append((pl.models.SMOLLM2, str(resolve_model_path(pl.models.SMOLLM2))))
        except FileNotFoundError as e:
            print(f"(SmolLM2 skipped: {e})")
    print(f"device {args.device}, dtype {dtype}, torch {torch.__version__}")
    ok = all([check(label, m, args.device, dtype, args.new_tokens, tol) for label, m in models])
    print("capture parity", "OK" if ok else f"FAILED (tolerance {tol})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
