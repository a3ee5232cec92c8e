"""Traits and their artifacts: loading, validating, writing and generating them.

Example:
    >>> from persona_lens.traits import Trait
    >>> Trait.available()
    ['apathetic', 'evil', 'hallucinating', 'humorous', 'impolite', 'optimistic', 'sycophantic']
"""

from .generate import generate_trait
from .trait import DATA_DIR, InstructionPair, Trait, TraitError, fill_template, resolve_trait

__all__ = ["Trait", "TraitError", "InstructionPair", "generate_trait", "fill_template", "resolve_trait",
           "DATA_DIR"]
