"""The store of generations and scores (on a tiny random model), and the judge's reply cache
beside it."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

import persona_lens as pl
from .conftest import load_tiny
from .support.openai_server import openai_server, peaked  # noqa: F401 (fixture)
from persona_lens.judge import OpenAIJudge
from persona_lens.pipeline_io import derived_seed
from persona_lens.store import Prompt, Steering, Store
from persona_lens.traits import Trait

EVIL = Trait.load("evil")
PAIRS = [(f"Question {i}?", f"Answer number {i}.") for i in range(3)]
SETTINGS = {"max_new_tokens": 6, "temperature": 1.0, "seed": 0}


@pytest.fixture(scope="module")
def probe(tiny_dirs):
    return pl.PersonaProbe(load_tiny(tiny_dirs["llama"]))


@pytest.fixture(scope="module")
def vec(probe):
    g = torch.Generator().manual_seed(0)
    return pl.PersonaVector(4.0 * torch.randn(probe.n_layers + 1, probe.d_model, generator=g), trait="zesty")


def prompts(n_questions: int = 3, samples: int = 2, **kw) -> list[Prompt]:
    return [Prompt([{"role": "system", "content": f"Be zesty, style {q % 2}."},
                    {"role": "user", "content": f"Question {q}: what about apples?"}], sample=s, **kw)
            for q in range(n_questions) for s in range(samples)]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class CountingJudge:
    """Trait score = a hash of the answer; coherence = 90. Records what it is asked."""

    name = "counting-judge"

    def __init__(self, fail_after: int | None = None):
        self.asked: list[tuple[str, str, str]] = []
        self.fail_after = fail_after

    def _ask(self, kind, pairs):
        if self.fail_after is not None and len(self.asked) >= self.fail_after:
            raise RuntimeError("judge killed")
        self.asked += [(kind, q, a) for q, a in pairs]

    def score_trait(self, trait, pairs):
        self._ask("trait", pairs)
        return [float(int(hashlib.sha256(a.encode()).hexdigest(), 16) % 101) for _, a in pairs]

    def score_coherence(self, pairs):
        self._ask("coherence", pairs)
        return [90.0 for _ in pairs]


# ------------------------------------------------------------------------ generations


def test_resume_after_a_kill_equals_an_uninterrupted_run(probe, vec, tmp_path, monkeypatch):
    steer = Steering(vec, layer=1, coef=2.0, positions="response")
    items = prompts(3, 2) + prompts(3, 2, steer=steer)  # two groups: unsteered, steered
    calls = {"n": 0}
    real = probe.generate

    def dies_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(probe, "generate", dies_on_third_batch)
    with pytest.raises(RuntimeError, match="killed"):
        Store(tmp_path / "a").generate(probe, items, settings=SETTINGS, batch_size=4)
    # Batches of 4 within each steering group: 4 + 2 unsteered, then dead in the steered group.
    assert len(read_jsonl(tmp_path / "a" / "responses.jsonl")) == 6
    monkeypatch.setattr(probe, "generate", real)

    resumed = Store(tmp_path / "a").generate(probe, items, settings=SETTINGS, batch_size=4)
    assert (resumed.generated, resumed.reused) == (6, 6)
    whole = Store(tmp_path / "b").generate(probe, items, settings=SETTINGS, batch_size=4)
    in_memory = Store(None).generate(probe, items, settings=SETTINGS, batch_size=4)
    assert resumed.texts == whole.texts == in_memory.texts
    assert resumed.keys == whole.keys
    assert len(read_jsonl(tmp_path / "a" / "responses.jsonl")) == 12  # nothing generated twice


def _sweep_like(vec) -> list[Prompt]:
    """Two steering groups of six requests: batches of 4 cut them 4 + 2 and 4 + 2."""
    return prompts(3, 2) + prompts(3, 2, steer=Steering(vec, layer=1, coef=2.0, positions="response"))


def test_shards_write_logs_of_their_own_that_merge_into_the_single_process_records(probe, vec, tmp_path):
    items = _sweep_like(vec)
    one = Store(None).generate(probe, items, settings=SETTINGS, batch_size=4)
    # Both shards open the folder before either writes: as running side by side, neither sees
    # the other's work.
    shards = [Store(tmp_path, shard=(i, 2)) for i in range(2)]
    got = [s.generate(probe, items, settings=SETTINGS, batch_size=4) for s in shards]
    # Batches 0 and 2 (4 + 4 requests) are shard 0's, batches 1 and 3 (2 + 2) shard 1's.
    assert [(a.generated, a.pending) for a in got] == [(8, 4), (4, 8)]
    assert [t for t in got[0].texts if t is not None] == one.texts[0:4] + one.texts[6:10]
    assert not (tmp_path / "responses.jsonl").exists()
    assert [len(read_jsonl(tmp_path / f"responses.shard-{i}-of-2.jsonl")) for i in range(2)] == [8, 4]

    merged = Store(tmp_path).generate(probe, items, settings=SETTINGS, batch_size=4)
    assert (merged.generated, merged.reused, merged.pending) == (0, 12, 0)
    assert merged.records == one.records  # texts, keys and batch seeds: one process's
    # A shard's scores are merged on read too.
    pairs = [(p.question, t) for p, t in zip(items, one.texts)]
    Store(tmp_path, shard=(1, 2)).score(CountingJudge(), EVIL, pairs[:3])
    judge = CountingJudge()
    again = Store(tmp_path).score(judge, EVIL, pairs)
    assert again.reused >= 6 and again.asked == len(judge.asked) > 0
    assert not {(q, a) for _, q, a in judge.asked} & set(pairs[:3])  # the shard's scores not asked again
    assert again.by_kind == Store(None).score(CountingJudge(), EVIL, pairs).by_kind


def test_a_shard_killed_midway_loses_nothing_logged_and_a_rerun_finishes_the_rest(probe, vec, tmp_path, monkeypatch):
    import shutil

    items = _sweep_like(vec)  # batches of 2: six batches, shard 1 has batches 1, 3 and 5
    one = Store(None).generate(probe, items, settings=SETTINGS, batch_size=2)
    Store(tmp_path / "a", shard=(0, 2)).generate(probe, items, settings=SETTINGS, batch_size=2)
    real, calls = probe.generate, {"n": 0}

    def dies_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(probe, "generate", dies_on_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        Store(tmp_path / "a", shard=(1, 2)).generate(probe, items, settings=SETTINGS, batch_size=2)
    monkeypatch.setattr(probe, "generate", real)
    assert len(read_jsonl(tmp_path / "a" / "responses.shard-1-of-2.jsonl")) == 2
    shutil.copytree(tmp_path / "a", tmp_path / "b")

    # The killed shard rerun generates its two unfinished batches; so does one process.
    rerun = Store(tmp_path / "a", shard=(1, 2)).generate(probe, items, settings=SETTINGS, batch_size=2)
    assert (rerun.generated, rerun.pending) == (4, 0)
    alone = Store(tmp_path / "b").generate(probe, items, settings=SETTINGS, batch_size=2)
    assert (alone.generated, alone.reused) == (4, 8)
    for folder in ("a", "b"):
        merged = Store(tmp_path / folder).generate(probe, items, settings=SETTINGS, batch_size=2)
        assert merged.generated == 0 and merged.records == one.records, folder


def test_a_shard_redoes_a_batch_cut_short_whole_and_logs_only_the_missing_rows(probe, vec, tmp_path):
    items = _sweep_like(vec)
    one = Store(None).generate(probe, items, settings=SETTINGS, batch_size=4)
    for i in range(2):
        Store(tmp_path, shard=(i, 2)).generate(probe, items, settings=SETTINGS, batch_size=4)
    log = tmp_path / "responses.shard-0-of-2.jsonl"
    text = log.read_text()
    log.write_text(text[: text.rstrip("\n").rfind("\n") + 40])  # the last record cut short by a kill
    with pytest.warns(UserWarning, match="unreadable line"):
        again = Store(tmp_path, shard=(0, 2)).generate(probe, items, settings=SETTINGS, batch_size=4)
    # The last batch (requests 6..9) ran again, whole, with its seed: its missing row is the
    # single process's text; the three logged rows keep their records.
    assert again.generated == 1 and again.texts[9] == one.texts[9]
    with pytest.warns(UserWarning, match="unreadable line"):  # the cut line stays in the log
        assert Store(tmp_path).generate(probe, items, settings=SETTINGS, batch_size=4).records == one.records


def test_log_files_merge_the_log_then_its_shards_and_the_latest_record_wins(tmp_path):
    from persona_lens.pipeline_io import JsonlLog
    from persona_lens.store import log_files

    rec = {"messages": [], "sample": 0}
    JsonlLog(tmp_path / "responses.jsonl").append([{"key": "a", "answer": "main", **rec}])
    JsonlLog(tmp_path / "responses.shard-1-of-2.jsonl").append([{"key": "a", "answer": "shard 1", **rec}])
    JsonlLog(tmp_path / "responses.shard-0-of-2.jsonl").append([{"key": "a", "answer": "shard 0", **rec},
                                                                {"key": "b", "answer": "b", **rec}])
    for other in ("responses.shard-x-of-2.jsonl", "scores.shard-0-of-2.jsonl", "responses.jsonl.bak"):
        (tmp_path / other).write_text('{"key": "a", "answer": "not a log of this store"}\n')
    assert [p.name for p in log_files(tmp_path, "responses.jsonl")] == [
        "responses.jsonl", "responses.shard-0-of-2.jsonl", "responses.shard-1-of-2.jsonl"]
    store = Store(tmp_path)
    assert {k: r["answer"] for k, r in store._answers.items()} == {"a": "shard 1", "b": "b"}
    assert "2 answers" in repr(store) and "shard 1 of 2" in repr(Store(tmp_path, shard=(1, 2)))


def test_a_shard_needs_a_folder_and_a_valid_index(tmp_path):
    with pytest.raises(ValueError, match="needs out_dir"):
        Store(None, shard=(0, 2))
    with pytest.raises(ValueError, match=r"shard\[0\] must be an integer >= 0 and <= 1"):
        Store(tmp_path, shard=(2, 2))
    with pytest.raises(ValueError, match=r"shard\[1\] must be an integer >= 1"):
        Store(tmp_path, shard=(0, 0))


def test_resume_after_a_judge_dies_asks_only_for_the_rest(tmp_path):
    pairs = [(f"Q{i}?", f"Answer {i}.") for i in range(5)]
    with pytest.raises(RuntimeError, match="judge killed"):
        Store(tmp_path / "a").score(CountingJudge(fail_after=4), EVIL, pairs, batch_size=2)
    saved = len(read_jsonl(tmp_path / "a" / "scores.jsonl"))
    assert saved == 4  # two chunks of (one trait + one coherence) calls each

    judge = CountingJudge()
    resumed = Store(tmp_path / "a").score(judge, EVIL, pairs, batch_size=2)
    assert (resumed.asked, resumed.reused) == (10 - saved, saved) == (len(judge.asked), saved)
    whole = Store(None).score(CountingJudge(), EVIL, pairs, batch_size=2)
    assert resumed.by_kind == whole.by_kind


def test_store_generates_what_the_probe_generates_with_the_same_seed_and_steering(probe, vec):
    steer = Steering(vec, layers={1: 2.0, 2: -1.0}, positions="response")
    items = prompts(2, 2, steer=steer)
    got = Store(None).generate(probe, items, settings=SETTINGS, batch_size=8)
    seed = derived_seed(SETTINGS["seed"], [p.seed_key for p in items])
    with probe.steer(vec, layers={1: 2.0, 2: -1.0}, positions="response"):
        direct = probe.generate([p.messages for p in items], max_new_tokens=6, temperature=1.0, seed=seed)
    assert got.texts == direct
    assert got.records[0]["steer"] == steer.spec() and got.records[0]["batch_seed"] == seed


def test_another_steering_is_another_key(probe, vec, tmp_path):
    store = Store(tmp_path)
    items = prompts(2, 1)
    plain = store.generate(probe, items, settings=SETTINGS)
    specs = [
        Steering(vec, layer=1, coef=2.0, positions="response"),
        Steering(vec, layer=1, coef=3.0, positions="response"),   # coefficient
        Steering(vec, layer=2, coef=2.0, positions="response"),   # layer
        Steering(2.0 * vec, layer=1, coef=1.0, positions="response"),  # vector (keys name requests, not effects)
        Steering(vec, layer=1, coef=2.0, positions="all"),        # positions
        Steering(vec, layer=1, coef=2.0, positions="response_only"),
    ]
    keys = {tuple(plain.keys)}
    changed = 0
    for spec in specs:
        got = store.generate(probe, items, settings=SETTINGS, steer=spec)
        assert (got.generated, got.reused) == (2, 0), spec
        keys.add(tuple(got.keys))
        changed += got.texts != plain.texts
    assert len(keys) == 1 + len(specs)
    assert changed >= len(specs) - 1, "steering this strongly should change the tiny model's answers"

    # The same spec again, even as a new object, and another seed: cached, then a new key.
    again = store.generate(probe, items, settings=SETTINGS, steer=Steering(vec, layer=1, coef=2.0, positions="response"))
    assert (again.generated, again.reused) == (0, 2)
    reseeded = store.generate(probe, items, settings=dict(SETTINGS, seed=1))
    assert reseeded.generated == 2


def test_a_record_made_when_response_left_out_the_last_prompt_token_is_not_reused(probe, vec, tmp_path):
    """Before the modes, ``positions="response"`` steered the generated tokens alone and the
    key held ``{"positions": "response", "include_last_prompt": False}``. A log with such a
    record must not answer for today's ``"response"`` (which steers the last prompt token too)."""
    from persona_lens.pipeline_io import JsonlLog, fingerprint

    items = prompts(2, 1)
    steer = Steering(vec, layer=1, coef=2.0, positions="response")
    old_spec = {"vector": steer.vector_hash, "layers": [[1, 2.0]], "positions": "response",
                "include_last_prompt": False}
    settings = dict(SETTINGS)
    old_keys = [fingerprint(probe.model_name, p.messages, p.sample, settings, old_spec, length=24) for p in items]
    JsonlLog(tmp_path / "responses.jsonl").append(
        [{"key": k, "answer": "stale answer", "messages": p.messages, "sample": p.sample} for k, p in zip(old_keys, items)])
    assert old_keys[0] in Store(tmp_path)._answers  # the old record is read back under its own key
    got = Store(tmp_path).generate(probe, items, settings=SETTINGS, steer=steer)
    assert (got.generated, got.reused) == (2, 0)
    assert "stale answer" not in got.texts and not set(got.keys) & set(old_keys)


