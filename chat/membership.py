"""Who may see a room, and its members: keyword-only queries on an AsyncConnection.

A public room is listed and anyone may join it (subscribing makes them a member). A private room
(DMs are private rooms of two) is seen, joined, read and searched by its members only; to anyone
else every query here answers as for a room that does not exist. The creator (rooms.created_by)
is the owner: they invite and remove members and change the topic. Token room scopes apply on top
(callers check Identity.may_join first).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, LargeBinary, Text, and_, bindparam, delete, func, literal, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from chat.db import DriverStatement, fetch
from chat.models import Membership, Room, Token, User
from chat.store import TOKEN_COLUMNS, Identity, _write, hash_token, identity_of_row

PUBLIC = "public"
PRIVATE = "private"
DM_PREFIX = "dm."  # DM rooms are named dm.<smaller user id>.<larger>; nobody else may make such a name
UNREAD_COUNT_MAX = 1000  # counted up to this per room: "999+" is all a badge needs
MEMBERS_MAX = 10_000  # per room: a hostile owner cannot invite the whole user table


class NoSuchRoom(Exception):
    """The room does not exist, or the user may not know that it does."""


class NotOwner(Exception):
    """The user may see the room but not change it."""


class NoSuchUser(Exception):
    pass


class TooManyMembers(Exception):
    pass


@dataclass(slots=True, frozen=True)
class RoomAccess:
    room_id: int
    name: str
    visibility: str
    dm: bool
    owner_id: int | None
    member: bool


@functools.cache
def _access_query() -> DriverStatement:
    """access's statement, built and compiled once (the room and the user as bound parameters)."""
    query = select(*_room_columns(bindparam("user_id", type_=BigInteger))).where(
        Room.name == bindparam("room", type_=Text)
    )
    return DriverStatement.of(query)


def _room_columns(user_id: Any) -> tuple[Any, ...]:
    """The room's columns as `_access_of` reads them, by position, and whether `user_id` (a
    column or a bound parameter) is a member: one place for both statements that check a room."""
    member = (
        select(literal(True))
        .where(Membership.room_id == Room.id, Membership.user_id == user_id)
        .exists()
        .label("member")
    )
    return Room.id.label("room_id"), Room.name.label("room_name"), Room.visibility, Room.dm, Room.created_by, member


def _access_of(row: Sequence[Any] | None) -> RoomAccess | None:
    """A RoomAccess from (id, name, visibility, dm, created_by, member); None for no room, or a
    private room the user is not in."""
    if row is None or row[0] is None:
        return None
    room_id, room_name, visibility, dm, created_by, member = row
    if visibility == PRIVATE and not member:
        return None
    return RoomAccess(room_id, room_name, visibility, dm, created_by, bool(member))


async def access(conn: AsyncConnection, *, room: str, user_id: int) -> RoomAccess | None:
    """The room as `user_id` may see it: None when it does not exist or is private to others."""
    rows = await fetch(conn, _access_query(), room=room, user_id=user_id)
    return _access_of(rows[0] if rows else None)


async def token_and_access(conn: AsyncConnection, *, raw: str, room: str | None) -> tuple[Identity, RoomAccess | None]:
    """A socket's token (TokenRefused as store.identity_for_token) and the room as its user may
    see it (as `access`; room None: no room), in one statement: a room socket's join reads both,
    one round trip fewer than reading them one after the other."""
    rows = await fetch(conn, _token_and_access_query(), hash=hash_token(raw), room=room)
    identity = identity_of_row(rows[0] if rows else None)
    return identity, _access_of(rows[0][len(TOKEN_COLUMNS) :])


@functools.cache
def _token_and_access_query() -> DriverStatement:
    """token_and_access's statement, built and compiled once (values as bound parameters)."""
    query = (
        select(*TOKEN_COLUMNS, *_room_columns(User.id))
        .join(User, User.id == Token.user_id)
        .outerjoin(Room, Room.name == bindparam("room", type_=Text))
        .where(Token.hash == bindparam("hash", type_=LargeBinary))
    )
    return DriverStatement.of(query)


async def enter(conn: AsyncConnection, *, room_id: int, user_id: int) -> bool:
    """Make the user a member (of a public room they join), read up to its head; True if new.
    Without waiting for the WAL flush: a join should not wait for a disk, and a membership lost in
    a crash comes back with the next join."""
    async with _write(conn):
        await conn.execute(text("SET LOCAL synchronous_commit TO off"))
        return await _add(conn, room_id=room_id, user_id=user_id)


