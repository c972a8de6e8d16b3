"""Dashboard sessions live in the database, so that every registry of it knows them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database that create_all made from newer models (see 0001) has the table already.
    if "ui_sessions" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "ui_sessions",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("token_id", sa.String(16),
                  sa.ForeignKey("tokens.token_id", ondelete="CASCADE"), nullable=True),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("last_used", sa.Float(), nullable=False),
    )
    op.create_index("ix_ui_sessions_last_used", "ui_sessions", ["last_used"])


def downgrade() -> None:
    op.drop_index("ix_ui_sessions_last_used", "ui_sessions")
    op.drop_table("ui_sessions")
