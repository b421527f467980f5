"""Presence: which users are online in which room, through which server process.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Each server process beats here; a process whose beat is stale is dead, and its presence
    # rows are reaped by the living.
    op.create_table(
        "chat_processes",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("beat_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "presence",
        sa.Column("room_id", sa.BigInteger(), sa.ForeignKey("rooms.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("user_id", sa.BigInteger(), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("process_id", sa.Text(), sa.ForeignKey("chat_processes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("user_name", sa.Text(), nullable=False),
        sa.Column("sockets", sa.Integer(), nullable=False),
    )
    op.create_index("ix_presence_process_id", "presence", ["process_id"])


def downgrade() -> None:
    op.drop_table("presence")
    op.drop_table("chat_processes")
