"""Who is online in which room, across every server process.

Each process beats in `chat_processes`; each (room, user) it serves has a `presence` row with
its socket count. A user goes online in a room with their first socket anywhere and offline with
their last: that is decided under a per-(room, user) advisory lock, and the join or leave event
is NOTIFYed in the same transaction, so events follow the state in commit order (with Redis
fan-out the event is published right after its transaction commits, never for a rollback). A
process that stops beating (kill -9, a frozen host) is dead after `stale` seconds: the living
reap its rows and announce the leaves, with no manual clean-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chat import notify
from chat.config import get_settings
from chat.db import DriverStatement, create_engine, fetch, reading
from chat.store import Identity

log = logging.getLogger("chat.presence")


class NotMember(Exception):
    """A join's presence enter found the user no longer a member of the room."""


# One lock per (room, user): the two ints packed into the lock's two-int4 form would overflow
# for large ids, so hash them into its one-bigint form instead.
_LOCK = text(
    "SELECT pg_advisory_xact_lock(hashtextextended(CAST(:room_id AS bigint)::text || ':'"
    " || CAST(:user_id AS bigint)::text, 0))"
)
_LIVE_SOCKETS = text(
    "SELECT coalesce(sum(p.sockets), 0) FROM presence p JOIN chat_processes c ON c.id = p.process_id"
    " WHERE p.room_id = :room_id AND p.user_id = :user_id AND c.beat_at > now() - make_interval(secs => :stale)"
)
# A change of this process's socket count in a (room, user), in one round trip: migration 0010's
# function takes the (room, user) lock (the key _LOCK takes), applies the change under it, NOTIFYs
# a join or leave (with :notify), and returns who is online in the room after it. With
# :members_only it first checks, under the lock, that the user is still a member of the room
# (`member` false: nothing was changed).
_CHANGE = DriverStatement.of(
    text(
        "SELECT before, after, online, member FROM chat_presence_change(CAST(:room_id AS bigint),"
        " CAST(:user_id AS bigint), CAST(:process_id AS text), CAST(:name AS text), CAST(:delta AS integer),"
        " CAST(:stale AS double precision), CAST(:notify AS boolean), CAST(:channel AS text), CAST(:join AS text),"
        " CAST(:leave AS text), CAST(:members_only AS boolean))"
    )
)
_NOTIFY = text("SELECT pg_notify(:channel, :payload)")


