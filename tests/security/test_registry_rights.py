"""Over-broad rights in the registry: what an ordinary account could read, mint or ask for.

On the secured node (``tests/secured_broker.py``) alice owns endpoint A and bob owns
endpoint B; each has a token, and each endpoint an agent token. Every test is the attack:
it fails while the hole is open, and shows what the victim and the service still get.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pika
import pika.exceptions
import pytest
from fastapi.testclient import TestClient

from gc_core.errors import NotAuthenticated, ProtocolError, RegistryError
from gc_core.protocol import (
    CancelCommand,
    Envelope,
    TaskMessage,
    decode_event,
    decode_task,
    encode_event,
    encode_task,
)
from gc_core.registry import identity, store
from gc_core.registry.app import RegistrySettings, create_app
from gc_core.registry.db import EndpointRow, open_database
from gc_core.registry_api.client import RegistryClient
from gc_core.registry_api.schemas import EndpointIn, FunctionSharing, TokenIn
from gc_core.topology import load_topology
from tests.fabric import eventually, free_port
from tests.secured_broker import Secured, amqp_error

TOPOLOGY = load_topology()
#: The console script under test.
GC_REGISTRY = Path(sys.executable).parent / "gc-registry"
#: What the broker answers an operation it refuses.
ACCESS_REFUSED = 403
#: The secret a registry of these tests expects the broker to present on ``/auth/*``.
BROKER_SECRET = "broker-" + uuid.uuid4().hex


@pytest.fixture
def registry_of(secured: Secured) -> Iterator[Callable[[str], RegistryClient]]:
    """HTTP clients of the secured registry, by token (``secured.tokens`` names or a raw token)."""
    opened: list[RegistryClient] = []

    def client(who: str) -> RegistryClient:
        opened.append(RegistryClient(secured.registry_url, token=secured.tokens.get(who, who)))
        return opened[-1]

    yield client
    for registry in opened:
        registry.close()


def _db_url(secured: Secured) -> str:
    return str(secured.sessions.kw["bind"].url)


def _register(registry: RegistryClient, owner: str) -> str:
    """A new function of ``owner``'s (its bytes are new, so its id is too)."""
    return registry.register_function(f"payload {uuid.uuid4()}".encode(), name="secret_sauce",
                                      source="def secret_sauce(): return 42", owner=owner)


def _agent_of_new_endpoint(secured: Secured, owner: str) -> tuple[str, str]:
    """A fresh endpoint of ``owner``'s and its agent token, so no test changes A's or B's policy."""
    with secured.sessions() as db:
        endpoint = store.create_endpoint(db, EndpointIn(name="extra"), owner=owner).endpoint_id
        token = identity.issue_token(db, owner, endpoint_id=endpoint).token
    return endpoint, token


# -- item 8: an agent reads only what its endpoint may run ---------------------------------

def test_an_agent_cannot_read_a_function_its_endpoint_may_not_run(
        secured: Secured, registry_of: Callable[[str], RegistryClient]) -> None:
    function_id = _register(registry_of("alice"), "alice")
    agent_b = registry_of(f"endpoint-{secured.endpoint_b}")
    with pytest.raises(RegistryError) as refused:
        agent_b.get_function(function_id)
    assert refused.value.status in (403, 404)
    assert function_id in str(refused.value) and secured.endpoint_b in str(refused.value)
    # alice's own endpoint still gets it: its agent must, to run her task.
    agent_a = registry_of(f"endpoint-{secured.endpoint_a}")
    assert agent_a.get_function(function_id).source == "def secret_sauce(): return 42"


def test_an_agent_reads_a_function_shared_with_its_endpoints_users_within_its_permitted_list(
        secured: Secured, registry_of: Callable[[str], RegistryClient]) -> None:
    alice = registry_of("alice")
    group = f"g{uuid.uuid4().hex[:8]}"
    with secured.sessions() as db:
        identity.create_group(db, group)
        identity.add_member(db, group, "bob")
    shared, public = _register(alice, "alice"), _register(alice, "alice")
    alice.share_function(shared, FunctionSharing(sharing="groups", shared_groups=[group]))
    alice.share_function(public, FunctionSharing(sharing="public"))
    # bob may run both on his endpoint, so its agent may read both.
    agent_b = registry_of(f"endpoint-{secured.endpoint_b}")
    assert agent_b.get_function(shared).function_id == shared
    assert agent_b.get_function(public).function_id == public
    # An endpoint that runs only its permitted functions reads no other, public or not.
    endpoint, token = _agent_of_new_endpoint(secured, "bob")
    with secured.sessions() as db:
        row = db.get(EndpointRow, endpoint)
        assert row is not None
        row.allowed_functions = [shared]
        db.commit()
    narrow = registry_of(token)
    assert narrow.get_function(shared).function_id == shared
    with pytest.raises(RegistryError, match="permitted"):
        narrow.get_function(public)


