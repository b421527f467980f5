"""A client that behaves like the page under faults: it reconnects to any server with backoff,
resumes with `after`, resends unacknowledged messages with the same client_id, and records any
gap or duplicate it ever sees as a violation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus


@dataclass
class Stats:
    sent: int = 0
    resent: int = 0
    acked: int = 0
    duplicate_acks: int = 0
    unavailable: int = 0
    connects: int = 0
    refused: int = 0
    refused_with: Counter[int] = field(default_factory=Counter)  # HTTP status of each refusal
    closes: Counter[int | None] = field(default_factory=Counter)


class ResilientClient:
    def __init__(
        self, name: str, urls: list[str], token: str, bodies: list[str], *, pace: float, first: int = 0
    ) -> None:
        self.name = name
        self.urls = urls
        self.token = token
        self.todo = list(bodies)
        self.pace = pace
        self.last_seq = 0
        self.seqs: list[int] = []
        self.violations: list[str] = []
        self.pending: dict[str, str] = {}  # client_id -> body: sent, not yet acknowledged
        self.acked_ids: list[str] = []  # every client_id the server said it stored, in order
        self.stats = Stats()
        self.server = first % len(urls)  # which server to try first
        self.ws: ClientConnection | None = None
        self._count = 0

    def _next_id(self) -> str:
        self._count += 1
        return f"{self.name}-{self._count}"

    async def run(self, total: int, timeout: float) -> None:
        """Send everything, and keep (re)connecting until every message of the room up to
        `total` has been seen and every send acknowledged."""
        async with asyncio.timeout(timeout):
            delay = 0.05
            while self.todo or self.pending or self.last_seq < total:
                try:
                    await self._session(total)
                    delay = 0.05
                except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                    if isinstance(exc, InvalidStatus):
                        self.stats.refused += 1
                        self.stats.refused_with[exc.response.status_code] += 1
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 1.0)
                self.server = (self.server + 1) % len(self.urls)  # try another process next

    async def _session(self, total: int) -> None:
        # Always resume from what was seen, 0 included: without `after` the server replays the
        # recent tail as history, which a client that has seen nothing would record as a gap.
        url = self.urls[self.server] + f"?after={self.last_seq}"
        ws = await connect(url, additional_headers={"Cookie": f"session={self.token}"}, open_timeout=5)
        self.ws = ws
        self.stats.connects += 1
        sender: asyncio.Task[None] | None = None
        try:
            async for raw in ws:
                frame: dict[str, Any] = json.loads(raw)
                kind = frame["type"]
                if kind == "ready":
                    for client_id, body in list(self.pending.items()):  # resend what was not acked
                        self.stats.resent += 1
                        await ws.send(json.dumps({"type": "send", "body": body, "client_id": client_id}))
                    sender = sender or asyncio.create_task(self._send_new(ws))
                elif kind == "message":
                    self._see(frame)
                elif kind == "ack":
                    if self.pending.pop(frame["client_id"], None) is not None:
                        self.stats.acked += 1
                        self.acked_ids.append(frame["client_id"])
                    self.stats.duplicate_acks += bool(frame["duplicate"])
                elif kind == "error":
                    if frame["code"] != "unavailable" or frame.get("client_id") not in self.pending:
                        self.violations.append(f"unexpected error {frame}")
                        continue
                    self.stats.unavailable += 1
                    asyncio.get_running_loop().call_later(0.2, self._resend, ws, frame["client_id"])
                if not self.todo and not self.pending and self.last_seq >= total:
                    await ws.close()
                    return
        finally:
            self.ws = None
            self.stats.closes[ws.close_code] += 1
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await sender

    def _see(self, frame: dict[str, Any]) -> None:
        seq = frame["seq"]
        if seq <= self.last_seq:
            self.violations.append(f"duplicate seq {seq} after {self.last_seq}")
            return
        if seq != self.last_seq + 1:
            self.violations.append(f"gap: seq {seq} after {self.last_seq}")
        self.last_seq = seq
        self.seqs.append(seq)

    def _resend(self, ws: ClientConnection, client_id: str) -> None:
        if client_id in self.pending and ws is self.ws:
            body = self.pending[client_id]
            self.stats.resent += 1
            frame = json.dumps({"type": "send", "body": body, "client_id": client_id})
            task = asyncio.ensure_future(ws.send(frame))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _send_new(self, ws: ClientConnection) -> None:
        while self.todo:
            client_id = self._next_id()
            body = self.todo.pop(0)
            self.pending[client_id] = body  # pending before sending: a lost send is resent
            self.stats.sent += 1
            await ws.send(json.dumps({"type": "send", "body": body, "client_id": client_id}))
            await asyncio.sleep(self.pace * (0.5 + random.random()))

    def drop_network(self) -> None:
        """Lose the connection without a close frame, as when a network drops."""
        if self.ws is not None and self.ws.transport is not None:
            self.ws.transport.abort()
