"""Adapters that give ``PersonaProbe`` one view of different hooked models.

A backend answers three questions about a model, and nothing more: where the residual
stream entering block ``L`` can be hooked, how to run one forward step (with or without a
KV cache), and which tokenizer and end-of-sequence ids belong to it. Hooks themselves are
added and removed only by ``PersonaProbe``.

Layer ``L < n_layers`` is the input of block ``L``; layer ``n_layers`` is the output of the
last block, before the final norm (shared/paper.md, section 2).
"""

from __future__ import annotations

import copy
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


def _hf_logits(hf: nn.Module, input_ids: Tensor, attention_mask: Tensor, cache: Any, last_only: bool) -> Tensor:
    """One forward step of an HF causal LM, as HF ``generate`` runs it."""
    out = hf(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_hf_position_ids(attention_mask, input_ids.shape[1]),
        past_key_values=cache,
        use_cache=cache is not None,
        logits_to_keep=1 if last_only else 0,
    )
    return out.logits


class _HFStepping(Backend):
    """Backends whose forward steps run an HF causal LM, ``self.hf``."""

    hf: nn.Module

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
        return _hf_logits(self.hf, input_ids, attention_mask, cache, last_only)


class BridgeBackend(_HFStepping):
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



class FastPathUnavailable(RuntimeError):
    """The bridge's HF model cannot be unwrapped into a plain HF model."""


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# Hooks that the frameworks add to their own modules (transformers' output recording,
# TransformerLens's internal wiring) are not a user's; hooks on TransformerLens hook points
# always are.
_FRAMEWORK_PACKAGES = ("transformers", "transformer_lens")


def _walk(root: nn.Module) -> list[nn.Module]:
    """``list(root.modules())`` without building every module's dotted name: the probe walks
    the bridge's tree (thousands of modules) before each operation, and the names were most
    of that walk's cost."""
    out: list[nn.Module] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    return out


def _defined_in_framework(fn: Any) -> bool:
    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    module = getattr(fn, "__module__", None) or ""
    return module.split(".")[0] in _FRAMEWORK_PACKAGES


