"""chat/limits.py and the history byte cap (protocol.fit): pure logic, no server, no database."""

from __future__ import annotations

import asyncio
import json

import pytest

from chat.config import Settings
from chat.limits import FrameGuard, Limits, RateLimited, ReplayBusy, Slots, TokenBucket, byte_cost
from chat.protocol import fit


def settings(**overrides: object) -> Settings:
    return Settings.model_validate({"database_url": None, **overrides})


def test_byte_cost_grows_with_size() -> None:
    assert byte_cost(0, 8192) == 0
    assert byte_cost(8192, 8192) == 1
    assert byte_cost(20 * 8192, 8192) == 20


def test_bucket_takes_then_refuses_then_refills() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0, stamp=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)  # one token at 2/s
    assert bucket.take(100.5) == 0.0


def test_a_refused_take_costs_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0, stamp=0.0)
    assert bucket.take(0.0, cost=2.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(1.0)
    assert bucket.take(0.0) == pytest.approx(1.0)  # still one second: the refusals took nothing


def test_charge_is_a_debt_that_later_frames_wait_out() -> None:
    bucket = TokenBucket(rate=10.0, burst=30.0, stamp=0.0)
    bucket.charge(0.0, 60.0)  # a 60-token reply with 30 tokens in the bucket
    assert bucket.tokens == pytest.approx(-30.0)
    assert bucket.take(0.0) == pytest.approx(3.1)  # 31 tokens at 10/s
    assert bucket.take(3.1) == 0.0


def test_frame_guard_refuses_without_charging_the_other_bucket() -> None:
    limits = Limits(settings(rate_per_second=1.0, rate_burst=1.0, user_rate_per_second=1.0, user_rate_burst=5.0))
    guard = limits.open(1)
    guard.check()
    with pytest.raises(RateLimited):
        guard.check()  # the connection's bucket is empty
    # The user's bucket lost one token, not two: another socket of the user still has four.
    other = limits.open(1)
    other.bucket = TokenBucket(100.0, 100.0)  # this socket's own bucket is no limit here
    for _ in range(4):
        other.check()
    with pytest.raises(RateLimited):
        other.check()


def test_big_replies_slow_the_next_frames() -> None:
    limits = Limits(settings(rate_per_second=10.0, rate_burst=30.0, rate_token_bytes=1000))
    guard = limits.open(7)
    guard.check()
    guard.charge_bytes(100_000)  # 100 tokens for a 100 KB history reply
    with pytest.raises(RateLimited) as refused:
        guard.check()
    assert refused.value.retry_after > 5.0


def test_api_bucket_per_user_weighs_replies() -> None:
    limits = Limits(settings(api_rate_per_second=1.0, api_rate_burst=3.0, rate_token_bytes=1000))
    assert limits.api_check(1) == 0.0
    limits.api_check(1, size=5000)  # a 5 KB page: 5 tokens of debt
    assert limits.api_check(1) > 2.0
    assert limits.api_check(2) == 0.0  # another user is not affected


async def test_replay_slots_per_user() -> None:
    limits = Limits(settings(replays_per_user=2))
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with limits.replay_slot(1, timeout=5.0):
            entered.set()
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    await entered.wait()
    await asyncio.sleep(0)
    with pytest.raises(ReplayBusy):
        async with limits.replay_slot(1, timeout=0.05):
            pass
    async with limits.replay_slot(2, timeout=0.05):  # another user replays meanwhile
        pass
    release.set()
    await asyncio.gather(*holders)
    async with limits.replay_slot(1, timeout=0.05):
        pass
    assert limits._replays == {}  # nothing kept for users who are not replaying


def test_fit_keeps_the_newest_or_the_oldest_within_the_cap() -> None:
    frames = ["a" * 99, "b" * 99, "c" * 99, "d" * 99]  # 100 bytes each with the comma
    assert fit(frames, max_bytes=1000) == 4
    assert fit(frames, max_bytes=250) == 2
    assert fit(frames, max_bytes=250, newest=False) == 2
    assert fit(frames, max_bytes=10) == 1  # one message always fits, however big
    assert fit([], max_bytes=10) == 0


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


def test_an_idle_socket_keeps_no_bucket_and_its_first_frame_finds_it_full() -> None:
    """The connection's bucket is made by the first frame (most sockets are idle), full, as if
    made when the socket opened."""
    guard = _guard(burst=5, user_burst=100)
    assert guard._bucket is None
    for _ in range(5):
        guard.check()
    with pytest.raises(RateLimited):
        guard.check()
    assert guard._bucket is not None


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


def test_a_wait_of_a_few_milliseconds_is_never_told_as_zero() -> None:
    """retry_after is rounded up to hundredths: a client told 0 would retry at once, and be
    refused again."""
    for wait, told in ((0.0001, 0.01), (0.004, 0.01), (0.011, 0.02), (1.5, 1.5)):
        frame = json.loads(RateLimited(wait, flood=False).frame())
        assert frame == {
            "type": "error",
            "code": "rate_limited",
            "detail": f"slow down: retry in {told:.2f}s",
            "retry_after": told,
        }
