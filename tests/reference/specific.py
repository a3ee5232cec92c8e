"""A trait-specific projection from the plain ones, in numpy (independent of
``PersonaVector.without``).

A projection on a unit direction is linear in the direction, and the part of a direction
``v`` that others do not span, ``w = v - B x`` (``x`` the least-squares fit of ``v`` on the
others' columns ``B``), is a fixed combination of the directions. So the projection of any
activation (difference) ``delta`` on ``w / |w|`` follows from its projections on the unit
directions alone: ``w . delta = |v| p_v - sum_j x_j |b_j| p_j``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def specific_projection(direction, others: Sequence, plain, plain_others: Sequence):
    """The projection on ``direction`` without ``others`` (raw per-layer rows, any scale),
    from ``plain`` (the projections on ``direction``'s unit vector: a number or an array)
    and ``plain_others`` (the same on each other's unit vector, in order)."""
    v = np.asarray(direction, dtype=np.float64)
    basis = np.stack([np.asarray(o, dtype=np.float64) for o in others], axis=1)
    x, *_ = np.linalg.lstsq(basis, v, rcond=None)
    dot = np.linalg.norm(v) * np.asarray(plain, dtype=np.float64)
    for xj, col, p in zip(x, basis.T, plain_others):
        dot = dot - xj * np.linalg.norm(col) * np.asarray(p, dtype=np.float64)
    return dot / np.linalg.norm(v - basis @ x)
