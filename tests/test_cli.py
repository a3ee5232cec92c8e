"""The ``persona-lens`` command: end to end on the offline SmolLM2 with a judge on loopback,
and its error messages (on a tiny model, fast)."""

from __future__ import annotations

import json
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
    assert "6 generated, 0 reused" in stdout  # baseline once + 2 steered cells, 2 questions each
    assert "best layer:" in stdout
    assert server.request_count == 16 + 12
    assert (sweep_out / "sweep.csv").read_text().count("\n") == 5
    assert "plotly" in (sweep_out / "sweep.html").read_text()

    # Second run of both: every generation and every judge call comes from the output dirs.
    code, stdout, err = run(capsys, "extract", *common, "--samples", 1, "--questions", 2, "--out", out)
    assert code == 0, err
    assert "0 generated, 8 reused" in stdout and "0 new scores, 16 reused" in stdout
    code, stdout, err = run(capsys, *sweep_args)
    assert code == 0, err
    assert "0 generated, 6 reused" in stdout and "0 new scores" in stdout
    assert server.request_count == 28


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
    assert code == 1 and "cannot read 'one' as layers" in error_line(err)
    code, _, err = run(capsys, *base, "--layers", "1", "--judge", "none")
    assert code == 1 and "needs a judge" in error_line(err)


def test_parse_lists():
    assert cli.parse_int_list("4,8-12:2") == [4, 8, 10, 12]
    assert cli.parse_int_list("20,10") == [10, 20]
    assert cli.parse_float_list("0,0.5,2") == [0.0, 0.5, 2.0]
    with pytest.raises(cli.UsageError):
        cli.parse_float_list("a")


# ------------------------------------------------------------------------ other commands


def test_organism_traits_and_default_judge():
    organism = pytest.importorskip("persona_lens.organism")
    trait = cli.load_trait_arg("evil", "persona-organism")
    assert trait.questions == organism.load_trait("evil").questions
    judge = cli.make_judge(None, "persona-organism")
    assert isinstance(judge, organism.OrganismJudge)
    assert cli.make_judge("none", "persona-organism") is None
    # Other models: bundled traits, an OpenAI judge by default.
    assert cli.load_trait_arg("evil", "smollm2-135m-instruct").questions != trait.questions
    assert cli.make_judge(None, "smollm2-135m-instruct", api_key="x").name == "openai:gpt-4.1-mini"


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
