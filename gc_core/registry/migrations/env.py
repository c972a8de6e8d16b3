"""Alembic's entry point: migrate the connection ``alembic_config`` was given."""

from __future__ import annotations

from alembic import context

from gc_core.registry.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through gc_core.registry.migrations, which passes "
                       "a database connection")
# SQLite cannot ALTER most things in place: batch mode copies the table instead.
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
with context.begin_transaction():
    context.run_migrations()
