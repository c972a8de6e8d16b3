"""Several registries on one database: the database's own id, and results waiting aside.

``database_identity`` holds one row, the id this database got once, here: a registry claims
its broker vhost with it, so that registries of another database refuse that vhost
(``gc_core/registry/vhost_claim.py``). ``early_results`` keeps a result that reached one
registry's ledger before another committed the manifest naming its task
(``gc_core/registry/ledger.py``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import time
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database that create_all made from newer models (see 0001) has the tables already.
    tables = set(sa.inspect(op.get_bind()).get_table_names())
    if "database_identity" not in tables:
        op.create_table(
            "database_identity",
            sa.Column("singleton", sa.Integer(), primary_key=True, autoincrement=False),
            sa.Column("database_id", sa.String(36), nullable=False),
            sa.Column("created", sa.Float(), nullable=False),
        )
    if "early_results" not in tables:
        op.create_table(
            "early_results",
            sa.Column("early_id", sa.Integer(), primary_key=True, autoincrement=True),
            sa.Column("task_id", sa.String(64), nullable=False),
            sa.Column("sender", sa.String(255), nullable=False),
            sa.Column("dead", sa.Boolean(), nullable=False),
            sa.Column("result_json", sa.Text(), nullable=False),
            sa.Column("payload", sa.LargeBinary(), nullable=True),
            sa.Column("payload_size", sa.Integer(), nullable=False),
            sa.Column("arrived", sa.Float(), nullable=False),
        )
        op.create_index("ix_early_results_task_id", "early_results", ["task_id"])
        op.create_index("ix_early_results_sender", "early_results", ["sender"])
        op.create_index("ix_early_results_arrived", "early_results", ["arrived"])
    # The id is made once, with the database: every registry on it reads the same one.
    identity = sa.table("database_identity", sa.column("singleton", sa.Integer()),
                        sa.column("database_id", sa.String()), sa.column("created", sa.Float()))
    if op.get_bind().execute(sa.select(sa.func.count()).select_from(identity)).scalar() == 0:
        op.bulk_insert(identity, [{"singleton": 1, "database_id": str(uuid.uuid4()),
                                   "created": time.time()}])


def downgrade() -> None:
    op.drop_table("early_results")
    op.drop_table("database_identity")