# -- item 10: tokens minted from tokens ----------------------------------------------------

def test_a_token_cannot_mint_a_token_that_outlives_the_registrys_cap(
        registry_of: Callable[[str], RegistryClient]) -> None:
    alice = registry_of("alice")
    with pytest.raises(RegistryError) as refused:
        alice.issue_token(TokenIn(label="for ever", lifetime=400 * 86400))
    assert refused.value.status == 422 and "90 days" in str(refused.value)
    # Asking for no lifetime gets the longest allowed, never "until revoked".
    child = alice.issue_token(TokenIn(label="default"))
    assert child.expires is not None and child.expires <= time.time() + 90 * 86400 + 60
    assert child.parent == alice.whoami().token_id


def test_a_child_token_never_outlives_its_parent(
        secured: Secured, registry_of: Callable[[str], RegistryClient]) -> None:
    with secured.sessions() as db:
        parent = identity.issue_token(db, "alice", label="one hour", lifetime=3600)
    assert parent.expires is not None
    holder = registry_of(parent.token)
    with pytest.raises(RegistryError) as refused:
        holder.issue_token(TokenIn(label="two hours", lifetime=7200))
    assert refused.value.status == 422 and "cannot outlive" in str(refused.value)
    child = holder.issue_token(TokenIn(label="as long as it may"))
    assert child.expires is not None and child.expires <= parent.expires


def test_revoking_a_token_revokes_every_token_it_issued(
        secured: Secured, registry_of: Callable[[str], RegistryClient]) -> None:
    with secured.sessions() as db:
        parent = identity.issue_token(db, "alice", label="stolen")
    holder = registry_of(parent.token)
    child = holder.issue_token(TokenIn(label="child"))
    grandchild = registry_of(child.token).issue_token(TokenIn(label="grandchild"))
    agent = holder.issue_token(TokenIn(label="agent", endpoint_id=secured.endpoint_a))
    secured.connect("alice", child.token).close()  # the broker takes the child today
    holder.revoke_token(parent.token_id)
    for issued in (child, grandchild, agent):
        with pytest.raises(NotAuthenticated, match="revoked"):
            registry_of(issued.token).whoami()

    def broker_refuses_the_child() -> bool:
        try:
            secured.connect("alice", child.token).close()
        except pika.exceptions.AMQPConnectionError:
            return True
        return False

    eventually(broker_refuses_the_child, timeout=30, what="the broker to refuse the child token")
    # alice's own token, which issued none of them, still works.
    assert registry_of("alice").whoami().name == "alice"


# -- item 11: the registry's broker password, and who may ask /auth/* ----------------------

def _serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    db = f"sqlite:///{tmp_path / 'registry.db'}"
    return subprocess.Popen([str(GC_REGISTRY), "serve", "--db", db, *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**(env or {}), "PATH": "/usr/bin:/bin",
                                 "GC_HOME": str(tmp_path)})


