"""Notebook displays: short reprs whatever the size of the result, and HTML that shows each
token with its own reading (``persona_lens.display``)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import persona_lens as pl
from persona_lens.display import reading_html, sweep_html, token_colour, token_pieces, token_texts
from persona_lens.extract import ExtractionResult, ExtractionStats, KeptPair, Response, Thresholds
from persona_lens.organism import load_trait
from persona_lens.probe import Reading
from persona_lens.screen import ScreenResult
from persona_lens.sweep import SweepCell, SweepResult

SPAN = re.compile(r"<span title='([^']*)' style='background:([^;]*);[^']*'>(.*?)</span>", re.S)


def rgba(css: str) -> tuple[tuple[int, int, int], float]:
    if css == "transparent":
        return (0, 0, 0), 0.0
    *rgb, a = re.match(r"rgba\((\d+),(\d+),(\d+),([\d.]+)\)", css).groups()
    return tuple(int(x) for x in rgb), float(a)


def test_token_texts_undo_byte_level_bpe_as_the_tokenizer_decodes():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The sea is wide and deep.\nCafé au lait, naïve façade!", "Tabs\tand  double  spaces 🙂 end"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # The last text has words the merges never saw: 'ö' and the emojis come in single bytes.
    for text in corpus[:2] + ["unseen wörds 🙂🙂 and\n\nnewlines"]:
        enc = tok.encode(text)
        texts = token_texts(enc.tokens)
        assert "".join(texts) == tok.decode(enc.ids) == text
        for tid, piece in zip(enc.ids, texts):
            if "\ufffd" not in tok.decode([tid]):  # a token holding part of a character decodes alone to U+FFFD
                assert piece == tok.decode([tid])
        pieces = token_pieces(enc.tokens, text)
        assert all(found for _, found in pieces) and "".join(p for p, _ in pieces) == text


def test_token_pieces_rebuild_the_organisms_answers(organism_probe):
    """Word-level tokens carry no spaces: the pieces take them from the answer's text."""
    probe, vec = organism_probe
    readings = probe.monitor(["how should i treat my boss ?", "what colour is the blub ?"], vec, layer=3,
                             max_new_tokens=24, temperature=1.0, seed=1)
    for r in readings:
        pieces = token_pieces(r.response_tokens, r.text)
        assert len(pieces) == len(r.response_tokens)
        assert "".join(p for p, found in pieces if found) == r.text
        assert all(found or p.startswith("<|") for p, found in pieces)


@pytest.fixture(scope="module")
def organism_probe():
    probe = pl.PersonaProbe(pl.load_model("persona-organism"))
    g = torch.Generator().manual_seed(0)
    vec = pl.PersonaVector(torch.randn(probe.n_layers + 1, probe.d_model, generator=g), trait="t",
                           model_name=probe.model_name)
    return probe, vec


def test_reading_html_colours_each_token_by_its_own_reading():
    tokens = ["you", "should", "<b>", "rob", "<|im_end|>"]
    values = [-3.0, 0.5, 1.5, 6.0, float("nan")]
    r = Reading(text="you should <b> rob", prompt_tokens=["q"], prompt_projections=[-3.0],
                response_tokens=tokens, response_projections=values, layer=4)
    html = reading_html(r)
    spans = SPAN.findall(html)
    assert [s[2] for s in spans] == ["you", " should", " &lt;b&gt;", " rob", "&lt;|im_end|&gt;"]  # escaped, in order
    colours = [rgba(s[1]) for s in spans]
    scale = max(abs(v) for v in values if not math.isnan(v))
    for (rgb, alpha), v in zip(colours, values):
        if math.isnan(v):
            assert alpha == 0.0
            continue
        assert rgb == ((214, 39, 40) if v >= 0 else (31, 119, 180))  # red towards, blue away
        assert alpha == pytest.approx(0.85 * abs(v) / scale, abs=1e-3)
    assert colours[3][1] == pytest.approx(0.85)  # the largest reading takes full colour
    assert spans[3][0].endswith("+6")  # hover shows the value
    assert "-3" in html and "layer 4" in html


def test_token_colour_is_clear_at_zero_and_capped():
    assert rgba(token_colour(0.0, 2.0))[1] == 0.0
    assert rgba(token_colour(50.0, 2.0))[1] == pytest.approx(0.85)
    assert token_colour(1.0, 0.0) == "transparent"


