"""Task columns as wide as the protocol's bounds: a worker name or content type of up to
255 characters and an end-user name of up to 256 are valid on the wire, and a column too
narrow for them made PostgreSQL refuse the ledger's whole batch.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

#: (column, width before, width after)
WIDENED = [("on_behalf_of", 200, 256), ("worker", 200, 255), ("content_type", 100, 255)]


def upgrade() -> None:
    _resize(after=True)


def downgrade() -> None:
    _resize(after=False)


def _resize(*, after: bool) -> None:
    with op.batch_alter_table("tasks") as batch:
        for column, before, wide in WIDENED:
            old, new = (before, wide) if after else (wide, before)
            batch.alter_column(column, existing_type=sa.String(old), type_=sa.String(new),
                               existing_nullable=False)