def test_same_content_in_another_order_is_not_regenerated(probe, tmp_path):
    items = prompts(3, 2)
    first = Store(tmp_path).generate(probe, items, settings=SETTINGS, batch_size=4)
    shuffled = items[3:] + items[:3]
    again = Store(tmp_path).generate(probe, shuffled[::-1], settings=SETTINGS, batch_size=2)
    assert (again.generated, again.reused) == (0, 6)
    assert dict(zip(again.keys, again.texts)) == dict(zip(first.keys, first.texts))
    # Plain strings and duplicates: one request per distinct content.
    dup = Store(tmp_path).generate(probe, ["Hi there!", "Hi there!", [{"role": "user", "content": "Hi there!"}]],
                                   settings=SETTINGS)
    assert dup.generated == 1 and len(set(dup.keys)) == 1 and len(set(dup.texts)) == 1


def test_a_slot_whose_inputs_changed_is_stale(probe, tmp_path):
    items = [dataclasses.replace(p, id=f"slot-{i}") for i, p in enumerate(prompts(2, 1))]
    Store(tmp_path).generate(probe, items, settings=SETTINGS)
    changed = Store(tmp_path).generate(probe, items, settings=dict(SETTINGS, max_new_tokens=5))
    assert (changed.generated, changed.stale) == (2, 2)


