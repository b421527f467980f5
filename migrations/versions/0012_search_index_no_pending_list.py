"""The search index takes each message at once (GIN fastupdate off): no pending list to flush.

With fastupdate on (Postgres's default), a GIN index gathers new entries in a pending list, and
the insert that finds the list over gin_pending_list_limit (4 MB) merges all of it into the
index, in its own statement. Here that was the writer's INSERT: 80-150 ms on the CPU, holding the
room's seq row (perf on the whole machine at 2,000 msg/s showed ginInsertCleanup under it), so
every room's sends waited once every 20-60 s of load. With it off, each insert updates the index
itself: a little more work per message, and no stall. It also spares searches the pending list,
which they would read in full.

Revision ID: 0012
Revises: 0011 (presence process lock)
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "messages_room_search_idx"


def upgrade() -> None:
    op.execute(f"ALTER INDEX {INDEX} SET (fastupdate = off)")
    # Entries already pending stay there (and in every search) until merged: merge them now.
    op.execute(f"SELECT gin_clean_pending_list('{INDEX}'::regclass)")


def downgrade() -> None:
    op.execute(f"ALTER INDEX {INDEX} RESET (fastupdate)")
