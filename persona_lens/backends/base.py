"""What ``PersonaProbe`` needs from a model: the backend contract.

A backend answers three questions about a model, and nothing more: where the residual
stream entering block ``L`` can be hooked, how to run one forward step (with or without a
KV cache), and which tokenizer and end-of-sequence ids belong to it. Hooks themselves are
added and removed only by ``PersonaProbe``.

How interventions reach the model is part of the contract (``Backend.takes``): a local
model takes them as hooks (the probe attaches each intervention's ``apply`` at
``resid_site(layer)``); an engine that exposes no modules (vLLM) takes them as declarative
specs (``Intervention.spec()``, see ``persona_lens.interventions``) with each step.

How forwards are run is the other half (``Backend.runs``): a local model runs the probe's own
steps (one forward per token, :meth:`Backend.logits`); an engine that schedules whole requests
itself (vLLM) takes :class:`EngineRequest` values, each with its own specs and position masks,
and returns an :class:`EngineResult` per request (:meth:`Backend.run`).

Layer ``L < n_layers`` is the input of block ``L``; layer ``n_layers`` is the output of the
last block, before the final norm (docs/method.md).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn


@dataclass
class EngineRequest:
    """One request for an engine that runs whole requests (``Backend.runs == "requests"``).

    Attributes:
        prompt_ids: the prompt's tokens (chat template included).
        response_ids: a given response to read after the prompt (captures); empty to generate.
        max_new_tokens: tokens to generate (0: read the prompt and response, generate nothing).
        specs: the request's own interventions and readings, in the order they run
            (``Steer.spec()``, ``Ablate.spec()``, ``Capture.spec()``, ``Project.spec()``).
        masks: position kind -> ``[1, total]`` bool mask over every position the request may
            reach (``persona_lens.probe.positions``), prompt first.

    Example:
        >>> r = EngineRequest([1, 2, 3], [], 4, [], {"all": torch.ones(1, 7, dtype=torch.bool)})
        >>> r.max_new_tokens, r.masks["all"].shape
        (4, torch.Size([1, 7]))
    """

    prompt_ids: list[int]
    response_ids: list[int]
    max_new_tokens: int
    specs: list[dict]
    masks: dict[str, Tensor]


@dataclass
class EngineResult:
    """What an engine returns for one :class:`EngineRequest`.

    Attributes:
        new_ids: generated tokens, the stop token included when one ended the request.
        finished: True if an end-of-sequence token ended it.
        reads: one entry per read spec of the request, in their order: a capture gives
            ``{reduction: [d_model] float32 sum over its positions}``; a projection gives a
            ``[total]`` float32 tensor by position (NaN where no forward reached).

    Example:
        >>> r = EngineResult([5, 9, 2], True, [{"response_mean": torch.zeros(4)}])
        >>> r.finished, r.reads[0]["response_mean"].shape
        (True, torch.Size([4]))
    """

    new_ids: list[int]
    finished: bool
    reads: list[Any] = field(default_factory=list)


class Backend:
    """Base: what ``PersonaProbe`` needs from a model."""

    kind: str = "abstract"
    #: How interventions reach this model: ``"hooks"`` (the probe attaches them at
    #: ``resid_site``) or ``"specs"`` (an engine with no modules to hook receives the active
    #: interventions' specs with each step).
    takes: str = "hooks"
    #: How forwards run: ``"steps"`` (the probe's own loop calls :meth:`logits`) or
    #: ``"requests"`` (an engine that schedules whole requests: :meth:`run`).
    runs: str = "steps"

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
    def n_ctx(self) -> int | None:
        """The longest input the model was built for, in tokens (None if it does not say):
        TransformerLens's ``cfg.n_ctx``, else the HF config's ``max_position_embeddings``."""
        n = getattr(getattr(self.model, "cfg", None), "n_ctx", None)
        if n is None:
            config = getattr(getattr(self, "hf", None), "config", None)
            n = getattr(config, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

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

    def receive(self, specs: list[dict], masks: dict[str, Tensor]) -> None:
        """Spec-taking engines only (``takes = "specs"``): the active interventions' specs
        (``Intervention.spec()``, in the order they run) and the ``[batch, pos]`` position
        masks of the columns the next :meth:`logits` call sees."""
        raise NotImplementedError

    def run(self, requests: Sequence[EngineRequest], *, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = 0, progress: bool = False) -> list[EngineResult]:
        """Request-running engines only (``runs = "requests"``): every request generated or
        read with its own specs; results in the requests' order."""
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
