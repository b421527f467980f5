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


class SubscribeFrame(_Frame):
    type: Literal["subscribe"]
    room: str = Field(max_length=64)
    after: int | None = Field(default=None, ge=0, le=MAX_SEQ)


class UnsubscribeFrame(_Frame):
    type: Literal["unsubscribe"]
    room: str = Field(max_length=64)


class RoomSendFrame(SendFrame):
    room: str = Field(max_length=64)


class RoomHistoryFrame(HistoryFrame):
    room: str = Field(max_length=64)


class RoomTypingFrame(TypingFrame):
    room: str = Field(max_length=64)


class RoomEditFrame(EditFrame):
    room: str = Field(max_length=64)


class RoomDeleteFrame(DeleteFrame):
    room: str = Field(max_length=64)


class RoomReactFrame(ReactFrame):
    room: str = Field(max_length=64)


class RoomUnreactFrame(UnreactFrame):
    room: str = Field(max_length=64)


class RoomReadFrame(ReadFrame):
    room: str = Field(max_length=64)


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
