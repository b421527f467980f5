"""One socket's place in one room: what a room's feed delivers to.

It keeps the room's cursor (the highest seq queued for this socket), turns a room's items into
frames (each message encoded once per process and the same str queued for every socket), and
holds live messages back while its replay catches up: replay reads the table until it reaches
what the feed has dispatched, then goes live in one step, so nothing is sent twice or skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

from chat.client import Client, RoomEvent
from chat.protocol import CLOSE_REMOVED, message_frame
from chat.store import Identity, MessageRecord

Item = MessageRecord | RoomEvent | str  # str: a frame for this socket alone (ack, error, ...)
Render = Callable[[MessageRecord], str | None]  # None: this socket does not show messages
HELD_EVENTS_MAX = 64  # ephemeral events kept while replaying; later ones are dropped
REPLAY_BATCH_BYTES = 64 * 1024  # a `messages` frame of a replay holds up to this much


class Subscription:
    __slots__ = (
        "_held",
        "_staged",
        "batch",
        "client",
        "cursor",
        "events",
        "live_batch",
        "live_only",
        "on_removed",
        "render",
        "replaying",
        "room",
        "room_id",
        "since",
        "tag",
    )

    def __init__(
        self,
        client: Client,
        room_id: int,
        room: str,
        *,
        render: Render | None = None,
        live_only: bool = False,
        events: bool = True,
        tag: bool = False,
        batch: bool = False,
        live_batch: bool = False,
    ) -> None:
        self.client = client
        self.room_id = room_id
        self.room = room
        # None: the room protocol's message frame (most sockets): no callable kept per socket.
        self.render = render
        self.live_only = live_only  # no history: start at the room's head when joining
        self.events = events  # room events (join, leave, typing) are shown
        self.cursor = 0
        self.replaying = not live_only  # until replay() calls go_live()
        # Name the room in this socket's own frames (acks, errors) too: for a socket of many rooms.
        self.tag = tag
        self.batch = batch  # replay in `messages` frames (the multiplexed socket)
        # Live messages that reach this process together (one commit's) go out as one `messages`
        # frame: one send instead of one per message (`?live=batch`). See stage().
        self.live_batch = live_batch
        self._staged: list[str] | None = None
        self._held: list[str] | None = None
        self.since = time.monotonic()
        # The user was removed from the room (the hub has taken this out of the feed already):
        # a socket of many rooms drops the room; by default the socket is closed. Called with
        # this subscription, so that one callable serves every room of a socket.
        self.on_removed: Callable[[Subscription], None] | None = None

    @property
    def identity(self) -> Identity | None:
        return self.client.identity

    @property
    def sent(self) -> int:
        return self.client.sent

    def offer(self, item: Item) -> None:
        """Queue an item for this socket (never blocks)."""
        if type(item) is MessageRecord:
            self.deliver(item)
        elif type(item) is RoomEvent:
            if self.events:
                if self.replaying:
                    held = self._held = self._held or []
                    if len(held) < HELD_EVENTS_MAX:
                        held.append(item.frame)
                else:
                    self.client.offer(item.frame)
        elif isinstance(item, str):
            self.client.offer(tagged(item, self.room) if self.tag else item)

    def deliver(self, message: MessageRecord, frame: str | None = None) -> None:
        """Queue a live message; `frame`: the room protocol's frame of it if the caller has it
        (the feed's, shared by all its sockets)."""
        text = self._live_text(message, frame)
        if text is not None:
            self.client.offer(text, 1)

    def stage(self, message: MessageRecord, frame: str | None = None) -> bool:
        """deliver(), but the frame waits for flush_staged(), which the feed calls once the
        messages that arrived with this one are staged too. True when this is the first staged:
        the feed then owes this subscription a flush."""
        text = self._live_text(message, frame)
        if text is None:
            return False
        staged = self._staged
        if staged is None:
            self._staged = [text]
            return True
        staged.append(text)
        return False

    def _live_text(self, message: MessageRecord, frame: str | None) -> str | None:
        """The frame of a live message this socket has not had, moving its cursor; None if the
        replay sends it (or already did), or this socket does not show it."""
        if self.replaying or message.seq <= self.cursor:
            return None
        self.cursor = message.seq
        return self._text(message, frame)

    def flush_staged(self) -> None:
        """Send what stage() kept: a lone message as its own frame, several as `messages`
        frames (of up to REPLAY_BATCH_BYTES each, as a replay's)."""
        staged, self._staged = self._staged, None
        for frames in batches(staged or [], REPLAY_BATCH_BYTES):
            if len(frames) == 1:
                self.client.offer(frames[0], 1)
            else:
                self.client.offer(batch_frame(self.room, frames), len(frames))

    async def replay_rows(self, rows: list[MessageRecord], *, timeout: float) -> None:
        """Queue replayed messages, waiting (bounded) for the reader: TimeoutError. One frame
        per message, or (`batch`) `messages` frames of up to REPLAY_BATCH_BYTES each."""
        client = self.client
        frames: list[str] = []
        for row in rows:
            if client.closing:
                return
            if row.seq <= self.cursor:
                continue
            self.cursor = row.seq
            text = self._text(row)
            if text is None:
                continue
            if not self.batch:
                await client.put(text, timeout=timeout, messages=1)
                continue
            frames.append(text)
        for batch in batches(frames, REPLAY_BATCH_BYTES):
            await client.put(batch_frame(self.room, batch), timeout=timeout, messages=len(batch))

    def _text(self, message: MessageRecord, frame: str | None = None) -> str | None:
        render = self.render
        if render is not None:
            return render(message)
        return frame if frame is not None else message_frame(self.room, message)

    def go_live(self) -> None:
        """Replay has caught up with the feed: from now on the feed's messages are queued."""
        self.replaying = False
        held, self._held = self._held, None
        for frame in held or ():
            self.client.offer(frame)

    def kick(self, code: int, reason: str, *, flush: bool = False) -> None:
        self.client.kick(code, reason, flush=flush)

    def go_away(self) -> None:
        self.client.go_away()

    def removed(self) -> None:
        if self.on_removed is not None:
            self.on_removed(self)
        else:
            self.client.kick(CLOSE_REMOVED, "removed from the room", flush=True)


def batches(frames: list[str], max_bytes: int) -> Iterator[list[str]]:
    """`frames` in order, in runs of at most `max_bytes` of text (a frame larger than that alone)."""
    run: list[str] = []
    size = 0
    for text in frames:
        if run and size + len(text) > max_bytes:
            yield run
            run, size = [], 0
        run.append(text)
        size += len(text) + 1
    if run:
        yield run


def batch_frame(room: str, frames: list[str]) -> str:
    """A `messages` frame: each message is its own frame's JSON, joined, not encoded again."""
    return f'{{"type":"messages","room":{json.dumps(room, ensure_ascii=False)},"messages":[{",".join(frames)}]}}'


def chapter_render(message: MessageRecord) -> str | None:
    """The chapter's /ws/{client_id}: plain text, the body alone, and no room events (nor changes
    of messages: an edit made in SQL is not a new line of text)."""
    return message.body if message.target_seq is None else None


def tagged(frame: str, room: str) -> str:
    """`frame` (a JSON object) naming `room`, if it does not already."""
    if '"room":' in frame or not frame.startswith("{") or len(frame) < 3:
        return frame
    return '{"room":' + json.dumps(room, ensure_ascii=False) + "," + frame[1:]
