"""The tables as the registry made them before it had migrations.

A database that ``create_all`` made (tables, no ``alembic_version``) may predate some of
them or some of their columns: this revision creates only what is missing, giving a
missing NOT NULL column a server default so the rows already there stay valid.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_meta = sa.MetaData()

#: In creation order: a table comes after those its foreign keys name.
TABLES = [
    sa.Table(
        "endpoints", _meta,
        sa.Column("endpoint_id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=True),
        sa.Column("heartbeat_json", sa.Text(), nullable=True),
        sa.Column("visibility", sa.String(10), nullable=False),
        sa.Column("allowed_users", sa.JSON(), nullable=False),
        sa.Column("allowed_groups", sa.JSON(), nullable=False),
        sa.Column("allowed_functions", sa.JSON(), nullable=True),
        sa.Column("allowed_serializers", sa.JSON(), nullable=True),
    ),
    sa.Table(
        "functions", _meta,
        sa.Column("function_id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("content_type", sa.String(100), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("source", sa.Text(), nullable=True),
        sa.Column("python_version", sa.String(40), nullable=False),
        sa.Column("serializer", sa.String(100), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("sharing", sa.String(10), nullable=False),
        sa.Column("shared_groups", sa.JSON(), nullable=False),
        sa.Index("ix_functions_content_hash", "content_hash"),
    ),
    sa.Table(
        "groups", _meta,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("created", sa.Float(), nullable=False),
    ),
    sa.Table(
        "tasks", _meta,
        sa.Column("task_id", sa.String(64), primary_key=True),
        sa.Column("task_group_id", sa.String(64), nullable=False),
        sa.Column("endpoint_id", sa.String(64), nullable=False),
        sa.Column("function_id", sa.String(64), nullable=False),
        sa.Column("user", sa.String(200), nullable=False),
        sa.Column("on_behalf_of", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("submitted", sa.Float(), nullable=True),
        sa.Column("received", sa.Float(), nullable=True),
        sa.Column("started", sa.Float(), nullable=True),
        sa.Column("finished", sa.Float(), nullable=True),
        sa.Column("worker", sa.String(200), nullable=False),
        sa.Column("content_type", sa.String(100), nullable=False),
        sa.Column("result", sa.LargeBinary(), nullable=True),
        sa.Column("error_json", sa.Text(), nullable=True),
        sa.Column("stdout", sa.Text(), nullable=False),
        sa.Column("stderr", sa.Text(), nullable=False),
        sa.Column("recorded", sa.Float(), nullable=True),
        sa.Column("result_note", sa.Text(), nullable=False),
        sa.Index("ix_tasks_group", "task_group_id"),
        sa.Index("ix_tasks_recorded", "recorded"),
    ),
    sa.Table(
        "users", _meta,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
    ),
    sa.Table(
        "group_members", _meta,
        sa.Column("group", sa.String(64), sa.ForeignKey("groups.name", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("user", sa.String(64), sa.ForeignKey("users.name", ondelete="CASCADE"),
                  primary_key=True),
    ),
    sa.Table(
        "tokens", _meta,
        sa.Column("token_id", sa.String(16), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("user", sa.String(64), sa.ForeignKey("users.name", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("endpoint_id", sa.String(36), nullable=True),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("expires", sa.Float(), nullable=True),
        sa.Column("revoked", sa.Float(), nullable=True),
        sa.Index("ix_tokens_user", "user"),
    ),
]


def upgrade() -> None:
    for table in TABLES:
        _create_or_complete(table)


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table.name)


def _create_or_complete(table: sa.Table) -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    if not inspector.has_table(table.name):
        table.create(bind)
        return
    present = {column["name"] for column in inspector.get_columns(table.name)}
    for column in table.columns:
        if column.name not in present:
            op.add_column(table.name, _with_fill(column))
    indexed = {index["name"] for index in inspector.get_indexes(table.name)}
    for index in table.indexes:
        if index.name not in indexed:
            op.create_index(str(index.name), table.name, [c.name for c in index.columns])


def _with_fill(column: sa.Column[object]) -> sa.Column[object]:
    """A copy of a column to add to a table that has rows: NOT NULL ones get a default."""
    fill = None
    if not column.nullable:
        kind = column.type
        fill = ("[]" if isinstance(kind, sa.JSON)
                else "0" if isinstance(kind, (sa.Float, sa.Boolean)) else "")
    return sa.Column(column.name, column.type, nullable=column.nullable,
                     server_default=None if fill is None else sa.text(f"'{fill}'"))
