"""Presence changes hold their process's row against a reaper until they commit.

chat_presence_change (0010) put a reaped process's row back when it was missing, but only looked:
a reaper deleting the row between that look and the presence row's INSERT left the INSERT to fail
its foreign key (a join answered with an error, seen under load in the bench when a process
stalled past the stale limit and came back). Now the function takes FOR KEY SHARE on the row: a
DELETE waits for the change to commit (and a change that waited for a DELETE finds the row gone and
puts it back), while the heartbeat's UPDATE of beat_at does not conflict with it, so a change still
never waits for the heartbeat's commit.

Revision ID: 0011
Revises: 0010 (presence change)
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.sql import earlier_function

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LOOKED = """    IF NOT EXISTS (SELECT 1 FROM chat_processes WHERE id = p_process_id) THEN
        INSERT INTO chat_processes (id) VALUES (p_process_id) ON CONFLICT (id) DO NOTHING;
    END IF;"""

_HELD = """    PERFORM 1 FROM chat_processes WHERE id = p_process_id FOR KEY SHARE;
    IF NOT FOUND THEN
        INSERT INTO chat_processes (id) VALUES (p_process_id) ON CONFLICT (id) DO NOTHING;
    END IF;"""


def presence_function() -> str:
    sql = earlier_function("0010_presence_change", "PRESENCE_FUNCTION")
    if _LOOKED not in sql:
        raise ValueError("0010's chat_presence_change is not the one this migration amends")
    return sql.replace(_LOOKED, _HELD)


def upgrade() -> None:
    op.execute(presence_function())


def downgrade() -> None:
    op.execute(earlier_function("0010_presence_change", "PRESENCE_FUNCTION"))
