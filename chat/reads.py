"""Read positions, coalesced: a client may send `read` frames as fast as it scrolls, and the
database sees at most one small write per (user, room) per interval.

Frames only raise the pending seq of their (user, room); once per interval every pending
position is written in one UPDATE (never backwards, never past the room's head), and each that
moved is published as a `read` event on the room's channel, so that every socket of that user,
in every process, hears it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from chat import membership

log = logging.getLogger("chat.reads")

Publish = Callable[..., Awaitable[None]]  # Hub.publish(room_id, kind, user, **extra)


class ReadPositions:
    def __init__(
        self, engine: AsyncEngine, publish: Publish, *, interval: float = 1.0, max_pending: int = 100_000
    ) -> None:
        self.engine = engine
        self.publish = publish
        self.interval = interval
        self.max_pending = max_pending  # (user, room) pairs waiting; beyond it, frames are refused
        self._pending: dict[tuple[int, int], int] = {}
        self._names: dict[int, str] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="read-positions")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()  # what clients marked read last is not lost on a clean stop

    def advance(self, *, user_id: int, user: str, room_id: int, seq: int) -> bool:
        """Note a read position; False when too many are pending (the caller says try again)."""
        key = (user_id, room_id)
        if key not in self._pending and len(self._pending) >= self.max_pending:
            return False
        self._pending[key] = max(seq, self._pending.get(key, 0))
        self._names[user_id] = user
        self._wake.set()
        return True

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # the database is away: the positions wait for the next round
                log.warning("read positions not written: %r", exc)
            # The interval is the coalescing: frames meanwhile only raise the pending seqs.
            await asyncio.sleep(self.interval)

    async def flush(self) -> None:
        batch, self._pending = self._pending, {}
        names, self._names = self._names, {}
        if not batch:
            return
        try:
            async with self.engine.connect() as conn:
                moved = await membership.advance_reads(conn, positions=batch)
        except BaseException:
            for key, seq in batch.items():  # put them back, unless newer ones came meanwhile
                self._pending[key] = max(seq, self._pending.get(key, 0))
            self._names = {**names, **self._names}
            raise
        for user_id, room_id, seq in moved:
            # Not "seq": a payload with a seq is a stored message's (chat/notify.py).
            await self.publish(room_id, "read", names.get(user_id, ""), user_id=user_id, read_seq=seq)
