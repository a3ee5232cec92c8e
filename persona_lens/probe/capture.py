"""Capture and projection: streaming per-row reductions of the residual stream.

Every batch is one forward (ended early once the deepest requested layer is read); hooks
sum activations over each reduction's positions in float32 and hand per-row results to a
sink, so memory does not grow with the number of conversations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from persona_lens import ops as H
from persona_lens import validate as V
from persona_lens.chat import ChatBatch, ConversationLike, as_conversations, chat_rows, encode_rows
from persona_lens.interventions import Capture, Project
from persona_lens.probe.owner import HookFn, WindowMasks
from persona_lens.probe.positions import Positions, batch_positions
from persona_lens.progress import bar as progress_bar
from persona_lens.progress import quiet
from persona_lens.vectors import PersonaVector


class StopForward(Exception):
    """Raised by a capture hook once the deepest requested layer is recorded."""


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


def _reductions(reductions: Any) -> tuple[str, ...]:
    """One reduction name or several, each checked (a bare name is one reduction)."""
    if isinstance(reductions, str):
        reductions = [reductions]
    given = V.items("reductions", reductions, what="a reduction name or a list of them", nonempty=True)
    return tuple(dict.fromkeys(H.check_reduction(r) for r in given))


class CaptureMixin:
    """``capture``, ``capture_mean`` and ``project`` of :class:`PersonaProbe`."""

    def _batches(self, rows: list, batch_size: int) -> list[list[int]]:
        """Indices grouped into batches of similar length (less padding, same results)."""
        batch_size = V.integer("batch_size", batch_size, min=1)
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def _run_reductions(
        self,
        rows: list[tuple[list[int], list[int]]],
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
        V.optional_boolean("progress", progress)
        reads = [Capture(l, tuple(reductions)) for l in layers]
        self._check_context([len(p) + len(r) for p, r in rows], "conversations")
        deepest = max(layers)
        slot = {l: i for i, l in enumerate(layers)}
        current: dict[str, Tensor] = {}

        def make(read: Capture) -> HookFn:
            def fn(h: Tensor) -> None:
                for r, total in read.read(h, WindowMasks(self, h)).items():
                    current[r][:, slot[read.layer]] = total
                if read.layer == deepest:
                    raise StopForward
                return None

            return fn

        def fresh(n: int) -> None:
            for r in reductions:
                current[r] = torch.zeros(n, len(layers), self.d_model, device=self.device)

        def fill(j: int, got: list) -> None:  # an engine's reads of one row, one per Capture
            for read, sums in zip(reads, got):
                for r in reductions:
                    current[r][j, slot[read.layer]] = sums[r]

        if self._on_engine:
            source = self._engine_stream(rows, batch_size, progress, "capture", reads, fresh, fill)
        else:
            source = self._stream(rows, batch_size, progress, "capture", fresh)
        with self._hooked([] if self._on_engine else [(read.layer, make(read)) for read in reads]):
            for batch, positions in source:
                counts = {r: positions.masks[Capture.KIND[r]].sum(1) for r in reductions}
                reduced = {
                    r: current[r] / counts[r].clamp(min=1).to(torch.float32)[:, None, None]
                    for r in reductions
                }
                for r in reductions:
                    if not bool(torch.isfinite(reduced[r][counts[r] > 0]).all()):
                        raise V.NumericalError(self._numerical_message(f"the {r} activations captured at layers {layers}"))
                sink(batch, reduced, counts)

    def _stream(
        self,
        rows: list[tuple[list[int], list[int]]],
        batch_size: int,
        progress: bool | None,
        desc: str,
        before: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[ChatBatch, Positions]]:
        """Run a forward over each length-sorted batch of ``rows`` and yield it afterwards.

        Hooks read what they need during the forward and may end it early with
        ``StopForward``; ``before(batch_len)`` runs ahead of each forward.
        """
        groups = self._batches(rows, batch_size)
        run = self._runner()
        with progress_bar(total=len(rows), desc=desc, unit="conv", disable=quiet(progress, len(groups))) as bar:
            for idx in groups:
                batch = encode_rows(self.tokenizer, [rows[i] for i in idx], idx).to(self.device)
                positions = batch_positions(batch)
                if before is not None:
                    before(len(idx))
                with self._at(positions, 0, batch.input_ids.shape[1]):
                    try:
                        self._step(run, batch.input_ids, batch.attention_mask, None, last_only=True)
                    except StopForward:
                        pass
                yield batch, positions
                bar.update(len(idx))

    def _engine_stream(
        self,
        rows: list[tuple[list[int], list[int]]],
        batch_size: int,
        progress: bool | None,
        desc: str,
        reads: Sequence[Any],
        before: Callable[[int], None],
        fill: Callable[[int, list], None],
    ) -> Iterator[tuple[ChatBatch, Positions]]:
        """:meth:`_stream` on an engine: each batch of rows is one engine call that reads the
        prompt and response of every row (nothing is generated); ``fill(j, reads)`` hands row
        ``j``'s readings over before the batch is yielded."""
        groups = self._batches(rows, batch_size)
        with progress_bar(total=len(rows), desc=desc, unit="conv", disable=quiet(progress, len(groups))) as bar:
            for idx in groups:
                batch = encode_rows(self.tokenizer, [rows[i] for i in idx], idx)
                before(len(idx))
                for j, res in enumerate(self._engine_run([rows[i] for i in idx], 0, reads)):
                    fill(j, res.reads)
                yield batch, batch_positions(batch)
                bar.update(len(idx))

    @torch.no_grad()
    def capture(
        self,
        conversations: Sequence,
        *,
        layers: int | Sequence | None = None,
        reductions: str | Sequence = ("response_mean",),
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
            >>> acts = probe.capture(pos_convs[:3], layers=[2, 3], reductions=["response_mean", "last_prompt"])
            >>> acts.at("response_mean", 3).shape          # [n_samples, d_model]
            torch.Size([3, 128])
            >>> acts["last_prompt"].shape                  # [n_samples, layers, d_model]
            torch.Size([3, 2, 128])
        """
        rows = chat_rows(self.tokenizer, as_conversations(conversations), with_response=True)
        return self._capture_rows(rows, layers=layers, reductions=reductions, batch_size=batch_size,
                                  progress=progress)

    @torch.no_grad()
    def _capture_rows(
        self,
        rows: list[tuple[list[int], list[int]]],
        *,
        layers: int | Sequence | None,
        reductions: str | Sequence,
        batch_size: int,
        progress: bool | None,
    ) -> Activations:
        """:meth:`capture` of conversations already tokenized (``chat.chat_rows`` rows)."""
        layer_list = self._layers(layers)
        reductions = _reductions(reductions)
        out = {r: torch.empty(len(rows), len(layer_list), self.d_model) for r in reductions}

        def sink(batch: ChatBatch, reduced: dict[str, Tensor], counts: dict[str, Tensor]) -> None:
            for r, t in reduced.items():
                t = t.masked_fill((counts[r] == 0)[:, None, None], math.nan)
                out[r][batch.index] = t.cpu()

        self._run_reductions(rows, layer_list, reductions, batch_size, progress, sink)
        return Activations(layer_list, out)

    @torch.no_grad()
    def capture_mean(
        self,
        conversations: Sequence,
        *,
        layers: int | Sequence | None = None,
        reductions: str | Sequence = ("response_mean",),
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
            >>> pos.counts["response_mean"], tuple(vec.directions.shape)
            (100, (7, 128))
        """
        conversations = as_conversations(conversations)
        layer_list = self._layers(layers)
        reductions = _reductions(reductions)
        if into is not None and not isinstance(into, ActivationMean):
            raise V.InvalidArgumentType("into", into, "an ActivationMean from an earlier capture_mean (or None)")
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

        rows = chat_rows(self.tokenizer, conversations, with_response=True)
        self._run_reductions(rows, layer_list, reductions, batch_size, progress, sink)
        return acc

    @torch.no_grad()
    def project(
        self,
        conversations: Sequence,
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
            >>> scores = probe.project(prompts, vec, layer=3, at="last_prompt")   # one number each
            >>> scores.shape
            torch.Size([4])
            >>> evil = probe.project(prompts[:1], vec, layer=3, at="last_prompt")
            >>> nice = probe.project([[{"role": "system", "content": trait.system_prompts(0)[1]},
            ...                        {"role": "user", "content": prompts[0]}]], vec, layer=3)
            >>> bool(evil > nice)   # a suppressing system prompt lowers the reading
            True
        """
        layer = self.check_layer(layer)
        V.choice("at", at, ("last_prompt", "prompt_mean", "response_mean", "tokens"))
        unit = self._vector(vector).unit(layer)
        convs = as_conversations(conversations)
        if at in ("last_prompt", "prompt_mean"):
            # A prompt alone is a conversation with an empty response.
            convs = [c if c[-1]["role"] == "assistant" else c + [{"role": "assistant", "content": ""}] for c in convs]
        if at == "tokens":
            return self._project_tokens(convs, unit, layer, batch_size, progress)
        acts = self.capture(convs, layers=[layer], reductions=[H.check_reduction(at)], batch_size=batch_size, progress=progress)
        return acts.at(at, layer) @ unit

    def _project_tokens(self, convs, unit, layer, batch_size, progress) -> list[Tensor]:
        rows = chat_rows(self.tokenizer, convs, with_response=True)
        self._check_context([len(p) + len(r) for p, r in rows], "conversations")
        out: list[Tensor] = [torch.empty(0)] * len(rows)
        read = Project(layer, unit.to(self.device))
        current: dict[str, Tensor] = {}
        if self._on_engine:
            def fresh(n: int) -> None:
                current["p"] = torch.full((n, max(len(p) + len(r) for p, r in rows)), math.nan, device=self.device)

            def fill(j: int, got: list) -> None:  # right-aligned, as the local batch is left-padded
                current["p"][j, current["p"].shape[1] - got[0].shape[0]:] = got[0]

            for batch, _ in self._engine_stream(rows, batch_size, progress, "project", [read], fresh, fill):
                width = batch.input_ids.shape[1]
                p = current["p"][: len(batch.index), -width:]
                if not bool(torch.isfinite(p[batch.attention_mask.bool()]).all()):
                    raise V.NumericalError(self._numerical_message(f"the projections at layer {layer}"))
                for j, i in enumerate(batch.index):
                    out[i] = p[j][batch.response_mask[j]].cpu()
            return out

        def fn(h: Tensor) -> None:
            current["p"] = read.read(h)
            raise StopForward

        with self._hooked([(layer, fn)]):
            for batch, _ in self._stream(rows, batch_size, progress, "project"):
                if not bool(torch.isfinite(current["p"][batch.attention_mask.bool()]).all()):
                    raise V.NumericalError(self._numerical_message(f"the projections at layer {layer}"))
                for j, i in enumerate(batch.index):
                    out[i] = current["p"][j][batch.response_mask[j]].cpu()
        return out

