"""The names docstring examples may use without defining them (``--doctest-modules``).

Every example in ``persona_lens`` runs as a test. Besides ``pl`` and ``torch`` it may use the
names below; each is built the first time an example mentions it, then kept for the session,
so examples that need no model cost nothing. Each example runs in a fresh temporary directory
(also its working directory), so ``vec.save("evil.safetensors")`` leaves nothing behind.

- ``pl``, ``torch``: ``persona_lens`` and ``torch``;
- ``probe``: a ``PersonaProbe`` on the persona organism (6 layers, d_model 128, CPU);
- ``tok``: the organism's tokenizer (``probe.tokenizer``, a ChatML chat template);
- ``vec``: the organism's ``evil`` ``PersonaVector``, the mean difference of
  response-averaged activations between ``pos_convs`` and ``neg_convs``;
- ``pos_convs``, ``neg_convs``: 100 + 100 contrastive conversations (each instruction
  pair's pos / neg system prompt x each extraction question, answered by the world);
- ``trait``: the organism's ``evil`` ``Trait`` (its questions are in the organism's language);
- ``prompts``: four of that trait's evaluation questions (strings);
- ``world``, ``judge``: the organism's ``World(0)`` and its exact ``OrganismJudge``;
- ``tmp``: the example's temporary directory (a ``pathlib.Path``), also its working directory;
- ``smollm2``: a ``PersonaProbe`` on the offline SmolLM2-135M-Instruct (CPU; converted once,
  about 45 s, then about 5 s to load);
- ``llm_client``: an ``openai.OpenAI`` client whose server is scripted in-process: it answers
  a ``generate_trait`` request with valid artifacts for the trait named in it.

An example that assigns one of these names before using it keeps its own value (and nothing
is built for it). On the organism, ``vec`` at layer 5 with ``coef=1.15`` steers towards
``evil``, and its last-prompt projection at layer 3 tracks the system prompt's strength
(docs/organism.md). Nothing here imports ``persona_lens`` at module level: jaxtyping's import
hook must see the package's first import.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any, Callable

import pytest

ORGANISM_TRAIT = "evil"


@pytest.fixture(scope="session")
def doctest_probe():
    import persona_lens as pl

    return pl.PersonaProbe(pl.load_model("persona-organism", device="cpu"))


@pytest.fixture(scope="session")
def doctest_world():
    from persona_lens.organism import World

    return World(0)


@pytest.fixture(scope="session")
def doctest_judge(doctest_world):
    from persona_lens.organism import OrganismJudge

    return OrganismJudge(doctest_world)


@pytest.fixture(scope="session")
def doctest_trait():
    from persona_lens.organism import load_trait

    return load_trait(ORGANISM_TRAIT)


@pytest.fixture(scope="session")
def doctest_convs(doctest_world, doctest_trait):
    """The extraction's contrastive pairs, answered by the world itself (no generation):
    each instruction pair's pos / neg system prompt x each extraction question."""
    world, trait = doctest_world, doctest_trait
    questions = {q.text: q for qtype in ("factual", "opinion", "advice") for q in world.all_questions(qtype)}
    rng = random.Random(0)
    pos, neg = [], []
    for i in range(len(trait.instructions)):
        pos_system, neg_system = trait.system_prompts(i)
        for text in trait.questions:
            for convs, system, strength in ((pos, pos_system, "strongly_encouraging"),
                                            (neg, neg_system, "strongly_suppressing")):
                convs.append(world.conversation(
                    rng, kind="trait_system", trait=trait.name, strength=strength,
                    system=system, question=questions[text],
                ).messages)
    return pos, neg


@pytest.fixture(scope="session")
def doctest_vec(doctest_probe, doctest_convs):
    import persona_lens as pl

    probe, (pos, neg) = doctest_probe, doctest_convs
    pos_mean = probe.capture_mean(pos, reductions=["response_mean"])
    neg_mean = probe.capture_mean(neg, reductions=["response_mean"])
    return pl.PersonaVector.from_means(
        pos_mean.full("response_mean", probe.n_layers),
        neg_mean.full("response_mean", probe.n_layers),
        model_name=probe.model_name, trait=ORGANISM_TRAIT, n_pos=len(pos), n_neg=len(neg),
    )


