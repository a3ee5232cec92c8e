"""Plotly figures for persona readings, sweeps and monitoring.

These builders are shared by the demo's report, the sweep's ``sweep.html`` and the
experiments' result pages (:mod:`persona_lens.report` puts them on a page). Every figure has
a fixed height (:data:`HEIGHT` unless given), so a page of them scrolls instead of each one
filling the browser window.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import plotly.graph_objects as go
from plotly.colors import sample_colorscale

if TYPE_CHECKING:
    from persona_lens.probe import Reading

__all__ = ["HEIGHT", "projection_curve", "projection_bands", "sweep_figure", "monitor_scatter",
           "group_colors"]

#: Default height of a figure in pixels.
HEIGHT = 440
#: Sequential scale for ordered groups (e.g. system prompts from suppressing to encouraging).
SEQUENTIAL = "Plasma_r"
#: Colour for a group outside the ordered scale (e.g. "no system prompt").
OTHER_COLOR = "rgb(120,120,120)"


def _present_groups(groups: Sequence[str], order: Sequence[str] | None, others: Sequence[str]):
    """The ordered and the other groups that occur in ``groups`` (by default every group not
    in ``others``, in order of first appearance), and their colours."""
    seen = list(dict.fromkeys(groups))
    order = [g for g in (order if order is not None else [g for g in seen if g not in others]) if g in seen]
    others = [g for g in others if g in seen]
    return order, others, group_colors(order, others)


def group_colors(order: Sequence[str], others: Sequence[str] = ()) -> dict[str, str]:
    """One colour per ordered group, sampled evenly from one sequential scale (light to
    dark), and grey for each of ``others``.

    Example:
        >>> colors = group_colors(["low", "mid", "high"], others=["none"])
        >>> len(set(colors.values())), colors["none"]
        (4, 'rgb(120,120,120)')
    """
    n = len(order)
    # Leave out the palest end of the scale: it does not show on white.
    stops = [0.15 + 0.85 * (i / max(1, n - 1)) for i in range(n)]
    colors = dict(zip(order, sample_colorscale(SEQUENTIAL, stops))) if n else {}
    colors.update({o: OTHER_COLOR for o in others})
    return colors


def _rgba(color: str, alpha: float) -> str:
    """``rgb(r,g,b)`` (or ``#rrggbb``) -> ``rgba(r,g,b,alpha)``."""
    if color.startswith("#"):
        r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    else:
        r, g, b = (float(v) for v in color[color.index("(") + 1 : color.index(")")].split(",")[:3])
    return f"rgba({r:.0f},{g:.0f},{b:.0f},{alpha})"


def projection_curve(
    readings: "Reading | Sequence[Reading]",
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    show_prompt_reading: bool = True,
) -> go.Figure:
    """The trait-projection curve: one line per response, a point per generated token.

    The x axis is the position read: -1 is the last prompt token (the reading the model held
    when it chose the first answer token, the paper's pre-answer monitor, marked if asked),
    ``j`` answer token ``j`` (the reading before it chose token ``j + 1``); hover shows the
    token. For many
    responses, :func:`projection_bands` reads better.

    Example (``probe``, ``vec``, ``trait``: the persona organism, its ``evil`` vector and
    trait; layer 3 is where its last-prompt projection tracks the system prompt):

        >>> question = trait.eval_questions[0]
        >>> convs = [[{"role": "system", "content": system}, {"role": "user", "content": question}]
        ...          for system in trait.system_prompts(0)]   # evil prompt, helpful prompt
        >>> readings = probe.monitor(convs, vec, layer=3, max_new_tokens=16)
        >>> readings[0].last_prompt > readings[1].last_prompt
        True
        >>> fig = pl.plot.projection_curve(readings, labels=["evil prompt", "helpful prompt"])
        >>> [(trace.name, len(trace.y)) for trace in fig.data if trace.name]  # one line per response
        [('evil prompt', ...), ('helpful prompt', ...)]
        >>> fig.write_html("curve.html")
    """
    if hasattr(readings, "response_projections"):
        readings = [readings]  # type: ignore[list-item]
    if not readings:
        raise ValueError("no readings to plot")
    if labels is not None and len(labels) != len(readings):
        raise ValueError(f"{len(labels)} labels for {len(readings)} readings")
    fig = go.Figure()
    for i, r in enumerate(readings):
        name = labels[i] if labels else f"response {i}"
        # response_projections[k] is read where answer token k was chosen: at the last prompt
        # token for k = 0, then at answer token k - 1. Each point is drawn at the position it
        # was read at (x = k - 1: -1 is the last prompt token), so no reading appears twice.
        n = len(r.response_projections)
        fig.add_trace(
            go.Scatter(
                x=list(range(-1, n - 1)),
                y=r.response_projections,
                mode="lines+markers",
                name=name,
                text=["(last prompt token)"] + list(r.response_tokens[: max(n - 1, 0)]),
                hovertemplate="position %{x}: %{text}<br>projection %{y:.3f}<extra>" + name + "</extra>",
            )
        )
        if show_prompt_reading and r.prompt_projections:  # the paper's reading, marked
            fig.add_trace(
                go.Scatter(
                    x=[-1], y=[r.last_prompt], mode="markers", showlegend=False,
                    marker=dict(symbol="diamond-open", size=10),
                    hovertemplate=f"last prompt token<br>projection %{{y:.3f}}<extra>{name}</extra>",
                )
            )
    layer = readings[0].layer
    fig.update_layout(
        title=title or f"Projection onto the persona vector, layer {layer}",
        xaxis_title="position read (-1: last prompt token; 0, 1, ...: answer tokens)",
        yaxis_title="projection onto unit vector",
        template="plotly_white",
        height=HEIGHT,
    )
    return fig


def _mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% interval (0 for one value)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, 1.96 * sd / math.sqrt(n)


def projection_bands(
    readings: "Sequence[Reading]",
    groups: Sequence[str],
    *,
    order: Sequence[str] | None = None,
    others: Sequence[str] = (),
    min_responses: int = 5,
    title: str | None = None,
    height: int = HEIGHT,
) -> go.Figure:
    """Per-token projections summarised per group: the mean line and its 95% band.

    Each group (e.g. the strength of the system prompt) gets one line: at response token
    ``k`` the mean projection over the group's responses that reached token ``k``, with a
    shaded 95% confidence band of that mean. A group's line stops where fewer than
    ``min_responses`` of its responses are still going. The point at x = -1 is the last prompt
    token (the reading before the answer starts).

    Args:
        readings: :class:`~persona_lens.probe.Reading` objects from ``probe.monitor``.
        groups: the group of each reading.
        order: ordered groups, coloured on one sequential scale in this order (default: the
            groups in order of first appearance).
        others: groups outside the order, drawn grey and dashed (e.g. ``"none"``).
        min_responses: the fewest responses a point averages.

    Example:
        >>> readings = probe.monitor(prompts * 3, vec, layer=3, max_new_tokens=12)
        >>> fig = pl.plot.projection_bands(readings, ["q"] * len(readings), min_responses=2)
        >>> [t.name for t in fig.data if t.showlegend is not False]
        ['q (n=12)']
    """
    if len(readings) != len(groups):
        raise ValueError(f"{len(groups)} groups for {len(readings)} readings")
    if not readings:
        raise ValueError("no readings to plot")
    order, others, colors = _present_groups(groups, order, others)
    fig = go.Figure()
    for g in [*order, *others]:
        rs = [r for r, gg in zip(readings, groups) if gg == g]
        xs, ys, lo, hi, ns = [], [], [], [], []
        # as in projection_curve: response_projections[k] is read at position k - 1 (-1: the
        # last prompt token, which is also r.last_prompt)
        per = [r.response_projections or ([r.last_prompt] if r.prompt_projections else []) for r in rs]
        longest = max(len(p) for p in per)
        series = [[p[k] for p in per if len(p) > k] for k in range(longest)]
        for k, vals in enumerate(series, start=-1):
            if len(vals) < max(1, min(min_responses, len(rs))):
                if k >= 0:
                    break
                continue
            m, h = _mean_ci(vals)
            xs.append(k), ys.append(m), lo.append(m - h), hi.append(m + h), ns.append(len(vals))
        if not xs:
            continue
        color = colors[g]
        dash = "dash" if g in others else "solid"
        fig.add_trace(go.Scatter(
            x=xs + xs[::-1], y=hi + lo[::-1], fill="toself", fillcolor=_rgba(color, 0.18),
            line=dict(width=0), hoverinfo="skip", showlegend=False, legendgroup=g,
        ))
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines", name=f"{g} (n={len(rs)})", legendgroup=g,
            line=dict(color=color, width=2.5, dash=dash), customdata=ns,
            hovertemplate=f"{g}<br>token %{{x}}<br>mean %{{y:.2f}} over %{{customdata}} responses<extra></extra>",
        ))
    layer = readings[0].layer
    fig.add_vline(x=-0.5, line_dash="dot", line_color="gray")
    fig.update_layout(
        title=title or f"Projection onto the persona vector token by token, layer {layer}",
        xaxis_title="position read (-1: last prompt token; 0, 1, ...: answer tokens)",
        yaxis_title="projection onto the unit vector<br>(mean, 95% band)",
        template="plotly_white", height=height, legend_title_text="system prompt",
    )
    return fig


