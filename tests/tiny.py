"""Tiny random chat models for tests and benchmarks, written as ordinary HF checkpoints.

A character-level tokenizer with a ChatML template keeps the vocabulary small while
making every string encodable; the Llama variant's template starts with a BOS token so
tests can check it is not doubled.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(bos_in_template: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in ["\n"] + [chr(i) for i in range(32, 127)]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
        unk_token="?", additional_special_tokens=["<|im_start|>", "</s>"],
    )
    tok.chat_template = ("{{ bos_token }}" if bos_in_template else "") + CHATML
    return tok


def build_tiny(arch: str, directory: str | os.PathLike, seed: int = 0, n_layers: int = 3) -> Path:
    """Write a tiny random ``arch`` ("llama" or "qwen2") checkpoint + tokenizer to ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = char_tokenizer(bos_in_template=arch == "llama")
    common = dict(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    # Random init gives near-uniform logits; scale up so greedy decoding is not a coin toss
    # decided by float noise, and the tests comparing token sequences are meaningful.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    path = Path(directory)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def hooked_transformer_from_hf(path: str | os.PathLike):
    """A TransformerLens 3.x ``HookedTransformer`` with the raw weights of a tiny checkpoint."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights, convert_qwen2_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    c = hf.config
    arch = c.architectures[0]
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads, n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings,
        d_vocab=c.vocab_size, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=c.hidden_size // c.num_attention_heads,
        rotary_base=int(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]),
        gated_mlp=True, final_rms=True, eps=c.rms_norm_eps, default_prepend_bos=False,
        original_architecture=arch, model_name=str(path), device="cpu", dtype=torch.float32,
    )
    convert = convert_llama_weights if arch.startswith("Llama") else convert_qwen2_weights
    model = HookedTransformer(cfg, tokenizer=tok)
    model.load_state_dict(convert(hf, cfg), strict=False)
    model.eval()
    return model