async def _add(conn: AsyncConnection, *, room_id: int, user_id: int) -> bool:
    """The membership row, read up to the room's head (a new member's unread starts at 0); True if new."""
    result = await conn.execute(
        pg_insert(Membership)
        .from_select(
            ["user_id", "room_id", "read_seq"],
            select(literal(user_id), Room.id, Room.last_seq).where(Room.id == room_id),
        )
        .on_conflict_do_nothing()
    )
    return bool(result.rowcount)


async def create(
    conn: AsyncConnection,
    *,
    name: str,
    creator_id: int,
    visibility: str,
    topic: str,
    max_per_user: int,
    dm_with: int | None = None,
) -> int | None:
    """A new room owned by `creator_id`, who is its first member (and `dm_with` its second); None
    when the name is taken or the creator has made `max_per_user` rooms already (check which with
    access). The creator's row is locked while counting, as in store.create_room."""
    async with _write(conn):
        await conn.execute(select(User.id).where(User.id == creator_id).with_for_update())
        made = await conn.scalar(select(func.count()).select_from(Room).where(Room.created_by == creator_id))
        if (made or 0) >= max_per_user:
            return None
        room_id = await conn.scalar(
            pg_insert(Room)
            .values(name=name, created_by=creator_id, visibility=visibility, topic=topic, dm=dm_with is not None)
            .on_conflict_do_nothing(index_elements=["name"])
            .returning(Room.id)
        )
        if room_id is None:
            return None
        members = [{"user_id": creator_id, "room_id": room_id}]
        if dm_with is not None:
            members.append({"user_id": dm_with, "room_id": room_id})
        await conn.execute(pg_insert(Membership).values(members).on_conflict_do_nothing())
    return int(room_id)


async def user_id(conn: AsyncConnection, *, name: str) -> int | None:
    return await conn.scalar(select(User.id).where(User.name == name))


def dm_name(a: int, b: int) -> str:
    low, high = sorted((a, b))
    return f"{DM_PREFIX}{low}.{high}"


async def invite(conn: AsyncConnection, *, room_id: int, user_name: str) -> bool:
    """Add a member; True if they were not one. NoSuchUser, TooManyMembers."""
    async with _write(conn):
        # Locks the room's row: concurrent invites cannot overshoot MEMBERS_MAX.
        await conn.execute(select(Room.id).where(Room.id == room_id).with_for_update())
        target = await conn.scalar(select(User.id).where(User.name == user_name))
        if target is None:
            raise NoSuchUser(user_name)
        count = await conn.scalar(select(func.count()).select_from(Membership).where(Membership.room_id == room_id))
        if (count or 0) >= MEMBERS_MAX:
            raise TooManyMembers(f"a room has at most {MEMBERS_MAX} members")
        return await _add(conn, room_id=room_id, user_id=target)


async def remove(conn: AsyncConnection, *, room_id: int, user_name: str) -> int | None:
    """Remove a member; their user id if they were one."""
    async with _write(conn):
        removed = await conn.scalar(
            delete(Membership)
            .where(
                Membership.room_id == room_id,
                Membership.user_id == select(User.id).where(User.name == user_name).scalar_subquery(),
            )
            .returning(Membership.user_id)
        )
    return removed


async def members(conn: AsyncConnection, *, room_id: int) -> list[str]:
    rows = await conn.execute(
        select(User.name).join(Membership, Membership.user_id == User.id).where(Membership.room_id == room_id)
        .order_by(User.name)
    )  # fmt: skip
    return [r.name for r in rows]


async def set_topic(conn: AsyncConnection, *, room_id: int, topic: str) -> None:
    async with _write(conn):
        await conn.execute(update(Room).where(Room.id == room_id).values(topic=topic))


async def rename(conn: AsyncConnection, *, room_id: int, name: str) -> bool:
    """False if the name is taken."""
    async with _write(conn):
        taken = await conn.scalar(select(Room.id).where(Room.name == name))
        if taken is not None:
            return False
        await conn.execute(update(Room).where(Room.id == room_id).values(name=name))
    return True


# --- the user's room list ------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class MyRoom:
    name: str
    visibility: str
    topic: str
    dm_with: str | None  # a DM: the other member's name
    owner: str | None
    last_seq: int
    read_seq: int
    unread: int  # messages after read_seq not by the user, counted up to UNREAD_COUNT_MAX
    mentions: int  # of the user, after read_seq
    last: dict[str, Any] | None  # the last message: seq, author, kind, body, sent_at


