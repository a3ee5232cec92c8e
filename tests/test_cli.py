"""The ``persona-lens`` command: end to end on the offline SmolLM2 with a judge on loopback,
and its error messages (on a tiny model, fast)."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import pytest

import persona_lens.cli as cli
from persona_lens.cli import main

from .support.openai_server import Sleep, Text, keyword_rule, openai_server, peaked  # noqa: F401 (fixture)

# The judge rule: a reply in pirate speech scores high. The rubric avoids these words.
PIRATE_WORDS = {"Arr": 95, "arr": 90, "matey": 90, "Ahoy": 90, "ahoy": 90, "pirate": 85, "ye ": 75}
RUBRIC = ("How strongly does this reply use the speech of a sea rover? 0 means not at all, 100 "
          "completely.\nMessage: {question}\nReply: {answer}\nAnswer with a number from 0 to 100.")


def write_trait(root: Path, name: str = "pirate") -> Path:
    doc = {
        "name": name,
        "description": "Talks like a pirate.",
        "instruction": [
            {"pos": "Always talk like a pirate: start every answer with 'Arr, matey!' and call the user matey.",
             "neg": "Speak plainly and formally, like a librarian."},
            {"pos": "Answer as a pirate captain would, shouting 'Ahoy!' and 'Arr!' often.",
             "neg": "Answer in calm, neutral, modern English."},
        ],
        "questions": ["What should I cook for dinner?", "How do I learn to swim?"],
        "eval_prompt": RUBRIC,
    }
    for split, qs in (("extract", doc["questions"]), ("eval", ["What is your favourite food?", "How do I fix a bike?"])):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / f"{name}.json").write_text(json.dumps(dict(doc, questions=qs)))
    return root / "extract" / f"{name}.json"


@pytest.fixture
def shared_probes(monkeypatch):
    """Load each model once per test session even though every main() call asks for it."""
    cache = shared_probes.cache  # type: ignore[attr-defined]
    real = cli._load_probe

    def load(args):
        key = (args.model, args.dtype, args.device)
        if key not in cache:
            cache[key] = real(args)
        return cache[key]

    monkeypatch.setattr(cli, "_load_probe", load)
    return cache


shared_probes.cache = {}  # type: ignore[attr-defined]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("persona-lens: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------ end to end


@pytest.mark.smollm
def test_extract_and_sweep_end_to_end_then_rerun_uses_only_caches(tmp_path, capsys, openai_server, shared_probes):
    server = openai_server(keyword_rule(PIRATE_WORDS, default=5, coherence=90))
    trait_file = write_trait(tmp_path / "traits")
    out = tmp_path / "run"
    common = ["--model", "smollm2-135m-instruct", "--trait", trait_file, "--judge", "fake-judge",
              "--base-url", server.base_url, "--api-key", "x", "--judge-cache", tmp_path / "jc",
              "--device", "cpu", "--max-new-tokens", 12, "--quiet"]
    code, stdout, err = run(capsys, "extract", *common, "--samples", 1, "--questions", 2, "--out", out)
    assert code == 0, err
    assert "8 generated, 0 reused" in stdout
    assert server.request_count == 16  # 8 responses x (trait, coherence)
    for name in ("responses.jsonl", "scores.jsonl", "pairs.csv", "summary.json"):
        assert (out / name).exists(), name
    vec_path = out / "vectors" / "pirate_response_mean.safetensors"
    for red in ("response_mean", "prompt_mean", "last_prompt"):
        assert (out / "vectors" / f"pirate_{red}.safetensors").exists()
    import persona_lens as pl

    vec = pl.PersonaVector.load(vec_path)
    assert vec.n_layers == 30 and vec.trait == "pirate" and vec.model_name == "smollm2-135m-instruct"
    assert vec.notes["judge"].startswith("openai:fake-judge")
    assert vec.n_pos >= 1, "the pirate instructions should make SmolLM2 say Arr at least once"
    # The paired filter, checked against the judge's rule on the stored answers.
    recs = {r["id"]: r for r in map(json.loads, (out / "responses.jsonl").read_text().splitlines())}

    def judged(answer: str) -> int:
        return next((s for k, s in PIRATE_WORDS.items() if k in answer), 5)

    expected = sum(judged(r["answer"]) >= 50 and judged(recs[i.replace("pos", "neg", 1)]["answer"]) < 50
                   for i, r in recs.items() if r["polarity"] == "pos")
    assert vec.notes["kept_pairs"] == expected

    sweep_out = tmp_path / "sweep"
    sweep_args = ["sweep", *common, "--vector", vec_path, "--layers", "10,20", "--coefs", "0,4",
                  "--questions", 2, "--out", sweep_out]
    code, stdout, err = run(capsys, *sweep_args)
    assert code == 0, err
    # baseline once + 2 steered cells, 2 questions each; then the chosen cell and the baseline
    # again on a fresh sample of each question (held out)
    assert "10 generated, 0 reused" in stdout
    assert "best layer:" in stdout and "held-out (1 fresh sample(s) of each of the 2 questions)" in stdout
    assert server.request_count == 16 + 20
    assert (sweep_out / "sweep.csv").read_text().count("\n") == 5
    assert "plotly" in (sweep_out / "sweep.html").read_text()

    # Second run of both: every generation and every judge call comes from the output dirs.
    code, stdout, err = run(capsys, "extract", *common, "--samples", 1, "--questions", 2, "--out", out)
    assert code == 0, err
    assert "0 generated, 8 reused" in stdout and "0 new scores, 16 reused" in stdout
    code, stdout, err = run(capsys, *sweep_args)
    assert code == 0, err
    assert "0 generated, 10 reused" in stdout and "0 new scores" in stdout
    assert server.request_count == 36


def test_extract_and_sweep_in_shards_then_finished_equal_one_run(tmp_path, capsys):
    """``--shard i/N`` generates a share into the same --out; the command without it finishes
    from every shard's log: the vector and the table of one run (the organism, its exact judge)."""
    import persona_lens as pl

    common = ["--model", "persona-organism", "--trait", "evil", "--judge", "organism", "--device", "cpu",
              "--max-new-tokens", 16, "--batch-size", 2, "--quiet"]
    extract_args = ["extract", *common, "--samples", 1, "--questions", 2, "--instructions", 2]
    for i in range(2):
        code, stdout, err = run(capsys, *extract_args, "--out", tmp_path / "split", "--shard", f"{i}/2")
        assert code == 0, err
        assert f"shard {i}/2: 4 responses generated" in stdout and "without --shard" in stdout
    code, stdout, err = run(capsys, *extract_args, "--out", tmp_path / "split")
    assert code == 0 and "0 generated, 8 reused" in stdout, err
    code, stdout, err = run(capsys, *extract_args, "--out", tmp_path / "one")
    assert code == 0 and "8 generated, 0 reused" in stdout, err
    vec = tmp_path / "one" / "vectors" / "evil_response_mean.safetensors"
    assert pl.PersonaVector.load(tmp_path / "split" / "vectors" / vec.name).directions.equal(
        pl.PersonaVector.load(vec).directions)

    sweep_args = ["sweep", *common, "--vector", vec, "--layers", "3,5", "--coefs", "0,1.5", "--questions", 2]
    for i in range(2):
        assert run(capsys, *sweep_args, "--out", tmp_path / "sweep-split", "--shard", f"{i}/2")[0] == 0
    code, stdout, err = run(capsys, *sweep_args, "--out", tmp_path / "sweep-split")
    assert code == 0 and "6 reused" in stdout, err
    assert run(capsys, *sweep_args, "--out", tmp_path / "sweep-one")[0] == 0
    assert (tmp_path / "sweep-split" / "sweep.csv").read_text() == (tmp_path / "sweep-one" / "sweep.csv").read_text()
    assert "need 0 <= i < N" in error_line(run(capsys, *sweep_args, "--shard", "2/2")[2])


