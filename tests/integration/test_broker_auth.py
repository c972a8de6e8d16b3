"""The broker enforces the registry's policies: real connections to a private secured node.

A private RabbitMQ node (``tests/secured_broker.py``) asks a tokens-mode registry about every
login, vhost, resource and routing key. alice owns endpoint A (only alice may use it), bob
owns endpoint B; each endpoint has an agent token. Every refusal below comes from the broker.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import httpx
import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from gc_client import AsyncExecutor, Client, Executor
from gc_core.errors import BrokerError, GCError
from gc_core.protocol import Envelope, GroupManifest, decode_result, encode_event
from gc_core.registry import identity, store
from gc_core.registry_api.schemas import EndpointPolicy
from gc_core.topology import load_topology
from tests.fabric import Endpoint, eventually
from tests.secured_broker import (
    Secured,
    SecuredFabric,
    amqp_error,
    node_log,
    secured_world,
)

TOPOLOGY = load_topology()

#: What the broker says when it refuses an operation on a channel.
ACCESS_REFUSED = 403


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    with secured_world(tmp_path_factory.mktemp("secured")) as world:
        yield world


def _refused(operation: Callable[[], Any]) -> str:
    """Run a channel operation the broker must refuse; return its reply text."""
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
        operation()
    code, text = amqp_error(caught.value)
    assert code == ACCESS_REFUSED or "user_id" in text, text
    return text


def _task_headers(user: str, group: str) -> dict[str, Any]:
    return {"gc-protocol": 1, "gc-function-id": "f", "gc-endpoint-id": "e", "gc-user": user,
            "gc-task-group": group}


def _declare_result_queue(channel: BlockingChannel, user: str, group: str) -> str:
    queue = TOPOLOGY.queue("results", user=user, task_group_id=group)
    channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
    for binding in queue.bindings:
        channel.queue_bind(queue.name, binding.exchange, binding.routing_key)
    return queue.name


# -- the registry's /auth/* answers, over HTTP ---------------------------------------------

def _ask(secured: Secured, path: str, **form: str) -> str:
    response = httpx.post(f"{secured.registry_url}/auth/{path}", data={"vhost": "/", **form},
                          auth=("rabbitmq", secured.broker_secret))
    assert response.status_code == 200
    return response.text


def test_auth_user_allows_a_token_only_for_the_name_it_stands_for(secured: Secured) -> None:
    agent_a = f"endpoint-{secured.endpoint_a}"
    assert _ask(secured, "user", username="alice", password=secured.tokens["alice"]) == "allow"
    assert _ask(secured, "user", username=agent_a, password=secured.tokens[agent_a]) == "allow"
    assert _ask(secured, "user", username="bob", password=secured.tokens["alice"]) == "deny"
    assert _ask(secured, "user", username="alice", password=secured.tokens[agent_a]) == "deny"
    assert _ask(secured, "user", username="alice", password="gct_not-a-token") == "deny"
    assert _ask(secured, "user", username="alice") == "deny"
    assert _ask(secured, "vhost", username="alice") == "allow"
    assert _ask(secured, "vhost", username="alice", vhost="other") == "deny"
    assert _ask(secured, "vhost", username="mallory") == "deny"


def test_no_registry_user_may_log_in_as_the_registrys_own_broker_account(secured: Secured) -> None:
    # Agents trust that account's user_id (the action provider submits for its callers), so
    # a registry user who happens to bear its name must not pass as it.
    with secured.sessions() as db:
        identity.create_user(db, "gc-registry")
        token = identity.issue_token(db, "gc-registry").token
    assert _ask(secured, "user", username="gc-registry", password=token) == "deny"


def test_auth_resource_and_topic_answer_each_rule(secured: Secured) -> None:
    a, b = secured.endpoint_a, secured.endpoint_b
    agent_a = f"endpoint-{a}"
    resource = [  # (user, resource, name, permission, expected)
        ("alice", "exchange", "gc.tasks", "write", "allow"),
        ("alice", "exchange", "gc.tasks", "configure", "deny"),
        ("alice", "exchange", "gc.tasks", "read", "deny"),
        ("alice", "exchange", "gc.results", "read", "allow"),
        ("alice", "exchange", "gc.results", "write", "deny"),
        ("alice", "exchange", "gc.dead", "read", "deny"),
        ("alice", "exchange", "amq.default", "write", "deny"),
        ("alice", "queue", "gc.results.alice.g1", "configure", "allow"),
        ("alice", "queue", "gc.results.alice.g1", "read", "allow"),
        ("alice", "queue", "gc.results.bob.g1", "read", "deny"),
        ("alice", "queue", f"gc.ep.{a}.tasks", "read", "deny"),
        ("alice", "queue", "gc.ledger", "read", "deny"),
        (agent_a, "queue", f"gc.ep.{a}.tasks", "read", "allow"),
        (agent_a, "queue", f"gc.ep.{a}.commands", "configure", "allow"),
        # each running agent's own copy of the endpoint's commands (several hosts, one endpoint)
        (agent_a, "queue", f"gc.ep.{a}.commands.0f3a", "configure", "allow"),
        (agent_a, "queue", f"gc.ep.{a}.commands.0f3a", "read", "allow"),
        (agent_a, "queue", f"gc.ep.{b}.commands.0f3a", "read", "deny"),
        (agent_a, "queue", f"gc.ep.{a}.commands.0f3a.x", "configure", "deny"),
        ("alice", "queue", f"gc.ep.{a}.commands.0f3a", "configure", "deny"),
        (agent_a, "queue", f"gc.ep.{b}.tasks", "read", "deny"),
        (agent_a, "queue", "gc.results.alice.g1", "read", "deny"),
        (agent_a, "exchange", "gc.results", "write", "allow"),
        # (it puts a redelivered batch's tasks back alone; the topic rule keeps it to its own)
        (agent_a, "exchange", "gc.tasks", "write", "allow"),
        (agent_a, "exchange", "gc.events", "configure", "deny"),
        ("mallory", "exchange", "gc.tasks", "write", "deny"),
    ]
    for user, kind, name, permission, expected in resource:
        answer = _ask(secured, "resource", username=user, resource=kind, name=name,
                      permission=permission)
        assert answer == expected, (user, kind, name, permission)
    topic = [  # (user, exchange, permission, routing key, expected)
        ("alice", "gc.tasks", "write", a, "allow"),
        ("bob", "gc.tasks", "write", a, "deny"),
        ("bob", "gc.commands", "write", a, "deny"),
        ("bob", "gc.tasks", "write", b, "allow"),
        ("alice", "gc.tasks", "write", "#", "deny"),
        ("alice", "gc.events", "write", "group.g1.submitted", "allow"),
        ("alice", "gc.events", "write", f"endpoint.{a}.heartbeat", "deny"),
        ("alice", "gc.results", "read", "alice.g1", "allow"),
        ("alice", "gc.results", "read", "bob.g1", "deny"),
        ("alice", "gc.results", "read", "alice.#", "deny"),
        (agent_a, "gc.tasks", "read", a, "allow"),
        (agent_a, "gc.commands", "read", a, "allow"),
        (agent_a, "gc.commands", "read", b, "deny"),
        (agent_a, "gc.tasks", "read", b, "deny"),
        (agent_a, "gc.tasks", "write", a, "allow"),
        (agent_a, "gc.tasks", "write", b, "deny"),
        (agent_a, "gc.tasks", "write", "#", "deny"),
        (agent_a, "gc.results", "write", "bob.g1", "allow"),
        (agent_a, "gc.events", "write", f"endpoint.{a}.heartbeat", "allow"),
        (agent_a, "gc.events", "write", f"endpoint.{b}.heartbeat", "deny"),
    ]
    for user, exchange, permission, key, expected in topic:
        answer = _ask(secured, "topic", username=user, resource="topic", name=exchange,
                      permission=permission, routing_key=key)
        assert answer == expected, (user, exchange, permission, key)


# -- what the broker refuses --------------------------------------------------------------

def test_the_broker_refuses_bob_publishing_a_task_to_alices_endpoint(secured: Secured) -> None:
    channel = secured.channel("bob")
    props = pika.BasicProperties(user_id="bob", headers=_task_headers("bob", "g1"))
    text = _refused(lambda: channel.basic_publish("gc.tasks", secured.endpoint_a, b"{}", props))
    assert "gc.tasks" in text
    # nor through the default exchange straight into the endpoint's queue
    channel = secured.channel("bob")
    _refused(lambda: channel.basic_publish("", f"gc.ep.{secured.endpoint_a}.tasks", b"{}", props))
    # nor a cancel command
    channel = secured.channel("bob")
    _refused(lambda: channel.basic_publish("gc.commands", secured.endpoint_a, b"{}", props))


def test_our_client_reports_the_refused_task_and_keeps_working(secured: Secured) -> None:
    with secured.client("bob") as bob:
        function_id = bob.register_function(_double)
        with pytest.raises(GCError, match="ACCESS_REFUSED"):
            bob.run(1, endpoint_id=secured.endpoint_a, function_id=function_id)
        # as does his AsyncExecutor's
        with pytest.raises(GCError, match="ACCESS_REFUSED"):
            asyncio.run(_run_async(bob, secured.endpoint_a))
        # the same session then delivers to bob's own endpoint (queue declared by its agent)
        agent = secured.channel(f"endpoint-{secured.endpoint_b}")
        _declare_endpoint_queues(agent, secured.endpoint_b)
        assert bob.run(2, endpoint_id=secured.endpoint_b, function_id=function_id)


def test_the_broker_refuses_bob_alices_result_queue(secured: Secured) -> None:
    alice = secured.channel("alice")
    queue = _declare_result_queue(alice, "alice", "g-secret")
    assert _declare_result_queue(secured.channel("bob"), "bob", "g-own")  # his own: fine
    arguments = TOPOLOGY.queue("results", user="alice", task_group_id="g-secret").arguments
    bob = secured.channel("bob")
    _refused(lambda: bob.queue_declare(queue, durable=True, arguments=arguments))
    bob = secured.channel("bob")
    _refused(lambda: bob.basic_consume(queue, lambda *args: None))
    bob = secured.channel("bob")
    _refused(lambda: bob.queue_delete(queue))
    bob = secured.channel("bob")
    _refused(lambda: bob.queue_bind(queue, "gc.results", "bob.g-own"))
    # nor route alice's results (or anyone's, or the dead letters) into a queue of his
    for exchange, key, arguments in (("gc.results", "alice.g-secret", None),
                                     ("gc.results", "#", None),
                                     ("gc.dead", "", {"x-match": "all"})):
        bob = secured.channel("bob")
        _refused(partial(bob.queue_bind, "gc.results.bob.g-own", exchange, key,
                         arguments=arguments))
    # nor the ledger's queue
    bob = secured.channel("bob")
    _refused(lambda: bob.basic_consume("gc.ledger", lambda *args: None))


def test_the_broker_refuses_an_agent_the_queues_of_another_endpoint(secured: Secured) -> None:
    a, b = secured.endpoint_a, secured.endpoint_b
    _declare_endpoint_queues(secured.channel(f"endpoint-{b}"), b)
    agent_a = secured.channel(f"endpoint-{a}")
    _declare_endpoint_queues(agent_a, a)  # its own: fine
    agent_a.basic_consume(f"gc.ep.{a}.tasks", lambda *args: None)
    # A consumer left open would take the tasks later tests publish to endpoint A.
    agent_a.connection.close()
    for operation in (
        lambda ch: ch.basic_consume(f"gc.ep.{b}.tasks", lambda *args: None),
        lambda ch: ch.basic_consume(f"gc.ep.{b}.commands", lambda *args: None),
        lambda ch: ch.queue_bind(f"gc.ep.{a}.tasks", "gc.tasks", b),
        lambda ch: ch.basic_publish("gc.events", f"endpoint.{b}.heartbeat", b"{}"),
    ):
        channel = secured.channel(f"endpoint-{a}")
        _refused(partial(operation, channel))


def test_nobody_but_the_registry_configures_exchanges(secured: Secured) -> None:
    for who in ("alice", f"endpoint-{secured.endpoint_a}"):
        channel = secured.channel(who)
        _refused(partial(channel.exchange_declare, "gc.mine", "topic"))
        channel = secured.channel(who)
        _refused(partial(channel.exchange_delete, "gc.tasks"))


def test_the_broker_refuses_a_forged_user_id(secured: Secured) -> None:
    channel = secured.channel("alice")
    props = pika.BasicProperties(user_id="bob", headers=_task_headers("bob", "g1"))
    text = _refused(lambda: channel.basic_publish("gc.tasks", secured.endpoint_a, b"{}", props))
    assert "user_id" in text


def test_the_broker_refuses_a_revoked_token_on_the_next_connection(secured: Secured) -> None:
    with secured.sessions() as db:
        issued = identity.issue_token(db, "alice", label="soon revoked")
    secured.connect("alice", issued.token).close()
    with secured.sessions() as db:
        identity.revoke_token(db, issued.token_id)

    def refused() -> bool:  # the node may answer from its cache for CACHE_TTL_MS more
        try:
            secured.connect("alice", issued.token).close()
        except pika.exceptions.ProbableAuthenticationError:
            return True
        return False

    eventually(refused, 30, "the revoked token to be refused")
    # and our client says so in one line, naming the user and what to do
    client = Client(broker_url=secured.node.url, registry_url=secured.registry_url,
                    token=issued.token, user="alice", home=str(secured.home / "revoked"))
    with pytest.raises(BrokerError) as caught:
        client.broker_session("check").start(timeout=10)
    message = str(caught.value)
    assert "refused the token for alice" in message and "gc-client login" in message
    assert issued.token not in message and "\n" not in message


def test_a_wrong_token_is_refused_with_a_clear_error(secured: Secured) -> None:
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        secured.connect("bob", secured.tokens["alice"])


# -- the happy path -----------------------------------------------------------------------

def _double(x: int) -> int:
    return 2 * x


def _declare_endpoint_queues(channel: BlockingChannel, endpoint_id: str) -> None:
    for kind in ("endpoint_tasks", "endpoint_commands"):
        queue = TOPOLOGY.queue(kind, endpoint_id=endpoint_id)
        channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
        for binding in queue.bindings:
            channel.queue_bind(queue.name, binding.exchange, binding.routing_key)


def test_alice_runs_a_function_on_her_endpoint_through_the_secured_node(secured: Secured) -> None:
    # Given alice logged in, with an endpoint configured (and its agent token issued) by the CLI
    fabric = SecuredFabric(broker_url=secured.node.url, registry_url=secured.registry_url,
                           home=secured.home / "alice-home", vhost="/", user="alice",
                           token=secured.tokens["alice"])
    endpoint: Endpoint = fabric.configure_endpoint("laptop", engine="threads", workers=2,
                                                   heartbeat_period=1.0)
    token_file = endpoint.directory / "agent.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    endpoint.start()
    try:
        # When her Executor submits through the node
        with secured.client("alice") as client, \
                Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
            futures = [ex.submit(_double, x) for x in range(5)]
            # Then the agent runs them and the results come back to her
            assert [f.result(timeout=60) for f in futures] == [0, 2, 4, 6, 8]
            # and so does her AsyncExecutor (aio-pika logs in the same way)
            assert asyncio.run(_run_async(client, endpoint.endpoint_id)) == [0, 2, 4]
        eventually(lambda: client_status(secured, endpoint.endpoint_id) == "online", 30,
                   "the agent's heartbeat to reach the ledger")
        # And a task bob may send there but that claims to be alice's is dropped by the agent,
        # which trusts the user_id the broker checked over the gc-user header
        with secured.sessions() as db:
            store.set_endpoint_policy(db, endpoint.endpoint_id,
                                      EndpointPolicy(allowed_users=["bob"]))
        forged = str(uuid.uuid4())
        secured.channel("bob").basic_publish(
            "gc.tasks", endpoint.endpoint_id, b"{}", pika.BasicProperties(
                message_id=forged, correlation_id="g1", user_id="bob",
                content_type="application/json", headers=_task_headers("alice", "g1")),
            mandatory=True)
        eventually(lambda: f"dropped task {forged}" in endpoint.read_logs(), 30,
                   "the agent to drop the forged task")
    except BaseException:
        print(endpoint.read_logs(), node_log(secured.node))
        raise
    finally:
        endpoint.stop_all()


async def _run_async(client: Client, endpoint_id: str) -> list[int]:
    async with AsyncExecutor(endpoint_id=endpoint_id, client=client) as ex:
        futures = [await ex.submit(_double, x) for x in range(3)]
        return [await asyncio.wait_for(f, 60) for f in futures]


def client_status(secured: Secured, endpoint_id: str) -> str:
    with secured.client("alice") as client:
        return client.get_endpoint_status(endpoint_id).status


def test_a_dead_lettered_task_reaches_alice_through_the_ledger(secured: Secured) -> None:
    # Given alice's result queue and endpoint A's queue with no agent consuming it
    _declare_endpoint_queues(secured.channel(f"endpoint-{secured.endpoint_a}"), secured.endpoint_a)
    group, task_id = f"g-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    alice = secured.channel("alice")
    queue = _declare_result_queue(alice, "alice", group)
    # and the manifest her client sends ahead of the task: the ledger hands a dead letter
    # only to the submitter it recorded, never to the one the message's headers name
    manifest = encode_event(GroupManifest(task_group_id=group, endpoint_id=secured.endpoint_a,
                                          user="alice", task_ids=[task_id],
                                          submitted=time.time()))
    alice.basic_publish("gc.events", TOPOLOGY.routing_key("group_submitted", task_group_id=group),
                        manifest.body, pika.BasicProperties(
                            user_id="alice", content_type=manifest.content_type,
                            headers=manifest.headers, delivery_mode=2))
    # When a task of hers is rejected by endpoint A's agent, which dead-letters it to gc.dead
    # (a reject is immediate; a quorum queue expires a message's TTL only when it gets to it)
    props = pika.BasicProperties(message_id=task_id, correlation_id=group, user_id="alice",
                                 content_type="application/json",
                                 headers=_task_headers("alice", group), delivery_mode=2)
    alice.basic_publish("gc.tasks", secured.endpoint_a, json.dumps({"args": [1]}).encode(),
                        props, mandatory=True)
    agent = secured.channel(f"endpoint-{secured.endpoint_a}")
    tasks_queue = TOPOLOGY.queue("endpoint_tasks", endpoint_id=secured.endpoint_a).name
    delivered = eventually(lambda: agent.basic_get(tasks_queue)[0], 30, "the task to arrive")
    agent.basic_reject(delivered.delivery_tag, requeue=False)
    # Then the ledger, the only consumer of gc.dead, hands it to her as a failed result
    deadline = time.monotonic() + 60
    while True:
        method, properties, body = alice.basic_get(queue, auto_ack=True)
        if method is not None:
            break
        assert time.monotonic() < deadline, "no dead letter reached alice's result queue"
        time.sleep(0.05)
    result = decode_result(Envelope(properties.message_id or "", properties.correlation_id or "",
                                    properties.content_type or "", properties.headers or {}, body))
    assert result.task_id == task_id and result.state == "failed"
    assert result.error is not None and result.error.type == "TaskDeadLettered"
    assert "reason: rejected" in result.error.message


def test_an_action_runs_through_the_secured_node_for_its_caller(secured: Secured) -> None:
    # Given an endpoint alice owns, served through the secured node
    fabric = SecuredFabric(broker_url=secured.node.url, registry_url=secured.registry_url,
                           home=secured.home / "actions-home", vhost="/", user="alice",
                           token=secured.tokens["alice"])
    endpoint = fabric.configure_endpoint("actions", engine="threads", workers=1)
    endpoint.start()
    try:
        with secured.client("alice") as client:
            function_id = client.register_function(_double)
        # When alice runs it as a Flows action: the registry publishes the task as its own
        # broker account (user_id checked by the broker) on alice's behalf
        auth = {"Authorization": f"Bearer {secured.tokens['alice']}"}
        response = httpx.post(f"{secured.registry_url}/actions/run", headers=auth, timeout=60,
                              json={"request_id": str(uuid.uuid4()), "body": {
                                  "endpoint_id": endpoint.endpoint_id,
                                  "function_id": function_id, "args": [21]}})
        assert response.status_code == 202, response.text
        action_id = response.json()["action_id"]

        # Then the agent trusts the registry's account, runs it, and the action succeeds
        def finished() -> dict[str, Any] | None:
            status: dict[str, Any] = httpx.get(f"{secured.registry_url}/actions/{action_id}/status",
                                               headers=auth, timeout=60).json()
            return status if status["status"] != "ACTIVE" else None

        final = eventually(finished, 60, "the action to finish")
        assert (final["status"], final["details"]["result"]) == ("SUCCEEDED", 42)
    except BaseException:
        print(endpoint.read_logs(), node_log(secured.node))
        raise
    finally:
        endpoint.stop_all()
