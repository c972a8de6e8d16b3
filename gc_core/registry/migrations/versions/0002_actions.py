"""Actions: the Flows-style action provider's table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "actions",
        sa.Column("action_id", sa.String(36), primary_key=True),
        sa.Column("request_id", sa.String(200), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("creator", sa.String(200), nullable=False),
        sa.Column("endpoint_id", sa.String(64), nullable=False),
        sa.Column("label", sa.String(64), nullable=True),
        sa.Column("monitor_by", sa.JSON(), nullable=False),
        sa.Column("manage_by", sa.JSON(), nullable=False),
        sa.Column("release_after", sa.String(40), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("cancel_requested", sa.Float(), nullable=True),
        sa.Column("released", sa.Float(), nullable=True),
        sa.UniqueConstraint("creator", "request_id", name="uq_actions_request"),
    )


def downgrade() -> None:
    op.drop_table("actions")