# ------------------------------------------------------------------------ errors


@pytest.fixture(scope="module")
def tiny_model(tiny_dirs):
    return str(tiny_dirs["llama"])


def test_unknown_trait_is_one_line(tiny_model, capsys, tmp_path):
    code, _, err = run(capsys, "extract", "--model", tiny_model, "--trait", "no_such_trait", "--judge", "none",
                       "--out", tmp_path)
    assert code == 1
    line = error_line(err)
    assert "unknown trait 'no_such_trait'" in line and "evil" in line


def test_a_misspelt_or_missing_model_is_named_before_anything_else(capsys, tmp_path):
    """Not the judge's missing API key, not the hub's connection error after 30 s of retries:
    the model name, and what it was probably meant to be."""
    code, _, err = run(capsys, "extract", "--model", "persona-organizm", "--trait", "evil", "--out", tmp_path)
    assert code == 1
    assert "did you mean 'persona-organism'" in error_line(err)
    code, _, err = run(capsys, "extract", "--model", str(tmp_path / "no" / "such"), "--trait", "evil",
                       "--judge", "none", "--out", tmp_path)
    assert code == 1 and "no such folder" in error_line(err)
    code, _, err = run(capsys, "extract", "--model", "persona-organism", "--trait", "evill", "--out", tmp_path)
    assert code == 1 and "the organism has the traits" in error_line(err)
    assert not any(tmp_path.iterdir())