def sweep_figure(
    cells: Sequence[Any],
    *,
    coherence_floor: float | None = 50.0,
    highlight: int | None = None,
    title: str = "Steering sweep",
    coef_title: str = "steering coefficient",
    trait_title: str = "trait score",
    height: int = HEIGHT,
    note: str | None = None,
) -> go.Figure:
    """Judged trait score (left) and coherence (right) against the coefficient, one line
    per layer, layers coloured on one sequential scale (the paper's layer-sweep view).
    ``note`` (the run's settings, e.g. positions and samples) is added to every hover text.

    Args:
        cells: objects (or dicts) with ``layer``, ``coef``, ``trait``, ``coherence`` and
            ``n``; e.g. :attr:`persona_lens.sweep.SweepResult.cells`. A cell with ``coef ==
            0`` and no layer (``None``) is the unsteered baseline, drawn at every layer.
        coherence_floor: a dotted line on the coherence panel (None: none).
        highlight: a layer drawn thicker and marked ``(chosen)``.

    Example:
        >>> cells = [dict(layer=2, coef=c, trait=10 + 30 * c, coherence=95 - 5 * c, n=20) for c in (0, 1, 2)]
        >>> fig = pl.plot.sweep_figure(cells, highlight=2)
        >>> [t.name for t in fig.data if t.showlegend]
        ['layer 2 (chosen)']
    """
    def get(c: Any, k: str) -> Any:
        return c[k] if isinstance(c, Mapping) else getattr(c, k)

    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(trait_title + " (0-100)", "coherence (0-100)"),
                        horizontal_spacing=0.1)
    layers = sorted({get(c, "layer") for c in cells if get(c, "layer") is not None})
    colors = sample_colorscale("Viridis", [0.9 * i / max(1, len(layers) - 1) for i in range(len(layers))])
    shared = [c for c in cells if get(c, "layer") is None]
    for layer, color in zip(layers, colors):
        mine = sorted([c for c in cells if get(c, "layer") == layer] + shared, key=lambda c: get(c, "coef"))
        x = [get(c, "coef") for c in mine]
        chosen = layer == highlight
        name = f"layer {layer}" + (" (chosen)" if chosen else "")
        for col, attr in ((1, "trait"), (2, "coherence")):
            fig.add_trace(go.Scatter(
                x=x, y=[get(c, attr) for c in mine], mode="lines+markers", name=name,
                legendgroup=str(layer), showlegend=col == 1,
                line=dict(color=color, width=4 if chosen else 1.8), marker=dict(size=9 if chosen else 6),
                customdata=[get(c, "n") for c in mine],
                hovertemplate=(f"layer {layer}<br>coef %{{x}}<br>{attr} %{{y:.1f}} (n=%{{customdata}})"
                               + (f"<br>{note}" if note else "") + "<extra></extra>"),
            ), row=1, col=col)
    if coherence_floor is not None:
        fig.add_hline(y=coherence_floor, line_dash="dot", line_color="gray", row=1, col=2,
                      annotation_text=f"floor {coherence_floor:g}", annotation_position="bottom left")
    for col in (1, 2):
        fig.update_xaxes(title_text=coef_title, row=1, col=col)
        fig.update_yaxes(range=[-2, 102], row=1, col=col)
    fig.update_layout(title=title, legend_title_text="layer", template="plotly_white", height=height)
    return fig


