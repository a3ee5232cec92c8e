"""Interventions as values: what to do to the residual stream, where, and how much.

A ``Steer`` or ``Ablate`` is a small frozen value (layer, direction, coefficient, position
kinds). ``PersonaProbe.steer`` / ``ablate`` build them from a :class:`PersonaVector` and keep
them active for a ``with`` block; ``probe.interventions`` lists the active ones in the order
they run. How they reach a model is the backend's side of the contract
(``persona_lens.backends.base.Backend.takes``):

- a local model (``TransformerBridge``, its fast HF view, ``HookedTransformer``) takes them as
  hooks: the probe attaches ``intervention.apply`` at the residual-stream site of its layer;
- an engine that exposes no modules to hook (vLLM) takes them as declarative specs,
  ``intervention.spec()``: plain data an engine can apply per request.

``Capture`` and ``Project`` are the reading side: what the probe records at a layer (masked
float32 sums for the reductions; per-position projections on a unit direction).

Position kinds: ``"all"``, ``"prompt"``, ``"response"``, ``"last_prompt"``; an intervention
acts on the union of its kinds (the released code's "response" mode is
``("response", "last_prompt")``).

Example:
    >>> import torch
    >>> from persona_lens.interventions import Steer
    >>> s = Steer(layer=2, direction=torch.ones(4), coef=0.5, positions=("response",))
    >>> s.apply(torch.zeros(1, 3, 4), {"response": torch.tensor([[False, True, True]])})[0, :, 0]
    tensor([0.0000, 0.5000, 0.5000])
    >>> s.spec()["op"], s.spec()["positions"]
    ('add', ['response'])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from persona_lens import ops
from persona_lens import validate as V

#: kind -> ``[batch, pos]`` bool mask. Left unparametrised on purpose: the probe hands a lazy
#: mapping whose items are cut from the forward's positions only when asked for, and a
#: runtime type checker sampling an item would trigger that work (or its error).
Masks = Mapping


def position_kinds(positions: str | Sequence) -> tuple[str, ...]:
    """Normalise one position kind or several into a sorted tuple, checking each.

    Example:
        >>> position_kinds("response"), position_kinds(["last_prompt", "response"])
        (('response',), ('last_prompt', 'response'))
    """
    kinds = (positions,) if isinstance(positions, str) else tuple(
        V.items("positions", positions, what="a position kind or a list of them"))
    if not kinds:
        raise ValueError("positions is empty; give 'all', 'prompt', 'response' or 'last_prompt'")
    for k in kinds:
        ops.check_position_kind(k)
    return ("all",) if "all" in kinds else tuple(sorted(set(kinds)))


def _check_direction(name: str, t: object) -> None:
    if not isinstance(t, Tensor) or t.ndim != 1 or t.is_complex() or t.dtype == torch.bool:
        raise V.InvalidArgumentType(name, t, "a 1-D [d_model] tensor of real numbers")
    if not bool(torch.isfinite(t).all()):
        raise V.InvalidArgument(name, t, "finite (no NaN or inf)")


def union_mask(kinds: tuple[str, ...], masks: Masks) -> Bool[Tensor, "batch pos"] | None:
    """The positions an intervention acts on (``None``: every position)."""
    if kinds == ("all",):
        return None
    out = masks[kinds[0]]
    for k in kinds[1:]:
        out = out | masks[k]
    return out


@dataclass(frozen=True, eq=False)
class Steer:
    """Add ``coef * direction`` to the residual stream entering block ``layer``."""

    layer: int
    direction: Float[Tensor, " d_model"]
    coef: float
    positions: "str | tuple[str, ...]" = ("all",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", V.integer("layer", self.layer, min=0))
        _check_direction("direction", self.direction)
        object.__setattr__(self, "coef", V.number("coef", self.coef))
        object.__setattr__(self, "positions", position_kinds(self.positions))

    def apply(self, h: Float[Tensor, "batch pos d_model"], masks: Masks) -> Float[Tensor, "batch pos d_model"]:
        return ops.add_direction(h, self.direction, self.coef, union_mask(self.positions, masks))

    def spec(self) -> dict:
        return {"op": "add", "layer": self.layer, "coef": self.coef, "positions": list(self.positions),
                "vector": self.direction.float().tolist()}


@dataclass(frozen=True, eq=False)
class Ablate:
    """Project ``unit`` out of the residual stream entering block ``layer``: ``h - (h.u)u``."""

    layer: int
    unit: Float[Tensor, " d_model"]
    positions: "str | tuple[str, ...]" = ("all",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", V.integer("layer", self.layer, min=0))
        _check_direction("unit", self.unit)
        object.__setattr__(self, "positions", position_kinds(self.positions))

    def apply(self, h: Float[Tensor, "batch pos d_model"], masks: Masks) -> Float[Tensor, "batch pos d_model"]:
        return ops.ablate_direction(h, self.unit, union_mask(self.positions, masks))

    def spec(self) -> dict:
        return {"op": "ablate", "layer": self.layer, "positions": list(self.positions),
                "vector": self.unit.float().tolist()}


@dataclass(frozen=True, eq=False)
class Capture:
    """Record per-row float32 sums of the residual stream at ``layer`` over each reduction's
    positions (``response_mean``: response tokens; ``prompt_mean``; ``last_prompt``)."""

    layer: int
    reductions: tuple[str, ...] = ("response_mean",)

    KIND = {"response_mean": "response", "prompt_mean": "prompt", "last_prompt": "last_prompt"}

    def __post_init__(self) -> None:
        object.__setattr__(self, "reductions", tuple(ops.check_reduction(r) for r in self.reductions))

    def read(self, h: Float[Tensor, "batch pos d_model"], masks: Masks) -> dict[str, Float[Tensor, "batch d_model"]]:
        return {r: ops.masked_sum(h, masks[self.KIND[r]]) for r in self.reductions}

    def spec(self) -> dict:
        return {"op": "capture", "layer": self.layer, "reductions": list(self.reductions)}


@dataclass(frozen=True, eq=False)
class Project:
    """Record every position's projection on ``unit`` at ``layer`` (float32)."""

    layer: int
    unit: Float[Tensor, " d_model"]

    def read(self, h: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos"]:
        return ops.project(h, self.unit)

    def spec(self) -> dict:
        return {"op": "project", "layer": self.layer, "vector": self.unit.float().tolist()}


#: What ``probe.interventions`` holds: the edits that change activations.
Intervention = Union[Steer, Ablate]

__all__ = ["Steer", "Ablate", "Capture", "Project", "Intervention", "position_kinds", "union_mask"]
