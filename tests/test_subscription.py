"""chat/subscription.py, and the objects every open socket keeps: no more bytes than they need."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from chat import protocol
from chat.client import Client, RoomEvent
from chat.config import Settings
from chat.limits import FrameGuard, Limits, TokenBucket
from chat.service import RoomSession
from chat.store import Identity, MessageRecord
from chat.subscription import Subscription, batch_frame, batches
from chat.writer import InFlight

USER = Identity(user_id=7, name="ann", token_id=1, expires_at=None)


def subscription(**kwargs: Any) -> Subscription:
    client = Client(cast(Any, None), max_items=10, max_bytes=10_000, identity=USER)
    return Subscription(client, 1, "general", **kwargs)


def queued(sub: Subscription) -> list[str]:
    return list(sub.client._out or ())


async def test_messages_go_out_as_the_room_frame_without_a_render_of_their_own() -> None:
    """Most sockets show the room protocol's frame: no callable is kept per socket for it."""
    # async: offer() counts the frame in the metrics on the running event loop (chat/client.py)
    sub = subscription()
    assert sub.render is None
    sub.go_live()
    record = MessageRecord(seq=1, author="bob", body="hi")
    sub.offer(record)
    assert queued(sub) == [protocol.message_frame("general", record)]
    assert sub.cursor == 1 and sub.client.sent == 1


async def test_a_render_of_its_own_still_wins() -> None:
    sub = subscription(render=lambda record: f"plain {record.body}")
    sub.go_live()
    sub.offer(MessageRecord(seq=1, author="bob", body="hi"))
    assert queued(sub) == ["plain hi"]


def test_a_removal_tells_its_owner_which_subscription_it_was() -> None:
    """One callable serves every room of a socket: it is told which room's subscription ended."""
    told: list[Subscription] = []
    first, second = subscription(), subscription()
    first.on_removed = second.on_removed = told.append
    second.removed()
    assert told == [second]
    assert not second.client.closing  # the owner decides; nothing is closed behind its back


def test_without_an_owner_a_removal_closes_the_socket() -> None:
    sub = subscription()
    sub.removed()
    assert sub.client.closing


@pytest.mark.parametrize(
    "cls", [Client, Subscription, RoomSession, FrameGuard, TokenBucket, InFlight, Identity, RoomEvent]
)
def test_objects_kept_per_socket_have_no_instance_dict(cls: type) -> None:
    """Each open socket (and each room of a /socket) keeps these for its whole life: slots, no
    __dict__ (a dict costs about 100 bytes more per object, times every socket)."""
    assert cls.__dictoffset__ == 0, f"{cls.__name__} has an instance __dict__"


def test_a_room_sockets_session_makes_its_sends_in_flight_on_first_use() -> None:
    """An idle room socket keeps no InFlight; its first send makes one, and later ones reuse it."""
    settings = Settings(database_url="postgresql://nobody@localhost/none")
    sub = subscription()
    guard = FrameGuard(Limits(settings), USER.user_id)
    nothing = cast(Any, None)

    def session(**inflight: InFlight) -> RoomSession:
        return RoomSession(
            settings=settings,
            engine=nothing,
            hub=nothing,
            identity=USER,
            room_id=1,
            room="general",
            client=sub,
            guard=guard,
            writer=nothing,
            **inflight,
        )

    alone = session()
    assert alone._inflight is None and sub.client.settle is None
    inflight = alone.inflight
    assert alone.inflight is inflight and inflight.count == 0
    assert sub.client.settle == inflight.settle  # a graceful close now flushes their answers
    shared = InFlight(4, sub.client.offer)
    with_owner = session(inflight=shared)
    assert with_owner.inflight is shared
    assert sub.client.settle == inflight.settle  # the owner of a shared one flushes it


async def test_staged_messages_go_out_together_as_one_messages_frame() -> None:
    """`live=batch`: what is staged before a flush is one `messages` frame (each message its own
    frame's JSON); a lone message is its `message` frame; nothing is sent before the flush."""
    sub = subscription(live_batch=True)
    sub.go_live()
    records = [MessageRecord(seq=n, author="bob", body=f"m{n}") for n in (1, 2, 3)]
    assert [sub.stage(r) for r in records] == [True, False, False]  # the feed owes one flush
    assert queued(sub) == [] and sub.cursor == 3
    sub.flush_staged()
    frames = [protocol.message_frame("general", r) for r in records]
    assert queued(sub) == [batch_frame("general", frames)]
    assert json.loads(queued(sub)[0])["messages"] == [json.loads(f) for f in frames]
    assert sub.client.sent == 3
    fourth = MessageRecord(seq=4, author="bob", body="m4")  # one record: its sent_at is taken when made
    assert sub.stage(fourth)
    assert not sub.stage(MessageRecord(seq=4, author="bob", body="m4"))  # already staged
    sub.flush_staged()
    sub.flush_staged()  # nothing left: nothing more sent
    assert queued(sub)[1:] == [protocol.message_text("general", fourth)]


async def test_nothing_is_staged_while_replaying() -> None:
    sub = subscription(live_batch=True)
    assert not sub.stage(MessageRecord(seq=1, author="bob", body="hi"))  # the replay reads it
    sub.flush_staged()
    assert queued(sub) == [] and sub.cursor == 0


def test_batches_keep_order_and_split_by_bytes() -> None:
    frames = ["a" * 40, "b" * 40, "c" * 40, "d" * 200, "e"]
    runs = list(batches(frames, 100))
    assert [x for run in runs for x in run] == frames
    assert runs == [["a" * 40, "b" * 40], ["c" * 40], ["d" * 200], ["e"]]  # one too big goes alone
    assert list(batches([], 100)) == []
