"""The extraction pipeline and the layer sweep on a tiny random model (fast, CPU).

A tiny random model writes gibberish, so the judges here score by a rule: a deterministic
hash of the answer. That is enough to exercise the mechanics: generation, judging, the
paired filter, vectors, resuming, and error handling.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

import persona_lens as pl
from persona_lens.extract import REDUCTIONS, ExtractionError, Thresholds, extract
from persona_lens.judge import JudgeError, OpenAIJudge
from persona_lens.pipeline_io import JsonlLog
from persona_lens.sweep import SweepCell, SweepResult, sweep
from persona_lens.traits import InstructionPair, Trait

from .conftest import load_tiny
from .support.openai_server import Sleep, Text, keyword_rule, openai_server, peaked  # noqa: F401 (fixture)

FAST = dict(samples=2, max_new_tokens=6, batch_size=4, progress=False, verbose=False)


def hash_score(text: str) -> float:
    return float(int(hashlib.sha256(text.encode()).hexdigest(), 16) % 101)


class RuleJudge:
    """Trait score = a hash of the answer; coherence = a constant. Counts what it is asked."""

    name = "rule-judge"

    def __init__(self, coherence: float = 90.0, trait_score=hash_score):
        self.coherence = coherence
        self.trait_score = trait_score
        self.asked: list[tuple[str, str, str]] = []

    def score_trait(self, trait, pairs):
        self.asked += [("trait", q, a) for q, a in pairs]
        return [self.trait_score(a) for _, a in pairs]

    def score_coherence(self, pairs):
        self.asked += [("coherence", q, a) for q, a in pairs]
        return [self.coherence for _ in pairs]


def make_trait(name: str = "zesty", n_pairs: int = 2, n_questions: int = 3) -> Trait:
    return Trait(
        name=name,
        description="A zesty assistant answers with lively, exaggerated enthusiasm.",
        instructions=[InstructionPair(f"Be very zesty, style {i}.", f"Be flat and dull, style {i}.")
                      for i in range(n_pairs)],
        questions=[f"Question number {i}: what do you think of apples?" for i in range(n_questions)],
        eval_questions=["How was your day?", "Describe a chair."],
        eval_prompt="Rate the zest of this reply 0-100.\nQ: {question}\nA: {answer}\nNumber only:",
    )


@pytest.fixture(scope="module")
def tiny_probe(tiny_dirs):
    return pl.PersonaProbe(load_tiny(tiny_dirs["llama"])), tiny_dirs["llama"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------ the vector itself


def test_vector_equals_independent_hf_mean_difference(tiny_probe, tmp_path):
    """Pipeline vectors == mean differences computed here from HF output_hidden_states of the
    kept responses (kept set recomputed here from the judge's rule)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    probe, path = tiny_probe
    trait = make_trait()
    th = Thresholds(pos_trait=40, neg_trait=60, coherence=50)
    res = extract(probe, trait, RuleJudge(), out_dir=tmp_path, thresholds=th, **FAST)

    # Independent filter from the files and the rule.
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "responses.jsonl")}
    assert len(recs) == 2 * 2 * 3 * 2
    kept = []
    for rid, r in recs.items():
        if r["polarity"] != "pos":
            continue
        neg = recs[rid.replace("pos-", "neg-", 1)]
        assert (neg["instruction"], neg["question_index"], neg["sample"]) == (
            r["instruction"], r["question_index"], r["sample"])
        if hash_score(r["answer"]) >= 40 and hash_score(neg["answer"]) < 60:
            kept.append((r, neg))
    assert 0 < len(kept) < 12, "the rule should keep some pairs and drop others"
    assert sorted(p.pos.id for p in res.kept) == sorted(r["id"] for r, _ in kept)
    assert res.stats.kept == len(kept) and res.stats.pairs == 12

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    n_layers = hf.config.num_hidden_layers
    last_block: dict[str, torch.Tensor] = {}
    handle = hf.model.layers[-1].register_forward_hook(
        lambda m, a, out: last_block.__setitem__("h", out[0] if isinstance(out, tuple) else out))

    def reductions(rec):
        conv = [{"role": "system", "content": rec["system"]}, {"role": "user", "content": rec["question"]}]
        text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        p = tok(text, add_special_tokens=False)["input_ids"]
        r = tok(rec["answer"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hs = hf(torch.tensor([p + r]), output_hidden_states=True).hidden_states
        # hidden_states[n_layers] is after the final norm; layer n_layers is before it.
        layers = [hs[l][0] for l in range(n_layers)] + [last_block["h"][0]]
        h = torch.stack(layers)  # [n_layers + 1, seq, d]
        return {
            "response_mean": h[:, len(p):].mean(1) if r else None,
            "prompt_mean": h[:, : len(p)].mean(1),
            "last_prompt": h[:, len(p) - 1],
        }

    try:
        per = {pol: [reductions(pair[j]) for pair in kept] for j, pol in enumerate(("pos", "neg"))}
    finally:
        handle.remove()
    for red in REDUCTIONS:
        means = {}
        for pol in ("pos", "neg"):
            xs = [x[red] for x in per[pol] if x[red] is not None]
            means[pol] = torch.stack(xs).mean(0)
        expected = means["pos"] - means["neg"]
        v = res.vectors[red]
        assert v.directions.shape == (n_layers + 1, probe.d_model)
        torch.testing.assert_close(v.directions, expected, atol=2e-4, rtol=1e-4)
        assert v.position == red and v.trait == "zesty"
        loaded = pl.PersonaVector.load(res.vector_paths[red])
        torch.testing.assert_close(loaded.directions, v.directions)
    v = res.vector
    assert v is res.vectors["response_mean"]
    assert v.notes["judge"] == "rule-judge"
    assert v.notes["thresholds"] == {"pos_trait": 40, "neg_trait": 60, "coherence": 50}
    assert v.notes["kept_pairs"] == len(kept)
    assert v.n_neg == sum(x["response_mean"] is not None for x in per["neg"])


def test_outputs_and_rerun_reuse_everything(tiny_probe, tmp_path):
    probe, _ = tiny_probe
    trait = make_trait()
    judge = RuleJudge()
    res = extract(probe, trait, judge, out_dir=tmp_path, thresholds={"pos_trait": 40, "neg_trait": 60}, **FAST)
    n = 2 * 3 * 2 * 2
    assert (res.stats.generated, res.stats.reused, res.stats.judged) == (n, 0, 2 * n)
    assert len(judge.asked) == 2 * n
    for name in ("responses.jsonl", "scores.jsonl", "pairs.csv", "run.json", "summary.json"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "trait" / "extract" / "zesty.json").exists()
    rec = read_jsonl(tmp_path / "responses.jsonl")[0]
    for key in ("id", "polarity", "instruction", "question_index", "sample", "system", "question",
                "answer", "model", "settings"):
        assert key in rec
    assert rec["settings"] == {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "seed": 0}
    assert rec["system"] == trait.system_prompts(rec["instruction"])[0 if rec["polarity"] == "pos" else 1]
    assert "zesty" in res.summary() and "kept" in res.summary()

    judge2 = RuleJudge()
    res2 = extract(probe, trait, judge2, out_dir=tmp_path, thresholds={"pos_trait": 40, "neg_trait": 60}, **FAST)
    # the rerun reads back every score the first run asked for, counted the same way
    assert (res2.stats.generated, res2.stats.reused, res2.stats.judged, res2.stats.judge_reused) == \
        (0, n, 0, res.stats.judged)
    assert 0 < res.stats.judged <= 2 * n
    assert judge2.asked == []
    assert res2.stats.vectors_reused
    torch.testing.assert_close(res2.vector.directions, res.vector.directions)
    # other thresholds that keep the same pairs: the same numbers, this run's provenance
    res2b = extract(probe, trait, judge2, out_dir=tmp_path, thresholds={"pos_trait": 39, "neg_trait": 61}, **FAST)
    assert res2b.stats.vectors_reused and res2b.stats.kept == res2.stats.kept
    saved = pl.PersonaVector.load(res2b.vector_paths["response_mean"])
    assert saved.notes["thresholds"]["pos_trait"] == 39 and res2b.vector.notes["thresholds"]["neg_trait"] == 61

    # More samples: the old ones are reused, only the new ones generated and judged.
    res3 = extract(probe, trait, judge2, out_dir=tmp_path, thresholds={"pos_trait": 40, "neg_trait": 60},
                   **dict(FAST, samples=3))
    assert (res3.stats.generated, res3.stats.reused) == (n // 2, n)
    assert len(judge2.asked) == n  # 12 new responses x (trait, coherence)
    assert not res3.stats.vectors_reused

    # A changed setting makes old records stale: they are regenerated, not silently reused.
    res4 = extract(probe, trait, None, out_dir=tmp_path, **dict(FAST, max_new_tokens=5, samples=1))
    assert res4.stats.generated == res4.stats.responses == 2 * 3 * 2
    assert res4.stats.stale == res4.stats.responses


def test_killed_run_resumes_without_redoing_work(tiny_probe, tmp_path, monkeypatch):
    probe, _ = tiny_probe
    trait = make_trait()
    calls = {"n": 0}
    real = probe.generate

    def dies_after_first_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(probe, "generate", dies_after_first_batch)
    with pytest.raises(RuntimeError, match="killed"):
        extract(probe, trait, None, out_dir=tmp_path / "a", **FAST)
    assert len(read_jsonl(tmp_path / "a" / "responses.jsonl")) == 4  # one batch
    monkeypatch.setattr(probe, "generate", real)

    res = extract(probe, trait, None, out_dir=tmp_path / "a", **FAST)
    assert (res.stats.generated, res.stats.reused) == (24 - 4, 4)
    assert len(read_jsonl(tmp_path / "a" / "responses.jsonl")) == 24  # nothing generated twice

    # Same texts as an uninterrupted run: batch seeds do not depend on where a run stopped.
    whole = extract(probe, trait, None, out_dir=tmp_path / "b", **FAST)
    a = {r["id"]: r["answer"] for r in read_jsonl(tmp_path / "a" / "responses.jsonl")}
    b = {r["id"]: r["answer"] for r in read_jsonl(tmp_path / "b" / "responses.jsonl")}
    assert a == b
    torch.testing.assert_close(res.vector.directions, whole.vector.directions)
    # judge=None keeps every pair and says so.
    assert res.stats.kept == res.stats.pairs == 12
    assert res.vector.notes["judge"] is None
    assert "plain contrastive mean difference" in res.vector.notes["filter"]


def test_truncated_line_from_a_kill_is_redone(tiny_probe, tmp_path):
    probe, _ = tiny_probe
    trait = make_trait(n_pairs=1, n_questions=2)
    extract(probe, trait, None, out_dir=tmp_path, **FAST)
    path = tmp_path / "responses.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # cut mid-write
    with pytest.warns(UserWarning, match="unreadable"):
        res = extract(probe, trait, None, out_dir=tmp_path, **FAST)
    assert res.stats.generated == 1
    with pytest.warns(UserWarning, match="unreadable"):  # the broken line stays, harmlessly
        assert len(JsonlLog(path).read()) == len(lines)


def test_extraction_split_in_shards_then_finished_equals_one_run(tiny_probe, tmp_path):
    """Three shards (each its own log, none seeing the others' work), then one run without a
    shard: the responses, the pairs and the vectors of a run that was never split."""
    probe, _ = tiny_probe
    trait = make_trait()
    kw = dict(thresholds={"pos_trait": 40, "neg_trait": 60}, **FAST)
    one = extract(probe, trait, RuleJudge(), out_dir=tmp_path / "one", **kw)
    shards = [extract(probe, trait, RuleJudge(), out_dir=tmp_path / "split", shard=(i, 3), **kw) for i in range(3)]
    # 24 responses in batches of 4: batches 0 and 3 are shard 0's, 1 and 4 shard 1's, 2 and 5 shard 2's.
    assert [s.generated for s in shards] == [8, 8, 8]
    assert not (tmp_path / "split" / "vectors").exists() and not (tmp_path / "split" / "scores.jsonl").exists()
    judge = RuleJudge()
    split = extract(probe, trait, judge, out_dir=tmp_path / "split", **kw)
    assert (split.stats.generated, split.stats.reused, split.stats.judged) == (0, 24, len(judge.asked))
    by_id = lambda paths: {r["id"]: r for p in paths for r in read_jsonl(p)}
    assert by_id((tmp_path / "split").glob("responses.shard-*-of-3.jsonl")) == by_id([tmp_path / "one" / "responses.jsonl"])
    assert (tmp_path / "split" / "pairs.csv").read_text() == (tmp_path / "one" / "pairs.csv").read_text()
    assert 0 < split.stats.kept < split.stats.pairs
    from persona_lens.extract import iter_responses

    assert {r.id: r.answer for r in iter_responses(split.responses_path)} == {
        r.id: r.answer for r in iter_responses(one.responses_path)}
    for r in REDUCTIONS:
        assert torch.equal(split.vectors[r].directions, one.vectors[r].directions), r


def test_no_pair_survives_says_why_and_keeps_work(tiny_probe, tmp_path):
    probe, _ = tiny_probe
    trait = make_trait(n_pairs=1, n_questions=2)
    judge = RuleJudge(coherence=30.0)
    with pytest.raises(ExtractionError) as e:
        extract(probe, trait, judge, out_dir=tmp_path, **FAST)
    msg = str(e.value)
    assert "8 responses generated" in msg and "4 pairs" in msg
    assert "pos coherence >= 50 failed 4" in msg and "neg coherence >= 50 failed 4" in msg
    assert (tmp_path / "pairs.csv").exists()
    judge2 = RuleJudge(coherence=90.0)
    # Scores are keyed by judge name: the same name means the stored coherence is reused.
    with pytest.raises(ExtractionError):
        extract(probe, trait, judge2, out_dir=tmp_path, **FAST)
    assert judge2.asked == []


# ------------------------------------------------------------------------ an HTTP judge


def test_judge_timeout_then_resume(tiny_probe, tmp_path, openai_server):
    probe, _ = tiny_probe
    trait = make_trait(n_pairs=1, n_questions=2)
    state = {"answered": 0, "healthy": False}
    ok = keyword_rule({}, default=70, coherence=90)

    def rule(messages):
        if not state["healthy"] and state["answered"] >= 6:
            return Sleep(3, then=peaked(70))
        state["answered"] += 1
        return ok(messages)

    server = openai_server(rule)
    judge = OpenAIJudge("fake", base_url=server.base_url, api_key="x", cache_dir=False, timeout=0.5,
                        max_retries=1, max_concurrency=2, progress=False)
    with pytest.raises(JudgeError, match="timed out"):
        extract(probe, trait, judge, out_dir=tmp_path, judge_batch_size=2, **FAST)
    saved = len(read_jsonl(tmp_path / "scores.jsonl"))
    assert 0 < saved < 16
    assert len(read_jsonl(tmp_path / "responses.jsonl")) == 8

    state["healthy"] = True
    before = server.request_count
    # A fresh judge object without a cache: only scores.jsonl remembers what was done.
    judge = OpenAIJudge("fake", base_url=server.base_url, api_key="x", cache_dir=False, progress=False)
    res = extract(probe, trait, judge, out_dir=tmp_path, judge_batch_size=2,
                  thresholds={"neg_trait": 80}, **FAST)
    assert res.stats.generated == 0
    assert res.stats.judged == 16 - saved == server.request_count - before
    assert res.stats.kept == 4


def test_judge_answering_text_is_a_clear_error(tiny_probe, tmp_path, openai_server):
    probe, _ = tiny_probe
    trait = make_trait(n_pairs=1, n_questions=1)
    server = openai_server(lambda messages: Text("This reply seems quite zesty to me."))
    judge = OpenAIJudge("fake", base_url=server.base_url, api_key="x", cache_dir=False, progress=False)
    with pytest.raises(JudgeError, match="gave no number"):
        extract(probe, trait, judge, out_dir=tmp_path, **FAST)
    assert len(read_jsonl(tmp_path / "responses.jsonl")) == 4
    assert not (tmp_path / "scores.jsonl").exists()  # nothing wrong was stored


# ------------------------------------------------------------------------ the sweep


def test_sweep_table_best_layer_files_and_cache(tiny_probe, tmp_path):
    probe, _ = tiny_probe
    trait = make_trait()
    res = extract(probe, trait, None, out_dir=tmp_path / "x", **dict(FAST, samples=1))
    judge = RuleJudge()
    kw = dict(layers=[1, 2], coefs=[0, 2.0, 4.0], judge=judge, max_new_tokens=5, samples=2,
              out_dir=tmp_path / "sweep", progress=False)
    sw = sweep(probe, res.vector, trait, **kw)
    assert [(c.layer, c.coef) for c in sw.cells] == [(1, 0.0), (1, 2.0), (1, 4.0), (2, 0.0), (2, 2.0), (2, 4.0)]
    # The coef-0 baseline is generated once and shared by both layers.
    assert sw.cell(1, 0).trait == sw.cell(2, 0).trait
    # the grid (a shared baseline and 2 x 2 steered cells), then the chosen cell and the
    # baseline again on fresh samples
    assert sw.stats["generated"] == 2 * 2 * (1 + 2 * 2) + 2 * 2 * 2
    for c in sw.cells:
        assert c.n == 4 and c.n_trait == 4 and c.coherence == 90.0
    steered = [c for c in sw.cells if c.coef != 0]
    assert sw.best_layer == max(steered, key=lambda c: c.trait).layer
    csv_text = (tmp_path / "sweep" / "sweep.csv").read_text()
    assert csv_text.splitlines()[0].startswith("layer,coef,trait,coherence")
    assert len(csv_text.splitlines()) == 7
    assert "plotly" in (tmp_path / "sweep" / "sweep.html").read_text()
    fig = sw.figure()
    assert len(fig.data) == 4  # (trait, coherence) x 2 layers
    assert list(fig.data[0].x) == [0.0, 2.0, 4.0]

    judge.asked.clear()
    sw2 = sweep(probe, res.vector, trait, **kw)
    assert sw2.stats["generated"] == 0 and judge.asked == []
    assert sw2.rows() == sw.rows()

    # Steering changes the answers (a different vector or coef is not served from the cache).
    sw3 = sweep(probe, 3.0 * res.vector, trait, **dict(kw, coefs=[0, 2.0]))
    assert sw3.stats["generated"] == 2 * 2 * 2 + 2 * 2  # baselines reused; two steered cells and the held-out one new


def test_sweep_reports_the_chosen_cell_on_answers_not_used_to_choose_it(tiny_probe, tmp_path):
    """With a judge whose scores are noise (a hash of the answer), the grid's best cell is the
    maximum of noisy means: high on its own answers. The held-out figure is recomputed here
    from the stored answers that the grid never saw and the judge's formula."""
    probe, _ = tiny_probe
    trait = make_trait()
    vec = extract(probe, trait, None, out_dir=tmp_path / "x", **dict(FAST, samples=1)).vector
    sw = sweep(probe, vec, trait, layers=[1, 2, 3], coefs=[0, 1.0, 2.0, 3.0], judge=RuleJudge(), samples=2,
               max_new_tokens=5, heldout_samples=4, out_dir=tmp_path / "sweep", progress=False)
    steered = [c for c in sw.cells if c.coef != 0]
    assert sw.chosen is sw.best and sw.chosen.trait == max(c.trait for c in steered)
    h = sw.heldout
    assert (h.layer, h.coef, h.n) == (sw.chosen.layer, sw.chosen.coef, 2 * 4)
    records = read_jsonl(tmp_path / "sweep" / "sweep_responses.jsonl")
    held = [r for r in records if r.get("heldout") and r["coef"] == h.coef]
    assert sorted({r["sample"] for r in held}) == [2, 3, 4, 5]  # none of the grid's samples 0-1
    assert h.trait == pytest.approx(sum(hash_score(r["answer"]) for r in held) / len(held))
    base = [r for r in records if r.get("heldout") and r["coef"] == 0]
    assert sw.heldout_baseline.trait == pytest.approx(sum(hash_score(r["answer"]) for r in base) / len(base))
    assert h.trait < sw.chosen.trait  # the selection effect the held-out figure removes
    assert "held-out (4 fresh sample(s) of each of the 2 questions)" in sw.table()
    assert sw.summary()["heldout"]["trait"] == h.trait
    assert "held-out" in (tmp_path / "sweep" / "sweep.html").read_text()

    # A question split: chosen on the first question, re-measured on the other; suppression
    # chooses the lowest cell.
    low = sweep(probe, vec, trait, layers=[1, 2], coefs=[0, -1.0, -2.0], judge=RuleJudge(), questions=1,
                heldout=1, choose="lowest", max_new_tokens=5, progress=False)
    assert low.chosen is low.lowest and low.heldout.coef == low.lowest.coef
    assert low.heldout_how.startswith("1 other question")
    with pytest.raises(ValueError, match="heldout"):
        sweep(probe, vec, trait, layers=[1], coefs=[0, 1.0], judge=RuleJudge(), questions=2, heldout=1,
              max_new_tokens=5, progress=False)
    none = sweep(probe, vec, trait, layers=[1], coefs=[0, 1.0], judge=RuleJudge(), heldout=None, max_new_tokens=5,
                 progress=False)
    assert none.heldout is None and none.heldout_baseline is None and none.stats["generated"] == 2 * 2
    # a grid of the second question: the held-out count takes the first, never a grid question
    second = sweep(probe, vec, trait, layers=[1], coefs=[0, 1.0], judge=RuleJudge(), max_new_tokens=5,
                   questions=[trait.eval_questions[1]], heldout=1, out_dir=tmp_path / "second", progress=False)
    held = [r for r in read_jsonl(tmp_path / "second" / "sweep_responses.jsonl") if r.get("heldout")]
    assert held and {r["question"] for r in held} == {trait.eval_questions[0]}, held[:1]
    assert second.heldout.n == 1
    # greedy decoding repeats the grid's answers: fresh samples would hold nothing out
    with pytest.raises(ValueError, match="temperature 0"):
        sweep(probe, vec, trait, layers=[1], coefs=[0, 1.0], judge=RuleJudge(), temperature=0.0, progress=False)
    greedy = sweep(probe, vec, trait, layers=[1], coefs=[0, 1.0], judge=RuleJudge(), temperature=0.0, questions=1,
                   heldout=1, max_new_tokens=5, progress=False)
    assert greedy.heldout is not None
    with pytest.raises(ValueError, match="at most 2"):
        sweep(probe, vec, trait, layers=[1], coefs=[0, 1.0], judge=RuleJudge(), questions=5, progress=False)
    with pytest.raises(ValueError, match="given twice"):
        sweep(probe, vec, trait, layers=[1], coefs=[0, 1.0, 1.0], judge=RuleJudge(), progress=False)


def test_sweep_split_in_shards_then_finished_equals_one_run(tiny_probe, tmp_path):
    probe, _ = tiny_probe
    trait = make_trait()
    vec = extract(probe, trait, None, out_dir=tmp_path / "x", **dict(FAST, samples=1)).vector
    kw = dict(layers=[1, 2], coefs=[0, 2.0, 4.0], samples=2, max_new_tokens=5, batch_size=2, progress=False)
    one = sweep(probe, vec, trait, judge=RuleJudge(), out_dir=tmp_path / "one", **kw)
    shards = [sweep(probe, vec, trait, judge=RuleJudge(), out_dir=tmp_path / "split", shard=(i, 2), **kw)
              for i in range(2)]
    # Five distinct cells (one shared baseline) of 4 answers, in batches of 2 per cell: ten
    # batches; shard 1 ran after shard 0 here, so nothing was left to another shard.
    assert [(s["generated"], s["pending"]) for s in shards] == [(10, 10), (10, 0)]
    assert not (tmp_path / "split" / "sweep.csv").exists()
    split = sweep(probe, vec, trait, judge=RuleJudge(), out_dir=tmp_path / "split", **kw)
    assert split.stats["reused"] == 20 and split.stats["generated"] == one.stats["generated"] - 20  # the held-out cells
    assert split.rows() == one.rows() and split.summary() == one.summary()
    assert (tmp_path / "split" / "sweep.csv").read_text() == (tmp_path / "one" / "sweep.csv").read_text()
    with pytest.raises(ValueError, match="needs out_dir"):
        sweep(probe, vec, trait, judge=RuleJudge(), shard=(0, 2), **kw)


def test_best_layer_respects_coherence_floor():
    cells = [
        SweepCell(10, 0.0, 5.0, 95.0, 4, 4, 4),
        SweepCell(10, 2.0, 90.0, 30.0, 4, 4, 4),  # strongest but incoherent
        SweepCell(20, 0.0, 5.0, 95.0, 4, 4, 4),
        SweepCell(20, 2.0, 70.0, 80.0, 4, 4, 4),
        SweepCell(30, 2.0, math.nan, math.nan, 4, 0, 0),
    ]
    res = SweepResult(cells, coherence_floor=50.0)
    assert res.best_layer == 20
    assert SweepResult(cells, coherence_floor=20.0).best_layer == 10
    assert SweepResult(cells, coherence_floor=99.0).best_layer is None
    assert "best: layer 20" in res.table()
    assert "none" in SweepResult(cells, coherence_floor=99.0).table()
    # a suppression sweep's best layer is the one whose coherent cell shows the trait least
    cells.append(SweepCell(30, -2.0, 1.0, 90.0, 4, 4, 4))
    assert SweepResult(cells, coherence_floor=50.0, choose="lowest").best_layer == 30
