"""HTML pages of results: sections, tables and plotly figures, readable offline.

The demo's ``report.html``, the sweep's ``sweep.html`` and the experiments' result pages are
built with :class:`Page`: plotly.js is embedded once per page (the page opens with no
network), every figure keeps the fixed height its builder in :mod:`persona_lens.plot` gave
it, and tables say their units.

Example:
    >>> page = Page("Results")
    >>> page.section("Numbers")
    >>> page.table(["measure", "value"], [["trait score", "92.1"]], caption="scores are 0-100")
    >>> html = page.html()
    >>> html.count("<table"), "<h2" in html
    (1, True)
"""

from __future__ import annotations

import html as _html
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = ["Page", "esc"]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:24px auto;
     padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:0.2em} h2{margin-top:1.8em;border-bottom:1px solid #ccc;padding-bottom:4px}
h3{margin-top:1.2em}
p.lead{color:#444;margin-top:0}
table{border-collapse:collapse;margin:8px 0 4px} caption{caption-side:bottom;text-align:left;color:#555;
     font-size:0.9em;padding-top:4px}
td,th{padding:3px 12px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:bold;background:#fff6d5}
pre{background:#f7f7f7;padding:8px 10px;overflow-x:auto;font-size:0.88em}
dl.settings{display:grid;grid-template-columns:max-content auto;gap:2px 16px;font-size:0.92em;
     background:#f7f7f7;padding:8px 12px}
dl.settings dt{color:#555} dl.settings dd{margin:0}
.figure{margin:12px 0 24px}
.note{color:#555;font-size:0.92em}
"""


def esc(text: Any) -> str:
    """HTML-escaped ``str(text)``."""
    return _html.escape(str(text))


class Page:
    """An HTML page built in order: headings, paragraphs, tables, figures.

    Args:
        title: the page's ``<title>`` and ``<h1>``.
        subtitle: a line under the title.
    """

    def __init__(self, title: str, subtitle: str | None = None):
        self.title = title
        self.parts: list[str] = [f"<h1>{esc(title)}</h1>"]
        if subtitle:
            self.parts.append(f"<p class='lead'>{esc(subtitle)}</p>")
        self._figures = 0

    def section(self, title: str, intro: str | None = None, *, level: int = 2, anchor: str | None = None) -> None:
        """A heading (``<h2>`` by default) and an optional paragraph."""
        aid = f" id='{esc(anchor)}'" if anchor else ""
        self.parts.append(f"<h{level}{aid}>{esc(title)}</h{level}>")
        if intro:
            self.text(intro)

    def text(self, text: str, *, cls: str | None = None) -> None:
        """A paragraph of plain text."""
        c = f" class='{esc(cls)}'" if cls else ""
        self.parts.append(f"<p{c}>{esc(text)}</p>")

    def raw(self, html: str) -> None:
        """HTML as given (the caller escapes it)."""
        self.parts.append(html)

    def pre(self, text: str) -> None:
        """Preformatted text."""
        self.parts.append(f"<pre>{esc(text)}</pre>")

    def table(
        self,
        header: Sequence[str],
        rows: Sequence[Sequence[Any]],
        *,
        caption: str | None = None,
        numeric: Sequence[int] | None = None,
        highlight: Sequence[tuple[int, int]] = (),
    ) -> None:
        """A table of text cells.

        Args:
            header: column names.
            rows: cells (``str()`` of each is shown).
            caption: a line under the table (units, scale, what n counts).
            numeric: columns aligned right (default: none).
            highlight: ``(row, column)`` cells shown bold.
        """
        num = set(numeric or ())
        marked = set(highlight)
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = []
        for i, row in enumerate(rows):
            cells = []
            for j, v in enumerate(row):
                cls = " ".join(c for c, on in (("num", j in num), ("best", (i, j) in marked)) if on)
                cells.append(f"<td class='{cls}'>{esc(v)}</td>" if cls else f"<td>{esc(v)}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        cap = f"<caption>{esc(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")

    def settings(self, items: Sequence[tuple[str, Any]], *, at: int | None = None) -> None:
        """A block of ``name: value`` lines (run settings, timings); ``at``: the position in
        :attr:`parts` to put it (default: the end), for a block known only at the end."""
        rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items)
        self.parts.insert(len(self.parts) if at is None else at, f"<dl class='settings'>{rows}</dl>")

    def figure(self, fig: "go.Figure", *, caption: str | None = None) -> None:
        """A plotly figure at its own fixed height; plotly.js goes into the page with the
        first figure."""
        height = fig.layout.height or 440
        first = self._figures == 0
        self._figures += 1
        div = fig.to_html(full_html=False, include_plotlyjs=True if first else False,
                          default_height=f"{int(height)}px", default_width="100%",
                          config={"displaylogo": False, "responsive": True})
        cap = f"<p class='note'>{esc(caption)}</p>" if caption else ""
        self.parts.append(f"<div class='figure'>{div}{cap}</div>")

    def html(self) -> str:
        """The whole page."""
        return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
                f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
                f"<title>{esc(self.title)}</title><style>{CSS}</style></head><body>\n"
                + "\n".join(self.parts) + "\n</body></html>\n")

    def write(self, path: str | Path) -> Path:
        """Write the page (atomically) and return its path."""
        from persona_lens.pipeline_io import write_text

        write_text(path, self.html())
        return Path(path)
