"""What results look like in a notebook: short reprs, and HTML for ``_repr_html_``.

A notebook shows the value of a cell's last line. The results a researcher looks at there
(:class:`~persona_lens.probe.Reading`, :class:`~persona_lens.sweep.SweepResult`,
:class:`~persona_lens.extract.ExtractionResult`, :class:`~persona_lens.screen.ScreenResult`,
:class:`~persona_lens.demo.DemoResult`, :class:`~persona_lens.finetune.FinetuneResult`)
would otherwise print every token, cell, kept pair, row or loss; their ``__repr__`` and
``_repr_html_`` call the functions here instead. The HTML is a fragment with inline styles
(a notebook shares one page between cells, so a ``<style>`` block would restyle all of
them); nothing here computes a figure.

Example:
    >>> html = reading_html(probe.monitor(prompts[:1], vec, layer=3, max_new_tokens=8)[0])
    >>> html.startswith("<div") and "before the answer" in html
    True
"""

from __future__ import annotations

import codecs
import math
from typing import TYPE_CHECKING, Sequence

from persona_lens.report import esc
from persona_lens.stats import fmt

if TYPE_CHECKING:
    from persona_lens.demo import DemoResult
    from persona_lens.extract import ExtractionResult
    from persona_lens.finetune import FinetuneResult
    from persona_lens.probe import Reading
    from persona_lens.screen import ScreenResult
    from persona_lens.sweep import SweepResult

__all__ = ["shorten", "token_texts", "token_pieces", "token_colour", "reading_repr", "reading_html", "sweep_repr", "sweep_html",
           "extraction_repr", "extraction_html", "screen_repr", "screen_html", "demo_repr", "demo_html",
           "finetune_repr"]

#: Towards the vector (the trait) and away from it: plotly's red and blue.
TOWARDS, AWAY = (214, 39, 40), (31, 119, 180)
_BOX = "font-family:system-ui,sans-serif;font-size:13px;line-height:1.5"
_CELL = "padding:2px 8px;border-bottom:1px solid #ddd;text-align:right"


def shorten(text: str, width: int = 60) -> str:
    """``text`` on one line, cut to ``width`` characters with ``...``.

    Example:
        >>> shorten("a long\\nanswer " * 10, width=20)
        'a long answer a l...'
    """
    one = " ".join(str(text).split())
    return one if len(one) <= width else one[: width - 3] + "..."


# Byte-level BPE (GPT-2, Qwen, Llama 3, SmolLM) writes each byte as a printable character:
# the table below is that mapping's inverse, so a token string turns back into its text.
def _byte_decoder() -> dict[str, int]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES = _byte_decoder()


def token_texts(tokens: Sequence[str]) -> list[str]:
    """Each token string as the text it stands for. Byte-level BPE tokens (``Ġ`` for a space)
    are turned back into bytes and decoded; a token that ends inside a multi-byte character
    gives ``""`` and the token that completes it the whole character. SentencePiece's ``▁`` is
    a space. Other tokenizers' tokens (word-level, characters) are their own text.

    Example:
        >>> token_texts(["ĠCaf", "Ã", "©", "Ċ"]), token_texts(["▁the", "▁sea"])
        ([' Caf', '', 'é', '\\n'], [' the', ' sea'])
    """
    if any(("Ġ" in t or "Ċ" in t) for t in tokens):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return [decoder.decode(bytes(_BYTES[c] for c in t)) if all(c in _BYTES for c in t) else t for t in tokens]
    return [t.replace("▁", " ") for t in tokens]


def token_pieces(tokens: Sequence[str], text: str) -> list[tuple[str, bool]]:
    """Each token's piece of the decoded ``text``, in order: ``(piece, found)``. The spaces a
    tokenizer leaves out of its tokens (word-level ones) go with the token after them; a token
    whose text is not in ``text`` (an end-of-turn token) comes back as itself, ``found=False``.

    Example:
        >>> token_pieces(["the", "blub", "is", "red", "<|im_end|>"], "the blub is red")
        [('the', True), (' blub', True), (' is', True), (' red', True), ('<|im_end|>', False)]
        >>> token_pieces(["ĠThe", "Ġsea", "!"], " The sea!")
        [(' The', True), (' sea', True), ('!', True)]
    """
    out, at = [], 0
    for tok, piece in zip(tokens, token_texts(tokens)):
        core = piece.strip()
        where = text.find(core, at) if core else -1
        if core and where >= 0 and not text[at:where].strip():
            out.append((text[at: where + len(core)], True))
            at = where + len(core)
        elif not core and text.startswith(piece, at):  # whitespace, or part of a character: ""
            out.append((piece, True))
            at += len(piece)
        else:
            out.append((tok, False))
    return out


