"""The fast path: the bridge's HF model without the bridge (SDPA attention) runs the probe's
forwards whenever only residual-stream hooks are active, and gives what the bridge gives."""

from __future__ import annotations

import pytest
import torch

import persona_lens as pl
from persona_lens.backends import HFBackend

PROMPTS = ["Tell me about cats.", "Why?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to five"}]]
CONVS = [
    [{"role": "user", "content": "How do I boil an egg?"}, {"role": "assistant", "content": "Seven minutes in boiling water."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
]
REDUCTIONS = ["response_mean", "prompt_mean", "last_prompt"]


def random_vector(probe, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return pl.PersonaVector(scale * torch.randn(probe.n_layers + 1, probe.d_model, generator=g), model_name=probe.model_name)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a busy shared CPU, two OpenMP threads make
    each small matmul several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair(tiny):
    """(fast-path probe, bridge-path probe) on the same bridge."""
    probe = tiny[0]
    if probe.backend.kind != "bridge":
        pytest.skip("the fast path exists for TransformerBridge models only")
    return pl.PersonaProbe(probe.model, path="hf"), pl.PersonaProbe(probe.model, path="bridge")


def hook_count(modules):
    """persona_lens hooks on these modules (transformers and TransformerLens add their own)."""
    return sum(
        fn.__module__.startswith("persona_lens")
        for m in modules
        for hooks in (m._forward_hooks, m._forward_pre_hooks)
        for fn in hooks.values()
    )


def bridge_modules(probe):
    return list(probe.model.original_model.modules())


def view_modules(probe):
    return list(probe._fast.hf.modules())


def test_view_shares_parameters_and_runs_plain_hf_modules_with_sdpa(pair):
    fast, _ = pair
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    view = fast._fast
    bridge_hf = fast.model.original_model
    assert {p.data_ptr() for p in view.hf.parameters()} == {p.data_ptr() for p in bridge_hf.parameters()}
    assert sum(p.numel() for p in view.hf.parameters()) == sum(p.numel() for p in bridge_hf.parameters())
    assert not any(isinstance(m, GeneralizedComponent) for m in view.hf.modules())
    assert view.attn_implementation == "sdpa"
    assert bridge_hf.config._attn_implementation == "eager", "the bridge's own config must not change"
    # Layer L < n is the input of decoder layer L; layer n the output of the last one.
    assert view.resid_site(0) == (view.layers[0], "input")
    assert view.resid_site(fast.n_layers) == (view.layers[-1], "output")


def test_weight_changes_show_on_both_paths(tiny_dirs):
    model = pl.load_model(tiny_dirs["llama"], device="cpu")
    fast, slow = pl.PersonaProbe(model, path="hf"), pl.PersonaProbe(model, path="bridge")
    batch = fast.encode(CONVS, with_response=True)
    before = fast.forward(batch).detach()
    # A training step taken through the fast path updates the bridge's weights.
    opt = torch.optim.SGD(model.original_model.parameters(), lr=0.5)
    fast.forward(batch).logsumexp(-1).mean().backward()
    opt.step()
    with torch.no_grad():
        model.blocks[1].mlp.out.weight.mul_(1.5)  # an in-place edit through the bridge
        after_fast, after_slow = fast.forward(batch), slow.forward(batch)
    real = batch.attention_mask.bool()  # padding positions hold arbitrary values on either path
    assert not torch.allclose(before[real], after_fast[real])
    torch.testing.assert_close(after_fast[real], after_slow[real], atol=1e-5, rtol=1e-5)


def test_view_follows_a_replaced_module(tiny_dirs):
    """Swapping a wrapped HF module (as adapters like peft do) reaches the fast path too."""
    model = pl.load_model(tiny_dirs["qwen2"], device="cpu")
    fast, slow = pl.PersonaProbe(model, path="hf"), pl.PersonaProbe(model, path="bridge")
    batch = fast.encode(CONVS, with_response=True)
    real = batch.attention_mask.bool()
    with torch.no_grad():
        before = fast.forward(batch)[real]
        bridge_linear = model.blocks[0].mlp.out
        old = bridge_linear._modules["_original_component"]
        new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
        new.weight.copy_(3.0 * old.weight)
        bridge_linear._modules["_original_component"] = new
        after_fast, after_slow = fast.forward(batch)[real], slow.forward(batch)[real]
    assert not torch.allclose(before, after_fast)
    torch.testing.assert_close(after_fast, after_slow, atol=1e-5, rtol=1e-5)


def test_module_walk_is_modules_order_without_repeats(tiny_dirs):
    """The change detection walks the tree its own way; it must see what ``modules()`` sees."""
    from persona_lens.backends import _walk

    model = pl.load_model(tiny_dirs["llama"], device="cpu")
    shared = torch.nn.Linear(2, 2)
    model.original_model.extra = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Sequential(shared, torch.nn.ReLU())})
    model.original_model.model.register_module("gone", None)
    for root in (model, model.original_model):
        assert [id(m) for m in _walk(root)] == [id(m) for m in root.modules()]


@pytest.mark.parametrize(
    "positions", ["all", "prompt", "response", "response_only"]
)
def test_same_greedy_tokens_on_both_paths(pair, positions):
    fast, slow = pair
    vec = random_vector(fast, seed=11)
    n = fast.n_layers
    kwargs = dict(positions=positions)
    plain = fast.generate(PROMPTS, max_new_tokens=10)
    assert fast.last_path == "hf"
    assert plain == slow.generate(PROMPTS, max_new_tokens=10)
    assert slow.last_path == "bridge"
    # One probe's hooks at a time: both probes hook the same bridge.
    out = {}
    for probe in (fast, slow):
        with probe.steer(vec, layers={0: 3.0, 1: -2.0, n: 4.0}, **kwargs):
            out[probe.path] = (
                probe.generate(PROMPTS, max_new_tokens=10),
                probe.generate(PROMPTS[:1], max_new_tokens=6, use_cache=False),
            )
            assert probe.last_path == probe.path
    a, b = out["hf"][0], out["bridge"][0]
    assert a == b
    assert out["hf"][1] == out["bridge"][1]
    if positions != "prompt":
        assert a != plain, "steering should change the output"


def test_same_captures_projections_and_readings_on_both_paths(pair):
    fast, slow = pair
    vec = random_vector(fast, seed=12)
    for probe in (fast, slow):
        assert probe._handles == []
    a = fast.capture(CONVS, reductions=REDUCTIONS, batch_size=2)
    b = slow.capture(CONVS, reductions=REDUCTIONS, batch_size=2)
    for r in REDUCTIONS:
        torch.testing.assert_close(a[r], b[r], atol=1e-5, rtol=1e-5)
    with fast.ablate(vec, layers=[1]):
        ma = fast.capture_mean(CONVS, batch_size=2)
    with slow.ablate(vec, layers=[1]):
        mb = slow.capture_mean(CONVS, batch_size=2)
    torch.testing.assert_close(ma.mean("response_mean"), mb.mean("response_mean"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        fast.project(CONVS, vec, layer=2, at="tokens")[0], slow.project(CONVS, vec, layer=2, at="tokens")[0], atol=1e-5, rtol=1e-5
    )
    ra = fast.monitor(PROMPTS, vec, layer=2, max_new_tokens=6)
    assert fast.last_path == "hf"
    rb = slow.monitor(PROMPTS, vec, layer=2, max_new_tokens=6)
    for x, y in zip(ra, rb):
        assert x.text == y.text
        torch.testing.assert_close(torch.tensor(x.response_projections), torch.tensor(y.response_projections), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["blocks.1.attn.hook_pattern", "blocks.0.mlp.hook_out"])
def test_add_hooks_beyond_the_residual_stream_runs_the_bridge(pair, name):
    fast, _ = pair
    auto = pl.PersonaProbe(fast.model)
    vec = random_vector(auto, seed=13)
    seen = []
    with auto.steer(vec, layer=1, coef=4.0, positions="response"):
        expected = auto.generate(PROMPTS, max_new_tokens=8)
        assert auto.last_path == "hf"
        with auto.add_hooks([(name, lambda x, hook: seen.append(hook.name))]):
            got = auto.generate(PROMPTS, max_new_tokens=8)
            assert auto.last_path == "bridge"
        assert auto.generate(PROMPTS[:1], max_new_tokens=2) and auto.last_path == "hf"
    assert seen and set(seen) == {name}
    assert got == expected


def test_users_own_hooks_on_the_bridge_choose_the_bridge(pair):
    fast, _ = pair
    auto = pl.PersonaProbe(fast.model)
    fired = []
    point = auto.model.blocks[0].mlp.hook_out
    point.add_hook(lambda x, hook: fired.append(1))
    try:
        auto.generate(PROMPTS[:1], max_new_tokens=3)
        assert auto.last_path == "bridge" and len(fired) == 3
        fast.generate(PROMPTS[:1], max_new_tokens=3)  # path="hf" is forced: the hook stays silent
        assert fast.last_path == "hf" and len(fired) == 3
    finally:
        point.remove_hooks()
    auto.generate(PROMPTS[:1], max_new_tokens=3)
    assert auto.last_path == "hf" and len(fired) == 3
    # A plain torch hook on a bridge module counts as well.
    user = auto.model.blocks[1].register_forward_pre_hook(lambda *a: fired.append(2))
    auto.capture(CONVS[:1])
    assert auto.last_path == "bridge" and fired[-1] == 2
    user.remove()


def test_no_hooks_left_on_either_path_after_an_exception(pair):
    fast, _ = pair
    auto = pl.PersonaProbe(fast.model)
    vec = random_vector(auto, seed=14)
    fired = []
    user = auto.model.blocks[2].hook_in.register_forward_hook(lambda *a: fired.append(1))
    before = hook_count(bridge_modules(auto)), hook_count(view_modules(auto))
    with pytest.raises(RuntimeError, match="boom"):
        with auto.steer(vec, layer=1), auto.ablate(vec, layers=[auto.n_layers]):
            assert hook_count(view_modules(auto)) == before[1] + 2
            raise RuntimeError("boom")
    assert (hook_count(bridge_modules(auto)), hook_count(view_modules(auto))) == before
    with pytest.raises(RuntimeError, match="boom"):
        with auto.add_hooks([("blocks.0.attn.hook_pattern", lambda x, hook: None)]):
            auto.capture(CONVS[:1])
            raise RuntimeError("boom")
    assert (hook_count(bridge_modules(auto)), hook_count(view_modules(auto))) == before
    assert auto._handles == []
    auto.generate(PROMPTS[:1], max_new_tokens=2)
    assert fired and auto.last_path == "bridge", "the user's own hook stays and still fires"
    user.remove()


def test_view_follows_train_mode_and_keeps_active_hooks(pair):
    fast, slow = pair
    vec = random_vector(fast, seed=15)
    model = fast.model
    with slow.steer(vec, layer=2, coef=4.0):
        expected = slow.generate(PROMPTS, max_new_tokens=6)
    with fast.steer(vec, layer=2, coef=4.0):
        old_view = fast._fast.hf
        model.original_model.train()
        try:
            got = fast.generate(PROMPTS, max_new_tokens=6)
            # The view follows the mode without a rebuild (a training loop switches every step).
            assert fast._fast.hf is old_view and fast._fast.hf.training
            assert all(m.training for m in fast._fast.hf.modules())
        finally:
            model.original_model.eval()
        assert got == expected
        assert fast.generate(PROMPTS, max_new_tokens=6) == expected and not fast._fast.hf.training
        assert not any(m.training for m in fast._fast.hf.modules())
    assert fast._handles == [] and hook_count(view_modules(fast)) == 0


def test_path_argument(tiny):
    probe = tiny[0]
    with pytest.raises(ValueError, match="path must be one of"):
        pl.PersonaProbe(probe.model, path="fast")
    if probe.backend.kind != "bridge":
        with pytest.raises(ValueError, match="not available"):
            pl.PersonaProbe(probe.model, path="hf")
        probe.generate(PROMPTS[:1], max_new_tokens=2)
        assert probe.last_path == probe.backend.kind
        return
    assert isinstance(pl.PersonaProbe(probe.model)._fast, HFBackend)
    probe.generate(PROMPTS[:1], max_new_tokens=2)
    assert probe.last_path == "hf"


@pytest.mark.smollm
def test_smollm2_same_tokens_and_means_on_both_paths(smollm2):
    fast = pl.PersonaProbe(smollm2.model, path="hf")
    slow = pl.PersonaProbe(smollm2.model, path="bridge")
    vec = random_vector(fast, seed=0, scale=0.5)
    prompts = ["What is the capital of France?", "Name a fruit."]
    texts = {}
    for probe in (fast, slow):
        with probe.steer(vec, layers=[10, 20], coef=2.0, positions="response"):
            texts[probe.path] = probe.generate(prompts, max_new_tokens=12)
    assert texts["hf"] == texts["bridge"]
    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": "I am not sure, sorry."}] for p in prompts]
    a = fast.capture_mean(convs, layers=[0, 15, 30])
    b = slow.capture_mean(convs, layers=[0, 15, 30])
    torch.testing.assert_close(a.mean("response_mean"), b.mean("response_mean"), atol=1e-4, rtol=1e-4)
    assert fast.generate(prompts[:1], max_new_tokens=10) == ["The capital of France is Paris."]
