"""bench/stats.py: quantiles and the sum of two independent distributions (pure, no servers)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.stats import quantile, sketch, sum_quantile


def test_sum_of_two_constants_is_their_sum() -> None:
    assert sum_quantile([[0.0, 1.0], [1.0, 1.0]], [[0.0, 2.0], [1.0, 2.0]], 0.99) == pytest.approx(3.0)


def test_sum_of_two_uniforms_matches_its_known_quantiles() -> None:
    # U(0,1) + U(0,1) is triangular on [0, 2]: median 1, p99 = 2 - sqrt(0.02).
    uniform = [[0.0, 0.0], [1.0, 1.0]]
    assert sum_quantile(uniform, uniform, 0.5) == pytest.approx(1.0, abs=0.01)
    assert sum_quantile(uniform, uniform, 0.99) == pytest.approx(2 - 0.02**0.5, abs=0.01)


def test_matches_sampling_from_measured_shapes() -> None:
    rng = random.Random(7)
    a = [rng.lognormvariate(0, 0.5) for _ in range(20_000)]
    b = [rng.expovariate(2.0) for _ in range(20_000)]
    sums = sorted(x + y for x, y in zip(a, b, strict=True))
    for q in (0.5, 0.9, 0.99):
        expected = quantile(sums, q)
        assert sum_quantile(sketch(a), sketch(b), q) == pytest.approx(expected, rel=0.05)


def test_no_sketch_no_answer() -> None:
    assert sum_quantile([], [[0.0, 1.0], [1.0, 1.0]], 0.99) is None


@given(
    st.lists(st.floats(0, 100), min_size=1, max_size=200),
    st.lists(st.floats(0, 100), min_size=1, max_size=200),
)
def test_bounded_by_the_extremes(a: list[float], b: list[float]) -> None:
    value = sum_quantile(sketch(a), sketch(b), 0.99)
    assert value is not None
    assert min(a) + min(b) - 1e-9 <= value <= max(a) + max(b) + 1e-9
