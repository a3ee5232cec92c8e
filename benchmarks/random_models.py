"""Random-weight models of a real model's shape, for GPU timings without a download.

A GPU machine here has no network, so the benchmarks time Qwen2.5-7B-Instruct's exact shape
with random bf16 weights: the arithmetic, memory traffic and kernel launches are those of the
real model; only the tokens are meaningless. The tokenizer is the tests' character tokenizer
(ChatML); :func:`random_qwen` keeps greedy tokens inside it, while ids vLLM's dummy weights pick
beyond it decode to nothing, which does not matter for timing. ``tiny=True``
builds the same architecture at toy size, so each benchmark's GPU path can be run on a CPU
first (``benchmarks/gpu_suite.sh`` with ``BENCH_MODEL=--random-qwen-tiny``).
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch

QWEN7B_SHAPE = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4)
TINY_SHAPE = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2)


def add_random_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--random-qwen7b", action="store_true",
                   help="random-weight Qwen2.5-7B-shaped model (bf16; for a GPU)")
    # the same code path at toy size: a smoke test of --random-qwen7b that needs no GPU
    p.add_argument("--random-qwen-tiny", action="store_true", help=argparse.SUPPRESS)


def wants_random(args: argparse.Namespace) -> bool:
    return bool(args.random_qwen7b or args.random_qwen_tiny)


def random_qwen_dir(tiny: bool = False):
    """(folder, config, tokenizer): a checkpoint folder with the config and tokenizer and no
    weights (vLLM's dummy loader draws them), and the ``Qwen2Config`` and tokenizer themselves."""
    from transformers import Qwen2Config

    from persona_lens.testing import char_tokenizer

    tok = char_tokenizer(bos_in_template=False)
    cfg = Qwen2Config(
        **(TINY_SHAPE if tiny else QWEN7B_SHAPE), max_position_embeddings=32768, rms_norm_eps=1e-6,
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, architectures=["Qwen2ForCausalLM"],
    )
    directory = tempfile.mkdtemp(prefix="random-qwen-")
    cfg.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory, cfg, tok


def random_qwen(device, dtype, tiny: bool = False, plain_copy: bool = True):
    """(bridge, plain): a TransformerBridge over random weights of the shape built on
    ``device``, and (``plain_copy``) a separate plain HF SDPA model with the same weights, or
    None. Without the copy the weights are built once (7B in bf16: about 15 GB, not 30)."""
    from transformers import AutoModelForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    directory, cfg, tok = random_qwen_dir(tiny)
    torch.manual_seed(0)
    with torch.device(device):
        plain = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    # Rows of the output matrix beyond the tokenizer give logit 0, below the largest of a few
    # hundred random logits, so greedy tokens decode to text (a screening run needs non-empty
    # base responses); the matrix keeps its full size, so the arithmetic is unchanged.
    with torch.no_grad():
        plain.get_output_embeddings().weight[len(tok):] = 0
    hf_model = copy.deepcopy(plain) if plain_copy else plain
    bridge = TransformerBridge.boot_transformers(directory, hf_model=hf_model, device=device, dtype=dtype)
    bridge.persona_lens_name = "random-qwen-tiny" if tiny else "random-qwen2.5-7b"
    return bridge, (plain if plain_copy else None)
