"""Shared fixtures: tiny random chat models of two architectures, loaded through the same
``load_model`` path as a real model (or as TransformerLens 3.x HookedTransformers when
``PERSONA_LENS_TEST_BACKEND=hooked_transformer``), and the offline SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from persona_lens.testing import build_tiny, hooked_transformer_from_hf

BACKEND = os.environ.get("PERSONA_LENS_TEST_BACKEND", "bridge")
ARCHS = ["llama", "qwen2"]


@pytest.fixture(autouse=True)
def _judge_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Judges built without a cache folder write theirs to a temporary one, not the user's
    (``PERSONA_LENS_JUDGE_CACHE``). The model cache stays shared: SmolLM2's conversion is
    slow to repeat."""
    monkeypatch.setenv("PERSONA_LENS_JUDGE_CACHE", str(tmp_path_factory.mktemp("judge-cache")))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    return {arch: build_tiny(arch, tmp_path_factory.mktemp(f"tiny-{arch}")) for arch in ARCHS}


def load_tiny(path: Path):
    import persona_lens as pl

    if BACKEND == "hooked_transformer":
        return hooked_transformer_from_hf(path)
    return pl.load_model(path, device="cpu")


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request, tiny_dirs):
    """(probe, HF reference model, checkpoint dir) for one tiny architecture."""
    import persona_lens as pl
    from transformers import AutoModelForCausalLM

    path = tiny_dirs[request.param]
    probe = pl.PersonaProbe(load_tiny(path))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return probe, hf, path


@pytest.fixture(scope="session")
def smollm2():
    """The offline SmolLM2-135M-Instruct as a probe (converted once, then cached)."""
    import persona_lens as pl

    return pl.PersonaProbe(pl.load_model("smollm2-135m-instruct", device="cpu"))


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    from transformers import AutoModelForCausalLM

    from persona_lens.models import smollm2_checkpoint

    return AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32).eval()
