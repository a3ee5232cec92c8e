"""The steered OpenAI-compatible server, through HTTP and the ``openai`` client.

Answers are held against plain HF on the organism: greedy ``model.generate`` with the
reference's own steering hook (tests/reference/organism.py, the release's "response" mode),
``output_hidden_states`` for the readings, response tokens by hand. The server's own numbers
are never the reference.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
import openai  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from persona_lens.serve import make_app  # noqa: E402
from tests.reference import organism as B  # noqa: E402

STEER = (5, 1.15)  # the organism's evil steering cell (tests/reference/organism.py STEER_ADD)


@pytest.fixture(scope="module")
def probe(doctest_probe):
    return doctest_probe


@pytest.fixture(scope="module")
def vec(doctest_vec):
    return doctest_vec


@pytest.fixture(scope="module")
def hf():
    return B.load()


@pytest.fixture(scope="module")
def questions(doctest_trait):
    return list(doctest_trait.eval_questions[:3])


@pytest.fixture(scope="module")
def app(probe, vec):
    return make_app(probe, {"evil": vec}, max_tokens=24)


@pytest.fixture(scope="module")
def http(app):
    return TestClient(app)


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url="http://test/v1", api_key="none", http_client=http, max_retries=0)


def hf_greedy(hf, conv, max_new_tokens, steer=None):
    """Greedy answer of plain HF, steered by the reference's hook when ``steer`` = (vector row, layer, coef)."""
    model, tok = hf
    ids = tok(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False, return_tensors="pt")

    def go():
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    if steer is None:
        return go()
    v, layer, coef = steer
    with B.steer(model, v, layer, coef, positions="response"):
        return go()


