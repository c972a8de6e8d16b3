"""The registry is off the task path but for one step: an agent fetches a function it has
not run yet. A registry restarting at that moment (an upgrade, a crash) delays the task;
it must not fail it."""

from __future__ import annotations

import uuid
from pathlib import Path

from gc_client import Client, Executor
from tests.fabric import Endpoint, Fabric, bound_socket, eventually, free_port
from tests.integration.test_registry_replicas import Served, _amqp_url, _consuming, _serve


def quadruple(x: int) -> int:
    return 4 * x


def test_a_task_whose_function_is_fetched_while_the_registry_restarts_runs_once_it_is_back(
        own_vhost: str, tmp_path: Path) -> None:
    db_url, port, home = f"sqlite:///{tmp_path / 'registry.db'}", free_port(), tmp_path / "home"

    def serve() -> Served:
        served = _serve(db_url, home, name=f"registry-{uuid.uuid4().hex[:4]}", vhost=own_vhost,
                        port=port)
        eventually(lambda: _consuming(served), 60, "the registry to serve")
        return served

    registry = serve()
    fabric = Fabric(broker_url=_amqp_url(own_vhost), registry_url=registry.url, home=home,
                    vhost=own_vhost)
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
            registry = serve()
            assert future.result(timeout=120) == 8
    finally:
        endpoint.stop_all()
        registry.stop()
