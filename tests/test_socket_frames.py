"""The multiplexed socket's frames (chat/socket_frames.py): each room frame is the room socket's
frame (chat/protocol.py) plus `room`, and nothing else."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from chat import protocol, socket_frames
from chat.protocol import BadFrame

PAIRS: list[tuple[type[BaseModel], type[BaseModel]]] = [
    (socket_frames.RoomSendFrame, protocol.SendFrame),
    (socket_frames.RoomHistoryFrame, protocol.HistoryFrame),
    (socket_frames.RoomTypingFrame, protocol.TypingFrame),
    (socket_frames.RoomEditFrame, protocol.EditFrame),
    (socket_frames.RoomDeleteFrame, protocol.DeleteFrame),
    (socket_frames.RoomReactFrame, protocol.ReactFrame),
    (socket_frames.RoomUnreactFrame, protocol.UnreactFrame),
    (socket_frames.RoomReadFrame, protocol.ReadFrame),
]


@pytest.mark.parametrize(("room_frame", "frame"), PAIRS, ids=[p[1].__name__ for p in PAIRS])
def test_a_room_frame_is_its_room_socket_frame_plus_room(room_frame: type[BaseModel], frame: type[BaseModel]) -> None:
    assert issubclass(room_frame, frame)
    # The same fields in the same order (the first error of a frame with several faults), `room` last.
    assert list(room_frame.model_fields) == [*frame.model_fields, "room"]
    schema, base = room_frame.model_json_schema(), frame.model_json_schema()
    assert schema["properties"].pop("room") == {"maxLength": 64, "title": "Room", "type": "string"}
    assert schema["properties"] == base["properties"]
    assert schema["required"] == [*base.get("required", []), "room"]
    assert schema["additionalProperties"] is False


def test_parse_reads_each_room_frame_and_refuses_what_the_room_socket_refuses() -> None:
    frame = socket_frames.parse('{"type":"edit","room":"general","target_seq":3,"body":"x","client_id":"c1"}')
    assert isinstance(frame, socket_frames.RoomEditFrame)
    assert (frame.room, frame.target_seq, frame.body, frame.client_id) == ("general", 3, "x", "c1")
    assert isinstance(socket_frames.parse('{"type":"ping"}'), protocol.PingFrame)
    with pytest.raises(BadFrame) as missing:
        socket_frames.parse('{"type":"send","body":"hi"}')
    assert (missing.value.code, missing.value.detail) == ("invalid_frame", "room: Field required")
    with pytest.raises(BadFrame) as extra:
        socket_frames.parse('{"type":"read","room":"general","seq":1,"x":1}')
    assert extra.value.detail == "x: Extra inputs are not permitted"
    with pytest.raises(BadFrame) as long_room:
        socket_frames.parse('{"type":"typing","room":"' + "r" * 65 + '"}')
    assert long_room.value.detail.startswith("room: String should have at most 64 characters")
    with pytest.raises(BadFrame) as two_faults:  # the base's field is reported first, as before
        socket_frames.parse('{"type":"delete"}')
    assert two_faults.value.detail == "target_seq: Field required"