# ------------------------------------------------------------------------ scores


def test_scores_are_reused_across_stores_on_one_folder(tmp_path):
    pairs = [(f"Q{i}?", f"Answer {i}.") for i in range(4)]
    first = Store(tmp_path).score(CountingJudge(), EVIL, pairs)
    assert (first.asked, first.reused) == (8, 0)
    assert first["coherence"] == [90.0] * 4 and first.mean("coherence") == 90.0

    judge = CountingJudge()
    again = Store(tmp_path).score(judge, EVIL, pairs[::-1])
    assert judge.asked == [] and (again.asked, again.reused) == (0, 8)
    assert again["trait"] == first["trait"][::-1]

    # Another judge, another rubric or only some kinds: asked only for what is new.
    other = CountingJudge()
    other.name = "another-judge"
    assert Store(tmp_path).score(other, EVIL, pairs).asked == 8
    reworded = dataclasses.replace(EVIL, eval_prompt=EVIL.eval_prompt + "\nBe strict.")
    judge = CountingJudge()
    got = Store(tmp_path).score(judge, reworded, pairs)
    assert got.asked == 4 and {kind for kind, *_ in judge.asked} == {"trait"}
    coherence_only = Store(tmp_path).score(CountingJudge(), None, pairs, kinds=("coherence",))
    assert coherence_only.asked == 0 and coherence_only["coherence"] == [90.0] * 4


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


def test_another_precision_is_another_model_in_the_keys(tiny_dirs, probe, tmp_path):
    """A bfloat16 run's answers are other numbers: a float32 rerun in the same folder must
    generate its own, and reuse only its own."""
    settings = dict(max_new_tokens=6, temperature=1.0, seed=0)
    half = pl.PersonaProbe(pl.load_model(str(tiny_dirs["llama"]), dtype="bfloat16", device="cpu"))
    store = Store(tmp_path)
    first = store.generate(half, prompts(), settings=settings, progress=False)
    full = Store(tmp_path).generate(probe, prompts(), settings=settings, progress=False)
    assert (first.generated, full.generated, full.reused) == (6, 6, 0)
    assert Store(tmp_path).generate(probe, prompts(), settings=settings, progress=False).reused == 6
