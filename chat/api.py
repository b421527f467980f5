"""The history API: rooms, pages of a room's history, and full-text search, over plain HTTP with
the sockets' tokens. A message here is exactly the socket's message frame (protocol.message_dict),
so a client can mix both. Rooms a token may not use answer like rooms that do not exist."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from chat import deps, membership, protocol, store
from chat.auth import HttpUser, Refused
from chat.store import Identity, MessageRecord
from chat.ws import ROOM_NAME

MAX_SEQ = protocol.MAX_BIGINT  # seqs are bigint: larger cursors would fail in the database, not here
ROOMS_MAX = 500
SEARCH_MAX = 50
SEARCH_OFFSET_MAX = 1000  # each page ranks every match before it: deep pages cost more
SEARCH_TIMEOUT_MS = 3000  # a query matching most of a huge room is cut off, not left to run


class Detail(BaseModel):
    detail: str


def _error(description: str) -> dict[str, Any]:
    return {"model": Detail, "description": description}


async def api_identity(limits: deps.Limits, user: HttpUser) -> Identity:
    """The caller, within its per-user rate limit (CHAT_API_RATE_PER_SECOND, byte-weighed)."""
    wait = limits.api_check(user.user_id)
    if wait > 0:
        raise Refused(429, f"slow down: retry in {wait:.1f}s")
    return user


ApiUser = Annotated[Identity, Depends(api_identity)]
UNAUTHORIZED = _error("`missing token`, `invalid token`, `token expired` or `token revoked`")
NO_ROOM = _error("`no such room`: it does not exist, or this token may not use it")
router = APIRouter(
    prefix="/api",
    tags=["history"],
    responses={
        401: UNAUTHORIZED,
        403: _error("`origin not allowed` (cookie sent from another site)"),
        429: _error("`slow down: retry in …s`: this user's requests (weighed by reply size) are over the limit"),
    },
)


class RoomOut(BaseModel):
    name: str
    last_seq: int = Field(description="the room's last seq: `after` this, nothing exists yet")


class Quote(BaseModel):
    author: str
    body: str = Field(description="the start of the original as it is now (empty once deleted)")
    deleted: bool


class Reaction(BaseModel):
    emoji: str
    count: int
    mine: bool = Field(description="whether the caller reacted so")


class MessageOut(BaseModel):
    type: Literal["message"] = "message"
    room: str
    seq: int
    author: str
    kind: Literal["text", "notice", "edit", "delete", "react", "unreact"]
    body: str = Field(description="a reaction's emoji for react/unreact; empty for a deleted message")
    sent_at: str = Field(json_schema_extra={"format": "date-time"})  # as the socket sends it
    client_id: str | None
    target_seq: int | None = Field(default=None, description="a change's message")
    reply_to: int | None = None
    quote: Quote | None = None
    edited_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    deleted: bool = False
    reactions: list[Reaction] = Field(default_factory=list, description="in pages by `before` (current state)")


class Page(BaseModel):
    room: str
    messages: list[MessageOut] = Field(description="oldest first")
    has_more: bool = Field(description="more messages exist in the paging direction (older, or newer for `after`)")


class Hit(MessageOut):
    rank: float = Field(description="ts_rank: higher is better")


class SearchResults(BaseModel):
    room: str
    q: str
    offset: int
    results: list[Hit] = Field(description="best first; ties newest first")
    has_more: bool


def _message(room: str, record: MessageRecord) -> MessageOut:
    return MessageOut.model_validate(protocol.message_dict(room, record))


async def _room_id(conn: AsyncConnection, user: Identity, room: str) -> int:
    # `_…` rooms are the server's own and invalid names cannot exist: both answer as unknown, as
    # do private rooms the user is not a member of.
    if ROOM_NAME.fullmatch(room) and user.may_join(room):
        found = await membership.access(conn, room=room, user_id=user.user_id)
        if found is not None:
            return found.room_id
    raise Refused(404, "no such room")


@router.get("/rooms")
async def rooms(
    engine: deps.Engine,
    user: ApiUser,
    after: Annotated[str | None, Query(max_length=64, pattern=r"^[^\x00]*$", description="the last name seen")] = None,
    limit: Annotated[int, Query(ge=1, le=ROOMS_MAX)] = 100,
) -> list[RoomOut]:
    """The rooms this token may use, by name, each with its last seq: every public room, and the
    private rooms (and DMs) this user is a member of."""
    async with engine.connect() as conn:
        found = await store.visible_rooms(conn, user_id=user.user_id, only=user.rooms, after=after, limit=limit)
    return [RoomOut(name=r.name, last_seq=r.last_seq) for r in found]


# exclude_unset: a message is exactly its socket frame, which leaves out empty keys.
@router.get(
    "/rooms/{room}/messages",
    responses={400: _error("both `before` and `after`"), 404: NO_ROOM},
    response_model_exclude_unset=True,
)
async def messages(
    engine: deps.Engine,
    settings: deps.Settings,
    limits: deps.Limits,
    room: str,
    user: ApiUser,
    before: Annotated[int | None, Query(ge=1, le=MAX_SEQ, description="messages with seq < this")] = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_SEQ, description="messages with seq > this")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_SEQ, description="clamped to CHAT_HISTORY_PAGE_MAX (200)")] = 50,
) -> Page:
    """A page of history, oldest first: the latest messages, those before a seq (paging back),
    or those after one (catching up). Latest and `before` pages show each message as it is now
    (edits, tombstones, reactions); `after` pages are the stream itself: messages and the
    changes of them (edit, delete, react, unreact) in seq order. Each page is one statement and
    one index range scan of `limit` rows (reactions and quotes read by primary key within it).
    A page stops short of CHAT_HISTORY_REPLY_BYTES of messages (has_more is then true); its
    size counts against the caller's rate limit."""
    if before is not None and after is not None:
        raise Refused(400, "give before or after, not both")
    # Clamped, not refused, like the socket's history frame; has_more says whether to go on.
    limit = min(limit, settings.history_page_max)
    async with engine.connect() as conn:
        room_id = await _room_id(conn, user, room)
        # One row more than asked tells whether there is more, at the cost of one index entry.
        if after is not None:
            rows = await store.messages_after(conn, room_id=room_id, after=after, limit=limit + 1)
            page = rows[:limit]
        else:
            rows = await store.messages_before(
                conn, room_id=room_id, before=before, limit=limit + 1, viewer_id=user.user_id
            )
            page = rows[-limit:]
    frames = [protocol.message_frame(room, r) for r in page]
    kept = protocol.fit(frames, max_bytes=settings.history_reply_bytes, newest=after is None)
    more = len(rows) > limit or kept < len(page)
    if after is None:
        page, frames = page[len(page) - kept :], frames[len(frames) - kept :]
    else:
        page, frames = page[:kept], frames[:kept]
    limits.api_check(user.user_id, size=sum(map(len, frames)))
    return Page(room=room, messages=[_message(room, r) for r in page], has_more=more)


