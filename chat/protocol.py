"""The room socket's JSON protocol: frames in (pydantic) and frames out, and the close codes.

Every frame is a JSON object with a "type". README's "Protocol" section documents them all.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from chat.store import MessageRecord

# Close codes (RFC 6455 section 7.4; 4000-4999 are ours).
CLOSE_GOING_AWAY = 1001  # the server is shutting down: reconnect (to another process) and resume
CLOSE_POLICY = 1008  # a policy violation
CLOSE_TOO_BIG = 1009  # a frame over the hard frame limit (closed by uvicorn)
CLOSE_TRY_AGAIN = 1013  # too many of this user's joins replaying at once: reconnect a little later
CLOSE_SLOW_CONSUMER = 4000  # this socket's outgoing queue overflowed: reconnect with "after"
CLOSE_TOKEN_REFUSED = 4001  # the token was revoked or expired while the socket was open
CLOSE_REMOVED = 4003  # the user was removed from the room (room socket; /socket gets an error frame)
CLOSE_IDLE = 4002  # the chapter's echo socket: nothing received for CHAT_ECHO_IDLE_SECONDS
CLOSE_FLOOD = 4029  # kept sending while rate limited

# Every integer a client sends must fit Postgres's bigint (seqs are bigint): larger ones get a
# clear error here instead of an overflow in the database.
MAX_BIGINT = 2**63 - 1


T = TypeVar("T")


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SendFrame(_Frame):
    type: Literal["send"]
    body: str
    # The client's own id for the message: a resend with the same id stores nothing new.
    client_id: str | None = Field(default=None, min_length=1, max_length=64)
    reply_to: int | None = Field(default=None, ge=1, le=MAX_BIGINT)  # a message of the same room


# Changes of a message (README "Messages that change"): each is stored with the room's next seq
# and acked like a send; `target_seq` names the message.
class _ChangeFrame(_Frame):
    target_seq: int = Field(ge=1, le=MAX_BIGINT)
    client_id: str | None = Field(default=None, min_length=1, max_length=64)


class EditFrame(_ChangeFrame):
    type: Literal["edit"]
    body: str


class DeleteFrame(_ChangeFrame):
    type: Literal["delete"]


MAX_EMOJI_CHARS = 16  # one emoji, with its modifiers and joiners


class ReactFrame(_ChangeFrame):
    type: Literal["react"]
    emoji: str = Field(min_length=1, max_length=MAX_EMOJI_CHARS, pattern=r"^[^\s\x00-\x1f]+$")


class UnreactFrame(_ChangeFrame):
    type: Literal["unreact"]
    emoji: str = Field(min_length=1, max_length=MAX_EMOJI_CHARS, pattern=r"^[^\s\x00-\x1f]+$")


ChangeFrame = EditFrame | DeleteFrame | ReactFrame | UnreactFrame


class PingFrame(_Frame):
    type: Literal["ping"]


class TypingFrame(_Frame):
    type: Literal["typing"]


class HistoryFrame(_Frame):
    type: Literal["history"]
    before: int = Field(ge=1, le=MAX_BIGINT)
    limit: int = Field(default=50, ge=1, le=MAX_BIGINT)  # then clamped to CHAT_HISTORY_PAGE_MAX


class ReadFrame(_Frame):
    """Everything up to `seq` has been read (never moves back; written coalesced, chat/reads.py)."""

    type: Literal["read"]
    seq: int = Field(ge=0, le=MAX_BIGINT)


Incoming = (
    SendFrame | PingFrame | HistoryFrame | TypingFrame | EditFrame | DeleteFrame | ReactFrame | UnreactFrame | ReadFrame
)
_incoming: TypeAdapter[Incoming] = TypeAdapter(Annotated[Incoming, Field(discriminator="type")])


class BadFrame(Exception):
    """A frame we refuse; `code` and `detail` go back to the client in an error frame."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def parse(text: str) -> Incoming:
    return validate(
        _incoming, text, 'the frame needs a "type": send, edit, delete, react, unreact, history, typing, read or ping'
    )


def validate(adapter: TypeAdapter[T], text: str, unknown_type: str) -> T:
    """`text` as one of `adapter`'s frames, or BadFrame saying what is wrong with it."""
    try:
        return adapter.validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        kind = first["type"]
        if kind == "json_invalid":
            raise BadFrame("invalid_json", "the frame is not valid JSON") from None
        if kind in ("dict_type", "model_type"):
            raise BadFrame("invalid_frame", "a frame must be a JSON object") from None
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            raise BadFrame("unknown_type", unknown_type) from None
        where = ".".join(str(p) for p in first["loc"][1:]) or "frame"
        raise BadFrame("invalid_frame", f"{where}: {first['msg']}") from None


