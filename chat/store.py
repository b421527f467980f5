"""Queries. Plain keyword-only functions on an AsyncConnection; each write is one short transaction."""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    LargeBinary,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import TSQUERY, aggregate_order_by
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import aliased

from chat.db import DriverStatement, fetch
from chat.models import Membership, Message, MessageReaction, Room, Token, User

TOKEN_PREFIX = "chat_"


@dataclass(slots=True)
class MessageRecord:
    seq: int
    author: str
    body: str
    kind: str = "text"
    author_id: int | None = None
    client_id: str | None = None
    sent_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    target_seq: int | None = None  # a change (edit, delete, react, unreact): the message it changes
    reply_to: int | None = None
    quote: dict[str, Any] | None = None  # a reply's original as it is now: author, body's start, deleted
    edited_at: datetime | None = None
    deleted_at: datetime | None = None  # a tombstone: its body is erased
    # Only in current-state pages (history): [{"emoji", "count", "mine"}] for the reader. A replay
    # by `after` leaves them out: the react/unreact events that follow carry them.
    reactions: list[dict[str, Any]] | None = None
    _frame: str | None = None  # the JSON frame, built once per process and shared by all sockets

    @classmethod
    def from_row(cls, row: Sequence[Any], *, reactions: bool = False) -> MessageRecord:
        """A message from a row of _MESSAGE_COLUMNS, then its quote, then (`reactions`) its
        reactions. By position: one unpacking instead of a lookup by name per column (a replay
        turns 50 rows into messages on every join)."""
        (seq, author, body, kind, author_id, client_id, sent_at, target_seq, reply_to, edited_at, deleted_at,
         quote) = row[:12]  # fmt: skip
        return cls(
            seq=seq,
            author=author,
            body=body,
            kind=kind,
            author_id=author_id,
            client_id=client_id,
            sent_at=sent_at,
            target_seq=target_seq,
            reply_to=reply_to,
            quote=quote,
            edited_at=edited_at,
            deleted_at=deleted_at,
            reactions=row[12] if reactions else None,
        )


MESSAGE_KINDS = ("text", "notice")
CHANGE_KINDS = ("edit", "delete", "react", "unreact")
QUOTE_CHARS = 200  # as migration 0008's NOTIFY


def _quote() -> Any:
    """A reply's original as it is now (one index probe per reply; NULL for a message that is none)."""
    original = aliased(Message, name="original")
    return (
        select(
            func.json_build_object(
                "author",
                original.author,
                "body",
                func.left(original.body, QUOTE_CHARS),
                "deleted",
                original.deleted_at.is_not(None),
            )
        )
        .where(original.room_id == Message.room_id, original.seq == Message.reply_to)
        .scalar_subquery()
        .label("quote")
    )


def _reactions(viewer_id: int | None) -> Any:
    """A message's reactions for `viewer_id`: [{"emoji", "count", "mine"}] by emoji (one index
    range of message_reactions' primary key per message)."""
    mine: ColumnElement[Any] = func.bool_or(MessageReaction.user_id == viewer_id)
    counted = (
        select(
            MessageReaction.emoji.label("emoji"),
            func.count().label("n"),
            func.coalesce(mine, False).label("mine"),
        )
        .where(and_(MessageReaction.room_id == Message.room_id, MessageReaction.seq == Message.seq))
        .group_by(MessageReaction.emoji)
        .correlate(Message)  # the outer query's message, through the scalar subquery around it
        .subquery("counted")
    )
    entry = func.json_build_object("emoji", counted.c.emoji, "count", counted.c.n, "mine", counted.c.mine)
    return (
        # NULL, not '[]', for a message without reactions (most): nothing to decode per row.
        select(func.json_agg(aggregate_order_by(entry, counted.c.emoji))).scalar_subquery().label("reactions")
    )


