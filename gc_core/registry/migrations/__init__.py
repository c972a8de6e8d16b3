"""The registry's schema migrations (Alembic), run from Python: no alembic.ini needed.

``open_database`` calls :func:`upgrade` on every start. A database that the registry made
before it had migrations (tables, no ``alembic_version``) is brought up to date by the
first revision, which creates only what is missing.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, text

__all__ = ["alembic_config", "upgrade"]

#: Where env.py, script.py.mako and versions/ live: inside the installed package.
SCRIPT_LOCATION = Path(__file__).resolve().parent
#: PostgreSQL advisory lock held while migrating (any constant the registry alone uses).
_LOCK_KEY = 0x6763_6662


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for this package's scripts, bound to ``connection`` if given."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database up to ``revision`` (all migrations by default)."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Replicas starting together: one migrates, the others wait and find it done.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        command.upgrade(alembic_config(connection), revision)