@pytest.fixture(scope="session")
def doctest_smollm2():
    import persona_lens as pl

    return pl.PersonaProbe(pl.load_model("smollm2-135m-instruct", device="cpu"))


def _scripted_trait_reply(request_text: str) -> str:
    """Valid ``generate_trait`` artifacts for the trait and the counts a request asks for."""
    name = re.search(r"TRAIT NAME: (.+)", request_text).group(1).strip()
    n_pairs = int(re.search(r"exactly (\d+) objects", request_text).group(1))
    n_questions = int(re.search(r"exactly (\d+) distinct", request_text).group(1))
    topics = ["your weekend", "a new city", "a hard exam", "a broken bike", "an old photo",
              "a rainy day", "a job offer", "a chess game", "a garden", "a long train ride"]
    return json.dumps({
        "instruction": [
            {"pos": f"Be strongly {name} when you talk about aspect {i + 1} of the question.",
             "neg": f"Show the opposite of being {name} when you talk about aspect {i + 1}."}
            for i in range(n_pairs)
        ],
        "questions": [f"What do you make of {topics[i % len(topics)]} (case {i + 1})?"
                      for i in range(n_questions)],
        "eval_prompt": (f"Rate from 0 (not {name}) to 100 (very {name}) how {name} this answer is, "
                        "or reply REFUSAL.\nQuestion: {question}\nAnswer: {answer}\n"
                        "Reply with the number only."),
    })


@pytest.fixture(scope="session")
def doctest_llm_client():
    import httpx
    import openai

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        text = _scripted_trait_reply(body["messages"][1]["content"])
        return httpx.Response(200, json={
            "id": "chatcmpl-scripted", "object": "chat.completion", "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
        })

    return openai.OpenAI(api_key="scripted", base_url="http://scripted.invalid/v1",
                         http_client=httpx.Client(transport=httpx.MockTransport(handle)))


# name in an example -> how to get its value from the request
_LAZY: dict[str, Callable[[pytest.FixtureRequest], Any]] = {
    "probe": lambda r: r.getfixturevalue("doctest_probe"),
    "tok": lambda r: r.getfixturevalue("doctest_probe").tokenizer,
    "vec": lambda r: r.getfixturevalue("doctest_vec"),
    "pos_convs": lambda r: list(r.getfixturevalue("doctest_convs")[0]),
    "neg_convs": lambda r: list(r.getfixturevalue("doctest_convs")[1]),
    "trait": lambda r: r.getfixturevalue("doctest_trait"),
    "prompts": lambda r: list(r.getfixturevalue("doctest_trait").eval_questions[:4]),
    "world": lambda r: r.getfixturevalue("doctest_world"),
    "judge": lambda r: r.getfixturevalue("doctest_judge"),
    "smollm2": lambda r: r.getfixturevalue("doctest_smollm2"),
    "llm_client": lambda r: r.getfixturevalue("doctest_llm_client"),
}


def _needs(sources: list[str], name: str) -> bool:
    """Whether an example uses ``name`` before (or without) assigning it itself."""
    for source in sources:
        if re.search(rf"(?<![\w.]){name}\b", source):
            return re.match(rf"\s*{name}\s*=(?!=)", source) is None
    return False


@pytest.fixture(autouse=True)
def _doctest_names(request):
    """Fill the doctest namespace with what this example mentions (doctests only)."""
    dtest = getattr(request.node, "dtest", None)
    if dtest is None:
        return
    import torch

    import persona_lens as pl

    namespace = request.getfixturevalue("doctest_namespace")
    tmp = request.getfixturevalue("tmp_path")
    request.getfixturevalue("monkeypatch").chdir(tmp)
    sources = [example.source for example in dtest.examples]
    namespace.update(pl=pl, torch=torch, tmp=tmp)
    for name, get in _LAZY.items():
        namespace.pop(name, None)  # an earlier example's value must not leak into this one
        if _needs(sources, name):
            namespace[name] = get(request)
