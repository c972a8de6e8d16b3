"""The Node.js and Go clients work on the secured broker with a registry token, and the broker
enforces what the contract tells integrators there."""

from __future__ import annotations

import json
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions
import pytest

from tests.fabric import Endpoint, eventually
from tests.integration.test_raw_amqp import weighted_sum
from tests.other_languages import LANGUAGES, ClientRun, ExampleClients
from tests.secured_broker import Secured, amqp_error


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> ExampleClients:
    return ExampleClients(tmp_path_factory.mktemp("example-clients"))


@pytest.fixture(scope="module")
def alices_endpoint(secured: Secured) -> Iterator[tuple[Endpoint, str]]:
    """alice's endpoint, its agent logged in with its token, and a function of hers."""
    fabric = secured.fabric("alice", f"alice-{uuid.uuid4().hex[:6]}")
    endpoint = fabric.configure_endpoint("polyglot", engine="threads", workers=2)
    endpoint.start()
    with secured.client("alice") as client:
        function_id = client.register_function(weighted_sum)
    yield endpoint, function_id
    endpoint.stop_all()


def _get(secured: Secured, path: str) -> Any:
    """GET a registry path as alice, with her token, as docs/integration.md does with curl."""
    request = urllib.request.Request(f"{secured.registry_url}{path}", headers={
        "Authorization": f"Bearer {secured.tokens['alice']}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _run_as_alice(clients: ExampleClients, language: str, secured: Secured, endpoint_id: str,
                  function_id: str, *calls: dict[str, Any]) -> ClientRun:
    """alice's service, logged in to the broker with her token, submits ``calls``."""
    return clients.run(language, secured.node.url_for("alice", secured.tokens["alice"]),
                       endpoint_id, function_id, *calls)


def _ledger_status(secured: Secured, task_id: str) -> str:
    return str(_get(secured, f"/tasks/{task_id}")["status"])


def test_the_http_walk_through_finds_the_endpoint_its_status_and_a_json_callable_function(
        secured: Secured, alices_endpoint: tuple[Endpoint, str]) -> None:
    endpoint, function_id = alices_endpoint
    # Log in: the token names its user, who is the gc-user and the broker login
    assert _get(secured, "/whoami")["name"] == "alice"
    # Find the endpoint, and whether it is online
    assert endpoint.endpoint_id in {e["endpoint_id"] for e in _get(secured, "/endpoints")}
    eventually(lambda: _get(secured, f"/endpoints/{endpoint.endpoint_id}/status")["status"]
               == "online", 60, "the endpoint's first heartbeat")
    # Look up the function: any takes JSON calls, on an endpoint of its Python minor version
    listed = _get(secured, f"/endpoints/{endpoint.endpoint_id}/functions")
    assert function_id in {f["function_id"] for f in listed}
    function = _get(secured, f"/functions/{function_id}")
    assert function["python_version"].startswith(f"{sys.version_info[0]}.{sys.version_info[1]}.")
    policy = _get(secured, f"/endpoints/{endpoint.endpoint_id}")["policy"]
    assert policy["allowed_serializers"] is None  # the agent's allow-list decides: json too


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_client_logged_in_with_a_token_gets_its_results_and_the_ledger_records_them(
        language: str, clients: ExampleClients, secured: Secured,
        alices_endpoint: tuple[Endpoint, str]) -> None:
    endpoint, function_id = alices_endpoint
    # When alice's service logs in to the broker with her token and submits two calls
    run = _run_as_alice(clients, language, secured, endpoint.endpoint_id, function_id,
                        {"args": [[1, 2]]}, {"args": ["not a list"]})
    # Then both come back, the error as the contract's ErrorInfo
    assert [o["state"] for o in run.outcomes] == ["success", "failed"], \
        run.stderr + endpoint.read_logs()[-3000:]
    assert run.outcomes[0]["value"] == {"sum": 3, "n": 2}
    assert run.outcomes[1]["error"]["type"] == "TypeError"
    # and its group manifest let the ledger record them, for the HTTP API to answer
    def recorded() -> bool:
        return all(_ledger_status(secured, o["task_id"]) == o["state"] for o in run.outcomes)

    eventually(recorded, 30, "the ledger to record both tasks")


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_task_for_an_endpoint_the_user_may_not_use_is_refused_and_the_client_says_so(
        language: str, clients: ExampleClients, secured: Secured,
        alices_endpoint: tuple[Endpoint, str]) -> None:
    _, function_id = alices_endpoint
    # When alice's service sends a task to bob's endpoint, whose policy does not name her
    run = _run_as_alice(clients, language, secured, secured.endpoint_b, function_id,
                        {"args": [[1]]})
    # Then the broker refuses it before routing, and the client reports why and stops
    assert run.outcomes == []
    assert run.returncode == 2
    assert "ACCESS_REFUSED" in run.stderr or "403" in run.stderr, run.stderr


def test_the_secured_broker_refuses_what_the_contract_tells_clients_not_to_do(
        secured: Secured) -> None:
    connection = secured.connect("alice")
    try:
        # A client may check an exchange, never declare it
        channel = connection.channel()
        channel.exchange_declare("gc.tasks", "topic", durable=True, passive=True)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as declared:
            channel.exchange_declare("gc.tasks", "topic", durable=True)
        assert amqp_error(declared.value)[0] == 403
        # and a user_id other than the login is refused by the broker itself
        channel = connection.channel()
        channel.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as forged:
            channel.basic_publish("gc.events", "group.g1.submitted", b"{}",
                                  pika.BasicProperties(user_id="bob"))
        assert amqp_error(forged.value)[0] == 406
        # and a task for an endpoint that does not exist is refused, not returned
        channel = connection.channel()
        channel.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as unknown:
            channel.basic_publish("gc.tasks", f"no-such-{uuid.uuid4().hex[:8]}", b"{}",
                                  pika.BasicProperties(user_id="alice"), mandatory=True)
        assert amqp_error(unknown.value)[0] == 403
    finally:
        if connection.is_open:
            connection.close()
