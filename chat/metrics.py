"""Prometheus metrics (prometheus-client).

With `chat serve --workers N` every worker writes its samples to a shared folder
(PROMETHEUS_MULTIPROC_DIR, set by `chat serve`) and /metrics adds them up, so a scrape of any
worker gives the whole server's figures. Separate `chat serve` processes (or hosts) are scraped
separately, as usual.
"""

from __future__ import annotations

import asyncio
import math
import os
from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

SOCKETS = Gauge("chat_open_sockets", "Open sockets", multiprocess_mode="livesum")
MESSAGES_IN = Counter("chat_messages_in", "Messages stored from sockets (a resend of a stored one is not counted)")
MESSAGES_OUT = Counter("chat_messages_out", "Message frames queued for sockets (live and replayed)")
REFUSALS = Counter("chat_refusals", "Refused sockets and frames, by reason", ["reason"])
FANOUT_DELAY = Histogram(
    "chat_fanout_delay_seconds",
    "From a message's transaction to its fan-out to this process's sockets, for live messages",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LISTENER_RECONNECTS = Counter("chat_listener_reconnects", "Reconnects of the LISTEN connection")
BACKFILLED = Counter("chat_backfilled_messages", "Messages read from the table because NOTIFY did not bring them")
PUBLISH_FAILURES = Counter("chat_publish_failures", "Message batches the Redis fan-out could not publish (woken later)")
FANOUT_OVERFLOWS = Counter(
    "chat_fanout_overflows", "Times a feed fell so far behind the fan-out that it read the table instead"
)
RELAYED = Counter("chat_relayed_messages", "Rows inserted by other SQL clients that the relay brought to Redis")
NOTIFY_QUEUE = Gauge("chat_notify_queue_usage", "Postgres's NOTIFY queue usage, 0 to 1", multiprocess_mode="max")


def exposition() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def reason_label(reason: str) -> str:
    """A bounded label: the part of a refusal's reason before any detail."""
    return reason.split(":", 1)[0].strip()[:40]


def observe_all(histogram: Histogram, values: Sequence[float]) -> None:
    """`histogram.observe(v)` for each of `values` (an unlabelled histogram), with one update of
    the sum and one per bucket instead of one each per value: the same counts and sum."""
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    total = 0.0
    for value in values:
        total += value
        index = bisect_left(bounds, value)  # the first bound >= value, as observe() finds it
        if index < len(counts) and not math.isnan(value):
            counts[index] += 1
    histogram._sum.inc(total)
    for index, count in enumerate(counts):
        if count:
            histogram._buckets[index].inc(count)


_delays: list[float] = []  # FANOUT_DELAY observations of this turn of the event loop


def fanout_delay(seconds: float) -> None:
    """Observe FANOUT_DELAY once per turn of the event loop for every live message of the turn
    (a message is one observation per process, measured when it is fanned out, as before)."""
    if not _delays:
        asyncio.get_running_loop().call_soon(_observe_delays)
    _delays.append(seconds)


def _observe_delays() -> None:
    values = _delays[:]
    _delays.clear()
    observe_all(FANOUT_DELAY, values)
