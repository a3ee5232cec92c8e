"""The paper's experiments on persona_lens, one script per figure (E1-E8), run as modules from
the repository root (``python -m experiments.NAME --config CONFIG``; ``experiments.all`` runs
every one into one folder). Configs, goals and shared pieces are in ``experiments.common``;
the measured figures are in docs/results.md."""
