"""Membership: public and private rooms, DMs, members with their read positions, and mentions.

Existing rooms become public; existing users become members of the rooms they have written in
(read up to the room's head, so nobody starts with years of "unread"); each room's creator is a
member too. A trigger stores each `@name` of a member resolved to the user's id, so that a
rename does not break it and the room list counts mentions with one index range per room. Only
messages ('text') mention; an edit re-reads its message's mentions and a delete drops them
(migration 0008 applies both to the message's row).

Revision ID: 0009
Revises: 0008 (message changes)
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MENTIONS_FUNCTION = r"""
CREATE FUNCTION chat_mentions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- An edit or a delete (0008 applies them to the message's row) re-reads the message: an edit
    -- may add or take back a mention, a deleted message (body erased) mentions nobody.
    IF TG_OP = 'UPDATE' THEN
        DELETE FROM mentions WHERE room_id = NEW.room_id AND seq = NEW.seq;
    END IF;
    -- Names as chat allows them (the token CLI's users); only members of the room are mentioned,
    -- and an author mentioning themselves is not a mention.
    INSERT INTO mentions (user_id, room_id, seq)
    SELECT DISTINCT u.id, NEW.room_id, NEW.seq
    FROM (SELECT (regexp_matches(NEW.body, '@([A-Za-z0-9_.-]{1,64})', 'g'))[1] AS name LIMIT 50) AS named
    JOIN users u ON u.name = named.name
    JOIN memberships m ON m.room_id = NEW.room_id AND m.user_id = u.id
    WHERE u.id IS DISTINCT FROM NEW.author_id AND NEW.deleted_at IS NULL
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
"""


def upgrade() -> None:
    op.add_column("rooms", sa.Column("visibility", sa.Text(), server_default="public", nullable=False))
    op.add_column("rooms", sa.Column("topic", sa.Text(), server_default="", nullable=False))
    op.add_column("rooms", sa.Column("dm", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_check_constraint("rooms_visibility_check", "rooms", "visibility IN ('public', 'private')")
    op.create_table(
        "memberships",
        sa.Column("user_id", sa.BigInteger(), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("room_id", sa.BigInteger(), sa.ForeignKey("rooms.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("read_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("joined_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_memberships_room_id", "memberships", ["room_id"])
    op.create_table(
        "mentions",
        sa.Column("user_id", sa.BigInteger(), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("room_id", sa.BigInteger(), primary_key=True),
        sa.Column("seq", sa.BigInteger(), primary_key=True),
        # Pruning a message takes its mentions with it.
        sa.ForeignKeyConstraint(
            ["room_id", "seq"], ["messages.room_id", "messages.seq"], ondelete="CASCADE", name="mentions_message_fkey"
        ),
    )
    op.create_index("ix_mentions_room_id_seq", "mentions", ["room_id", "seq"])
    op.execute(MENTIONS_FUNCTION)
    # Only messages mention: change events (0008) are not messages, their effect on one is.
    op.execute(
        "CREATE TRIGGER messages_mentions AFTER INSERT ON messages FOR EACH ROW "
        "WHEN (NEW.kind = 'text' AND strpos(NEW.body, '@') > 0) EXECUTE FUNCTION chat_mentions()"
    )
    op.execute(
        "CREATE TRIGGER messages_mentions_changed AFTER UPDATE OF body, deleted_at ON messages FOR EACH ROW "
        "WHEN (NEW.kind = 'text' AND (NEW.body IS DISTINCT FROM OLD.body OR NEW.deleted_at IS DISTINCT FROM "
        "OLD.deleted_at)) EXECUTE FUNCTION chat_mentions()"
    )
    op.execute("""
        INSERT INTO memberships (user_id, room_id, read_seq)
        SELECT w.author_id, w.room_id, r.last_seq
        FROM (SELECT DISTINCT author_id, room_id FROM messages WHERE author_id IS NOT NULL) w
        JOIN rooms r ON r.id = w.room_id
        UNION
        SELECT r.created_by, r.id, r.last_seq FROM rooms r WHERE r.created_by IS NOT NULL
        ON CONFLICT DO NOTHING
    """)  # fmt: skip


def downgrade() -> None:
    op.execute("DROP TRIGGER messages_mentions_changed ON messages")
    op.execute("DROP TRIGGER messages_mentions ON messages")
    op.execute("DROP FUNCTION chat_mentions()")
    op.drop_index("ix_mentions_room_id_seq", table_name="mentions")
    op.drop_table("mentions")
    op.drop_index("ix_memberships_room_id", table_name="memberships")
    op.drop_table("memberships")
    op.drop_constraint("rooms_visibility_check", "rooms", type_="check")
    op.drop_column("rooms", "dm")
    op.drop_column("rooms", "topic")
    op.drop_column("rooms", "visibility")