@router.get(
    "/rooms/{room}/search",
    responses={
        400: _error("`q` is empty or holds NUL"),
        404: NO_ROOM,
        429: _error("`too many searches at once` (CHAT_SEARCHES_PER_USER)"),
        503: _error("the search took too long"),
    },
    response_model_exclude_unset=True,
)
async def search(
    engine: deps.Engine,
    limits: deps.Limits,
    room: str,
    user: ApiUser,
    q: Annotated[str, Query(max_length=256, description='words, "a phrase", -excluded, or')],
    limit: Annotated[int, Query(ge=1, le=SEARCH_MAX)] = 20,
    offset: Annotated[int, Query(ge=0, le=SEARCH_OFFSET_MAX)] = 0,
) -> SearchResults:
    """Full-text search in one room, best first (Postgres's `simple` text search: whole words,
    any language, no stemming)."""
    if not q.strip():
        raise Refused(400, "q is empty: give words to search for")
    if "\x00" in q:  # Postgres text cannot hold NUL: refuse it here rather than fail there
        raise Refused(400, "q may not contain NUL")
    # Each search holds a pooled connection for up to SEARCH_TIMEOUT_MS: a few per user at once,
    # so that one user cannot take the pool.
    running = limits.searches
    if not running.take(user.user_id):
        raise Refused(429, "too many searches at once: wait for one to finish")
    try:
        async with engine.connect() as conn:
            room_id = await _room_id(conn, user, room)
            try:
                found = await store.search_messages(
                    conn, room_id=room_id, query=q, limit=limit + 1, offset=offset, timeout_ms=SEARCH_TIMEOUT_MS
                )
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) != "57014":  # query_canceled: our timeout
                    raise
                raise Refused(503, "the search took too long: try rarer words") from None
    finally:
        running.give_back(user.user_id)
    results = [Hit(**_message(room, f.message).model_dump(exclude_unset=True), rank=f.rank) for f in found[:limit]]
    return SearchResults(room=room, q=q, offset=offset, results=results, has_more=len(found) > limit)
