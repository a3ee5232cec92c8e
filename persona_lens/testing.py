"""Tiny random chat models for tests and benchmarks, written as ordinary HF checkpoints.

A character-level tokenizer with a ChatML template keeps the vocabulary small while
making every string encodable; the Llama variant's template starts with a BOS token so
tests can check it is not doubled. The models are random (they write gibberish) but load
through every path a real checkpoint does (``persona_lens.load_model``,
``AutoModelForCausalLM.from_pretrained``, TransformerLens 3.x), in well under a second.

>>> import tempfile
>>> import persona_lens as pl
>>> from persona_lens.testing import build_tiny
>>> path = build_tiny("qwen2", tempfile.mkdtemp())
>>> probe = pl.PersonaProbe(pl.load_model(path, device="cpu"))
>>> probe.n_layers
3

This module is for tests, benchmarks and notebooks that need a model in a hurry; nothing
else in ``persona_lens`` imports it.
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
    """A fast tokenizer with one token per printable ASCII character, plus ``SPECIALS``.

    ``bos_in_template``: whether the ChatML chat template starts with ``<s>`` (as Llama's
    does). Unknown characters map to ``?``; decoding joins the characters back.

    >>> tok = char_tokenizer(bos_in_template=True)
    >>> len(tok)
    101
    >>> tok.decode(tok("Hi!", add_special_tokens=False)["input_ids"])
    'Hi!'
    >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    '<s><|im_start|>user\\nHi<|im_end|>\\n'
    """
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
    """Write a tiny random ``arch`` ("llama" or "qwen2") checkpoint + tokenizer to ``directory``.

    The model has ``n_layers`` blocks of width 48 (4 heads, 2 KV heads), weights drawn from
    ``torch.manual_seed(seed)``, and an output projection scaled up so greedy decoding is
    decided by the weights rather than float noise. Returns ``directory`` as a ``Path``.

    >>> import tempfile
    >>> from transformers import AutoModelForCausalLM
    >>> path = build_tiny("llama", tempfile.mkdtemp(), n_layers=2)
    >>> AutoModelForCausalLM.from_pretrained(path).config.num_hidden_layers
    2
    """
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
    """A TransformerLens 3.x ``HookedTransformer`` with the raw weights of a tiny checkpoint.

    For the probe tests under ``PERSONA_LENS_TEST_BACKEND=hooked_transformer`` (TransformerLens
    3.5.1, the last release with ``HookedTransformer``): the weights are converted as they are,
    without TransformerLens's folding or centring, so activations match the HF model's.
    TransformerLens is imported only when this is called.

    >>> import tempfile
    >>> model = hooked_transformer_from_hf(build_tiny("llama", tempfile.mkdtemp()))  # doctest: +SKIP
    """
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


__all__ = ["SPECIALS", "CHATML", "char_tokenizer", "build_tiny", "hooked_transformer_from_hf"]
