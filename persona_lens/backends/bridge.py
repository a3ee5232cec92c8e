"""TransformerLens 4.x ``TransformerBridge``."""

from __future__ import annotations

from typing import Any

from torch import nn

from persona_lens.backends.base import _HFStepping


def bridge_facts(bridge: nn.Module, tokenizer: Any = None) -> tuple[Any, int, int, str | None]:
    """(tokenizer, n_layers, d_model, name) of a bridge: what both of its views report."""
    cfg = bridge.cfg
    name = getattr(bridge, "persona_lens_name", None) or getattr(cfg, "model_name", None)
    return tokenizer or bridge.tokenizer, cfg.n_layers, cfg.d_model, name


class BridgeBackend(_HFStepping):
    """TransformerLens 4.x ``TransformerBridge`` (raw weights).

    Forward steps go through the wrapped HF model (``bridge.original_model``), whose modules
    the bridge replaced in place, so every TransformerLens hook point fires.
    """

    kind = "bridge"

    def __init__(self, bridge: nn.Module, tokenizer: Any = None):
        super().__init__(bridge, *bridge_facts(bridge, tokenizer))
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
