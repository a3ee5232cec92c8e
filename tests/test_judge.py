"""OpenAIJudge against a loopback OpenAI-compatible server, through the real openai client."""

from __future__ import annotations

import asyncio
import math
import socket
import time

import pytest

from persona_lens.judge import (
    COHERENCE_PROMPT,
    Judge,
    JudgeError,
    OpenAIJudge,
    default_cache_dir,
    logprob_score,
)
from persona_lens.traits import Trait

from .support.openai_server import Drop, Fail, Sleep, Text, keyword_rule, openai_server, peaked, sequence  # noqa: F401

EVIL = Trait.load("evil")
PAIRS = [(f"Question {i}?", f"Answer number {i}.") for i in range(4)]


@pytest.fixture
def make_judge(tmp_path):
    """Judges with a per-test cache and fast retries, closed after the test."""
    judges = []

    def make(server, **kwargs):
        kwargs.setdefault("cache_dir", tmp_path / "cache")
        kwargs.setdefault("retry_base_delay", 0.01)
        kwargs.setdefault("max_retries", 3)
        kwargs.setdefault("timeout", 5.0)
        judge = OpenAIJudge("judge-model", base_url=server.base_url, api_key="test-key", **kwargs)
        judges.append(judge)
        return judge

    yield make
    for judge in judges:
        judge.close()


# ---------------------------------------------------------------------- logprob_score


def test_logprob_score_is_the_probability_weighted_mean_of_numeric_tokens():
    top = {"80": math.log(0.5), "90": math.log(0.3), " 7": math.log(0.1), "The": math.log(0.1)}
    expected = (80 * 0.5 + 90 * 0.3 + 7 * 0.1) / (0.5 + 0.3 + 0.1)
    assert logprob_score(top) == pytest.approx(expected)


def test_logprob_score_ignores_tokens_that_are_not_integers_0_to_100():
    top = {"50": math.log(0.4), "150": math.log(0.2), "-5": math.log(0.1), "5.5": math.log(0.1),
           "abc": math.log(0.1), "٣": math.log(0.1)}  # an Arabic-Indic digit is not ours to parse
    assert logprob_score(top) == pytest.approx(50.0)


def test_logprob_score_is_none_below_min_mass():
    assert logprob_score({"80": math.log(0.24), "The": math.log(0.76)}) is None
    assert logprob_score({"80": math.log(0.26), "The": math.log(0.74)}) == pytest.approx(80.0)
    assert logprob_score({"80": math.log(0.24)}, min_mass=0.2) == pytest.approx(80.0)
    assert logprob_score({}) is None


# ---------------------------------------------------------------------- over HTTP


def test_weighted_score_over_http_and_request_shape(openai_server, make_judge):
    server = openai_server(lambda messages: {"80": 0.5, "90": 0.3, "The": 0.2})
    judge = make_judge(server)
    scores = judge.score_trait(EVIL, [("How do I greet someone?", "Say hello {warmly}.")])
    assert scores == [pytest.approx((80 * 0.5 + 90 * 0.3) / 0.8)]
    body = server.requests[0]
    assert body["model"] == "judge-model"
    assert body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["messages"] == [{"role": "user", "content": EVIL.judge_prompt(
        "How do I greet someone?", "Say hello {warmly}.")}]
    assert judge.stats.api_calls == 1 and judge.stats.cache_hits == 0


def test_a_judge_pickled_for_another_process_scores_alike_and_shares_the_cache(openai_server, make_judge):
    import pickle

    server = openai_server(lambda messages: {"80": 0.5, "90": 0.3, "The": 0.2})
    judge = make_judge(server)
    first = judge.score_trait(EVIL, PAIRS[:2])
    copy = pickle.loads(pickle.dumps(judge))  # what Ray does to ship it to a worker
    try:
        assert (copy.name, copy.cache_path) == (judge.name, judge.cache_path)
        assert copy.score_trait(EVIL, PAIRS[:3]) == first + [first[0]]
        assert server.request_count == 3  # the two answers the original scored came from its cache
    finally:
        copy.close()


def test_low_mass_gives_none_without_error(openai_server, make_judge):
    server = openai_server(lambda messages: {"Hmm": 0.8, "80": 0.2})
    judge = make_judge(server)
    assert judge.score_trait(EVIL, PAIRS[:2]) == [None, None]
    assert judge.stats.failures == 2


def test_refusal_gives_none_and_is_counted(openai_server, make_judge):
    def rule(messages):
        prompt = messages[-1]["content"]
        return {"REFUSAL": 0.9, "0": 0.1} if "Answer number 0." in prompt else peaked(60, 0.99)

    judge = make_judge(openai_server(rule))
    scores = judge.score_trait(EVIL, PAIRS[:2])
    assert scores[0] is None and scores[1] == pytest.approx(60.0)
    assert judge.stats.refusals == 1 and judge.stats.failures == 0
    # A batch of refusals only is a legitimate outcome, not a broken judge.
    assert judge.score_trait(EVIL, PAIRS[:1]) == [None]


