"""bench/history.py: which node of a history page's plan reads the page."""

from __future__ import annotations

from typing import Any

from bench.history import reread_plans

PLAN = """Limit  (cost=8.58..846.49 rows=50 width=205) (actual time=0.020..0.066 rows=50.00 loops=1)
  InitPlan 3
    ->  Bitmap Heap Scan on rooms  (cost=4.14..8.16 rows=1 width=8) (actual time=0.004..0.004 rows=1.00 loops=1)
          ->  Bitmap Index Scan on rooms_pkey  (cost=0.00..4.14 rows=1 width=0)
  ->  Index Scan Backward using messages_history_idx on messages  (cost=0.43..16781348.32 rows=1001380 width=205)
        SubPlan 1
          ->  Index Scan using messages_pkey on messages original  (cost=0.43..8.45 rows=1 width=32)
        SubPlan 2
          ->  Aggregate  (cost=8.20..8.21 rows=1 width=32)
                ->  Index Only Scan using message_reactions_pkey on message_reactions  (cost=0.15..8.17 rows=1)
"""


def test_the_page_scan_is_the_scan_of_messages_not_a_subplans() -> None:
    """The rooms row (the head) and the reactions subplan (index-only) are not the page's scan."""
    result: dict[str, Any] = {"sql": {"latest": {"explain": PLAN}, "covering": {"explain": PLAN.replace(
        "Index Scan Backward using messages_history_idx on messages",
        "Index Only Scan Backward using bench_messages_covering on messages",
    )}}}  # fmt: skip
    reread_plans(result)
    latest, covering = result["sql"]["latest"], result["sql"]["covering"]
    assert latest["node"] == "Index Scan Backward using messages_history_idx on messages"
    assert latest["index_only"] is False
    assert covering["node"] == "Index Only Scan Backward using bench_messages_covering on messages"
    assert covering["index_only"] is True
