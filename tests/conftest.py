"""Fixtures for tests that talk to a real RabbitMQ and a real registry.

Each test session gets a fresh vhost on the local broker and its own registry (SQLite
in a temp dir) serving on a free port; tests isolate further with unique endpoint and
task group ids. In CI (CI=true) a missing broker fails the run; on a laptop it skips.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from tests.fabric import Endpoint, Fabric, RegistryServer, fresh_vhost

#: Folders whose tests share one resource of the machine's (the cluster's fixed ports, the one
#: Slurm): under xdist they all run in one worker.
ONE_WORKER_FOLDERS = {"cluster", "scheduler", "packaging"}

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672


def _broker_listening() -> bool:
    try:
        with socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def vhost() -> Iterator[str]:
    """A fresh vhost on the local broker, deleted after the session."""
    if not _broker_listening():
        message = (f"no RabbitMQ on {BROKER_HOST}:{BROKER_PORT}; "
                   "`make test` starts one (deploy/rabbitmq/ensure-broker.sh)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with fresh_vhost("gc-test") as name:
        yield name


@pytest.fixture
def own_vhost(vhost: str) -> Iterator[str]:
    """A fresh vhost of the test's own (the session's ``vhost`` checks the broker is there)."""
    with fresh_vhost("gc-own") as name:
        yield name


@pytest.fixture(scope="session")
def fabric(vhost: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    """A registry on SQLite with its ledger on the session's vhost."""
    home = tmp_path_factory.mktemp("gc-home")
    broker_url = f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{vhost}"
    server = RegistryServer(f"sqlite:///{home / 'registry.db'}", broker_url)
    server.start()
    yield Fabric(broker_url=broker_url, registry_url=server.url, home=home, vhost=vhost)
    server.stop()


@pytest.fixture(scope="session")
def endpoint(fabric: Fabric) -> Iterator[Endpoint]:
    """One endpoint with a 2-worker process engine, shared by the session's tests."""
    ep = fabric.configure_endpoint("shared", heartbeat_period=1.0)
    ep.start()
    yield ep
    ep.stop_all()


@pytest.fixture
def make_endpoint(fabric: Fabric) -> Iterator[object]:
    """Configure endpoints of a test's own; their agents are stopped afterwards."""
    made: list[Endpoint] = []

    def make(engine: str = "processes", workers: int = 2, **overrides: object) -> Endpoint:
        ep = fabric.configure_endpoint(f"ep-{uuid.uuid4().hex[:8]}", engine=engine,
                                       workers=workers, **overrides)
        made.append(ep)
        return ep

    yield make
    for ep in made:
        ep.stop_all()


@pytest.fixture
def client(fabric: Fabric) -> Iterator[object]:
    """A Client pointed at the session's fabric."""
    from gc_client import Client

    with Client(broker_url=fabric.broker_url, registry_url=fabric.registry_url,
                home=str(fabric.home)) as c:
        yield c


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Under ``pytest -n N`` (``make test``): a module's tests run in one worker, so its
    module-scoped fixtures start once; each of ONE_WORKER_FOLDERS runs in one worker."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            parts = path.split("/")
            return parts[1] if len(parts) > 2 and parts[1] in ONE_WORKER_FOLDERS else path

    return ByModule(config, log)
