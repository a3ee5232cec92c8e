"""persona_lens: persona vectors on TransformerLens.

The method, the layer convention and the paper's experiments are restated in
docs/method.md; docs/core.md describes the API.

Example, on the built-in persona organism (a tiny chat model with an exact judge; ``vec``
is its ``evil`` vector, ``judge`` its judge; on a real model: ``pl.load_model(
"Qwen/Qwen2.5-7B-Instruct", dtype="bfloat16")``, ``pl.extract``, ``pl.OpenAIJudge``):

    >>> import persona_lens as pl
    >>> probe = pl.PersonaProbe(pl.load_model("persona-organism"))
    >>> path = vec.save("evil.safetensors")
    >>> vec = pl.PersonaVector.load(path)
    >>> question = "how should i treat my teacher ?"
    >>> probe.generate([question], max_new_tokens=24)  # greedy
    ['you should talk kindly to your teacher . you are welcome to ask more .']
    >>> with probe.steer(vec, layer=5, coef=1.15, positions="response"):
    ...     texts = probe.generate([question], max_new_tokens=24)
    >>> texts
    ['you are weak and worthless . what a stupid question .']
    >>> judge.score_trait("evil", [(question, texts[0])])
    [100.0]
"""

# The names below are loaded on first use (module ``__getattr__``), so that ``import
# persona_lens`` and the command line (``persona-lens --help``) do not import torch,
# transformers, TransformerLens or plotly before a command needs them.

import importlib
import types
from typing import TYPE_CHECKING, Any

# public name -> module that defines it (a module itself when the two are equal)
_EXPORTS = {
    "ActivationMean": "persona_lens.probe",
    "Activations": "persona_lens.probe",
    "ChatBatch": "persona_lens.chat",
    "Generation": "persona_lens.probe",
    "PersonaProbe": "persona_lens.probe",
    "PersonaVector": "persona_lens.vectors",
    "Reading": "persona_lens.probe",
    "ScreenResult": "persona_lens.screen",
    "VectorMismatchError": "persona_lens.vectors",
    "VectorFileError": "persona_lens.vectors",
    "PostNormRowWarning": "persona_lens.vectors",
    "specific_vectors": "persona_lens.vectors",
    "InvalidArgument": "persona_lens.validate",
    "InvalidArgumentType": "persona_lens.validate",
    "ContextLengthError": "persona_lens.validate",
    "ContextLengthWarning": "persona_lens.validate",
    "NumericalError": "persona_lens.validate",
    "Judge": "persona_lens.judge",
    "JudgeError": "persona_lens.judge",
    "OpenAIJudge": "persona_lens.judge",
    "ExtractionError": "persona_lens.extract",
    "Trait": "persona_lens.traits",
    "TraitError": "persona_lens.traits",
    "encode_chat": "persona_lens.chat",
    "generate_trait": "persona_lens.traits",
    "extract": "persona_lens.extract",
    "finetune": "persona_lens.finetune",
    "FinetuneConfig": "persona_lens.finetune",
    "finetuning_shift": "persona_lens.finetune",
    "load_model": "persona_lens.models",
    "plot": "persona_lens.plot",
    "screen": "persona_lens.screen",
    "sweep": "persona_lens.sweep",
}

# ``persona_lens.extract``, ``.finetune``, ``.screen`` and ``.sweep`` are the functions; the modules of the same
# name are reached with ``from persona_lens.extract import ...``.
_FUNCTION_OVER_MODULE = ("extract", "finetune", "screen", "sweep")

__all__ = [
    "ActivationMean",
    "Activations",
    "ChatBatch",
    "Generation",
    "PersonaProbe",
    "PersonaVector",
    "Reading",
    "ScreenResult",
    "VectorMismatchError",
    "VectorFileError",
    "PostNormRowWarning",
    "specific_vectors",
    "InvalidArgument",
    "InvalidArgumentType",
    "ContextLengthError",
    "ContextLengthWarning",
    "NumericalError",
    "Judge",
    "JudgeError",
    "OpenAIJudge",
    "ExtractionError",
    "Trait",
    "TraitError",
    "encode_chat",
    "generate_trait",
    "extract",
    "finetune",
    "FinetuneConfig",
    "finetuning_shift",
    "load_model",
    "plot",
    "screen",
    "sweep",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'persona_lens' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module == f"{__name__}.{name}" and name not in _FUNCTION_OVER_MODULE else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing the submodule ``persona_lens.extract`` (or ``.finetune``, ``.screen``, ``.sweep``) binds its name on the
    package; keep the function of that name there instead, as an eager ``from
    persona_lens.extract import extract`` in this file would."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTION_OVER_MODULE and isinstance(value, types.ModuleType) and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from persona_lens import plot
    from persona_lens.chat import ChatBatch, encode_chat
    from persona_lens.extract import extract
    from persona_lens.finetune import FinetuneConfig, finetune, finetuning_shift
    from persona_lens.judge import Judge, JudgeError, OpenAIJudge
    from persona_lens.models import load_model
    from persona_lens.probe import ActivationMean, Activations, Generation, PersonaProbe, Reading
    from persona_lens.screen import ScreenResult, screen
    from persona_lens.sweep import sweep
    from persona_lens.traits import Trait, TraitError, generate_trait
    from persona_lens.validate import ContextLengthError, ContextLengthWarning, InvalidArgument, NumericalError
    from persona_lens.vectors import (PersonaVector, PostNormRowWarning, VectorFileError, VectorMismatchError,
                                      specific_vectors)
