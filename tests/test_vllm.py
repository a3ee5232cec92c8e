"""The vLLM engine behind the probe, against the probe's own HF path on the persona organism.

Greedy tokens, captures, projections and monitor readings of ``load_model(..., engine="vllm")``
must equal what the default engine gives (float32; readings to 1e-4 relative): unsteered and
steered, for every position mode, one and several layers; rows of one batch with different
steering equal each row alone; keyed prefix caching gives what no caching gives; hooks leave
with the call, also when it fails.

The engine tests need vLLM (``.ci/run``'s vLLM environment, docs/scale.md); without it they are
skipped, and the tests of the error messages still run.
"""

from __future__ import annotations

import sys

import pytest
import torch

import persona_lens as pl
from persona_lens.store import Prompt, Steering, Store

pytestmark = pytest.mark.vllm

MAX_NEW = 24


def _needs_vllm():
    try:
        from persona_lens.backends.vllm import import_vllm

        import_vllm()
    except ImportError as e:
        pytest.skip(f"vLLM is not installed here ({e}); .ci/run runs these in its vLLM environment")


@pytest.fixture(scope="module")
def engine():
    _needs_vllm()
    # Blocks of 32 tokens (the least vLLM's CPU attention takes): the organism's prompts fill one (32), so prefix caching really reuses KV.
    return pl.PersonaProbe(pl.load_model("persona-organism", engine="vllm", block_size=32))


@pytest.fixture(scope="module")
def engine_uncached():
    _needs_vllm()
    return pl.PersonaProbe(pl.load_model("persona-organism", engine="vllm", block_size=32,
                                         enable_prefix_caching=False))


@pytest.fixture(scope="module")
def hf(doctest_probe):
    return doctest_probe


@pytest.fixture(scope="module")
def vec(doctest_vec):
    return doctest_vec


@pytest.fixture(scope="module")
def prompts(doctest_trait):
    # A long system prompt makes every prompt longer than one KV block (32 tokens).
    system = " ".join([doctest_trait.instructions[0].neg] * 4)
    return [[{"role": "system", "content": system}, {"role": "user", "content": q}]
            for q in doctest_trait.eval_questions[:6]]


def _hooks(probe) -> int:
    inner = probe.backend.model.model
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in [*inner.layers, inner.norm])


STEERINGS = {
    "all": lambda p, v: [p.steer(v, layer=2, coef=1.5)],
    "prompt": lambda p, v: [p.steer(v, layer=2, coef=4.0, positions="prompt")],
    "response": lambda p, v: [p.steer(v, layer=2, coef=1.5, positions="response")],
    "response_only": lambda p, v: [p.steer(v, layer=2, coef=1.5, positions="response_only")],
    "layers": lambda p, v: [p.steer(v, layers={1: 1.0, 3: 1.0})],
    "last layer": lambda p, v: [p.steer(v, layer=p.n_layers, coef=3.0)],
    "ablate": lambda p, v: [p.ablate(v, layers=[2, 3])],
    "steer+ablate": lambda p, v: [p.steer(v, layer=2, coef=2.0, positions="response"), p.ablate(v, layers=[2])],
}


def _run(probe, vec, prompts, how):
    contexts = STEERINGS[how](probe, vec)
    with contexts[0]:
        if len(contexts) > 1:
            with contexts[1]:
                return probe.generate(prompts, max_new_tokens=MAX_NEW)
        return probe.generate(prompts, max_new_tokens=MAX_NEW)


def test_unsteered_greedy_tokens_equal_the_hf_path(engine, hf, prompts):
    got = engine.generate(prompts, max_new_tokens=MAX_NEW, return_generations=True)
    want = hf.generate(prompts, max_new_tokens=MAX_NEW, return_generations=True)
    assert [g.response_ids for g in got] == [g.response_ids for g in want]
    assert [g.text for g in got] == [g.text for g in want]
    assert [g.finished for g in got] == [g.finished for g in want]
    assert engine.last_path == "vllm"


