"""The membership API: the user's room list (with unread and mention counts), making rooms,
members (invite, remove, leave), the topic and name, and DMs. README "Rooms and membership".

Changes of membership are notices in the room's stream (stored through the writer, so seqs stay
gap-free), and a removal is also a `removed` event on the room's channel, on which every process
ends the removed user's subscriptions to the room at once.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncEngine

from chat import deps, membership, store
from chat.api import NO_ROOM, ApiUser, _error
from chat.auth import Refused
from chat.membership import PRIVATE, NoSuchUser, RoomAccess, TooManyMembers
from chat.store import Identity
from chat.writer import NotStored, Writer
from chat.ws import ROOM_NAME

MY_ROOMS_MAX = 1000
TOPIC_MAX = 512
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
USER_PATTERN = r"^[^\x00]{1,64}$"

router = APIRouter(prefix="/api", tags=["rooms"])


class LastMessage(BaseModel):
    seq: int
    author: str
    kind: str
    body: str
    sent_at: str


class MyRoomOut(BaseModel):
    name: str
    visibility: Literal["public", "private"]
    topic: str
    dm_with: str | None = Field(description="a DM: the other member, whose name the room is listed under")
    owner: str | None
    last_seq: int
    read_seq: int = Field(description="everything up to this seq has been read (on any device)")
    unread: int = Field(
        description=f"messages after read_seq not by this user (counted up to {membership.UNREAD_COUNT_MAX})"
    )
    mentions: int = Field(description="messages after read_seq that mention this user")
    last_message: LastMessage | None


class NewRoom(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    visibility: Literal["public", "private"] = "public"
    topic: str = Field(default="", max_length=TOPIC_MAX)


class RoomChange(BaseModel):
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    topic: str | None = Field(default=None, max_length=TOPIC_MAX)


class UserRef(BaseModel):
    user: str = Field(pattern=USER_PATTERN)


class RoomInfo(BaseModel):
    name: str
    visibility: Literal["public", "private"]
    topic: str = ""
    dm_with: str | None = None


class Members(BaseModel):
    room: str
    members: list[str]


class MemberChange(BaseModel):
    room: str
    user: str
    changed: bool = Field(description="false: nothing to do (already a member, or not one)")


@router.get("/me/rooms")
async def my_rooms(
    engine: deps.Engine, user: ApiUser, limit: Annotated[int, Query(ge=1, le=MY_ROOMS_MAX)] = MY_ROOMS_MAX
) -> list[MyRoomOut]:
    """The rooms this user is a member of, most recently active first: one query, whatever the
    number of rooms. Token room scopes narrow the list."""
    async with engine.connect() as conn:
        rows = await membership.my_rooms(conn, user_id=user.user_id, limit=limit)
    return [
        MyRoomOut(
            name=r.name,
            visibility=r.visibility,  # type: ignore[arg-type]
            topic=r.topic,
            dm_with=r.dm_with,
            owner=r.owner,
            last_seq=r.last_seq,
            read_seq=r.read_seq,
            unread=r.unread,
            mentions=r.mentions,
            last_message=LastMessage(**r.last) if r.last else None,
        )
        for r in rows
        if user.may_join(r.name)
    ]


async def _seen(engine: AsyncEngine, user: Identity, room: str) -> RoomAccess:
    if ROOM_NAME.fullmatch(room) and user.may_join(room):
        async with engine.connect() as conn:
            found = await membership.access(conn, room=room, user_id=user.user_id)
        if found is not None:
            return found
    raise Refused(404, "no such room")


async def _owned(engine: AsyncEngine, user: Identity, room: str) -> RoomAccess:
    found = await _seen(engine, user, room)
    if found.owner_id != user.user_id:
        raise Refused(403, "only the room's owner may do this")
    return found


async def _notice(writer: Writer, room_id: int, user: Identity, body: str) -> None:
    """A membership change as a notice in the room's stream (by the user who made it, so it is
    not unread for them)."""
    try:
        await writer.submit(room_id=room_id, author_id=user.user_id, author=user.name, body=body, kind="notice")
    except NotStored as exc:
        raise Refused(503, f"the change is made, but its notice was not stored: {exc.detail}") from None


@router.post(
    "/rooms",
    status_code=201,
    responses={409: _error("`room name taken`"), 429: _error("`too many rooms created by this user`")},
)
async def create_room(engine: deps.Engine, settings: deps.Settings, user: ApiUser, new: NewRoom) -> RoomInfo:
    """Make a room owned by this user, its first member. Names starting with `dm.` are DMs'."""
    if new.name.startswith(membership.DM_PREFIX) or not user.may_join(new.name):
        raise Refused(409, "room name taken")
    async with engine.connect() as conn:
        room_id = await membership.create(
            conn,
            name=new.name,
            creator_id=user.user_id,
            visibility=new.visibility,
            topic=new.topic,
            max_per_user=settings.max_rooms_per_user,
        )
        if room_id is None:
            if await membership.access(conn, room=new.name, user_id=user.user_id) is not None:
                raise Refused(409, "room name taken")
            if await store.room_id(conn, name=new.name, create=False) is not None:
                raise Refused(409, "room name taken")
            raise Refused(429, "too many rooms created by this user")
    return RoomInfo(name=new.name, visibility=new.visibility, topic=new.topic)


