"""Where prompts and responses are, for the forward a hook is in.

Positions are data: a forward carries per-row masks of ``prompt``, ``answer`` (the
response's tokens) and ``last_prompt`` positions (the kinds of :mod:`persona_lens.ops`) over the whole sequence, plus the column window the current forward
sees (a KV-cached decode step sees one new column per row, a response position). The probe
sets them for its own forwards; ``PersonaProbe.batch`` sets them for a forward someone else
runs (a training step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from jaxtyping import Bool
from torch import Tensor

from persona_lens import ops
from persona_lens import validate as V
from persona_lens.chat import ChatBatch


@dataclass
class Positions:
    """Position masks of the whole sequence, and the column window the current forward sees.

    ``total``: the columns generation may reach. Columns past the masks' width are response
    positions; the masks grow to cover them only when a forward gets there, so memory
    follows what is generated, not ``max_new_tokens``.
    """

    masks: dict[str, Bool[Tensor, "batch pos"]]
    start: int = 0
    stop: int = 0
    total: int | None = None

    #: What a column appended by generation is, per kind.
    _GENERATED = {"all": True, "prompt": False, "answer": True, "last_prompt": False}

    def _cover(self, stop: int) -> None:
        width = self.masks["all"].shape[1]
        if stop <= width:
            return
        new_width = max(stop, min(2 * width, self.total if self.total is not None else stop))
        for kind, m in self.masks.items():
            extra = m.new_full((m.shape[0], new_width - width), self._GENERATED.get(kind, False))
            self.masks[kind] = torch.cat([m, extra], dim=1)

    def columns(self, kind: str) -> Bool[Tensor, "batch pos"]:
        """The ``kind`` mask over the columns the current forward sees."""
        self._cover(self.stop)
        return self.masks[kind][:, self.start : self.stop]

    def window(self, h: Tensor) -> dict[str, Bool[Tensor, "batch pos"]]:
        """Every mask cut to the columns of ``h``, checked against its shape."""
        return {kind: self.mask(kind, h) for kind in self.masks}

    def mask(self, kind: str, h: Tensor) -> Bool[Tensor, "batch pos"]:
        m = self.columns(kind)
        if m.shape != h.shape[:2]:
            raise RuntimeError(
                f"a hook saw activations for {tuple(h.shape[:2])} (batch, positions) but the "
                f"probe expected {tuple(m.shape)}: a forward the probe did not run needs "
                "`with probe.batch(prompt_mask, response_mask):` with masks of the batch it runs"
            )
        if m.device != h.device:
            m = self.masks[kind] = self.masks[kind].to(h.device)
            m = m[:, self.start : self.stop]
        return m


def position_masks(
    prompt: Bool[Tensor, "batch pos"], response: Bool[Tensor, "batch pos"], total: int | None = None
) -> dict[str, Tensor]:
    """Masks for a batch, extended with response columns up to ``total`` (for generation)."""
    prompt, response = prompt.bool(), response.bool()
    if prompt.shape != response.shape or prompt.ndim != 2:
        raise ValueError(
            f"prompt and response masks must both be [batch, pos]; got {tuple(prompt.shape)} "
            f"and {tuple(response.shape)}"
        )
    if total is not None and total > prompt.shape[1]:
        extra = total - prompt.shape[1]
        prompt = torch.cat([prompt, prompt.new_zeros(prompt.shape[0], extra)], dim=1)
        response = torch.cat([response, response.new_ones(response.shape[0], extra)], dim=1)
    return {
        "all": torch.ones_like(prompt),
        "prompt": prompt,
        "answer": response,
        "last_prompt": ops.last_true(prompt),
    }


def batch_positions(batch: ChatBatch, total: int | None = None) -> Positions:
    """Positions of a batch the probe encoded (``total``: the columns generation may reach)."""
    return Positions(position_masks(batch.prompt_mask, batch.response_mask), total=total)


def caller_positions(prompt_mask: Any, response_mask: Any) -> Positions:
    """Positions of a batch someone else runs: masks as tensors, or one object carrying them
    (a :class:`ChatBatch`, or a mapping with ``prompt_mask`` and ``response_mask``)."""
    if response_mask is None:
        holder = prompt_mask
        get = holder.get if isinstance(holder, Mapping) else lambda k: getattr(holder, k, None)
        prompt_mask, response_mask = get("prompt_mask"), get("response_mask")
        if prompt_mask is None or response_mask is None:
            raise TypeError(
                "probe.batch() takes (prompt_mask, response_mask), or one object with "
                f"prompt_mask and response_mask (a ChatBatch or a collated dict); got {type(holder).__name__}"
            )
    tensors = []
    for name, m in (("prompt_mask", prompt_mask), ("response_mask", response_mask)):
        try:
            t = torch.as_tensor(m)
        except (TypeError, ValueError, RuntimeError):
            raise V.InvalidArgumentType(name, m, "a [batch, pos] boolean tensor") from None
        if t.is_complex() or t.is_floating_point() and not bool(((t == 0) | (t == 1)).all()):
            raise V.InvalidArgument(name, m, "a [batch, pos] tensor of booleans (or 0/1)")
        tensors.append(t)
    masks = position_masks(*tensors)
    return Positions(masks, 0, masks["all"].shape[1])
