"""bench/report.py's arithmetic, and the throughput scenario's steps, on figures shaped like a real run's."""

from __future__ import annotations

from typing import Any

import pytest

from bench.cluster import SERVERS
from bench.report import cpu_cost, cpu_split, join_cpu_ms, markdown
from bench.scenarios import refine_rate


def _run(system: str, members: int, busy: float, rate: int = 2000) -> dict[str, Any]:
    return {
        "system": system,
        "rate": rate,
        "members": members,
        "committed_per_s": 0 if system == "inmemory" else rate,
        "deliveries_per_s": rate * members,
        "cpu": {SERVERS[system]: busy},
        "latency_ms": {"p99": 7.0},
        "lost": 0,
    }


def test_the_split_tells_deliveries_from_messages() -> None:
    # 2,000 msg/s: 65.3% of a core with 2 members per room (4,000 deliveries/s), 71.4% with 10.
    rows = [_run("chat", 2, 65.3), _run("inmemory", 2, 19.0), _run("chat", 10, 71.4), _run("inmemory", 10, 26.5)]
    chat, inmemory = cpu_split(rows)
    assert chat["system"] == "chat" and chat["members"] == [2, 10]
    assert chat["per_delivery_us"] == pytest.approx(6.1e4 / 16_000, abs=0.01)  # 3.81
    assert chat["per_message_us"] == pytest.approx((714_000 - 3.8125 * 20_000) / 2000, abs=0.1)  # 318.9
    assert inmemory["per_delivery_us"] == pytest.approx(4.69, abs=0.01)
    assert inmemory["per_message_us"] == pytest.approx(85.6, abs=0.1)
    # The whole CPU over the deliveries (the target's measure) is the split put back together.
    whole = cpu_cost(_run("chat", 10, 71.4))["per_delivery_us"]
    assert whole == pytest.approx(chat["per_delivery_us"] + chat["per_message_us"] / 10, abs=0.1)


def test_no_split_without_two_member_counts_or_their_cpu() -> None:
    assert cpu_split([_run("chat", 10, 71.4)]) == []
    assert cpu_split([_run("chat", 10, 71.4), _run("chat", 10, 70.0)]) == []  # no more deliveries
    missing = _run("chat", 2, 65.3)
    missing["cpu"] = {}
    assert cpu_split([missing, _run("chat", 10, 71.4)]) == []


def test_a_joins_cpu_is_the_servers_cpu_over_its_joins() -> None:
    # 84% of a core while 280 joins a second were made: 3 ms of the servers' CPU per join.
    assert join_cpu_ms({"cpu": {"chat_servers": 84.0}, "joins_per_s": 280.0}) == 3.0
    assert join_cpu_ms({"cpu": {}, "joins_per_s": 280.0}) is None
    assert join_cpu_ms({"cpu": {"chat_servers": 84.0}, "joins_per_s": None}) is None


def test_a_joins_cpu_counts_its_whole_window() -> None:
    # 400 joins in 2 s, then 4 s of waiting (the presence linger) inside the same window: 22% of a
    # core over 6 s is 3.3 ms per join, not 22% over the joins' 200 a second (1.1 ms).
    joins = {"cpu": {"chat_servers": 22.0}, "n": 400, "joins_per_s": 200.0, "cpu_window_s": 6.0}
    assert join_cpu_ms(joins) == 3.3


def _joins(system: str, key: str, p99: float, busy: float) -> dict[str, Any]:
    return {"system": system, "key": key, "ready_ms": {"p50": p99 / 2, "p99": p99}, "joins_per_s": 200.0,
            "cpu": {SERVERS[system]: busy}}  # fmt: skip


def test_the_plain_servers_table_sets_each_figure_beside_chats() -> None:
    # Shaped like the 08:25 run: chat 69.6% and plain 59.4% of a core at 2,000 msg/s, 10 members.
    rows = [_run("chat", 2, 68.4), _run("plain", 2, 54.3), _run("chat", 10, 69.6), _run("plain", 10, 59.4)]
    rows += [_run("inmemory", 2, 19.0), _run("inmemory", 10, 30.6)]
    assert cpu_cost(rows[3]) == {"per_stored_us": 297.0, "per_delivery_us": 29.7}  # plain stores too
    assert [s["system"] for s in cpu_split(rows)] == ["chat", "inmemory", "plain"]
    joins = [_joins("chat", "bare", 1.44, 20.0), _joins("plain", "bare", 1.03, 15.0),
             _joins("chat", "replay", 9.97, 84.6), _joins("plain", "replay", 2.18, 28.6)]  # fmt: skip
    assert join_cpu_ms(joins[3], "plain") == 1.43
    report = markdown({"meta": {}, "plain": {"rows": rows, "joins": joins}})
    table = report[report.index("### The plain durable server") :]
    assert "| servers' CPU, µs per stored message | 348 | 297 | 1.17x | 153 |" in table
    assert "| servers' CPU, µs per delivery | 34.8 | 29.7 | 1.17x | 15.3 |" in table
    assert "| join + replay p99 over the bare accept's (target: 3x) | 6.92x | 2.12x |  |  |" in table
    assert "| servers' CPU per join + replay, ms | 4.23 | 1.43 | 2.96x |  |" in table


def test_throughput_refines_between_the_best_pass_and_the_first_failure() -> None:
    # 6,407 passed and 9,611 failed: try 7,847, then (say it passed) 8,684; stop within 10%.
    assert refine_rate(6407, 9611) == 7847
    assert refine_rate(7847, 9611) == 8684
    assert refine_rate(9135, 9611) is None
    assert refine_rate(7847, 8600) is None
