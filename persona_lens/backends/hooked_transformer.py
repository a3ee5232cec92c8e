"""TransformerLens 3.x ``HookedTransformer`` (the last releases that have it)."""

from __future__ import annotations

from typing import Any

from torch import nn

from persona_lens.backends.base import Backend


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
