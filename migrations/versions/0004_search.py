"""Full-text search over messages: a generated tsvector column and its GIN index.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The 'simple' configuration lowercases words and stems nothing: it works the same for every
# language, at the price of no stemming ("run" does not find "running").
SEARCH_EXPRESSION = "to_tsvector('simple'::regconfig, body)"


def upgrade() -> None:
    # A STORED generated column: Postgres keeps it in step with body for every writer (psql
    # included), and adding it rewrites the table once, under an exclusive lock.
    op.add_column(
        "messages",
        sa.Column("search", postgresql.TSVECTOR(), sa.Computed(SEARCH_EXPRESSION, persisted=True), nullable=True),
    )
    op.create_index("messages_search_idx", "messages", ["search"], postgresql_using="gin")


def downgrade() -> None:
    op.drop_index("messages_search_idx", table_name="messages")
    op.drop_column("messages", "search")
