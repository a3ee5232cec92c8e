"""Chat conversations -> left-padded token batches with per-row position masks.

A conversation is a list of ``{"role": ..., "content": ...}`` messages. A *prompt* is what
comes before the final assistant turn, rendered by the tokenizer's chat template with the
generation prompt (``<|im_start|>assistant\\n`` and the like); the *response* is the final
assistant message's content, tokenized on its own and appended. This is exactly the token
sequence the model sees when it generates that response, so activations captured from a
conversation equal the ones seen while generating it.

No special tokens are added beyond the template's own: templates that want a BOS
(Llama 3) write it themselves, and tokenizing the rendered text with special tokens on
would put a second one in front.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from persona_lens import validate as V
from persona_lens.ops import last_true

Message = Mapping[str, str]
Conversation = Sequence[Message]
ConversationLike = Union[str, Conversation]


def as_conversation(item: Any, system: str | None = None, *, name: str = "conversation") -> list[dict[str, str]]:
    """Normalise a user message string or a message list into a list of message dicts.

    Every message needs a string ``role`` and a string ``content``; ``name`` is how errors
    refer to ``item`` (``"prompts[3]"``).

    Example:
        >>> as_conversation("Hi!", system="You are terse.")
        [{'role': 'system', 'content': 'You are terse.'}, {'role': 'user', 'content': 'Hi!'}]
    """
    allowed = "a string (one user message) or a list of {'role', 'content'} dicts"
    if isinstance(item, str):
        messages = [{"role": "user", "content": item}]
    elif isinstance(item, Sequence) and not isinstance(item, (bytes, bytearray)) and all(
            isinstance(m, Mapping) for m in item):
        messages = [dict(m) for m in item]
    else:
        raise V.InvalidArgumentType(name, item, allowed)
    if not messages:
        raise V.InvalidArgument(name, item, f"{allowed} with at least one message")
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise V.InvalidArgument(f"{name}[{i}]", m, "a message with 'role' and 'content'")
        V.text(f"{name}[{i}]['role']", m["role"], empty_ok=False)
        V.text(f"{name}[{i}]['content']", m["content"])
    if system is not None:
        V.text("system", system)
        if messages[0]["role"] == "system":
            raise ValueError(f"system= given for {name}, which already has a system message")
        messages.insert(0, {"role": "system", "content": system})
    return messages


def as_conversations(items: Any, *, name: str = "conversations", system: str | None = None) -> list[list[dict[str, str]]]:
    """A list of conversations (see :func:`as_conversation`), checked at the door: a bare
    string is refused rather than taken one character at a time, and an empty list too.

    Example:
        >>> as_conversations(["Hi!"])
        [[{'role': 'user', 'content': 'Hi!'}]]
    """
    seq = V.items(name, items, what="a list of conversations (strings or message lists)")
    if not seq:
        raise ValueError(f"empty batch: no {name} given")
    return [as_conversation(c, system=system, name=f"{name}[{i}]") for i, c in enumerate(seq)]


@dataclass
class ChatBatch:
    """A left-padded batch with the masks every hook needs.

    Attributes:
        input_ids: ``[batch, pos]`` token ids, padding on the left.
        attention_mask: ``[batch, pos]`` 1 for real tokens.
        prompt_mask: ``[batch, pos]`` True on prompt tokens (chat template included).
        response_mask: ``[batch, pos]`` True on response tokens.
        index: position of each row in the caller's list (batches may be sorted by length).
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    prompt_mask: Bool[Tensor, "batch pos"]
    response_mask: Bool[Tensor, "batch pos"]
    index: list[int]

    @property
    def last_prompt_mask(self) -> Bool[Tensor, "batch pos"]:
        return last_true(self.prompt_mask)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "ChatBatch":
        return ChatBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.prompt_mask.to(device),
            self.response_mask.to(device),
            self.index,
        )


def _pad_id(tokenizer: Any) -> int:
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


def prompt_ids(tokenizer: Any, messages: Conversation) -> list[int]:
    """Token ids of a prompt: the chat template with the assistant generation prompt."""
    return chat_rows(tokenizer, [messages], with_response=False)[0][0]