# Every message query selects these first, in this order, then the quote (MessageRecord.from_row).
_MESSAGE_COLUMNS = (
    Message.seq,
    Message.author,
    Message.body,
    Message.kind,
    Message.author_id,
    Message.client_id,
    Message.created_at,
    Message.target_seq,
    Message.reply_to,
    Message.edited_at,
    Message.deleted_at,
)


@asynccontextmanager
async def _write(conn: AsyncConnection) -> AsyncIterator[None]:
    """One short write transaction, ending any implicit read transaction first."""
    if conn.in_transaction():
        await conn.commit()
    async with conn.begin():
        yield


# --- rooms -------------------------------------------------------------------------------------


async def room_id(conn: AsyncConnection, *, name: str, create: bool = True) -> int | None:
    found = await conn.scalar(select(Room.id).where(Room.name == name))
    if found is not None or not create:
        return found
    async with _write(conn):
        await conn.execute(pg_insert(Room).values(name=name).on_conflict_do_nothing(index_elements=["name"]))
    return await conn.scalar(select(Room.id).where(Room.name == name))


async def create_room(conn: AsyncConnection, *, name: str, creator_id: int | None, max_per_user: int) -> int | None:
    """The room's id, creating it for `creator_id` (None: the server's own room, uncapped); None
    when that user has created `max_per_user` rooms already. The creator's row is locked while
    counting, so that concurrent joins of one user cannot overshoot the cap."""
    async with _write(conn):
        if creator_id is not None:
            await conn.execute(select(User.id).where(User.id == creator_id).with_for_update())
            made = await conn.scalar(select(func.count()).select_from(Room).where(Room.created_by == creator_id))
            if (made or 0) >= max_per_user:
                return await conn.scalar(select(Room.id).where(Room.name == name))  # unless it exists now
        await conn.execute(
            pg_insert(Room).values(name=name, created_by=creator_id).on_conflict_do_nothing(index_elements=["name"])
        )
    return await conn.scalar(select(Room.id).where(Room.name == name))


@dataclass(slots=True, frozen=True)
class RoomRow:
    name: str
    last_seq: int
    created_at: datetime
    created_by: str | None
    visibility: str = "public"
    members: int = 0


async def list_rooms(conn: AsyncConnection) -> list[RoomRow]:
    """Every room, by name, with its creator, visibility and member count (`chat room list`)."""
    members = select(func.count()).select_from(Membership).where(Membership.room_id == Room.id).scalar_subquery()
    rows = await conn.execute(
        select(
            Room.name, Room.last_seq, Room.created_at, User.name.label("creator"), Room.visibility,
            members.label("members"),
        )
        .outerjoin(User, User.id == Room.created_by)
        .order_by(Room.name)
    )  # fmt: skip
    return [RoomRow(r.name, r.last_seq, r.created_at, r.creator, r.visibility, r.members) for r in rows]


async def delete_rooms(conn: AsyncConnection, *, names: list[str]) -> list[str]:
    """Delete rooms by name, their messages and presence with them; returns the names deleted."""
    async with _write(conn):
        rows = await conn.execute(delete(Room).where(Room.name.in_(names)).returning(Room.name))
        return sorted(r.name for r in rows)


async def room_head(conn: AsyncConnection, *, room_id: int) -> int:
    head = await conn.scalar(select(Room.last_seq).where(Room.id == room_id))
    return int(head or 0)


# --- messages ----------------------------------------------------------------------------------


# Messages are written by chat/writer.py (group commit), in one multi-row INSERT per batch.


async def messages_after(conn: AsyncConnection, *, room_id: int, after: int, limit: int) -> list[MessageRecord]:
    """The next `limit` rows with seq > after, oldest first: messages and the changes of them
    (edit, delete, react, unreact) in seq order. A message shows its body, edited_at and
    deleted_at as they are now, which the changes that follow set again (so a client applying
    them ends where the table is); its reactions come only as those changes."""
    rows = await fetch(conn, _after_query(), room_id=room_id, after=after, limit=limit)
    return [MessageRecord.from_row(r) for r in rows]


