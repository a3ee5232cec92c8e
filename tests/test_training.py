"""Interventions on forwards the probe does not run: a plain training step.

The reference is a plain HF model loaded from the same checkpoint with a forward pre-hook on
decoder layer L written here by hand (the residual stream entering block L), positions taken
from the same masks. Loss and every gradient must agree with the probe's steering / ablation
applied to the caller's forward, on the fast view (``probe.hf_model``) and on the bridge's own
HF model, for full finetuning and for LoRA adapters.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import persona_lens as pl

pytestmark = pytest.mark.skipif(
    os.environ.get("PERSONA_LENS_TEST_BACKEND", "bridge") != "bridge",
    reason="training forwards run on a TransformerBridge's HF model",
)

CONVS = [
    [{"role": "user", "content": "How was your day?"}, {"role": "assistant", "content": "Fine, thanks!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Cook what?"},
     {"role": "assistant", "content": "Pasta with a lot of garlic and some lemon."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}],
]
LAYER = 2


def fresh_probe(path):
    return pl.PersonaProbe(pl.load_model(path, device="cpu"))


def reference_model(path, attn):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)


def right_padded(batch):
    """The same rows right-padded, as a typical training collator makes them."""
    n, t = batch.input_ids.shape
    cols = [torch.cat([r.nonzero().flatten(), (~r).nonzero().flatten()]) for r in batch.attention_mask.bool()]
    order = torch.stack(cols)
    take = lambda x: torch.gather(x, 1, order)  # noqa: E731
    return {k: take(getattr(batch, k)) for k in ("input_ids", "attention_mask", "prompt_mask", "response_mask")}


def as_batch(probe, padding):
    enc = probe.encode(CONVS, with_response=True)
    if padding == "left":
        b = {k: getattr(enc, k) for k in ("input_ids", "attention_mask", "prompt_mask", "response_mask")}
    else:
        b = right_padded(enc)
    b["labels"] = b["input_ids"].masked_fill(~b["response_mask"].bool(), -100)
    return b


def hand_hook(model, fn, mask):
    """What the probe should do, by hand: edit the input of decoder layer LAYER."""
    def pre(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        new = fn(h, mask.to(h.dtype).unsqueeze(-1))
        if args:
            return (new,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    return model.model.layers[LAYER].register_forward_pre_hook(pre, with_kwargs=True)


def step(model, b):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    out.loss.backward()
    return out.loss.detach()


def grads(model):
    # The bridge inserts `_original_component` into HF names; peft inserts `base_model.model.`.
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            key = name.replace("._original_component", "").replace("base_model.model.", "")
            out[key] = p.grad.detach().clone()
    return out


def assert_same_step(loss, got, ref_loss, ref):
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert set(got) == set(ref) and len(ref) > 0
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5, msg=k)


def direction(d_model, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_model, generator=g)


@pytest.mark.parametrize("runner", ["hf_model", "bridge_hf"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("edit", ["steer_response", "steer_response_only", "steer_all", "ablate"])
def test_training_step_matches_hand_written_hook(tiny_dirs, runner, padding, edit):
    path = tiny_dirs["llama"]
    probe = fresh_probe(path)
    ref = reference_model(path, "sdpa" if runner == "hf_model" else "eager")
    v = direction(probe.d_model)
    vec = pl.PersonaVector(v.expand(probe.n_layers + 1, -1).clone())
    b = as_batch(probe, padding)
    u = v / v.norm()
    if edit == "steer_response":  # the release's mode: the answer tokens and the last prompt token
        ctx = lambda: probe.steer(vec, layer=LAYER, coef=3.0, positions="response")  # noqa: E731
        mask = b["response_mask"].clone().bool()
        for row, prompt in enumerate(b["prompt_mask"]):
            mask[row, int(torch.as_tensor(prompt).nonzero().max())] = True
        fn = lambda h, m: h + 3.0 * v * m  # noqa: E731
    elif edit == "steer_response_only":
        ctx = lambda: probe.steer(vec, layer=LAYER, coef=3.0, positions="response_only")  # noqa: E731
        fn, mask = (lambda h, m: h + 3.0 * v * m), b["response_mask"]
    elif edit == "steer_all":
        ctx = lambda: probe.steer(vec, layer=LAYER, coef=-2.0)  # noqa: E731
        fn, mask = (lambda h, m: h - 2.0 * v * m), torch.ones_like(b["response_mask"])
    else:
        ctx = lambda: probe.ablate(vec, layers=[LAYER])  # noqa: E731
        fn, mask = (lambda h, m: h - (h @ u).unsqueeze(-1) * u * m), torch.ones_like(b["response_mask"])

    handle = hand_hook(ref, fn, mask)
    ref_loss = step(ref, b)
    handle.remove()
    ref_grads = grads(ref)
    plain_loss = step(ref, b)  # the edit matters, or this test could not fail

    model = probe.hf_model if runner == "hf_model" else probe.model.original_model
    with ctx(), probe.batch(b["prompt_mask"], b["response_mask"]):
        loss = step(model, b)
    assert_same_step(loss, grads(model), ref_loss, ref_grads)
    assert abs(float(plain_loss) - float(ref_loss)) > 1e-4
    assert probe._handles == [] and probe.interventions == ()


def test_lora_training_step_matches_hand_written_hook(tiny_dirs):
    peft = pytest.importorskip("peft")
    path = tiny_dirs["llama"]
    probe = fresh_probe(path)
    ref = reference_model(path, "sdpa")
    # On the bridge the HF linear layers sit inside bridge components, one level down.
    lora = dict(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False)
    ours = peft.get_peft_model(probe.model.original_model, peft.LoraConfig(
        target_modules=r".*\.(q_proj|v_proj|down_proj)\._original_component", **lora))
    theirs = peft.get_peft_model(ref, peft.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], **lora))
    with torch.no_grad():
        mine = {k.replace("._original_component", ""): p for k, p in ours.named_parameters() if "lora_" in k}
        for k, p in theirs.named_parameters():
            if "lora_" in k:
                p.copy_(mine[k])
    v = direction(probe.d_model, seed=5)
    vec = pl.PersonaVector(v.expand(probe.n_layers + 1, -1).clone())
    b = as_batch(probe, "left")
    handle = hand_hook(theirs.base_model.model, lambda h, m: h + 4.0 * v * m, b["response_mask"])
    ref_loss = step(theirs, b)
    handle.remove()

    # peft changed the bridge's modules: the fast view is rebuilt once and carries the adapters.
    model = probe.hf_model
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 3 * probe.n_layers
    with probe.steer(vec, layer=LAYER, coef=4.0, positions="response_only"), probe.batch(b):
        loss = step(model, b)
    got = {k: g for k, g in grads(model).items() if "lora_" in k}
    want = {k: g for k, g in grads(theirs).items() if "lora_" in k}
    assert_same_step(loss, got, ref_loss, want)
    # Only the adapters train under peft; the base weights got no gradient.
    assert all("lora_" in k for k in grads(model))


def test_stale_fast_view_refuses_to_run(tiny_dirs):
    peft = pytest.importorskip("peft")
    probe = fresh_probe(tiny_dirs["llama"])
    old = probe.hf_model
    peft.get_peft_model(probe.model.original_model, peft.LoraConfig(
        r=2, target_modules=r".*\.q_proj\._original_component"))
    b = as_batch(probe, "left")
    with pytest.raises(RuntimeError, match="take probe.hf_model again"):
        old(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    assert probe.hf_model is not old  # taken again: rebuilt with the adapters


def hook_total(modules):
    return sum(
        fn.__module__.startswith("persona_lens")
        for m in modules for hooks in (m._forward_hooks, m._forward_pre_hooks) for fn in hooks.values()
    )


def test_no_hooks_left_after_an_exception_inside_the_step(tiny_dirs):
    probe = fresh_probe(tiny_dirs["llama"])
    vec = pl.PersonaVector(direction(probe.d_model).expand(probe.n_layers + 1, -1).clone())
    b = as_batch(probe, "left")
    model = probe.hf_model
    with pytest.raises(ZeroDivisionError):
        with probe.steer(vec, layer=LAYER, coef=1.0, positions="response"), probe.ablate(vec, layers=[1]), \
                probe.batch(b):
            step(model, b)
            1 / 0
    assert probe._handles == [] and probe.interventions == () and probe._positions is None
    assert hook_total(probe.model.modules()) == 0 and hook_total(model.modules()) == 0
    # And the model is plain again: same loss as the reference with no hook.
    ref = reference_model(tiny_dirs["llama"], "sdpa")
    torch.testing.assert_close(step(model, b), step(ref, b), atol=1e-5, rtol=1e-5)


def test_caller_masks_are_checked(tiny_dirs):
    probe = fresh_probe(tiny_dirs["llama"])
    vec = pl.PersonaVector(direction(probe.d_model).expand(probe.n_layers + 1, -1).clone())
    b = as_batch(probe, "left")
    with probe.steer(vec, layer=LAYER, coef=1.0, positions="response"):
        with pytest.raises(RuntimeError, match="probe.batch"):
            step(probe.hf_model, b)  # no positions given
        with pytest.raises(RuntimeError, match=r"probe\.batch"), probe.batch(b["prompt_mask"][:, 1:], b["response_mask"][:, 1:]):
            step(probe.hf_model, b)  # masks of another batch
    with pytest.raises(TypeError, match="prompt_mask and response_mask"):
        with probe.batch({"input_ids": b["input_ids"]}):
            pass
    assert probe._handles == [] and probe._positions is None


def test_train_eval_switches_never_rebuild_the_view(tiny_dirs):
    probe = fresh_probe(tiny_dirs["llama"])
    vec = pl.PersonaVector(direction(probe.d_model).expand(probe.n_layers + 1, -1).clone())
    b = as_batch(probe, "left")
    view = probe._fast
    before = view.rebuilds
    model = probe.hf_model
    attn_clone = model.model.layers[0].self_attn
    for i in range(100):
        training = i % 2 == 0
        probe.model.train(training)
        with probe.steer(vec, layer=LAYER, coef=1.0, positions="response"), probe.batch(b):
            loss = step(model, b)
        assert torch.isfinite(loss)
        assert attn_clone.training == training  # the clone took its original's mode
        with torch.no_grad():
            probe.forward(probe.encode(CONVS, with_response=True))
        assert probe.last_path == "hf"
    probe.model.eval()
    assert view.rebuilds == before and probe._fast is view and probe.hf_model is model
