"""Each agent's last heartbeat, so that an endpoint served from several hosts counts all.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database that create_all made from newer models (see 0001) has the table already.
    if "agent_heartbeats" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "agent_heartbeats",
        sa.Column("endpoint_id", sa.String(36), primary_key=True),
        sa.Column("agent", sa.String(276), primary_key=True),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("heartbeat_json", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("agent_heartbeats")