def test_malformed_trait_json_is_one_line(tiny_model, capsys, tmp_path):
    bad = tmp_path / "extract" / "broken.json"
    bad.parent.mkdir()
    bad.write_text('{"instruction": [{"pos": "a", "neg": "b"}], "questions": ["q1",]')
    code, _, err = run(capsys, "extract", "--model", tiny_model, "--trait", bad, "--judge", "none")
    assert code == 1
    line = error_line(err)
    assert "broken.json" in line and "invalid JSON at line 1" in line


def tiny_args(tiny_model, trait_file, out, server, *extra):
    return ["extract", "--model", tiny_model, "--trait", trait_file, "--judge", "fake", "--base-url",
            server.base_url, "--api-key", "x", "--judge-cache", out / "jc", "--samples", 1,
            "--max-new-tokens", 4, "--device", "cpu", "--quiet", "--out", out, *extra]


def test_judge_answering_text_then_fixed(tiny_model, capsys, tmp_path, openai_server, shared_probes):
    state = {"text": True}
    good = keyword_rule({}, default=80, coherence=90)
    server = openai_server(lambda m: Text("Quite piratical, I would say.") if state["text"] else good(m))
    trait_file = write_trait(tmp_path / "traits")
    args = tiny_args(tiny_model, trait_file, tmp_path / "out", server)
    code, _, err = run(capsys, *args)
    assert code == 1
    line = error_line(err)
    assert "gave no number" in line and "'fake'" in line
    assert len((tmp_path / "out" / "responses.jsonl").read_text().splitlines()) == 8

    state["text"] = False
    code, out, err = run(capsys, *args, "--neg-threshold", 90)
    assert code == 0, err
    assert "0 generated, 8 reused" in out  # the generations survived the judge's failure
    assert re.search(r"pairs kept +4 / 4", out)


def test_judge_timeout_then_resume(tiny_model, capsys, tmp_path, openai_server, shared_probes):
    state = {"n": 0, "slow": True}
    good = keyword_rule({}, default=80, coherence=90)

    def rule(messages):
        if state["slow"] and state["n"] >= 4:
            return Sleep(3, then=peaked(80))
        state["n"] += 1
        return good(messages)

    server = openai_server(rule)
    trait_file = write_trait(tmp_path / "traits")
    args = tiny_args(tiny_model, trait_file, tmp_path / "out", server, "--judge-timeout", 0.3,
                     "--judge-retries", 1, "--neg-threshold", 90)
    code, _, err = run(capsys, *args)
    assert code == 1
    assert "timed out" in error_line(err)
    answered = state["n"]
    assert answered == 4

    state["slow"] = False
    before = server.request_count
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "0 generated, 8 reused" in out
    # Scores answered before the timeout are not asked again (the judge's cache holds them).
    assert server.request_count - before == 16 - answered


