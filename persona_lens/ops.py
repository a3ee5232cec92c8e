"""Small pure functions that hooks are made of.

Every function here takes and returns tensors; none touches a model. ``PersonaProbe`` is
the only place that attaches them to hook points, so these can be tested (and reasoned
about) as plain arithmetic.

Shapes: ``h`` is a residual-stream activation ``[batch, pos, d_model]``; masks are
``[batch, pos]`` booleans saying which positions a hook acts on.

Two words for positions, kept apart on purpose:

- a position *kind* is one mask a forward carries (:data:`POSITION_KINDS`): ``all``,
  ``prompt``, ``last_prompt`` and ``answer`` (the response's tokens: generated ones while
  generating, teacher-forced ones in capture and training). Captures reduce over kinds
  (``response_mean`` is the mean over ``answer``).
- a position *mode* is what a user asks for with ``positions=`` (:data:`POSITION_MODES`):
  steering, ablation, the store's ``Steering``, the sweep, finetuning and the command line
  all take the same modes. A mode is a union of kinds. ``"response"`` is the paper's
  released mode: the last prompt token and every answer token (the release adds to the last
  position of every forward, which is the last prompt token in the prefill and the new token
  in each decode step); ``"response_only"`` leaves the last prompt token out.

Example:
    >>> POSITION_MODES["response"], POSITION_MODES["response_only"]
    (('answer', 'last_prompt'), ('answer',))
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from persona_lens import validate as V

#: The masks every forward carries (per row, over the columns it sees).
POSITION_KINDS = ("all", "prompt", "last_prompt", "answer")
#: What ``positions=`` takes, and the kinds each mode covers (sorted).
POSITION_MODES: dict[str, tuple[str, ...]] = {
    "all": ("all",),
    "prompt": ("prompt",),
    "response": ("answer", "last_prompt"),  # the paper's released "response" mode
    "response_only": ("answer",),
    "last_prompt": ("last_prompt",),
}
#: The modes steering takes (the last prompt token alone is not a steering mode).
STEERING_MODES = ("all", "prompt", "response", "response_only")
REDUCTIONS = ("response_mean", "prompt_mean", "last_prompt")


def check_position_kind(kind: Any, name: str = "positions") -> str:
    """Return ``kind`` if it is a known position type, else raise a ``ValueError`` naming
    the argument ``name``."""
    if not isinstance(kind, str) or kind not in POSITION_KINDS:
        cls = V.InvalidArgument if isinstance(kind, str) else V.InvalidArgumentType
        raise cls(name, kind, f"one of {', '.join(map(repr, POSITION_KINDS))}", ": unknown position type")
    return kind


def check_position_mode(mode: Any, name: str = "positions", allowed: tuple[str, ...] | None = None) -> str:
    """Return ``mode`` if it is a position mode (among ``allowed``, default every mode), else
    raise a ``ValueError`` naming the argument ``name`` and the modes it may be.

    Example:
        >>> check_position_mode("response_only")
        'response_only'
        >>> check_position_mode("answer")
        Traceback (most recent call last):
        ...
        persona_lens.validate.InvalidArgument: positions must be one of 'all', 'prompt', 'response', 'response_only', 'last_prompt'...
    """
    allowed = tuple(POSITION_MODES) if allowed is None else allowed
    if not isinstance(mode, str) or mode not in allowed:
        cls = V.InvalidArgument if isinstance(mode, str) else V.InvalidArgumentType
        raise cls(name, mode, f"one of {', '.join(map(repr, allowed))}",
                  ": unknown position mode ('response' is the last prompt token and every answer token, "
                  "as the paper's code steers; 'response_only' the answer tokens alone)")
    return mode


def check_reduction(name: Any, argument: str = "reductions") -> str:
    """Return ``name`` if it is a known reduction, else raise a ``ValueError`` naming the
    argument."""
    if not isinstance(name, str) or name not in REDUCTIONS:
        cls = V.InvalidArgument if isinstance(name, str) else V.InvalidArgumentType
        raise cls(argument, name, f"one of {', '.join(map(repr, REDUCTIONS))}", ": unknown reduction")
    return name


def add_direction(
    h: Float[Tensor, "batch pos d_model"],
    direction: Float[Tensor, " d_model"],
    coef: float,
    mask: Bool[Tensor, "batch pos"] | None,
) -> Float[Tensor, "batch pos d_model"]:
    """``h + coef * direction`` on the masked positions (all positions if ``mask`` is None)."""
    delta = (coef * direction).to(h.dtype)
    if mask is None:
        return h + delta
    return h + mask.unsqueeze(-1).to(h.dtype) * delta


def ablate_direction(
    h: Float[Tensor, "batch pos d_model"],
    unit: Float[Tensor, " d_model"],
    mask: Bool[Tensor, "batch pos"] | None,
) -> Float[Tensor, "batch pos d_model"]:
    """Directional ablation ``h - (h . u) u`` on the masked positions.

    The projection is computed in float32: in bf16 the dot product over thousands of
    dimensions loses enough precision to leave a visible component along ``u``.
    """
    u = unit.to(device=h.device, dtype=torch.float32)
    coeff = h.float() @ u
    if mask is not None:
        coeff = coeff * mask.to(coeff.dtype)
    return (h.float() - coeff.unsqueeze(-1) * u).to(h.dtype)


def project(
    h: Float[Tensor, "batch pos d_model"], unit: Float[Tensor, " d_model"]
) -> Float[Tensor, "batch pos"]:
    """Scalar projection of every position onto a unit direction, in float32."""
    return h.float() @ unit.to(device=h.device, dtype=torch.float32)


def masked_sum(
    h: Float[Tensor, "batch pos d_model"], mask: Bool[Tensor, "batch pos"]
) -> Float[Tensor, "batch d_model"]:
    """Per-row sum of ``h`` over masked positions, accumulated in float32."""
    return torch.einsum("bp,bpd->bd", mask.float(), h.float())


def last_true(mask: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """Mask with only the last True position of each row kept (all False for empty rows)."""
    pos = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, pos, -1).max(dim=1).values
    return (pos.unsqueeze(0) == last.unsqueeze(1)) & mask
