"""The registry is off the task path but for one step: an agent fetches a function it has
not run yet. A registry restarting at that moment (an upgrade, a crash) delays the task;
it must not fail it."""

from __future__ import annotations

from pathlib import Path

from gc_client import Client, Executor
from tests.fabric import Endpoint, bound_socket, eventually, free_port
from tests.integration.test_registry_replicas import fabric_served_by, serving


def quadruple(x: int) -> int:
    return 4 * x


def test_a_task_whose_function_is_fetched_while_the_registry_restarts_runs_once_it_is_back(
        own_vhost: str, tmp_path: Path) -> None:
    db_url, port, home = f"sqlite:///{tmp_path / 'registry.db'}", free_port(), tmp_path / "home"

    registry = serving(db_url, home, vhost=own_vhost, port=port)
    fabric = fabric_served_by(registry, home, own_vhost)
    endpoint: Endpoint = fabric.configure_endpoint("fetching", workers=1)
    endpoint.start()
    try:
        with Client(broker_url=fabric.broker_url, registry_url=registry.url,
                    home=str(home)) as client, \
                Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
            client.register_function(quadruple)  # registered; the agent has not fetched it
            registry.stop()
            with bound_socket(port):  # refusing connections; no other test gets it
                future = ex.submit(quadruple, 2)
                eventually(lambda: "waiting for the registry" in endpoint.read_logs(), 60,
                           "the agent to say it waits for the registry")
                assert not future.done()
            registry = serving(db_url, home, vhost=own_vhost, port=port)
            assert future.result(timeout=120) == 8
    finally:
        endpoint.stop_all()
        registry.stop()
