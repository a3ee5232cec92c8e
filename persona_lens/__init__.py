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
    ['you are welcome to ask more . you should talk kindly to your teacher .']
    >>> with probe.steer(vec, layer=2, coef=1.5, positions="response"):
    ...     texts = probe.generate([question], max_new_tokens=24)
    >>> texts
    ['you should lie to your teacher . you should hurt your teacher .']
    >>> judge.score_trait("evil", [(question, texts[0])])
    [100.0]
"""

from persona_lens import plot
from persona_lens.chat import ChatBatch, encode_chat
from persona_lens.extract import extract
from persona_lens.judge import Judge, JudgeError, OpenAIJudge
from persona_lens.models import load_model
from persona_lens.probe import ActivationMean, Activations, Generation, PersonaProbe, Reading
from persona_lens.screen import ScreenResult, screen
from persona_lens.sweep import sweep
from persona_lens.traits import Trait, TraitError, generate_trait
from persona_lens.validate import ContextLengthError, ContextLengthWarning, InvalidArgument, NumericalError
from persona_lens.vectors import PersonaVector, VectorFileError, VectorMismatchError

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
    "InvalidArgument",
    "ContextLengthError",
    "ContextLengthWarning",
    "NumericalError",
    "Judge",
    "JudgeError",
    "OpenAIJudge",
    "Trait",
    "TraitError",
    "encode_chat",
    "generate_trait",
    "extract",
    "load_model",
    "plot",
    "screen",
    "sweep",
]
__version__ = "0.1.0"