def token_colour(value: float, scale: float) -> str:
    """A CSS background for a projection: red towards the vector, blue away from it, the
    opacity ``|value| / scale`` (at most 0.85, so that the text stays readable).

    Example:
        >>> token_colour(2.0, 4.0), token_colour(-8.0, 4.0), token_colour(float("nan"), 4.0)
        ('rgba(214,39,40,0.425)', 'rgba(31,119,180,0.85)', 'transparent')
    """
    if not math.isfinite(value) or not scale > 0:
        return "transparent"
    r, g, b = TOWARDS if value >= 0 else AWAY
    return f"rgba({r},{g},{b},{round(0.85 * min(1.0, abs(value) / scale), 3)})"


def reading_repr(r: "Reading") -> str:
    return (f"Reading(layer={r.layer}, last_prompt={r.last_prompt:+.4g}, response_mean={r.response_mean:+.4g}, "
            f"response_tokens={len(r.response_tokens)}, text={shorten(r.text)!r})")


def reading_html(r: "Reading") -> str:
    """The answer with each token coloured by the projection the model held just before it
    wrote that token (the first by the last prompt token's), on one scale: the largest
    ``|projection|`` over the answer. Hover a token for its value."""
    values = list(r.response_projections)
    finite = [abs(v) for v in values if math.isfinite(v)]
    scale = max(finite, default=0.0)
    spans = []
    for (piece, found), value in zip(token_pieces(r.response_tokens, r.text), values):
        style = f"background:{token_colour(value, scale)};border-radius:2px;white-space:pre-wrap"
        if not found:
            style += ";color:#888;font-size:90%"
        spans.append(f"<span title='{esc(piece.strip() or repr(piece))}: {value:+.4g}' style='{style}'>{esc(piece)}</span>")
    head = (f"layer {r.layer} &middot; before the answer (last prompt token) <b>{r.last_prompt:+.4g}</b> "
            f"&middot; answer mean <b>{fmt(r.response_mean, decimals=3)}</b> &middot; "
            f"<span style='color:rgb{TOWARDS}'>towards</span> / <span style='color:rgb{AWAY}'>away from</span> "
            f"the vector, full colour at &plusmn;{scale:.3g}")
    return (f"<div style='{_BOX}'><div style='color:#555;font-size:90%'>{head}</div>"
            f"<div style='font-family:monospace'>{''.join(spans)}</div></div>")


def _chosen(s: "SweepResult") -> str:
    c = s.chosen
    return (f"layer {c.layer} coef {c.coef:g}: trait {fmt(c.trait, decimals=1)}, coherence "
            f"{fmt(c.coherence, decimals=1)}" if c else f"none (no steered cell has coherence >= {s.coherence_floor:g})")


def sweep_repr(s: "SweepResult") -> str:
    coefs = ", ".join(f"{x:g}" for x in s.coefs)
    held = (f"; held out {fmt(s.heldout.trait, decimals=1)} (coherence {fmt(s.heldout.coherence, decimals=1)})"
            if s.heldout is not None else "")
    return (f"SweepResult(trait={s.trait_name!r}, layers={s.layers}, coefs=[{coefs}], "
            f"choose={s.choose!r}, chosen={_chosen(s)}{held})")


