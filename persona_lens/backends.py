"""Adapters that give ``PersonaProbe`` one view of different hooked models.

A backend answers three questions about a model, and nothing more: where the residual
stream entering block ``L`` can be hooked, how to run one forward step (with or without a
KV cache), and which tokenizer and end-of-sequence ids belong to it. Hooks themselves are
added and removed only by ``PersonaProbe``.

Layer ``L < n_layers`` is the input of block ``L``; layer ``n_layers`` is the output of the
last block, before the final norm (shared/paper.md, section 2).
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import Tensor, nn


class Backend:
    """Base: what ``PersonaProbe`` needs from a model."""

    kind: str = "abstract"

    def __init__(self, model: nn.Module, tokenizer: Any, n_layers: int, d_model: int, name: str | None):
        if tokenizer is None:
            raise ValueError("the model has no tokenizer; pass PersonaProbe(model, tokenizer=...)")
        self.model = model
        self.tokenizer = tokenizer
        self.n_layers = int(n_layers)
        self.d_model = int(d_model)
        self.model_name = name

    # -- where to hook --------------------------------------------------------------------
    def resid_site(self, layer: int) -> tuple[nn.Module, str]:
        """``(module, how)`` for the residual stream at ``layer``.

        ``how`` is ``"output"`` (a forward hook may replace the module's output) or
        ``"input"`` (a forward pre-hook may replace its first argument).
        """
        raise NotImplementedError

    def hook_dict(self) -> dict[str, nn.Module]:
        """Named hook points a user may hook (TransformerLens names)."""
        raise NotImplementedError

    def hook_point(self, name: str) -> nn.Module:
        """The hook point called ``name``, or a ``KeyError`` that suggests close names."""
        points = self.hook_dict()
        if name not in points:
            close = difflib.get_close_matches(name, list(points), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"unknown hook name {name!r} for this {self.kind} model{hint}")
        return points[name]

    # -- how to run -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def eos_token_ids(self) -> set[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def new_cache(self, batch_size: int) -> Any:
        raise NotImplementedError

    def logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        cache: Any | None,
        last_only: bool,
    ) -> Tensor:
        """Run one step. ``input_ids`` are the new tokens (all tokens when ``cache`` is None);
        ``attention_mask`` covers cached and new tokens. Returns ``[batch, pos, vocab]``
        logits (only the last position if ``last_only``)."""
        raise NotImplementedError


def _hf_position_ids(attention_mask: Tensor, new: int) -> Tensor:
    # Left padding: a row's first real token is position 0, as in HF generate.
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -new:]


class BridgeBackend(Backend):
    """TransformerLens 4.x ``TransformerBridge`` (raw weights).

    Forward steps go through the wrapped HF model (``bridge.original_model``), whose modules
    the bridge replaced in place, so every TransformerLens hook point fires.
    """

    kind = "bridge"

    def __init__(self, bridge: nn.Module, tokenizer: Any = None):
        cfg = bridge.cfg
        name = getattr(bridge, "persona_lens_name", None) or getattr(cfg, "model_name", None)
        super().__init__(bridge, tokenizer or bridge.tokenizer, cfg.n_layers, cfg.d_model, name)
        self.hf = bridge.original_model

    def resid_site(self, layer: int) -> tuple[nn.Module, str]:
        if layer < self.n_layers:
            return self.model.blocks[layer].hook_in, "output"
        return self.model.blocks[self.n_layers - 1].hook_out, "output"

    def hook_dict(self) -> dict[str, nn.Module]:
        points = dict(self.model.hook_dict)
        # The residual-stream aliases users know from HookedTransformer.
        for i in range(self.n_layers):
            points.setdefault(f"blocks.{i}.hook_resid_pre", self.model.blocks[i].hook_in)
            points.setdefault(f"blocks.{i}.hook_resid_post", self.model.blocks[i].hook_out)
        return points

    def eos_token_ids(self) -> set[int]:
        ids = super().eos_token_ids()
        gen_eos = getattr(getattr(self.hf, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
        return ids

    def new_cache(self, batch_size: int) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.hf.config)

    def logits(self, input_ids, attention_mask, cache, last_only):
        out = self.hf(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=_hf_position_ids(attention_mask, input_ids.shape[1]),
            past_key_values=cache,
            use_cache=cache is not None,
            logits_to_keep=1 if last_only else 0,
        )
        return out.logits


class HookedTransformerBackend(Backend):
    """TransformerLens 3.x ``HookedTransformer``."""

    kind = "hooked_transformer"

    def __init__(self, model: nn.Module, tokenizer: Any = None):
        cfg = model.cfg
        super().__init__(model, tokenizer or model.tokenizer, cfg.n_layers, cfg.d_model, cfg.model_name)

    def resid_site(self, layer: int) -> tuple[nn.Module, str]:
        if layer < self.n_layers:
            return self.model.blocks[layer].hook_resid_pre, "output"
        return self.model.blocks[self.n_layers - 1].hook_resid_post, "output"

    def hook_dict(self) -> dict[str, nn.Module]:
        return dict(self.model.hook_dict)

    def new_cache(self, batch_size: int) -> Any:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        return TransformerLensKeyValueCache.init_cache(self.model.cfg, self.model.cfg.device, batch_size)

    def logits(self, input_ids, attention_mask, cache, last_only):
        # With a cache, HookedTransformer appends the new tokens' mask to the cached one.
        mask = attention_mask[:, -input_ids.shape[1] :] if cache is not None else attention_mask
        logits = self.model(input_ids, attention_mask=mask, past_kv_cache=cache, return_type="logits")
        return logits[:, -1:] if last_only else logits


def make_backend(model: nn.Module, tokenizer: Any = None) -> Backend:
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
    raise TypeError(
        f"PersonaProbe needs a TransformerLens TransformerBridge (see persona_lens.load_model) "
        f"or HookedTransformer, got {type(model).__name__}"
    )