@router.patch("/rooms/{room}", responses={403: _error("not the owner"), 404: NO_ROOM, 409: _error("name taken")})
async def change_room(
    engine: deps.Engine, writer: deps.Writer, room: str, user: ApiUser, change: RoomChange
) -> RoomInfo:
    """The owner renames the room or changes its topic. Open subscriptions keep the name they
    subscribed with until they subscribe again."""
    found = await _owned(engine, user, room)
    name = room
    async with engine.connect() as conn:
        if change.topic is not None:
            await membership.set_topic(conn, room_id=found.room_id, topic=change.topic)
        if change.name is not None and change.name != room:
            if change.name.startswith(membership.DM_PREFIX) or not await membership.rename(
                conn, room_id=found.room_id, name=change.name
            ):
                raise Refused(409, "room name taken")
            name = change.name
    if change.topic is not None:
        await _notice(writer, found.room_id, user, f"{user.name} set the topic: {change.topic}")
    if name != room:
        await _notice(writer, found.room_id, user, f"{user.name} renamed the room to {name}")
    return RoomInfo(name=name, visibility=found.visibility, topic=change.topic or "")  # type: ignore[arg-type]


@router.get("/rooms/{room}/members", responses={404: NO_ROOM})
async def room_members(engine: deps.Engine, room: str, user: ApiUser) -> Members:
    found = await _seen(engine, user, room)
    async with engine.connect() as conn:
        names = await membership.members(conn, room_id=found.room_id)
    return Members(room=room, members=names)


@router.post(
    "/rooms/{room}/members",
    responses={403: _error("not the owner"), 404: _error("`no such room` or `no such user`"), 409: _error("full")},
)
async def invite(
    engine: deps.Engine, writer: deps.Writer, hub: deps.Hub, room: str, user: ApiUser, who: UserRef
) -> MemberChange:
    """The owner adds a member (to a DM nobody may be added)."""
    found = await _owned(engine, user, room)
    if found.dm:
        raise Refused(403, "a DM has exactly two members")
    async with engine.connect() as conn:
        try:
            added = await membership.invite(conn, room_id=found.room_id, user_name=who.user)
        except NoSuchUser:
            raise Refused(404, "no such user") from None
        except TooManyMembers as exc:
            raise Refused(409, str(exc)) from None
    if added:
        await _notice(writer, found.room_id, user, f"{user.name} added {who.user}")
        async with engine.connect() as conn:
            added_id = await membership.user_id(conn, name=who.user)
        if added_id is not None:
            await hub.rooms_changed(added_id)
    return MemberChange(room=room, user=who.user, changed=added)


@router.delete("/rooms/{room}/members/{member}", responses={403: _error("not the owner"), 404: NO_ROOM})
async def remove(
    engine: deps.Engine, writer: deps.Writer, hub: deps.Hub, room: str, member: str, user: ApiUser
) -> MemberChange:
    """The owner removes a member, or a member leaves (removes themselves). Their open
    subscriptions to the room end at once, on every process."""
    found = await _seen(engine, user, room)
    if member != user.name and found.owner_id != user.user_id:
        raise Refused(403, "only the room's owner may remove others")
    if found.dm:
        raise Refused(403, "a DM has exactly two members")
    async with engine.connect() as conn:
        removed = await membership.remove(conn, room_id=found.room_id, user_name=member)
    if removed is not None:
        await hub.publish(found.room_id, "removed", member, user_id=removed)
        text = f"{member} left" if member == user.name else f"{user.name} removed {member}"
        await _notice(writer, found.room_id, user, text)
        await hub.rooms_changed(removed)
    return MemberChange(room=room, user=member, changed=removed is not None)


@router.post(
    "/dms",
    responses={
        400: _error("a DM with oneself"),
        404: _error("`no such user`"),
        429: _error("`too many rooms created by this user`"),
    },
)
async def dm(engine: deps.Engine, settings: deps.Settings, hub: deps.Hub, user: ApiUser, who: UserRef) -> RoomInfo:
    """The DM with `user`: found, or made (a private room of the two; it counts against the
    caller's CHAT_MAX_ROOMS_PER_USER)."""
    if who.user == user.name:
        raise Refused(400, "a DM needs another user")
    async with engine.connect() as conn:
        other = await membership.user_id(conn, name=who.user)
        if other is None:
            raise Refused(404, "no such user")
        name = membership.dm_name(user.user_id, other)
        if not user.may_join(name):
            raise Refused(404, "no such user")
        if await membership.access(conn, room=name, user_id=user.user_id) is None:
            made = await membership.create(
                conn,
                name=name,
                creator_id=user.user_id,
                visibility=PRIVATE,
                topic="",
                max_per_user=settings.max_rooms_per_user,
                dm_with=other,
            )
            if made is None and await membership.access(conn, room=name, user_id=user.user_id) is None:
                raise Refused(429, "too many rooms created by this user")
            if made is not None:
                await hub.rooms_changed(other)
    return RoomInfo(name=name, visibility="private", dm_with=who.user)
