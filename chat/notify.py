"""The fan-out wire format: channel names and payloads, built and parsed in one place.

Postgres sends these with NOTIFY; the messages trigger (migrations 0001 and 0007) builds message
payloads in SQL with the same keys as `message_payload` below, and presence and typing build
theirs here. With Redis fan-out (CHAT_FANOUT_URL) the same payloads travel on the same channel
names through Redis, plus the batches the writer publishes after each commit. One channel per
room, named by the room's id: a room's name may be longer than a channel name's 63 bytes.

A payload on a room's channel is one of:
- a stored message: {"seq", "author", "author_id", "kind", "body", "client_id", "sent_at",
  "target_seq", "reply_to", "quote"} (the last three null unless a change or a reply; 0008);
- a reference to one too big for NOTIFY's 8000 bytes: {"seq", "ref": true} (read the row);
- a batch (Redis only): a JSON list of stored messages committed together, in seq order; a batch
  too big to carry is sent as a reference to its last seq instead;
- an ephemeral room event without a seq: {"type": "join" | "leave" | "typing", "user"}, or
  {"type": "read", "user", "user_id", "read_seq"} / {"type": "removed", "user", "user_id"} (0009);
- the empty string (RESYNC): notifications may have been missed, read the table.

A user's channel (`user_<id>`) carries only ROOMS_CHANGED, to that user's `/socket` connections.

The `chat_relay` channel (migration 0007) carries rows that other SQL clients inserted: a
message payload with its "room_id" added, or {"room_id", "seq", "ref": true}; and the events
that the CLI sends (a `removed` with its "room_id"; {"type": "rooms", "user_id"} for a user's
channel). The relay of a
Redis deployment forwards each to its room's channel (`relayed`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from chat.store import MessageRecord

ROOM_PREFIX = "room_"
RELAY_CHANNEL = "chat_relay"
MAX_PAYLOAD_BYTES = 8000  # Postgres refuses a longer payload; ours send a reference at this size
# A batch above this is replaced by a reference to its last seq: the subscribers read the rows
# instead. Redis takes far more, but every subscriber buffers it.
MAX_BATCH_BYTES = 256 * 1024
# "read" (a user's read position moved: for that user's sockets only) and "removed" (a member was
# removed: their subscriptions end) come from chat/reads.py and the membership API (0009).
EVENT_TYPES = frozenset({"join", "leave", "typing", "read", "removed"})
# Sent by our listener itself after a reconnect: "you may have missed notifications, read the
# table". Nothing we NOTIFY is empty, and an empty NOTIFY from anyone else costs a harmless read.
RESYNC = ""


def room_channel(room_id: int) -> str:
    return f"{ROOM_PREFIX}{room_id}"


USER_PREFIX = "user_"
# On a user's channel: their room list changed (added to a room, a DM made with them, removed):
# their /socket connections tell the page, which reads GET /api/me/rooms again.
ROOMS_CHANGED = '{"type":"rooms"}'


def user_channel(user_id: int) -> str:
    return f"{USER_PREFIX}{user_id}"


def room_of_channel(channel: str) -> int | None:
    """The room id a channel name stands for, or None if it is not a room's."""
    if not channel.startswith(ROOM_PREFIX):
        return None
    rest = channel[len(ROOM_PREFIX) :]
    return int(rest) if rest.isascii() and rest.isdigit() else None


_COMPACT: dict[str, Any] = {"ensure_ascii": False, "separators": (",", ":")}


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, **_COMPACT)


def event_payload(kind: str, user: str, **extra: int) -> str:
    """An ephemeral room event (join, leave, typing; read and removed name the user_id too)."""
    if kind not in EVENT_TYPES:
        raise ValueError(f"not a room event: {kind!r}")
    if "seq" in extra:
        raise ValueError("an event has no seq: a payload with a seq is a stored message's")
    return _dumps({"type": kind, "user": user, **extra})


def _message_dict(message: MessageRecord) -> dict[str, Any]:
    return {
        "seq": message.seq,
        "author": message.author,
        "author_id": message.author_id,
        "kind": message.kind,
        "body": message.body,
        "client_id": message.client_id,
        "sent_at": message.sent_at.isoformat(),
        "target_seq": message.target_seq,
        "reply_to": message.reply_to,
        "quote": message.quote,
    }


