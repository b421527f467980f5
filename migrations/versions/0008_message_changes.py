"""Messages that change: edit, delete, react and unreact are rows of `messages` with their own seq.

A change is a row with kind 'edit' | 'delete' | 'react' | 'unreact' and `target_seq` naming the
message it changes: it takes the room's next seq from the same trigger as a message, is notified
by the same trigger, and is replayed by `after` like any message. A trigger applies it to the
message's current state in the same transaction (body, edited_at, deleted_at, the reactions
table), so the state a history page reads and the stream of events never disagree.

Changes made in SQL become the same events: `UPDATE messages SET body = …` stores an 'edit'
event, `DELETE FROM messages …` stores a 'delete' event and leaves a tombstone. A delete erases
the body (and the bodies of the message's edit events) from the table and the search index.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.sql import earlier_function

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MESSAGE_KINDS = "('text', 'notice')"
CHANGE_KINDS = "('edit', 'delete', 'react', 'unreact')"
QUOTE_CHARS = 200  # the start of a replied-to message that travels with the reply

# Errors carry HINT 'chat:<code>': the writer turns them into error frames with that code
# (chat/writer.py), and the row alone is refused while the rest of its batch is stored.
# BEFORE INSERT triggers fire in name order: messages_seq (0001) first, so the room's row is
# locked before a change is checked, and two changes of one message are checked one at a time.
CHANGE_FUNCTION = f"""
CREATE FUNCTION chat_message_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    target messages%ROWTYPE;
    from_sql boolean := pg_trigger_depth() > 1;  -- made by our UPDATE/DELETE triggers: no checks
BEGIN
    IF NEW.reply_to IS NOT NULL THEN
        SELECT * INTO target FROM messages
        WHERE room_id = NEW.room_id AND seq = NEW.reply_to AND kind IN {MESSAGE_KINDS};
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no message % in this room to reply to', NEW.reply_to
                USING ERRCODE = 'P0001', HINT = 'chat:not_found';
        END IF;
        IF target.deleted_at IS NOT NULL THEN
            RAISE EXCEPTION 'message % was deleted', NEW.reply_to USING ERRCODE = 'P0001', HINT = 'chat:deleted';
        END IF;
    END IF;
    IF NEW.kind IN {MESSAGE_KINDS} THEN
        RETURN NEW;
    END IF;
    SELECT * INTO target FROM messages
    WHERE room_id = NEW.room_id AND seq = NEW.target_seq AND kind IN {MESSAGE_KINDS} FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no message % in this room', NEW.target_seq USING ERRCODE = 'P0001', HINT = 'chat:not_found';
    END IF;
    IF target.deleted_at IS NOT NULL THEN
        RAISE EXCEPTION 'message % was deleted', NEW.target_seq USING ERRCODE = 'P0001', HINT = 'chat:deleted';
    END IF;
    IF NEW.kind = 'edit' THEN
        IF NOT from_sql AND target.author_id IS DISTINCT FROM NEW.author_id THEN
            RAISE EXCEPTION 'you may edit only your own messages' USING ERRCODE = 'P0001', HINT = 'chat:forbidden';
        END IF;
        UPDATE messages SET body = NEW.body, edited_at = NEW.created_at
        WHERE room_id = NEW.room_id AND seq = NEW.target_seq;
    ELSIF NEW.kind = 'delete' THEN
        IF NOT from_sql AND target.author_id IS DISTINCT FROM NEW.author_id
           AND NOT EXISTS (SELECT 1 FROM rooms WHERE id = NEW.room_id AND created_by = NEW.author_id) THEN
            RAISE EXCEPTION 'only its author or the room''s owner may delete a message'
                USING ERRCODE = 'P0001', HINT = 'chat:forbidden';
        END IF;
        NEW.body := '';
        -- Erasure: the body, every edit's body, and so their search vectors.
        UPDATE messages SET body = '', deleted_at = NEW.created_at
        WHERE room_id = NEW.room_id AND seq = NEW.target_seq;
        UPDATE messages SET body = ''
        WHERE room_id = NEW.room_id AND target_seq = NEW.target_seq AND kind = 'edit' AND body <> '';
        DELETE FROM message_reactions WHERE room_id = NEW.room_id AND seq = NEW.target_seq;
    ELSIF NEW.kind = 'react' THEN
        INSERT INTO message_reactions (room_id, seq, user_id, emoji)
        VALUES (NEW.room_id, NEW.target_seq, NEW.author_id, NEW.body) ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'you already reacted % to message %', NEW.body, NEW.target_seq
                USING ERRCODE = 'P0001', HINT = 'chat:already_reacted';
        END IF;
    ELSIF NEW.kind = 'unreact' THEN
        DELETE FROM message_reactions
        WHERE room_id = NEW.room_id AND seq = NEW.target_seq AND user_id = NEW.author_id AND emoji = NEW.body;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'you have not reacted % to message %', NEW.body, NEW.target_seq
                USING ERRCODE = 'P0001', HINT = 'chat:not_reacted';
        END IF;
    END IF;
    RETURN NEW;
