"""The hub's pure parts: holding messages that overtook a missing seq (Redis fan-out)."""

from __future__ import annotations

from chat.hub import Overtaken
from chat.store import MessageRecord


def record(seq: int) -> MessageRecord:
    return MessageRecord(seq=seq, author="a", body=f"m{seq}")


def test_held_messages_follow_once_the_gap_fills() -> None:
    early = Overtaken()
    assert not early
    assert early.hold(record(7), deadline=10.0)
    assert early.hold(record(6), deadline=99.0)  # the first of the gap set the deadline
    assert early.hold(record(9), deadline=99.0)
    assert early and early.deadline == 10.0
    assert early.following(4) == []  # 5 is still missing
    assert [r.seq for r in early.following(5)] == [6, 7]  # 5 came: 6 and 7 follow; 9 waits for 8
    assert list(early.held) == [9]
    assert [r.seq for r in early.following(8)] == [9]
    assert not early


def test_a_backfill_makes_held_messages_obsolete() -> None:
    early = Overtaken()
    for seq in (3, 4, 8):
        early.hold(record(seq), deadline=1.0)
    early.forget(4)
    assert list(early.held) == [8]
    assert early.following(9) == [] and not early  # past everything held: nothing left


def test_full_means_read_the_table() -> None:
    early = Overtaken(limit=2)
    assert early.hold(record(3), deadline=1.0) and early.hold(record(4), deadline=1.0)
    assert not early.hold(record(5), deadline=1.0)
    assert list(early.held) == [3, 4]
