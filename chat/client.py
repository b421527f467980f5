"""One socket's outgoing side: a queue of encoded frames, bounded in frames and in bytes.

Feeds and handlers only ever `offer()` a frame (never block); one writer task, started when
there is something to send and gone when the queue is empty, is the only writer to the socket.
The receive loop runs in the socket's own task, so an idle socket costs one task and no queue.

A socket is always either served or closed: a queue over either bound closes the socket with
CLOSE_SLOW_CONSUMER at once (whether or not the writer has started), dropping what was queued;
the client reconnects and resumes by seq. Replay fills the queue through `put()`, which waits
(bounded) for the reader instead of overflowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import types
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from chat import metrics
from chat.protocol import CLOSE_GOING_AWAY, CLOSE_SLOW_CONSUMER
from chat.store import Identity

log = logging.getLogger("chat.client")

# A kicked socket's close frame waits behind what it has not read yet: give it this long to
# drain and see the close code, then drop the connection (the client then sees 1006).
CLOSE_GRACE_SECONDS = 10.0
SLOW_CONSUMER = "slow consumer: reconnect and resume"


@dataclass(slots=True, frozen=True)
class RoomEvent:
    """An ephemeral room event (join, leave, typing): fanned out, never stored, carries no seq."""

    frame: str


Handler = Callable[[str | None], Coroutine[Any, Any, None]]  # one received frame; None if binary
Start = Callable[[], Coroutine[Any, Any, None]]


@types.coroutine
def resume(coroutine: Coroutine[Any, Any, Any], waiting_on: Any) -> Generator[Any, Any, Any]:
    """Await the rest of `coroutine`, which was stepped once by hand (`send(None)`) and yielded
    `waiting_on` (the future it waits for): the task awaiting this runs it on from there, as if
    it had awaited it from the start (results, exceptions and cancellation pass through)."""
    value = waiting_on
    while True:
        try:
            received = yield value
        except GeneratorExit:
            coroutine.close()
            raise
        except BaseException as exc:  # a cancellation, or the future's exception: theirs to handle
            try:
                value = coroutine.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                value = coroutine.send(received)
            except StopIteration as stop:
                return stop.value


async def _awaiting(awaitable: Awaitable[None]) -> None:
    await awaitable


_uncounted = 0  # message frames queued since the metrics last heard (this event loop turn)


def _count(messages: int) -> None:
    """Count queued message frames in the metrics once per turn of the event loop, not once per
    frame: a message fanned out to a room's sockets is one increment."""
    global _uncounted
    if not _uncounted:
        asyncio.get_running_loop().call_soon(_report)
    _uncounted += messages


def _report() -> None:
    global _uncounted
    count, _uncounted = _uncounted, 0
    metrics.MESSAGES_OUT.inc(count)


