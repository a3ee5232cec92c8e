"""Speed, memory and device-parity scripts (not timed tests).

Run them as modules from the repository root, ``python -m benchmarks.NAME``: that imports this
checkout's persona_lens whether or not a package is installed, and lets the scripts share
``benchmarks.random_models``.
"""