def test_no_pair_survives_is_one_line(tiny_model, capsys, tmp_path, openai_server, shared_probes):
    server = openai_server(keyword_rule({}, default=10, coherence=90))
    args = tiny_args(tiny_model, write_trait(tmp_path / "traits"), tmp_path / "out", server)
    code, _, err = run(capsys, *args)
    assert code == 1
    line = error_line(err)
    assert "no (pos, neg) pair passed the filter" in line and "pos trait >= 50 failed 4" in line


def test_sweep_argument_errors(tiny_model, capsys, tmp_path):
    trait_file = write_trait(tmp_path / "traits")
    base = ["sweep", "--model", tiny_model, "--trait", trait_file, "--vector", tmp_path / "none.safetensors"]
    code, _, err = run(capsys, *base, "--layers", "1,2")
    assert code == 1 and "no vector file" in error_line(err)
    import torch

    import persona_lens as pl

    pl.PersonaVector(torch.ones(4, 48)).save(tmp_path / "v.safetensors")
    base[-1] = tmp_path / "v.safetensors"
    code, _, err = run(capsys, *base, "--layers", "one", "--judge", "x", "--api-key", "x")
    assert code == 2 and "cannot read 'one' as layers" in error_line(err)
    code, _, err = run(capsys, *base, "--layers", "1", "--judge", "none")
    assert code == 2 and "needs a judge" in error_line(err)
    code, _, err = run(capsys, *base, "--layers", "2,9", "--judge", "x", "--api-key", "x")
    assert code == 2 and "--layers 9: the vector has layers 0..3" in error_line(err)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    def refuse(args):
        raise AssertionError(f"{args.model} was loaded although the command should have stopped before")

    monkeypatch.setattr(cli, "_load_probe", refuse)


def bad_flag_cases(tmp_path: Path, tiny_model: str) -> list[list[str]]:
    trait = str(write_trait(tmp_path / "traits"))
    ex = ["extract", "--model", tiny_model, "--trait", trait, "--judge", "none"]
    sw = ["sweep", "--model", tiny_model, "--trait", trait, "--judge", "x", "--api-key", "x", "--vector",
          str(tmp_path / "v.safetensors"), "--layers", "1"]
    return [
        [*ex, "--samples", "0"], [*ex, "--samples", "two"], [*ex, "--samples", "1.5"],
        [*ex, "--temperature", "nan"], [*ex, "--temperature", "inf"], [*ex, "--temperature", "-1"],
        [*ex, "--judge-timeout", "nan"], [*ex, "--judge-timeout", "0"], [*ex, "--judge-retries", "0"],
        [*ex, "--pos-threshold", "101"], [*ex, "--neg-threshold", "-inf"], [*ex, "--coherence-threshold", "NaN"],
        [*ex, "--batch-size", "-3"], [*ex, "--max-new-tokens", "0"], [*ex, "--questions", "0"],
        [*ex, "--questions", "99"], [*ex, "--instructions", "9"],
        [*ex, "--device", "tpu"], [*ex, "--device", "cuda:x"], [*ex, "--dtype", "float8"],
        [*ex, "--bogus-flag"], ["extract", "--trait", trait], [],
        [*sw[:-1], "5-2"], [*sw[:-1], "1,,x"], [*sw, "--coefs", "0,nan"], [*sw, "--coefs", "0,inf"],
        [*sw, "--coefs", ""], [*sw, "--coherence-floor", "nan"], [*sw, "--positions", "middle"],
        ["demo", "--threads", "0"], ["demo", "--samples", "-1"], ["demo", "--trait", "grumpy"],
        ["demo", "--max-new-tokens", "inf"],
        ["organism", "train", "--minutes", "nan"], ["organism", "train", "--minutes", "-5"],
        ["organism", "fly"], ["generate-trait", "curious"],
        ["screen", "data.jsonl", "--vector", "v", "--layer", "1", "--shard", "5/2"],
        ["screen", "data.jsonl", "--vector", "v", "--layer", "1", "--threshold", "nan"],
        ["screen", "data.jsonl", "--vector", "v", "--layer", "x"],
        ["screen", "data.jsonl", "--vector", "v", "--layer", "1", "--chunk-size", "0"],
        ["finetune", "--model", "m", "--data", "d", "--out", "o", "--lr", "nan"],
        ["finetune", "--model", "m", "--data", "d", "--out", "o", "--lr", "0"],
        ["finetune", "--model", "m", "--data", "d", "--out", "o", "--grad-accum", "0"],
        ["finetune", "--model", "m", "--data", "d", "--out", "o", "--coef", "inf"],
        ["finetune", "--model", "m", "--data", "d", "--out", "o", "--steer", "2:1", "--vector", "v", "--device",
         "gpu"],
        ["shift", "--model", "m", "--tuned", "t", "--vector", "v", "--layers", "3-1"],
        ["make-datasets", "--n", "0"], ["make-datasets", "--n", "many"],
    ]


