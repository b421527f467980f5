"""Full-text search by room first: a GIN index on (room_id, search) with btree_gin.

The index of 0004 held every room's words, so a search read the entries of every room and
then dropped the other rooms' rows: its time grew with how common a word was in rooms the
token may not read. With room_id in the index, a search reads its own room's entries only.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # btree_gin ships with Postgres (contrib) and is trusted: no superuser needed since PG 13.
    op.execute("CREATE EXTENSION IF NOT EXISTS btree_gin")
    op.create_index("messages_room_search_idx", "messages", ["room_id", "search"], postgresql_using="gin")
    op.drop_index("messages_search_idx", table_name="messages")


def downgrade() -> None:
    op.create_index("messages_search_idx", "messages", ["search"], postgresql_using="gin")
    op.drop_index("messages_room_search_idx", table_name="messages")
    # The extension stays: another schema may use it, and it costs nothing unused.