@functools.cache
def _after_query() -> DriverStatement:
    """messages_after's statement, built and compiled once (as _history_query)."""
    return DriverStatement.of(
        select(*_MESSAGE_COLUMNS, _quote())
        .where(
            Message.room_id == bindparam("room_id", type_=BigInteger),
            Message.seq > bindparam("after", type_=BigInteger),
        )
        .order_by(Message.seq)
        .limit(bindparam("limit", type_=Integer))
    )


async def messages_before(
    conn: AsyncConnection, *, room_id: int, before: int | None, limit: int, viewer_id: int | None = None
) -> list[MessageRecord]:
    """The `limit` messages just before seq `before` (or the latest ones), oldest first, each as
    it is now: body, edited_at, deleted_at, its reply's quote and its reactions (`mine` for
    `viewer_id`). Changes are not rows here: they are folded in. One statement."""
    return (await history_page(conn, room_id=room_id, before=before, limit=limit, viewer_id=viewer_id))[0]


async def history_page(
    conn: AsyncConnection, *, room_id: int, before: int | None, limit: int, viewer_id: int | None
) -> tuple[list[MessageRecord], int | None]:
    """`messages_before`, and the room's last seq as of the same snapshot (None when the page is
    empty): the page holds every change up to it and none after, so a client going on from
    there applies each change exactly once."""
    values = {"room_id": room_id, "viewer_id": viewer_id, "limit": limit, "before": before}
    rows = await fetch(conn, _history_query(before is not None), **values)
    return [MessageRecord.from_row(r, reactions=True) for r in reversed(rows)], (
        int(rows[0][-1]) if rows else None
    )  # head: the last column


@functools.cache
def _history_query(paged: bool) -> DriverStatement:
    """history_page's statement, built once with its values as bound parameters (building it,
    an alias and two correlated subqueries, took milliseconds of Python on every join and left
    hundreds of objects in reference cycles for the collector), and compiled once for fetch."""
    room_id = bindparam("room_id", type_=BigInteger)
    head = select(Room.last_seq).where(Room.id == room_id).scalar_subquery().label("head")
    viewer: Any = bindparam("viewer_id", type_=BigInteger)
    query = select(*_MESSAGE_COLUMNS, _quote(), _reactions(viewer), head).where(
        Message.room_id == room_id, Message.kind.in_(MESSAGE_KINDS)
    )
    if paged:
        query = query.where(Message.seq < bindparam("before", type_=BigInteger))
    return DriverStatement.of(query.order_by(Message.seq.desc()).limit(bindparam("limit", type_=Integer)))


# --- users and tokens --------------------------------------------------------------------------


def hash_token(raw: str) -> bytes:
    # Tokens carry 256 random bits, so a fast hash is enough: nothing to brute-force.
    return hashlib.sha256(raw.encode()).digest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(slots=True, frozen=True)
class Identity:
    user_id: int
    name: str
    token_id: int
    expires_at: datetime | None
    rooms: tuple[str, ...] | None = None  # None: any room

    def may_join(self, room: str) -> bool:
        return self.rooms is None or room in self.rooms