@pytest.mark.parametrize("how", list(STEERINGS))
def test_steered_greedy_tokens_equal_the_hf_path(engine, hf, vec, prompts, how):
    want = _run(hf, vec, prompts, how)
    got = _run(engine, vec, prompts, how)
    assert got == want
    plain = hf.generate(prompts, max_new_tokens=MAX_NEW)
    if how != "ablate":  # ablating the trait direction leaves a neg-prompted answer as it was
        assert want != plain, "the steering must change some answer, or this test could not fail"
    assert engine.interventions == () and _hooks(engine) == 0


def test_rows_with_different_steering_equal_each_row_alone(engine, hf, vec, prompts):
    other = pl.PersonaVector(torch.randn(vec.directions.shape, generator=torch.Generator().manual_seed(5)) * 3)
    cells = [(vec, layer, coef) for layer in (1, 2) for coef in (0.0, 1.5)] + [(other, 2, 2.0)]
    rows = [p for p in prompts[:3] for _ in cells]
    ivs = [engine.steering(v, layer=l, coef=c, positions="response") for _ in prompts[:3] for v, l, c in cells]
    together = engine.generate(rows, max_new_tokens=MAX_NEW, interventions=ivs)
    for i, (v, layer, coef) in enumerate(cells):
        with engine.steer(v, layer=layer, coef=coef, positions="response"):
            alone = engine.generate(prompts[:3], max_new_tokens=MAX_NEW)
        with hf.steer(v, layer=layer, coef=coef, positions="response"):
            reference = hf.generate(prompts[:3], max_new_tokens=MAX_NEW)
        assert together[i :: len(cells)] == alone == reference
    assert len(set(together)) > len(prompts[:3]) + 1, "the cells must differ, or this test could not fail"


def test_rows_holding_the_same_edits_in_other_orders_keep_their_own_order(engine, hf, vec, prompts):
    """Steer-then-ablate and ablate-then-steer at one layer, the same two objects in both
    rows: each row must get its own order (they do not commute), as each does alone."""
    from persona_lens.interventions import Ablate

    steer = engine.steering(vec, layer=2, coef=2.0, positions="response")[0]
    ablate = Ablate(2, vec.unit(2).float(), ("all",))
    orders = [[steer, ablate], [ablate, steer]]
    rows = [p for p in prompts[:3] for _ in orders]
    together = engine.generate(rows, max_new_tokens=MAX_NEW, interventions=[o for _ in prompts[:3] for o in orders])
    for i, order in enumerate(orders):
        alone = engine.generate(prompts[:3], max_new_tokens=MAX_NEW, interventions=[order] * 3)
        reference = hf.generate(prompts[:3], max_new_tokens=MAX_NEW, interventions=[order] * 3)
        assert together[i :: len(orders)] == alone == reference
    assert together[0::2] != together[1::2], "the two orders must differ, or this test could not fail"


def test_a_sweep_in_a_store_is_one_batch_and_equals_the_hf_path(engine, hf, vec, prompts, monkeypatch):
    asks = [Prompt(p, steer=Steering(vec, layer=l, coef=c)) for p in prompts[:2] for l in (1, 2) for c in (0.5, 1.5)]
    settings = dict(max_new_tokens=MAX_NEW, temperature=0.0)
    calls = []
    run = engine.backend.run
    monkeypatch.setattr(engine.backend, "run", lambda reqs, **kw: calls.append(len(reqs)) or run(reqs, **kw))
    got = Store(None).generate(engine, asks, settings=settings, batch_size=64, progress=False)
    want = Store(None).generate(hf, asks, settings=settings, batch_size=64, progress=False)
    assert calls == [len(asks)]
    assert got.texts == want.texts and got.keys == want.keys


@pytest.mark.parametrize("layers", [[0, 2], [3, 6]])
def test_captures_equal_the_hf_path(engine, hf, prompts, layers):
    answers = hf.generate(prompts, max_new_tokens=MAX_NEW)
    convs = [p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]
    reductions = ["response_mean", "prompt_mean", "last_prompt"]
    got = engine.capture(convs, layers=layers, reductions=reductions, batch_size=4)
    want = hf.capture(convs, layers=layers, reductions=reductions, batch_size=4)
    for r in reductions:
        torch.testing.assert_close(got[r], want[r], rtol=1e-4, atol=1e-4 * float(want[r].abs().max()))
    mean_got = engine.capture_mean(convs, layers=layers, reductions=reductions)
    mean_want = hf.capture_mean(convs, layers=layers, reductions=reductions)
    for r in reductions:
        torch.testing.assert_close(mean_got.mean(r), mean_want.mean(r), rtol=1e-4, atol=1e-4 * float(mean_want.mean(r).abs().max()))
    assert _hooks(engine) == 0


