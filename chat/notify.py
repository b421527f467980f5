"""The NOTIFY wire format: channel names and payloads, built and parsed in one place.

Postgres sends these; the messages triggers (migrations 0001 and 0006) build message payloads in
SQL with the same keys as `message_payload` below, and presence and typing build theirs here.
One channel per room, named by the room's id: a room's name may be longer than a channel
name's 63 bytes.

A payload is one of:
- a stored message: {"seq", "author", "author_id", "kind", "body", "client_id", "sent_at"};
- a reference to one too big for NOTIFY's 8000 bytes: {"seq", "ref": true} (read the row);
- an ephemeral room event without a seq: {"type": "join" | "leave" | "typing", "user"};
- the empty string (RESYNC): notifications may have been missed, read the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from chat.store import MessageRecord

ROOM_PREFIX = "room_"
MAX_PAYLOAD_BYTES = 8000  # Postgres refuses a longer payload; ours send a reference at this size
# "read" (a user's read position moved: for that user's sockets only) and "removed" (a member was
# removed: their subscriptions end) come from chat/reads.py and the membership API (0008).
EVENT_TYPES = frozenset({"join", "leave", "typing", "read", "removed"})
# Sent by our listener itself after a reconnect: "you may have missed notifications, read the
# table". Nothing we NOTIFY is empty, and an empty NOTIFY from anyone else costs a harmless read.
RESYNC = ""


def room_channel(room_id: int) -> str:
    return f"{ROOM_PREFIX}{room_id}"


def room_of_channel(channel: str) -> int | None:
    """The room id a channel name stands for, or None if it is not a room's."""
    if not channel.startswith(ROOM_PREFIX):
        return None
    rest = channel[len(ROOM_PREFIX) :]
    return int(rest) if rest.isascii() and rest.isdigit() else None


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def event_payload(kind: str, user: str) -> str:
    """An ephemeral room event (join, leave, typing)."""
    if kind not in EVENT_TYPES:
        raise ValueError(f"not a room event: {kind!r}")
    return _dumps({"type": kind, "user": user})


def message_payload(message: MessageRecord) -> str:
    """What the trigger sends for a stored message: the message itself, or a reference to it."""
    payload = _dumps(
        {
            "seq": message.seq,
            "author": message.author,
            "author_id": message.author_id,
            "kind": message.kind,
            "body": message.body,
            "client_id": message.client_id,
            "sent_at": message.sent_at.isoformat(),
        }
    )
    if len(payload.encode()) >= MAX_PAYLOAD_BYTES:
        return _dumps({"seq": message.seq, "ref": True})
    return payload


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
    """One payload from a room channel. Never raises: what cannot be read means "read the table"."""
    if payload == RESYNC:
        return Resync()
    try:
        data = json.loads(payload)
    except ValueError:
        return Resync()
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
        return MessageRecord(
            seq=seq,
            author=str(data["author"]),
            body=str(data["body"]),
            kind=str(data["kind"]),
            author_id=data.get("author_id"),
            client_id=data.get("client_id"),
            sent_at=datetime.fromisoformat(data["sent_at"]),
        )
    except (KeyError, TypeError, ValueError):
        return Ref(seq)  # a message we cannot read whole: read its row