def test_non_numeric_tokens_are_ignored_and_partial_nones_allowed(openai_server, make_judge):
    def rule(messages):
        prompt = messages[-1]["content"]
        if "Answer number 1." in prompt:
            return {"Sure": 0.9, "I": 0.1}  # text: no number at all
        return {"Score": 0.3, "70": 0.4, " 30": 0.2, "**": 0.1}

    judge = make_judge(openai_server(rule))
    scores = judge.score_trait(EVIL, PAIRS[:2])
    assert scores[0] == pytest.approx((70 * 0.4 + 30 * 0.2) / 0.6)
    assert scores[1] is None
    assert judge.stats.failures == 1


def test_all_text_replies_raise_a_clear_error(openai_server, make_judge):
    server = openai_server(lambda messages: Text("This answer seems rather harmless"))
    judge = make_judge(server)
    with pytest.raises(JudgeError) as info:
        judge.score_trait(EVIL, PAIRS[:3])
    message = str(info.value)
    assert "'This answer seems rather harmless'" in message
    assert "number" in message and "logprobs" in message and "judge-model" in message
    # Not kept in the cache: once the endpoint is fixed, a rerun must ask again.
    with pytest.raises(JudgeError):
        judge.score_trait(EVIL, PAIRS[:3])
    assert server.request_count == 6


def test_endpoint_without_logprobs_is_reported(openai_server, make_judge):
    def rule(messages, body):
        body["logprobs"] = False  # behave like a server that ignores the option
        return Text("42")

    server = openai_server(rule)
    judge = make_judge(server)
    with pytest.raises(JudgeError, match="logprobs"):
        judge.score_trait(EVIL, PAIRS[:1])


@pytest.mark.parametrize("failure", [Fail(429, "slow down"), Fail(500), Fail(503), Drop()],
                         ids=["429", "500", "503", "dropped"])
def test_transient_failure_then_success_is_retried(openai_server, make_judge, failure):
    server = openai_server(sequence(failure, then=peaked(42, 0.99)))
    judge = make_judge(server)
    assert judge.score_trait(EVIL, PAIRS[:1]) == [pytest.approx(42.0)]
    assert server.request_count == 2
    assert judge.stats.retries == 1 and judge.stats.api_calls == 2


def test_rate_limit_that_never_ends_names_the_cause(openai_server, make_judge):
    server = openai_server(lambda messages: Fail(429, "quota exceeded"))
    judge = make_judge(server, max_retries=3)
    with pytest.raises(JudgeError, match=r"HTTP 429.*after 3 tries: quota exceeded"):
        judge.score_trait(EVIL, PAIRS[:1])
    assert server.request_count == 3


def test_client_errors_are_not_retried(openai_server, make_judge):
    server = openai_server(lambda messages: Fail(400, "logprobs are not supported"))
    judge = make_judge(server)
    with pytest.raises(JudgeError, match="rejected the request.*HTTP 400.*logprobs are not supported"):
        judge.score_trait(EVIL, PAIRS[:1])
    assert server.request_count == 1


def test_timeout_raises_after_retries_and_keeps_finished_scores(openai_server, make_judge, tmp_path):
    def rule(messages):
        if "Answer number 3." in messages[-1]["content"]:
            return Sleep(5.0, then=peaked(99))
        return peaked(10, 0.99)

    server = openai_server(rule)
    judge = make_judge(server, timeout=0.3, max_retries=2)
    start = time.monotonic()
    with pytest.raises(JudgeError) as info:
        judge.score_trait(EVIL, PAIRS)
    assert time.monotonic() - start < 4
    message = str(info.value)
    assert f"judge at {server.base_url} timed out after 2 tries" in message
    assert "3 of 4 new score(s) were saved" in message

    # "Restart": a new judge on the same cache asks nothing for the finished three.
    before = server.request_count
    again = make_judge(server)
    assert again.score_trait(EVIL, PAIRS[:3]) == [pytest.approx(10.0)] * 3
    assert server.request_count == before
    assert again.stats.cache_hits == 3 and again.stats.api_calls == 0


def test_unreachable_endpoint_names_the_cause(make_judge):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    class Nowhere:
        base_url = f"http://127.0.0.1:{port}/v1"

    judge = make_judge(Nowhere, max_retries=2)
    with pytest.raises(JudgeError, match=rf"127\.0\.0\.1:{port}/v1 could not be reached after 2 tries"):
        judge.score_trait(EVIL, PAIRS[:1])


def test_cache_hit_after_restart_makes_no_requests(openai_server, make_judge):
    server = openai_server(keyword_rule({"number 1.": 90, "number 2.": 40}, default=5))
    first = make_judge(server)
    scores = first.score_trait(EVIL, PAIRS)
    coherence = first.score_coherence(PAIRS)
    assert scores == [pytest.approx(s) for s in (5, 90, 40, 5)]
    assert coherence == [pytest.approx(90)] * 4
    assert server.request_count == 8
    first.close()

    second = make_judge(server)
    assert second.score_trait(EVIL, PAIRS) == scores
    assert second.score_coherence(PAIRS) == coherence
    assert server.request_count == 8
    assert second.stats.cache_hits == 8 and second.stats.api_calls == 0
    # Another judge model is another cache key.
    third = OpenAIJudge("other-model", base_url=server.base_url, api_key="k",
                        cache_dir=second.cache_path.parent, retry_base_delay=0.01)
    try:
        third.score_trait(EVIL, PAIRS[:1])
    finally:
        third.close()
    assert server.request_count == 9


