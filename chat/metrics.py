"""Prometheus metrics (prometheus-client).

With `chat serve --workers N` every worker writes its samples to a shared folder
(PROMETHEUS_MULTIPROC_DIR, set by `chat serve`) and /metrics adds them up, so a scrape of any
worker gives the whole server's figures. Separate `chat serve` processes (or hosts) are scraped
separately, as usual.
"""

from __future__ import annotations

import os

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
