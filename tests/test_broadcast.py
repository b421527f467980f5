"""chat/broadcast.py: events taken at once or queued in order, and a subscriber's queue bounded."""

from __future__ import annotations

import asyncio

import pytest
from broadcaster import Event

from chat import broadcast
from chat.broadcast import Subscriber, collapse, is_removal
from chat.notify import RESYNC, event_payload

CHANNEL = "room_1"


def test_a_removal_is_told_from_other_payloads() -> None:
    assert is_removal(event_payload("removed", "ann", user_id=3))
    assert not is_removal(event_payload("join", "ann"))
    assert not is_removal('{"seq":4,"author":"a","body":"\\"removed\\"","kind":"text"}')
    assert not is_removal('"removed" but not JSON')


def test_a_full_queue_collapses_to_its_distinct_removals_then_a_resync() -> None:
    gone = event_payload("removed", "ann", user_id=3)
    queued: list[Event | None] = [
        Event(CHANNEL, '{"seq":1}'),
        Event(CHANNEL, gone),
        Event(CHANNEL, event_payload("typing", "bob")),
        Event(CHANNEL, gone),
        Event(CHANNEL, '{"seq":2}'),
    ]
    assert collapse(queued, CHANNEL) == [Event(CHANNEL, gone), Event(CHANNEL, RESYNC)]
    assert collapse([*queued, None], CHANNEL) == [Event(CHANNEL, gone), Event(CHANNEL, RESYNC), None]


async def test_events_are_taken_at_once_only_with_nothing_queued() -> None:
    subscriber = Subscriber(CHANNEL)
    taken: list[str] = []

    def direct(payload: str) -> bool:
        if payload.startswith("take"):
            taken.append(payload)
            return True
        return False

    subscriber.direct = direct
    subscriber.offer(Event(CHANNEL, "take 1"))
    subscriber.offer(Event(CHANNEL, "queue 2"))
    subscriber.offer(Event(CHANNEL, "take 3"))  # behind a queued one: queued too, in order
    assert taken == ["take 1"]
    assert [(await subscriber.get()).message for _ in range(2)] == ["queue 2", "take 3"]
    subscriber.offer(Event(CHANNEL, "take 4"))
    assert taken == ["take 1", "take 4"]


async def test_a_failure_taking_an_event_queues_a_resync_for_the_task() -> None:
    subscriber = Subscriber(CHANNEL)

    def direct(payload: str) -> bool:
        raise RuntimeError("a bug")

    subscriber.direct = direct
    subscriber.offer(Event(CHANNEL, '{"seq":1}'))
    assert (await asyncio.wait_for(subscriber.get(), 5)).message == RESYNC


async def test_a_subscriber_queue_never_grows_past_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broadcast, "QUEUE_MAX", 5)
    subscriber = Subscriber(CHANNEL)
    for seq in range(1, 21):
        subscriber.offer(Event(CHANNEL, f'{{"seq":{seq}}}'))
        assert subscriber.queue.qsize() <= 5
    received = [subscriber.queue.get_nowait() for _ in range(subscriber.queue.qsize())]
    # What overflowed is read from the table (RESYNC); what came after it is queued behind.
    assert Event(CHANNEL, RESYNC) in received
    assert received[-1] == Event(CHANNEL, '{"seq":20}')


async def test_a_subscriber_queue_is_bounded_in_bytes_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broadcast, "QUEUE_MAX_BYTES", 1000)
    subscriber = Subscriber(CHANNEL)
    big = "x" * 300  # a payload the size of a Redis batch, in small
    for seq in range(1, 21):
        subscriber.offer(Event(CHANNEL, f'{{"seq":{seq},"body":"{big}"}}'))
        assert subscriber.queued_bytes <= 1000
    received = [(await subscriber.get()).message for _ in range(subscriber.queue.qsize())]
    # What overflowed is read from the table (RESYNC); what came after it is queued, in order.
    assert RESYNC in received
    seqs = [int(m.split(",")[0].removeprefix('{"seq":')) for m in received if m != RESYNC]
    assert seqs == sorted(seqs)
    assert subscriber.queued_bytes == 0  # the count follows what is taken
    subscriber.offer(Event(CHANNEL, '{"seq":21}'))
    assert subscriber.queued_bytes == len('{"seq":21}')
