"""The store of generations and scores, and the judge's reply cache it sits on top of."""

from __future__ import annotations

import pytest

from openai_server import keyword_rule, openai_server, peaked  # noqa: F401 (fixture)
from persona_lens.judge import OpenAIJudge
from persona_lens.traits import Trait

EVIL = Trait.load("evil")
PAIRS = [(f"Question {i}?", f"Answer number {i}.") for i in range(3)]


# ------------------------------------------------------------------------ the judge's reply cache


def test_judge_cache_is_keyed_by_endpoint_not_model_name_alone(openai_server, tmp_path):
    """Two servers, one model name, one cache folder: the second server is asked, not served
    the first one's scores."""
    first_server = openai_server(lambda messages: peaked(20))
    second_server = openai_server(lambda messages: peaked(80))
    kw = dict(api_key="x", cache_dir=tmp_path / "cache", progress=False)
    with OpenAIJudge("same-model", base_url=first_server.base_url, **kw) as first:
        assert first.score_trait(EVIL, PAIRS) == [pytest.approx(20.0)] * 3
    with OpenAIJudge("same-model", base_url=second_server.base_url, **kw) as second:
        assert second.cache_path == first.cache_path
        assert second.score_trait(EVIL, PAIRS) == [pytest.approx(80.0)] * 3
    assert (first_server.request_count, second_server.request_count) == (3, 3)

    # Each endpoint's replies stay cached: asking either again makes no request.
    for server, expected in ((first_server, 20.0), (second_server, 80.0)):
        with OpenAIJudge("same-model", base_url=server.base_url + "/", **kw) as again:
            assert again.score_trait(EVIL, PAIRS) == [pytest.approx(expected)] * 3
            assert again.stats.api_calls == 0
    assert (first_server.request_count, second_server.request_count) == (3, 3)


def test_credentials_in_the_url_are_not_part_of_identity_or_records(openai_server, tmp_path):
    server = openai_server(lambda messages: peaked(40))
    with_creds = server.base_url.replace("http://", "http://bob:secret@")
    kw = dict(api_key="x", cache_dir=tmp_path / "cache", progress=False)
    with OpenAIJudge("m", base_url=with_creds, **kw) as judge:
        assert "secret" not in judge.name + judge.endpoint + repr(judge)
        assert judge.endpoint == server.base_url
        judge.score_trait(EVIL, PAIRS[:1])
    assert server.request_count == 1
    with OpenAIJudge("m", base_url=server.base_url, **kw) as plain:
        assert plain.name == judge.name
        assert plain.score_trait(EVIL, PAIRS[:1]) == [pytest.approx(40.0)]
    assert server.request_count == 1
