"""chat/metrics.py: a histogram fed all at once counts exactly as one fed a value at a time."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from chat import metrics

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)


def _samples(histogram: Histogram) -> dict[str, float]:
    return {
        f"{s.name}{sorted(s.labels.items())}": s.value
        for m in histogram.collect()
        for s in m.samples
        if "created" not in s.name
    }


@given(st.lists(st.floats(min_value=-1.0, max_value=100.0) | st.sampled_from([0.001, 0.01, 1.0, 10.0, 0.0])))
def test_observing_all_at_once_counts_as_one_at_a_time(values: list[float]) -> None:
    one, each = CollectorRegistry(), CollectorRegistry()
    together = Histogram("d", "delay", buckets=BUCKETS, registry=one)
    apart = Histogram("d", "delay", buckets=BUCKETS, registry=each)
    metrics.observe_all(together, values)
    for value in values:
        apart.observe(value)
    got, expected = _samples(together), _samples(apart)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(got[key] - value) <= 1e-9 * max(1.0, abs(value)), key


async def test_fanout_delays_are_observed_by_the_end_of_the_turn() -> None:
    before = _samples(metrics.FANOUT_DELAY)
    for delay in (0.0005, 0.003, 0.003):
        metrics.fanout_delay(delay)
    await asyncio.sleep(0)
    after = _samples(metrics.FANOUT_DELAY)
    count = "chat_fanout_delay_seconds_count[]"
    assert after[count] - before[count] == 3
    le_1ms = "chat_fanout_delay_seconds_bucket[('le', '0.001')]"
    assert after[le_1ms] - before[le_1ms] == 1
