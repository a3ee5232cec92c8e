"""Small pure functions that hooks are made of.

Every function here takes and returns tensors; none touches a model. ``PersonaProbe`` is
the only place that attaches them to hook points, so these can be tested (and reasoned
about) as plain arithmetic.

Shapes: ``h`` is a residual-stream activation ``[batch, pos, d_model]``; masks are
``[batch, pos]`` booleans saying which positions a hook acts on.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from persona_lens import validate as V

POSITION_KINDS = ("all", "prompt", "response", "last_prompt")
REDUCTIONS = ("response_mean", "prompt_mean", "last_prompt")


def check_position_kind(kind: Any, name: str = "positions") -> str:
    """Return ``kind`` if it is a known position type, else raise a ``ValueError`` naming
    the argument ``name``."""
    if not isinstance(kind, str) or kind not in POSITION_KINDS:
        cls = V.InvalidArgument if isinstance(kind, str) else V.InvalidArgumentType
        raise cls(name, kind, f"one of {', '.join(map(repr, POSITION_KINDS))}", ": unknown position type")
    return kind


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