def sweep_html(s: "SweepResult") -> str:
    """The sweep's table (:meth:`SweepResult.table_rows`), trait / coherence per (layer,
    coefficient): the chosen cell bold on yellow, cells under the coherence floor grey (they
    cannot be chosen)."""
    header, table, marks = s.table_rows()
    head = "".join(f"<th style='{_CELL}'>{esc(h)}</th>" for h in header[1:])
    rows = []
    for i, (layer, row) in enumerate(zip(s.layers, table)):
        tds = []
        for j, (coef, text) in enumerate(zip(s.coefs, row[1:]), start=1):
            style, title = _CELL, ""
            if (i, j) in marks:
                style += ";font-weight:bold;background:#fff6d5"
            try:
                cell = s.cell(layer, coef)
                title = f" title='n = {cell.n}'"
                if (i, j) not in marks and not cell.coherence >= s.coherence_floor:
                    style += ";color:#999"
            except KeyError:  # no cell there: table_rows shows "-"
                pass
            tds.append(f"<td style='{style}'{title}>{esc(text)}</td>")
        rows.append(f"<tr><th style='{_CELL}'>layer {layer}</th>{''.join(tds)}</tr>")
    lines = [f"{esc(s.trait_name or 'trait')} sweep on {esc(s.model_name or '?')}, judge {esc(s.judge_name or '?')}: "
             f"trait score / coherence (0-100), chosen: {esc(_chosen(s))}"]
    if s.heldout is not None:
        lines.append(esc(s.heldout_line()))
    caption = "".join(f"<div style='color:#555'>{x}</div>" for x in lines)
    return (f"<div style='{_BOX}'>{caption}<table style='border-collapse:collapse'>"
            f"<thead><tr><th style='{_CELL}'></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def extraction_repr(r: "ExtractionResult") -> str:
    return (f"ExtractionResult(trait={r.trait.name!r}, judge={r.judge_name!r}, kept={r.stats.kept}/{r.stats.pairs} "
            f"pairs, vector={r.vector!r}, out_dir={str(r.out_dir)!r})")


def extraction_html(r: "ExtractionResult") -> str:
    return f"<div style='{_BOX}'><pre style='margin:0'>{esc(r.summary())}</pre></div>"


def screen_repr(s: "ScreenResult") -> str:
    figures = s.summary.get("figures", {}) if s.summary else {}
    cols = list(figures) or s.columns
    shown = ", ".join(cols[:4]) + (f", ... ({len(cols)} in all)" if len(cols) > 4 else "")
    n = s.summary.get("samples") if s.summary else None
    return (f"ScreenResult(complete={s.complete}, samples={n}, figures=[{shown}], "
            f"table={str(s.table) if s.table else None!r})")


def screen_html(s: "ScreenResult") -> str:
    """Dataset-level figures, one row per ``dP_{trait}_L{layer}``."""
    figures = s.summary.get("figures", {}) if s.summary else {}
    if not figures:
        return f"<div style='{_BOX}'>{esc(screen_repr(s))}</div>"
    keys = ["mean", "std", "sem", "n", "share_positive"]
    keys = [k for k in keys if any(k in f for f in figures.values())]
    head = "".join(f"<th style='{_CELL}'>{esc(k)}</th>" for k in keys)
    rows = "".join(
        f"<tr><th style='{_CELL};text-align:left'>{esc(name)}</th>"
        + "".join(f"<td style='{_CELL}'>{esc(fmt(f.get(k), decimals=3) if isinstance(f.get(k), float) else f.get(k, '-'))}</td>"
                  for k in keys) + "</tr>"
        for name, f in figures.items())
    where = f"table: {esc(s.table)}" if s.table else "no table yet"
    return (f"<div style='{_BOX}'><div style='color:#555'>projection difference per sample (dP), "
            f"{esc(s.summary.get('samples', '?'))} samples; {where}</div><table style='border-collapse:collapse'>"
            f"<thead><tr><th style='{_CELL}'></th>{head}</tr></thead><tbody>{rows}</tbody></table></div>")


def demo_repr(d: "DemoResult") -> str:
    return (f"DemoResult(layer={d.layer}, coef={d.coef:g}, figures={len(d.figures)}, "
            f"report_path={str(d.report_path)!r})")


def demo_html(d: "DemoResult") -> str:
    """The headline table (measure, value, scale, n) and where the report is."""
    cell = _CELL + ";text-align:left"
    rows = "".join("<tr>" + "".join(f"<td style='{_CELL if j in (1, 3) else cell}'>{esc(v)}</td>"
                                    for j, v in enumerate(r)) + "</tr>" for r in d.rows())
    head = "".join(f"<th style='{cell}'>{h}</th>" for h in ("measure", "value", "scale", "n"))
    return (f"<div style='{_BOX}'><table style='border-collapse:collapse'><thead><tr>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table><div style='color:#555'>report: {esc(d.report_path)}</div></div>")


def finetune_repr(r: "FinetuneResult") -> str:
    losses = r.settings.get("losses") or []
    last = f", final loss {losses[-1]:.4g}" if losses else ""
    cfg = r.settings.get("config", {})
    how = "LoRA" if cfg.get("lora") else "full"
    return (f"FinetuneResult({how}, {len(losses)} steps{last}, reused={r.reused}, path={str(r.path)!r})")
