"""Fixtures for tests that need a registry of their own, or PostgreSQL.

A registry of a test module's own gets its own vhost too: two ledgers on one vhost would
share ``gc.ledger`` and each see only some of the results.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.conftest import BROKER_HOST, BROKER_PORT
from tests.fabric import RegistryServer, fresh_vhost

#: The PostgreSQL server the tests use (trust authentication, as on the dev machines and CI).
POSTGRES_ADMIN_URL = os.environ.get("GC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")

#: Starts a registry on its own vhost: (database URL, auth mode) -> (server, broker URL).
OwnRegistry = Callable[[str, str], tuple[RegistryServer, str]]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this session (SQLAlchemy URL), dropped after."""
    with fresh_postgres_database("gc_test") as url:
        yield url


@contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """A new, empty PostgreSQL database named ``prefix`` and a random suffix (its SQLAlchemy
    URL), dropped afterwards; skips (fails in CI) when there is no PostgreSQL."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        message = f"no PostgreSQL at {POSTGRES_ADMIN_URL} ({exc}); set GC_TEST_POSTGRES"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        yield f"{base}/{name}"
        # FORCE: a registry's pooled connections (a killed one's too) may outlive it a moment.
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty registry database on each backend: SQLite in a temp dir, then PostgreSQL
    (a schema of this test's own in the session's database)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    database: str = request.getfixturevalue("postgres_url")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    from sqlalchemy import create_engine, text

    engine = create_engine(database)
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{database}?options=-csearch_path%3D{schema}"
    with engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture(scope="module")
def own_registry(vhost: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRegistry]:
    """Start registries of this module's own, each on a fresh vhost; all stopped after."""
    with ExitStack() as stack:
        def start(db_url: str, auth: str) -> tuple[RegistryServer, str]:
            name = stack.enter_context(fresh_vhost("gc-own"))
            broker_url = f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{name}"
            # guest publishes everything here: the broker checks no sender for the ledger
            server = RegistryServer(db_url, broker_url, auth=auth, broker_checks_user_id=False)
            server.start()
            stack.callback(server.stop)  # (stopped before its vhost goes: last in, first out)
            return server, broker_url

        yield start
