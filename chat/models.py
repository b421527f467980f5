"""SQLAlchemy models. The schema itself is made by the alembic migration, which also owns the
triggers that give each message its per-room seq and send its NOTIFY."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    DateTime,
    FetchedValue,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    Text,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import TSVECTOR
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    hash: Mapped[bytes] = mapped_column(LargeBinary, unique=True)  # sha256 of the raw token
    label: Mapped[str] = mapped_column(Text, server_default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rooms: Mapped[list[str] | None] = mapped_column(ARRAY(Text))  # None: any room


class Room(Base):
    __tablename__ = "rooms"
    __table_args__ = (CheckConstraint("visibility IN ('public', 'private')", name="rooms_visibility_check"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    # The last seq handed out; bumped under this row's lock by the messages trigger.
    last_seq: Mapped[int] = mapped_column(BigInteger, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Who made it by joining it (migration 0006); None for the server's own and older rooms.
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    # Migration 0009: public rooms anyone may join; private ones only their members see.
    visibility: Mapped[str] = mapped_column(Text, server_default="public")
    topic: Mapped[str] = mapped_column(Text, server_default="")
    dm: Mapped[bool] = mapped_column(Boolean, server_default=false())  # a private room of two


class Membership(Base):
    """A user in a room, with how far they have read (migration 0009)."""

    __tablename__ = "memberships"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    room_id: Mapped[int] = mapped_column(ForeignKey("rooms.id", ondelete="CASCADE"), primary_key=True, index=True)
    read_seq: Mapped[int] = mapped_column(BigInteger, server_default="0")
    joined_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Mention(Base):
    """`@name` of a member in a message, resolved by the messages_mentions trigger (0009)."""

    __tablename__ = "mentions"
    __table_args__ = (
        ForeignKeyConstraint(
            ["room_id", "seq"], ["messages.room_id", "messages.seq"], ondelete="CASCADE", name="mentions_message_fkey"
        ),
        Index("ix_mentions_room_id_seq", "room_id", "seq"),
    )

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    room_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        # A message ('text', 'notice') or a change of one (migration 0008), naming its target.
        CheckConstraint(
            "kind IN ('text', 'notice') AND target_seq IS NULL"
            " OR kind IN ('edit', 'delete', 'react', 'unreact') AND target_seq IS NOT NULL",
            name="messages_kind_check",
        ),
        Index("messages_history_idx", "room_id", "seq", postgresql_where=text("kind IN ('text', 'notice')")),
        Index("messages_target_idx", "room_id", "target_seq", postgresql_where=text("target_seq IS NOT NULL")),
        # Idempotent sends: one row per (room, author, client-chosen id).
        Index(
            "messages_client_id_key",
            "room_id",
            "author_id",
            "client_id",
            unique=True,
            postgresql_where=text("client_id IS NOT NULL"),
        ),
        # Full-text search (migration 0005, btree_gin): the room first, so a search reads only its
        # room's entries, and its time tells nothing about other rooms (README: "History API").
        # No pending list (0012): its flush stalled the writer's INSERT for 80-150 ms.
        Index(
            "messages_room_search_idx",
            "room_id",
            "search",
            postgresql_using="gin",
            postgresql_with={"fastupdate": "off"},
        ),
    )

    room_id: Mapped[int] = mapped_column(ForeignKey("rooms.id", ondelete="CASCADE"), primary_key=True)
    # Set by the seq trigger: FetchedValue tells SQLAlchemy the server supplies it.
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False, server_default=FetchedValue())
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    author: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text, server_default="text")
    body: Mapped[str] = mapped_column(Text)
    client_id: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Kept by Postgres from body ('simple': no stemming, the same for every language).
    search: Mapped[str | None] = mapped_column(
        TSVECTOR, Computed("to_tsvector('simple'::regconfig, body)", persisted=True)
    )
    # migration 0008: a change's target; a reply's original; a message's current state.
    target_seq: Mapped[int | None] = mapped_column(BigInteger)
    reply_to: Mapped[int | None] = mapped_column(BigInteger)
    edited_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class MessageReaction(Base):
    """One user's reaction to one message: kept by the 'react'/'unreact' trigger (migration 0008)."""

    __tablename__ = "message_reactions"
    __table_args__ = (
        ForeignKeyConstraint(
            ["room_id", "seq"],
            ["messages.room_id", "messages.seq"],
            ondelete="CASCADE",
            name="message_reactions_message_fkey",
        ),
    )

    room_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    emoji: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)


class ChatProcess(Base):
    __tablename__ = "chat_processes"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    beat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Presence(Base):
    __tablename__ = "presence"

    room_id: Mapped[int] = mapped_column(ForeignKey("rooms.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    process_id: Mapped[str] = mapped_column(
        ForeignKey("chat_processes.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    user_name: Mapped[str] = mapped_column(Text)
    sockets: Mapped[int] = mapped_column(Integer)
