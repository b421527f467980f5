"""Redis fan-out: the app's own inserts can skip NOTIFY; other SQL clients' rows also go to the relay.

The writer marks its batch INSERT's transaction with set_config('chat.notify', mode, true), which is
transaction-local and so safe through a transaction-mode pooler:

- 'room' (NOTIFY fan-out, the default): NOTIFY the room's channel, as before;
- 'off' (Redis fan-out): no NOTIFY at all; the writer publishes each committed batch to Redis.

A row from any other SQL client (psql, a script, another service) carries no mark: it is
NOTIFYed on the room's channel as before, and also on `chat_relay`, which the relay of a Redis
deployment forwards to Redis. Nobody listens to `chat_relay` under NOTIFY fan-out; such rows are
rare, so the extra NOTIFY costs nothing that matters.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.sql import earlier_function

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION chat_message_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mode text := current_setting('chat.notify', true);
    payload text;
BEGIN
    IF mode = 'off' THEN
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
    IF mode IS DISTINCT FROM 'room' THEN
        payload := json_build_object(
            'room_id', NEW.room_id, 'seq', NEW.seq, 'author', NEW.author, 'author_id', NEW.author_id,
            'kind', NEW.kind, 'body', NEW.body, 'client_id', NEW.client_id, 'sent_at', NEW.created_at
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
    op.execute(NOTIFY_FUNCTION)


def downgrade() -> None:
    op.execute(earlier_function("0001_initial", "NOTIFY_FUNCTION"))  # without the mark or the relay