def _stopped(process: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    """The exit code and stderr of a process that should stop by itself (killed if not)."""
    try:
        _out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _out, err = process.communicate()
        return -9, err
    return process.returncode, err


def test_serve_refuses_a_broker_password_on_its_command_line(tmp_path: Path) -> None:
    # Anyone on the host reads a process's arguments (`ps`): the registry's account has
    # full rights on the fabric's vhost.
    serve = _serve(tmp_path, "--port", str(free_port()), "--no-ledger",
                   "--broker-url", "amqp://gc-registry:s3cret-pw@127.0.0.1:5673/%2F")
    code, err = _stopped(serve)
    assert code not in (0, -9), err
    assert "--broker-url-file" in err and "GC_BROKER_URL" in err
    assert "s3cret-pw" not in err


def test_serve_takes_its_broker_url_from_a_file_only_it_can_read(tmp_path: Path) -> None:
    with open_database(f"sqlite:///{tmp_path / 'registry.db'}")() as db:
        identity.create_user(db, "alice")
    url_file = tmp_path / "broker-url"
    url_file.write_text("amqp://gc-registry:s3cret-pw@127.0.0.1:5673/fabric\n")
    url_file.chmod(0o644)
    port = free_port()
    code, err = _stopped(_serve(tmp_path, "--port", str(port), "--no-ledger",
                                "--broker-url-file", str(url_file)))
    assert code not in (0, -9) and "chmod 600" in err, err
    url_file.chmod(0o600)
    serve = _serve(tmp_path, "--port", str(port), "--no-ledger", "--broker-url-file",
                   str(url_file), env={"GC_REGISTRY_BROKER_AUTH_SECRET": BROKER_SECRET})
    try:
        base = f"http://127.0.0.1:{port}"
        eventually(lambda: _answers(f"{base}/health"), timeout=30, what="the registry to serve")
        # The file's vhost is the fabric's: the broker's vhost question is answered by it.
        ask = {"username": "alice", "vhost": "fabric"}
        assert httpx.post(f"{base}/auth/vhost", data=ask,
                          auth=("rabbitmq", BROKER_SECRET)).text == "allow"
        assert httpx.post(f"{base}/auth/vhost", data={**ask, "vhost": "/"},
                          auth=("rabbitmq", BROKER_SECRET)).text == "deny"
    finally:
        serve.terminate()
        _stopped(serve)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _auth_app(secured: Secured, **settings: Any) -> TestClient:
    """A second registry on the secured node's database, configured by ``settings``."""
    return TestClient(create_app(RegistrySettings(
        db_url=_db_url(secured), broker_url=secured.node.url, ledger=False, **settings)))


def test_only_the_broker_may_ask_the_auth_routes(secured: Secured) -> None:
    login = {"username": "alice", "password": secured.tokens["alice"], "vhost": "/"}
    with _auth_app(secured, broker_auth_secret=BROKER_SECRET) as http:
        for credentials in (None, ("rabbitmq", "guessed")):
            refused = http.post("/auth/user", data=login, auth=credentials)
            assert refused.status_code in (401, 403) and refused.text != "allow"
            assert "broker" in refused.json()["detail"]
        assert http.post("/auth/user", data=login,
                         auth=("rabbitmq", BROKER_SECRET)).text == "allow"
    # Without a secret the registry answers only its own host (a test client is not on it).
    with _auth_app(secured) as http:
        assert http.post("/auth/user", data=login).status_code == 403


def test_the_secured_node_presents_the_secret_and_no_one_else_is_answered(secured: Secured) -> None:
    response = httpx.post(f"{secured.registry_url}/auth/user",
                          data={"username": "alice", "password": secured.tokens["alice"],
                                "vhost": "/"})
    assert response.status_code in (401, 403) and response.text != "allow"
    secured.connect("alice").close()  # the broker itself still gets its answers


# -- item 12: names, sizes, logs, dead-letter arguments ------------------------------------

def test_a_name_with_a_trailing_newline_is_refused(secured: Secured) -> None:
    with secured.sessions() as db:
        with pytest.raises(ValueError, match="not allowed"):
            identity.create_user(db, "mallory\n")
        with pytest.raises(ValueError, match="not allowed"):
            identity.create_group(db, "staff\n")
    response = httpx.put(
        f"{secured.registry_url}/endpoints/{secured.endpoint_a}/policy",
        headers={"Authorization": f"Bearer {secured.tokens['alice']}"},
        json={"allowed_users": ["bob\n"]})
    assert response.status_code == 422 and "allowed_users" in response.json()["detail"]


@pytest.mark.parametrize("path, body", [
    ("/endpoints", {"name": "e", "description": "x" * 1_000_000}),
    ("/endpoints", {"name": "e", "policy": {"allowed_serializers": ["x" * 100_000]}}),
    ("/functions", {"name": "f", "content_type": "x" * 100_000, "payload_b64": "AA==",
                    "python_version": "3.11", "serializer": "cloudpickle"}),
    ("/functions", {"name": "f", "content_type": "application/x-python-pickle",
                    "payload_b64": "AA==", "source": "#" * 20_000_000,
                    "python_version": "3.11", "serializer": "cloudpickle"}),
    ("/tokens", {"label": "l", "endpoint_id": "e" * 100_000}),
], ids=["description", "serializer", "content-type", "source", "endpoint-id"])
def test_free_text_fields_are_bounded(secured: Secured, path: str, body: dict[str, Any]) -> None:
    response = httpx.post(f"{secured.registry_url}{path}", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {secured.tokens['alice']}"})
    assert response.status_code == 422, response.text[:300]
    assert "at most" in response.json()["detail"]


def test_untrusted_names_are_logged_escaped(secured: Secured,
                                            caplog: pytest.LogCaptureFixture) -> None:
    forged = "gc.results.alice.x\nINFO gc_core.registry: broker auth: allowed everything"
    with caplog.at_level(logging.INFO, logger="gc_core.registry.broker_auth"), \
            _auth_app(secured, broker_auth_secret=BROKER_SECRET) as http:
        answer = http.post("/auth/resource", auth=("rabbitmq", BROKER_SECRET), data={
            "username": "bob\nINFO forged", "vhost": "/", "resource": "queue", "name": forged,
            "permission": "read"})
    assert answer.text == "deny"
    lines = [record.getMessage() for record in caplog.records
             if record.name == "gc_core.registry.broker_auth"]
    assert lines and not any("\n" in line for line in lines), lines


def _declare(secured: Secured, who: str, arguments: dict[str, Any]) -> str:
    """Declare a result queue of ``who``'s with ``arguments`` added; its name."""
    queue = TOPOLOGY.queue("results", user=who, task_group_id=f"g-{uuid.uuid4().hex[:8]}")
    channel = secured.channel(who)
    try:
        channel.queue_declare(queue.name, durable=True, arguments={**queue.arguments,
                                                                    **arguments})
        for binding in queue.bindings:
            channel.queue_bind(queue.name, binding.exchange, binding.routing_key)
        channel.queue_delete(queue.name)
    finally:
        channel.connection.close()
    return queue.name


def _declare_refused(secured: Secured, who: str, arguments: dict[str, Any]) -> str:
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
        _declare(secured, who, arguments)
    code, text = amqp_error(caught.value)
    assert code == ACCESS_REFUSED, text
    return text


@pytest.mark.parametrize("exchange", ["gc.dead", "gc.results", "", "amq.topic"])
def test_a_result_queue_cannot_dead_letter_into_an_exchange_its_user_may_not_publish_to(
        secured: Secured, exchange: str) -> None:
    # A dead-lettered message keeps its publisher's user_id and takes any routing key the
    # queue names, unchecked: into gc.dead it is a forged dead letter for the ledger, into
    # the default exchange it reaches any queue by name.
    text = _declare_refused(secured, "alice", {"x-dead-letter-exchange": exchange,
                                               "x-dead-letter-routing-key": secured.endpoint_b})
    assert "exchange" in text
    _declare(secured, "alice", {})  # her ordinary result queue still works


@pytest.mark.parametrize("exchange", ["gc.tasks", "gc.commands"])
def test_a_message_dead_lettered_into_an_exchange_its_user_publishes_to_is_refused_there(
        secured: Secured, exchange: str) -> None:
    # The broker asks the registry only for `write` on a dead-letter exchange, the same
    # question as a publish, and users publish to gc.tasks and gc.commands: so alice may point
    # her result queue at bob's endpoint, past the topic authorization that refuses her
    # tasks there. What arrives that way carries x-death, and the receiver refuses it.
    group = f"g-{uuid.uuid4().hex[:8]}"
    queue = TOPOLOGY.queue("results", user="alice", task_group_id=group)
    alice = secured.channel("alice")
    alice.queue_declare(queue.name, durable=True, arguments={
        **queue.arguments, "x-dead-letter-exchange": exchange,
        "x-dead-letter-routing-key": secured.endpoint_b})
    for binding in queue.bindings:
        alice.queue_bind(queue.name, binding.exchange, binding.routing_key)
    bob_agent = secured.channel(f"endpoint-{secured.endpoint_b}")
    kind = "endpoint_tasks" if exchange == "gc.tasks" else "endpoint_commands"
    target = TOPOLOGY.queue(kind, endpoint_id=secured.endpoint_b)
    bob_agent.queue_declare(target.name, durable=True, arguments=target.arguments)
    for binding in target.bindings:
        bob_agent.queue_bind(target.name, binding.exchange, binding.routing_key)
    # Her own endpoint's agent token lets her put a message in her result queue; she
    # rejects it, and the broker dead-letters it into bob's endpoint's queue.
    forged = encode_task(TaskMessage(
        task_id=str(uuid.uuid4()), task_group_id=group, endpoint_id=secured.endpoint_b,
        function_id="f", user=f"endpoint-{secured.endpoint_a}", content_type="application/json",
        payload=b"{}")) if exchange == "gc.tasks" else encode_event(
        CancelCommand(task_ids=["t-1"], user=f"endpoint-{secured.endpoint_a}", sent=0))
    agent_a = f"endpoint-{secured.endpoint_a}"
    secured.publish(agent_a, "gc.results", f"alice.{group}", forged, user_id=agent_a,
                    mandatory=True)
    delivered = eventually(lambda: alice.basic_get(queue.name)[0], 30, "the message in her queue")
    alice.basic_reject(delivered.delivery_tag, requeue=False)
    method, props, body = eventually(lambda: _got(bob_agent.basic_get(target.name)), 30,
                                     "the dead letter to reach bob's endpoint's queue")
    bob_agent.basic_ack(method.delivery_tag)
    envelope = Envelope(props.message_id or "", props.correlation_id or "",
                        props.content_type or "", props.headers or {}, body)
    with pytest.raises(ProtocolError, match="dead-lettered"):
        (decode_task if exchange == "gc.tasks" else decode_event)(envelope)
    alice.queue_delete(queue.name)


def _got(answer: tuple[Any, Any, Any]) -> tuple[Any, Any, Any] | None:
    return answer if answer[0] is not None else None