END
$$
"""

# Any SQL client's UPDATE of a message's body becomes an 'edit' event (by the message's author).
# Our own triggers' updates run one level deeper and are left alone.
SQL_EDIT_FUNCTION = f"""
CREATE FUNCTION chat_message_sql_edit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() > 1 OR OLD.kind NOT IN {MESSAGE_KINDS} OR NEW.body IS NOT DISTINCT FROM OLD.body THEN
        RETURN NULL;
    END IF;
    IF OLD.deleted_at IS NOT NULL THEN
        RAISE EXCEPTION 'message % was deleted: its body is gone for good', OLD.seq
            USING ERRCODE = 'P0001', HINT = 'chat:deleted';
    END IF;
    INSERT INTO messages (room_id, author_id, author, kind, body, target_seq)
    VALUES (NEW.room_id, NEW.author_id, NEW.author, 'edit', NEW.body, NEW.seq);
    RETURN NULL;
END
$$
"""

# Any SQL client's DELETE of a message becomes a 'delete' event and leaves a tombstone (so that
# "everything after seq N" stays exact). Cascades (a room deleted) run deeper and really delete,
# and so does a transaction that sets chat.purge (retention: `chat prune`). Change rows are
# deleted as asked.
SQL_DELETE_FUNCTION = f"""
CREATE FUNCTION chat_message_sql_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() > 1 OR OLD.kind NOT IN {MESSAGE_KINDS}
       OR coalesce(current_setting('chat.purge', true), '') = 'on' THEN
        RETURN OLD;
    END IF;
    IF OLD.deleted_at IS NULL THEN
        INSERT INTO messages (room_id, author_id, author, kind, body, target_seq)
        VALUES (OLD.room_id, NULL, current_user, 'delete', '', OLD.seq);
    END IF;
    RETURN NULL;  -- the row stays, as a tombstone
END
$$
"""

# The edit window (CHAT_EDIT_WINDOW_SECONDS, 0: unlimited) is the server's setting: the writer's
# statement passes it here for each edit it stores.
WINDOW_FUNCTION = f"""
CREATE FUNCTION chat_edit_window_check(p_room bigint, p_target bigint, p_kind text, p_window double precision)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF p_kind = 'edit' AND p_window > 0 AND EXISTS (
        SELECT 1 FROM messages WHERE room_id = p_room AND seq = p_target AND kind IN {MESSAGE_KINDS}
        AND created_at < now() - make_interval(secs => p_window)
    ) THEN
        RAISE EXCEPTION 'message % is too old to edit (the edit window is % s)', p_target, p_window
            USING ERRCODE = 'P0001', HINT = 'chat:edit_window';
    END IF;
    RETURN true;
END
$$
"""

# 0001's NOTIFY, with the change's target and a reply's quote (the start of the original).
NOTIFY_FUNCTION = f"""
CREATE OR REPLACE FUNCTION chat_message_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mode text := current_setting('chat.notify', true);
    payload text;
    quote json;
