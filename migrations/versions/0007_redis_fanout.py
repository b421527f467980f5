"""Redis fan-out: the app's inserts skip NOTIFY; other SQL clients' rows go to the relay.

With CHAT_FANOUT_URL set, the app publishes its own messages to Redis after commit and marks its
INSERT's transaction with set_config('chat.notify', 'off', true) (transaction-local, so it is
safe through a transaction-mode pooler): the trigger then costs no NOTIFY. Rows from any other
SQL client still NOTIFY: each room's channel as before, or, when chat_fanout.relay is on (set by
the servers at start-up with Redis fan-out), the one `chat_relay` channel that the relay forwards
to Redis.

Revision ID: 0007
Revises: 0004 (the coordinator re-chains it after 0005 and 0006)
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION chat_message_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    IF current_setting('chat.notify', true) = 'off' THEN
        RETURN NULL;  -- the app publishes this row to Redis itself, after commit
    END IF;
    IF coalesce((SELECT relay FROM chat_fanout), false) THEN
        payload := json_build_object(
            'room_id', NEW.room_id, 'seq', NEW.seq, 'author', NEW.author, 'author_id', NEW.author_id,
            'kind', NEW.kind, 'body', NEW.body, 'client_id', NEW.client_id, 'sent_at', NEW.created_at
        )::text;
        IF octet_length(payload) >= 8000 THEN
            payload := json_build_object('room_id', NEW.room_id, 'seq', NEW.seq, 'ref', true)::text;
        END IF;
        PERFORM pg_notify('chat_relay', payload);
        RETURN NULL;
    END IF;
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

# 0001's function, for the downgrade.
PREVIOUS_NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION chat_message_notify() RETURNS trigger LANGUAGE plpgsql AS $$
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
        "chat_fanout",
        sa.Column("id", sa.Boolean(), server_default=sa.text("true"), primary_key=True),
        sa.Column("relay", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.CheckConstraint("id", name="chat_fanout_one_row"),
    )
    op.execute("INSERT INTO chat_fanout DEFAULT VALUES")
    op.execute(NOTIFY_FUNCTION)


def downgrade() -> None:
    op.execute(PREVIOUS_NOTIFY_FUNCTION)
    op.drop_table("chat_fanout")
