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

__all__ = ["Page", "esc", "run_report"]

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


def _experiment_key(results: dict, path: Path) -> tuple:
    exp = str(results.get("experiment", ""))
    digits = "".join(ch for ch in exp if ch.isdigit())
    return (int(digits) if digits else 99, str(path))


def _fmt_goal(v: Any) -> str:
    return "nan" if v != v else (f"{v:.2f}" if abs(v) < 2 else f"{v:.1f}")


def run_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """One HTML page with every experiment found in ``run_dir``: for each ``results.json``
    (at any depth), its title, settings, goals (value, target, pass) and every figure its
    script kept as plotly JSON (``*.plotly.json``) beside it; results without figures get
    their numbers only. Written to ``out`` (default ``run_dir/report.html``).

    Example:
        >>> import json, plotly.graph_objects as go
        >>> _ = (tmp / "run" / "e1").mkdir(parents=True)
        >>> _ = (tmp / "run" / "e1" / "results.json").write_text(json.dumps({"experiment": "E1", "title": "E1: sweep",
        ...     "goals": {"evil": {"steer_trait": {"value": 72.0, "op": ">=", "target": 60, "pass": True}}}}))
        >>> fig = go.Figure(go.Scatter(x=[0, 1], y=[5, 70]), layout=dict(title="evil"))
        >>> _ = (tmp / "run" / "e1" / "e1.plotly.json").write_text("[" + fig.to_json() + "]")
        >>> page = run_report(tmp / "run").read_text()
        >>> "E1: sweep" in page, page.count("Plotly.newPlot"), "steer_trait" in page
        (True, 1, True)
    """
    import json

    import plotly.io as pio

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no run folder at {run}: give the folder an experiment wrote into")
    found = []
    for path in run.rglob("results.json"):
        try:
            found.append((json.loads(path.read_text()), path))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a readable results.json ({e}); rerun its experiment") from None
    if not found:
        raise ValueError(f"{run} holds no results.json: run an experiment into it first "
                         "(python -m experiments.all --out RUN)")
    found.sort(key=lambda item: _experiment_key(*item))
    page = Page(f"Experiments: {run.name}", subtitle=f"{len(found)} experiment(s) from {run.resolve()}")
    summary = []
    for res, path in found:
        for trait, goals in (res.get("goals") or {}).items():
            for name, g in goals.items():
                summary.append([res.get("experiment", path.parent.name), trait,
                                name + (f" ({g['note']})" if g.get("note") else ""),
                                _fmt_goal(g["value"]), f"{g['op']} {g['target']:g}", "pass" if g["pass"] else "FAIL"])
    if summary:
        page.section("Goals", "Each goal's value (held-out figures where a layer or coefficient was chosen), its "
                              "target and whether it is met.", anchor="goals")
        page.table(["experiment", "trait", "goal", "value", "target", ""], summary, numeric=[3])
    for res, path in found:
        title = res.get("title") or f"{res.get('experiment', path.parent.name)} ({path.parent.name})"
        page.section(title, anchor=path.parent.name)
        meta = {k: res[k] for k in ("config", "model", "persona_lens_version") if k in res}
        if "checkpoint" in res:
            meta["checkpoint"] = ", ".join(f"{k} {v}" for k, v in res["checkpoint"].items())
        for k, v in (res.get("settings") or {}).items():
            meta[k] = ", ".join(map(str, v)) if isinstance(v, list) else v
        if meta:
            page.settings(list(meta.items()))
        if res.get("measurable") is False:
            page.text(f"Not measurable with this config: {res.get('why', '')}", cls="note")
        figs = sorted(path.parent.glob("*.plotly.json"))
        for f in figs:
            for spec in json.loads(f.read_text()):
                page.figure(pio.from_json(json.dumps(spec)))
        if not figs:
            pages = sorted(p.name for p in path.parent.glob("*.html") if p.name != "report.html")
            page.text(f"numbers in {path}" + (f"; figures in {', '.join(pages)}" if pages else ""), cls="note")
    target = Path(out) if out is not None else run / "report.html"
    return page.write(target)