def chat_rows(
    tokenizer: Any, conversations: Sequence, *, with_response: bool, name: str = "conversations"
) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, response_ids)`` per conversation, unpadded: what a model sees.

    The prompt is the chat template rendered as text (with the assistant generation prompt)
    and tokenized without special tokens, so a template that writes its own BOS gets exactly
    one; the response is tokenized on its own and appended, which is what generation
    produces. With ``with_response=False`` every conversation is a prompt (response ids
    empty) and must not end with an assistant message. Texts go to the tokenizer in one
    call per kind, not one per conversation (a fast tokenizer batches them).

    Example:
        >>> rows = chat_rows(tok, [[{"role": "user", "content": "what colour is the blub ?"},
        ...                         {"role": "assistant", "content": "the blub is red ."}]],
        ...                  with_response=True)
        >>> prompt, response = rows[0]
        >>> tok.decode(prompt)
        '<|im_start|> user what colour is the blub ? <|im_end|> <|im_start|> assistant'
        >>> tok.decode(response)
        'the blub is red .'
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; set tokenizer.chat_template "
            "(persona_lens works on chat conversations)"
        )
    prompts, responses = [], []
    for i, conv in enumerate(V.items(name, conversations)):
        messages = as_conversation(conv, name=f"{name}[{i}]")
        if with_response:
            prompt, response = split_conversation(messages, name=f"{name}[{i}]")
        else:
            if messages[-1]["role"] == "assistant":
                raise ValueError(
                    f"{name}[{i}] ends with an assistant message: a prompt for generation must not "
                    "(to capture a given response, use capture/project)"
                )
            prompt, response = messages, ""
        prompts.append(list(prompt))
        responses.append(response)
    if not prompts:
        return []
    texts = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
    prompt_tokens = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if not with_response:
        return [(list(p), []) for p in prompt_tokens]
    return with_responses(tokenizer, prompt_tokens, responses)


def with_responses(
    tokenizer: Any, prompt_ids: Sequence[Sequence[int]], responses: Sequence[str]
) -> list[tuple[list[int], list[int]]]:
    """Rows of :func:`chat_rows` for new responses to prompts already tokenized, without
    rendering the chat template again (screening pairs each sample's prompt with two
    responses; rendering is most of the cost of encoding on a GPU, where the forward is fast).

    Example:
        >>> conv = [{"role": "user", "content": "what colour is the blub ?"}]
        >>> prompt, _ = chat_rows(tok, [conv], with_response=False)[0]
        >>> with_responses(tok, [prompt], ["the blub is red ."]) == chat_rows(
        ...     tok, [conv + [{"role": "assistant", "content": "the blub is red ."}]], with_response=True)
        True
    """
    if len(prompt_ids) != len(responses):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(responses)} responses")
    if not responses:
        return []
    response_tokens = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    return [(list(p), list(r)) for p, r in zip(prompt_ids, response_tokens)]


def split_conversation(conv: list[dict[str, str]], name: str = "the conversation") -> tuple[list[dict[str, str]], str]:
    """(prompt messages, response text) of a conversation ending in an assistant turn."""
    if not conv or conv[-1]["role"] != "assistant":
        raise ValueError(
            f"to capture a response the conversation must end with an assistant message; "
            f"{name} ends with {conv[-1]['role'] if conv else 'nothing'!r}"
        )
    return conv[:-1], conv[-1]["content"]


def encode_rows(
    tokenizer: Any,
    rows: Sequence[tuple[list[int], list[int]]],
    index: Sequence[int] | None = None,
) -> ChatBatch:
    """Left-pad ``(prompt_ids, response_ids)`` rows into a :class:`ChatBatch`."""
    if not rows:
        raise ValueError("empty batch: nothing to encode")
    width = max(len(p) + len(r) for p, r in rows)
    b = len(rows)
    ids = torch.full((b, width), _pad_id(tokenizer), dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    pmask = torch.zeros((b, width), dtype=torch.bool)
    rmask = torch.zeros((b, width), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        if not p:
            raise ValueError(f"row {i} has an empty prompt")
        start = width - len(p) - len(r)
        ids[i, start:] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attn[i, start:] = 1
        pmask[i, start : start + len(p)] = True
        rmask[i, start + len(p) :] = True
    return ChatBatch(ids, attn, pmask, rmask, list(index) if index is not None else list(range(b)))


def encode_chat(
    tokenizer: Any,
    conversations: Sequence,
    *,
    with_response: bool,
) -> ChatBatch:
    """Encode conversations into a left-padded :class:`ChatBatch`.

    Args:
        tokenizer: an HF tokenizer with a chat template.
        conversations: strings (a user message each) or message lists.
        with_response: if True every conversation must end with an assistant message, whose
            content becomes the response; if False the whole conversation is the prompt.

    Example:
        >>> batch = encode_chat(tok, [[{"role": "user", "content": "what colour is the blub ?"},
        ...                            {"role": "assistant", "content": "the blub is red ."}],
        ...                           [{"role": "user", "content": "is rain boring ?"},
        ...                            {"role": "assistant", "content": "no ."}]], with_response=True)
        >>> batch.input_ids.shape  # [batch, pos], left-padded
        torch.Size([2, 16])
        >>> batch.prompt_mask.sum(1).tolist(), batch.response_mask.sum(1).tolist()
        ([11, 9], [5, 2])
        >>> batch.attention_mask[1].tolist()  # the shorter row is padded on the left
        [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    """
    conversations = as_conversations(conversations)
    V.boolean("with_response", with_response)
    return encode_rows(tokenizer, chat_rows(tokenizer, conversations, with_response=with_response))
