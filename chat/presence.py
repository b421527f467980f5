"""Who is online in which room, across every server process.

Each process beats in `chat_processes`; each (room, user) it serves has a `presence` row (its
`sockets` is 1: the sockets themselves are counted here, in memory). A user goes online in a room
with their first socket anywhere and offline with their last: that is decided under a per-(room,
user) advisory lock, and the join or leave event is NOTIFYed in the same transaction, so events
follow the state in commit order (with Redis fan-out the event is published right after its
transaction commits, never for a rollback). A process that stops beating (kill -9, a frozen host)
is dead after `stale` seconds: the living reap its rows and announce the leaves, with no manual
clean-up.

The table is written only when a process starts or stops holding a (room, user): a second socket
of the user in the room on this process (another tab) writes nothing, and the last one's row
lingers `linger` seconds after it closes, so that a reconnect or a page reload in that time
writes nothing either and sends no leave and join to the room. A join that writes nothing still
reads: the user's membership (its recheck of a removal that raced it) and who is online.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chat import notify
from chat.config import get_settings
from chat.db import DriverStatement, create_engine, fetch, reading
from chat.store import Identity

log = logging.getLogger("chat.presence")

ROOM_NAMES_MAX = 10_000  # room names remembered for held()


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
# A join of a (room, user) this process already holds: nothing to change, only the join's recheck
# of the membership (with :members_only) and who is online, as _CHANGE answers them. No lock: the
# joining socket is in the room's feed already, so a removal committed after this read reaches it.
# With :room (a rejoin by the room's name, its id remembered here) the room must still be called
# that: a rename is not announced to the other processes.
_LOOK = DriverStatement.of(
    text(
        "SELECT NOT CAST(:members_only AS boolean) OR EXISTS (SELECT 1 FROM memberships m"
        " JOIN rooms r ON r.id = m.room_id WHERE m.room_id = CAST(:room_id AS bigint)"
        " AND m.user_id = CAST(:user_id AS bigint) AND (CAST(:room AS text) IS NULL OR r.name = CAST(:room AS text)))"
        " AS member,"
        " ARRAY(SELECT p.user_name FROM presence p JOIN chat_processes c ON c.id = p.process_id"
        " WHERE p.room_id = CAST(:room_id AS bigint) AND p.sockets > 0"
        " AND c.beat_at > now() - make_interval(secs => CAST(:stale AS double precision))"
        " UNION SELECT CAST(:name AS text) ORDER BY 1) AS online"
    )
)


class Presence:
    def __init__(self, engine: AsyncEngine, *, beat: float, stale: float, linger: float = 0.0) -> None:
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
        self.linger = linger
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # What this process holds in the table: (room, user) -> (name, 1). Held while the user has
        # a socket in the room here, and for `linger` seconds after the last one closed.
        self.local: dict[tuple[int, int], tuple[str, int]] = {}
        self.sockets: dict[tuple[int, int], int] = {}  # (room, user) -> sockets here
        self._lingering: dict[tuple[int, int], asyncio.TimerHandle] = {}
        self._releases: set[asyncio.Task[None]] = set()
        # enter/leave calls under way per (room, user): counted in `local`, maybe not yet stored.
        self._in_flight: dict[tuple[int, int], int] = {}
        # Room name -> id of the rooms entered here lately, the most recent last: held()'s guess
        # for a rejoin, which its look confirms. Bounded: an old name is forgotten, not wrong.
        self._room_ids: OrderedDict[str, int] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        # With Redis fan-out: how join/leave events go out (after commit); None: NOTIFY in the transaction.
        self.publish: Callable[[int, str, str], Awaitable[None]] | None = None  # (room_id, kind, user)
        self._unsent: dict[AsyncConnection, list[tuple[int, str, str]]] = {}

    async def start(self) -> None:
        await self._beat()
        self._task = asyncio.create_task(self._run(), name="presence")

    async def stop(self) -> None:
        """Leaving for good (shutdown): our users go offline where no other process has them."""
        for lingering in self._lingering.values():
            lingering.cancel()
        self._lingering.clear()
        for task in self._releases:
            task.cancel()
        await asyncio.gather(*self._releases, return_exceptions=True)  # the reap below covers them
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):  # the database may be gone already
            await self._reap([self.process_id], only_stale=False)
        await self._beat_engine.dispose()

    # --- sockets coming and going -------------------------------------------------------------

    async def enter(
        self, room_id: int, who: Identity, *, members_only: bool = False, room: str | None = None
    ) -> list[str] | None:
        """Count one more socket of `who` in the room; returns who is online there now. With
        `members_only` (a join's recheck of a removal that raced it), None if the user is no
        longer a member: nothing is counted then, and a failure of the database is raised (the
        join cannot be checked); without it a failure is logged, and the next beat puts it right.
        `room`: the room's name, remembered for held()."""
        key = (room_id, who.user_id)
        self._count(key)
        if key in self.local:
            online = await self._look(key, who, members_only=members_only)
        else:
            online = await self._enter(key, who, members_only=members_only)
        if online is not None and room is not None:
            self._remember(room, room_id)  # a refused enter holds nothing to rejoin
        return online

    async def _enter(self, key: tuple[int, int], who: Identity, *, members_only: bool) -> list[str] | None:
        """The enter of a (room, user) this process does not hold yet: store it, and announce a join."""
        self.local[key] = (who.name, 1)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            async with self._autocommit(self.engine) as conn:
                return await self._change(conn, key[0], key[1], who.name, +1, members_only=members_only)
        except NotMember:
            self._refused(key, who, stored=False)
            return None
        except Exception as exc:  # the next heartbeat puts the row right
            if members_only:
                self._refused(key, who, stored=False)
                raise
            log.warning("presence enter failed: %r", exc)
            return [who.name]
        finally:
            self._landed(key)

    def held(self, room: str, user_id: int) -> int | None:
        """The id of the room called `room` when this process last entered it, if it holds the
        (room, user) now (the user has a socket there here, or had one within the linger): a
        rejoin's guess, for rejoin() to confirm. None: join the long way."""
        room_id = self._room_ids.get(room)
        return room_id if room_id is not None and (room_id, user_id) in self.local else None

    async def rejoin(self, room_id: int, room: str, who: Identity) -> list[str] | None:
        """enter(members_only=True) by the id held() gave for the room's name: the look that
        rechecks the membership confirms the name too, in the same round trip. None: not
        confirmed (renamed, the user removed, or the (room, user) let go since), nothing counted."""
        key = (room_id, who.user_id)
        if key not in self.local:
            return None
        self._count(key)
        online = await self._look(key, who, members_only=True, room=room)
        if online is not None:
            self._remember(room, room_id)  # in use: the last to be forgotten
        return online

    def _count(self, key: tuple[int, int]) -> None:
        self.sockets[key] = self.sockets.get(key, 0) + 1
        if (lingering := self._lingering.pop(key, None)) is not None:
            lingering.cancel()  # back within the linger: the row is still ours

    def _remember(self, room: str, room_id: int) -> None:
        ids = self._room_ids
        ids[room] = room_id
        ids.move_to_end(room)
        if len(ids) > ROOM_NAMES_MAX:
            ids.popitem(last=False)

    async def _look(
        self, key: tuple[int, int], who: Identity, *, members_only: bool, room: str | None = None
    ) -> list[str] | None:
        """The enter of a (room, user) held already: read the recheck (with `room`: of the
        room's name too) and who is online."""
        values = {"room_id": key[0], "user_id": key[1], "members_only": members_only, "stale": self.stale, "room": room}
        try:
            async with reading(self.engine) as conn:
                [(member, online)] = await fetch(conn, _LOOK, **values, name=who.name)
        except Exception as exc:
            if members_only:
                self._refused(key, who, stored=True)
                raise
            log.warning("presence look failed: %r", exc)
            return [who.name]
        if not member:
            self._refused(key, who, stored=True)
            return None
        return list(online)

    def _refused(self, key: tuple[int, int], who: Identity, *, stored: bool) -> None:
        """An enter that counted its socket was refused (or failed): take the socket out again.
        `stored`: the (room, user) was held before it, and stays held (lingering if this was its
        only socket); else this enter's hold is dropped with it (the next beat corrects the table
        if the failed change did reach it)."""
        left = self.sockets.get(key, 1) - 1
        if left > 0:
            self.sockets[key] = left
            return
        self.sockets.pop(key, None)
        if stored:
            self._linger(key, who, self.linger)
        else:
            self.local.pop(key, None)

    async def leave(self, room_id: int, who: Identity, *, linger: bool = True) -> None:
        """One socket of `who` left the room. With the last one here, the (room, user) is let go
        `linger` seconds later (at once with `linger` False: the user was removed from the room),
        unless a socket of theirs comes back first."""
        key = (room_id, who.user_id)
        left = self.sockets.get(key, 1) - 1
        if left > 0:
            self.sockets[key] = left
            return
        self.sockets.pop(key, None)
        if key not in self.local:
            return
        if linger and self.linger > 0:
            self._linger(key, who, self.linger)
            return
        if (lingering := self._lingering.pop(key, None)) is not None:
            lingering.cancel()
        await self._release(key, who)

    def _linger(self, key: tuple[int, int], who: Identity, seconds: float) -> None:
        if (earlier := self._lingering.pop(key, None)) is not None:
            earlier.cancel()
        self._lingering[key] = asyncio.get_running_loop().call_later(seconds, self._release_soon, key, who)

    def _release_soon(self, key: tuple[int, int], who: Identity) -> None:
        self._lingering.pop(key, None)
        task = asyncio.create_task(self._release(key, who))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, key: tuple[int, int], who: Identity) -> None:
        """Let the (room, user) go: take this process's row out (a leave if it was the last)."""
        if key in self.sockets or self.local.pop(key, None) is None:
            return  # a socket came back, or it was let go already
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            async with self._autocommit(self.engine) as conn:
                await self._change(conn, key[0], key[1], who.name, -1)
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
