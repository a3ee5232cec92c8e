"""PersonaProbe on tiny random models of two architectures, checked against plain HF.

Every number is compared with an independent computation: HF ``output_hidden_states``,
plain torch hooks on HF decoder layers, or formulas written out here.
"""

from __future__ import annotations

import os

import pytest
import torch

import persona_lens as pl
from persona_lens.vectors import VectorMismatchError

CONVS = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "Put it in boiling water for seven minutes."},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue, like the sky at noon over the sea."},
    ],
]
PROMPTS = ["Tell me about cats.", "Why?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to five"}]]


def hf_layers(hf):
    return hf.model.layers


def reference_hidden(hf, probe, conv):
    """Hidden states of one unpadded conversation, per layer, with layer n taken before the
    final norm (a hook on the last decoder layer) to match the project's layer convention."""
    batch = pl.encode_chat(probe.tokenizer, [conv], with_response=True)
    store = {}
    h = hf_layers(hf)[-1].register_forward_hook(lambda m, a, o: store.__setitem__("last", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            out = hf(batch.input_ids, output_hidden_states=True)
    finally:
        h.remove()
    hs = list(out.hidden_states[:-1]) + [store["last"]]
    return [x[0] for x in hs], batch.prompt_mask[0], batch.response_mask[0]


def random_vector(probe, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return pl.PersonaVector(scale * torch.randn(probe.n_layers + 1, probe.d_model, generator=g), model_name=probe.model_name)


def test_capture_matches_hf_hidden_states(tiny):
    probe, hf, _ = tiny
    acts = probe.capture(CONVS, reductions=["response_mean", "prompt_mean", "last_prompt"], batch_size=3)
    assert acts.layers == list(range(probe.n_layers + 1))
    for i, conv in enumerate(CONVS):
        hs, pmask, rmask = reference_hidden(hf, probe, conv)
        last = pmask.nonzero().max()
        for layer in range(probe.n_layers + 1):
            h = hs[layer]
            torch.testing.assert_close(acts["response_mean"][i, layer], h[rmask].mean(0), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(acts["prompt_mean"][i, layer], h[pmask].mean(0), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(acts["last_prompt"][i, layer], h[last], atol=1e-4, rtol=1e-4)


def test_layer_below_n_equals_hf_output_hidden_states_directly(tiny):
    probe, hf, _ = tiny
    conv = CONVS[0]
    batch = pl.encode_chat(probe.tokenizer, [conv], with_response=True)
    with torch.no_grad():
        hs = hf(batch.input_ids, output_hidden_states=True).hidden_states
    acts = probe.capture([conv], reductions=["response_mean"])
    for layer in range(probe.n_layers):
        expected = hs[layer][0][batch.response_mask[0]].mean(0)
        torch.testing.assert_close(acts["response_mean"][0, layer], expected, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_masks_and_means(tiny):
    probe, _, _ = tiny
    batch = probe.encode(CONVS, with_response=True)
    lengths = batch.attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "test needs rows of different lengths"
    for row in range(len(CONVS)):
        real = batch.attention_mask[row].bool()
        # Left padding: all real tokens are at the end, prompt before response.
        first = int(real.nonzero().min())
        assert real[first:].all() and not real[:first].any()
        assert not (batch.prompt_mask[row] & batch.response_mask[row]).any()
        assert ((batch.prompt_mask[row] | batch.response_mask[row]) == real).all()
        resp = probe.tokenizer(CONVS[row][-1]["content"], add_special_tokens=False)["input_ids"]
        assert batch.input_ids[row][batch.response_mask[row]].tolist() == resp
    # Batched means equal one-at-a-time means (padding does not leak into reductions).
    batched = probe.capture(CONVS, reductions=["response_mean", "last_prompt"], batch_size=3)
    single = probe.capture(CONVS, reductions=["response_mean", "last_prompt"], batch_size=1)
    for r in ("response_mean", "last_prompt"):
        torch.testing.assert_close(batched[r], single[r], atol=1e-4, rtol=1e-4)


def test_capture_mean_streams_the_same_mean(tiny):
    probe, _, _ = tiny
    per = probe.capture(CONVS, layers=[0, 2], reductions=["response_mean", "prompt_mean"])
    mean = probe.capture_mean(CONVS[:2], layers=[0, 2], reductions=["response_mean", "prompt_mean"], batch_size=1)
    mean = probe.capture_mean(CONVS[2:], layers=[0, 2], reductions=["response_mean", "prompt_mean"], into=mean)
    assert mean.counts["response_mean"] == 3
    for r in ("response_mean", "prompt_mean"):
        torch.testing.assert_close(mean.mean(r), per[r].mean(0), atol=1e-5, rtol=1e-5)
        full = mean.full(r, probe.n_layers)
        assert full.shape == (probe.n_layers + 1, probe.d_model)
        torch.testing.assert_close(full[2], per[r][:, 1].mean(0), atol=1e-5, rtol=1e-5)
        assert full[1].abs().sum() == 0


def hf_generate(hf, probe, prompts, max_new_tokens, hook=None, layer_idx=None):
    batch = probe.encode(prompts, with_response=False)
    handle = None
    if hook is not None:
        handle = hf_layers(hf)[layer_idx].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = hf.generate(
                batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=probe.tokenizer.pad_token_id,
            )
    finally:
        if handle:
            handle.remove()
    texts = []
    for row in out[:, batch.input_ids.shape[1]:]:
        texts.append(probe.tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def add_to_output(vec, coef, last_only=False, decode_only=False):
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if decode_only:  # HF's KV-cached decode steps see one new column; the prefill sees the prompt
            h = h + coef * vec if h.shape[1] == 1 else h
        elif last_only:
            h = h.clone()
            h[:, -1] = h[:, -1] + coef * vec
        else:
            h = h + coef * vec
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    return hook


def test_unsteered_greedy_equals_hf_generate(tiny):
    probe, hf, _ = tiny
    expected = hf_generate(hf, probe, PROMPTS, 12)
    assert probe.generate(PROMPTS, max_new_tokens=12) == expected
    assert probe.generate(PROMPTS, max_new_tokens=12, use_cache=False) == expected


@pytest.mark.parametrize("layer", [1, "last"])
def test_steered_greedy_equals_hf_with_plain_hook(tiny, layer):
    probe, hf, _ = tiny
    layer = probe.n_layers if layer == "last" else layer
    vec = random_vector(probe, seed=layer)
    coef = 4.0
    # Layer L is the input of block L = the output of decoder layer L - 1.
    expected = hf_generate(hf, probe, PROMPTS, 12, add_to_output(vec[layer], coef), layer - 1)
    assert expected != hf_generate(hf, probe, PROMPTS, 12), "steering should change this output"
    with probe.steer(vec, layer=layer, coef=coef):
        cached = probe.generate(PROMPTS, max_new_tokens=12)
        uncached = probe.generate(PROMPTS, max_new_tokens=12, use_cache=False)
    assert cached == expected
    assert uncached == expected


def test_response_steering_matches_released_code(tiny):
    """The released code steers ``output[:, -1]`` on every forward: the last prompt token at
    prefill, then each new token. That is positions='response'."""
    probe, hf, _ = tiny
    vec = random_vector(probe, seed=7)
    expected = hf_generate(hf, probe, PROMPTS, 10, add_to_output(vec[2], 5.0, last_only=True), 1)
    assert expected != hf_generate(hf, probe, PROMPTS, 10, add_to_output(vec[2], 5.0, decode_only=True), 1), \
        "steering the last prompt token should matter here"
    with probe.steer(vec, layer=2, coef=5.0, positions="response"):
        assert probe.generate(PROMPTS, max_new_tokens=10) == expected
        assert probe.generate(PROMPTS, max_new_tokens=10, use_cache=False) == expected


def test_response_only_steering_matches_a_decode_step_hook(tiny):
    """positions='response_only' steers the generated tokens alone: with HF's KV cache those
    are the one-column forwards after the prefill."""
    probe, hf, _ = tiny
    vec = random_vector(probe, seed=7)
    expected = hf_generate(hf, probe, PROMPTS, 10, add_to_output(vec[2], 5.0, decode_only=True), 1)
    assert expected != hf_generate(hf, probe, PROMPTS, 10), "steering should change this output"
    with probe.steer(vec, layer=2, coef=5.0, positions="response_only"):
        assert probe.generate(PROMPTS, max_new_tokens=10) == expected
        assert probe.generate(PROMPTS, max_new_tokens=10, use_cache=False) == expected


def test_include_last_prompt_is_deprecated_and_keeps_its_meaning(tiny):
    probe, _, _ = tiny
    vec = random_vector(probe, seed=7)
    with probe.steer(vec, layer=2, coef=5.0, positions="response_only"):
        only = probe.generate(PROMPTS, max_new_tokens=8)
    with probe.steer(vec, layer=2, coef=5.0, positions="response"):
        both = probe.generate(PROMPTS, max_new_tokens=8)
    for flag, expected in ((True, both), (False, only)):
        with pytest.warns(DeprecationWarning, match="positions='response"):
            with probe.steer(vec, layer=2, coef=5.0, positions="response", include_last_prompt=flag):
                assert probe.generate(PROMPTS, max_new_tokens=8) == expected


def test_response_steering_leaves_prompt_untouched_and_changes_output(tiny):
    probe, _, _ = tiny
    vec = random_vector(probe, seed=3)
    plain = probe.capture(CONVS, reductions=["prompt_mean", "last_prompt", "response_mean"])
    plain_text = probe.generate(PROMPTS, max_new_tokens=10)
    with probe.steer(vec, layer=1, coef=6.0, positions="response_only"):
        steered = probe.capture(CONVS, reductions=["prompt_mean", "last_prompt", "response_mean"])
        steered_text = probe.generate(PROMPTS, max_new_tokens=10)
    torch.testing.assert_close(steered["prompt_mean"], plain["prompt_mean"])
    torch.testing.assert_close(steered["last_prompt"], plain["last_prompt"])
    # Response activations at the steered layer moved by exactly coef * v.
    torch.testing.assert_close(steered["response_mean"][:, 1], plain["response_mean"][:, 1] + 6.0 * vec[1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(steered["response_mean"][:, 2], plain["response_mean"][:, 2])
    assert steered_text != plain_text
    # 'response' also moves the last prompt token by coef * v, and no other prompt token.
    with probe.steer(vec, layer=1, coef=6.0, positions="response"):
        released = probe.capture(CONVS, reductions=["prompt_mean", "last_prompt", "response_mean"])
    torch.testing.assert_close(released["last_prompt"][:, 1], plain["last_prompt"][:, 1] + 6.0 * vec[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(released["last_prompt"][:, 0], plain["last_prompt"][:, 0])
    n_prompt = pl.encode_chat(probe.tokenizer, CONVS, with_response=True).prompt_mask.sum(1).float()
    torch.testing.assert_close(released["prompt_mean"][:, 1], plain["prompt_mean"][:, 1] + 6.0 * vec[1] / n_prompt[:, None],
                               atol=1e-4, rtol=1e-4)


def test_prompt_steering_only_moves_prompt(tiny):
    probe, _, _ = tiny
    vec = random_vector(probe, seed=4)
    plain = probe.capture(CONVS, layers=[2], reductions=["prompt_mean", "response_mean"])
    with probe.steer(vec, layer=2, coef=3.0, positions="prompt"):
        steered = probe.capture(CONVS, layers=[2], reductions=["prompt_mean", "response_mean"])
    torch.testing.assert_close(steered["prompt_mean"], plain["prompt_mean"] + 3.0 * vec[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steered["response_mean"], plain["response_mean"])


def test_nested_steering_adds_and_multi_layer(tiny):
    probe, _, _ = tiny
    vec = random_vector(probe, seed=5)
    with probe.steer(vec, layer=1, coef=1.5):
        with probe.steer(vec, layer=1, coef=2.5):
            nested = probe.generate(PROMPTS, max_new_tokens=8)
    with probe.steer(vec, layer=1, coef=4.0):
        single = probe.generate(PROMPTS, max_new_tokens=8)
    assert nested == single
    plain = probe.capture(CONVS, reductions=["response_mean"])
    with probe.steer(vec, layers={0: 1.0, 2: -2.0}):
        multi = probe.capture(CONVS, layers=[0], reductions=["response_mean"])
    torch.testing.assert_close(multi["response_mean"][:, 0], plain["response_mean"][:, 0] + vec[0], atol=1e-4, rtol=1e-4)


def test_ablation_removes_the_direction(tiny):
    probe, hf, _ = tiny
    vec = random_vector(probe, seed=6)
    u = vec.unit(2)
    with probe.ablate(vec, layers=[2]):
        acts = probe.capture(CONVS, layers=[2], reductions=["response_mean", "prompt_mean"])
        texts = probe.generate(PROMPTS, max_new_tokens=10)
    assert acts["response_mean"][:, 0] @ u == pytest.approx(torch.zeros(len(CONVS)), abs=1e-4)

    def ablate_hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h - (h @ u)[..., None] * u
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    assert texts == hf_generate(hf, probe, PROMPTS, 10, ablate_hook, 1)
    # layer= names one layer, as probe.steer takes it; one of the two must be given
    with probe.ablate(vec, layer=2):
        assert probe.generate(PROMPTS, max_new_tokens=10) == texts
    for kw in ({}, {"layers": [2], "layer": 2}):
        with pytest.raises(pl.InvalidArgument, match="layers=L or"):
            with probe.ablate(vec, **kw):
                pass
    assert probe._handles == []


def test_project_matches_hand_projection(tiny):
    probe, hf, _ = tiny
    vec = random_vector(probe, seed=8)
    u = vec[2] / vec[2].norm()
    last = probe.project(CONVS, vec, layer=2, at="last_prompt")
    resp = probe.project(CONVS, vec, layer=2, at="response_mean")
    toks = probe.project(CONVS, vec, layer=2, at="tokens")
    prompts_only = probe.project([c[:-1] for c in CONVS], vec, layer=2, at="last_prompt")
    for i, conv in enumerate(CONVS):
        hs, pmask, rmask = reference_hidden(hf, probe, conv)
        h = hs[2]
        assert float(last[i]) == pytest.approx(float(h[pmask.nonzero().max()] @ u), abs=1e-4)
        assert float(resp[i]) == pytest.approx(float(h[rmask].mean(0) @ u), abs=1e-4)
        torch.testing.assert_close(toks[i], h[rmask] @ u, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(prompts_only, last, atol=1e-5, rtol=1e-5)


def test_monitor_readings_equal_teacher_forced_projection(tiny):
    probe, hf, _ = tiny
    vec = random_vector(probe, seed=9)
    layer = 2
    u = vec.unit(layer)
    readings = probe.monitor(PROMPTS, vec, layer=layer, max_new_tokens=8)
    gens = probe.generate(PROMPTS, max_new_tokens=8, return_generations=True)
    assert [r.text for r in readings] == [g.text for g in gens]
    uncached = probe.monitor(PROMPTS, vec, layer=layer, max_new_tokens=8, use_cache=False)
    for r, g, ru in zip(readings, gens, uncached):
        ids = torch.tensor([g.prompt_ids + g.response_ids])
        with torch.no_grad():
            h = hf(ids, output_hidden_states=True).hidden_states[layer][0]
        proj = h @ u
        p = len(g.prompt_ids)
        n = len(g.response_ids)
        assert len(r.response_projections) == n == len(r.response_tokens)
        torch.testing.assert_close(torch.tensor(r.response_projections), proj[p - 1 : p - 1 + n], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(r.prompt_projections), proj[:p], atol=1e-4, rtol=1e-4)
        assert r.last_prompt == pytest.approx(float(proj[p - 1]), abs=1e-4)
        torch.testing.assert_close(torch.tensor(ru.response_projections), torch.tensor(r.response_projections), atol=1e-4, rtol=1e-4)


def test_monitor_needs_no_extra_forward(tiny):
    probe, _, _ = tiny
    vec = random_vector(probe, seed=10)
    calls = []
    module, _ = probe.backend.resid_site(0)
    h = module.register_forward_hook(lambda *a: calls.append(1))
    try:
        probe.generate(PROMPTS, max_new_tokens=6)
        plain = len(calls)
        calls.clear()
        probe.monitor(PROMPTS, vec, layer=1, max_new_tokens=6)
    finally:
        h.remove()
    assert len(calls) == plain > 0


def test_monitor_figure(tiny):
    probe, _, _ = tiny
    readings = probe.monitor(PROMPTS[:2], random_vector(probe), layer=1, max_new_tokens=5)
    fig = pl.plot.projection_curve(readings, labels=["a", "b"])
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [list(t.y) for t in lines] == [r.response_projections for r in readings]
    # each reading at the position it was read at: the first at the last prompt token (-1)
    assert [list(t.x) for t in lines] == [list(range(-1, len(r.response_projections) - 1)) for r in readings]
    assert all(t.y[0] == r.last_prompt for t, r in zip(lines, readings))
    assert "layer 1" in fig.layout.title.text


@pytest.mark.skipif(os.environ.get("PERSONA_LENS_TEST_BACKEND", "bridge") != "bridge",
                    reason="the organism loads as a TransformerBridge")
def test_a_readings_response_mean_is_captures_response_mean(doctest_probe, doctest_vec, doctest_trait):
    """Reading.response_mean averages the answer's own positions, as project(at="response_mean")
    does for the same answer: not the last prompt token's reading. (The organism: its answers
    end; a tiny random model's run to the length limit.)"""
    probe, vec, prompts = doctest_probe, doctest_vec, list(doctest_trait.eval_questions[:4])
    readings = probe.monitor(prompts, vec, layer=3, max_new_tokens=48)
    finished = [(p, r) for p, r in zip(prompts, readings) if r.text and len(r.response_tokens) < 48]
    assert finished, "no answer ended inside 48 tokens"
    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": r.text}] for p, r in finished]
    want = probe.project(convs, vec, layer=3, at="response_mean")
    torch.testing.assert_close(torch.tensor([r.response_mean for _, r in finished]), want.float(), rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded(tiny):
    probe, _, _ = tiny
    a = probe.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=1)
    b = probe.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=1)
    c = probe.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=2)
    assert a == b
    assert a != c
    # seed=None is unseeded, as on the vLLM engine (it was seed 0 here)
    unseeded = [probe.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=None) for _ in range(2)]
    assert unseeded[0] != unseeded[1]
    assert probe.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=0) not in unseeded


def all_hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_after_exception_and_user_hooks_kept(tiny):
    probe, _, _ = tiny
    vec = random_vector(probe)
    fired = []
    module, _ = probe.backend.resid_site(1)
    user = module.register_forward_hook(lambda *a: fired.append(1))
    before = all_hook_counts(probe.model)
    with pytest.raises(RuntimeError, match="boom"):
        with probe.steer(vec, layer=1, coef=1.0), probe.ablate(vec, layers=[2]):
            assert all_hook_counts(probe.model) > before
            raise RuntimeError("boom")
    assert all_hook_counts(probe.model) == before
    assert probe._handles == []
    # A failure inside a hook (here: position masks asked for outside the probe) also cleans up.
    with pytest.raises(RuntimeError, match="positions='response'"):
        with probe.steer(vec, layer=1, coef=1.0, positions="response"):
            batch = probe.encode(CONVS, with_response=True)
            probe.backend.logits(batch.input_ids, batch.attention_mask, None, last_only=True)
    assert all_hook_counts(probe.model) == before
    probe.generate(PROMPTS[:1], max_new_tokens=2)
    assert fired, "the user's own hook must still fire"
    user.remove()


def test_chat_encoding_has_no_double_bos(tiny):
    probe, _, path = tiny
    tok = probe.tokenizer
    batch = probe.encode(["Hello"], with_response=False)
    ids = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    expected = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ids == list(expected)
    assert ids.count(tok.bos_token_id) == (1 if "llama" in str(path) else 0)


def test_batched_encoding_equals_each_conversation_alone(tiny):
    """Texts go to the tokenizer in one call per kind; every row must still be what that
    conversation gives alone (HF's own template tokenization, response tokenized alone)."""
    probe, _, _ = tiny
    tok = probe.tokenizer
    convs = CONVS + [
        [{"role": "user", "content": "A much longer question, with punctuation; and more words."},
         {"role": "assistant", "content": ""}],
    ]
    rows = pl.chat.chat_rows(tok, convs, with_response=True)
    assert len(rows) == len(convs)
    for (prompt, response), conv in zip(rows, convs):
        ref = tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if hasattr(ref, "keys") else ref
        assert prompt == list(ref)
        assert response == tok(conv[-1]["content"], add_special_tokens=False)["input_ids"]
    batch = probe.encode(convs, with_response=True)
    for j, (prompt, response) in enumerate(rows):
        real = batch.attention_mask[j].bool()
        assert batch.input_ids[j][real].tolist() == prompt + response
        assert batch.response_mask[j].sum().item() == len(response)


def test_bad_input_errors(tiny):
    probe, _, _ = tiny
    vec = random_vector(probe)
    wrong_d = pl.PersonaVector(torch.randn(probe.n_layers + 1, probe.d_model + 1))
    other_model = pl.PersonaVector(torch.randn(probe.n_layers + 3, probe.d_model), model_name="other/model")
    with pytest.raises(VectorMismatchError, match="d_model"):
        with probe.steer(wrong_d, layer=1):
            pass
    with pytest.raises(VectorMismatchError, match="another model"):
        probe.project(CONVS, other_model, layer=1)
    with pytest.raises(ValueError, match="out of range"):
        with probe.steer(vec, layer=probe.n_layers + 1):
            pass
    with pytest.raises(ValueError, match="out of range"):
        probe.capture(CONVS, layers=[-1])
    with pytest.raises(ValueError, match="unknown position mode"):
        with probe.steer(vec, layer=1, positions="middle"):
            pass
    with pytest.raises(ValueError, match="unknown reduction"):
        probe.capture(CONVS, reductions=["max"])
    with pytest.raises(ValueError, match="empty batch"):
        probe.capture([])
    with pytest.raises(ValueError, match="empty batch"):
        probe.generate([])
    with pytest.raises(ValueError, match="must end with an assistant"):
        probe.capture([[{"role": "user", "content": "hi"}]])
    with pytest.raises(ValueError, match="d_model"):
        with probe.steer(torch.randn(probe.d_model + 2), layer=1):
            pass
    with pytest.raises(KeyError, match="did you mean"):
        with probe.add_hooks([("blocks.0.hook_resid_pree", lambda x, hook: None)]):
            pass
    assert probe._handles == []


def test_add_hooks_fires_user_function_on_named_point(tiny):
    probe, _, _ = tiny
    seen = []
    with probe.add_hooks([("blocks.1.hook_resid_pre", lambda x, hook: seen.append(tuple(x.shape)))]):
        probe.generate(PROMPTS[:1], max_new_tokens=3)
    assert len(seen) == 3 and seen[0][0] == 1 and seen[1][1] == 1
    assert probe._handles == []


def test_a_coef_beside_a_layers_dict_is_refused_not_ignored(tiny):
    """layers={L: c} carries its coefficients; a coef= beside it used to be dropped silently."""
    from persona_lens.finetune import FinetuneError, Interventions
    from persona_lens.store import Steering

    probe, _, _ = tiny
    vec = random_vector(probe, seed=8)
    with pytest.raises(ValueError, match="coef"):
        probe.steering(vec, layers={1: 1.5}, coef=0.0)
    with pytest.raises(ValueError, match="coef"):
        with probe.steer(vec, layers={1: 1.5}, coef=2.0):
            pass
    assert [s.coef for s in probe.steering(vec, layers=[1, 2])] == [1.0, 1.0]  # a list shares coef, 1.0 by default
    assert [s.coef for s in probe.steering(vec, layer=1)] == [1.0]
    with pytest.raises(ValueError, match="coef"):
        Steering(vec, layers={1: 1.5}, coef=0.5)
    with pytest.raises(FinetuneError, match="coef"):
        Interventions(vec, steer={1: 1.5}, coef=0.5)
    assert Interventions(vec, steer=[1, 2], coef=0.5).steer == {1: 0.5, 2: 0.5}
    assert not probe.interventions


def test_steering_an_all_zero_row_is_refused(tiny):
    """A vector extracted at some layers has zero rows elsewhere: steering there is a no-op."""
    probe, _, _ = tiny
    directions = random_vector(probe, seed=9).directions.clone()
    directions[2] = 0
    vec = pl.PersonaVector(directions)
    with pytest.raises(ValueError, match=r"vector\[2\] is all zeros"):
        probe.steering(vec, layer=2, coef=1.0)
    assert probe.steering(vec, layer=2, coef=0.0)[0].coef == 0.0  # the unsteered cell of a sweep
    assert probe.steering(vec, layer=1, coef=1.0)


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("use_cache", [True, False])
def test_on_text_pieces_join_to_each_answer_and_change_nothing(tiny, use_cache):
    probe, _, _ = tiny
    kw = dict(max_new_tokens=24, temperature=1.0, seed=4, batch_size=2, use_cache=use_cache)  # two batches
    plain = probe.generate(PROMPTS, **kw)
    pieces: dict[int, list[str]] = {i: [] for i in range(len(PROMPTS))}
    got = probe.generate(PROMPTS, on_text=lambda i, t: pieces[i].append(t), **kw)
    assert got == plain
    assert ["".join(pieces[i]) for i in range(len(PROMPTS))] == plain
    assert all(p for ps in pieces.values() for p in ps)  # no empty piece is sent
    assert sum(len(ps) > 1 for ps in pieces.values()) >= 2  # pieces as the answers grow, not one at the end


def test_on_text_true_stops_that_answer_only(tiny):
    probe, _, _ = tiny
    kw = dict(max_new_tokens=24, temperature=1.0, seed=4, return_generations=True)
    plain = probe.generate(PROMPTS, **kw)
    long_row = max(range(len(PROMPTS)), key=lambda i: len(plain[i].response_ids))
    assert len(plain[long_row].response_ids) > 6
    seen: dict[int, list[str]] = {i: [] for i in range(len(PROMPTS))}

    def on_text(i, t):
        seen[i].append(t)
        return i == long_row and len(seen[i]) == 3

    got = probe.generate(PROMPTS, on_text=on_text, **kw)
    for i, (g, p) in enumerate(zip(got, plain)):
        if i == long_row:  # stopped where it was: its text is what was sent, a start of the full answer
            assert g.text == "".join(seen[i]) and p.text.startswith(g.text) and len(g.text) < len(p.text)
            assert g.response_ids == p.response_ids[: len(g.response_ids)] and not g.finished
        else:  # the other rows are untouched (same tokens, same sampling)
            assert (g.text, g.response_ids, g.finished) == (p.text, p.response_ids, p.finished)


def test_an_exception_in_on_text_stops_generation_and_removes_every_hook(tiny):
    probe, _, _ = tiny
    vec = random_vector(probe)
    before = all_hook_counts(probe.model)
    with probe.steer(vec, layer=1, coef=2.0):
        steered = probe.generate(PROMPTS, max_new_tokens=12)

        def boom(i, t):
            raise KeyboardInterrupt("client gone")

        with pytest.raises(KeyboardInterrupt, match="client gone"):
            probe.generate(PROMPTS, max_new_tokens=12, on_text=boom)
        assert probe.generate(PROMPTS, max_new_tokens=12) == steered  # the user's steering still acts alone
    assert all_hook_counts(probe.model) == before and probe._handles == []
    with pytest.raises(TypeError, match="on_text"):
        probe.generate(PROMPTS, on_text="print")
