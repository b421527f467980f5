"""The fan-out wire format, without a database: channel names, payloads built and parsed (NOTIFY,
Redis batches, the relay's)."""

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


def test_batch_payload_is_a_list_of_messages_or_a_wake_up_when_too_big() -> None:
    sent = datetime(2026, 12, 2, 3, 4, 5, tzinfo=UTC)
    records = [
        MessageRecord(seq=s, author="a", body=f"b{s}", author_id=7, client_id=f"c{s}", sent_at=sent) for s in (4, 5)
    ]
    decoded = json.loads(notify.batch_payload(records))
    assert [m["seq"] for m in decoded] == [4, 5]
    assert decoded[0] == {
        "seq": 4,
        "author": "a",
        "author_id": 7,
        "kind": "text",
        "body": "b4",
        "client_id": "c4",
        "sent_at": sent.isoformat(),
        "target_seq": None,
        "reply_to": None,
        "quote": None,
    }
    assert notify.parse_all(notify.batch_payload(records)) == records
    big = [MessageRecord(seq=9, author="a", body="x" * notify.MAX_BATCH_BYTES)]
    assert json.loads(notify.batch_payload(big)) == {"seq": 9, "ref": True}
    assert notify.parse_all(notify.batch_payload(big)) == [notify.Ref(9)]


def test_relay_payloads_go_to_their_room_channel() -> None:
    assert notify.relayed('{"room_id": 3, "seq": 8, "body": "hi"}') == ("room_3", '[{"seq":8,"body":"hi"}]')
    assert notify.relayed('{"room_id": 3, "seq": 8, "ref": true}') == ("room_3", '{"seq":8,"ref":true}')
    assert notify.relayed("not json") is None
    assert notify.relayed('{"seq": 8}') is None
    assert notify.relayed('{"room_id": "3", "seq": 8}') is None
    assert notify.relayed("[1]") is None
    # The CLI's events: a removal on the room's channel, a room list change on the user's.
    removed = '{"type":"removed","user":"bob","user_id":5}'
    assert notify.relayed('{"type": "removed", "user": "bob", "user_id": 5, "room_id": 3}') == ("room_3", removed)
    assert notify.relayed('{"type": "rooms", "user_id": 5}') == ("user_5", notify.ROOMS_CHANGED)
    assert notify.relayed('{"type": "rooms", "user_id": "5"}') is None
    assert notify.relayed('{"type": "rooms"}') is None


def test_a_batch_parses_item_by_item_and_never_raises() -> None:
    sent = datetime(2026, 12, 2, tzinfo=UTC)
    one = MessageRecord(seq=3, author="a", body="x", sent_at=sent)
    payload = notify.batch_payload([one])
    item = payload[1:-1]
    assert notify.parse_all(f'[{item}, 7, {{"seq": 4, "ref": true}}]') == [one, notify.Resync(), notify.Ref(4)]
    assert notify.parse_all("[]") == [notify.Resync()]
    assert notify.parse_all("") == [notify.Resync()]
    assert notify.parse_all(notify.event_payload("join", "b")) == [notify.Event({"type": "join", "user": "b"})]
    with pytest.raises(ValueError):
        notify.batch_payload([])