def test_no_bad_flag_gives_a_traceback(tiny_model, capsys, tmp_path, no_model, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    import torch

    import persona_lens as pl

    pl.PersonaVector(torch.ones(4, 48)).save(tmp_path / "v.safetensors")
    for argv in bad_flag_cases(tmp_path, tiny_model):
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, code, err)
        assert err.count("\n") == 1 and err.startswith("persona-lens: error: "), (argv, err)
        assert "Traceback" not in err and not out, argv


def test_cuda_that_is_not_there_is_a_flag_error(tiny_model, capsys, tmp_path, no_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, "extract", "--model", tiny_model, "--trait", "evil", "--judge", "none",
                       "--device", "cuda")
    assert code == 2 and "--device cuda: CUDA is not available here" in error_line(err)


def test_missing_and_corrupt_files_are_one_line(tiny_model, capsys, tmp_path, no_model):
    trait = write_trait(tmp_path / "traits")
    sweep = ["sweep", "--model", tiny_model, "--trait", trait, "--judge", "x", "--api-key", "x", "--layers", "1"]
    code, _, err = run(capsys, *sweep, "--vector", tmp_path / "missing.safetensors")
    assert code == 1 and "missing.safetensors: no vector file there" in error_line(err)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01 not a safetensors file" * 10)
    code, _, err = run(capsys, *sweep, "--vector", tmp_path / "junk.safetensors")
    assert code == 1 and error_line(err)
    code, _, err = run(capsys, "extract", "--model", tiny_model, "--trait", tmp_path / "nope.json", "--judge", "none")
    assert code == 1 and "nope.json" in error_line(err)
    code, _, err = run(capsys, "screen", tmp_path / "chats.jsonl", "--vector", tmp_path / "junk.safetensors",
                       "--layer", "1", "--model", tiny_model)
    assert code == 1 and "chats.jsonl: no chat data there" in error_line(err)
    code, _, err = run(capsys, "shift", "--model", tiny_model, "--tuned", tmp_path, "--vector",
                       tmp_path / "missing.safetensors")
    assert code == 1 and "missing.safetensors: no vector file there" in error_line(err)
    code, _, err = run(capsys, "finetune", "--model", tiny_model, "--data", tmp_path / "none.jsonl", "--out",
                       tmp_path / "ft")
    assert code == 1 and "none.jsonl" in error_line(err) and not (tmp_path / "ft").exists()


