"""chat/protocol.py's frames out: the message frame built directly is the general encoder's."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from chat.protocol import ack_frame, dumps, message_dict, message_frame, message_text
from chat.store import MessageRecord

_seqs = st.integers(min_value=1, max_value=2**63 - 1)
_text = st.text()  # any code point: quotes, backslashes, control characters, non-BMP, lone surrogates
_moments = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5, minutes=-30))]),
)
_quotes = st.none() | st.fixed_dictionaries({"author": _text, "body": _text, "deleted": st.booleans()})
_reactions = st.none() | st.lists(
    st.fixed_dictionaries({"emoji": _text, "count": st.integers(min_value=1), "mine": st.booleans()}), max_size=3
)


@st.composite
def _messages(draw: Any) -> MessageRecord:
    return MessageRecord(
        seq=draw(_seqs),
        author=draw(_text),
        body=draw(_text),
        kind=draw(st.sampled_from(["text", "notice", "edit", "delete", "react", "unreact"]) | _text),
        author_id=draw(st.none() | st.integers(min_value=1)),
        client_id=draw(st.none() | _text),
        sent_at=draw(_moments),
        target_seq=draw(st.none() | _seqs),
        reply_to=draw(st.none() | _seqs),
        quote=draw(_quotes),
        edited_at=draw(st.none() | _moments),
        deleted_at=draw(st.none() | _moments),
        reactions=draw(_reactions),
    )


@settings(max_examples=500)
@given(room=_text, message=_messages())
def test_the_direct_message_frame_is_the_general_encoders(room: str, message: MessageRecord) -> None:
    assert message_text(room, message) == dumps(message_dict(room, message))


def test_a_plain_message_frame_reads_back_with_every_key_in_order() -> None:
    sent = datetime(2026, 5, 1, 10, 30, 15, 123456, tzinfo=UTC)
    message = MessageRecord(seq=7, author='a"\\b', body="x\n\x00\U0001f600</script>", client_id=None, sent_at=sent)
    frame = message_frame("room é", message)
    assert list(json.loads(frame).items()) == [
        ("type", "message"),
        ("room", "room é"),
        ("seq", 7),
        ("author", 'a"\\b'),
        ("kind", "text"),
        ("body", "x\n\x00\U0001f600</script>"),
        ("sent_at", "2026-05-01T10:30:15.123+00:00"),
        ("client_id", None),
    ]
    assert message_frame("another room", message) is frame  # encoded once per message, then shared


@given(client_id=st.none() | _text, seq=_seqs, duplicate=st.booleans())
def test_the_direct_ack_is_the_general_encoders(client_id: str | None, seq: int, duplicate: bool) -> None:
    expected = dumps({"type": "ack", "client_id": client_id, "seq": seq, "duplicate": duplicate})
    assert ack_frame(client_id, seq, duplicate) == expected


def test_a_time_in_any_zone_is_rendered_in_utc_to_the_millisecond() -> None:
    eastern = timezone(timedelta(hours=-5))
    message = MessageRecord(
        seq=1, author="a", body="b", sent_at=datetime(2026, 5, 1, 5, 30, 15, 999999, tzinfo=eastern)
    )
    assert json.loads(message_text("r", message))["sent_at"] == "2026-05-01T10:30:15.999+00:00"