def hf_readings(hf, conv, answer, layer, unit, steer=None):
    """(last prompt token, mean over the answer's tokens) projections on ``unit`` from
    ``output_hidden_states``; ``steer`` = (vector row, layer, coef) adds ``coef * v`` to the
    output of block ``layer - 1`` from the last prompt token on (the release's "response"
    mode: the last prompt token and every answer token), by a hook written here."""
    model, tok = hf
    p = tok(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False)["input_ids"]
    r = tok(answer, add_special_tokens=False)["input_ids"]

    def hook(_mod, _inp, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[:, len(p) - 1:] += steer[2] * steer[0]
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    def hidden(ids):
        handle = model.model.layers[steer[1] - 1].register_forward_hook(hook) if steer else None
        try:
            with torch.no_grad():
                return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
        finally:
            if handle is not None:
                handle.remove()

    return float(hidden(p)[-1] @ unit), float(hidden(p + r)[len(p):].mean(0) @ unit)


def ask(client, question, **kw):
    kw.setdefault("max_tokens", 24)
    return client.chat.completions.create(model="persona-organism",
                                          messages=[{"role": "user", "content": question}], **kw)


# ----------------------------------------------------------------------------- answers


def test_unsteered_and_steered_greedy_answers_equal_plain_hf(client, hf, vec, questions):
    layer, coef = STEER
    changed = 0
    for q in questions:
        conv = [{"role": "user", "content": q}]
        plain = ask(client, q, temperature=0)
        assert plain.choices[0].message.content == hf_greedy(hf, conv, 24)
        steered = ask(client, q, temperature=0,
                      extra_body={"steering": [{"vector": "evil", "layer": layer, "coef": coef}]})
        want = hf_greedy(hf, conv, 24, steer=(vec.directions[layer], layer, coef))
        assert steered.choices[0].message.content == want
        changed += want != plain.choices[0].message.content
        # usage counts the template's prompt tokens and every generated token
        tok = hf[1]
        n_prompt = len(tok(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)["input_ids"])
        assert steered.usage.prompt_tokens == n_prompt
        n_answer = len(tok(want, add_special_tokens=False)["input_ids"])
        finished = steered.choices[0].finish_reason == "stop"
        assert steered.usage.completion_tokens == n_answer + finished  # + the end-of-turn token
        assert steered.persona_lens["steering"] == [{"vector": "evil", "trait": "evil", "model_name": vec.model_name,
                                                     "layers": {str(layer): coef}, "positions": "response"}]
    assert changed >= 2, "the steering cell changed too few answers to test anything"


def test_layers_form_and_suppression_with_a_negative_coefficient(client, hf, vec, questions):
    q = questions[0]
    conv = [{"role": "user", "content": q}]
    got = ask(client, q, temperature=0, extra_body={"steering": [{"vector": "evil", "layers": {"5": -2.0}}]})
    assert got.choices[0].message.content == hf_greedy(hf, conv, 24, steer=(vec.directions[5], 5, -2.0))


def test_sampled_answers_repeat_with_the_seed_the_reply_names(client, questions):
    first = ask(client, questions[0], n=3, temperature=1.0)
    seed = first.persona_lens["seed"]
    again = ask(client, questions[0], n=3, temperature=1.0, seed=seed)
    texts = [c.message.content for c in first.choices]
    assert [c.message.content for c in again.choices] == texts
    assert [c.index for c in first.choices] == [0, 1, 2]
    other = ask(client, questions[0], n=3, temperature=1.0, seed=seed + 1)
    assert [c.message.content for c in other.choices] != texts


def test_monitor_reads_the_steered_model_before_and_in_the_answer(client, hf, vec, questions):
    layer, coef = 3, 1.0
    q = questions[1]
    conv = [{"role": "user", "content": q}]
    # under the steered layer (unchanged) and above it (moved); not the last layer, where HF's
    # hidden_states[-1] is after the final norm
    for read_layer in (2, 5):
        unit = vec.directions[read_layer] / vec.directions[read_layer].norm()
        got = ask(client, q, temperature=0, extra_body={
            "steering": [{"vector": "evil", "layer": layer, "coef": coef}],
            "monitor": [{"vector": "evil", "layer": read_layer}]})
        answer = got.choices[0].message.content
        last, mean = hf_readings(hf, conv, answer, read_layer, unit, steer=(vec.directions[layer], layer, coef))
        assert got.persona == [{"vector": "evil", "layer": read_layer, "last_prompt": pytest.approx(last, rel=1e-4, abs=1e-3)}]
        assert got.choices[0].persona == [
            {"vector": "evil", "layer": read_layer, "response_mean": pytest.approx(mean, rel=1e-4, abs=1e-3)}]
    plain_last, _ = hf_readings(hf, conv, answer, 5, unit)
    assert abs(got.persona[0]["last_prompt"] - plain_last) > 1.0, "steering at layer 3 must move the reading at 5"


def test_stop_strings_cut_the_answer(client, questions):
    full = ask(client, questions[0], temperature=0).choices[0].message.content
    word = full.split()[2]
    cut = ask(client, questions[0], temperature=0, stop=[" " + word]).choices[0]
    assert cut.message.content == full[: full.index(" " + word)] and cut.finish_reason == "stop"


def test_length_limit_gives_finish_reason_length(client, questions):
    got = ask(client, questions[0], temperature=0, max_tokens=2)
    assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == 2


def test_stream_carries_the_same_answers_usage_and_readings(client, questions):
    kw = dict(temperature=1.0, seed=5, n=2, extra_body={"monitor": [{"vector": "evil", "layer": 3}]})
    whole = ask(client, questions[2], **kw)
    # OpenAI's own loop: every chunk has a choice unless usage was asked for
    plain = list(ask(client, questions[2], stream=True, **kw))
    for i in range(2):
        mine = [c.choices[0] for c in plain if c.choices[0].index == i]
        assert "".join(d.delta.content or "" for d in mine) == whole.choices[i].message.content
        assert mine[-1].finish_reason == whole.choices[i].finish_reason
        assert mine[-1].persona == whole.choices[i].persona  # each choice's readings in its own choice
    assert plain[-1].persona == whole.persona and plain[-1].persona_lens == whole.persona_lens
    chunks = list(ask(client, questions[2], stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.choices for c in chunks[:-1]) and not chunks[-1].choices and all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stream_sends_the_answer_as_it_grows_and_stops_at_a_stop_string(client, hf, questions):
    conv = [{"role": "user", "content": questions[0]}]
    full = hf_greedy(hf, conv, 24)
    chunks = list(ask(client, questions[0], temperature=0, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == full and len(pieces) > 3  # piece by piece, not the answer in one chunk
    assert len({c.id for c in chunks}) == 1
    word = full.split()[3]
    want = full[: full.index(" " + word)]  # OpenAI's rule: the answer ends before the stop string
    whole = ask(client, questions[0], temperature=0, stop=[" " + word, "never said"])
    streamed = list(ask(client, questions[0], temperature=0, stop=[" " + word, "never said"], stream=True,
                        stream_options={"include_usage": True}))
    got = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert whole.choices[0].message.content == got == want
    assert whole.choices[0].finish_reason == [c for c in streamed if c.choices][-1].choices[0].finish_reason == "stop"
    # generation ends where the stop string appears: fewer tokens than the whole answer took
    n_full = [c for c in chunks if not c.choices][0].usage.completion_tokens
    assert whole.usage.completion_tokens == streamed[-1].usage.completion_tokens < n_full


@settings(max_examples=60, deadline=None)
@given(text=st.text("ab .", max_size=14), stop=st.lists(st.text("ab .", min_size=1, max_size=3), max_size=3),
       cuts=st.lists(st.integers(0, 14), max_size=5))
def test_stop_strings_on_a_growing_answer_give_what_the_whole_answer_gives(text, stop, cuts):
    from persona_lens.serve import _Stops

    found = [text.find(s) for s in stop if s in text]
    want = text[: min(found)] if found else text  # the earliest stop string ends the answer
    stops, sent, ended = _Stops(stop, 1), "", False
    bounds = sorted(set(c for c in cuts if c < len(text))) + [len(text)]
    start = 0
    for b in bounds:
        out, done = stops.push(0, text[start:b])
        start = b
        assert not ended or out == ""
        sent += out
        assert want.startswith(sent)  # never past the stop, never a piece that changes later
        ended = ended or done
    assert ended == bool(found) and (sent == want or not ended)


def test_a_failure_while_streaming_is_an_error_event_and_frees_the_model(app, probe, vec, questions, monkeypatch):
    client = openai.OpenAI(base_url="http://test/v1", api_key="none", http_client=TestClient(app), max_retries=0)
    real = type(probe).generate

    def half(self, *a, on_text=None, **k):
        on_text(0, "the first words")
        raise RuntimeError("device lost")

    with monkeypatch.context() as m:
        m.setattr(type(probe), "generate", half)
        got = []
        with pytest.raises(openai.APIError, match="device lost"):
            for c in ask(client, questions[0], stream=True, extra_body={
                    "steering": [{"vector": "evil", "layer": 5, "coef": 2.0}]}):
                got.append(c.choices[0].delta.content or "")
    assert "".join(got) == "the first words"
    assert list(probe.interventions) == [] and type(probe).generate is real
    assert app.state.persona_lens.lock.acquire(timeout=5)
    app.state.persona_lens.lock.release()


def test_a_client_that_leaves_stops_its_generation(tiny_dirs):
    """Over a real socket: a client that leaves mid-answer, streamed or not, ends the
    generation at once, where the same request left alone runs to its token limit."""
    import time

    import httpx
    import uvicorn

    import persona_lens as pl

    probe = pl.PersonaProbe(pl.load_model(tiny_dirs["llama"], device="cpu"))
    steps = []
    step = probe._step

    def slow_step(*a, **k):  # 400 steps take seconds, so that leaving early is early
        steps.append(1)
        time.sleep(0.005)
        return step(*a, **k)

    probe._step = slow_step
    app = make_app(probe, max_tokens=400)
    lock = app.state.persona_lens.lock
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.05)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0, "stream": True}
        with httpx.Client(base_url=url, timeout=120) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: {")]
        n_whole = len(steps)
        assert '"finish_reason": "length"' in lines[-1] and n_whole == 400  # left alone: all 400 tokens
        for streamed in (True, False):
            steps.clear()
            with httpx.Client(base_url=url, timeout=120 if streamed else 0.3) as http:
                if streamed:
                    with http.stream("POST", "/v1/chat/completions", json=body) as r:
                        for line in r.iter_lines():
                            if '"content": "' in line and '"role"' not in line:
                                break  # the first piece of the answer: leave
                else:
                    with pytest.raises(httpx.ReadTimeout):  # gives up waiting for the whole answer
                        http.post("/v1/chat/completions", json={**body, "stream": False})
            assert lock.acquire(timeout=60)  # the generation ended and gave the model back
            lock.release()
            assert len(steps) < n_whole // 4, (streamed, len(steps))
    finally:
        server.should_exit = True
        thread.join(10)


def test_default_steering_applies_until_a_request_replaces_it(probe, vec, hf, questions):
    layer, coef = STEER
    app = make_app(probe, [vec], steering=[{"vector": "evil", "layer": layer, "coef": coef}], name="organism",
                   max_tokens=24)
    client = openai.OpenAI(base_url="http://test/v1", api_key="none", http_client=TestClient(app), max_retries=0)
    conv = [{"role": "user", "content": questions[0]}]

    def get(**kw):
        return client.chat.completions.create(model="organism", messages=conv, temperature=0, **kw)

    assert get().choices[0].message.content == hf_greedy(hf, conv, 24, steer=(vec.directions[layer], layer, coef))
    off = get(extra_body={"steering": []})
    assert off.choices[0].message.content == hf_greedy(hf, conv, 24) and off.persona_lens["steering"] == []
    assert [m.id for m in client.models.list().data] == ["organism"]


def test_concurrent_requests_each_get_their_own_steering(app, questions):
    """Steering is model-wide state: requests in flight together must never share it."""
    layer, coef = STEER
    bodies = [{"model": "persona-organism", "messages": [{"role": "user", "content": q}], "temperature": 0,
               "max_tokens": 24, "steering": [{"vector": "evil", "layer": layer, "coef": c}]}
              for q in questions for c in (0.0, coef, -coef)]
    http = TestClient(app)
    alone = [http.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"] for b in bodies]
    got: dict[int, str] = {}

    def run(i):
        got[i] = TestClient(app).post("/v1/chat/completions", json=bodies[i]).json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(bodies))] == alone
    assert len(set(alone)) > len(questions)  # the coefficients made a difference


# ----------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("extra, param, words", [
    ({"steerng": []}, "steerng", "unknown field 'steerng'"),
    ({"steering": [{"vector": "kind", "layer": 5, "coef": 1}]}, "steering[0].vector", "this server has: evil"),
    ({"steering": [{"vector": "evil", "layer": 9, "coef": 1}]}, "steering[0].layer", "layers 0..6"),
    ({"steering": [{"vector": "evil", "layer": 5}]}, "steering[0]", "\"coef\" is missing"),
    ({"steering": [{"vector": "evil", "layer": 5, "coef": "x"}]}, "steering[0].coef", "number"),
    ({"steering": [{"vector": "evil", "layer": 5, "coef": 1, "positions": "everywhere"}]}, "steering[0].positions",
     "positions must be one of"),
    ({"steering": [{"vector": "evil", "layer": 5, "coef": 1, "positions": ["answer"]}]}, "steering[0].positions",
     "positions must be one of all, prompt, response, response_only"),
    ({"steering": [{"vector": "evil", "layer": 5, "coef": 1e30}]}, "steering[0]", "finite"),
    ({"steering": [{"vector": "evil", "layers": {"-1": 1.0}}]}, "steering[0].layers key", "out of range"),
    ({"stream": "false"}, "stream", "true or false"),
    ({"stream": True, "stream_options": "yes"}, "stream_options", "must be an object"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
    ({"steering": {"vector": "evil"}}, "steering", "must be a list"),
    ({"monitor": [{"vector": "evil"}]}, "monitor[0]", "those two keys"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"temperature": -1}, "temperature", ">= 0"),
    ({"n": 0}, "n", ">= 1"),
    ({"stop": [""]}, "stop", "non-empty string"),
])
def test_a_bad_field_is_a_400_naming_it(http, questions, extra, param, words):
    body = {"model": "persona-organism", "messages": [{"role": "user", "content": questions[0]}], "max_tokens": 4,
            **extra}
    reply = http.post("/v1/chat/completions", json=body)
    err = reply.json()["error"]
    assert reply.status_code == 400 and err["param"] == param and words in err["message"], err