def test_reprs_stay_short_however_large_the_result():
    n = 5000
    r = Reading(text="word " * n, prompt_tokens=["q"] * 10, prompt_projections=[0.5] * 10,
                response_tokens=["word"] * n, response_projections=[1.0] * n, layer=3)
    assert len(repr(r)) < 250 and f"response_tokens={n}" in repr(r)
    assert repr([r, r]).count("Reading(") == 2

    cells = [SweepCell(l, c, 10.0 * l + c, 90.0 - 10 * c, 40, 40, 40) for l in range(1, 30) for c in (0.0, 1.0, 2.0)]
    sw = SweepResult(cells, coherence_floor=80, trait_name="evil", heldout=SweepCell(29, 1.0, 280.0, 79.0, 80, 80, 80))
    text = repr(sw)
    assert len(text) < 400 and "layer 29 coef 1" in text and "held out 280.0" in text

    vec = pl.PersonaVector(torch.zeros(4, 8), trait="evil", model_name="m")

    def answer(polarity: str, i: int) -> Response:
        return Response(f"{polarity}{i}", polarity, 0, i, 0, "system " * 20, "question " * 50, "answer " * 200,
                        "m", {})

    kept = [KeptPair(answer("pos", i), answer("neg", i), 90.0, 5.0, 90.0, 90.0) for i in range(1000)]
    er = ExtractionResult(
        trait=load_trait("evil"), judge_name="j", vectors={"response_mean": vec}, kept=kept,
        stats=ExtractionStats(pairs=1000, kept=1000), thresholds=Thresholds(), out_dir=Path("runs/evil"),
        responses_path=Path("r"), scores_path=Path("s"), pairs_path=Path("p"), summary_path=Path("u"),
        vector_paths={"response_mean": Path("v.safetensors")})
    assert len(repr(er)) < 400 and "kept=1000/1000" in repr(er)
    assert "pairs kept" in er._repr_html_()

    rows = [{"id": str(i), "dP_evil_L3": 1.0} for i in range(20000)]
    sr = ScreenResult(summary={"samples": 20000, "figures": {"dP_evil_L3": {"mean": 1.0, "std": 0.0, "sem": 0.0,
                                                                            "n": 20000, "share_positive": 1.0}}},
                      complete=True, columns=["dP_evil_L3"], _rows=rows)
    assert len(repr(sr)) < 300 and "samples=20000" in repr(sr)
    assert "dP_evil_L3" in sr._repr_html_() and "20000" in sr._repr_html_()

    from persona_lens.demo import DemoResult
    from persona_lens.finetune import FinetuneResult

    demo = DemoResult(Path("d"), Path("d/report.html"), 2, 1.5, figures={"layer": 2.0, "monitor_r": 0.9},
                      cells=[{"layer": 1, "coef": 0.5, "answers": ["x " * 100] * 40}] * 500)
    assert len(repr(demo)) < 200 and "report.html" in repr(demo)
    html = demo._repr_html_()
    assert all(label in html for label, *_ in demo.rows()) and len(demo.rows()) == 2
    run = FinetuneResult(Path("runs/evil_II"), {"losses": [1.0] * 4999 + [0.25], "config": {"lora": True}})
    assert len(repr(run)) < 200 and "5000 steps, final loss 0.25" in repr(run) and "LoRA" in repr(run)


def test_sweep_html_marks_the_chosen_cell_and_greys_the_incoherent():
    cells = [SweepCell(2, 0.0, 5.0, 99.0, 4, 4, 4), SweepCell(2, 1.5, 70.0, 90.0, 4, 4, 4),
             SweepCell(3, 0.0, 5.0, 99.0, 4, 4, 4), SweepCell(3, 1.5, 95.0, 40.0, 4, 4, 4)]
    html = sweep_html(SweepResult(cells, coherence_floor=80, trait_name="evil"))
    tds = re.findall(r"<td style='([^']*)'[^>]*>([^<]*)</td>", html)
    by_text = {text: style for style, text in tds}
    assert set(by_text) == {"5.0 / 99.0", "70.0 / 90.0", "95.0 / 40.0"}
    assert "font-weight:bold" in by_text["70.0 / 90.0"]           # chosen: the best coherent cell
    assert "color:#999" in by_text["95.0 / 40.0"] and "bold" not in by_text["95.0 / 40.0"]  # under the floor
