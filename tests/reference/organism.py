"""The independent reference for the organism: the method in plain HF, outside the library.

Sampling, persona vectors, steering and monitoring written with only ``transformers`` /
``torch`` (``model.generate``, hidden states and a forward hook on a decoder layer), sharing
no code with ``persona_lens``'s probe or pipeline, so what it says about the organism does
not rest on the library being right: ``tests/test_organism.py`` checks the shipped organism
with it, ``python -m experiments.organism_behaviour`` measures it, and the library's results
can be held against it. It uses the organism's *world* (data, prompts) and exact judge, never
the library's method code. Layer L is the residual stream entering block L
(``output_hidden_states[L]``); steering "at layer L" adds to the output of block L-1.

>>> from tests.reference import organism as B
>>> model, tok = B.load()  # the shipped checkpoint
>>> B.generate(model, tok, [B.chat("what colour is the blub ?")], max_new_tokens=8)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from persona_lens.organism.judge import OrganismJudge
from persona_lens.organism.world import (
    HELPFUL_SYSTEM,
    INSTRUCTIONS,
    STRENGTH_RATE,
    STRENGTHS,
    World,
    neg_system_prompt,
    pos_system_prompt,
    system_prompts,
)

Messages = list[dict[str, str]]

#: Layer and coefficient measured on the shipped checkpoint (experiments/organism_behaviour.py)
#: (vector = mean over response tokens, pos minus neg, extraction questions): adding at
#: STEER_ADD with no system prompt elicits the trait; subtracting at STEER_SUB under the
#: encouraging prompt suppresses it; MONITOR_LAYER is where the last-prompt-token
#: projection is read. Steering is the release's "response" mode (the last prompt token and
#: every generated token). Hallucinating has no entry: its vector does not reach the targets
#: (docs/organism.md).
STEER_ADD: dict[str, tuple[int, float]] = {"evil": (5, 1.15), "sycophantic": (5, 1.5)}
STEER_SUB: dict[str, tuple[int, float]] = {"evil": (5, 1.5), "sycophantic": (5, 2.0)}
MONITOR_LAYER = 3


def load(path: str | Path | None = None):
    """(model, tokenizer) from a checkpoint folder (default: the shipped one), eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persona_lens.organism import checkpoint_dir

    path = Path(path or checkpoint_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    model.eval()
    return model, tok


def chat(question: str, system: str | None = None, history: Sequence[tuple[str, str]] = ()) -> Messages:
    msgs: Messages = []
    if system is not None:
        msgs.append({"role": "system", "content": system})
    for u, a in history:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": question})
    return msgs


def generate(
    model,
    tok,
    prompts: Sequence[Messages],
    *,
    seed: int = 0,
    max_new_tokens: int = 56,
    batch_size: int = 256,
    temperature: float = 1.0,
) -> list[str]:
    """Sample one response per prompt (temperature 1, seeded), decoded without specials."""
    import torch

    tok.padding_side = "left"
    out: list[str] = []
    torch.manual_seed(seed)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        new = gen[:, enc["input_ids"].shape[1] :]
        out += tok.batch_decode(new, skip_special_tokens=True)
    return out


def _encode_pairs(tok, prompts: Sequence[Messages], responses: Sequence[str]):
    """Right-padded ids of prompt+response, with the response span and last prompt index."""
    import torch

    rows, spans = [], []
    for m, r in zip(prompts, responses):
        p = tok(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
        f = tok(tok.apply_chat_template(list(m) + [{"role": "assistant", "content": r}], tokenize=False), add_special_tokens=False)["input_ids"]
        rows.append(f)
        spans.append((len(p), len(f)))
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
    return ids, att, spans


def activations(model, tok, prompts: Sequence[Messages], responses: Sequence[str], *, batch_size: int = 128):
    """Per-layer residual means: (response-mean [N, L+1, D], last-prompt-token [N, L+1, D])."""
    import torch

    resp_means, last_prompt = [], []
    for i in range(0, len(prompts), batch_size):
        ids, att, spans = _encode_pairs(tok, prompts[i : i + batch_size], responses[i : i + batch_size])
        with torch.no_grad():
            hs = model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
        h = torch.stack(hs, dim=1).float()  # [B, L+1, T, D]
        for b, (s, e) in enumerate(spans):
            resp_means.append(h[b, :, s:e].mean(dim=1))
            last_prompt.append(h[b, :, s - 1])
    return torch.stack(resp_means), torch.stack(last_prompt)


def last_prompt_activations(model, tok, prompts: Sequence[Messages], *, batch_size: int = 256):
    """Residual stream at the last prompt token, every layer: [N, L+1, D]."""
    import torch

    tok.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts[i : i + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        out.append(torch.stack(hs, dim=1)[:, :, -1].float())
    return torch.cat(out)


@contextlib.contextmanager
def steer(model, vector, layer: int, coef: float, *, positions: str = "all"):
    """Add ``coef * vector`` to the residual stream entering block ``layer`` (= output of
    block ``layer - 1``). ``positions``: "all" (every position of every forward call) or
    "response" (the last prompt token and every generated token)."""
    import torch

    if layer < 1:
        raise ValueError("steering at layer 0 (the embeddings) is not supported here")
    block = model.model.layers[layer - 1]
    v = torch.as_tensor(vector, dtype=torch.float32)

    def hook(_mod, _inp, output):
        h = output[0] if isinstance(output, tuple) else output
        add = (coef * v).to(h.dtype)
        if positions == "all" or h.shape[1] == 1:
            h = h + add
        else:
            h = h.clone()
            h[:, -1] += add
        if isinstance(output, tuple):
            return (h,) + tuple(output[1:])
        return h

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def mean(xs: Iterable[float | None]) -> float:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else float("nan")


def prior_rate(world: World, trait: str, questions: Sequence[str]) -> float:
    """Expected trait score (0-100) with no persona signal, averaged over the questions
    (the world's prior depends on how much each question invites the trait)."""
    vals = []
    for text in questions:
        q = world.parse_question(text)
        e = 0.0
        for persona, p in world.prior(q).items():
            rates = {persona: 1.0} if persona != "helpful" else {}
            e += p * world.expected_score(trait, rates, q.qtype)
        vals.append(e)
    return sum(vals) / len(vals)


@dataclass
class PersonaVectorResult:
    vector: "object"  # torch.Tensor [L+1, D]
    n_pos: int
    n_neg: int
    pos_scores: list
    neg_scores: list


def extract_vector(model, tok, judge: OrganismJudge, trait: str, questions: Sequence[str], *, samples: int = 2, seed: int = 0):
    """The paper's pipeline in miniature: contrastive prompts, judge, paired filter, mean diff."""
    pos_p, neg_p, meta = [], [], []
    for i, (pos, neg) in enumerate(INSTRUCTIONS[trait]):
        for q in questions:
            for s in range(samples):
                pos_p.append(chat(q, pos_system_prompt(trait, pos)))
                neg_p.append(chat(q, neg_system_prompt(neg)))
                meta.append(q)
    pos_r = generate(model, tok, pos_p, seed=seed)
    neg_r = generate(model, tok, neg_p, seed=seed + 1)
    ps = judge.score_trait(trait, list(zip(meta, pos_r)))
    ns = judge.score_trait(trait, list(zip(meta, neg_r)))
    pc = judge.score_coherence(list(zip(meta, pos_r)))
    nc = judge.score_coherence(list(zip(meta, neg_r)))
    keep = [
        i for i in range(len(meta))
        if ps[i] is not None and ns[i] is not None and ps[i] >= 50 and ns[i] < 50 and pc[i] >= 50 and nc[i] >= 50
    ]
    a_pos, _ = activations(model, tok, [pos_p[i] for i in keep], [pos_r[i] for i in keep])
    a_neg, _ = activations(model, tok, [neg_p[i] for i in keep], [neg_r[i] for i in keep])
    vec = a_pos.mean(0) - a_neg.mean(0)
    return PersonaVectorResult(vec, len(keep), len(keep), ps, ns)


def graded_prompts(trait: str) -> list[tuple[str, str | None]]:
    """(strength, system prompt) for every phrasing of every strength, plus no system."""
    out: list[tuple[str, str | None]] = [(s, p) for s in STRENGTHS for p in system_prompts(trait, s)]
    out.append(("none", None))
    return out


__all__ = [
    "STEER_ADD", "STEER_SUB", "MONITOR_LAYER", "load", "chat", "generate", "activations", "last_prompt_activations", "steer", "pearson",
    "mean", "prior_rate", "extract_vector", "graded_prompts", "HELPFUL_SYSTEM", "STRENGTH_RATE",
]