BEGIN
    IF mode = 'off' THEN
        RETURN NULL;
    END IF;
    IF NEW.reply_to IS NOT NULL THEN
        SELECT json_build_object('author', author, 'body', left(body, {QUOTE_CHARS}), 'deleted', deleted_at IS NOT NULL)
        INTO quote FROM messages WHERE room_id = NEW.room_id AND seq = NEW.reply_to;
    END IF;
    payload := json_build_object(
        'seq', NEW.seq, 'author', NEW.author, 'author_id', NEW.author_id, 'kind', NEW.kind,
        'body', NEW.body, 'client_id', NEW.client_id, 'sent_at', NEW.created_at,
        'target_seq', NEW.target_seq, 'reply_to', NEW.reply_to, 'quote', quote
    )::text;
    IF octet_length(payload) >= 8000 THEN
        payload := json_build_object('seq', NEW.seq, 'ref', true)::text;
    END IF;
    PERFORM pg_notify('room_' || NEW.room_id, payload);
    IF mode IS DISTINCT FROM 'room' THEN  -- another SQL client's row: the relay brings it to Redis (0007)
        payload := json_build_object(
            'room_id', NEW.room_id, 'seq', NEW.seq, 'author', NEW.author, 'author_id', NEW.author_id,
            'kind', NEW.kind, 'body', NEW.body, 'client_id', NEW.client_id, 'sent_at', NEW.created_at,
            'target_seq', NEW.target_seq, 'reply_to', NEW.reply_to, 'quote', quote
        )::text;
        IF octet_length(payload) >= 8000 THEN
            payload := json_build_object('room_id', NEW.room_id, 'seq', NEW.seq, 'ref', true)::text;
        END IF;
        PERFORM pg_notify('chat_relay', payload);
    END IF;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.add_column("messages", sa.Column("target_seq", sa.BigInteger(), nullable=True))
    op.add_column("messages", sa.Column("reply_to", sa.BigInteger(), nullable=True))
    op.add_column("messages", sa.Column("edited_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("messages", sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_constraint("messages_kind_check", "messages", type_="check")
    op.create_check_constraint(
        "messages_kind_check",
        "messages",
        f"kind IN {MESSAGE_KINDS} AND target_seq IS NULL OR kind IN {CHANGE_KINDS} AND target_seq IS NOT NULL",
    )
    # A delete finds the message's edits to erase them.
    op.create_index(
        "messages_target_idx",
        "messages",
        ["room_id", "target_seq"],
        postgresql_where=sa.text("target_seq IS NOT NULL"),
    )
    # History pages read messages, not changes: a room with many changes still pages in one
    # index range of `limit` entries.
    op.create_index(
        "messages_history_idx",
        "messages",
        ["room_id", "seq"],
        postgresql_where=sa.text(f"kind IN {MESSAGE_KINDS}"),
    )
    op.create_table(
        "message_reactions",
        sa.Column("room_id", sa.BigInteger(), primary_key=True),
        sa.Column("seq", sa.BigInteger(), primary_key=True),
        sa.Column("emoji", sa.Text(), primary_key=True),
        sa.Column("user_id", sa.BigInteger(), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.ForeignKeyConstraint(
            ["room_id", "seq"],
            ["messages.room_id", "messages.seq"],
            ondelete="CASCADE",
            name="message_reactions_message_fkey",
        ),
    )
    op.execute(CHANGE_FUNCTION)
    op.execute(SQL_EDIT_FUNCTION)
    op.execute(SQL_DELETE_FUNCTION)
    op.execute(WINDOW_FUNCTION)
    op.execute(NOTIFY_FUNCTION)
    op.execute(
        "CREATE TRIGGER messages_seq_change BEFORE INSERT ON messages "
        "FOR EACH ROW EXECUTE FUNCTION chat_message_change()"
    )
    op.execute(
        "CREATE TRIGGER messages_sql_edit AFTER UPDATE OF body ON messages "
        "FOR EACH ROW EXECUTE FUNCTION chat_message_sql_edit()"
    )
    op.execute(
        "CREATE TRIGGER messages_sql_delete BEFORE DELETE ON messages "
        "FOR EACH ROW EXECUTE FUNCTION chat_message_sql_delete()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER messages_sql_delete ON messages")
    op.execute("DROP TRIGGER messages_sql_edit ON messages")
    op.execute("DROP TRIGGER messages_seq_change ON messages")
    op.execute(earlier_function("0007_redis_fanout", "NOTIFY_FUNCTION"))
    op.execute("DROP FUNCTION chat_message_sql_delete()")
    op.execute("DROP FUNCTION chat_message_sql_edit()")
    op.execute("DROP FUNCTION chat_message_change()")
    op.execute("DROP FUNCTION chat_edit_window_check(bigint, bigint, text, double precision)")
    op.drop_table("message_reactions")
    # Change events have no place in the older schema; messages keep their current bodies.
    op.execute(f"DELETE FROM messages WHERE kind IN {CHANGE_KINDS}")
    op.drop_index("messages_history_idx", table_name="messages")
    op.drop_index("messages_target_idx", table_name="messages")
    op.drop_constraint("messages_kind_check", "messages", type_="check")
    op.create_check_constraint("messages_kind_check", "messages", f"kind IN {MESSAGE_KINDS}")
    op.drop_column("messages", "deleted_at")
    op.drop_column("messages", "edited_at")
    op.drop_column("messages", "reply_to")
    op.drop_column("messages", "target_seq")
