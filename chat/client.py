"""One socket's outgoing side: a bounded queue drained by a single writer task.

Feeds and the receive loop only ever `offer()` (never block); the sender task is the only writer
to the socket. A socket whose queue overflows is cut off with CLOSE_SLOW_CONSUMER, so one slow
reader never stalls a room; it reconnects and resumes by seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from chat import metrics
from chat.protocol import CLOSE_GOING_AWAY, CLOSE_SLOW_CONSUMER
from chat.store import Identity, MessageRecord

log = logging.getLogger("chat.client")

# A slow consumer's close frame waits behind what it has not read yet: give it this long to
# drain and see the close code, then drop the connection (the client then sees 1006).
CLOSE_GRACE_SECONDS = 10.0


@dataclass(slots=True, frozen=True)
class RoomEvent:
    """An ephemeral room event (join, leave): fanned out, never stored, carries no seq."""

    frame: str


Item = MessageRecord | RoomEvent | str  # str: a frame for this socket alone (ack, error, ...)
Render = Callable[[Item], str | None]  # None: this socket does not show that item
Handler = Callable[[str | None], Coroutine[Any, Any, None]]  # one received frame; None if binary


class Client:
    def __init__(
        self,
        ws: WebSocket,
        *,
        queue_size: int,
        render: Render,
        identity: Identity | None = None,
        live_only: bool = False,
    ) -> None:
        self.ws = ws
        self.identity = identity
        self.live_only = live_only  # no history: start at the room's head when joining
        self.render = render
        self.queue: asyncio.Queue[Item] = asyncio.Queue(queue_size)
        self.cursor = 0  # the highest seq this socket has been sent
        self.overflowed = False
        self._busy = False  # a frame is being handled
        self._kicked: tuple[int, str] | None = None  # close code and reason, once cut off
        self.sent = 0  # messages sent to this socket
        self.close_code: int | None = None  # how the socket ended
        self._flush = False  # send what is queued before closing
        self._sender: asyncio.Task[None] | None = None
        self._receiver: asyncio.Task[None] | None = None
        # Work to finish before a graceful close, beyond the queue: the acks of sends in flight.
        self.settle: Callable[[], Awaitable[None]] | None = None

    def offer(self, item: Item) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True
            if self._sender is not None:
                self._sender.cancel()

    async def emit(self, item: Item) -> None:
        """Send one item now, skipping messages at or below the cursor (already sent)."""
        if isinstance(item, MessageRecord):
            if item.seq <= self.cursor:
                return
            self.cursor = item.seq
        text = self.render(item)
        if text is not None:
            await self.ws.send_text(text)
            if isinstance(item, MessageRecord):
                self.sent += 1
                metrics.MESSAGES_OUT.inc()

    async def _drain(self) -> None:
        while True:
            item = await self.queue.get()
            try:
                await self.emit(item)
                if isinstance(item, MessageRecord):  # live, not replayed: its delay means something
                    metrics.FANOUT_DELAY.observe((datetime.now(UTC) - item.sent_at).total_seconds())
            finally:
                self.queue.task_done()

    async def _receive(self, handle: Handler) -> None:
        """Hand each frame to `handle` (None for a binary frame) until the client leaves, or the
        server is going away: then stop between frames, never in the middle of one."""
        while self._kicked is None:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self.close_code = message.get("code", 1005)
                return
            self._busy = True
            try:
                await handle(message.get("text"))
            finally:
                self._busy = False

    def kick(self, code: int, reason: str, *, flush: bool = False) -> None:
        """Close this socket with `code`: stop reading (after the frame in hand), then either
        flush what is queued first (`flush`), or drop it (a revoked token gets nothing more)."""
        if self._kicked is not None:
            return
        self._kicked = (code, reason)
        metrics.REFUSALS.labels(metrics.reason_label(reason)).inc()
        self._flush = flush
        if not flush and self._sender is not None:
            self._sender.cancel()
        if self._receiver is not None and not self._busy:
            self._receiver.cancel()

    def go_away(self) -> None:
        """The server is shutting down: finish the frame in hand, flush, then close with 1001."""
        self.kick(CLOSE_GOING_AWAY, "server shutting down: reconnect and resume", flush=True)

    async def serve(self, handle: Handler) -> None:
        """Run the writer beside the reader until either ends, then close as needed."""
        self._sender = asyncio.create_task(self._drain())
        self._receiver = asyncio.create_task(self._receive(handle))
        tasks = (self._sender, self._receiver)
        if self._kicked is not None and not self._flush:  # cut off before it even started
            self._sender.cancel()
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if self._kicked is not None and self._flush and not self._sender.done():
                # What is queued (acks of in-flight sends, the errors of a flood) goes out first.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_GRACE_SECONDS):
                        if self.settle is not None:
                            await self.settle()
                        await self.queue.join()
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        error = results[1]
        if isinstance(error, Exception) and not isinstance(error, WebSocketDisconnect):
            # A bug in handling a frame: log it with the traceback, and let the client retry.
            log.error("receive loop failed", exc_info=error)
        if self.overflowed:
            log.info("closing a slow consumer (queue of %d full)", self.queue.maxsize)
            metrics.REFUSALS.labels("slow consumer").inc()
            await self.close(CLOSE_SLOW_CONSUMER, "slow consumer: reconnect and resume")
        elif self._kicked is not None:
            await self.close(*self._kicked)

    async def close(self, code: int, reason: str, grace: float = CLOSE_GRACE_SECONDS) -> None:
        self.close_code = code
        # Bounded: a client that stopped reading may never let the close frame through.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code, reason), grace)
