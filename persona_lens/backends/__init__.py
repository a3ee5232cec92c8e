"""Adapters that give ``PersonaProbe`` one view of different models, one file each.

``base`` holds the contract; ``bridge`` the TransformerLens 4.x ``TransformerBridge``;
``hf_view`` the fast path (the bridge's HF modules without the bridge); ``hooked_transformer``
the TransformerLens 3.x ``HookedTransformer``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from persona_lens.backends.base import Backend
from persona_lens.backends.bridge import BridgeBackend
from persona_lens.backends.hf_view import FastPathUnavailable, HFBackend, _walk
from persona_lens.backends.hooked_transformer import HookedTransformerBackend

__all__ = [
    "Backend", "BridgeBackend", "FastPathUnavailable", "HFBackend", "HookedTransformerBackend",
    "make_backend", "_walk",
]


def make_backend(model: "nn.Module | Backend", tokenizer: Any = None) -> Backend:
    """Pick the backend for a TransformerLens model (4.x bridge or 3.x HookedTransformer)."""
    if isinstance(model, Backend):
        return model
    if hasattr(model, "original_model") and hasattr(model, "blocks"):
        return BridgeBackend(model, tokenizer)
    if type(model).__name__ == "HookedTransformer" or (
        hasattr(model, "cfg") and hasattr(model, "blocks") and hasattr(model, "hook_dict")
        and hasattr(model.blocks[0], "hook_resid_pre")
    ):
        return HookedTransformerBackend(model, tokenizer)
    from persona_lens.validate import InvalidArgumentType

    raise InvalidArgumentType(
        "model", model, "a TransformerLens TransformerBridge (see persona_lens.load_model) or HookedTransformer")