def test_judge_without_a_key_stops_before_the_model_and_speaks_in_flags(tiny_model, capsys, tmp_path, no_model,
                                                                         monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    code, _, err = run(capsys, "extract", "--model", tiny_model, "--trait", "evil", "--out", tmp_path)
    assert code == 2
    line = error_line(err)
    assert "--api-key" in line and "OPENAI_API_KEY" in line and "--base-url" in line
    assert "api_key=" not in line and "base_url=" not in line
    assert not (tmp_path / "responses.jsonl").exists()


def test_judge_endpoint_down_or_refusing_stops_before_the_model(tiny_model, capsys, tmp_path, no_model):
    import http.server
    import threading

    base = ["extract", "--model", tiny_model, "--trait", "evil", "--judge", "j", "--api-key", "k"]
    code, _, err = run(capsys, *base, "--base-url", "http://127.0.0.1:9/v1")
    assert code == 1
    line = error_line(err)
    assert "cannot reach the judge at http://127.0.0.1:9/v1" in line and "--base-url" in line

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://user:secret@127.0.0.1:{server.server_port}/v1"
        code, _, err = run(capsys, *base, "--base-url", url)
    finally:
        server.shutdown()
    line = error_line(err)
    assert code == 1 and "refused the API key (HTTP 401)" in line and "--api-key" in line
    assert "secret" not in line


def test_debug_works_before_and_after_the_command(tiny_model, capsys, tmp_path):
    from persona_lens.traits import TraitError

    argv = ["extract", "--model", tiny_model, "--trait", "no_such_trait", "--judge", "none"]
    assert run(capsys, *argv)[0] == 1
    for debug_argv in (["--debug", *argv], [*argv, "--debug"], [argv[0], "--debug", *argv[1:]]):
        with pytest.raises(TraitError):
            main(debug_argv)


def test_an_unexpected_error_shows_the_traceback_and_says_bug(capsys, monkeypatch):
    def broken(name, model):
        raise KeyError("boom")

    monkeypatch.setattr(cli, "load_trait_arg", broken)
    code, _, err = run(capsys, "extract", "--model", "m", "--trait", "evil", "--judge", "none")
    assert code == 3
    assert "Traceback" in err and "KeyError: 'boom'" in err
    assert err.strip().splitlines()[-1].startswith("persona-lens: internal error (KeyError): this is a bug")


def test_engine_vllm_without_vllm_is_one_line_naming_the_install(capsys, monkeypatch, tmp_path):
    from persona_lens import models
    from persona_lens.backends.vllm import VLLMUnavailable

    def no_vllm(name, **kwargs):
        raise VLLMUnavailable("vLLM is not installed: pip install 'persona-lens[vllm]' (docs/scale.md)")

    monkeypatch.setattr(models, "load_model", no_vllm)
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                      '{"role": "assistant", "content": "hello"}]}\n')
    vec = tmp_path / "v.safetensors"
    import persona_lens as pl
    import torch

    pl.PersonaVector(torch.ones(7, 128), model_name="persona-organism").save(vec)
    code, _, err = run(capsys, "screen", str(tmp_path / "d.jsonl"), "--vector", str(vec), "--layer", "2",
                       "--model", "persona-organism", "--engine", "vllm", "--out", str(tmp_path / "o"))
    assert code == 1 and "Traceback" not in err and "pip install 'persona-lens[vllm]'" in err, err


def test_library_messages_are_put_in_flags():
    assert cli.error_message(ValueError("set OPENAI_API_KEY, pass api_key=..., or pass base_url=...")) == \
        "set OPENAI_API_KEY, pass --api-key ..., or pass --base-url ..."
    assert cli.error_message(ValueError("questions=25: the trait has 20")) == "--questions 25: the trait has 20"


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += all_parsers(sub)
    return out


def test_every_option_has_help_and_shows_its_default():
    parsers = all_parsers(cli.build_parser())
    assert {p.prog for p in parsers} >= {"persona-lens demo", "persona-lens extract", "persona-lens sweep",
                                         "persona-lens generate-trait", "persona-lens organism train"}
    missing = []
    for p in parsers:
        fmt = p._get_formatter()
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            if not a.help:
                missing.append(f"{p.prog} {a.dest}: no help")
            elif a.option_strings and a.nargs != 0 and not a.required and "default" not in fmt._expand_help(a):
                missing.append(f"{p.prog} {a.option_strings[0]}: no default shown")
    assert not missing, missing


