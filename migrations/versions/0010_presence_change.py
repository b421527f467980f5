"""Presence changes in one statement: a function that takes the (room, user) lock and applies the
change under it.

Before, a socket's presence enter (and leave) was four round trips: BEGIN, a statement taking the
(room, user) advisory lock, a statement reading and writing under it (it needs a snapshot taken
after the lock: a second statement), COMMIT. The lock was held across two of them, and a join's
enter queued behind the previous socket's leave. In a plpgsql function each statement takes its
own snapshot, so one call does the same in one round trip, in autocommit, with the lock held for
microseconds. It can also check, under the lock, that the user is still a member of the room:
the join's recheck for a removal that raced it (chat/ws.py, chat/connection.py), in the same
round trip.

Revision ID: 0010
Revises: 0009 (membership)
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PRESENCE_FUNCTION = r"""
CREATE FUNCTION chat_presence_change(
    p_room_id bigint, p_user_id bigint, p_process_id text, p_name text, p_delta integer,
    p_stale double precision, p_notify boolean, p_channel text, p_join text, p_leave text,
    p_members_only boolean
) RETURNS TABLE (before bigint, after bigint, notified bigint, online text[], member boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    -- Presence is ephemeral and reconciled every beat: its transactions need not wait for the disk.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- The process's row (reaped after a long stall) is put back first, then the (room, user) lock
    -- (the key chat/presence.py's _LOCK takes too). Only when it is missing: an INSERT ... ON
    -- CONFLICT DO NOTHING waits for an uncommitted update of the row, and the heartbeat updates
    -- it in a transaction that waits for the disk.
    IF NOT EXISTS (SELECT 1 FROM chat_processes WHERE id = p_process_id) THEN
        INSERT INTO chat_processes (id) VALUES (p_process_id) ON CONFLICT (id) DO NOTHING;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended(p_room_id::text || ':' || p_user_id::text, 0));
    -- A join's recheck: a removal committed since the join's access check leaves no trace here.
    IF p_members_only AND NOT EXISTS (
        SELECT 1 FROM memberships m WHERE m.room_id = p_room_id AND m.user_id = p_user_id
    ) THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint, 0::bigint, ARRAY[]::text[], false;
        RETURN;
    END IF;
    -- Under that lock, in one statement: the user's live sockets in the room before (`before`)
    -- and after (`after`) this process's count changes by p_delta, the change itself (a row at 0
    -- is deleted), with p_notify the join or leave NOTIFY when the user came online or went
    -- offline, and who is online in the room after it. One snapshot, so `after` is computed: our
    -- own row counts only while this process is live (its beat fresh).
    RETURN QUERY
    WITH live AS (
        SELECT p.user_id, p.user_name, p.sockets FROM presence p JOIN chat_processes c ON c.id = p.process_id
        WHERE p.room_id = p_room_id AND c.beat_at > now() - make_interval(secs => p_stale)
    ),
    me AS (
        SELECT
            EXISTS (
                SELECT 1 FROM chat_processes
                WHERE id = p_process_id AND beat_at > now() - make_interval(secs => p_stale)
            ) AS live,
            coalesce((
                SELECT sockets FROM presence
                WHERE room_id = p_room_id AND user_id = p_user_id AND process_id = p_process_id
            ), 0) AS old
    ),
    counts AS (
        SELECT me.live, me.old, greatest(me.old + p_delta, 0) AS new,
            (SELECT coalesce(sum(sockets), 0) FROM live WHERE user_id = p_user_id) AS before
        FROM me
    ),
    result AS (
        SELECT new, before, before - CASE WHEN live THEN old - new ELSE 0 END AS after FROM counts
    ),
    upserted AS (
        INSERT INTO presence (room_id, user_id, process_id, user_name, sockets)
        SELECT p_room_id, p_user_id, p_process_id, p_name, new
        FROM result WHERE new > 0
        ON CONFLICT (room_id, user_id, process_id) DO UPDATE SET sockets = excluded.sockets
    ),
    removed AS (
        DELETE FROM presence WHERE room_id = p_room_id AND user_id = p_user_id
        AND CASE WHEN process_id = p_process_id THEN (SELECT new FROM result) = 0 ELSE sockets = 0 END
    ),
    notified AS (
        SELECT pg_notify(p_channel, CASE WHEN before = 0 THEN p_join ELSE p_leave END)
        FROM result WHERE p_notify AND (before = 0) <> (after = 0)
    )
    SELECT result.before::bigint, result.after::bigint, (SELECT count(*) FROM notified), ARRAY(
        SELECT user_name FROM live WHERE user_id <> p_user_id AND sockets > 0
        UNION SELECT p_name FROM result WHERE result.after > 0
        ORDER BY 1
    ), true
    FROM result;
END
$$
"""


def upgrade() -> None:
    op.execute(PRESENCE_FUNCTION)


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION chat_presence_change(bigint, bigint, text, text, integer, double precision, boolean,"
        " text, text, text, boolean)"
    )