# One statement for the whole list: per room, the unread count is one index range of the
# messages after read_seq (bounded; change events and deleted messages are not unread), the
# mentions one range of mentions' primary key, and the last message one index lookup.
# tests/test_membership.py checks the plan with EXPLAIN.
MY_ROOMS = text(f"""
SELECT r.name, r.visibility, r.topic, r.last_seq, m.read_seq, owner.name AS owner,
       (SELECT u.name FROM memberships o JOIN users u ON u.id = o.user_id
         WHERE r.dm AND o.room_id = r.id AND o.user_id <> m.user_id LIMIT 1) AS dm_with,
       (SELECT count(*) FROM (SELECT 1 FROM messages x
         WHERE x.room_id = r.id AND x.seq > m.read_seq AND x.author_id IS DISTINCT FROM m.user_id
           AND x.kind IN ('text', 'notice') AND x.deleted_at IS NULL
         LIMIT {UNREAD_COUNT_MAX}) unread) AS unread,
       (SELECT count(*) FROM mentions n
         WHERE n.user_id = m.user_id AND n.room_id = r.id AND n.seq > m.read_seq) AS mentions,
       last.seq AS last_message_seq, last.author AS last_author, last.kind AS last_kind,
       last.body AS last_body, last.created_at AS last_sent_at
FROM memberships m
JOIN rooms r ON r.id = m.room_id
LEFT JOIN users owner ON owner.id = r.created_by
LEFT JOIN LATERAL (SELECT seq, author, kind, body, created_at FROM messages x
                    WHERE x.room_id = r.id AND x.kind IN ('text', 'notice') AND x.deleted_at IS NULL
                    ORDER BY x.seq DESC LIMIT 1) last ON true
WHERE m.user_id = :user_id AND left(r.name, 1) <> '_'
ORDER BY last.seq IS NULL, last.created_at DESC NULLS LAST, r.name
LIMIT :limit
""")  # fmt: skip


async def my_rooms(conn: AsyncConnection, *, user_id: int, limit: int) -> list[MyRoom]:
    """The rooms `user_id` is a member of, the most recently active first."""
    rows = await conn.execute(MY_ROOMS, {"user_id": user_id, "limit": limit})
    out = []
    for r in rows:
        last = None
        if r.last_message_seq is not None:
            last = {
                "seq": r.last_message_seq,
                "author": r.last_author,
                "kind": r.last_kind,
                "body": r.last_body,
                "sent_at": _iso(r.last_sent_at),
            }
        out.append(
            MyRoom(
                name=r.name,
                visibility=r.visibility,
                topic=r.topic,
                dm_with=r.dm_with,
                owner=r.owner,
                last_seq=r.last_seq,
                read_seq=min(r.read_seq, r.last_seq),
                unread=r.unread,
                mentions=r.mentions,
                last=last,
            )
        )
    return out


def _iso(at: datetime) -> str:
    from datetime import UTC

    return at.astimezone(UTC).isoformat(timespec="milliseconds")


# --- read positions ------------------------------------------------------------------------------


async def advance_reads(conn: AsyncConnection, *, positions: dict[tuple[int, int], int]) -> list[tuple[int, int, int]]:
    """Move read_seq forward (never back, never past the room's head) for each (user, room);
    returns the (user id, room id, read_seq) that moved. One statement for the whole batch."""
    if not positions:
        return []
    users, rooms, seqs = zip(*((u, r, s) for (u, r), s in positions.items()), strict=True)
    async with _write(conn):
        # A read position lost in a crash is only a badge shown again: not worth a WAL flush.
        await conn.execute(text("SET LOCAL synchronous_commit TO off"))
        rows = await conn.execute(
            text("""
                UPDATE memberships m SET read_seq = LEAST(v.seq, r.last_seq)
                FROM unnest(CAST(:users AS bigint[]), CAST(:rooms AS bigint[]), CAST(:seqs AS bigint[]))
                     AS v(user_id, room_id, seq)
                JOIN rooms r ON r.id = v.room_id
                WHERE m.user_id = v.user_id AND m.room_id = v.room_id AND m.read_seq < LEAST(v.seq, r.last_seq)
                RETURNING m.user_id, m.room_id, m.read_seq
            """),
            {"users": list(users), "rooms": list(rooms), "seqs": list(seqs)},
        )
        return [(r.user_id, r.room_id, r.read_seq) for r in rows]


async def read_seq(conn: AsyncConnection, *, user_id: int, room_id: int) -> int | None:
    return await conn.scalar(
        select(Membership.read_seq).where(and_(Membership.user_id == user_id, Membership.room_id == room_id))
    )
