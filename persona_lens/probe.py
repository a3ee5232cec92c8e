"""``PersonaProbe``: the one owner of hooks on a model.

Everything in persona_lens that reads or writes activations goes through a probe: capture,
projection, steering, ablation, generation and monitoring. The probe adds hooks only inside
``with`` blocks or its own method calls and removes exactly the hooks it added, also when an
exception escapes; hooks a user added to the model are never touched.

Positions are data: every forward the probe runs carries per-row masks of prompt, response
and last-prompt positions for the columns that forward sees. Under left padding the masks
follow each row's own prompt; under KV caching a decode step sees one new column per row,
which is a response position.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from persona_lens import hooks as H
from persona_lens.backends import Backend, BridgeBackend, FastPathUnavailable, HFBackend, make_backend
from persona_lens.progress import quiet as _quiet
from persona_lens.chat import (
    ChatBatch,
    ConversationLike,
    as_conversation,
    chat_rows,
    encode_rows,
)
from persona_lens.vectors import PersonaVector, check_layer

HookFn = Callable[[Tensor], "Tensor | None"]


class _StopForward(Exception):
    """Raised by a capture hook once the deepest requested layer is recorded."""


PATHS = ("auto", "hf", "bridge")


class _ResidualHook:
    """One probe hook on the residual stream, attached at the same layer on every backend
    that may run a forward (the bridge and, when there is one, its fast HF view), and
    removed from all of them together."""

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


@dataclass
class _Positions:
    """Position masks of the whole sequence, and the column window the current forward sees."""

    masks: dict[str, Bool[Tensor, "batch seq"]]
    start: int = 0
    stop: int = 0

    def mask(self, kind: str, h: Tensor) -> Bool[Tensor, "batch pos"]:
        m = self.masks[kind][:, self.start : self.stop]
        if m.shape != h.shape[:2]:
            raise RuntimeError(
                f"a hook saw activations for {tuple(h.shape[:2])} (batch, positions) but the "
                f"probe expected {tuple(m.shape)}; was the model called outside the probe?"
            )
        return m


def _position_masks(batch: ChatBatch, total: int | None = None) -> dict[str, Tensor]:
    """Masks for a batch, extended with response columns up to ``total`` (for generation)."""
    prompt, response = batch.prompt_mask, batch.response_mask
    if total is not None and total > prompt.shape[1]:
        extra = total - prompt.shape[1]
        prompt = torch.cat([prompt, prompt.new_zeros(prompt.shape[0], extra)], dim=1)
        response = torch.cat([response, response.new_ones(response.shape[0], extra)], dim=1)
    return {
        "all": torch.ones_like(prompt),
        "prompt": prompt,
        "response": response,
        "last_prompt": H.last_true(prompt),
    }


@dataclass
class Generation:
    """One generated response.

    Attributes:
        conversation: the prompt messages.
        text: the decoded response (special tokens removed).
        prompt_ids: the prompt's token ids (chat template included, no padding).
        response_ids: generated token ids, up to and including the end-of-turn token if one
            was produced.
        finished: True if generation stopped at an end-of-sequence token.
    """

    conversation: list[dict[str, str]]
    text: str
    prompt_ids: list[int]
    response_ids: list[int]
    finished: bool

    def as_conversation(self) -> list[dict[str, str]]:
        """Prompt messages followed by the response as an assistant message."""
        return self.conversation + [{"role": "assistant", "content": self.text}]


@dataclass
class Reading:
    """Per-token projections recorded while generating one response (see ``monitor``).

    Attributes:
        text: the generated response.
        prompt_tokens / prompt_projections: the prompt's tokens and their projections.
        response_tokens / response_projections: generated tokens, and for each token the
            projection at the position it was chosen from (the last prompt token for the
            first one, then the previous generated token): what the model held just before
            it wrote that token.
        layer: the layer read.
    """

    text: str
    prompt_tokens: list[str]
    prompt_projections: list[float]
    response_tokens: list[str]
    response_projections: list[float]
    layer: int

    @property
    def last_prompt(self) -> float:
        """Projection at the last prompt token: the reading before the answer starts."""
        return self.prompt_projections[-1]

    @property
    def response_mean(self) -> float:
        vals = self.response_projections
        return sum(vals) / len(vals) if vals else math.nan


@dataclass
class Activations:
    """Per-sample reduced activations from :meth:`PersonaProbe.capture`.

    ``data[reduction]`` is ``[n_samples, len(layers), d_model]`` float32 on the CPU, rows in
    the order the conversations were given.
    """

    layers: list[int]
    data: dict[str, Float[Tensor, "n_samples n_layers d_model"]]

    def __getitem__(self, reduction: str) -> Tensor:
        return self.data[H.check_reduction(reduction)]

    def at(self, reduction: str, layer: int) -> Float[Tensor, "n_samples d_model"]:
        """Activations of one reduction at one captured layer."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not captured (captured: {self.layers})")
        return self[reduction][:, self.layers.index(layer)]