class TokenRefused(Exception):
    """The token is unknown, expired or revoked; `reason` is safe to show the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# A token's columns as identity_of_row reads them (also read beside a room by membership.py).
TOKEN_COLUMNS = (Token.id, Token.expires_at, Token.revoked_at, Token.rooms, User.id.label("user_id"), User.name)


async def identity_for_token(conn: AsyncConnection, *, raw: str) -> Identity:
    rows = await fetch(conn, _token_query(), hash=hash_token(raw))  # every API request and /socket
    return identity_of_row(rows[0] if rows else None)


@functools.cache
def _token_query() -> DriverStatement:
    return DriverStatement.of(
        select(*TOKEN_COLUMNS)
        .join(User, User.id == Token.user_id)
        .where(Token.hash == bindparam("hash", type_=LargeBinary))
    )


def identity_of_row(row: Any) -> Identity:
    """The identity of a token's row (TOKEN_COLUMNS); TokenRefused if there is none, or it is
    revoked or expired."""
    if row is None:
        raise TokenRefused("invalid token")
    token_id, expires_at, revoked_at, rooms, user_id, name = row[:6]  # by position: Rows and Records alike
    if revoked_at is not None:
        raise TokenRefused("token revoked")
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise TokenRefused("token expired")
    return Identity(
        user_id=user_id,
        name=name,
        token_id=token_id,
        expires_at=expires_at,
        rooms=tuple(rooms) if rooms is not None else None,
    )


async def refused_tokens(conn: AsyncConnection, *, token_ids: list[int]) -> dict[int, str]:
    """Which of these tokens are no longer good, and why (for closing their live sockets). A
    token whose row is gone (deleted in SQL, or with its user) is refused too."""
    rows = await conn.execute(
        select(Token.id, Token.revoked_at, (Token.expires_at <= func.now()).label("expired")).where(
            Token.id.in_(token_ids)
        )
    )
    refused = {token_id: "token deleted" for token_id in token_ids}
    for row in rows:
        if row.revoked_at is not None:
            refused[row.id] = "token revoked"
        elif row.expired:
            refused[row.id] = "token expired"
        else:
            del refused[row.id]
    return refused


async def create_token(
    conn: AsyncConnection,
    *,
    user_name: str,
    ttl: timedelta | None,
    label: str = "",
    rooms: list[str] | None = None,
) -> tuple[int, str]:
    """Create the user if needed and a token for them; returns (token id, raw token)."""
    raw = new_token()
    async with _write(conn):
        await conn.execute(pg_insert(User).values(name=user_name).on_conflict_do_nothing(index_elements=["name"]))
        user_id = await conn.scalar(select(User.id).where(User.name == user_name))
        expires = datetime.now(UTC) + ttl if ttl else None
        token_id = await conn.scalar(
            insert(Token)
            .values(user_id=user_id, hash=hash_token(raw), label=label, expires_at=expires, rooms=rooms)
            .returning(Token.id)
        )
    assert token_id is not None
    return token_id, raw


async def list_tokens(conn: AsyncConnection, *, user_name: str | None = None) -> list[Any]:
    query = (
        select(Token.id, User.name, Token.label, Token.created_at, Token.expires_at, Token.revoked_at, Token.rooms)
        .join(User, User.id == Token.user_id)
        .order_by(Token.id)
    )
    if user_name is not None:
        query = query.where(User.name == user_name)
    return list(await conn.execute(query))


async def revoke_tokens(
    conn: AsyncConnection, *, token_ids: list[int] | None = None, user_name: str | None = None
) -> int:
    """Revoke tokens by id or all of a user's; returns how many were newly revoked."""
    stmt = update(Token).where(Token.revoked_at.is_(None)).values(revoked_at=func.now())
    if token_ids is not None:
        stmt = stmt.where(Token.id.in_(token_ids))
    if user_name is not None:
        stmt = stmt.where(Token.user_id == select(User.id).where(User.name == user_name).scalar_subquery())
    async with _write(conn):
        result = await conn.execute(stmt)
    return result.rowcount


# --- the history API: rooms and search ---------------------------------------------------------


@dataclass(slots=True, frozen=True)
class RoomSummary:
    name: str
    last_seq: int


async def visible_rooms(
    conn: AsyncConnection, *, user_id: int, only: tuple[str, ...] | None, after: str | None, limit: int
) -> list[RoomSummary]:
    """Rooms by name after `after` (a name cursor), restricted to `only` when given: the public
    ones, and the private ones `user_id` is a member of. Rooms named `_…` are the server's own
    (the chapter's) and never listed."""
    member = select(Membership.room_id).where(Membership.room_id == Room.id, Membership.user_id == user_id).exists()
    query = select(Room.name, Room.last_seq).where(
        func.left(Room.name, 1) != "_", or_(Room.visibility == "public", member)
    )
    if only is not None:
        query = query.where(Room.name.in_(only))
    if after is not None:
        query = query.where(Room.name > after)
    rows = await conn.execute(query.order_by(Room.name).limit(limit))
    return [RoomSummary(name=r.name, last_seq=r.last_seq) for r in rows]