# --- frames out ----------------------------------------------------------------------------------


# One encoder for every frame: json.dumps with options builds a new JSONEncoder on each call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dumps(frame: dict[str, Any]) -> str:
    return _ENCODER.encode(frame)


_string = json.encoder.encode_basestring  # what _ENCODER uses for a str (ensure_ascii=False)
_int = int.__repr__  # what _ENCODER uses for an int


def _time(moment: datetime) -> str:
    if moment.tzinfo is not UTC:  # what the database and NOTIFY give is UTC already
        moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="milliseconds")


def ack_frame(client_id: str | None, seq: int, duplicate: bool) -> str:
    """`dumps({"type": "ack", "client_id": …, "seq": …, "duplicate": …})`, built directly (one
    per send)."""
    cid = "null" if client_id is None else _string(client_id)
    return f'{{"type":"ack","client_id":{cid},"seq":{_int(seq)},"duplicate":{"true" if duplicate else "false"}}}'


def message_dict(room: str, message: MessageRecord) -> dict[str, Any]:
    """A message, or a change of one (kind edit/delete/react/unreact, with target_seq; a
    reaction's emoji is its body). Keys that would be null or empty are left out."""
    frame: dict[str, Any] = {
        "type": "message",
        "room": room,
        "seq": message.seq,
        "author": message.author,
        "kind": message.kind,
        "body": message.body,
        "sent_at": _time(message.sent_at),
        "client_id": message.client_id,
    }
    if message.target_seq is not None:
        frame["target_seq"] = message.target_seq
    if message.reply_to is not None:
        frame["reply_to"] = message.reply_to
        if message.quote is not None:
            frame["quote"] = message.quote
    if message.edited_at is not None:
        frame["edited_at"] = _time(message.edited_at)
    if message.deleted_at is not None:
        frame["deleted"] = True
    if message.reactions:
        frame["reactions"] = message.reactions
    return frame


def message_frame(room: str, message: MessageRecord) -> str:
    # Built once per message per process, then shared by every socket in the room.
    if message._frame is None:
        message._frame = message_text(room, message)
    return message._frame


def message_text(room: str, message: MessageRecord) -> str:
    """`dumps(message_dict(room, message))`, the same text, built directly: no dict and no walk
    of the general encoder for the one frame every delivery carries (tests/test_protocol.py
    compares the two)."""
    client_id = message.client_id
    parts = [
        '{"type":"message","room":',
        _string(room),
        ',"seq":',
        _int(message.seq),
        ',"author":',
        _string(message.author),
        ',"kind":',
        _string(message.kind),
        ',"body":',
        _string(message.body),
        ',"sent_at":"',
        _time(message.sent_at),
        '","client_id":',
        "null" if client_id is None else _string(client_id),
    ]
    if message.target_seq is not None:
        parts += (',"target_seq":', _int(message.target_seq))
    if message.reply_to is not None:
        parts += (',"reply_to":', _int(message.reply_to))
        if message.quote is not None:
            parts += (',"quote":', dumps(message.quote))
    if message.edited_at is not None:
        parts += (',"edited_at":"', _time(message.edited_at), '"')
    if message.deleted_at is not None:
        parts.append(',"deleted":true')
    if message.reactions:
        parts += (',"reactions":', _ENCODER.encode(message.reactions))
    parts.append("}")
    return "".join(parts)


def fit(frames: list[str], *, max_bytes: int, newest: bool = True) -> int:
    """How many of `frames` (oldest first), counted from the newest (or the oldest), fit in
    `max_bytes` of JSON (counted in characters); at least one, so that a single large message
    can always be read."""
    total = 0
    for kept, frame in enumerate(reversed(frames) if newest else frames):
        total += len(frame) + 1
        if total > max_bytes and kept > 0:
            return kept
    return len(frames)


def client_id_of(text: str) -> dict[str, Any]:
    """{"client_id": …} of a frame refused before it could be read as one (a bad field), when it
    names a plausible one: the client learns which of its sends or changes failed."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    client_id = data.get("client_id") if isinstance(data, dict) else None
    return {"client_id": client_id} if isinstance(client_id, str) and 0 < len(client_id) <= 64 else {}


def error_frame(code: str, detail: str, **extra: Any) -> str:
    return dumps({"type": "error", "code": code, "detail": detail, **extra})