@dataclass
class ActivationMean:
    """Running float32 means over samples, from :meth:`PersonaProbe.capture_mean`.

    Memory is one ``[len(layers), d_model]`` sum per reduction, whatever the dataset size.
    Samples whose reduction is empty (an empty response for ``response_mean``) are skipped
    and counted in ``skipped``.
    """

    layers: list[int]
    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def mean(self, reduction: str) -> Float[Tensor, "n_layers d_model"]:
        n = self.counts.get(H.check_reduction(reduction), 0)
        if n == 0:
            raise ValueError(f"no sample contributed to the {reduction} mean")
        return self.sums[reduction] / n

    def full(self, reduction: str, n_layers: int) -> Float[Tensor, "n_layers_plus_1 d_model"]:
        """The mean as a ``[n_layers + 1, d_model]`` table (zeros at layers not captured)."""
        m = self.mean(reduction)
        out = m.new_zeros(n_layers + 1, m.shape[-1])
        out[self.layers] = m
        return out


class PersonaProbe:
    """Capture, project, steer, ablate, generate and monitor on a TransformerLens model.

    Args:
        model: a TransformerLens 4.x ``TransformerBridge`` (``persona_lens.load_model``) or a
            TransformerLens 3.x ``HookedTransformer``.
        tokenizer: overrides the model's own tokenizer (must have a chat template).
        path: which model runs the probe's forwards on a ``TransformerBridge``:

            - ``"auto"`` (default): the bridge's HF model without the bridge, with SDPA
              attention (``"hf"``, as fast as plain HF), whenever every active hook is one
              of the probe's residual-stream hooks; the full bridge (``"bridge"``) when
              TransformerLens hook points are in use, through :meth:`add_hooks` or hooks
              of your own on the bridge's modules.
            - ``"hf"``: always the fast path (hooks on TransformerLens hook points do not
              fire).
            - ``"bridge"``: always the bridge.

            Both paths share the same weights and give the same results (up to float
            rounding between eager and SDPA attention). ``probe.last_path`` tells which ran
            last. A ``HookedTransformer`` always runs itself.

    Example:
        >>> import persona_lens as pl
        >>> probe = pl.PersonaProbe(pl.load_model("smollm2-135m-instruct"))
        >>> probe.generate(["What is the capital of France?"], max_new_tokens=16)
        ['The capital of France is Paris.']
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, path: str = "auto"):
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.backend: Backend = make_backend(model, tokenizer)
        self._positions: _Positions | None = None
        self._handles: list[Any] = []
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

    # -- basic facts ----------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.backend.model

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks; valid layers are ``0..n_layers``."""
        return self.backend.n_layers

    @property
    def d_model(self) -> int:
        return self.backend.d_model

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def model_name(self) -> str | None:
        return self.backend.model_name

    def __repr__(self) -> str:
        return (
            f"PersonaProbe({self.model_name!r}, {self.backend.kind}, layers=0..{self.n_layers}, "
            f"d_model={self.d_model}, active_hooks={len(self._handles)})"
        )

    def check_layer(self, layer: int) -> int:
        """Return ``layer`` if valid for this model (``0..n_layers``), else raise."""
        return check_layer(
            layer, self.n_layers, "this model",
            f" (layer L is the residual stream entering block L; {self.n_layers} is the last "
            "block's output)",
        )

    def _layers(self, layers: Sequence[int] | None) -> list[int]:
        if layers is None:
            return list(range(self.n_layers + 1))
        layers = sorted({self.check_layer(int(l)) for l in layers})
        if not layers:
            raise ValueError("no layers given")
        return layers

    def _vector(self, vector: PersonaVector | Tensor) -> PersonaVector:
        if isinstance(vector, Tensor):
            if vector.ndim == 1:
                if vector.shape[0] != self.d_model:
                    raise ValueError(
                        f"direction has d_model {vector.shape[0]}, the model has {self.d_model}"
                    )
                vector = vector.unsqueeze(0).expand(self.n_layers + 1, -1)
            vector = PersonaVector(vector)
        if not isinstance(vector, PersonaVector):
            raise TypeError(f"expected a PersonaVector or a tensor, got {type(vector).__name__}")
        vector.check_compatible(self.n_layers, self.d_model, self.model_name)
        return vector

    # -- the hook owner -------------------------------------------------------------------
    def _register(self, layer: int, fn: HookFn) -> Any:
        hook = _ResidualHook(layer, fn)
        try:
            module, how = self.backend.resid_site(layer)
            hook.handles["main"] = self._hook_module(module, how, fn)
            if self._fast is not None:
                module, how = self._fast.resid_site(layer)
                hook.handles["hf"] = self._hook_module(module, how, fn)
        except BaseException:
            hook.remove()
            raise
        self._handles.append(hook)
        return hook

    def _attach(self, module: nn.Module, how: str, fn: HookFn) -> Any:
        handle = self._hook_module(module, how, fn)
        self._handles.append(handle)
        return handle

    def _runner(self) -> Backend:
        """The backend for the next forward(s), chosen from what hooks are active."""
        fast = self._fast
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        if self.path == "hf" and fast is None:
            raise ValueError(f"path='hf' is not available: {self._fast_error}")
        run = self.backend
        if fast is not None and self.path != "bridge":
            own = {h.bridge_id for h in self._handles if isinstance(h, _ResidualHook)}
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
        """The bridge's module tree changed (new modules, train/eval): rebuild the fast view
        and move the probe's residual hooks onto it, in their order."""
        ours = [h for h in self._handles if isinstance(h, _ResidualHook)]
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
            h.handles["hf"] = self._hook_module(module, how, h.fn)

    def _hook_module(self, module: nn.Module, how: str, fn: HookFn) -> Any:
        if how == "output":

            def hook(mod, args, output):
                if isinstance(output, tuple):
                    new = fn(output[0])
                    return None if new is None else (new,) + tuple(output[1:])
                return fn(output)

            handle = module.register_forward_hook(hook)
        elif how == "input":

            def pre_hook(mod, args, kwargs):
                if args:
                    new = fn(args[0])
                    return None if new is None else ((new,) + tuple(args[1:]), kwargs)
                new = fn(kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:  # pragma: no cover - backends only return the two kinds above
            raise ValueError(how)
        return handle

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

    def _position_mask(self, kind: str, h: Tensor) -> Tensor | None:
        if kind == "all":
            return None
        if self._positions is None:
            raise RuntimeError(
                f"positions={kind!r} needs to know where prompts and responses are: run the "
                "model through the probe (generate, capture, project, forward), or use "
                "positions='all'"
            )
        return self._positions.mask(kind, h)

    @contextlib.contextmanager
    def steer(
        self,
        vector: PersonaVector | Tensor,
        layer: int | None = None,
        coef: float = 1.0,
        *,
        layers: Mapping[int, float] | Sequence[int] | None = None,
        positions: str = "all",
        include_last_prompt: bool = False,
    ) -> Iterator["PersonaProbe"]:
        """Add ``coef * vector[L]`` to the residual stream entering block ``L``.

        Args:
            vector: a :class:`PersonaVector` (its row ``L`` is used at layer ``L``) or a
                single ``[d_model]`` direction.
            layer: one layer, with ``coef``.
            coef: steering coefficient (positive elicits the trait, negative suppresses).
            layers: several layers instead: ``{layer: coef}``, or a list sharing ``coef``.
            positions: ``"all"``, ``"prompt"`` or ``"response"`` (every generated token).
            include_last_prompt: with ``positions="response"``, also steer the last prompt
                token, as the paper's released code does.

        Steering contexts nest and compose with :meth:`ablate`; hooks on one layer run in the
        order their contexts were entered.

        Example:
            >>> with probe.steer(vec, layer=20, coef=2.0, positions="response"):
            ...     texts = probe.generate(["How should I treat my neighbours?"])
            >>> with probe.steer(vec, layers={16: 1.0, 20: 1.0}):
            ...     texts = probe.generate(["How should I treat my neighbours?"])
        """
        vec = self._vector(vector)
        H.check_position_kind(positions)
        if positions == "last_prompt":
            raise ValueError("steer positions must be 'all', 'prompt' or 'response'")
        if layers is None:
            if layer is None:
                raise ValueError("give layer= (with coef=) or layers={layer: coef}")
            plan = {self.check_layer(layer): float(coef)}
        else:
            if layer is not None:
                raise ValueError("give either layer= or layers=, not both")
            items = layers.items() if isinstance(layers, Mapping) else ((l, coef) for l in layers)
            plan = {self.check_layer(int(l)): float(c) for l, c in items}
            if not plan:
                raise ValueError("layers= is empty")
        device, dtype = self.device, self.backend.dtype
        with_last = positions == "response" and include_last_prompt

        def make(direction: Tensor, c: float) -> HookFn:
            direction = direction.to(device=device, dtype=dtype)

            def fn(h: Tensor) -> Tensor:
                mask = self._position_mask(positions, h)
                if with_last:
                    mask = mask | self._position_mask("last_prompt", h)
                return H.add_direction(h, direction, c, mask)

            return fn

        with self._hooked([(l, make(vec[l], c)) for l, c in plan.items()]):
            yield self

    @contextlib.contextmanager
    def ablate(
        self,
        vector: PersonaVector | Tensor,
        layers: Sequence[int] | int,
        *,
        positions: str = "all",
    ) -> Iterator["PersonaProbe"]:
        """Project the vector's direction out of the residual stream: ``h <- h - (h.u)u``.

        ``u`` is the unit vector of ``vector[L]`` at each layer ``L`` (this is CAFT's
        operation when used during finetuning).

        Example:
            >>> with probe.ablate(vec, layers=[20]):
            ...     texts = probe.generate(["How should I treat my neighbours?"])
        """
        vec = self._vector(vector)
        H.check_position_kind(positions)
        layer_list = [layers] if isinstance(layers, int) else list(layers)
        if not layer_list:
            raise ValueError("layers is empty")
        device = self.device

        def make(unit: Tensor) -> HookFn:
            unit = unit.to(device)
            return lambda h: H.ablate_direction(h, unit, self._position_mask(positions, h))

        with self._hooked([(self.check_layer(int(l)), make(vec.unit(int(l)))) for l in layer_list]):
            yield self

    @contextlib.contextmanager
    def add_hooks(self, fwd_hooks: Sequence[tuple[str, Callable[[Tensor, Any], Any]]]) -> Iterator["PersonaProbe"]:
        """Attach your own hooks to named TransformerLens hook points for the block.

        Hook functions follow TransformerLens's convention ``fn(activation, hook)`` and may
        return a replacement activation. Names are checked before anything is attached.
        While such hooks are active, ``path="auto"`` runs the full bridge (TransformerLens
        hook points do not exist on the fast path).

        Example:
            >>> seen = []
            >>> with probe.add_hooks([("blocks.3.attn.hook_pattern", lambda x, hook: seen.append(x.shape))]):
            ...     probe.generate(["Hi"], max_new_tokens=2)
        """
        resolved = [(self.backend.hook_point(name), name, fn) for name, fn in fwd_hooks]
        handles = []
        try:
            for module, name, fn in resolved:
                handles.append(self._attach(module, "output", lambda x, _fn=fn, _m=module: _fn(x, _m)))
            yield self
        finally:
            for h in reversed(handles):
                h.remove()
                self._handles.remove(h)

    # -- forward passes -------------------------------------------------------------------
    @contextlib.contextmanager
    def _at(self, positions: _Positions, start: int, stop: int) -> Iterator[None]:
        positions.start, positions.stop = start, stop
        previous, self._positions = self._positions, positions
        try:
            yield
        finally:
            self._positions = previous

    def encode(self, conversations: Sequence[ConversationLike], *, with_response: bool) -> ChatBatch:
        """Encode conversations with this model's tokenizer (see ``persona_lens.chat``)."""
        from persona_lens.chat import encode_chat

        return encode_chat(self.tokenizer, conversations, with_response=with_response)

    def forward(self, batch: ChatBatch) -> Float[Tensor, "batch seq vocab"]:
        """Full forward pass over an encoded batch, with position masks set for hooks.

        Example:
            >>> batch = probe.encode([[{"role": "user", "content": "Hi"},
            ...                        {"role": "assistant", "content": "Hello"}]], with_response=True)
            >>> with probe.steer(vec, layer=3, positions="response"):
            ...     logits = probe.forward(batch)
        """
        batch = batch.to(self.device)
        positions = _Positions(_position_masks(batch))
        run = self._runner()
        with self._at(positions, 0, batch.input_ids.shape[1]):
            return run.logits(batch.input_ids, batch.attention_mask, None, last_only=False)

    def _batches(self, rows: list, batch_size: int) -> list[list[int]]:
        """Indices grouped into batches of similar length (less padding, same results)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def _run_reductions(
        self,
        conversations: Sequence[ConversationLike],
        layers: list[int],
        reductions: Sequence[str],
        batch_size: int,
        progress: bool | None,
        sink: Callable[[ChatBatch, dict[str, Tensor], dict[str, Tensor]], None],
    ) -> None:
        """Stream batches through the model; hand each batch's per-row reductions to ``sink``.

        ``sink(batch, reduced, counts)`` gets ``reduced[r]`` of shape
        ``[batch, len(layers), d_model]`` (float32) and ``counts[r]`` of shape ``[batch]``.
        """
        if len(conversations) == 0:
            raise ValueError("empty batch: no conversations given")
        for r in reductions:
            H.check_reduction(r)
        rows = chat_rows(self.tokenizer, conversations, with_response=True)
        deepest = max(layers)
        slot = {l: i for i, l in enumerate(layers)}
        kind = {"response_mean": "response", "prompt_mean": "prompt", "last_prompt": "last_prompt"}
        current: dict[str, Tensor] = {}

        def make(layer: int) -> HookFn:
            def fn(h: Tensor) -> None:
                for r in reductions:
                    current[r][:, slot[layer]] = H.masked_sum(h, self._position_mask(kind[r], h))
                if layer == deepest:
                    raise _StopForward
                return None

            return fn

        def fresh(n: int) -> None:
            for r in reductions:
                current[r] = torch.zeros(n, len(layers), self.d_model, device=self.device)

        with self._hooked([(l, make(l)) for l in layers]):
            for batch, positions in self._stream(rows, batch_size, progress, "capture", fresh):
                counts = {r: positions.masks[kind[r]].sum(1) for r in reductions}
                reduced = {
                    r: current[r] / counts[r].clamp(min=1).to(torch.float32)[:, None, None]
                    for r in reductions
                }
                sink(batch, reduced, counts)

    def _stream(
        self,
        rows: list[tuple[list[int], list[int]]],
        batch_size: int,
        progress: bool | None,
        desc: str,
        before: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[ChatBatch, _Positions]]:
        """Run a forward over each length-sorted batch of ``rows`` and yield it afterwards.

        Hooks read what they need during the forward and may end it early with
        ``_StopForward``; ``before(batch_len)`` runs ahead of each forward.
        """
        groups = self._batches(rows, batch_size)
        run = self._runner()
        with tqdm(total=len(rows), desc=desc, unit="conv", disable=_quiet(progress, len(groups))) as bar:
            for idx in groups:
                batch = encode_rows(self.tokenizer, [rows[i] for i in idx], idx).to(self.device)
                positions = _Positions(_position_masks(batch))
                if before is not None:
                    before(len(idx))
                with self._at(positions, 0, batch.input_ids.shape[1]):
                    try:
                        run.logits(batch.input_ids, batch.attention_mask, None, last_only=True)
                    except _StopForward:
                        pass
                yield batch, positions
                bar.update(len(idx))

    @torch.no_grad()
    def capture(
        self,
        conversations: Sequence[ConversationLike],
        *,
        layers: Sequence[int] | None = None,
        reductions: Sequence[str] = ("response_mean",),
        batch_size: int = 16,
        progress: bool | None = None,
    ) -> Activations:
        """Residual-stream activations per conversation, reduced over positions.

        Args:
            conversations: message lists ending with an assistant message (the response).
            layers: layers to read (default: all, ``0..n_layers``).
            reductions: any of ``"response_mean"`` (mean over response tokens, the paper's
                choice), ``"prompt_mean"`` and ``"last_prompt"``.
            batch_size: conversations per forward pass.

        Returns:
            :class:`Activations`; an empty response gives NaN for ``response_mean``.

        Example:
            >>> acts = probe.capture([[{"role": "user", "content": "Hi"},
            ...                        {"role": "assistant", "content": "Hello there"}]], layers=[10])
            >>> acts.at("response_mean", 10).shape
            torch.Size([1, 576])
        """
        layer_list = self._layers(layers)
        out = {r: torch.empty(len(conversations), len(layer_list), self.d_model) for r in reductions}

        def sink(batch: ChatBatch, reduced: dict[str, Tensor], counts: dict[str, Tensor]) -> None:
            for r, t in reduced.items():
                t = t.masked_fill((counts[r] == 0)[:, None, None], math.nan)
                out[r][batch.index] = t.cpu()

        self._run_reductions(conversations, layer_list, reductions, batch_size, progress, sink)
        return Activations(layer_list, out)

    @torch.no_grad()
    def capture_mean(
        self,
        conversations: Sequence[ConversationLike],
        *,
        layers: Sequence[int] | None = None,
        reductions: Sequence[str] = ("response_mean",),
        batch_size: int = 16,
        into: ActivationMean | None = None,
        progress: bool | None = None,
    ) -> ActivationMean:
        """Mean over conversations of each sample's reduced activation, streamed.

        Memory does not grow with the number of conversations. Pass ``into=`` to keep
        adding to an earlier result (for example over chunks of a large dataset).

        Example:
            >>> pos = probe.capture_mean(pos_convs, reductions=["response_mean"])
            >>> neg = probe.capture_mean(neg_convs, reductions=["response_mean"])
            >>> vec = pl.PersonaVector.from_means(pos.full("response_mean", probe.n_layers),
            ...                                   neg.full("response_mean", probe.n_layers))
        """
        layer_list = self._layers(layers)
        acc = into or ActivationMean(layer_list)
        if acc.layers != layer_list:
            raise ValueError(f"into= holds layers {acc.layers}, asked for {layer_list}")

        def sink(batch: ChatBatch, reduced: dict[str, Tensor], counts: dict[str, Tensor]) -> None:
            for r, t in reduced.items():
                keep = counts[r] > 0
                total = t[keep].sum(0)
                acc.sums[r] = acc.sums[r] + total if r in acc.sums else total
                acc.counts[r] = acc.counts.get(r, 0) + int(keep.sum())
                acc.skipped[r] = acc.skipped.get(r, 0) + int((~keep).sum())

        self._run_reductions(conversations, layer_list, reductions, batch_size, progress, sink)
        return acc

    @torch.no_grad()
    def project(
        self,
        conversations: Sequence[ConversationLike],
        vector: PersonaVector | Tensor,
        layer: int,
        *,
        at: str = "last_prompt",
        batch_size: int = 16,
        progress: bool | None = None,
    ) -> Float[Tensor, " n_samples"] | list[Float[Tensor, " n_tokens"]]:
        """Projection of activations onto the unit vector at ``layer``.

        Args:
            conversations: message lists. With ``at="last_prompt"`` or ``"prompt_mean"`` they
                may end with a user message (no response needed).
            at: ``"last_prompt"`` (the paper's monitoring reading), ``"response_mean"``,
                ``"prompt_mean"`` (one number per conversation), or ``"tokens"`` (one
                tensor per conversation, a number per response token).

        Example:
            >>> scores = probe.project(prompts, vec, layer=20, at="last_prompt")
        """
        self.check_layer(layer)
        unit = self._vector(vector).unit(layer)
        convs = [as_conversation(c) for c in conversations]
        if at in ("last_prompt", "prompt_mean"):
            # A prompt alone is a conversation with an empty response.
            convs = [c if c[-1]["role"] == "assistant" else c + [{"role": "assistant", "content": ""}] for c in convs]
        if at == "tokens":
            return self._project_tokens(convs, unit, layer, batch_size, progress)
        acts = self.capture(convs, layers=[layer], reductions=[H.check_reduction(at)], batch_size=batch_size, progress=progress)
        return acts.at(at, layer) @ unit

    def _project_tokens(self, convs, unit, layer, batch_size, progress) -> list[Tensor]:
        rows = chat_rows(self.tokenizer, convs, with_response=True)
        out: list[Tensor] = [torch.empty(0)] * len(rows)
        unit = unit.to(self.device)
        current: dict[str, Tensor] = {}

        def fn(h: Tensor) -> None:
            current["p"] = H.project(h, unit)
            raise _StopForward

        with self._hooked([(layer, fn)]):
            for batch, _ in self._stream(rows, batch_size, progress, "project"):
                for j, i in enumerate(batch.index):
                    out[i] = current["p"][j][batch.response_mask[j]].cpu()
        return out

    # -- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[ConversationLike],
        *,
        system: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = 0,
        batch_size: int = 32,
        use_cache: bool = True,
        return_generations: bool = False,
        progress: bool | None = None,
    ) -> list[str] | list[Generation]:
        """Generate responses to chat prompts; active steering/monitoring hooks apply.

        Args:
            prompts: user-message strings or message lists (not ending in an assistant turn).
            system: a system prompt put in front of every prompt.
            temperature: 0 for greedy decoding, else sampling at this temperature.
            top_p: nucleus sampling threshold.
            seed: seeds sampling (one generator per call; same seed, same batches -> same text).
            use_cache: KV-cached decoding (uncached gives the same tokens, slower).
            return_generations: return :class:`Generation` records instead of strings.

        Example:
            >>> probe.generate(["What is the capital of France?"], max_new_tokens=16)
            ['The capital of France is Paris.']
            >>> outs = probe.generate(["Tell me a joke"], temperature=1.0, seed=3, return_generations=True)
        """
        return self._generate(
            prompts, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, batch_size=batch_size, use_cache=use_cache,
            progress=progress, reader=None,
        )[0 if not return_generations else 1]

    def _generate(
        self,
        prompts: Sequence[ConversationLike],
        *,
        system: str | None,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        batch_size: int,
        use_cache: bool,
        progress: bool | None,
        reader: Callable[[ChatBatch, list[int]], Callable[[], None]] | None,
    ) -> tuple[list[str], list[Generation]]:
        if len(prompts) == 0:
            raise ValueError("empty batch: no prompts given")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        convs = [as_conversation(p, system=system) for p in prompts]
        rows = chat_rows(self.tokenizer, convs, with_response=False)
        gens: list[Generation | None] = [None] * len(rows)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(0 if seed is None else int(seed))
        eos_set = self.backend.eos_token_ids()
        eos = torch.tensor(sorted(eos_set), device=self.device, dtype=torch.long)
        groups = self._batches(rows, batch_size)
        bar = tqdm(total=len(rows), desc="generate", unit="resp", disable=_quiet(progress, len(groups)))
        for idx in groups:
            batch = encode_rows(self.tokenizer, [rows[i] for i in idx], idx).to(self.device)
            finish = reader(batch, idx) if reader else None
            new_ids, finished = self._decode(batch, max_new_tokens, temperature, top_p, generator, eos, use_cache)
            for j, i in enumerate(idx):
                ids = new_ids[j].tolist()
                if finished[j]:
                    stop = next(k for k, t in enumerate(ids) if t in eos_set)
                    ids = ids[: stop + 1]
                text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                gens[i] = Generation(convs[i], text, rows[i][0], ids, bool(finished[j]))
            if finish:
                finish(new_ids)
            bar.update(len(idx))
        bar.close()
        done = [g for g in gens if g is not None]
        return [g.text for g in done], done

    def _decode(
        self,
        batch: ChatBatch,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
        eos: Tensor,
        use_cache: bool,
    ) -> tuple[Int[Tensor, "batch new"], Bool[Tensor, " batch"]]:
        """The decoding loop: one forward per new token, masks set for every step."""
        b, p = batch.input_ids.shape
        total = p + max_new_tokens
        positions = _Positions(_position_masks(batch, total))
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = int(eos[0]) if len(eos) else 0
        pad = batch.input_ids.new_tensor(pad_id)
        tokens = batch.input_ids
        attn = batch.attention_mask
        run = self._runner()
        cache = run.new_cache(b) if use_cache else None
        finished = torch.zeros(b, dtype=torch.bool, device=self.device)
        new_tokens = []
        step_input, start = tokens, 0
        for _ in range(max_new_tokens):
            with self._at(positions, start, tokens.shape[1]):
                logits = run.logits(step_input, attn, cache, last_only=True)[:, -1].float()
            nxt = _sample(logits, temperature, top_p, generator)
            nxt = torch.where(finished, pad, nxt)
            new_tokens.append(nxt)
            finished |= torch.isin(nxt, eos)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            attn = torch.cat([attn, attn.new_ones(b, 1)], dim=1)
            if bool(finished.all()):
                break
            if use_cache:
                step_input, start = nxt[:, None], tokens.shape[1] - 1
            else:
                step_input, start = tokens, 0
        return torch.stack(new_tokens, dim=1), finished

    @torch.no_grad()
    def monitor(
        self,
        prompts: Sequence[ConversationLike],
        vector: PersonaVector | Tensor,
        layer: int,
        **generate_kwargs: Any,
    ) -> list[Reading]:
        """Generate while recording every token's projection onto the vector's unit direction.

        The readings come from the same forward passes that produce the tokens (no extra
        pass). ``readings[i].last_prompt`` is the paper's pre-answer monitoring number.
        Readings at a layer that is also steered include the steering.

        Example:
            >>> readings = probe.monitor(["How should I treat my neighbours?"], vec, layer=20,
            ...                          max_new_tokens=64)
            >>> pl.plot.projection_curve(readings).show()
        """
        self.check_layer(layer)
        unit = self._vector(vector).unit(layer).to(self.device)
        buffers: dict[str, Any] = {}

        def fn(h: Tensor) -> None:
            pos = self._positions
            buffers["proj"][:, pos.start : pos.stop] = H.project(h, unit)
            return None

        def reader(batch: ChatBatch, idx: list[int]):
            width = batch.input_ids.shape[1] + generate_kwargs.get("max_new_tokens", 128)
            buffers["proj"] = torch.full((len(idx), width), math.nan, device=self.device)

            def finish(new_ids: Tensor) -> None:
                proj = buffers["proj"].cpu()
                p = batch.input_ids.shape[1]
                for j, i in enumerate(idx):
                    prompt_cols = batch.prompt_mask[j].nonzero().flatten().cpu()
                    buffers.setdefault("rows", {})[i] = (
                        batch.input_ids[j, prompt_cols].tolist(),
                        proj[j, prompt_cols].tolist(),
                        # Token k was chosen from the column before it: the last prompt
                        # token for k = 0, then each generated token in turn.
                        proj[j, p - 1 : p - 1 + new_ids.shape[1]].tolist(),
                    )

            return finish

        with self._hooked([(layer, fn)]):
            _, gens = self._generate(prompts, reader=reader, **_generate_defaults(generate_kwargs))
        out = []
        for i, g in enumerate(gens):
            p_ids, p_proj, r_proj = buffers["rows"][i]
            out.append(
                Reading(
                    text=g.text,
                    prompt_tokens=self.tokenizer.convert_ids_to_tokens(p_ids),
                    prompt_projections=p_proj,
                    response_tokens=self.tokenizer.convert_ids_to_tokens(g.response_ids),
                    response_projections=r_proj[: len(g.response_ids)],
                    layer=layer,
                )
            )
        return out


def _generate_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    defaults = dict(
        system=None, max_new_tokens=128, temperature=0.0, top_p=1.0, seed=0,
        batch_size=32, use_cache=True, progress=None,
    )
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unexpected generation arguments: {sorted(unknown)}")
    defaults.update(kwargs)
    return defaults


def _sample(
    logits: Float[Tensor, "batch vocab"],
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> Int[Tensor, " batch"]:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