@dataclass(slots=True)
class Found:
    message: MessageRecord
    rank: float


async def search_messages(
    conn: AsyncConnection, *, room_id: int, query: str, limit: int, offset: int = 0, timeout_ms: int | None = None
) -> list[Found]:
    """A room's messages matching `query` (web-search syntax: words, "a phrase", -not, or),
    best first (ts_rank, then newest). The GIN index finds the matches; ranking them all is the
    price of "best first", so a query matching most of a huge room is slow: `timeout_ms` bounds
    it (the database cancels it, raising DBAPIError with sqlstate 57014)."""
    if timeout_ms is not None:
        # Local to this read's transaction (also safe behind PgBouncer in transaction mode).
        await conn.execute(select(func.set_config("statement_timeout", str(timeout_ms), True)))
    # websearch_to_tsquery never fails on syntax, whatever the user typed; 'simple' as in the index.
    tsquery = func.websearch_to_tsquery(literal_column("'simple'::regconfig"), query, type_=TSQUERY)
    rank = func.ts_rank(Message.search, tsquery).label("rank")
    rows = await conn.execute(
        select(*_MESSAGE_COLUMNS, _quote(), rank)
        .where(
            Message.room_id == room_id,
            Message.search.bool_op("@@")(tsquery),
            Message.kind.in_(MESSAGE_KINDS),  # an edit's own row is not a match: its message is
        )
        .order_by(rank.desc(), Message.seq.desc())
        .limit(limit)
        .offset(offset)
    )
    return [Found(MessageRecord.from_row(r), rank=float(r.rank)) for r in rows]


# --- retention ---------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Pruned:
    cutoff: datetime  # messages created before this went (or would go, in a dry run)
    count: int


async def prune_messages(
    conn: AsyncConnection, *, age: timedelta, room_id: int | None = None, batch: int = 10_000, dry_run: bool = False
) -> Pruned:
    """Delete messages older than `age` (by the database's clock), `batch` rows per transaction,
    so no transaction holds many row locks or runs long. Rooms keep their last_seq: seqs are
    never reused, and a client's cursor stays valid ("after N" returns what is left)."""
    now = await conn.scalar(select(func.now()))
    assert now is not None
    cutoff = now - age
    old = Message.created_at < cutoff
    if room_id is not None:
        old = old & (Message.room_id == room_id)
    if dry_run:
        return Pruned(cutoff, int(await conn.scalar(select(func.count()).where(old)) or 0))
    key = tuple_(Message.room_id, Message.seq)
    cursor: tuple[int, int] | None = None
    total = 0
    while True:
        # Each batch resumes along the primary key where the last one ended, so the whole run reads
        # the table (or the room) once instead of rescanning the rows it has already deleted.
        query = select(Message.room_id, Message.seq).where(old).order_by(Message.room_id, Message.seq).limit(batch)
        if cursor is not None:
            query = query.where(key > tuple_(*cursor))
        async with _write(conn):
            # Retention really deletes (migration 0008's trigger would leave tombstones).
            await conn.execute(select(func.set_config("chat.purge", "on", True)))
            keys = (await conn.execute(query)).all()
            if not keys:
                break
            first, last = (keys[0].room_id, keys[0].seq), (keys[-1].room_id, keys[-1].seq)
            deleted = await conn.execute(delete(Message).where(old, key >= tuple_(*first), key <= tuple_(*last)))
            total += deleted.rowcount
        cursor = last
    return Pruned(cutoff, total)
