"""Small numeric helpers shared by the pipeline, the demo and the reports.

Example:
    >>> from persona_lens.stats import mean_score, pearson, fmt
    >>> mean_score([80.0, None, 60.0])
    (70.0, 2)
    >>> round(pearson([1, 2, 3], [2, 4, 7]), 3)
    0.993
    >>> fmt(72.456), fmt(72.456, decimals=1)
    ('72.5', '72.5')
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["mean_score", "pearson", "fmt", "auroc", "precision_at_k"]


def mean_score(scores: Sequence[float | None]) -> tuple[float, int]:
    """Mean of the scores a judge gave, skipping refusals (``None``), and how many counted.

    NaN when no score counted, so that a cell nobody scored cannot win a comparison.

    Example:
        >>> mean_score([80.0, None, 60.0])
        (70.0, 2)
        >>> mean_score([None]), mean_score([float("nan"), 50.0])
        ((nan, 0), (50.0, 1))
    """
    # a NaN is no score either (a judge that could not read its own reply)
    vals = [x for x in scores if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return (sum(vals) / len(vals) if vals else math.nan), len(vals)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equal-length sequences (NaN if either is constant).

    Example:
        >>> pearson([1.0, 2.0, 3.0], [10.0, 20.0, 30.0])
        1.0
        >>> pearson([1.0, 1.0], [3.0, 4.0])
        nan
    """
    n = len(x)
    if n != len(y) or n < 2:
        raise ValueError("pearson needs two sequences of the same length >= 2")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def fmt(x: float, decimals: int | None = None) -> str:
    """A number for a plain-text table or report.

    With ``decimals``: fixed point, so that a column of scores lines up. Without: whole
    numbers without a decimal point, three significant digits below 10 and one decimal
    above (a table of mixed figures: counts, layers, correlations, scores). NaN is ``nan``.

    Example:
        >>> fmt(90.0, decimals=1), fmt(90.0), fmt(0.81234), fmt(72.456), fmt(float("nan")), fmt(float("inf"))
        ('90.0', '90', '0.812', '72.5', 'nan', 'inf')
    """
    if decimals is not None:
        return "nan" if math.isnan(x) else f"{x:.{decimals}f}"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, float) and not math.isnan(x) and x != int(x):
        return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return str(int(x)) if isinstance(x, (int, float)) and not math.isnan(x) else str(x)


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve of ``scores`` ranking the True ``labels`` first: the chance
    that a random positive scores above a random negative, ties counting half
    (Mann-Whitney). NaN when one class is empty or a score is NaN (a NaN has no rank: sorted
    would place it by where it stands in the list).

    Example:
        >>> auroc([True, False, True, False], [0.9, 0.1, 0.4, 0.4])
        0.875
    """
    pos = [s for l, s in zip(labels, scores) if l]
    neg = [s for l, s in zip(labels, scores) if not l]
    if not pos or not neg or any(math.isnan(s) for s in pos + neg):
        return math.nan
    order = sorted(pos + neg)
    ranks: dict[float, float] = {}
    i = 0
    while i < len(order):  # average rank of each distinct value (1-based)
        j = i
        while j + 1 < len(order) and order[j + 1] == order[i]:
            j += 1
        ranks[order[i]] = (i + j) / 2 + 1
        i = j + 1
    u = sum(ranks[s] for s in pos) - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def precision_at_k(labels: Sequence[bool], scores: Sequence[float], k: int) -> float:
    """Share of True labels among the ``k`` highest scores (ties broken by position).

    Example:
        >>> precision_at_k([True, False, True, False], [0.9, 0.8, 0.4, 0.1], k=2)
        0.5
    """
    top = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    return sum(bool(labels[i]) for i in top) / len(top) if top else math.nan