def message_payload(message: MessageRecord) -> str:
    """What the trigger sends for a stored message: the message itself, or a reference to it."""
    payload = _dumps(_message_dict(message))
    if len(payload.encode()) >= MAX_PAYLOAD_BYTES:
        return _dumps({"seq": message.seq, "ref": True})
    return payload


def batch_payload(messages: Sequence[MessageRecord], *, limit: int = MAX_BATCH_BYTES) -> str:
    """One room's newly committed messages (seq order) as one payload: a JSON list of messages,
    or a reference to the last seq when the list would be larger than `limit` bytes."""
    if not messages:
        raise ValueError("an empty batch")
    payload = json.dumps([_message_dict(m) for m in messages], **_COMPACT)
    if len(payload.encode()) > limit:
        return _dumps({"seq": messages[-1].seq, "ref": True})
    return payload


def relayed(payload: str) -> tuple[str, str] | None:
    """The channel (a room's; a user's for a `rooms` event) and payload for one `chat_relay`
    notification (None if unreadable)."""
    try:
        data = json.loads(payload)
        if data.get("type") == "rooms" and "room_id" not in data:  # the CLI's: a user's room list changed
            user_id = data["user_id"]
            ok = isinstance(user_id, int) and not isinstance(user_id, bool)
            return (user_channel(user_id), ROOMS_CHANGED) if ok else None
        room_id = data.pop("room_id")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(room_id, int) or isinstance(room_id, bool):
        return None
    if data.get("ref") or (data.get("seq") is None and data.get("type") in EVENT_TYPES):
        return room_channel(room_id), _dumps(data)  # a reference, or an event (the CLI's `removed`)
    return room_channel(room_id), json.dumps([data], **_COMPACT)


# --- parsing -------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Resync:
    """Read the table: notifications may have been missed, or this one could not be read."""


@dataclass(slots=True, frozen=True)
class Ref:
    """A stored message whose payload was too big for NOTIFY: read it by seq."""

    seq: int


@dataclass(slots=True, frozen=True)
class Event:
    """An ephemeral room event; `data` is the payload as sent (type, user, ...)."""

    data: dict[str, Any]


@dataclass(slots=True, frozen=True)
class Ignored:
    """A payload that is none of ours (someone else's NOTIFY on our channel)."""


Notice = MessageRecord | Ref | Event | Resync | Ignored


def parse(payload: str) -> Notice:
    """One payload from a room channel. Never raises: what cannot be read means "read the table".
    A batch is not one notice: see `parse_all`."""
    if payload == RESYNC:
        return Resync()
    try:
        data = json.loads(payload)
    except ValueError:
        return Resync()
    return _notice(data)


def parse_all(payload: str) -> list[Notice]:
    """Every notice in one payload from a room channel: a batch gives its messages in order,
    anything else one notice. Never raises."""
    if payload == RESYNC:
        return [Resync()]
    try:
        data = json.loads(payload)
    except ValueError:
        return [Resync()]
    if isinstance(data, list) and data:
        return [_notice(item) if isinstance(item, dict) else Resync() for item in data]
    return [_notice(data)]


def _notice(data: Any) -> Notice:
    if not isinstance(data, dict):
        return Resync()
    seq = data.get("seq")
    if seq is None:
        return Event(data) if data.get("type") in EVENT_TYPES else Ignored()
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return Resync()
    if data.get("ref"):
        return Ref(seq)
    try:
        # The common payload (a plain message: strings, nulls) takes no conversion calls.
        author, body, kind = data["author"], data["body"], data["kind"]
        target_seq, reply_to, quote = data.get("target_seq"), data.get("reply_to"), data.get("quote")
        return MessageRecord(
            seq=seq,
            author=author if type(author) is str else str(author),
            body=body if type(body) is str else str(body),
            kind=kind if type(kind) is str else str(kind),
            author_id=data.get("author_id"),
            client_id=data.get("client_id"),
            sent_at=datetime.fromisoformat(data["sent_at"]),
            target_seq=None if target_seq is None else _seq_or_none(target_seq),
            reply_to=None if reply_to is None else _seq_or_none(reply_to),
            quote=None if quote is None else _quote_or_none(quote),
        )
    except (KeyError, TypeError, ValueError):
        return Ref(seq)  # a message we cannot read whole: read its row


def _seq_or_none(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("not a seq")
    return value


def _quote_or_none(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("not a quote")
    return {"author": str(value["author"]), "body": str(value["body"]), "deleted": bool(value["deleted"])}