def monitor_scatter(
    x: Sequence[float],
    y: Sequence[float],
    groups: Sequence[str],
    *,
    order: Sequence[str] | None = None,
    others: Sequence[str] = (),
    hover: Sequence[str] | None = None,
    title: str | None = None,
    x_title: str = "projection onto the unit persona vector",
    y_title: str = "trait score (0-100)",
    legend_title: str = "system prompt",
    height: int = HEIGHT,
) -> go.Figure:
    """Projection against judged trait score: points coloured by group on one sequential
    scale (one legend entry per group), the least-squares line, and Pearson r in the title.

    Example:
        >>> fig = pl.plot.monitor_scatter([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 35.0, 40.0],
        ...                               ["low", "low", "high", "high"], order=["low", "high"])
        >>> [t.name for t in fig.data]
        ['low', 'high', 'fit, r = 0.98']
    """
    from persona_lens.stats import pearson

    if not (len(x) == len(y) == len(groups)):
        raise ValueError(f"x, y and groups differ in length: {len(x)}, {len(y)}, {len(groups)}")
    order, others, colors = _present_groups(groups, order, others)
    fig = go.Figure()
    for g in [*order, *others]:
        idx = [i for i, gg in enumerate(groups) if gg == g]
        fig.add_trace(go.Scatter(
            x=[x[i] for i in idx], y=[y[i] for i in idx], mode="markers", name=g,
            marker=dict(color=colors[g], size=8, line=dict(width=0.5, color="white"),
                        symbol="diamond" if g in others else "circle"),
            text=[hover[i] for i in idx] if hover is not None else None,
            hovertemplate="%{text}<br>projection %{x:.2f}, score %{y:.1f}<extra>" + g + "</extra>"
            if hover is not None else f"{g}<br>projection %{{x:.2f}}, score %{{y:.1f}}<extra></extra>",
        ))
    r = pearson(list(x), list(y)) if len(x) >= 2 else math.nan
    if not math.isnan(r):
        n = len(x)
        mx, my = sum(x) / n, sum(y) / n
        slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
        lo, hi = min(x), max(x)
        fig.add_trace(go.Scatter(
            x=[lo, hi], y=[my + slope * (lo - mx), my + slope * (hi - mx)], mode="lines",
            name=f"fit, r = {r:.2f}", line=dict(color="black", width=1.5, dash="dash"), hoverinfo="skip",
        ))
    fig.update_layout(
        title=(title or "Projection vs trait score") + (f" (r = {r:.2f}, n = {len(x)})" if not math.isnan(r) else ""),
        xaxis_title=x_title, yaxis_title=y_title, legend_title_text=legend_title,
        template="plotly_white", height=height,
    )
    fig.update_yaxes(range=[-4, 104])
    return fig