def test_duplicate_pairs_are_asked_once(openai_server, make_judge):
    server = openai_server(lambda messages: peaked(33, 0.99))
    judge = make_judge(server)
    assert judge.score_trait(EVIL, [PAIRS[0], PAIRS[0], PAIRS[1]]) == [pytest.approx(33.0)] * 3
    assert server.request_count == 2


def test_coherence_uses_its_own_rubric(openai_server, make_judge):
    server = openai_server(keyword_rule({}, default=12, coherence=88))
    judge = make_judge(server)
    assert judge.score_coherence(PAIRS[:1]) == [pytest.approx(88.0)]
    assert judge.score_trait(EVIL, PAIRS[:1]) == [pytest.approx(12.0)]
    prompt = server.prompts()[0]
    assert prompt.startswith(COHERENCE_PROMPT.split("{", 1)[0])
    assert "Question 0?" in prompt and "Answer number 0." in prompt


def test_works_inside_a_running_event_loop(openai_server, make_judge):
    judge = make_judge(openai_server(lambda messages: peaked(55, 0.99)))

    async def notebook_cell():
        assert asyncio.get_running_loop() is not None
        return judge.score_trait(EVIL, PAIRS[:2])

    assert asyncio.run(notebook_cell()) == [pytest.approx(55.0)] * 2


def test_large_batch_with_progress_bar(openai_server, make_judge, capsys):
    server = openai_server(lambda messages: peaked(20, 0.99))
    judge = make_judge(server, max_concurrency=8)
    pairs = [(f"q{i}", f"a{i}") for i in range(60)]
    assert judge.score_trait(EVIL, pairs) == [pytest.approx(20.0)] * 60
    assert server.request_count == 60
    assert "judging evil" in capsys.readouterr().err


def test_judge_protocol(tmp_path):
    judge = OpenAIJudge(cache_dir=False)
    assert isinstance(judge, Judge)
    assert judge.name == "openai:gpt-4.1-mini"
    assert judge.score_trait(EVIL, []) == []  # nothing to ask: no key or network needed
    # a setting that changes a score from the same reply changes the name, and so the score keys
    names = {OpenAIJudge(cache_dir=False, min_mass=m, top_logprobs=k).name for m, k in ((0.25, 20), (0.5, 20), (0.25, 5))}
    assert len(names) == 3

    class Constant:
        name = "constant"

        def score_trait(self, trait, pairs):
            return [50.0 for _ in pairs]

        def score_coherence(self, pairs):
            return [100.0 for _ in pairs]

    assert isinstance(Constant(), Judge)
    assert not isinstance(object(), Judge)
    judge.close()


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONA_LENS_JUDGE_CACHE", str(tmp_path / "own"))
    assert default_cache_dir() == tmp_path / "own"
    monkeypatch.delenv("PERSONA_LENS_JUDGE_CACHE")
    monkeypatch.setenv("PERSONA_LENS_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "judge"
    judge = OpenAIJudge()
    assert judge.cache_path == tmp_path / "root" / "judge" / "judgements.sqlite3"
    judge.close()
    monkeypatch.delenv("PERSONA_LENS_CACHE")
    assert str(default_cache_dir()).endswith(".cache/persona_lens/judge")


def test_bad_pairs_and_prompts_are_rejected(tmp_path):
    judge = OpenAIJudge(cache_dir=False)
    with pytest.raises(TypeError, match="pair 0"):
        judge.score_trait(EVIL, ["just a string"])
    with pytest.raises(TypeError, match="two strings"):
        judge.score_coherence([("q", None)])
    with pytest.raises(ValueError, match="placeholder"):
        OpenAIJudge(cache_dir=False, coherence_prompt="Rate {answer}")
    judge.close()


def test_a_judge_that_writes_numbers_digit_by_digit_is_warned_of(openai_server, make_judge):
    """Scores read the first token: with a tokenizer that splits "85" into "8", "5" they would
    all be 0..9. Twenty scored replies without a two-digit token warn once; a 0-100 judge does not."""
    pairs = [(f"Question {i}?", f"Answer {i}.") for i in range(12)]
    split = make_judge(openai_server(lambda messages: {"8": 0.6, "9": 0.3, "The": 0.1}))
    with pytest.warns(UserWarning, match="digit by digit"):
        scores = split.score_trait(EVIL, pairs) + split.score_coherence(pairs)
    assert all(s < 10 for s in scores)
    whole = make_judge(openai_server(lambda messages: {"0": 0.7, "10": 0.2, "The": 0.1}), cache_dir=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        whole.score_trait(EVIL, pairs)
        whole.score_coherence(pairs)
