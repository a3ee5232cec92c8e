"""Integration tests on a real chat model that installs offline: SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
import torch

import persona_lens as pl

pytestmark = pytest.mark.smollm

QUESTION = "What is the capital of France?"


def test_chat_template_applied_without_double_bos(smollm2):
    tok = smollm2.tokenizer
    conv = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": QUESTION}]
    batch = smollm2.encode([conv], with_response=False)
    ids = batch.input_ids[0].tolist()
    ref = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert ids == list(ref)
    assert tok.decode(ids).startswith("<|im_start|>system")
    # SmolLM2's BOS is <|im_start|>, which also opens every turn: the check is that the
    # sequence does not start with it twice.
    assert tok.bos_token_id is not None and ids[0] == tok.bos_token_id
    assert ids[1] != tok.bos_token_id


def test_batched_encoding_equals_each_conversation_alone(smollm2):
    tok = smollm2.tokenizer
    convs = [
        [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": QUESTION},
         {"role": "assistant", "content": "Paris, of course."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " leading space and\nnewline"}],
        [{"role": "user", "content": "Name three fruits, please."}, {"role": "assistant", "content": ""}],
    ]
    for (prompt, response), conv in zip(pl.chat.chat_rows(tok, convs, with_response=True), convs):
        ref = tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True)
        assert prompt == list(ref["input_ids"] if hasattr(ref, "keys") else ref)
        assert response == tok(conv[-1]["content"], add_special_tokens=False)["input_ids"]


def test_greedy_answer_mentions_paris_with_and_without_cache(smollm2):
    cached = smollm2.generate([QUESTION], max_new_tokens=16)
    uncached = smollm2.generate([QUESTION], max_new_tokens=16, use_cache=False)
    # If this ever fails on cached only, check the transformers pin (environment.md: 5.24
    # silently broke cached generation through TransformerLens 4.3).
    assert "Paris" in cached[0], cached
    assert cached == uncached


def test_greedy_equals_plain_hf_generate(smollm2, smollm2_hf):
    prompts = [QUESTION, "Name three fruits."]
    batch = smollm2.encode(prompts, with_response=False)
    with torch.no_grad():
        out = smollm2_hf.generate(
            batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=12, do_sample=False,
            pad_token_id=smollm2.tokenizer.pad_token_id,
        )
    expected = [smollm2.tokenizer.decode(r, skip_special_tokens=True).strip() for r in out[:, batch.input_ids.shape[1]:]]
    assert smollm2.generate(prompts, max_new_tokens=12) == expected


def test_capture_parity_with_hf_hidden_states(smollm2, smollm2_hf):
    convs = [
        [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "The capital of France is Paris."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    ]
    layers = [0, 7, 15, 29]
    acts = smollm2.capture(convs, layers=layers, reductions=["response_mean", "last_prompt"], batch_size=2)
    for i, conv in enumerate(convs):
        b = smollm2.encode([conv], with_response=True)
        with torch.no_grad():
            hs = smollm2_hf(b.input_ids, output_hidden_states=True).hidden_states
        last = b.prompt_mask[0].nonzero().max()
        for j, layer in enumerate(layers):
            ref = hs[layer][0]
            torch.testing.assert_close(acts["response_mean"][i, j], ref[b.response_mask[0]].mean(0), atol=2e-3, rtol=1e-3)
            torch.testing.assert_close(acts["last_prompt"][i, j], ref[last], atol=2e-3, rtol=1e-3)


def test_contrastive_vector_steers_generation(smollm2):
    topics = ["How was your day?", "What should I cook tonight?", "Tell me about your weekend."]
    pirate = "Arr matey! Ahoy, me hearty, the sea and me ship be callin', arr!"
    plain = "It was fine, thank you for asking. I hope yours is going well."
    pos = [[{"role": "user", "content": q}, {"role": "assistant", "content": pirate}] for q in topics]
    neg = [[{"role": "user", "content": q}, {"role": "assistant", "content": plain}] for q in topics]
    p = smollm2.capture_mean(pos, reductions=["response_mean"])
    n = smollm2.capture_mean(neg, reductions=["response_mean"])
    vec = pl.PersonaVector.from_means(
        p.full("response_mean", smollm2.n_layers), n.full("response_mean", smollm2.n_layers),
        model_name=smollm2.model_name, trait="pirate",
    )
    layer = 15
    question = ["What do you like to do on holidays?"]
    base = smollm2.generate(question, max_new_tokens=24)
    with smollm2.steer(vec, layer=layer, coef=1.5, positions="response"):
        steered = smollm2.generate(question, max_new_tokens=24)
    assert steered != base
    proj = smollm2.project(
        [[{"role": "user", "content": question[0]}, {"role": "assistant", "content": t}] for t in (base[0], steered[0])],
        vec, layer=layer, at="response_mean",
    )
    assert proj[1] > proj[0], (base, steered, proj)


def test_streamed_pieces_join_to_the_answer_on_a_byte_level_tokenizer(smollm2):
    """Pieces sent as an answer grows never split a character: a multi-byte character whose
    bytes are spread over several tokens waits for its last byte; spaces before punctuation
    that the decoder cleans up are never sent early."""
    from persona_lens.probe.generation import _TextStream

    tok = smollm2.tokenizer
    text = "Café au lait 🙂 , naïve ! Ça va ? 東京 . done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(1, len(ids)))  # characters split over tokens
    pieces: list[str] = []
    stream = _TextStream(tok, [0], set(), lambda i, t: pieces.append(t))
    for t in ids:
        stream.step(torch.tensor([t]), torch.tensor([False]))
    final = tok.decode(ids, skip_special_tokens=True).strip()
    stream.close(0, final)
    assert "".join(pieces) == final and not any("\ufffd" in p for p in pieces)
    answers: dict[int, list[str]] = {0: [], 1: []}
    got = smollm2.generate([QUESTION, "Write a short greeting in French."], max_new_tokens=24, temperature=1.0,
                           seed=2, on_text=lambda i, t: answers[i].append(t))
    assert ["".join(answers[i]) for i in (0, 1)] == got
