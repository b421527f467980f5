"""The NOTIFY wire format, without a database: channel names, payloads built and parsed."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from chat import notify
from chat.store import MessageRecord


def test_room_channel_round_trip() -> None:
    assert notify.room_channel(42) == "room_42"
    assert notify.room_of_channel("room_42") == 42
    assert notify.room_of_channel("room_") is None
    assert notify.room_of_channel("room_4x") is None
    assert notify.room_of_channel("room_٤٢") is None  # digits, but not ASCII ones
    assert notify.room_of_channel("anything") is None


def test_message_payload_parses_back_to_the_message() -> None:
    sent = MessageRecord(
        seq=7,
        author="ünïcode",
        body="hi \u0001 there",
        kind="text",
        author_id=3,
        client_id="c-1",
        sent_at=datetime(2026, 12, 2, 3, 4, 5, 678000, tzinfo=UTC),
    )
    parsed = notify.parse(notify.message_payload(sent))
    assert isinstance(parsed, MessageRecord)
    assert (parsed.seq, parsed.author, parsed.body, parsed.kind, parsed.author_id, parsed.client_id) == (
        7,
        "ünïcode",
        "hi \u0001 there",
        "text",
        3,
        "c-1",
    )
    assert parsed.sent_at == sent.sent_at


def test_the_triggers_payload_is_read() -> None:
    # As Postgres's json_build_object writes it (timestamptz with an offset, spaces after colons).
    payload = (
        '{"seq" : 5, "author" : "bot", "author_id" : null, "kind" : "notice", "body" : "x",'
        ' "client_id" : null, "sent_at" : "2026-12-02T03:04:05.123456+00:00"}'
    )
    parsed = notify.parse(payload)
    assert isinstance(parsed, MessageRecord)
    assert (parsed.seq, parsed.author_id, parsed.kind) == (5, None, "notice")


def test_a_big_message_goes_by_reference() -> None:
    big = MessageRecord(seq=9, author="a", body="é" * 4000, sent_at=datetime.now(UTC))  # 8000 bytes of body
    payload = notify.message_payload(big)
    assert len(payload.encode()) < notify.MAX_PAYLOAD_BYTES
    assert notify.parse(payload) == notify.Ref(9)
    assert notify.parse('{"seq": 9, "ref": true}') == notify.Ref(9)


def test_events() -> None:
    payload = notify.event_payload("join", "bob")
    assert json.loads(payload) == {"type": "join", "user": "bob"}
    assert notify.parse(payload) == notify.Event({"type": "join", "user": "bob"})
    assert notify.parse('{"type": "typing", "user": "al"}') == notify.Event({"type": "typing", "user": "al"})
    with pytest.raises(ValueError):
        notify.event_payload("message", "bob")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("", notify.Resync()),  # the listener reconnected: read the table
        ("not json", notify.Resync()),
        ("[1, 2]", notify.Resync()),
        ('{"seq": "7"}', notify.Resync()),
        ('{"seq": 0}', notify.Resync()),
        ('{"seq": true}', notify.Resync()),
        ('{"seq": 7, "author": "a"}', notify.Ref(7)),  # a message we cannot read whole: read its row
        ('{"seq": 7, "author": "a", "body": "b", "kind": "text", "sent_at": "yesterday"}', notify.Ref(7)),
        ('{"type": "something else"}', notify.Ignored()),
        ("{}", notify.Ignored()),
    ],
)
def test_what_cannot_be_read_never_raises(payload: str, expected: notify.Notice) -> None:
    assert notify.parse(payload) == expected
