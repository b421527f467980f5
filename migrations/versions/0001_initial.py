"""Users, tokens, rooms, messages; per-room seq and NOTIFY triggers.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The seq is taken by bumping rooms.last_seq: the UPDATE holds the room's row lock until the
# inserting transaction ends, so seqs in a room are gap-free (a rollback undoes the bump) and
# increase in commit order. Any SQL client's INSERT gets the same treatment.
SEQ_FUNCTION = """
CREATE FUNCTION chat_message_seq() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE rooms SET last_seq = last_seq + 1 WHERE id = NEW.room_id RETURNING last_seq INTO NEW.seq;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'room % does not exist', NEW.room_id USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NEW;
END
$$
"""

# NOTIFY is delivered at commit, in commit order. The payload carries the whole message when it
# fits under Postgres's 8000-byte limit; otherwise only the seq, and receivers read the row.
NOTIFY_FUNCTION = """
CREATE FUNCTION chat_message_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    payload := json_build_object(
        'seq', NEW.seq, 'author', NEW.author, 'author_id', NEW.author_id, 'kind', NEW.kind,
        'body', NEW.body, 'client_id', NEW.client_id, 'sent_at', NEW.created_at
    )::text;
    IF octet_length(payload) >= 8000 THEN
        payload := json_build_object('seq', NEW.seq, 'ref', true)::text;
    END IF;
    PERFORM pg_notify('room_' || NEW.room_id, payload);
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("name", sa.Text(), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("user_id", sa.BigInteger(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False, unique=True),
        sa.Column("label", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_tokens_user_id", "tokens", ["user_id"])
    op.create_table(
        "rooms",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("name", sa.Text(), nullable=False, unique=True),
        sa.Column("last_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "messages",
        sa.Column("room_id", sa.BigInteger(), sa.ForeignKey("rooms.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.BigInteger(), primary_key=True),
        sa.Column("author_id", sa.BigInteger(), sa.ForeignKey("users.id", ondelete="SET NULL"), nullable=True),
        sa.Column("author", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), server_default="text", nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("client_id", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("kind IN ('text', 'notice')", name="messages_kind_check"),
    )
    op.create_index(
        "messages_client_id_key",
        "messages",
        ["room_id", "author_id", "client_id"],
        unique=True,
        postgresql_where=sa.text("client_id IS NOT NULL"),
    )
    op.execute(SEQ_FUNCTION)
    op.execute(NOTIFY_FUNCTION)
    op.execute("CREATE TRIGGER messages_seq BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION chat_message_seq()")
    op.execute(
        "CREATE TRIGGER messages_notify AFTER INSERT ON messages FOR EACH ROW EXECUTE FUNCTION chat_message_notify()"
    )


def downgrade() -> None:
    op.drop_table("messages")
    op.execute("DROP FUNCTION chat_message_notify()")
    op.execute("DROP FUNCTION chat_message_seq()")
    op.drop_table("rooms")
    op.drop_table("tokens")
    op.drop_table("users")
