"""Experiments on persona_lens, run as modules from the repository root
(``python -m experiments.NAME``) so they can use the tests' reference implementations."""
