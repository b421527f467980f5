"""Percentiles and compact distributions (no numpy needed)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

# Quantiles kept for plotting a distribution: dense in the tail, where latency stories are told.
SKETCH_QUANTILES: tuple[float, ...] = (
    *(q / 100 for q in range(0, 90, 2)),
    *(q / 1000 for q in range(900, 990, 5)),
    *(q / 10000 for q in range(9900, 9990, 10)),
    0.9995,
    0.9999,
    1.0,
)


def quantile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted sequence."""
    if not ordered:
        return math.nan
    if q >= 1.0:
        return ordered[-1]
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def summary(samples: Iterable[float]) -> dict[str, Any]:
    """n, p50, p90, p99, max and mean of samples (in whatever unit they come)."""
    ordered = sorted(samples)
    n = len(ordered)
    if n == 0:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    return {
        "n": n,
        "p50": quantile(ordered, 0.50),
        "p90": quantile(ordered, 0.90),
        "p99": quantile(ordered, 0.99),
        "max": ordered[-1],
        "mean": sum(ordered) / n,
    }


def sketch(samples: Iterable[float]) -> list[list[float]]:
    """[[quantile, value], ...] for plotting a CDF without keeping every sample."""
    ordered = sorted(samples)
    if not ordered:
        return []
    return [[q, quantile(ordered, q)] for q in SKETCH_QUANTILES]


def describe(samples: Sequence[float]) -> dict[str, Any]:
    return {**summary(samples), "sketch": sketch(samples)}


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0 or math.isnan(value) or math.isnan(base):
        return None
    return value / base


def _resample(points: Sequence[Sequence[float]], n: int) -> list[float]:
    """n values at evenly spaced quantiles ((i + 0.5) / n), read off a sketch by linear
    interpolation between its points."""
    qs = [float(p[0]) for p in points]
    vs = [float(p[1]) for p in points]
    out: list[float] = []
    j = 1
    for i in range(n):
        q = (i + 0.5) / n
        while j < len(qs) - 1 and qs[j] < q:
            j += 1
        q0, q1, v0, v1 = qs[j - 1], qs[j], vs[j - 1], vs[j]
        out.append(v0 if q1 <= q0 else v0 + (min(max(q, q0), q1) - q0) / (q1 - q0) * (v1 - v0))
    return out


def sum_quantile(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], q: float, *, n: int = 400) -> float | None:
    """The q-quantile of A + B for independent A and B, each given by its sketch: what a path
    that must pass through both (say, a socket round trip and then a commit) costs at best."""
    if len(a) < 2 or len(b) < 2:
        return None
    xs, ys = _resample(a, n), _resample(b, n)
    return quantile(sorted(x + y for x in xs for y in ys), q)