class HFBackend(_HFStepping):
    """The HF model inside a ``TransformerBridge``, without the bridge, with SDPA attention.

    ``TransformerBridge`` replaces HF submodules in place by bridge components that wrap
    them (``component.original_component``) and forces eager attention. This backend builds
    an unwrapped view of ``bridge.original_model``: every module that has a bridge component
    below it is shallow-cloned with a fresh ``_modules`` dict and empty hook dicts, and
    every bridge component is replaced by its (unwrapped) original HF module. Modules with
    no bridge component below them (linear layers, norms, embeddings) are the very same
    objects, and cloned modules share their parameter and buffer dicts with the originals,
    so the view costs no memory and always sees the bridge's current weights. Modules that
    hold a config get a copy with ``_attn_implementation = "sdpa"`` (when the model class
    supports it); the bridge's own config is not touched.

    Only residual-stream sites exist here: layer ``L < n_layers`` is a forward pre-hook on
    decoder layer ``L`` (its input), layer ``n_layers`` a forward hook on the last decoder
    layer (its output). TransformerLens hook points do not fire on this path.

    The view is a snapshot of the bridge's module tree: :meth:`scan` reports when the tree
    (or a module's training mode or gradient checkpointing flag) has changed since, and
    :meth:`rebuild` makes a fresh view.
    """

    kind = "hf"

    def __init__(self, bridge: nn.Module, tokenizer: Any = None):
        cfg = bridge.cfg
        name = getattr(bridge, "persona_lens_name", None) or getattr(cfg, "model_name", None)
        super().__init__(bridge, tokenizer or bridge.tokenizer, cfg.n_layers, cfg.d_model, name)
        self.bridge = bridge
        self.rebuild()

    # -- the unwrapped view ---------------------------------------------------------------
    def rebuild(self) -> None:
        """(Re)build the unwrapped view from the bridge's current module tree."""
        from transformer_lens.hook_points import HookPoint
        from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

        self._hook_point_type = HookPoint

        root = self.bridge.original_model
        config = root.config
        fast_config = copy.deepcopy(config)
        if getattr(type(root), "_supports_sdpa", False):
            fast_config._attn_implementation = "sdpa"
        configs = {id(config): fast_config}
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None:
                configs[id(sub)] = getattr(fast_config, key)
        memo: dict[int, nn.Module] = {}
        shared: dict[int, nn.Module] = {}

        def unwrap(module: nn.Module) -> nn.Module:
            while isinstance(module, GeneralizedComponent):
                inner = module._modules.get("_original_component")
                if inner is None:
                    raise FastPathUnavailable(f"{type(module).__name__} wraps no HF module")
                module = inner
            if id(module) in memo:
                return memo[id(module)]
            children = {n: None if c is None else unwrap(c) for n, c in module._modules.items()}
            holds_config = id(module.__dict__.get("config")) in configs
            if not holds_config and all(children[n] is c for n, c in module._modules.items()):
                memo[id(module)] = shared[id(module)] = module
                return module
            if "forward" in module.__dict__:
                # An instance-level forward (e.g. an accelerate hook) is bound to the
                # original module and would run the bridge's children.
                raise FastPathUnavailable(f"{type(module).__name__} has an instance-level forward")
            clone = type(module).__new__(type(module))
            clone.__dict__.update(module.__dict__)
            for key, value in module.__dict__.items():
                if "hooks" in key and isinstance(value, dict):
                    clone.__dict__[key] = type(value)()
            clone.__dict__["_modules"] = children
            # transformers installs its output-recording hooks lazily, per module: let it
            # install them on the clones too.
            clone.__dict__.pop("_output_capturing_hooks_installed", None)
            if holds_config:
                clone.__dict__["config"] = configs[id(module.__dict__["config"])]
            memo[id(module)] = clone
            return clone

        hf = unwrap(root)
        layers = [unwrap(self.bridge.blocks[i]) for i in range(self.n_layers)]
        self.hf = hf
        self.layers = layers
        self._shared = shared
        self._signature = self._tree_signature()

    def _tree_signature(self) -> tuple:
        return tuple(
            (id(m), m.training, m.__dict__.get("gradient_checkpointing"))
            for m in _walk(self.bridge.original_model)
        )

    def scan(self, own_hook_ids: set[int] = frozenset()) -> tuple[bool, bool]:
        """``(stale, foreign_hooks)`` in one walk over the bridge's modules.

        ``stale``: the bridge's module tree, a module's training mode or its gradient
        checkpointing flag changed since the view was built. ``foreign_hooks``: a module the
        view does not run (a bridge component or hook point, or an HF module the view
        replaced by a clone) has a hook that would fire only on the bridge: any hook on a
        TransformerLens hook point whose id is not in ``own_hook_ids``, or a hook defined
        outside transformers and TransformerLens on another such module.
        """
        stale = foreign = False
        modules = _walk(self.bridge.original_model)
        sig = self._signature
        if len(sig) != len(modules):
            stale = True
        for i, m in enumerate(modules):
            if not stale and sig[i] != (id(m), m.training, m.__dict__.get("gradient_checkpointing")):
                stale = True
            if not foreign and id(m) not in self._shared:
                point = isinstance(m, self._hook_point_type)
                for key in _HOOK_DICTS:
                    hooks = m.__dict__.get(key)
                    if hooks and any(
                        k not in own_hook_ids and (point or not _defined_in_framework(fn))
                        for k, fn in hooks.items()
                    ):
                        foreign = True
                        break
            if stale and foreign:
                break
        return stale, foreign

    # -- Backend --------------------------------------------------------------------------
    # device and dtype come from Backend: the view shares every parameter with the bridge.
    @property
    def attn_implementation(self) -> str:
        return self.hf.config._attn_implementation

    def resid_site(self, layer: int) -> tuple[nn.Module, str]:
        if layer < self.n_layers:
            return self.layers[layer], "input"
        return self.layers[self.n_layers - 1], "output"

    def hook_dict(self) -> dict[str, nn.Module]:
        """None: TransformerLens hook points live on the bridge (``BridgeBackend``)."""
        return {}



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
