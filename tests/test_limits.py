"""The rate and connection limits, as pure logic: no database, no server."""

from __future__ import annotations

import pytest

from chat.config import Settings
from chat.limits import FrameGuard, Limits, RateLimited, Slots, TokenBucket

SLOW = 1e-6  # tokens per second: no refill worth counting during a test


def _guard(*, burst: float, user_burst: float) -> FrameGuard:
    settings = Settings(rate_per_second=SLOW, rate_burst=burst, user_rate_per_second=SLOW, user_rate_burst=user_burst)
    return Limits(settings).open(user_id=1)


def test_a_frame_refused_by_the_connection_costs_the_user_nothing() -> None:
    guard = _guard(burst=1, user_burst=100)
    guard.check()  # one frame passes: each bucket pays one token
    for _ in range(10):
        with pytest.raises(RateLimited):
            guard.check()  # the connection's bucket is empty
    assert guard.limits.user_bucket(1).tokens == pytest.approx(99, abs=0.01)


def test_a_frame_refused_by_the_user_costs_the_connection_nothing() -> None:
    guard = _guard(burst=100, user_burst=1)
    guard.check()
    for _ in range(10):
        with pytest.raises(RateLimited):
            guard.check()  # the user's bucket is empty
    assert guard.bucket.tokens == pytest.approx(99, abs=0.01)


def test_a_refused_frame_still_counts_toward_the_flood() -> None:
    settings = Settings(rate_per_second=SLOW, rate_burst=1, flood_close_after=3)
    guard = Limits(settings).open(user_id=1)
    guard.check()
    floods = []
    for _ in range(4):
        with pytest.raises(RateLimited) as refused:
            guard.check()
        floods.append(refused.value.flood)
    assert floods == [False, False, False, True]


def test_bucket_wait_takes_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0, stamp=0.0)
    assert bucket.wait(0.0) == 0.0
    assert bucket.wait(0.0) == 0.0
    assert bucket.take(0.0) == 0.0 and bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(1.0)
    assert bucket.take(0.5) == pytest.approx(0.5)  # refilled half a token by then


def test_slots_cap_per_key() -> None:
    slots = Slots(2)
    assert slots.take("a") and slots.take("a")
    assert not slots.take("a")
    assert slots.take("b")
    slots.give_back("a")
    assert slots.take("a")
    slots.give_back("a")
    slots.give_back("a")
    assert "a" not in slots.open