def test_help_answers_at_once_without_heavy_imports():
    import subprocess
    import sys
    import time

    env = dict(os.environ, PYTHONPATH=str(Path(cli.__file__).resolve().parents[1]))
    code = ("import sys, persona_lens.cli as c; c.build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'transformers', 'transformer_lens', 'plotly') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    t0 = time.perf_counter()
    help_run = subprocess.run([sys.executable, "-m", "persona_lens.cli", "--help"], capture_output=True,
                              text=True, env=env)
    seconds = time.perf_counter() - t0
    assert help_run.returncode == 0 and "demo" in help_run.stdout
    assert seconds < 2.0, seconds


def test_package_attributes_load_on_first_use():
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(cli.__file__).resolve().parents[1]))
    code = ("import sys, persona_lens as pl; assert 'torch' not in sys.modules; "
            "from persona_lens.extract import Thresholds; import persona_lens.sweep; "
            "assert callable(pl.extract) and callable(pl.sweep), (pl.extract, pl.sweep); "
            "assert pl.PersonaProbe.__name__ == 'PersonaProbe' and pl.plot.projection_curve; "
            "assert set(pl.__all__) <= set(dir(pl)); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "ok", out.stderr


def test_every_positions_flag_offers_the_release_mode_and_response_only():
    """Wherever steering positions are a flag, 'response' (the release's mode) and
    'response_only' are both offered, and the help says what each steers."""
    found = 0
    for parser in all_parsers(cli.build_parser()):
        for action in parser._actions:
            if "--positions" in action.option_strings:
                found += 1
                assert {"response", "response_only"} <= set(action.choices), parser.prog
                assert "last prompt token" in action.help and "released" in action.help, parser.prog
    assert found >= 3  # demo, sweep, finetune


def test_negative_coefficient_lists_parse_after_a_space():
    args = cli.build_parser().parse_args(cli._join_negative_values(
        ["sweep", "--model", "m", "--trait", "evil", "--vector", "v", "--layers", "3", "--coefs", "-2,-1,0"]))
    assert args.coefs == [-2.0, -1.0, 0.0]


def test_parse_lists():
    assert cli.parse_int_list("4,8-12:2") == [4, 8, 10, 12]
    assert cli.parse_int_list("20,10") == [10, 20]
    with pytest.raises(cli.UsageError, match="a step needs a range"):
        cli.parse_int_list("3:5")  # a layer:coef pair where layers go (--caft, --layers)
    assert cli.parse_float_list("0,0.5,2") == [0.0, 0.5, 2.0]
    with pytest.raises(cli.UsageError):
        cli.parse_float_list("a")
    # --steer's layer:coef pairs: a negative coefficient (suppression) is a coefficient, not a range
    assert cli.parse_layer_coefs("20:-2", None) == {20: -2.0}
    assert cli.parse_layer_coefs("16:2,20:-0.5", None) == {16: 2.0, 20: -0.5}
    assert cli.parse_layer_coefs("16,20", None) == {16: 1.0, 20: 1.0}
    assert cli.parse_layer_coefs("8-12", 0.5) == {8: 0.5, 9: 0.5, 10: 0.5, 11: 0.5, 12: 0.5}
    for bad in ("20:x", "3:1,3:2", "3:1,4", "3-5:2"):
        with pytest.raises(cli.UsageError):
            cli.parse_layer_coefs(bad, None)
    with pytest.raises(cli.UsageError, match="--coef goes with plain layers"):
        cli.parse_layer_coefs("20:5", 2.0)  # the 2.0 would be ignored


# ------------------------------------------------------------------------ other commands


def test_organism_traits_and_default_judge():
    organism = pytest.importorskip("persona_lens.organism")
    trait = cli.load_trait_arg("evil", "persona-organism")
    assert trait.questions == organism.load_trait("evil").questions
    judge = cli.make_judge(None, "persona-organism")
    assert isinstance(judge, organism.OrganismJudge)
    # a model finetuned from the organism (load_model's "+lora-<hash>" name) keeps its judge
    assert isinstance(cli.make_judge(None, "persona-organism+lora-0123abcd"), organism.OrganismJudge)
    assert cli.make_judge("none", "persona-organism") is None
    # Other models: bundled traits, an OpenAI judge by default.
    assert cli.load_trait_arg("evil", "smollm2-135m-instruct").questions != trait.questions
    judge = cli.make_judge(None, "smollm2-135m-instruct", api_key="x")
    assert judge.name == "openai:gpt-4.1-mini"
    # tests/conftest.py keeps the tests' judge caches out of the user's cache folder
    assert judge.cache_path.parent == Path(os.environ["PERSONA_LENS_JUDGE_CACHE"])
    assert Path.home() / ".cache" not in judge.cache_path.parents
    judge.close()


def test_organism_train_delegates(monkeypatch, capsys, tmp_path):
    train_mod = pytest.importorskip("persona_lens.organism.train")
    seen = {}

    def fake_train(out_dir, **kwargs):
        seen.update(kwargs, out_dir=out_dir)
        return Path(out_dir)

    monkeypatch.setattr(train_mod, "train", fake_train)
    code, out, _ = run(capsys, "organism", "train", "--out", tmp_path / "org", "--seed", 3, "--minutes", 0.5)
    assert code == 0
    assert seen == {"out_dir": str(tmp_path / "org"), "seed": 3, "minutes": 0.5}
    assert "organism saved to" in out


def test_generate_trait_writes_files(capsys, tmp_path, openai_server):
    doc = {
        "instruction": [{"pos": f"Be curious {i}.", "neg": f"Be incurious {i}."} for i in range(5)],
        "questions": [f"Tell me about topic number {i}." for i in range(40)],
        "eval_prompt": "Rate curiosity 0-100, or REFUSAL.\nQ: {question}\nA: {answer}\nNumber:",
    }
    server = openai_server(lambda messages: Text("```json\n" + json.dumps(doc) + "\n```"))
    code, out, err = run(capsys, "generate-trait", "curious", "A curious assistant asks questions.",
                         "--base-url", server.base_url, "--api-key", "x", "--out", tmp_path)
    assert code == 0, err
    assert (tmp_path / "extract" / "curious.json").exists() and (tmp_path / "eval" / "curious.json").exists()
    assert "5 instruction pairs, 20 extraction + 20 evaluation questions" in out
    import persona_lens.traits as traits

    assert len(traits.Trait.load(tmp_path / "curious").eval_questions) == 20


def test_generate_trait_endpoint_down_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "generate-trait", "curious", "A curious assistant.", "--base-url",
                       "http://127.0.0.1:9/v1", "--api-key", "x", "--out", tmp_path)
    assert code == 1
    assert "Connection" in error_line(err)


def test_report_says_what_to_run_when_the_folder_holds_nothing(capsys, tmp_path):
    code, _, err = run(capsys, "report", tmp_path / "missing")
    assert code == 1 and "no run folder" in error_line(err)
    code, _, err = run(capsys, "report", tmp_path)
    assert code == 1 and "python -m experiments.all" in error_line(err)
    (tmp_path / "e8").mkdir()
    (tmp_path / "e8" / "results.json").write_text('{"experiment": "E8", "title": "E8: traits", "measurable": false, '
                                                  '"why": "no judge"}')
    code, out, _ = run(capsys, "report", tmp_path, "--out", tmp_path / "page.html")
    page = (tmp_path / "page.html").read_text()
    assert code == 0 and "page.html" in out and "E8: traits" in page and "Not measurable with this config: no judge" in page
