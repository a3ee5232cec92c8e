"""Adversarial tests: bad values, faults and concurrent writers against the public API.

Property-based tests (hypothesis; few examples, tiny models) throw non-finite, out-of-range
and wrongly typed values at the entry points and accept only two outcomes: an error that
names the argument, or a correct result. Fault-injection tests corrupt, truncate and swap the
files persona_lens reads, and run several processes on one run folder. The whole catalogue of
``benchmarks/adversarial.py`` runs at the end (``python -m benchmarks.adversarial`` prints it
as a table).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import tempfile
import threading
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import persona_lens as pl
from persona_lens import validate as V
from persona_lens.judge import JudgeError, OpenAIJudge, logprob_score
from persona_lens.pipeline_io import JsonlLog, read_json, write_json
from persona_lens.store import Store
from persona_lens.traits import Trait

from .support.openai_server import Logprobs, openai_server, serve  # noqa: F401

FAST = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
EVIL = Trait.load("evil")

#: Anything a careless caller might pass where a number goes.
junk = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(10**30), max_value=10**30),
    st.text(max_size=5), st.none(), st.booleans(), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


@pytest.fixture(scope="module")
def probe(tiny_dirs):
    return pl.PersonaProbe(pl.load_model(tiny_dirs["qwen2"], device="cpu"))


@pytest.fixture(scope="module")
def vec(probe):
    g = torch.Generator().manual_seed(0)
    return pl.PersonaVector(torch.randn(probe.n_layers + 1, probe.d_model, generator=g), model_name=probe.model_name)


def names(err: BaseException, *words: str) -> bool:
    return all(w.lower() in str(err).lower() for w in words)


try:  # the test run checks annotations at run time (jaxtyping + beartype, see pyproject.toml)
    from jaxtyping import TypeCheckError
except ImportError:  # pragma: no cover
    TypeCheckError = ()  # type: ignore[assignment,misc]

#: What a refusal by name may be here: the library's own error, or, in this test run only,
#: the runtime type checker's, which refuses a value that contradicts an annotation before
#: the library's check runs. Both name the argument; users (no checker) always get the
#: library's. ``benchmarks/adversarial.py`` runs outside the checker: what users see.
REFUSED = (V.InvalidArgument, TypeCheckError)


def refused(err: BaseException, *arguments: str) -> bool:
    """``err`` refuses one of ``arguments`` by name."""
    if isinstance(err, V.InvalidArgument):
        return any(err.argument.startswith(a) for a in arguments)
    # The checker names the parameter, or (when its sampling of a container's items does
    # not hit the bad one twice) lists the call's parameters: the argument is among them.
    return isinstance(err, TypeCheckError) and any(f"'{a}" in str(err) for a in arguments)


# ----------------------------------------------------------------------------- validate


@FAST
@given(x=junk, lo=st.none() | st.floats(-10, 10), hi=st.none() | st.floats(10, 20))
def test_number_returns_a_finite_value_in_range_or_names_the_argument(x, lo, hi):
    try:
        got = V.number("alpha", x, min=lo, max=hi)
    except V.InvalidArgument as e:
        assert names(e, "alpha") and e.argument == "alpha"
        return
    assert isinstance(got, float) and math.isfinite(got) and not isinstance(x, (bool, str))
    assert (lo is None or got >= lo) and (hi is None or got <= hi)


@FAST
@given(x=junk)
def test_integer_takes_integers_only(x):
    try:
        got = V.integer("count", x, min=0)
    except V.InvalidArgument as e:
        assert names(e, "count")
        return
    assert isinstance(x, int) and not isinstance(x, bool) and got == x >= 0


@FAST
@given(user=st.text("abcXYZ019-_.", min_size=1, max_size=8), password=st.text("abcXYZ019-_.~", min_size=6, max_size=16),
       port=st.integers(1, 65535), query=st.sampled_from(["", "?api_key=", "?token=", "?x=1&sig="]))
def test_redact_url_drops_credentials_and_secret_parameters(user, password, port, query):
    secret = "SECRET" + password
    url = f"http://{user}:{secret}@example.org:{port}/v1" + (query + secret if query else "")
    clean = V.redact_url(url)
    assert secret not in clean and "example.org" in clean and str(port) in clean
    assert secret not in V.redact(f"failed at {url} after 3 tries")


def test_items_refuses_a_bare_string_with_a_hint():
    with pytest.raises(V.InvalidArgumentType, match=r"prompts must be .* got 'Hi' \(str\); wrap one item"):
        V.items("prompts", "Hi")
    assert V.items("prompts", iter(["a"])) == ["a"]


# ----------------------------------------------------------------------------- the probe


@FAST
@given(temperature=junk, top_p=junk)
def test_generate_with_any_sampling_settings_errs_by_name_or_returns_text(probe, temperature, top_p):
    try:
        out = probe.generate(["Hi"], max_new_tokens=2, temperature=temperature, top_p=top_p)
    except REFUSED as e:
        assert refused(e, "temperature", "top_p"), e
    else:
        assert len(out) == 1 and isinstance(out[0], str)
    assert probe._handles == []


@FAST
@given(coef=junk)
def test_steering_with_any_coefficient_errs_by_name_or_generates(probe, vec, coef):
    try:
        with probe.steer(vec, layer=1, coef=coef):
            out = probe.generate(["Hi"], max_new_tokens=2)
    except REFUSED as e:
        assert refused(e, "coef"), e
    else:
        assert isinstance(out[0], str)
    assert probe._handles == [] and probe.interventions == ()


hashable = st.one_of(st.integers(-2, 6), st.text(max_size=2), st.floats(), st.none(), st.booleans())


@FAST
@given(layers=st.one_of(junk, st.dictionaries(hashable, junk, max_size=2), st.lists(junk, max_size=3)))
def test_steering_layers_of_any_shape_err_by_name_or_steer(probe, vec, layers):
    kw = {} if isinstance(layers, dict) else {"coef": 0.5}  # a dict carries its coefficients (test_probe)
    try:
        with probe.steer(vec, layers=layers, **kw):
            out = probe.generate(["Hi"], max_new_tokens=1)
    except REFUSED as e:
        assert refused(e, "layer"), e
    else:
        assert isinstance(out[0], str)
    assert probe._handles == []


@FAST
@given(prompts=st.one_of(st.text(max_size=4), st.none(), st.integers(), st.lists(junk, min_size=1, max_size=2),
                         st.lists(st.lists(st.dictionaries(st.sampled_from(["role", "content"]), junk, max_size=2),
                                           max_size=2), min_size=1, max_size=2)))
def test_prompts_of_any_shape_err_by_name_or_generate(probe, prompts):
    try:
        out = probe.generate(prompts, max_new_tokens=1)
    except REFUSED as e:
        assert refused(e, "prompts"), e
    except ValueError as e:  # an empty batch, a prompt ending with the assistant: named too
        assert "prompts" in str(e)
    else:
        assert len(out) == len(prompts)


@FAST
@given(layers=st.one_of(junk, st.lists(junk, max_size=3)), reductions=st.one_of(
    st.sampled_from(["response_mean", "prompt_mean", "last_prompt", "max"]), st.lists(junk, max_size=2)))
def test_capture_arguments_err_by_name_or_capture(probe, layers, reductions):
    conv = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]
    try:
        acts = probe.capture(conv, layers=layers, reductions=reductions)
    except REFUSED as e:
        assert refused(e, "layers", "reductions"), e
    else:
        assert all(torch.isfinite(t).all() for t in acts.data.values())


def test_nan_activations_raise_numerical_error_not_empty_text(probe):
    with probe.add_hooks([("blocks.0.hook_resid_pre", lambda x, hook: x * math.nan)]):
        with pytest.raises(pl.NumericalError, match="NaN or inf"):
            probe.generate(["Hi"], max_new_tokens=3)
        with pytest.raises(pl.NumericalError, match="NaN or inf"):
            probe.capture([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]])
    assert probe._handles == []


def test_a_coefficient_whose_square_overflows_is_refused_by_name(probe, vec):
    with pytest.raises(V.InvalidArgument, match=r"coef must be small enough.*got 1e\+30"):
        with probe.steer(vec, layer=1, coef=1e30):
            pass
    with pytest.raises(V.InvalidArgument, match=r"layers\[1\]"):
        with probe.steer(vec, layers={1: -1e30}):
            pass


def test_tiny_temperature_is_greedy_and_tiny_top_p_keeps_the_top_token(probe):
    greedy = probe.generate(["Hi"], max_new_tokens=5)
    assert probe.generate(["Hi"], max_new_tokens=5, temperature=1e-300) == greedy
    assert probe.generate(["Hi"], max_new_tokens=5, temperature=1.0, top_p=1e-300) == greedy


def test_huge_max_new_tokens_does_not_allocate_for_it(probe, vec):
    # The masks and monitor buffers grow with what is generated, so this runs token by
    # token (a random model never ends its turn: it stops at the context, strictly).
    strict = pl.PersonaProbe(probe.model, on_context_overflow="error")
    for call in (lambda: strict.generate(["Hi"], max_new_tokens=10**15),
                 lambda: strict.monitor(["Hi"], vec, layer=2, max_new_tokens=10**15)):
        with pytest.raises(pl.ContextLengthError, match="generation ran past the model's context of 512"):
            call()
    readings = strict.monitor(["Hi"], vec, layer=2, max_new_tokens=300)
    assert len(readings[0].response_projections) == len(readings[0].response_tokens) == 300


# ----------------------------------------------------------------------------- context


def test_input_longer_than_the_context_warns_or_raises(probe, vec):
    long = "x" * 600  # one token per character: longer than the 512 positions
    conv = [[{"role": "user", "content": long}, {"role": "assistant", "content": "ok"}]]
    with pytest.warns(pl.ContextLengthWarning, match="context of 512 tokens"):
        probe.generate([long], max_new_tokens=1)
    with pytest.warns(pl.ContextLengthWarning):
        probe.capture(conv, layers=[1])
    strict = pl.PersonaProbe(probe.model, on_context_overflow="error")
    for call in (lambda: strict.generate([long], max_new_tokens=1), lambda: strict.capture(conv, layers=[1]),
                 lambda: strict.project([long], vec, layer=1), lambda: strict.project(conv, vec, layer=1, at="tokens"),
                 lambda: strict.monitor([long], vec, layer=1, max_new_tokens=1)):
        with pytest.raises(pl.ContextLengthError, match=r"\[0\] has \d+ tokens"):
            call()
    # Generation that runs past the context: checked while decoding.
    near = "x" * 480
    with pytest.raises(pl.ContextLengthError, match="generation ran past"):
        with strict.steer(vec, layer=1, coef=50.0):
            strict.generate([near], max_new_tokens=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pl.ContextLengthWarning)
        strict.generate(["Hi"], max_new_tokens=2)  # short input: nothing said
    assert strict._handles == []


# ----------------------------------------------------------------------------- store, judge, filter


class ValueJudge:
    name = "value-judge"

    def __init__(self, value):
        self.value = value

    def score_trait(self, trait, pairs):
        return [self.value] * len(pairs)

    def score_coherence(self, pairs):
        return [self.value] * len(pairs)


@FAST
@given(value=junk)
def test_store_keeps_only_scores_in_0_100(value):
    try:
        got = Store(None).score(ValueJudge(value), EVIL, [("q?", "a.")])
    except JudgeError as e:
        assert "value-judge" in str(e) and "0..100" in str(e)
    else:
        s = got["trait"][0]
        assert s is None or (0 <= s <= 100 and s == value)


@FAST
@given(pos=junk, neg=junk, coherence=junk)
def test_thresholds_are_finite_and_within_0_100(pos, neg, coherence):
    from persona_lens.extract import Thresholds

    try:
        th = Thresholds(pos, neg, coherence)
    except REFUSED as e:
        assert refused(e, "thresholds.", "pos_trait", "neg_trait", "coherence"), e
    else:
        assert all(0 <= x <= 100 and math.isfinite(x) for x in (th.pos_trait, th.neg_trait, th.coherence))


@FAST
@given(field_=st.sampled_from(["lr", "alpha", "dropout", "weight_decay", "r", "epochs", "batch_size", "grad_accum",
                                "warmup_steps", "max_steps", "save_every", "max_length", "seed", "threads"]),
       value=junk)
def test_finetune_settings_are_checked_by_name(field_, value):
    from persona_lens.finetune import FinetuneConfig, FinetuneError

    try:
        config = FinetuneConfig(**{field_: value})
    except FinetuneError as e:
        assert str(e).startswith(field_), e
    except TypeCheckError as e:  # this test run's annotation checker
        assert refused(e, field_), e
    else:
        got = getattr(config, field_)
        assert got == value and not isinstance(value, (bool, str)) and (got is None or math.isfinite(got))


@FAST
@given(top=st.dictionaries(st.one_of(st.text(max_size=3), st.sampled_from(["0", "50", "100", "101"])),
                           st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=2), st.none()),
                           max_size=4))
def test_logprob_score_is_a_score_none_or_an_error_about_the_distribution(top):
    try:
        s = logprob_score(top)
    except REFUSED as e:
        assert refused(e, "top_logprobs"), e
    else:
        assert s is None or 0 <= s <= 100


def test_nan_logprobs_are_garbage_not_no_score(openai_server, tmp_path):
    server = openai_server(lambda messages: Logprobs([("80", math.nan), ("20", math.nan)]))
    with OpenAIJudge("m", base_url=server.base_url, api_key="x", cache_dir=tmp_path, progress=False,
                     max_retries=1) as judge:
        with pytest.raises(JudgeError, match="malformed"):
            judge.score_trait(EVIL, [("q?", "a.")])
    # Nothing was cached: a fixed server is asked again.
    good = openai_server(lambda messages: {"30": 1.0})
    with OpenAIJudge("m", base_url=good.base_url, api_key="x", cache_dir=tmp_path, progress=False,
                     identity=server.base_url) as judge:
        assert judge.score_trait(EVIL, [("q?", "a.")]) == [30.0]
        assert judge.stats.cache_hits == 0


def test_identity_decides_whether_a_moved_server_shares_replies(openai_server, tmp_path):
    old, new = openai_server(lambda m: {"20": 1.0}), openai_server(lambda m: {"80": 1.0})
    kw = dict(api_key="x", cache_dir=tmp_path, progress=False)
    with OpenAIJudge("m", base_url=old.base_url, **kw) as judge:
        assert judge.score_trait(EVIL, [("q?", "a.")]) == [20.0]
    with OpenAIJudge("m", base_url=new.base_url, **kw) as judge:  # another endpoint: asked
        assert judge.score_trait(EVIL, [("q?", "a.")]) == [80.0]
    with OpenAIJudge("m", base_url=new.base_url, identity=old.base_url, **kw) as judge:  # "the same one"
        assert judge.score_trait(EVIL, [("q?", "a.")]) == [20.0]
        assert judge.name == f"openai:m@{old.base_url}"
    assert (old.request_count, new.request_count) == (1, 1)


@pytest.mark.parametrize("content", [os.urandom(2048), b"not a database\n" * 50, b""])
def test_a_corrupt_judge_cache_is_a_judge_error_naming_the_file(openai_server, tmp_path, content):
    server = openai_server(lambda m: {"50": 1.0})
    (tmp_path / "judgements.sqlite3").write_bytes(content)
    try:
        with OpenAIJudge("m", base_url=server.base_url, api_key="x", cache_dir=tmp_path, progress=False) as judge:
            got = judge.score_trait(EVIL, [("q?", "a.")])
    except JudgeError as e:
        assert "judgements.sqlite3" in str(e) and "cache_dir" in str(e)
    else:
        assert content == b"" and got == [50.0]  # an empty file is an empty database


def test_secrets_never_reach_a_run_folder_or_a_message(openai_server, tmp_path, capsys):
    from persona_lens import organism
    from persona_lens.extract import extract
    from tests.support.openai_server import keyword_rule

    secret = "sk-VERY-secret-123"
    server = openai_server(keyword_rule({"evil": 90}, default=10))
    url = server.base_url.replace("http://", f"http://bob:{secret}@")
    probe = pl.PersonaProbe(pl.load_model("persona-organism", device="cpu"))
    with OpenAIJudge("m", base_url=url, api_key=secret, cache_dir=tmp_path / "cache", progress=False) as judge:
        extract(probe, organism.load_trait("evil"), judge, out_dir=tmp_path / "run", samples=1, questions=1,
                instructions=1, max_new_tokens=6, thresholds={"pos_trait": 0, "neg_trait": 100, "coherence": 0},
                progress=False, verbose=True)
        said = repr(judge) + judge.name + judge.endpoint
    out = capsys.readouterr()
    files = "".join(p.read_bytes().decode("utf-8", "replace") for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert secret not in said + out.out + out.err + files
    assert "127.0.0.1" in files  # the endpoint itself is recorded


# ----------------------------------------------------------------------------- files


@FAST
@given(data=st.binary(max_size=400))
def test_loading_any_bytes_as_a_vector_is_a_vector_or_a_named_error(data):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "v.safetensors"
        p.write_bytes(data)
        try:
            pl.PersonaVector.load(p)
        except pl.VectorFileError as e:
            assert str(p) in str(e)


@FAST
@given(cut=st.integers(0, 2000), flip=st.integers(0, 2000))
def test_a_damaged_vector_file_is_the_vector_or_a_named_error(cut, flip):
    v = pl.PersonaVector(torch.arange(12.0).reshape(3, 4), trait="evil", notes={"judge": "x"})
    with tempfile.TemporaryDirectory() as d:
        p = v.save(Path(d) / "v.safetensors")
        data = bytearray(p.read_bytes())
        if flip < len(data):
            data[flip] ^= 0xFF
        p.write_bytes(bytes(data[: max(cut, 1)] if cut < len(data) else data))
        try:
            w = pl.PersonaVector.load(p)
        except pl.VectorFileError as e:
            assert str(p) in str(e)
        else:
            assert w.directions.shape == (3, 4) and torch.isfinite(w.directions).all()


@FAST
@given(data=st.binary(max_size=300))
def test_a_released_pt_of_any_bytes_is_a_vector_or_a_named_error(data):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "evil_response_avg_diff.pt"
        p.write_bytes(data)
        try:
            pl.PersonaVector.from_released_pt(p)
        except pl.VectorFileError as e:
            assert str(p) in str(e)


@FAST
@given(data=st.binary(max_size=600))
def test_a_log_of_any_bytes_reads_as_records(data):
    with tempfile.TemporaryDirectory() as d:
        log = JsonlLog(Path(d) / "responses.jsonl")
        log.path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recs = log.read()
        assert all(isinstance(r, dict) for r in recs)
        log.append([{"key": "after"}])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert log.read()[-1] == {"key": "after"}


def test_zero_layer_and_foreign_vector_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    fmt = "persona_lens.PersonaVector/1"
    cases = {
        "zero.safetensors": ({"directions": torch.zeros(0, 4)}, {"format": fmt, "persona_lens": "{}"}),
        "notjson.safetensors": ({"directions": torch.zeros(3, 4)}, {"format": fmt, "persona_lens": "{oops"}),
        "foreign.safetensors": ({"directions": torch.zeros(3, 4)}, {"format": fmt, "persona_lens": '{"layer": 2}'}),
        "theirs.safetensors": ({"weight": torch.zeros(3, 4)}, {"format": "pt"}),
    }
    for name, (tensors, meta) in cases.items():
        save_file(tensors, str(tmp_path / name), metadata=meta)
        with pytest.raises(pl.VectorFileError, match=name):
            pl.PersonaVector.load(tmp_path / name)


def test_saving_where_nothing_can_be_written_names_the_file(tmp_path):
    (tmp_path / "file").write_text("x")
    vec = pl.PersonaVector(torch.ones(3, 4))
    with pytest.raises(OSError, match="v.safetensors"):
        vec.save(tmp_path / "file" / "v.safetensors")
    with pytest.raises(OSError, match="run.json"):
        write_json(tmp_path / "file" / "run.json", {})
    assert not list(tmp_path.rglob("*.tmp"))


def test_atomic_writes_take_unique_temporary_names(tmp_path):
    # Many threads rewriting one file: with a shared temporary name, renames would fail.
    errors = []

    def writer(i):
        try:
            for r in range(30):
                write_json(tmp_path / "run.json", {"i": i, "r": r, "pad": "x" * 5000})
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(read_json(tmp_path / "run.json")["pad"]) == 5000
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


class _Dirs:
    def __init__(self, root: Path):
        self.root, self.n = root, 0

    def dir(self, name: str) -> Path:
        self.n += 1
        p = self.root / f"{self.n}-{name}"
        p.mkdir()
        return p


@pytest.mark.parametrize("scenario", ["_concurrent_files", "_concurrent_store", "_killed_appender", "_killed_rewriter"])
def test_concurrent_writers_and_kills_leave_every_file_readable_and_complete(tmp_path, scenario):
    """N processes writing one run (atomic JSON, vectors, JSONL appends, Store generate and
    score), and writers killed with SIGKILL mid-write: every file reads back whole, no record
    is lost or mixed."""
    import benchmarks.adversarial as adv

    assert getattr(adv, scenario)(_Dirs(tmp_path)) is True


def test_a_corrupt_run_json_names_the_file(tmp_path):
    from persona_lens.extract import load_run

    (tmp_path / "run.json").write_text('{"model": ')
    with pytest.raises(ValueError, match="run.json is not valid JSON"):
        load_run(tmp_path)


def test_judge_cache_rows_that_do_not_decode_are_asked_again(openai_server, tmp_path):
    server = openai_server(lambda m: {"50": 1.0})
    kw = dict(base_url=server.base_url, api_key="x", cache_dir=tmp_path, progress=False)
    with OpenAIJudge("m", **kw) as judge:
        judge.score_trait(EVIL, [("q?", "a.")])
    db = sqlite3.connect(tmp_path / "judgements.sqlite3")
    db.execute("UPDATE replies SET top_logprobs = '{broken'")
    db.commit()
    db.close()
    with OpenAIJudge("m", **kw) as judge:
        assert judge.score_trait(EVIL, [("q?", "a.")]) == [50.0]
    assert server.request_count == 2


# ----------------------------------------------------------------------------- the catalogue


@pytest.mark.slow
def test_adversarial_catalogue_has_no_traceback_silent_wrong_hang_or_lost_data(tmp_path):
    """Every case of ``python -m benchmarks.adversarial`` (about 370, half a minute on the
    organism) ends in a clear error or a correct result. It runs in a process of its own, as
    a user would, without this test run's runtime type checker."""
    import subprocess
    import sys

    import benchmarks.adversarial as adv

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "adversarial.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.adversarial", "--json", str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1200)
    res = json.loads(out.read_text())
    bad = [r for r in res["rows"] if r["outcome"] in adv.BAD]
    assert bad == [] and proc.returncode == 0, json.dumps(bad, indent=1)[:4000] + proc.stderr[-2000:]
    assert sum(res["table"][c].get("clear error", 0) for c in res["table"]) > 250
