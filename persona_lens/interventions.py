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

Positions: a value's ``positions`` is a mode (``"all"``, ``"prompt"``, ``"response"``,
``"response_only"``; :data:`persona_lens.ops.POSITION_MODES`) or a list of position kinds
(``"all"``, ``"prompt"``, ``"last_prompt"``, ``"answer"``); either is kept as the sorted
tuple of kinds it covers, and an intervention acts on their union. ``"response"`` is the
paper's released mode, ``("answer", "last_prompt")``: the last prompt token and every answer
token.

Example:
    >>> import torch
    >>> from persona_lens.interventions import Steer
    >>> s = Steer(layer=2, direction=torch.ones(4), coef=0.5, positions="response_only")
    >>> s.apply(torch.zeros(1, 3, 4), {"answer": torch.tensor([[False, True, True]])})[0, :, 0]
    tensor([0.0000, 0.5000, 0.5000])
    >>> s.spec()["op"], s.spec()["positions"]
    ('add', ['answer'])
    >>> Steer(layer=2, direction=torch.ones(4), coef=0.5, positions="response").positions
    ('answer', 'last_prompt')
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
    """The sorted tuple of position kinds a mode (a string) or a list of kinds covers.

    Example:
        >>> position_kinds("response"), position_kinds("response_only"), position_kinds(["last_prompt", "answer"])
        (('answer', 'last_prompt'), ('answer',), ('answer', 'last_prompt'))
    """
    if isinstance(positions, str):
        if positions in ops.POSITION_MODES:
            return ops.POSITION_MODES[positions]
        return (ops.check_position_kind(positions),)
    kinds = tuple(V.items("positions", positions, what="a position mode or a list of position kinds"))
    if not kinds:
        raise ValueError("positions is empty; give a mode ('all', 'prompt', 'response', 'response_only') "
                         "or position kinds ('all', 'prompt', 'last_prompt', 'answer')")
    for k in kinds:
        ops.check_position_kind(k)
    return ("all",) if "all" in kinds else tuple(sorted(set(kinds)))


def mode_name(kinds: tuple[str, ...]) -> str:
    """The mode a tuple of kinds is (``"answer+last_prompt"`` style for a union no mode names).

    Example:
        >>> mode_name(("answer", "last_prompt")), mode_name(("prompt", "last_prompt"))
        ('response', 'last_prompt+prompt')
    """
    kinds = position_kinds(kinds)
    return next((m for m, k in ops.POSITION_MODES.items() if k == kinds), "+".join(kinds))


def steering_mode(positions: object, include_last_prompt: object = None, *, stacklevel: int = 3) -> str:
    """Check a steering ``positions=`` mode, and fold in the deprecated ``include_last_prompt``.

    ``include_last_prompt`` predates the modes: ``positions="response"`` once left the last
    prompt token out, and the flag put it back. An explicit flag still means what it meant
    (``True`` with ``"response"`` or ``"response_only"``: ``"response"``; ``False`` with
    ``"response"``: ``"response_only"``), with a ``DeprecationWarning`` naming the mode to use.

    Example:
        >>> steering_mode("response")
        'response'
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     steering_mode("response", include_last_prompt=False)
        'response_only'
        >>> caught[0].category.__name__
        'DeprecationWarning'
    """
    mode = ops.check_position_mode(positions, allowed=ops.STEERING_MODES)
    if include_last_prompt is None:
        return mode
    flag = V.boolean("include_last_prompt", include_last_prompt)
    if mode in ("response", "response_only"):
        mode = "response" if flag else "response_only"
    import warnings

    warnings.warn(
        "include_last_prompt is deprecated: positions='response' now steers the last prompt token and "
        "every generated token (the paper's released mode), positions='response_only' the generated tokens "
        f"alone; use positions={mode!r} and drop include_last_prompt",
        DeprecationWarning, stacklevel=stacklevel)
    return mode


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

    KIND = {"response_mean": "answer", "prompt_mean": "prompt", "last_prompt": "last_prompt"}

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

__all__ = ["Steer", "Ablate", "Capture", "Project", "Intervention", "position_kinds", "mode_name", "steering_mode",
           "union_mask"]
