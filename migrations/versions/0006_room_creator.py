"""Who created each room, so that room creation can be capped per user (CHAT_MAX_ROOMS_PER_USER).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rooms made before this revision have no known creator: they count against nobody.
    op.add_column(
        "rooms",
        sa.Column("created_by", sa.BigInteger(), sa.ForeignKey("users.id", ondelete="SET NULL"), nullable=True),
    )
    op.create_index("ix_rooms_created_by", "rooms", ["created_by"])


def downgrade() -> None:
    op.drop_index("ix_rooms_created_by", table_name="rooms")
    op.drop_column("rooms", "created_by")
