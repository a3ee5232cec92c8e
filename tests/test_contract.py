"""The backend contract: interventions as values that a spec-taking engine applies itself.

``SpecEngine`` stands in for an engine with no modules to hook (vLLM): it receives each
step's intervention specs and position masks and applies them with code written here, on a
plain HF model. Greedy tokens under steering and ablation must equal the bridge's, where the
probe applies the same values as hooks.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import persona_lens as pl
from persona_lens.backends.base import Backend
from persona_lens.interventions import Ablate, Steer

PROMPTS = ["Hi!", "What should I cook tonight?", "Tell me about the sea"]


class SpecEngine(Backend):
    kind = "spec_engine"
    takes = "specs"

    def __init__(self, path):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        super().__init__(hf, AutoTokenizer.from_pretrained(path), hf.config.num_hidden_layers,
                         hf.config.hidden_size, str(path))
        self.specs: list[dict] = []
        self.masks: dict = {}
        self.received = 0

    def resid_site(self, layer):
        raise AssertionError("a spec engine is never hooked by the probe")

    def hook_dict(self):
        return {}

    def new_cache(self, batch_size):
        return DynamicCache(config=self.model.config)

    def receive(self, specs, masks):
        self.specs, self.masks = specs, masks
        self.received += 1

    def _edit(self, spec):
        v = torch.tensor(spec["vector"])
        kinds = spec["positions"]

        def pre(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            m = torch.ones(h.shape[:2], dtype=torch.bool) if kinds == ["all"] else \
                torch.stack([self.masks[k] for k in kinds]).any(0)
            m = m.unsqueeze(-1).float()
            if spec["op"] == "add":
                h = h + spec["coef"] * v * m
            else:
                h = h - (h @ v).unsqueeze(-1) * v * m
            return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        layers = self.model.model.layers
        if spec["layer"] < self.n_layers:
            return layers[spec["layer"]].register_forward_pre_hook(pre, with_kwargs=True)
        return layers[-1].register_forward_hook(lambda mod, a, out: (pre(mod, (out[0] if isinstance(out, tuple) else out,), {})[0][0],) if isinstance(out, tuple) else pre(mod, (out,), {})[0][0])

    def logits(self, input_ids, attention_mask, cache, last_only):
        handles = [self._edit(s) for s in self.specs]
        try:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                             past_key_values=cache, use_cache=cache is not None)
            return out.logits[:, -1:] if last_only else out.logits
        finally:
            for h in handles:
                h.remove()


@pytest.fixture(scope="module")
def engines(tiny_dirs):
    path = tiny_dirs["llama"]
    return pl.PersonaProbe(SpecEngine(path)), pl.PersonaProbe(pl.load_model(path, device="cpu"))


def vector(probe, seed=11):
    g = torch.Generator().manual_seed(seed)
    return pl.PersonaVector(torch.randn(probe.n_layers + 1, probe.d_model, generator=g))


@pytest.mark.skipif(os.environ.get("PERSONA_LENS_TEST_BACKEND", "bridge") != "bridge", reason="bridge only")
@pytest.mark.parametrize("how", ["all", "response", "response_only", "prompt", "layers", "ablate", "nested"])
def test_spec_engine_generates_what_hooks_generate(engines, how):
    spec, hooked = engines
    vec = vector(hooked)

    def run(probe):
        if how == "all":
            ctx = [probe.steer(vec, layer=2, coef=3.0)]
        elif how == "response":
            ctx = [probe.steer(vec, layer=1, coef=4.0, positions="response")]
        elif how == "response_only":
            ctx = [probe.steer(vec, layer=1, coef=4.0, positions="response_only")]
        elif how == "prompt":
            ctx = [probe.steer(vec, layer=2, coef=5.0, positions="prompt")]
        elif how == "layers":
            ctx = [probe.steer(vec, layers={1: 2.0, 3: -2.0})]
        elif how == "ablate":
            ctx = [probe.ablate(vec, layers=[1, 2])]
        else:
            ctx = [probe.steer(vec, layer=2, coef=3.0, positions="response"), probe.ablate(vec, layers=[2])]
        with ctx[0]:
            if len(ctx) > 1:
                with ctx[1]:
                    return probe.generate(PROMPTS, max_new_tokens=8), probe.interventions
            return probe.generate(PROMPTS, max_new_tokens=8), probe.interventions

    (want, hooked_ivs), (got, spec_ivs) = run(hooked), run(spec)
    assert got == want
    assert [type(i) for i in spec_ivs] == [type(i) for i in hooked_ivs]
    plain = hooked.generate(PROMPTS, max_new_tokens=8)
    assert plain != want, "the edit must change the text, or this test could not fail"
    assert spec.interventions == () and spec.generate(PROMPTS, max_new_tokens=8) == plain


def test_interventions_are_values_in_run_order_and_leave_on_exit(engines):
    spec, _ = engines
    vec = vector(spec)
    before = spec.backend.received
    with pytest.raises(KeyError):
        with spec.steer(vec, layer=1, coef=2.0, positions="response"):
            with spec.ablate(vec, layers=[3]):
                a, b = spec.interventions
                assert isinstance(a, Steer) and a.layer == 1 and a.coef == 2.0
                assert a.positions == ("answer", "last_prompt")
                assert isinstance(b, Ablate) and b.layer == 3
                torch.testing.assert_close(b.unit.norm(), torch.tensor(1.0))
                spec.generate(PROMPTS[:1], max_new_tokens=2)
                assert [s["op"] for s in spec.backend.specs] == ["add", "ablate"]
                raise KeyError("boom")
    assert spec.interventions == () and spec.backend.received > before


def test_spec_engine_refuses_readings_clearly(engines):
    spec, _ = engines
    with pytest.raises(NotImplementedError, match="takes interventions as specs"):
        spec.capture_mean([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]], layers=[1])
    assert spec._handles == []


def test_steer_refuses_a_non_finite_coefficient(engines):
    _, hooked = engines
    with pytest.raises(ValueError, match="finite"):
        with hooked.steer(vector(hooked), layer=1, coef=float("nan")):
            pass
    assert hooked._handles == []