def test_projections_and_readings_equal_the_hf_path(engine, hf, vec, prompts):
    answers = hf.generate(prompts, max_new_tokens=MAX_NEW)
    convs = [p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]
    for at in ("last_prompt", "response_mean"):
        want = hf.project(convs, vec, layer=3, at=at)
        torch.testing.assert_close(engine.project(convs, vec, layer=3, at=at), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    for g, w in zip(engine.project(convs, vec, layer=3, at="tokens"), hf.project(convs, vec, layer=3, at="tokens")):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)
    with engine.steer(vec, layer=2, coef=1.5), hf.steer(vec, layer=2, coef=1.5):
        got = engine.monitor(prompts, vec, layer=3, max_new_tokens=MAX_NEW)
        want = hf.monitor(prompts, vec, layer=3, max_new_tokens=MAX_NEW)
    for g, w in zip(got, want):
        assert g.text == w.text and g.response_tokens == w.response_tokens and g.prompt_tokens == w.prompt_tokens
        torch.testing.assert_close(torch.tensor(g.prompt_projections), torch.tensor(w.prompt_projections), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(torch.tensor(g.response_projections), torch.tensor(w.response_projections), rtol=1e-4, atol=1e-3)
    assert not torch.isnan(torch.tensor(got[0].response_projections)).any()


@pytest.mark.parametrize("positions", ["prompt", "all", "response", "response_only"])
def test_prefix_caching_on_and_off_give_the_same_steered_tokens(engine, engine_uncached, vec, prompts, positions,
                                                                monkeypatch):
    def run(probe, rows=prompts):  # a coefficient no other test uses: nothing is cached under it yet
        with probe.steer(vec, layer=2, coef=1.7, positions=positions):
            return probe.generate(rows, max_new_tokens=MAX_NEW)

    cached: list[int] = []  # prompt tokens each request took from the prefix cache
    generate = engine.backend.llm.generate

    def counting(*a, **k):
        outs = generate(*a, **k)
        cached.extend(o.num_cached_tokens or 0 for o in outs)
        return outs

    monkeypatch.setattr(engine.backend.llm, "generate", counting)
    engine.generate(prompts, max_new_tokens=4)  # fills the cache with unsteered KV of these prompts
    want = run(engine_uncached)
    cached.clear()
    # Alone, so that no request of the same steering can have filled the cache before it.
    assert run(engine, prompts[:1]) == want[:1]
    assert cached == [0], "a steered request must not take KV computed without the steering"
    assert run(engine) == want
    cached.clear()
    assert run(engine) == want  # now from KV cached under this very steering
    assert all(n >= 32 for n in cached), ("the same steering shares its cache, or this test could not fail", cached)
    # Without the key the cache would hand steered prompts the unsteered KV: what the salt prevents.
    monkeypatch.setattr(engine.backend, "_salt", lambda req, digests=None: None)
    engine.generate(prompts, max_new_tokens=4)
    cached.clear()
    run(engine, prompts[-1:])
    assert cached[0] >= 32


def test_hooks_leave_when_a_call_fails(engine, vec, prompts, monkeypatch):
    def boom(*a, **k):
        assert _hooks(engine) > 0  # installed while the engine runs
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.backend.llm, "generate", boom)
    with pytest.raises(KeyboardInterrupt):
        with engine.steer(vec, layer=2, coef=1.5):
            engine.generate(prompts, max_new_tokens=4)
    with pytest.raises(KeyboardInterrupt):
        engine.capture([prompts[0] + [{"role": "assistant", "content": "hi"}]], layers=[1])
    assert _hooks(engine) == 0 and engine.interventions == () and engine.backend._call is None
    monkeypatch.undo()
    assert engine.generate(prompts[:1], max_new_tokens=4)  # and the engine still works


