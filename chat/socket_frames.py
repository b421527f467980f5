"""The multiplexed socket's frames in (`/socket`, README "One socket for many rooms").

The room socket's frames (chat/protocol.py), each naming its room, plus `subscribe` and
`unsubscribe`. Frames out are the room socket's, each naming its room.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from chat.protocol import (
    DeleteFrame,
    EditFrame,
    HistoryFrame,
    PingFrame,
    ReactFrame,
    ReadFrame,
    SendFrame,
    TypingFrame,
    UnreactFrame,
    _Frame,
    validate,
)

ROOM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_SEQ = 2**63 - 1  # seqs are bigint
RoomField = Annotated[str, Field(max_length=64)]  # a frame's room (its name is checked on subscribe)


class _InRoom(_Frame):
    """A frame that names its room: on /socket, every room socket frame (chat/protocol.py) is
    the same model plus this field, declared once (the mixin comes first so that `room` stays the
    last field: the same first error for a frame with several faults)."""

    room: RoomField


class SubscribeFrame(_Frame):
    type: Literal["subscribe"]
    room: RoomField
    after: int | None = Field(default=None, ge=0, le=MAX_SEQ)


class UnsubscribeFrame(_Frame):
    type: Literal["unsubscribe"]
    room: RoomField


# The room socket's frames with `room` added: nothing else differs (tests/test_socket_frames.py).
class RoomSendFrame(_InRoom, SendFrame): ...


class RoomHistoryFrame(_InRoom, HistoryFrame): ...


class RoomTypingFrame(_InRoom, TypingFrame): ...


class RoomEditFrame(_InRoom, EditFrame): ...


class RoomDeleteFrame(_InRoom, DeleteFrame): ...


class RoomReactFrame(_InRoom, ReactFrame): ...


class RoomUnreactFrame(_InRoom, UnreactFrame): ...


class RoomReadFrame(_InRoom, ReadFrame): ...


RoomChangeFrame = RoomEditFrame | RoomDeleteFrame | RoomReactFrame | RoomUnreactFrame
Incoming = (
    SubscribeFrame
    | UnsubscribeFrame
    | RoomSendFrame
    | RoomHistoryFrame
    | RoomTypingFrame
    | RoomEditFrame
    | RoomDeleteFrame
    | RoomReactFrame
    | RoomUnreactFrame
    | RoomReadFrame
    | PingFrame
)
RoomFrame = RoomSendFrame | RoomHistoryFrame | RoomTypingFrame | RoomChangeFrame | RoomReadFrame
_incoming: TypeAdapter[Incoming] = TypeAdapter(Annotated[Incoming, Field(discriminator="type")])


def parse(text: str) -> Incoming:
    return validate(
        _incoming,
        text,
        (
            'the frame needs a "type": subscribe, unsubscribe, send, edit, delete, react, unreact, history, typing,'
            " read or ping"
        ),
    )
