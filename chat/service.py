"""A room socket's session: validates what the client sends, stores it, and answers."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from chat import metrics, protocol, store
from chat.client import Client
from chat.config import Settings
from chat.hub import Hub
from chat.limits import FrameGuard, RateLimited
from chat.protocol import CLOSE_FLOOD, BadFrame, HistoryFrame, PingFrame, SendFrame, TypingFrame
from chat.store import Identity

log = logging.getLogger("chat.service")

REPLAY_PAGE = 500


def check_body(body: str, *, max_bytes: int) -> None:
    size = len(body.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise BadFrame("too_large", f"the message is {size} bytes; the limit is {max_bytes}")
    if not body.strip():
        raise BadFrame("empty", "the message is empty")
    if "\x00" in body:
        raise BadFrame("invalid_text", "the message contains a NUL character")
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        raise BadFrame("invalid_text", "the message contains a lone surrogate") from None


def admit(guard: FrameGuard, client: Client) -> RateLimited | None:
    """Charge one frame to the rate limits: None if it may be handled; else why not (and a
    client that keeps sending while refused is cut off as a flood)."""
    try:
        guard.check()
        return None
    except RateLimited as refused:
        metrics.REFUSALS.labels("rate_limited").inc()
        if refused.flood:
            client.kick(CLOSE_FLOOD, "flood: too many frames while rate limited", flush=True)
        return refused


class RoomSession:
    def __init__(
        self,
        *,
        settings: Settings,
        engine: AsyncEngine,
        hub: Hub,
        identity: Identity,
        room_id: int,
        room: str,
        client: Client,
        guard: FrameGuard,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.hub = hub
        self.identity = identity
        self.room_id = room_id
        self.room = room
        self.client = client
        self.guard = guard
        self._typed_at = -1e9  # when this socket's last typing event went out

    async def replay(self, *, after: int | None, online: list[str]) -> None:
        """Send history straight to the socket; the live queue fills meanwhile and the cursor
        drops what replay already sent. With `after`: every message after it, page by page."""
        client = self.client
        async with self.engine.connect() as conn:
            head = await store.room_head(conn, room_id=self.room_id)
            if after is None:
                rows = await store.messages_before(
                    conn, room_id=self.room_id, before=None, limit=self.settings.history_on_join
                )
                client.cursor = rows[0].seq - 1 if rows else head
                for row in rows:
                    await client.emit(row)
            else:
                client.cursor = min(after, head)  # a cursor from the future: resume from now
                while rows := await store.messages_after(
                    conn, room_id=self.room_id, after=client.cursor, limit=REPLAY_PAGE
                ):
                    for row in rows:
                        await client.emit(row)
        await client.emit(
            protocol.dumps(
                {
                    "type": "ready",
                    "room": self.room,
                    "user": self.identity.name,
                    "last_seq": client.cursor,
                    "online": online,
                }
            )
        )

    async def handle(self, text: str | None) -> None:
        if refused := admit(self.guard, self.client):
            detail = f"slow down: retry in {refused.retry_after:.1f}s"
            self.client.offer(protocol.error_frame("rate_limited", detail, retry_after=round(refused.retry_after, 2)))
            return
        if text is None:
            self.client.offer(protocol.error_frame("binary_not_supported", "send JSON text frames"))
            return
        frame: protocol.Incoming | None = None
        try:
            frame = protocol.parse(text)
            if isinstance(frame, SendFrame):
                await self.send(frame)
            elif isinstance(frame, HistoryFrame):
                await self.history(frame)
            elif isinstance(frame, TypingFrame):
                await self.typing()
            elif isinstance(frame, PingFrame):
                self.reply({"type": "pong"})
        except BadFrame as exc:
            metrics.REFUSALS.labels(exc.code).inc()
            # Errors answering a send name its client_id, so the client knows which one failed.
            extra = {"client_id": frame.client_id} if isinstance(frame, SendFrame) else {}
            self.client.offer(protocol.error_frame(exc.code, exc.detail, **extra))

    def reply(self, frame: dict[str, Any]) -> None:
        self.client.offer(protocol.dumps(frame))

    async def send(self, frame: SendFrame) -> None:
        check_body(frame.body, max_bytes=self.settings.max_message_bytes)
        try:
            async with self.engine.connect() as conn:
                appended = await store.append_message(
                    conn,
                    room_id=self.room_id,
                    author_id=self.identity.user_id,
                    author=self.identity.name,
                    body=frame.body,
                    client_id=frame.client_id,
                    notify=self.hub.database_notifies,
                )
        except Exception as exc:
            log.warning("storing a message failed: %r", exc)
            raise BadFrame("unavailable", "the message was not stored; send it again") from None
        if not appended.duplicate:
            metrics.MESSAGES_IN.inc()
        self.reply(
            {
                "type": "ack",
                "client_id": frame.client_id,
                "seq": appended.message.seq,
                "duplicate": appended.duplicate,
            }
        )
        if not appended.duplicate:  # after the ack: a slow fan-out never holds the sender up
            await self.hub.published(self.room_id, [appended.message])

    async def typing(self) -> None:
        """Ephemeral: fanned out (NOTIFY or Redis), never stored, at most one per interval per
        socket (the rest are dropped quietly). Clients clear it when the typist's message or
        leave arrives, or after a few seconds of silence."""
        now = time.monotonic()
        if now - self._typed_at < self.settings.typing_interval_seconds:
            return
        self._typed_at = now
        await self.hub.publish(self.room_id, {"type": "typing", "user": self.identity.name})

    async def history(self, frame: HistoryFrame) -> None:
        limit = min(frame.limit, self.settings.history_page_max)
        async with self.engine.connect() as conn:
            rows = await store.messages_before(conn, room_id=self.room_id, before=frame.before, limit=limit)
        self.reply(
            {
                "type": "history",
                "room": self.room,
                "before": frame.before,
                "messages": [protocol.message_dict(self.room, r) for r in rows],
            }
        )