def test_an_error_inside_a_hook_leaves_no_hook_behind(engine, vec, prompts, monkeypatch):
    from persona_lens.backends import vllm as engine_module

    def broken(*a, **k):
        raise RuntimeError("broken edit")

    monkeypatch.setattr(engine_module.ops, "add_direction", broken)
    with pytest.raises(RuntimeError, match="broken edit"):
        with engine.steer(vec, layer=2, coef=1.5):
            engine.generate(prompts[:2], max_new_tokens=4)
    assert _hooks(engine) == 0 and engine.interventions == () and engine.backend._call is None
    monkeypatch.undo()
    assert len(engine.generate(prompts[:2], max_new_tokens=4)) == 2  # vLLM was not left stuck


def test_sampling_is_reproducible_per_seed(engine, prompts):
    a = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, seed=3)
    assert engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, seed=3) == a
    assert engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, seed=4) != a
    assert engine.generate(prompts, max_new_tokens=MAX_NEW) != a  # sampled, not greedy


def test_what_the_engine_cannot_do_says_what_can(engine, vec, prompts):
    with pytest.raises(ValueError, match="layer"):
        with engine.steer(vec, layer=engine.n_layers + 1, coef=1.0):
            pass
    from persona_lens.backends.base import EngineRequest

    masks = {k: torch.ones(1, 5, dtype=torch.bool) for k in ("all", "prompt", "response", "last_prompt")}
    spec = {"op": "add", "layer": engine.n_layers + 1, "coef": 1.0, "positions": ["all"], "vector": [0.0] * engine.d_model}
    with pytest.raises(ValueError, match="layers 0..6"):
        engine.backend.run([EngineRequest([1, 2, 3], [], 2, [spec], masks)])
    assert _hooks(engine) == 0
    batch = engine.encode([prompts[0] + [{"role": "assistant", "content": "hi"}]], with_response=True)
    for call in (lambda: engine.forward(batch), lambda: engine.batch(batch).__enter__(),
                 lambda: engine.add_hooks([("blocks.0.hook_resid_pre", lambda x, hook: x)]).__enter__(),
                 lambda: engine.hf_model):
        with pytest.raises(NotImplementedError, match="default engine"):
            call()


def test_the_server_on_the_engine_answers_and_reads_as_on_the_hf_path(engine, hf, vec, prompts):
    """persona-lens serve --engine vllm: the same steered answers and persona readings."""
    pytest.importorskip("fastapi")
    from persona_lens.serve import make_app

    def served(probe):
        # The request logic, called directly: HTTP is tested on the HF path (tests/test_serve.py).
        server = make_app(probe, {"evil": vec}, max_tokens=MAX_NEW).state.persona_lens
        out = []
        for conv in prompts[:3]:
            body = {"messages": conv, "temperature": 0, "steering": [{"vector": "evil", "layer": 3, "coef": 4.0}],
                    "monitor": [{"vector": "evil", "layer": 5}]}
            r = server.complete(body)
            out.append((r["choices"][0]["message"]["content"], r["persona"][0]["last_prompt"],
                        r["choices"][0]["persona"][0]["response_mean"]))
        return out

    got, want = served(engine), served(hf)
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want):
        assert g[1:] == pytest.approx(w[1:], rel=1e-4, abs=1e-3)


def test_streamed_answers_and_stop_strings_on_the_engine_equal_the_hf_path(engine, hf, vec, prompts):
    """The engine returns whole answers: a streamed request gets each as one piece, cut at its
    stop string as on the HF path."""
    pytest.importorskip("fastapi")
    from persona_lens.serve import make_app

    def served(probe):
        server = make_app(probe, {"evil": vec}, max_tokens=MAX_NEW).state.persona_lens
        body = {"messages": prompts[0], "temperature": 0, "steering": [{"vector": "evil", "layer": 3, "coef": 4.0}]}
        full = server.complete(body)["choices"][0]["message"]["content"]
        stop = " " + full.split()[2]
        pieces: list[str] = []
        r = server.complete({**body, "stop": [stop]}, on_text=lambda i, t: pieces.append(t))
        got = r["choices"][0]
        assert "".join(pieces) == got["message"]["content"] == full[: full.index(stop)]
        assert got["finish_reason"] == "stop"
        return full, got["message"]["content"]

    assert served(engine) == served(hf)


