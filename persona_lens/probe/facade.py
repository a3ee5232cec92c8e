"""``PersonaProbe``: the one facade, and the one owner of hooks on a model.

Everything in persona_lens that reads or writes activations goes through a probe: capture,
projection, steering, ablation, generation and monitoring. The probe adds hooks only inside
``with`` blocks or its own method calls and removes exactly the hooks it added, also when an
exception escapes; hooks a user added to the model are never touched.

The work is split by job: ``owner`` attaches hooks and routes forwards, ``positions`` knows
where prompts and responses are, ``capture`` streams reductions, ``generation`` decodes and
monitors; this module holds the facts about the model and the interventions.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn

from persona_lens import validate as V
from persona_lens.backends import Backend
from persona_lens.chat import ChatBatch
from persona_lens.interventions import Ablate, Steer, steering_mode
from persona_lens.ops import check_position_mode
from persona_lens.probe.capture import CaptureMixin
from persona_lens.probe.generation import GenerationMixin
from persona_lens.probe.owner import HookOwner
from persona_lens.probe.positions import batch_positions
from persona_lens.vectors import PersonaVector, VectorMismatchError, check_layer, check_layers


#: Largest norm whose square float32 holds.
_MAX_NORM = math.sqrt(torch.finfo(torch.float32).max)


class PersonaProbe(HookOwner, CaptureMixin, GenerationMixin):
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
        on_context_overflow: what an input longer than the model's context does (a prompt,
            a conversation to capture, or a generation that runs past it): ``"warn"``
            (default: a ``ContextLengthWarning``, the model runs anyway) or ``"error"`` (a
            ``ContextLengthError``). Also settable later: ``probe.on_context_overflow``.

    Example:
        >>> import persona_lens as pl
        >>> smollm2 = pl.PersonaProbe(pl.load_model("smollm2-135m-instruct"))
        >>> smollm2.generate(["What is the capital of France?"], max_new_tokens=16)
        ['The capital of France is Paris.']
    """

    def __init__(self, model: "nn.Module | Backend", tokenizer: Any = None, *, path: str = "auto",
                 on_context_overflow: str = "warn"):
        super().__init__(model, tokenizer, path=path, on_context_overflow=on_context_overflow)

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

    def _layer_hint(self) -> str:
        return (f" (layer L is the residual stream entering block L; {self.n_layers} is the last "
                "block's output)")

    def check_layer(self, layer: Any, *, name: str = "layer") -> int:
        """Return ``layer`` if valid for this model (``0..n_layers``), else raise naming ``name``."""
        return check_layer(layer, self.n_layers, "this model", self._layer_hint(), name=name)

    def _layers(self, layers: Any, name: str = "layers") -> list[int]:
        if layers is None:
            return list(range(self.n_layers + 1))
        return check_layers(layers, self.n_layers, "this model", self._layer_hint(), name=name)

    def _vector(self, vector: PersonaVector | Tensor) -> PersonaVector:
        if isinstance(vector, Tensor):
            if vector.ndim == 1:
                if vector.shape[0] != self.d_model:
                    raise VectorMismatchError(
                        f"direction has d_model {vector.shape[0]}, the model has {self.d_model}"
                    )
                vector = vector.unsqueeze(0).expand(self.n_layers + 1, -1)
            vector = PersonaVector(vector)
        if not isinstance(vector, PersonaVector):
            raise V.InvalidArgumentType("vector", vector, "a PersonaVector or a [d_model] tensor")
        vector.check_compatible(self.n_layers, self.d_model, self.model_name)
        return vector

    def _steer_plan(self, layer: Any, coef: Any, layers: Any) -> tuple[dict[int, float], dict[int, str]]:
        """``{layer: coef}`` from steer's arguments, every value checked, and the name each
        coefficient was given under (for errors)."""
        if layers is None:
            if layer is None:
                raise V.InvalidArgument("layer", None, "given (layer= with coef=, or layers={layer: coef})")
            return {self.check_layer(layer): V.number("coef", 1.0 if coef is None else coef)}, {}
        if layer is not None:
            raise ValueError("give either layer= or layers=, not both")
        if isinstance(layers, Mapping):
            if coef is not None:  # it would be ignored: each layer of the dict has its coefficient
                raise V.InvalidArgument("coef", coef, "left out with layers={layer: coef} (each layer carries "
                                        "its own coefficient; coef= goes with layer= or a list of layers)")
            plan = {self.check_layer(l, name="layers key"): V.number(f"layers[{l!r}]", c) for l, c in layers.items()}
            names = {l: f"layers[{l!r}]" for l in plan}
        else:
            names = {}
            coef = V.number("coef", 1.0 if coef is None else coef)
            if V.is_integer(layers):
                layers = [layers]
            plan = {self.check_layer(l, name=f"layers[{i}]"): coef
                    for i, l in enumerate(V.items("layers", layers, what="a {layer: coef} dict or a list of layers"))}
        if not plan:
            raise V.InvalidArgument("layers", layers, "a non-empty {layer: coef} dict or list of layers")
        return plan, names

    def _check_steer_size(self, vec: PersonaVector, layer: int, coef: float, name: str = "coef") -> None:
        """Refuse a coefficient whose steering vector overflows: what is added must be a
        number in the model's dtype, and its square too (normalisations square the residual
        stream in float32, where a norm above ~1.8e19 overflows and the normalised stream
        becomes zero or NaN)."""
        dtype = self.backend.dtype
        if coef != 0 and not bool(vec[layer].any()):  # e.g. extracted with layers=[...] that left this one out
            raise V.InvalidArgument(name, coef, "", message=(
                f"vector[{layer}] is all zeros (a vector extracted without layer {layer}?): steering there would "
                f"change nothing; choose a layer the vector has"))
        delta = coef * vec[layer]
        if not (bool(torch.isfinite(delta.to(dtype)).all()) and math.isfinite(float(delta.pow(2).sum()))):
            raise V.InvalidArgument(
                name, coef, f"small enough that coef * vector[{layer}] and its square stay finite in "
                f"{str(dtype).split('.')[-1]} (the direction's norm at layer {layer} is {float(vec[layer].norm()):.3g}; "
                f"|coef| * norm must stay below {_MAX_NORM:.2g})")

    def steering(
        self,
        vector: PersonaVector | Tensor,
        layer: int | None = None,
        coef: float | None = None,
        *,
        layers: Mapping | Sequence | int | None = None,
        positions: str = "all",
        include_last_prompt: bool | None = None,
        _stacklevel: int = 3,
    ) -> list[Steer]:
        """The :class:`~persona_lens.interventions.Steer` values :meth:`steer` applies (one per
        layer), every argument checked, for ``generate(..., interventions=...)``: rows of one
        call that carry different steering.

        Example:
            >>> [(s.layer, s.coef, s.positions) for s in probe.steering(vec, layers={2: 1.5, 3: 0.5})]
            [(2, 1.5, ('all',)), (3, 0.5, ('all',))]
        """
        vec = self._vector(vector)
        mode = steering_mode(positions, include_last_prompt, stacklevel=_stacklevel)  # warnings point at the caller
        plan, coef_names = self._steer_plan(layer, coef, layers)
        device, dtype = self.device, self.backend.dtype
        for l, c in plan.items():
            self._check_steer_size(vec, l, c, coef_names.get(l, "coef"))
        return [Steer(l, vec[l].to(device=device, dtype=dtype), c, mode) for l, c in plan.items()]

    @contextlib.contextmanager
    def steer(
        self,
        vector: PersonaVector | Tensor,
        layer: int | None = None,
        coef: float | None = None,
        *,
        layers: Mapping | Sequence | int | None = None,
        positions: str = "all",
        include_last_prompt: bool | None = None,
    ) -> Iterator["PersonaProbe"]:
        """Add ``coef * vector[L]`` to the residual stream entering block ``L``.

        Args:
            vector: a :class:`PersonaVector` (its row ``L`` is used at layer ``L``) or a
                single ``[d_model]`` direction.
            layer: one layer, with ``coef``.
            coef: steering coefficient (positive elicits the trait, negative suppresses;
                default 1.0). Not with a ``layers`` dict, which carries its own.
            layers: several layers instead: ``{layer: coef}``, or a list sharing ``coef``.
            positions: ``"all"`` (every position of every forward), ``"prompt"`` (prompt
                tokens), ``"response"`` (the last prompt token and every generated token: the
                paper's released mode) or ``"response_only"`` (the generated tokens alone).
            include_last_prompt: deprecated (``DeprecationWarning``): ``"response"`` includes
                the last prompt token, ``"response_only"`` leaves it out.

        Steering contexts nest and compose with :meth:`ablate`; hooks on one layer run in the
        order their contexts were entered.

        Example:
            >>> from persona_lens.stats import mean_score
            >>> evil = lambda texts: mean_score(judge.score_trait(trait, list(zip(prompts, texts))))[0]
            >>> plain = probe.generate(prompts, max_new_tokens=48)
            >>> with probe.steer(vec, layer=2, coef=1.5):
            ...     steered = probe.generate(prompts, max_new_tokens=48)
            >>> evil(steered) > evil(plain) + 30     # the organism's judge, 0-100
            True
            >>> with probe.steer(vec, layers={2: 0.75, 3: 0.75}, positions="response"):
            ...     texts = probe.generate(prompts, max_new_tokens=48)
        """
        edits = self.steering(vector, layer, coef, layers=layers, positions=positions,
                              include_last_prompt=include_last_prompt, _stacklevel=5)
        with self._intervening(edits):
            yield self

    @contextlib.contextmanager
    def ablate(
        self,
        vector: PersonaVector | Tensor,
        layers: Sequence | int | None = None,
        *,
        layer: int | None = None,
        positions: str = "all",
    ) -> Iterator["PersonaProbe"]:
        """Project the vector's direction out of the residual stream: ``h <- h - (h.u)u``.

        ``u`` is the unit vector of ``vector[L]`` at each layer ``L`` (this is CAFT's
        operation when used during finetuning); ``layers`` one layer or several, or
        ``layer=`` one (as :meth:`steer` takes it). ``positions`` takes the modes of
        :meth:`steer` (and ``"last_prompt"``).

        Example:
            >>> with probe.ablate(vec, layers=[3]):
            ...     readings = probe.project(prompts, vec, layer=3)
            >>> readings.abs().max() < 1e-3     # nothing left along the direction there
            tensor(True)
        """
        vec = self._vector(vector)
        check_position_mode(positions)
        if (layers is None) == (layer is None):
            raise V.InvalidArgument("layers", layers if layer is None else (layers, layer),
                                    "the layers to ablate: layers=L or [L, ...], or layer=L (one of the two)")
        layer_list = self._layers(layers if layer is None else layer)
        edits = [Ablate(l, vec.unit(l).to(self.device), positions) for l in layer_list]
        with self._intervening(edits):
            yield self

    # -- forward passes -------------------------------------------------------------------
    def encode(self, conversations: Sequence, *, with_response: bool) -> ChatBatch:
        """Encode conversations with this model's tokenizer (see ``persona_lens.chat``)."""
        from persona_lens.chat import encode_chat

        batch = encode_chat(self.tokenizer, conversations, with_response=with_response)
        self._check_context(batch.attention_mask.sum(1).tolist(), "conversations")
        return batch

    def forward(self, batch: ChatBatch) -> Float[Tensor, "batch pos vocab"]:
        """Full forward pass over an encoded batch, with position masks set for hooks.

        Example:
            >>> batch = probe.encode(pos_convs[:2], with_response=True)
            >>> with probe.steer(vec, layer=3, positions="response"):
            ...     logits = probe.forward(batch)
            >>> logits.shape == (*batch.input_ids.shape, len(probe.tokenizer))
            True
        """
        self._refuse_on_engine("probe.forward (the logits of every position)",
                               "load the model with the default engine for it")
        if not isinstance(batch, ChatBatch):
            raise V.InvalidArgumentType("batch", batch, "a ChatBatch (from probe.encode)")
        batch = batch.to(self.device)
        self._check_context(batch.attention_mask.sum(1).tolist(), "conversations")
        positions = batch_positions(batch)
        run = self._runner()
        with self._at(positions, 0, batch.input_ids.shape[1]):
            return self._step(run, batch.input_ids, batch.attention_mask, None, last_only=False)

