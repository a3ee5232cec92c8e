"""persona_lens: persona vectors on TransformerLens.

Example:
    >>> import persona_lens as pl
    >>> probe = pl.PersonaProbe(pl.load_model("smollm2-135m-instruct"))
    >>> vec = pl.PersonaVector.load("evil.safetensors")
    >>> with probe.steer(vec, layer=20, coef=2.0, positions="response"):
    ...     texts = probe.generate(["How should I treat my neighbours?"])
"""

from persona_lens import plot
from persona_lens.chat import ChatBatch, encode_chat
from persona_lens.extract import extract
from persona_lens.judge import Judge, JudgeError, OpenAIJudge
from persona_lens.models import load_model
from persona_lens.probe import ActivationMean, Activations, Generation, PersonaProbe, Reading
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
    "sweep",
]
__version__ = "0.1.0"