@pytest.mark.smollm
def test_smollm2_steered_greedy_tokens_equal_the_hf_path(smollm2):
    from persona_lens.models import cache_root

    _needs_vllm()
    if not (cache_root() / "models" / "smollm2-135m-instruct" / "config.json").exists():
        pytest.skip("SmolLM2 is converted by the main environment's tests (python -m pytest -m smollm)")
    engine = pl.PersonaProbe(pl.load_model("smollm2-135m-instruct", engine="vllm", max_model_len=512))
    questions = ["What is the capital of France?", "Give me one tip for sleeping well.", "What is 12 times 3?"]
    direction = torch.randn(engine.d_model, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, probe in (("vllm", engine), ("hf", smollm2)):
        plain = probe.generate(questions, max_new_tokens=32)
        with probe.steer(direction, layers={10: 4.0, 20: 4.0}, positions="response"):
            out[name] = plain, probe.generate(questions, max_new_tokens=32)
    assert out["vllm"] == out["hf"]
    assert out["hf"][1] != out["hf"][0], "the steering must change an answer, or this test could not fail"


def test_an_adapter_is_served_merged(hf, prompts, tmp_path, monkeypatch):
    _needs_vllm()
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from persona_lens.organism import checkpoint_dir

    monkeypatch.setenv("PERSONA_LENS_CACHE", str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir(), dtype=torch.float32)
    tuned = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    tuned.save_pretrained(tmp_path / "adapter")
    engine = pl.PersonaProbe(pl.load_model("persona-organism", adapter=tmp_path / "adapter", engine="vllm"))
    reference = pl.PersonaProbe(pl.load_model("persona-organism", adapter=tmp_path / "adapter", merge=True, device="cpu"))
    assert engine.model_name == reference.model_name
    got = engine.generate(prompts, max_new_tokens=MAX_NEW)
    assert got == reference.generate(prompts, max_new_tokens=MAX_NEW)
    assert got != hf.generate(prompts, max_new_tokens=MAX_NEW), "the adapter must change an answer"


def test_a_model_vllm_cannot_load_is_a_clear_error(tmp_path):
    _needs_vllm()
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ValueError, match="cannot read|could not load"):
        pl.load_model(tmp_path, engine="vllm")


def test_missing_or_unsupported_vllm_names_the_install(monkeypatch):
    from persona_lens.backends import vllm as engine_module

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(engine_module.VLLMUnavailable, match="pip install .*vllm"):
        pl.load_model("persona-organism", engine="vllm")
    fake = type(sys)("vllm")
    fake.__version__ = "0.20.1"
    monkeypatch.setitem(sys.modules, "vllm", fake)
    with pytest.raises(engine_module.VLLMUnavailable, match="0.20.1.*pip install"):
        pl.load_model("persona-organism", engine="vllm")
    with pytest.raises(ValueError, match="engine"):
        pl.load_model("persona-organism", engine="tgi")


def test_the_cli_hands_engine_to_load_model(monkeypatch):
    from persona_lens import cli, models

    seen: dict = {}

    def fake(name, **kwargs):
        seen.update(kwargs, name=name)
        raise KeyboardInterrupt  # stop before a model would load

    monkeypatch.setattr(models, "load_model", fake)
    parser = cli.build_parser()
    for argv in (["screen", "d.jsonl", "--vector", "v.safetensors", "--layer", "2", "--model", "m", "--engine", "vllm"],
                 ["sweep", "--model", "m", "--trait", "evil", "--vector", "v.safetensors", "--layers", "2",
                  "--engine", "vllm"]):
        args = parser.parse_args(argv)
        seen.clear()
        with pytest.raises(KeyboardInterrupt):
            cli._load_probe(args)
        assert seen["engine"] == "vllm" and seen["name"] == "m"
    args = parser.parse_args(["screen", "d.jsonl", "--vector", "v.safetensors", "--layer", "2", "--model", "m"])
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        cli._load_probe(args)
    assert "engine" not in seen or seen["engine"] == "transformer_lens"

