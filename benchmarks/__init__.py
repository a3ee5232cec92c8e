"""Speed, memory and device-parity scripts (not timed tests).

A package so that ``python -m benchmarks.NAME`` runs them from a checkout without installing
persona_lens; with it installed, ``python benchmarks/NAME.py`` works as well.
"""
