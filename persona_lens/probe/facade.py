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
from typing import Any, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn

from persona_lens.backends import Backend
from persona_lens.chat import ChatBatch, ConversationLike
from persona_lens.interventions import Ablate, Steer
from persona_lens.ops import check_position_kind
from persona_lens.probe.capture import CaptureMixin
from persona_lens.probe.generation import GenerationMixin
from persona_lens.probe.owner import HookOwner
from persona_lens.probe.positions import batch_positions
from persona_lens.vectors import PersonaVector, check_layer


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

    Example:
        >>> import persona_lens as pl
        >>> smollm2 = pl.PersonaProbe(pl.load_model("smollm2-135m-instruct"))
        >>> smollm2.generate(["What is the capital of France?"], max_new_tokens=16)
        ['The capital of France is Paris.']
    """

    def __init__(self, model: "nn.Module | Backend", tokenizer: Any = None, *, path: str = "auto"):
        super().__init__(model, tokenizer, path=path)

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
        vec = self._vector(vector)
        check_position_kind(positions)
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
        kinds = (positions, "last_prompt") if positions == "response" and include_last_prompt else (positions,)
        edits = [Steer(l, vec[l].to(device=device, dtype=dtype), c, kinds) for l, c in plan.items()]
        with self._intervening(edits):
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
            >>> with probe.ablate(vec, layers=[3]):
            ...     readings = probe.project(prompts, vec, layer=3)
            >>> readings.abs().max() < 1e-3     # nothing left along the direction there
            tensor(True)
        """
        vec = self._vector(vector)
        check_position_kind(positions)
        layer_list = [layers] if isinstance(layers, int) else list(layers)
        if not layer_list:
            raise ValueError("layers is empty")
        edits = [Ablate(self.check_layer(int(l)), vec.unit(int(l)).to(self.device), positions) for l in layer_list]
        with self._intervening(edits):
            yield self

    # -- forward passes -------------------------------------------------------------------
    def encode(self, conversations: Sequence[ConversationLike], *, with_response: bool) -> ChatBatch:
        """Encode conversations with this model's tokenizer (see ``persona_lens.chat``)."""
        from persona_lens.chat import encode_chat

        return encode_chat(self.tokenizer, conversations, with_response=with_response)

    def forward(self, batch: ChatBatch) -> Float[Tensor, "batch pos vocab"]:
        """Full forward pass over an encoded batch, with position masks set for hooks.

        Example:
            >>> batch = probe.encode(pos_convs[:2], with_response=True)
            >>> with probe.steer(vec, layer=3, positions="response"):
            ...     logits = probe.forward(batch)
            >>> logits.shape == (*batch.input_ids.shape, len(probe.tokenizer))
            True
        """
        batch = batch.to(self.device)
        positions = batch_positions(batch)
        run = self._runner()
        with self._at(positions, 0, batch.input_ids.shape[1]):
            return self._step(run, batch.input_ids, batch.attention_mask, None, last_only=False)