class Presence:
    def __init__(self, engine: AsyncEngine, *, beat: float, stale: float) -> None:
        self.engine = engine
        # The heartbeat has a connection of its own: when thousands of sockets come or go at
        # once their presence writes fill the shared pool, and a beat that waited behind them
        # would make this live process look dead to the others.
        self._beat_engine = create_engine(
            get_settings(), engine.url.render_as_string(hide_password=False), pool_size=1, max_overflow=0,
            pool_pre_ping=True
        )  # fmt: skip
        self.beat = beat
        self.stale = stale
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.local: dict[tuple[int, int], tuple[str, int]] = {}  # (room, user) -> (name, sockets here)
        # enter/leave calls under way per (room, user): counted in `local`, maybe not yet stored.
        self._in_flight: dict[tuple[int, int], int] = {}
        self._task: asyncio.Task[None] | None = None
        # With Redis fan-out: how join/leave events go out (after commit); None: NOTIFY in the transaction.
        self.publish: Callable[[int, str, str], Awaitable[None]] | None = None  # (room_id, kind, user)
        self._unsent: dict[AsyncConnection, list[tuple[int, str, str]]] = {}

    async def start(self) -> None:
        await self._beat()
        self._task = asyncio.create_task(self._run(), name="presence")

    async def stop(self) -> None:
        """Leaving for good (shutdown): our users go offline where no other process has them."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):  # the database may be gone already
            await self._reap([self.process_id], only_stale=False)
        await self._beat_engine.dispose()

    # --- sockets coming and going -------------------------------------------------------------

    async def enter(self, room_id: int, who: Identity, *, members_only: bool = False) -> list[str] | None:
        """Count one more socket of `who` in the room; returns who is online there now. With
        `members_only` (a join's recheck of a removal that raced it), None if the user is no
        longer a member: nothing is counted then, and a failure of the database is raised (the
        join cannot be checked); without it a failure is logged, and the next beat puts it right."""
        key = (room_id, who.user_id)
        name, count = self.local.get(key, (who.name, 0))
        self.local[key] = (name, count + 1)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            async with self._autocommit(self.engine) as conn:
                return await self._change(conn, room_id, who.user_id, who.name, +1, members_only=members_only)
        except NotMember:
            self._uncount(key)
            return None
        except Exception as exc:  # the next heartbeat puts the row right
            if members_only:
                self._uncount(key)
                raise
            log.warning("presence enter failed: %r", exc)
            return [who.name]
        finally:
            self._landed(key)

    def _uncount(self, key: tuple[int, int]) -> None:
        name, count = self.local.get(key, ("", 1))
        if count <= 1:
            self.local.pop(key, None)
        else:
            self.local[key] = (name, count - 1)

    async def leave(self, room_id: int, who: Identity) -> None:
        key = (room_id, who.user_id)
        self._uncount(key)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            async with self._autocommit(self.engine) as conn:
                await self._change(conn, room_id, who.user_id, who.name, -1)
        except Exception as exc:  # the next heartbeat puts the row right
            log.warning("presence leave failed: %r", exc)
        finally:
            self._landed(key)

    def _landed(self, key: tuple[int, int]) -> None:
        if (left := self._in_flight.get(key, 0) - 1) > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)

    async def _change(
        self, conn: AsyncConnection, room_id: int, user_id: int, name: str, delta: int, *, members_only: bool = False
    ) -> list[str]:
        """Apply a change of this process's socket count, and announce a change of state.
        Returns who is online in the room after it; NotMember with `members_only` if the user is
        not a member (nothing changed). One statement (a join's cost is mostly round trips)."""
        values = {
            "room_id": room_id,
            "user_id": user_id,
            "process_id": self.process_id,
            "name": name,
            "delta": delta,
            "stale": self.stale,
            "notify": self.publish is None,  # NOTIFY in the statement; else published after commit
            "channel": notify.room_channel(room_id),
            "join": notify.event_payload("join", name),
            "leave": notify.event_payload("leave", name),
            "members_only": members_only,
        }
        [(before, after, online, member)] = await fetch(conn, _CHANGE, **values)
        if not member:
            raise NotMember(room_id)
        if self.publish is not None:
            if before == 0 and after > 0:
                await self._announce(conn, room_id, "join", name)
            elif before > 0 and after == 0:
                await self._announce(conn, room_id, "leave", name)
        return list(online)

    async def _announce(self, conn: AsyncConnection, room_id: int, kind: str, name: str) -> None:
        if self.publish is not None:
            self._unsent.setdefault(conn, []).append((room_id, kind, name))  # published by _begin
            return
        await conn.execute(
            _NOTIFY, {"channel": notify.room_channel(room_id), "payload": notify.event_payload(kind, name)}
        )

    @contextlib.asynccontextmanager
    async def _begin(self, engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
        """engine.begin(), and with `publish` set, the transaction's join/leave events published
        after it commits (never for a rollback), so that events follow the state as with NOTIFY."""
        async with self._published(engine.begin()) as conn:
            yield conn

    def _autocommit(self, engine: AsyncEngine) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A connection in autocommit (one statement, one round trip: no BEGIN, no COMMIT), with
        its events published after the statement as _begin does."""
        return self._published(reading(engine))

    @contextlib.asynccontextmanager
    async def _published(
        self, connecting: contextlib.AbstractAsyncContextManager[AsyncConnection]
    ) -> AsyncIterator[AsyncConnection]:
        conn: AsyncConnection | None = None
        try:
            async with connecting as conn:
                yield conn
        finally:
            events = self._unsent.pop(conn, []) if conn is not None else []
        for room_id, kind, name in events:
            assert self.publish is not None
            await self.publish(room_id, kind, name)

    # --- heartbeat and reaping ----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.beat)
            try:
                await self._beat()
            except Exception as exc:  # the database is away: beat again later
                log.warning("presence heartbeat failed: %r", exc)

    async def _beat(self) -> None:
        async with self._beat_engine.begin() as conn:  # commit the beat first, on its own
            await conn.execute(
                text("INSERT INTO chat_processes (id) VALUES (:id) ON CONFLICT (id) DO UPDATE SET beat_at = now()"),
                {"id": self.process_id},
            )
        async with self._beat_engine.begin() as conn:
            dead = [
                row[0]
                for row in await conn.execute(
                    text(
                        "SELECT id FROM chat_processes WHERE beat_at < now() - make_interval(secs => :stale)"
                        " AND id <> :id FOR UPDATE SKIP LOCKED"
                    ),
                    {"stale": self.stale, "id": self.process_id},
                )
            ]
            rows = await conn.execute(
                text("SELECT room_id, user_id, user_name, sockets FROM presence WHERE process_id = :id"),
                {"id": self.process_id},
            )
            stored = {(row.room_id, row.user_id): (row.user_name, row.sockets) for row in rows}
        await self._reconcile(stored)
        if dead:
            await self._reap(dead)

    async def _reconcile(self, stored: dict[tuple[int, int], tuple[str, int]]) -> None:
        """Make this process's rows match its sockets: after a failed enter or leave, or after
        living processes reaped us during a long stall.

        An enter or leave under way has counted its socket here but not yet stored it: such a
        (room, user) is left to the next beat. The others are checked again under the row's lock
        before they are corrected, since one may have started and finished in the meantime."""
        for key in set(stored) | set(self.local):
            name, there = stored.get(key, ("", 0))
            name, here = self.local.get(key, (name, 0))
            if here == there or key in self._in_flight:
                continue
            async with self._begin(self._beat_engine) as conn:
                await conn.execute(_LOCK, {"room_id": key[0], "user_id": key[1]})
                there = int(
                    await conn.scalar(
                        text(
                            "SELECT coalesce(sum(sockets), 0) FROM presence"
                            " WHERE room_id = :room_id AND user_id = :user_id AND process_id = :id"
                        ),
                        {"room_id": key[0], "user_id": key[1], "id": self.process_id},
                    )
                    or 0
                )
                if key in self._in_flight:  # one began while we waited for the lock
                    continue
                name, here = self.local.get(key, (name, 0))
                if delta := here - there:
                    log.info("presence: correcting room %s user %s by %+d", *key, delta)
                    await self._change(conn, key[0], key[1], name, delta)

    async def _reap(self, processes: list[str], *, only_stale: bool = True) -> None:
        """Remove dead processes and their rows, then announce who is no longer online anywhere.
        On the heartbeat's own connection: a busy shared pool must not hold up the beat.

        `processes` were stale when the beat looked; one may have beaten since (its stall is
        over), so with `only_stale` each is checked again under its row's lock and a live one is
        left alone: deleting it would pull its rows from under its sockets."""
        async with self._begin(self._beat_engine) as conn:
            if only_stale:
                processes = [
                    row[0]
                    for row in await conn.execute(
                        text(
                            "SELECT id FROM chat_processes WHERE id = ANY(:ids)"
                            " AND beat_at < now() - make_interval(secs => :stale) FOR UPDATE"
                        ),
                        {"ids": processes, "stale": self.stale},
                    )
                ]
            if not processes:
                return
            gone = (
                await conn.execute(
                    text("DELETE FROM presence WHERE process_id = ANY(:ids) RETURNING room_id, user_id, user_name"),
                    {"ids": processes},
                )
            ).all()
            await conn.execute(text("DELETE FROM chat_processes WHERE id = ANY(:ids)"), {"ids": processes})
        if processes != [self.process_id]:
            log.info("reaped %d dead process(es): %d presence row(s)", len(processes), len(gone))
        for room_id, user_id, name in {(r.room_id, r.user_id, r.user_name) for r in gone}:
            async with self._begin(self._beat_engine) as conn:
                ids = {"room_id": room_id, "user_id": user_id}
                await conn.execute(_LOCK, ids)
                if int(await conn.scalar(_LIVE_SOCKETS, {**ids, "stale": self.stale}) or 0) == 0:
                    await self._announce(conn, room_id, "leave", name)
