"""Plotly figures for persona readings."""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go

from persona_lens.probe import Reading


def projection_curve(
    readings: Reading | Sequence[Reading],
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    show_prompt_reading: bool = True,
) -> go.Figure:
    """The trait-projection curve: one line per response, a point per generated token.

    The x axis is the response token index; point ``k`` is the projection the model held
    when it chose token ``k`` (hover shows the token). A dashed marker at x = -1 shows the
    last prompt token's reading, the paper's pre-answer monitor, if asked.

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
    if isinstance(readings, Reading):
        readings = [readings]
    if not readings:
        raise ValueError("no readings to plot")
    if labels is not None and len(labels) != len(readings):
        raise ValueError(f"{len(labels)} labels for {len(readings)} readings")
    fig = go.Figure()
    for i, r in enumerate(readings):
        name = labels[i] if labels else f"response {i}"
        fig.add_trace(
            go.Scatter(
                x=list(range(len(r.response_projections))),
                y=r.response_projections,
                mode="lines+markers",
                name=name,
                text=r.response_tokens[: len(r.response_projections)],
                hovertemplate="token %{x}: %{text}<br>projection %{y:.3f}<extra>" + name + "</extra>",
            )
        )
        if show_prompt_reading and r.prompt_projections:
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
        xaxis_title="response token (-1: last prompt token)",
        yaxis_title="projection onto unit vector",
        template="plotly_white",
    )
    return fig
