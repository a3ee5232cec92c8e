"""Trait loading, validation, writing and generation."""

from __future__ import annotations

import json
import warnings

import openai
import pytest

from persona_lens.traits import InstructionPair, Trait, TraitError, generate_trait

from .support.openai_server import Text, openai_server, sequence  # noqa: F401

RELEASED = ["apathetic", "evil", "hallucinating", "humorous", "impolite", "optimistic", "sycophantic"]


def _doc(n_pairs=5, n_questions=3, prompt="Rate {question} / {answer}. Reply 0-100 or REFUSAL.", **extra):
    doc = {
        "instruction": [{"pos": f"Be curious {i}.", "neg": f"Be incurious {i}."} for i in range(n_pairs)],
        "questions": [f"Question {i}?" for i in range(n_questions)],
        "eval_prompt": prompt,
    }
    doc.update(extra)
    return doc


def _write(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
    return path


# ---------------------------------------------------------------------- bundled traits


def test_available_lists_the_seven_released_traits():
    assert Trait.available() == RELEASED


@pytest.mark.parametrize("name", RELEASED)
def test_bundled_trait_is_complete(name):
    trait = Trait.load(name)
    trait.validate(n_pairs=5)
    assert trait.name == name
    assert len(trait.description) > 80 and "\n" not in trait.description
    assert len(trait.instructions) == 5
    assert all(p.pos.strip() and p.neg.strip() and p.pos != p.neg for p in trait.instructions)
    assert len(trait.questions) == 20 and len(trait.eval_questions) == 20
    assert len(set(trait.questions) | set(trait.eval_questions)) == 40
    assert "{question}" in trait.eval_prompt and "{answer}" in trait.eval_prompt
    assert "REFUSAL" in trait.eval_prompt and "0 to 100" in trait.eval_prompt
    # Questions should elicit the trait without naming it.
    assert not any(name in q.lower() for q in trait.questions + trait.eval_questions)


def test_bundled_files_use_the_released_keys():
    from persona_lens.traits import DATA_DIR

    for split in ("extract", "eval"):
        for name in RELEASED:
            doc = json.loads((DATA_DIR / split / f"{name}.json").read_text())
            assert {"instruction", "questions", "eval_prompt"} <= set(doc)
            assert set(doc["instruction"][0]) == {"pos", "neg"}


def test_unknown_name_lists_available_names():
    with pytest.raises(TraitError) as info:
        Trait.load("grumpy")
    message = str(info.value)
    assert "'grumpy'" in message
    for name in RELEASED:
        assert name in message


# ---------------------------------------------------------------------- round trip and layouts


def test_round_trip_to_json_from_json(tmp_path):
    trait = Trait.load("evil")
    extract_path, eval_path = trait.to_json(tmp_path)
    assert extract_path == tmp_path / "extract" / "evil.json"
    assert eval_path == tmp_path / "eval" / "evil.json"
    assert Trait.from_json(extract_path, eval_path) == trait
    assert Trait.load(tmp_path) == trait  # the directory form
    assert Trait.load(extract_path) == trait  # the single-file form finds its sibling split
    doc = json.loads(eval_path.read_text())
    assert doc["questions"] == trait.eval_questions and doc["name"] == "evil"


def test_from_json_name_and_description_overrides(tmp_path):
    path = _write(tmp_path / "extract" / "curious.json", _doc())
    _write(tmp_path / "eval" / "curious.json", {"questions": ["Held out?"]})
    trait = Trait.from_json(path)
    assert (trait.name, trait.description, trait.eval_questions) == ("curious", "", ["Held out?"])
    trait = Trait.from_json(path, name="nosy", description="Asks a lot.")
    assert (trait.name, trait.description) == ("nosy", "Asks a lot.")
    _write(path, _doc(name="inquisitive", description="Wants to know."))
    assert Trait.from_json(path).name == "inquisitive"
    assert Trait.from_json(path).description == "Wants to know."


def test_reads_the_released_layout(tmp_path):
    extract = _write(tmp_path / "trait_data_extract" / "x.json", _doc())
    _write(tmp_path / "trait_data_eval" / "x.json", _doc(n_questions=0) | {"questions": ["Eval q?"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sibling split is found: no warning
        trait = Trait.load(extract)
    assert trait.name == "x"
    assert trait.questions == ["Question 0?", "Question 1?", "Question 2?"]
    assert trait.eval_questions == ["Eval q?"]
    assert Trait.load(tmp_path) == trait
    assert Trait.load(tmp_path / "x") == trait


def test_single_file_without_sibling_warns(tmp_path):
    path = _write(tmp_path / "lonely.json", _doc())
    with pytest.warns(UserWarning, match="eval_questions is empty"):
        trait = Trait.load(path)
    assert trait.eval_questions == [] and len(trait.questions) == 3


def test_directory_with_several_traits_asks_which(tmp_path):
    for name in ("a", "b"):
        _write(tmp_path / "extract" / f"{name}.json", _doc())
        _write(tmp_path / "eval" / f"{name}.json", {"questions": ["Held out?"]})
    with pytest.raises(TraitError, match="several traits"):
        Trait.load(tmp_path)
    assert Trait.load(tmp_path / "b").name == "b"


# ---------------------------------------------------------------------- malformed files


def _load_error(tmp_path, doc) -> TraitError:
    path = _write(tmp_path / "extract" / "bad.json", doc)
    _write(tmp_path / "eval" / "bad.json", {"questions": ["Held out?"]})
    with pytest.raises(TraitError) as info:
        Trait.load(path)
    assert str(path) in str(info.value)
    return info.value


def test_missing_key_is_named(tmp_path):
    doc = _doc()
    del doc["eval_prompt"]
    error = _load_error(tmp_path, doc)
    assert error.field == "eval_prompt" and "missing key" in str(error)


def test_misspelled_instruction_key_gets_a_hint(tmp_path):
    doc = _doc()
    doc["instructions"] = doc.pop("instruction")
    error = _load_error(tmp_path, doc)
    assert error.field == "instruction" and "'instructions'" in str(error)


def test_wrong_number_of_pairs_is_named(tmp_path):
    error = _load_error(tmp_path, _doc(n_pairs=3))
    assert error.field == "instruction" and "expected 5" in str(error) and "got 3" in str(error)
    path = tmp_path / "extract" / "bad.json"
    assert len(Trait.load(path, n_pairs=None).instructions) == 3


def test_missing_placeholder_is_named(tmp_path):
    error = _load_error(tmp_path, _doc(prompt="Rate this: {question}"))
    assert error.field == "eval_prompt" and "{answer}" in str(error)


def test_wrong_types_are_named(tmp_path):
    error = _load_error(tmp_path, _doc() | {"questions": "What?"})
    assert error.field == "questions" and "list" in str(error)
    doc = _doc()
    doc["instruction"][2] = {"pos": "Be curious.", "neg": 7}
    error = _load_error(tmp_path, doc)
    assert error.field == "instruction" and "item 2" in str(error) and "'neg'" in str(error)
    doc["instruction"][2] = {"pos": "Be curious.", "neg": "  "}
    assert "item 2" in str(_load_error(tmp_path, doc))


def test_empty_questions_are_named(tmp_path):
    error = _load_error(tmp_path, _doc(n_questions=0))
    assert error.field == "questions"


def test_invalid_json_names_file_and_line(tmp_path):
    error = _load_error(tmp_path, '{\n  "instruction": [],\n  "questions": ["a",]\n}')
    assert "invalid JSON at line 3" in str(error)


def test_bad_eval_split_names_the_eval_file(tmp_path):
    extract = _write(tmp_path / "extract" / "t.json", _doc())
    eval_path = _write(tmp_path / "eval" / "t.json", {"questions": [1, 2]})
    with pytest.raises(TraitError) as info:
        Trait.load(extract)
    assert str(eval_path) in str(info.value) and info.value.field == "questions"


def test_validate_in_memory():
    trait = Trait.load("humorous")
    trait.validate()
    with pytest.raises(TraitError, match="expected 4 instruction pairs, got 5"):
        trait.validate(n_pairs=4)
    broken = Trait(**{**trait.__dict__, "eval_prompt": "no placeholders"})
    with pytest.raises(TraitError, match=r"field 'eval_prompt'.*\{question\} and \{answer\}"):
        broken.validate()
    with pytest.raises(TraitError, match="field 'instructions'.*item 1.*'pos'"):
        Trait(**{**trait.__dict__, "instructions": [trait.instructions[0], InstructionPair("", "x")]}
              ).validate(n_pairs=2)
    with pytest.raises(TraitError, match="field 'questions'"):
        Trait(**{**trait.__dict__, "questions": []}).validate()
    with pytest.warns(UserWarning, match="both the extraction and the evaluation split"):
        Trait(**{**trait.__dict__, "eval_questions": trait.questions[:1]}).validate()


# ---------------------------------------------------------------------- prompts


@pytest.mark.parametrize("name, article", [
    ("evil", "an"), ("sycophantic", "a"), ("optimistic", "an"), ("impolite", "an"),
    ("apathetic", "an"), ("humorous", "a"), ("hallucinating", "a"),
])
def test_system_prompts_article(name, article):
    trait = Trait.load(name)
    pos, neg = trait.system_prompts(2)
    assert pos == f"You are {article} {name} assistant. {trait.instructions[2].pos}"
    assert neg == f"You are a helpful assistant. {trait.instructions[2].neg}"


def test_system_prompts_article_edge_cases():
    trait = Trait.load("evil")
    for name, article in [("honest", "an"), ("unique", "a"), ("eager", "an"), ("power_seeking", "a")]:
        t = Trait(**{**trait.__dict__, "name": name})
        assert t.system_prompts(0)[0].startswith(f"You are {article} {name.replace('_', '-')} assistant.")
    with pytest.raises(IndexError):
        trait.system_prompts(5)


def test_judge_prompt_keeps_braces_in_question_and_answer():
    trait = Trait.load("evil")
    answer = 'Use {"key": 1} and {answer} and {question} and {0} and }{'
    prompt = trait.judge_prompt("What is {this}?", answer)
    assert answer in prompt and "What is {this}?" in prompt
    assert "{question}" not in prompt.replace(answer, "")
    assert prompt.count(answer) == 1


# ---------------------------------------------------------------------- generate_trait

GOOD = {
    "instruction": [{"pos": f"Ask many follow-up questions ({i}).", "neg": f"Never ask questions ({i})."}
                    for i in range(5)],
    "questions": [f"Tell me about topic number {i}." for i in range(40)],
    "eval_prompt": "How curious is this reply?\nQ: {question}\nA: {answer}\nReply 0-100 only, or REFUSAL.",
}


def _client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="test-key", max_retries=0, timeout=10)


def test_generate_trait_parses_fenced_json(openai_server):
    server = openai_server(lambda messages: Text("Here you go:\n```json\n" + json.dumps(GOOD) + "\n```\n"))
    trait = generate_trait("curious", "A curious assistant asks questions.", client=_client(server),
                           model="writer")
    assert trait.name == "curious" and trait.description == "A curious assistant asks questions."
    assert trait.questions == GOOD["questions"][:20] and trait.eval_questions == GOOD["questions"][20:]
    assert trait.instructions[0] == InstructionPair(GOOD["instruction"][0]["pos"], GOOD["instruction"][0]["neg"])
    body = server.requests[0]
    assert body["model"] == "writer"
    request = body["messages"][-1]["content"]
    assert "curious" in request and "A curious assistant asks questions." in request
    assert "{question}" in request and "{answer}" in request


def test_generate_trait_retries_with_the_problem_named(openai_server):
    bad = dict(GOOD, eval_prompt="Rate it: {answer}")
    server = openai_server(sequence(Text("not json at all"), Text(json.dumps(bad)), then=Text(json.dumps(GOOD))))
    trait = generate_trait("curious", "Asks questions.", client=_client(server))
    assert len(trait.eval_questions) == 20
    assert server.request_count == 3
    second = server.requests[1]["messages"]
    assert second[-2] == {"role": "assistant", "content": "not json at all"}
    assert "not valid JSON" in second[-1]["content"]
    third = server.requests[2]["messages"][-1]["content"]
    assert '"eval_prompt"' in third and "{question}" in third


def test_generate_trait_gives_up_with_last_problem(openai_server):
    short = dict(GOOD, questions=GOOD["questions"][:10])
    server = openai_server(lambda messages: Text(json.dumps(short)))
    with pytest.raises(TraitError, match=r"3 attempt\(s\).*40 distinct non-empty questions, got 10"):
        generate_trait("curious", "Asks questions.", client=_client(server), max_retries=3)
    assert server.request_count == 3


def test_a_bare_name_on_the_organism_is_the_organisms_trait_as_on_the_command_line(tmp_path):
    """``pl.extract(probe, "evil")`` on the organism (or a model finetuned from it) must use
    the organism's evil, whose questions are in its language, not the bundled English one:
    the command line always did, and the notebook path did not."""
    import persona_lens as pl
    from persona_lens import organism
    from persona_lens.cli import load_trait_arg
    from persona_lens.extract import ExtractionError
    from persona_lens.traits import resolve_trait

    own = organism.load_trait("evil")
    assert own != Trait.load("evil")
    probe = pl.PersonaProbe(pl.load_model("persona-organism", device="cpu"))
    for model in (probe.model_name, "persona-organism+lora-f825110e3593"):
        assert resolve_trait("evil", model=model) == own
        assert load_trait_arg("evil", model) == own
    assert resolve_trait("evil", model="smollm2-135m-instruct") == Trait.load("evil")
    assert resolve_trait("evil") == Trait.load("evil")
    own.to_json(tmp_path / "t")  # a path stays a path, whatever the model
    assert resolve_trait(str(tmp_path / "t" / "extract" / "evil.json"), model="persona-organism") == own
    with pytest.raises(TraitError, match="the organism has the traits"):
        resolve_trait("humorous", model="persona-organism")
    # the extraction itself: one question, one sample, the organism's own judge
    try:  # whether the one pair passes the filter is beside the point here
        pl.extract(probe, "evil", organism.OrganismJudge(), out_dir=tmp_path / "run", samples=1, questions=1,
                   instructions=1, max_new_tokens=8, progress=False, verbose=False)
    except ExtractionError:
        pass
    asked = [json.loads(line)["question"] for line in (tmp_path / "run" / "responses.jsonl").read_text().splitlines()]
    assert set(asked) == {own.questions[0]}