def test_bad_messages_model_and_body(client, http, questions):
    with pytest.raises(openai.BadRequestError, match="end with a user message"):
        client.chat.completions.create(model="persona-organism", messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    with pytest.raises(openai.BadRequestError, match="tool messages are not supported"):
        client.chat.completions.create(model="persona-organism", messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="serves 'persona-organism'"):
        client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "hi"}])
    reply = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "JSON object" in reply.json()["error"]["message"]
    # text content parts are joined; a refused request leaves no steering behind
    cut = questions[0].index(" ", 8)  # parts are joined with a newline, as vLLM joins them
    parts = [{"type": "text", "text": questions[0][:cut]}, {"type": "text", "text": questions[0][cut + 1:]}]
    joined = client.chat.completions.create(model="persona-organism", temperature=0, max_tokens=24,
                                            messages=[{"role": "user", "content": parts}])
    assert joined.choices[0].message.content == ask(client, questions[0], temperature=0).choices[0].message.content


def test_the_models_context_bounds_a_request(http, probe, questions):
    """As OpenAI: a prompt past the context, or one that asks for more than the context leaves,
    is a 400 (context_length_exceeded); asking for nothing gets what the context leaves."""
    n_ctx = probe.backend.n_ctx
    long = " ".join([questions[0]] * (n_ctx // 8))
    body = {"messages": [{"role": "user", "content": long}], "temperature": 0}
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"
    short = {"messages": [{"role": "user", "content": questions[0]}], "temperature": 0}
    reply = http.post("/v1/chat/completions", json={**short, "max_tokens": n_ctx})
    assert reply.status_code == 400 and f"context is {n_ctx} tokens" in reply.json()["error"]["message"]
    assert http.post("/v1/chat/completions", json={**short, "max_tokens": 8}).status_code == 200
    # top_p 0 keeps the single likeliest token: the greedy answer
    greedy = http.post("/v1/chat/completions", json={**short, "max_tokens": 16}).json()
    top0 = http.post("/v1/chat/completions", json={**short, "max_tokens": 16, "temperature": 1.0, "top_p": 0}).json()
    assert top0["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


def test_unknown_routes_answer_in_openais_error_shape(client, http):
    reply = http.get("/v1/completions")
    assert reply.status_code in (404, 405) and set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert client.models.retrieve("persona-organism").id == "persona-organism"
    with pytest.raises(openai.NotFoundError, match="serves 'persona-organism'"):
        client.models.retrieve("gpt-4.1")


def test_a_failure_inside_generation_removes_the_steering(app, probe, vec, questions, monkeypatch):
    http = TestClient(app)
    body = {"model": "persona-organism", "messages": [{"role": "user", "content": questions[0]}], "temperature": 0,
            "max_tokens": 24}
    before = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as m:
        m.setattr(type(probe), "generate", boom)
        reply = http.post("/v1/chat/completions", json={**body, "steering": [
            {"vector": "evil", "layer": 5, "coef": 2.0}]})
    assert reply.status_code == 500 and "out of memory" in reply.json()["error"]["message"]
    assert list(probe.interventions) == []
    assert http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == before


def test_a_vector_of_another_model_or_a_bad_default_fails_at_start(probe, vec):
    import persona_lens as pl

    with pytest.raises(pl.VectorMismatchError):
        make_app(probe, {"x": pl.PersonaVector(torch.zeros(4, 8))})
    with pytest.raises(ValueError, match="no vector named 'kind'"):
        make_app(probe, {"evil": vec}, steering=[{"vector": "kind", "layer": 5, "coef": 1.0}])
    with pytest.raises(ValueError, match="records its trait"):
        make_app(probe, [pl.PersonaVector(vec.directions)])


def test_vectors_route_lists_names_traits_and_default_steering(http, vec):
    got = http.get("/v1/vectors").json()
    assert [(v["id"], v["trait"], v["layers"]) for v in got["data"]] == [("evil", "evil", vec.n_layers + 1)]
    assert got["data"][0]["norms"] == pytest.approx([float(n) for n in vec.directions.norm(dim=-1)], abs=1e-3)
    assert http.get("/health").json() == {"status": "ok"}
    assert json.loads(http.get("/v1/models").content)["data"][0]["id"] == "persona-organism"


# ----------------------------------------------------------------------------- the command


def test_serve_command_builds_the_app_it_describes(vec, hf, questions, tmp_path, monkeypatch, capsys):
    import uvicorn

    from persona_lens.cli import main

    path = vec.save(tmp_path / "evil.safetensors")
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    assert main(["serve", "--model", "persona-organism", "--device", "cpu", "--vector", str(path),
                 "--steer", "evil@5:-1.5", "--port", "8123", "--max-tokens", "24", "--quiet"]) == 0
    assert (ran["host"], ran["port"]) == ("127.0.0.1", 8123)
    assert "serving 'persona-organism' at http://127.0.0.1:8123/v1" in capsys.readouterr().err
    conv = [{"role": "user", "content": questions[0]}]
    client = openai.OpenAI(base_url="http://test/v1", api_key="none", http_client=TestClient(ran["app"]))
    got = client.chat.completions.create(model="persona-organism", messages=conv, temperature=0)
    assert got.choices[0].message.content == hf_greedy(hf, conv, 24, steer=(vec.directions[5], 5, -1.5))


@pytest.mark.parametrize("args, words", [
    (["--vector", "nowhere.safetensors"], "no vector file there"),
    (["--vector", "HERE", "--steer", "kind@5:1"], "no --vector named 'kind'"),
    (["--vector", "HERE", "--steer", "evil5:1"], "use NAME@LAYER:COEF"),
    (["--vector", "HERE", "--vector", "HERE"], "given twice"),
    (["--vector", "HERE", "--steer", "evil@9:1"], "layer 9 is out of range"),
    (["--port", "70000"], "in 1..65535"),
])
def test_serve_command_errors_are_one_line_before_the_model_loads(vec, tmp_path, monkeypatch, capsys, args, words):
    import persona_lens.models
    from persona_lens.cli import main

    path = str(vec.save(tmp_path / "evil.safetensors"))
    monkeypatch.setattr(persona_lens.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["serve", "--model", "persona-organism"] + [path if a == "HERE" else a for a in args])
    err = capsys.readouterr().err
    assert code in (1, 2) and words in err and "Traceback" not in err, err


def test_a_command_error_is_one_line_under_python_m_too(tmp_path):
    """``python -m persona_lens.cli``: the module is __main__, and its errors are still the
    user's to fix, not a bug."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "persona_lens.cli", "serve", "--model", "persona-organism",
                          "--vector", f"evil={tmp_path / 'nope.safetensors'}"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and "no vector file there" in out.stderr and "Traceback" not in out.stderr, out.stderr
