"""``PersonaProbe`` and the records its methods return (see ``facade``)."""

from persona_lens.probe.capture import ActivationMean, Activations
from persona_lens.probe.facade import PersonaProbe
from persona_lens.probe.generation import DEFAULTS, Generation, GenerationSettings, Reading
from persona_lens.probe.owner import PATHS

__all__ = [
    "PersonaProbe", "Activations", "ActivationMean", "Generation", "Reading", "GenerationSettings",
    "DEFAULTS", "PATHS",
]
