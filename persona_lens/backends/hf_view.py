"""The fast path: a ``TransformerBridge``'s HF model without the bridge, with SDPA attention."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from persona_lens.backends.base import _HFStepping
from persona_lens.backends.bridge import bridge_facts


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


_GUARDED: dict[type, type] = {}


def _guarded(cls: type) -> type:
    """``cls`` with a forward that first lets the view check itself (``_before_forward``)."""
    if cls not in _GUARDED:

        def forward(self, *args, **kwargs):
            self.__dict__["_persona_lens_view"]._before_forward()
            return super(guarded, self).forward(*args, **kwargs)

        guarded = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
        _GUARDED[cls] = guarded
    return _GUARDED[cls]


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
    (or a module's gradient checkpointing flag) has changed since, and :meth:`rebuild` makes
    a fresh view (``rebuilds`` counts them). Training mode is not part of the snapshot: a
    clone takes its original's mode before every forward of the view, so a training loop that
    switches ``train()`` / ``eval()`` every step never rebuilds it.

    The view can run forwards that the probe does not drive (a training step on
    ``probe.hf_model``); such a forward first checks that the bridge's tree has not changed
    since the view was built (adapters added by peft, say) and raises if it has, since the
    view would silently run without them.
    """

    kind = "hf"

    def __init__(self, bridge: nn.Module, tokenizer: Any = None):
        super().__init__(bridge, *bridge_facts(bridge, tokenizer))
        self.bridge = bridge
        self.rebuilds = -1  # the first build is not a rebuild
        self._in_step = False
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
        if hf is root:
            raise FastPathUnavailable("the HF model holds no config to switch to SDPA")
        layers = [unwrap(self.bridge.blocks[i]) for i in range(self.n_layers)]
        originals = {id(m): m for m in _walk(root)}
        originals.update((id(b), b) for b in (self.bridge.blocks[i] for i in range(self.n_layers)))
        # Clones keyed by the module they stand for: a bridge component and the HF module it
        # wraps map to one clone, whose mode follows the HF module's (the bridge sets both).
        self._clones = [(clone, originals[key]) for key, clone in memo.items()
                        if key not in shared and key in originals]
        self.hf = hf
        self.layers = layers
        self._shared = shared
        self._signature = self._tree_signature()
        # Not a hook: the view's own guard must not look like a hook left behind.
        hf.__class__ = _guarded(type(hf))
        hf.__dict__["_persona_lens_view"] = self
        self.rebuilds += 1

    def _tree_signature(self) -> tuple:
        return tuple((id(m), m.__dict__.get("gradient_checkpointing")) for m in _walk(self.bridge.original_model))

    def sync_modes(self) -> None:
        """Give every cloned module its original's training mode."""
        for clone, original in self._clones:
            clone.training = original.training

    def _before_forward(self) -> None:
        if not self._in_step and self.scan()[0]:
            raise RuntimeError(
                "the model's modules changed after this fast view was built (for example peft "
                "added adapters), so it would run without them: take probe.hf_model again"
            )
        self.sync_modes()

    def logits(self, input_ids, attention_mask, cache, last_only):
        self._in_step = True  # the probe checked the tree before choosing this path
        try:
            return super().logits(input_ids, attention_mask, cache, last_only)
        finally:
            self._in_step = False

    def scan(self, own_hook_ids: set[int] = frozenset()) -> tuple[bool, bool]:
        """``(stale, foreign_hooks)`` in one walk over the bridge's modules.

        ``stale``: the bridge's module tree or a module's gradient checkpointing flag changed
        since the view was built. ``foreign_hooks``: a module the
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
            if not stale and sig[i] != (id(m), m.__dict__.get("gradient_checkpointing")):
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
