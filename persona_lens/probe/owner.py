"""The probe's hook ownership and path routing.

``HookOwner`` is the part of ``PersonaProbe`` that touches modules: it attaches the probe's
residual-stream hooks to every backend that may run a forward (the bridge and its fast HF
view), removes exactly the hooks it added (also when an exception escapes), chooses which
backend runs the probe's next forward, and knows where prompts and responses are for the
forward a hook is in (its own, or a caller's through :meth:`HookOwner.batch`).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

from torch import Tensor, nn

from persona_lens import validate as V
from persona_lens.backends import Backend, BridgeBackend, FastPathUnavailable, HFBackend, make_backend
from persona_lens.backends.base import EngineRequest, EngineResult
from persona_lens.chat import encode_rows
from persona_lens.interventions import Intervention
from persona_lens.ops import POSITION_KINDS
from persona_lens.probe.positions import Positions, caller_positions, position_masks

HookFn = Callable[[Tensor], "Tensor | None"]

PATHS = ("auto", "hf", "bridge")
CONTEXT_OVERFLOW = ("warn", "error")


class ResidualHook:
    """One probe hook on the residual stream, attached at the same layer on every backend
    that may run a forward, and removed from all of them together."""

    def __init__(self, layer: int, fn: HookFn):
        self.layer = layer
        self.fn = fn
        self.handles: dict[str, Any] = {}

    @property
    def bridge_id(self) -> int | None:
        h = self.handles.get("main")
        return None if h is None else h.id

    def remove(self) -> None:
        for h in self.handles.values():
            h.remove()
        self.handles.clear()


class WindowMasks(Mapping):
    """The current forward's masks, cut to one activation's columns when first asked for:
    an intervention on every position never needs them (and works with no positions set)."""

    def __init__(self, owner: "HookOwner", h: Tensor):
        self.owner, self.h = owner, h

    def __getitem__(self, kind: str) -> Tensor:
        return self.owner._position_mask(kind, self.h)

    def __iter__(self):
        return iter(POSITION_KINDS)

    def __len__(self) -> int:
        return 4


class HookOwner:
    """Hook registration, removal and path routing for :class:`PersonaProbe`."""

    def __init__(self, model: "nn.Module | Backend", tokenizer: Any = None, *, path: str = "auto",
                 on_context_overflow: str = "warn"):
        V.choice("path", path, PATHS)
        self.on_context_overflow = on_context_overflow
        self.backend: Backend = make_backend(model, tokenizer)
        self._positions: Positions | None = None
        self._handles: list[Any] = []
        self._interventions: list[Intervention] = []
        self._fast: HFBackend | None = None
        self._fast_error: str | None = None
        if isinstance(self.backend, BridgeBackend):
            try:
                self._fast = HFBackend(self.backend.model, self.backend.tokenizer)
            except FastPathUnavailable as e:
                self._fast_error = str(e)
        else:
            self._fast_error = f"a {self.backend.kind} model has no fast path"
        if path == "hf" and self._fast is None:
            raise ValueError(f"path='hf' is not available: {self._fast_error}")
        self.path = path
        self.last_path: str | None = None

    @property
    def interventions(self) -> tuple[Intervention, ...]:
        """The active steering and ablation values, in the order they run on a layer."""
        return tuple(self._interventions)

    @property
    def hf_model(self) -> nn.Module:
        """The fast view as a plain HF causal LM, for forwards you run yourself (a training
        step): it shares every parameter with the bridge, and the probe's active hooks fire
        on it. Take it again after changing the model's modules (peft adapters, say).

        Example:
            >>> batch = probe.encode(pos_convs[:2], with_response=True)
            >>> out = probe.hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            >>> out.logits.shape[:2] == batch.input_ids.shape
            True
        """
        self._refuse_on_engine("probe.hf_model", "load the model with the default engine for training steps")
        if self._fast is None:
            raise ValueError(f"no fast HF view: {self._fast_error}; run the model itself instead")
        if self._fast.scan()[0]:
            self._rebuild_fast()
            if self._fast is None:
                raise ValueError(f"no fast HF view: {self._fast_error}; run the model itself instead")
        return self._fast.hf

    # -- attaching and removing -------------------------------------------------------------
    def _register(self, layer: int, fn: HookFn) -> ResidualHook:
        if self.backend.takes == "specs":
            raise NotImplementedError(
                f"this {self.backend.kind} engine takes interventions as specs and has no modules "
                "to hook: steer and ablate work on it; reading activations needs a local model"
            )
        hook = ResidualHook(layer, fn)
        try:
            module, how = self.backend.resid_site(layer)
            hook.handles["main"] = _hook_module(module, how, fn)
            if self._fast is not None:
                module, how = self._fast.resid_site(layer)
                hook.handles["hf"] = _hook_module(module, how, fn)
        except BaseException:
            hook.remove()
            raise
        self._handles.append(hook)
        return hook

    @contextlib.contextmanager
    def _hooked(self, specs: Sequence[tuple[int, HookFn]]) -> Iterator[None]:
        """Add residual-stream hooks for the duration of the block; always remove them."""
        handles = []
        try:
            for layer, fn in specs:
                handles.append(self._register(layer, fn))
            yield
        finally:
            for h in reversed(handles):
                h.remove()
                self._handles.remove(h)

    @contextlib.contextmanager
    def _intervening(self, interventions: Sequence[Intervention]) -> Iterator[None]:
        """Keep interventions active for the block: listed in ``interventions`` and attached
        as hooks, both undone on exit."""
        def as_hook(iv: Intervention) -> HookFn:
            return lambda h: iv.apply(h, WindowMasks(self, h))

        self._interventions.extend(interventions)
        try:
            if self.backend.takes == "specs":  # the engine receives them with each step
                yield
            else:
                with self._hooked([(iv.layer, as_hook(iv)) for iv in interventions]):
                    yield
        finally:
            for iv in interventions:
                self._interventions.remove(iv)

    @contextlib.contextmanager
    def add_hooks(self, fwd_hooks: Sequence) -> Iterator["HookOwner"]:
        """Attach your own hooks to named TransformerLens hook points for the block.

        Hook functions follow TransformerLens's convention ``fn(activation, hook)`` and may
        return a replacement activation. Names are checked before anything is attached.
        While such hooks are active, ``path="auto"`` runs the full bridge (TransformerLens
        hook points do not exist on the fast path).

        Example:
            >>> seen = []
            >>> with probe.add_hooks([("blocks.1.attn.hook_pattern", lambda x, hook: seen.append(x.shape))]):
            ...     _ = probe.generate(["Hi"], max_new_tokens=2)
            >>> len(seen) > 0
            True
        """
        self._refuse_on_engine("add_hooks", "load the model with the default engine to hook TransformerLens hook points")
        specs = V.items("fwd_hooks", fwd_hooks, what="a list of (hook name, function) pairs")
        for i, spec in enumerate(specs):
            if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str)
                    and callable(spec[1])):
                raise V.InvalidArgumentType(f"fwd_hooks[{i}]", spec, "a (hook name, function) pair")
        resolved = [(self.backend.hook_point(name), fn) for name, fn in specs]
        handles = []
        try:
            for module, fn in resolved:
                handle = _hook_module(module, "output", lambda x, _fn=fn, _m=module: _fn(x, _m))
                self._handles.append(handle)
                handles.append(handle)
            yield self
        finally:
            for h in reversed(handles):
                h.remove()
                self._handles.remove(h)

    # -- which backend runs ---------------------------------------------------------------
    def _step(self, run: Backend, input_ids: Tensor, attention_mask: Tensor, cache: Any, last_only: bool) -> Tensor:
        """One forward of the probe's own: a spec-taking engine first receives the active
        interventions and the positions of the columns this step sees."""
        if run.takes == "specs":
            pos = self._positions
            masks = {k: pos.columns(k) for k in list(pos.masks)}
            run.receive([iv.spec() for iv in self._interventions], masks)
        return run.logits(input_ids, attention_mask, cache, last_only)

    @property
    def _on_engine(self) -> bool:
        """True when the model is an engine that runs whole requests (vLLM)."""
        return self.backend.runs == "requests"

    def _refuse_on_engine(self, what: str, instead: str) -> None:
        if self._on_engine:
            raise NotImplementedError(
                f"{what} is not available on the {self.backend.kind} engine, which runs whole requests "
                f"and exposes no forward of its own; {instead}")

    def _engine_run(
        self,
        rows: Sequence[tuple[list[int], list[int]]],
        max_new_tokens: int,
        reads: Sequence[Any] = (),
        extra: Sequence[Sequence[Intervention]] | None = None,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = 0,
        progress: bool = False,
    ) -> list[EngineResult]:
        """The engine counterpart of :meth:`_step`, and the one place its requests go: each
        row becomes a request carrying the active interventions' specs, then the row's own
        ``extra`` interventions, then the ``reads`` (``Capture`` / ``Project``), with the
        position masks of every position it may reach."""
        specs: dict[int, dict] = {}  # rows sharing a value share its spec (one tensor in the engine)

        def spec(v: Any) -> dict:
            if id(v) not in specs:
                specs[id(v)] = v.spec()
            return specs[id(v)]

        common = [spec(iv) for iv in self._interventions]
        read_specs = [spec(r) for r in reads]
        requests = []
        for i, (p, r) in enumerate(rows):
            batch = encode_rows(self.tokenizer, [(p, r)])
            masks = position_masks(batch.prompt_mask, batch.response_mask, len(p) + len(r) + max_new_tokens)
            own = [spec(iv) for iv in extra[i]] if extra is not None else []
            requests.append(EngineRequest(list(p), list(r), max_new_tokens, common + own + read_specs, masks))
        self.last_path = self.backend.kind
        return self.backend.run(requests, temperature=temperature, top_p=top_p, seed=seed, progress=progress)

    def _runner(self) -> Backend:
        """The backend for the next forward(s), chosen from what hooks are active."""
        fast = self._fast
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        if self.path == "hf" and fast is None:
            raise ValueError(f"path='hf' is not available: {self._fast_error}")
        run = self.backend
        if fast is not None and self.path != "bridge":
            own = {h.bridge_id for h in self._handles if isinstance(h, ResidualHook)}
            stale, foreign = fast.scan(own)
            if stale:
                self._rebuild_fast()
                fast = self._fast
                if fast is None and self.path == "hf":
                    raise ValueError(f"path='hf' is no longer available: {self._fast_error}")
            if fast is not None and (self.path == "hf" or not foreign):
                run = fast
        self.last_path = run.kind
        return run

    def _rebuild_fast(self) -> None:
        """The bridge's module tree changed (new modules, gradient checkpointing): rebuild
        the fast view and move the probe's residual hooks onto it, in their order."""
        ours = [h for h in self._handles if isinstance(h, ResidualHook)]
        for h in ours:
            old = h.handles.pop("hf", None)
            if old is not None:
                old.remove()
        try:
            self._fast.rebuild()
        except FastPathUnavailable as e:
            self._fast, self._fast_error = None, str(e)
            return
        for h in ours:
            module, how = self._fast.resid_site(h.layer)
            h.handles["hf"] = _hook_module(module, how, h.fn)

    # -- limits ---------------------------------------------------------------------------
    @property
    def on_context_overflow(self) -> str:
        """What an input longer than the model's context does: ``"warn"`` (a
        :class:`~persona_lens.validate.ContextLengthWarning`, the model runs anyway) or
        ``"error"`` (a :class:`~persona_lens.validate.ContextLengthError` before it runs)."""
        return self._on_context_overflow

    @on_context_overflow.setter
    def on_context_overflow(self, value: str) -> None:
        self._on_context_overflow = V.choice("on_context_overflow", value, CONTEXT_OVERFLOW)

    def _check_context(self, lengths: Sequence[int], name: str) -> None:
        """Warn or raise (``on_context_overflow``) if an input is longer than the model's
        context (generation checks again while decoding: it may stop before the limit)."""
        n_ctx = self.backend.n_ctx
        if n_ctx is None or not lengths:
            return
        over = [i for i, n in enumerate(lengths) if n > n_ctx]
        if over:
            i = max(over, key=lambda j: lengths[j])
            self._context_overflow(
                f"{len(over)} of the {len(lengths)} {name} are longer than the model's context of "
                f"{n_ctx} tokens ({name}[{i}] has {lengths[i]} tokens, chat template included)",
                f"shorten the {name}")

    def _context_overflow(self, message: str, remedy: str) -> None:
        if self._on_context_overflow == "error":
            raise V.ContextLengthError(
                f"{message}; {remedy}, or set on_context_overflow='warn' to run anyway")
        warnings.warn(f"{message}; results past the context are unreliable (on_context_overflow='error' "
                      "makes this an error)", V.ContextLengthWarning, stacklevel=4)

    def _numerical_message(self, what: str) -> str:
        steers = [iv for iv in self._interventions if hasattr(iv, "coef")]
        msg = f"{what} are NaN or inf: the activations overflowed"
        if steers:
            active = ", ".join(f"layer {iv.layer} coef {iv.coef:g}" for iv in steers)
            msg += f" under the active steering ({active}); a smaller steering coefficient (coef) avoids it"
        return msg

    # -- positions ------------------------------------------------------------------------
    def _position_mask(self, kind: str, h: Tensor) -> Tensor | None:
        if kind == "all":
            return None
        if self._positions is None:
            raise RuntimeError(
                f"an intervention on {kind!r} positions (positions='response', 'response_only' or "
                "'prompt') needs to know where prompts and responses are: run the "
                "model through the probe (generate, capture, project, forward), wrap your own "
                "forward in `with probe.batch(prompt_mask, response_mask):`, or use positions='all'"
            )
        return self._positions.mask(kind, h)

    @contextlib.contextmanager
    def _at(self, positions: Positions, start: int, stop: int) -> Iterator[None]:
        positions.start, positions.stop = start, stop
        previous, self._positions = self._positions, positions
        try:
            yield
        finally:
            self._positions = previous

    @contextlib.contextmanager
    def batch(self, prompt_mask: Any, response_mask: Any = None) -> Iterator["HookOwner"]:
        """Tell the probe's hooks where prompts and responses are in a forward you run.

        Inside the block, every forward of the model (the bridge, ``probe.hf_model``, a peft
        model wrapping either, an HF ``Trainer`` step) is taken to be over this batch:
        ``positions="response_only"`` steers exactly the response tokens of each row, whatever
        the padding (``"response"``: the last prompt token too). Gradients flow through every intervention.

        Args:
            prompt_mask, response_mask: ``[batch, pos]`` booleans of the batch you run; or one
                object carrying both (a :class:`~persona_lens.chat.ChatBatch`, or a collated
                dict with ``prompt_mask`` and ``response_mask``).

        Example:
            >>> batch = probe.encode(pos_convs[:4], with_response=True)
            >>> labels = batch.input_ids.masked_fill(~batch.response_mask, -100)
            >>> with probe.steer(vec, layer=2, coef=1.0, positions="response"), probe.batch(batch):
            ...     loss = probe.hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            ...                           labels=labels).loss
            >>> loss.backward()          # gradients flow through the steering
            >>> probe.model.zero_grad(set_to_none=True)
        """
        self._refuse_on_engine("probe.batch", "load the model with the default engine for forwards you run yourself")
        positions = caller_positions(prompt_mask, response_mask)
        with self._at(positions, 0, positions.stop):
            yield self


def _hook_module(module: nn.Module, how: str, fn: HookFn) -> Any:
    """Attach ``fn`` to a module's output (``"output"``) or first input (``"input"``)."""
    if how == "output":

        def hook(mod, args, output):
            if isinstance(output, tuple):
                new = fn(output[0])
                return None if new is None else (new,) + tuple(output[1:])
            return fn(output)

        return module.register_forward_hook(hook)
    if how == "input":

        def pre_hook(mod, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new,) + tuple(args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    raise ValueError(how)  # pragma: no cover - backends only return the two kinds above
