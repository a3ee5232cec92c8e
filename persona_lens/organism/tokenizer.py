"""Word-level tokenizer of the persona world, as a ``transformers.PreTrainedTokenizerFast``.

One token per word or punctuation mark; text is lower-cased and split on whitespace and
punctuation. Decoding joins tokens with single spaces, so a decoded response reads
``"the zorp is red . i hope this helps ."``. Conversations use a ChatML-style template::

    <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n

``eos_token`` is ``<|im_end|>`` (end of turn), so generation stops at the end of the
assistant turn. ``bos_token`` is ``<|endoftext|>``; the template never emits it, but the
model is trained to ignore one at the start (some wrappers prepend it).
"""

from __future__ import annotations

from pathlib import Path

from .world import World

PAD, UNK, BOS, IM_START, IM_END = "<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, UNK, BOS, IM_START, IM_END)
ROLES = ("system", "user", "assistant")
#: Punctuation the world does not produce but user text may contain; kept out of <unk>.
EXTRA_PUNCTUATION = ("!", ":", ";", "'", '"', "-", "(", ")")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(world: World | None = None):
    """Build the tokenizer for ``world`` (default ``World(0)``); deterministic."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    world = world or World(0)
    words = list(SPECIAL_TOKENS) + [w for w in dict.fromkeys(list(ROLES) + world.vocabulary() + list(EXTRA_PUNCTUATION))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        model_max_length=1024,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(out_dir: str | Path, world: World | None = None):
    tok = build_tokenizer(world)
    tok.save_pretrained(str(out_dir))
    return tok
