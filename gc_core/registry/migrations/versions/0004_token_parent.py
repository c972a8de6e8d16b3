"""Tokens remember the token that issued them, so revoking one revokes its children.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database that create_all made from newer models (see 0001) has the column already.
    columns = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("tokens")}
    if "parent" in columns:
        return
    op.add_column("tokens", sa.Column("parent", sa.String(16), nullable=True))
    op.create_index("ix_tokens_parent", "tokens", ["parent"])


def downgrade() -> None:
    op.drop_index("ix_tokens_parent", "tokens")
    op.drop_column("tokens", "parent")
