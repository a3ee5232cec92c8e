"""Generation: the decoding loop, sampling and monitoring of :class:`PersonaProbe`.

One forward per new token, KV-cached or not, with position masks set for every step so that
active interventions act on the right columns; monitoring reads projections from the same
forwards that produce the tokens. ``GenerationSettings`` is the one place generation
defaults are written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from persona_lens import validate as V
from persona_lens.chat import ChatBatch, ConversationLike, as_conversations, chat_rows, encode_rows
from persona_lens.interventions import Project
from persona_lens.probe.positions import batch_positions
from persona_lens.progress import bar as progress_bar
from persona_lens.progress import quiet
from persona_lens.vectors import PersonaVector


@dataclass(frozen=True)
class GenerationSettings:
    """Generation settings and their defaults (``probe.generate``'s keyword arguments).

    Example:
        >>> GenerationSettings(max_new_tokens=16).temperature
        0.0
    """

    system: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    batch_size: int = 32
    use_cache: bool = True
    progress: bool | None = None

    def __post_init__(self) -> None:
        # Every setting is checked here, where the defaults live: a NaN temperature or a
        # top_p of 0 would otherwise reach torch's sampler and fail inside it.
        set_ = object.__setattr__
        V.text("system", self.system, none_ok=True)
        set_(self, "max_new_tokens", V.integer("max_new_tokens", self.max_new_tokens, min=1))
        set_(self, "temperature", V.number("temperature", self.temperature, min=0))
        set_(self, "top_p", V.number("top_p", self.top_p, min=0, max=1, min_open=True))
        set_(self, "seed", V.integer("seed", self.seed, min=-(2**63), max=2**64 - 1, none_ok=True))  # torch's range
        set_(self, "batch_size", V.integer("batch_size", self.batch_size, min=1))
        set_(self, "use_cache", V.boolean("use_cache", self.use_cache))
        set_(self, "progress", V.optional_boolean("progress", self.progress))

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "GenerationSettings":
        """Settings from keyword arguments; an unknown name is an error naming it."""
        unknown = sorted(set(kwargs) - set(cls.__dataclass_fields__))
        if unknown:
            raise V.InvalidArgumentType.unknown(unknown[0], kwargs[unknown[0]], cls.__dataclass_fields__,
                                                "generation setting")
        return cls(**kwargs)


DEFAULTS = GenerationSettings()


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
        """Mean projection over the answer's own token positions, as ``project(...,
        at="response_mean")`` computes it for the same answer. ``response_projections[0]`` is
        the last prompt token's reading, so it is left out; an answer cut at
        ``max_new_tokens`` lacks its last token's reading (that token was never fed back).
        NaN for an empty answer."""
        vals = self.response_projections[1:]
        return sum(vals) / len(vals) if vals else math.nan

    def __repr__(self) -> str:
        from persona_lens.display import reading_repr

        return reading_repr(self)

    def _repr_html_(self) -> str:
        """In a notebook: the answer, each token coloured by its reading (``display``)."""
        from persona_lens.display import reading_html

        return reading_html(self)


class GenerationMixin:
    """``generate`` and ``monitor`` of :class:`PersonaProbe`."""

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence,
        *,
        system: str | None = DEFAULTS.system,
        max_new_tokens: int = DEFAULTS.max_new_tokens,
        temperature: float = DEFAULTS.temperature,
        top_p: float = DEFAULTS.top_p,
        seed: int | None = DEFAULTS.seed,
        batch_size: int = DEFAULTS.batch_size,
        use_cache: bool = DEFAULTS.use_cache,
        return_generations: bool = False,
        progress: bool | None = DEFAULTS.progress,
        interventions: Sequence[Sequence[Any]] | None = None,
        on_text: Callable[[int, str], Any] | None = None,
    ) -> list[str] | list[Generation]:
        """Generate responses to chat prompts; active steering/monitoring hooks apply.

        Args:
            prompts: user-message strings or message lists (not ending in an assistant turn).
            system: a system prompt put in front of every prompt.
            temperature: 0 for greedy decoding, else sampling at this temperature.
            top_p: nucleus sampling threshold.
            seed: seeds sampling (one generator per call; same seed, same batches -> same text);
                None samples unseeded (other text each call).
            use_cache: KV-cached decoding (uncached gives the same tokens, slower).
            return_generations: return :class:`Generation` records instead of strings.
            interventions: per prompt, a list of its own ``Steer`` / ``Ablate`` values (see
                :meth:`PersonaProbe.steering`), applied after the active ones: rows of one call
                may carry different vectors and coefficients. The vLLM engine runs them all as
                one batch; a local model runs one batch per distinct list.
            on_text: called as ``on_text(i, text)`` each time the answer to ``prompts[i]``
                grows, with the new text only: the pieces of one answer join to exactly its
                final text (a character whose bytes are not all generated yet waits for
                them). Returning True stops that answer where it is (the other rows go on,
                unchanged); an exception raised in it stops the call and propagates, with
                every hook removed. The vLLM engine runs whole requests: there it is called
                once per answer, when the answer is complete.

        Example:
            >>> smollm2.generate(["What is the capital of France?"], max_new_tokens=16)
            ['The capital of France is Paris.']
            >>> outs = probe.generate(prompts[:2], temperature=1.0, seed=3, return_generations=True)
            >>> [g.text for g in outs] == probe.generate(prompts[:2], temperature=1.0, seed=3)
            True
            >>> cells = [probe.steering(vec, layer=2, coef=c) for c in (0.0, 1.5)]
            >>> both = probe.generate([prompts[0]] * 2, max_new_tokens=16, interventions=cells)
            >>> with probe.steer(vec, layer=2, coef=1.5):
            ...     alone = probe.generate(prompts[:1], max_new_tokens=16)
            >>> both[1] == alone[0]
            True
            >>> pieces = []
            >>> text = probe.generate(prompts[:1], on_text=lambda i, t: pieces.append(t))[0]
            >>> "".join(pieces) == text and len(pieces) > 1     # print(t, end="") shows it live
            True
        """
        prompts = as_conversations(prompts, name="prompts")
        V.boolean("return_generations", return_generations)
        if on_text is not None and not callable(on_text):
            raise V.InvalidArgumentType("on_text", on_text, "a function on_text(i, text), e.g. "
                                        "lambda i, t: print(t, end=\"\")")
        settings = GenerationSettings(
            system=system, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seed=seed, batch_size=batch_size, use_cache=use_cache, progress=progress,
        )
        if interventions is not None:
            interventions = V.items("interventions", interventions, what="a list of interventions per prompt")
            if len(interventions) != len(prompts):
                raise V.InvalidArgument("interventions", interventions, f"one list per prompt ({len(prompts)})",
                                        f": {len(interventions)} lists")
            interventions = [list(V.items(f"interventions[{i}]", ivs, what="a list of Steer / Ablate values"))
                             for i, ivs in enumerate(interventions)]
        if interventions is None or not any(interventions):
            texts, gens = self._generate(prompts, settings, reader=None, on_text=on_text)
        elif self._on_engine:
            gens, _ = self._generate_on_engine(prompts, settings, extra=interventions)
            _whole_answers(gens, on_text)
            texts = [g.text for g in gens]
        else:
            gens = self._generate_per_row(prompts, settings, interventions, on_text)
            texts = [g.text for g in gens]
        return gens if return_generations else texts

    def _generate_per_row(self, prompts, settings, interventions, on_text=None) -> list[Generation]:
        """A local model: one batch per distinct list of interventions, in order of first use."""
        groups: dict[tuple, list[int]] = {}
        for i, ivs in enumerate(interventions):
            groups.setdefault(tuple(id(iv) for iv in ivs), []).append(i)
        gens: list[Generation | None] = [None] * len(prompts)
        for idx in groups.values():
            # the group's own row k is the caller's prompt idx[k]
            pieces = None if on_text is None else (lambda k, t, idx=idx: on_text(idx[k], t))
            with self._intervening(interventions[idx[0]]):
                _, part = self._generate([prompts[i] for i in idx], settings, reader=None, on_text=pieces)
            for i, g in zip(idx, part):
                gens[i] = g
        return gens

    def _generate_on_engine(
        self,
        prompts: Sequence[ConversationLike],
        settings: GenerationSettings,
        extra: Sequence[Sequence[Any]] | None = None,
        reads: Sequence[Any] = (),
    ) -> tuple[list[Generation], list[Any]]:
        """Generation on an engine that runs whole requests: every prompt is one request, and
        the engine batches them itself (``batch_size`` and ``use_cache`` do not apply)."""
        convs = as_conversations(prompts, name="prompts", system=settings.system)
        rows = chat_rows(self.tokenizer, convs, with_response=False, name="prompts")
        self._check_context([len(p) for p, _ in rows], "prompts")
        results = self._engine_run(
            rows, settings.max_new_tokens, reads, extra, temperature=settings.temperature, top_p=settings.top_p,
            seed=settings.seed, progress=not quiet(settings.progress, 1))
        gens = []
        for conv, (p, _), res in zip(convs, rows, results):
            text = self.tokenizer.decode(res.new_ids, skip_special_tokens=True).strip()
            gens.append(Generation(conv, text, list(p), list(res.new_ids), bool(res.finished)))
        return gens, results

    def _generate(
        self,
        prompts: Sequence[ConversationLike],
        settings: GenerationSettings,
        reader: Callable[[ChatBatch, list[int]], Callable[[Tensor], None]] | None,
        on_text: Callable[[int, str], Any] | None = None,
    ) -> tuple[list[str], list[Generation]]:
        system, max_new_tokens, temperature = settings.system, settings.max_new_tokens, settings.temperature
        top_p, seed, batch_size, use_cache, progress = (
            settings.top_p, settings.seed, settings.batch_size, settings.use_cache, settings.progress)
        if self._on_engine:
            if reader is not None:  # pragma: no cover - monitor has its own engine path
                raise NotImplementedError("readers run on the probe's own forwards")
            gens, _ = self._generate_on_engine(prompts, settings)
            _whole_answers(gens, on_text)
            return [g.text for g in gens], gens
        convs = as_conversations(prompts, name="prompts", system=system)
        rows = chat_rows(self.tokenizer, convs, with_response=False, name="prompts")
        self._check_context([len(p) for p, _ in rows], "prompts")
        gens: list[Generation | None] = [None] * len(rows)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            if seed is None:  # unseeded, as on the vLLM engine: fresh randomness each call
                generator.seed()
            else:
                generator.manual_seed(int(seed))
        eos_set = self.backend.eos_token_ids()
        eos = torch.tensor(sorted(eos_set), device=self.device, dtype=torch.long)
        groups = self._batches(rows, batch_size)
        bar = progress_bar(total=len(rows), desc="generate", unit="resp", disable=quiet(progress, len(groups)))
        try:
            for idx in groups:
                batch = encode_rows(self.tokenizer, [rows[i] for i in idx], idx).to(self.device)
                finish = reader(batch, idx) if reader else None
                texts = None if on_text is None else _TextStream(self.tokenizer, idx, eos_set, on_text)
                new_ids, finished, lengths = self._decode(batch, max_new_tokens, temperature, top_p, generator, eos,
                                                          use_cache, on_step=texts.step if texts else None)
                for j, i in enumerate(idx):
                    ids = new_ids[j, : lengths[j]].tolist()
                    if finished[j]:
                        stop = next(k for k, t in enumerate(ids) if t in eos_set)
                        ids = ids[: stop + 1]
                    text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                    gens[i] = Generation(convs[i], text, rows[i][0], ids, bool(finished[j]))
                    if texts:
                        texts.close(j, text)
                if finish:
                    finish(new_ids)
                bar.update(len(idx))
        finally:
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
        on_step: Callable[[Tensor, Tensor], Sequence[int]] | None = None,
    ) -> tuple[Int[Tensor, "batch new"], Bool[Tensor, " batch"], list[int]]:
        """The decoding loop: one forward per new token, masks set for every step.

        Returns the new tokens, which rows ended at an end-of-sequence token, and each row's
        number of real tokens (up to where ``on_step`` stopped it: it is called after every
        step with the step's tokens and the rows already done, and returns rows to stop)."""
        b, p = batch.input_ids.shape
        total = p + max_new_tokens
        positions = batch_positions(batch, total)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = int(eos[0]) if len(eos) else 0
        pad = batch.input_ids.new_tensor(pad_id)
        tokens = batch.input_ids
        attn = batch.attention_mask
        run = self._runner()
        cache = run.new_cache(b) if use_cache else None
        finished = torch.zeros(b, dtype=torch.bool, device=self.device)
        # rows stopped by on_step: padded from then on like finished rows, but not ended by EOS
        halted = torch.zeros(b, dtype=torch.bool, device=self.device)
        lengths = [max_new_tokens] * b
        new_tokens = []
        step_input, start = tokens, 0
        longest_prompt = int(attn.sum(1).max())
        n_ctx = self.backend.n_ctx
        for step in range(max_new_tokens):
            if n_ctx is not None and longest_prompt + step == n_ctx + 1:
                self._context_overflow(
                    f"generation ran past the model's context of {n_ctx} tokens (a prompt of "
                    f"{longest_prompt} tokens and {step} generated); the tokens from here on come "
                    "from positions the model was not trained on", "lower max_new_tokens or shorten the prompts")
            with self._at(positions, start, tokens.shape[1]):
                logits = self._step(run, step_input, attn, cache, last_only=True)[:, -1].float()
            live = logits[~finished]
            # NaN or inf, or every logit equal: what overflowed activations leave after a
            # normalisation (1 / sqrt(inf) is 0), which argmax would turn into token 0.
            if not bool(torch.isfinite(live).all()) or bool((live.amax(-1) == live.amin(-1)).any()):
                raise V.NumericalError(self._numerical_message(
                    f"the model's next-token logits at generation step {step}"))
            nxt = sample(logits, temperature, top_p, generator)
            done = finished | halted
            nxt = torch.where(done, pad, nxt)
            new_tokens.append(nxt)
            finished |= torch.isin(nxt, eos) & ~done
            if on_step is not None:
                for j in on_step(nxt, done):
                    if not bool(finished[j] | halted[j]):
                        halted[j] = True
                        lengths[j] = step + 1
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            attn = torch.cat([attn, attn.new_ones(b, 1)], dim=1)
            if bool((finished | halted).all()):
                break
            if use_cache:
                step_input, start = nxt[:, None], tokens.shape[1] - 1
            else:
                step_input, start = tokens, 0
        new = torch.stack(new_tokens, dim=1)
        return new, finished, [min(n, new.shape[1]) for n in lengths]

    @torch.no_grad()
    def monitor(
        self,
        prompts: Sequence,
        vector: PersonaVector | Tensor,
        layer: int,
        **generate_kwargs: Any,
    ) -> list[Reading]:
        """Generate while recording every token's projection onto the vector's unit direction.

        The readings come from the same forward passes that produce the tokens (no extra
        pass). ``readings[i].last_prompt`` is the paper's pre-answer monitoring number.
        Readings at a layer that is also steered include the steering.

        Example:
            >>> readings = probe.monitor(prompts, vec, layer=3, max_new_tokens=32)
            >>> r = readings[0]
            >>> len(r.response_projections) == len(r.response_tokens)
            True
            >>> fig = pl.plot.projection_curve(readings)     # fig.show() in a notebook
        """
        settings = GenerationSettings.from_kwargs(generate_kwargs)
        prompts = as_conversations(prompts, name="prompts")
        layer = self.check_layer(layer)
        read = Project(layer, self._vector(vector).unit(layer).to(self.device))
        if self._on_engine:
            gens, results = self._generate_on_engine(prompts, settings, reads=[read])
            out = []
            for g, res in zip(gens, results):
                proj, p = res.reads[0], len(g.prompt_ids)
                out.append(Reading(
                    text=g.text, prompt_tokens=self.tokenizer.convert_ids_to_tokens(g.prompt_ids),
                    prompt_projections=proj[:p].tolist(),
                    response_tokens=self.tokenizer.convert_ids_to_tokens(g.response_ids),
                    # As on a local model: token k was chosen from the position before it.
                    response_projections=proj[p - 1 : p - 1 + len(g.response_ids)].tolist(), layer=layer))
            return out
        buffers: dict[str, Any] = {}

        def fn(h: Tensor) -> None:
            pos = self._positions
            proj = buffers["proj"]
            if pos.stop > proj.shape[1]:  # grow with what is generated, not with max_new_tokens
                more = proj.new_full((proj.shape[0], max(pos.stop, 2 * proj.shape[1]) - proj.shape[1]), math.nan)
                proj = buffers["proj"] = torch.cat([proj, more], dim=1)
            proj[:, pos.start : pos.stop] = read.read(h)
            return None

        def reader(batch: ChatBatch, idx: list[int]):
            width = batch.input_ids.shape[1] + min(settings.max_new_tokens, 64)
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
            _, gens = self._generate(prompts, settings, reader=reader)
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


_UNSETTLED = re.compile(r"[\s\ufffd]+$")


class _TextStream:
    """One batch's answers as text pieces for ``generate(on_text=)``.

    Each step decodes a row's tokens so far and sends what is new. Text that may still change
    is held back: a trailing replacement character (a character whose bytes are not all
    generated yet) and trailing spaces (the final text is stripped, and some tokenizers
    clean a space up when punctuation follows). So the pieces join to exactly the answer's
    final text, which :meth:`close` completes.
    """

    def __init__(self, tokenizer: Any, idx: Sequence[int], eos: set[int], on_text: Callable[[int, str], Any]):
        self.tokenizer, self.idx, self.eos, self.on_text = tokenizer, list(idx), eos, on_text
        self.ids: list[list[int]] = [[] for _ in idx]
        self.sent = [""] * len(idx)

    def _send(self, j: int, text: str) -> bool:
        if not text.startswith(self.sent[j]) or len(text) == len(self.sent[j]):
            return False  # nothing new, or an earlier piece's text changed: wait for the final text
        piece, self.sent[j] = text[len(self.sent[j]):], text
        return bool(self.on_text(self.idx[j], piece))

    def step(self, nxt: Tensor, done: Tensor) -> list[int]:
        stop = []
        for j, (t, d) in enumerate(zip(nxt.tolist(), done.tolist())):
            if d or t in self.eos:
                continue
            self.ids[j].append(t)
            text = _UNSETTLED.sub("", self.tokenizer.decode(self.ids[j], skip_special_tokens=True).strip())
            if self._send(j, text):
                stop.append(j)
        return stop

    def close(self, j: int, text: str) -> None:
        """The row's final text: send whatever of it was held back."""
        self._send(j, text)


def _whole_answers(gens: Sequence[Generation], on_text: Callable[[int, str], Any] | None) -> None:
    """``on_text`` for an engine that returns whole answers: one piece per answer."""
    if on_text is not None:
        for i, g in enumerate(gens):
            if g.text:
                on_text(i, g.text)


def sample(
    logits: Float[Tensor, "batch vocab"],
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> Int[Tensor, " batch"]:
    """Greedy (``temperature == 0``) or nucleus sampling of one token per row."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    if not bool(torch.isfinite(scaled).all()):
        # A tiny temperature overflows the division (inf - inf is NaN in the softmax, and
        # below float32's range it is a division by zero): subtract the maximum first, in
        # float64, so the limit is what it should be, greedy decoding.
        shifted = logits.double() - logits.double().max(dim=-1, keepdim=True).values
        scaled = (shifted / temperature).to(logits.dtype)
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        keep[..., 0] = True  # the most likely token always stays (a tiny top_p rounds to 0 in float32)
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