class Client:
    __slots__ = (
        "_broken",
        "_bytes",
        "_drained",
        "_flush",
        "_kicked",
        "_out",
        "_receiving",
        "_self_cancel",
        "_serving",
        "_task",
        "_writer",
        "close_code",
        "identity",
        "max_bytes",
        "max_items",
        "overflowed",
        "sent",
        "settle",
        "ws",
    )

    def __init__(self, ws: WebSocket, *, max_items: int, max_bytes: int, identity: Identity | None = None) -> None:
        self.ws = ws
        self.identity = identity
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.sent = 0  # message frames queued for this socket
        self.close_code: int | None = None  # how the socket ended
        self.overflowed = False
        self._out: deque[str] | None = None  # made on first use: most idle sockets never need one
        self._bytes = 0
        self._kicked: tuple[int, str] | None = None  # close code and reason, once cut off
        self._flush = False  # send what is queued before closing
        self._serving = False  # accepted: the writer may run
        self._receiving = False  # waiting in ws.receive(): the one place a kick may interrupt
        self._self_cancel = False
        self._writer: asyncio.Task[None] | None = None
        self._task: asyncio.Task[Any] | None = None  # the socket's own task, running serve()
        self._drained: asyncio.Event | None = None
        self._broken = False  # a send failed: the socket is gone
        # Work to finish before a graceful close, beyond the queue: the acks of sends in flight.
        self.settle: Callable[[], Awaitable[None]] | None = None

    @property
    def closing(self) -> bool:
        return self._kicked is not None or self._broken

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def offer(self, text: str, messages: int = 0) -> bool:
        """Queue one frame (holding `messages` message frames, counted in `sent`); False if it
        was dropped (the socket is closing, or just overflowed).

        With nothing queued and no writer running, the frame is sent at once, in this call: a
        send normally completes without suspending (the transport takes it), so most deliveries
        cost no task. If the send does suspend (the transport is paused), the frame stays first
        in the queue, counted in its bounds, and a writer task finishes that very send first."""
        if self._broken or (self._kicked is not None and not self._flush):
            return False
        out = self._out
        size = len(text)
        if out is None:
            if self._serving and self._writer is None and size <= self.max_bytes and self.max_items > 0:
                self._tally(messages)
                self._send_now(text)
                return True
            out = self._out = deque()
        if len(out) >= self.max_items or self._bytes + size > self.max_bytes:
            log.info("closing a slow consumer (%d frames, %d bytes queued)", len(out), self._bytes)
            self.overflowed = True
            self.kick(CLOSE_SLOW_CONSUMER, SLOW_CONSUMER)
            return False
        out.append(text)
        self._bytes += size
        self._tally(messages)
        if self._serving and self._writer is None:
            self._writer = asyncio.create_task(self._drain())
        return True

    def _tally(self, messages: int) -> None:
        if messages:
            _count(messages)
            self.sent += messages

    def _send_now(self, text: str) -> None:
        """Start sending `text` (nothing queued, no writer): one step of the send coroutine."""
        ws = self.ws
        if ws.application_state is WebSocketState.CONNECTED:
            # What ws.send_text does in this state, without its checks of the message's type,
            # once per delivery: straight to the server's send.
            sending = ws._send({"type": "websocket.send", "text": text})
            send = sending if type(sending) is types.CoroutineType else _awaiting(sending)
        else:
            send = ws.send_text(text)
        try:
            waiting_on = send.send(None)
        except StopIteration:
            return
        except Exception as exc:  # the socket is gone; the receive loop hears of it
            log.debug("send failed: %r", exc)
            self._broken = True
            return
        # Suspended mid-send: the frame is queued (first) until the writer has finished it.
        self._out = deque((text,))
        self._bytes = len(text)
        self._writer = asyncio.create_task(self._drain(resume(send, waiting_on)))

    async def put(self, text: str, *, timeout: float, messages: int = 0) -> None:
        """Queue one frame of a replay: wait (up to `timeout`: TimeoutError) while the queue is
        half full, so that a replay never overflows a client that reads."""
        out = self._out
        if out and (self._bytes + len(text) > self.max_bytes // 2 or len(out) >= self.max_items // 2):
            async with asyncio.timeout(timeout):
                await self.drained()
        self.offer(text, messages)

    async def drained(self) -> None:
        """Until the queue is empty (or the socket is closing)."""
        while self._out and not self.closing:
            event = self._drained
            if event is None or event.is_set():  # one event for every waiter (replays of several rooms)
                event = self._drained = asyncio.Event()
            await event.wait()

    async def _drain(self, started: Awaitable[None] | None = None) -> None:
        """Send what is queued, in order; `started`: the rest of a send of the first frame that
        offer() began and that suspended."""
        out = self._out
        try:
            if started is not None:
                await started
                if out:
                    self._bytes -= len(out.popleft())
            while out:
                text = out[0]
                await self.ws.send_text(text)
                out.popleft()
                self._bytes -= len(text)
        except Exception as exc:  # the socket is gone; the receive loop hears of it
            log.debug("send failed: %r", exc)
            self._broken = True
        finally:
            self._writer = None
            if not out and self._out is out:
                self._out = None  # an idle socket keeps no queue
            if self._drained is not None and not (out and not self._broken):
                self._drained.set()

    def kick(self, code: int, reason: str, *, flush: bool = False) -> None:
        """Close this socket with `code`: stop reading (after the frame in hand), then either
        flush what is queued first (`flush`), or drop it (a revoked token gets nothing more)."""
        if self._kicked is not None:
            return
        self._kicked = (code, reason)
        metrics.REFUSALS.labels(metrics.reason_label(reason)).inc()
        self._flush = flush
        if not flush:
            self._out, self._bytes = None, 0  # free it now, not when the socket's task ends
            if self._writer is not None:
                self._writer.cancel()
        if self._drained is not None:
            self._drained.set()
        if self._receiving and self._task is not None and not self._self_cancel:
            # Only ever while it waits for a frame: never in the middle of handling one.
            self._self_cancel = True
            self._task.cancel()

    def go_away(self) -> None:
        """The server is shutting down: finish the frame in hand, flush, then close with 1001."""
        self.kick(CLOSE_GOING_AWAY, "server shutting down: reconnect and resume", flush=True)

    async def serve(self, handle: Handler, start: Start | None = None) -> None:
        """Run `start` (a replay), then hand every received frame to `handle` until the client
        leaves or the socket is kicked; then flush or drop what is queued, and close as needed."""
        task = self._task = asyncio.current_task()
        self._serving = True
        if self._out and self._writer is None and (self._kicked is None or self._flush):
            self._writer = asyncio.create_task(self._drain())
        try:
            if start is not None and self._kicked is None:
                await start()
            start = None  # nor is what the replay was given (who was online) kept for the socket's life
            while self._kicked is None and not self._broken:
                self._receiving = True
                try:
                    message = await self.ws.receive()
                finally:
                    self._receiving = False
                if message["type"] == "websocket.disconnect":
                    self.close_code = message.get("code", 1005)
                    break
                await handle(message.get("text"))
        except asyncio.CancelledError:
            # Ours (a kick while waiting for a frame) ends the loop; anyone else's goes on up.
            if not self._self_cancel or task is None or task.uncancel() > 0:
                self._stop_writer()
                raise
        except WebSocketDisconnect as exc:
            self.close_code = exc.code
        except Exception:
            # A bug in handling a frame: log it with the traceback, and let the client retry.
            log.error("receive loop failed", exc_info=True)
        try:
            if self._kicked is not None and self._flush and self.close_code is None:
                # What is queued (acks of in-flight sends, the errors of a flood) goes out first,
                # within one grace period: sends in flight are answered, then the queue drains.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_GRACE_SECONDS):
                        if self.settle is not None:
                            await self.settle()
                        if (writer := self._writer) is not None:
                            await asyncio.wait((writer,))
        finally:
            self._serving = False
            await self._stop_writer_and_wait()
        if self._kicked is not None and self.close_code is None:
            await self.close(*self._kicked)

    def _stop_writer(self) -> None:
        self._serving = False
        if self._writer is not None:
            self._writer.cancel()

    async def _stop_writer_and_wait(self) -> None:
        writer = self._writer
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        self._out, self._bytes = None, 0

    async def close(self, code: int, reason: str, grace: float = CLOSE_GRACE_SECONDS) -> None:
        self.close_code = code
        # Bounded: a client that stopped reading may never let the close frame through.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code, reason), grace)
