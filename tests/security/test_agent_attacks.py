"""Attacks on an agent: one message must never wedge or kill it, and a multi-user endpoint
maps only identities the broker verified.

On the open stack anyone may publish tasks (the attacker here calls themself ``mallory``);
an agent with prefetch 2 gets each poison message and must still serve an ordinary task,
with no delivery left unsettled. On the secured node alice owns a multi-user endpoint that
bob may use, its agent logging in with the credentials in its broker URL, the form
``deploy/debian/README.md`` shows.
"""

from __future__ import annotations

import json
import pwd
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from gc_agent.config import IdentityRule, MultiUserConfig, load_config, save_config
from gc_client import Client, Executor, TaskExecutionFailed
from gc_core.errors import PolicyError, WorkerError
from gc_core.protocol import MAX_ERROR_MESSAGE, MAX_ID_LENGTH, Envelope, decode_result
from gc_core.registry import identity, store
from gc_core.registry_api.schemas import EndpointPolicy, FunctionSharing
from gc_core.serialize import CLOUDPICKLE
from gc_core.topology import load_topology
from tests.fabric import Endpoint, Fabric, eventually, rabbitmqctl
from tests.integration import test_multiuser
from tests.integration.test_multiuser import USER_PYTHON, who_am_i
from tests.secured_broker import Secured, node_log

#: Local accounts for alice and bob (root only), made as the multi-user integration tests make them.
accounts = test_multiuser.accounts

TOPOLOGY = load_topology()

#: Seconds a test waits for a future before it fails instead of hanging.
RESULT_TIMEOUT = 60.0
#: The sender named in forged tasks on the open stack, where nobody checks names.
ATTACKER = "mallory"
#: The AMQP frame size both brokers keep (RabbitMQ's default): a header table must fit one.
FRAME_MAX = 131_072


def _double(x: int) -> int:
    return 2 * x


def _raise_long(size: int) -> None:
    raise ValueError("x" * size)


def _forge_outcome(content_type: str, worker: str) -> None:
    """Task code answering for itself through its worker's socket, as hostile code can: the
    agent gets an outcome the worker never made (the value "forged"), then the worker is gone."""
    import base64
    import inspect
    import json
    import os
    import sys
    from multiprocessing.connection import Connection

    import cloudpickle

    job = next(frame.frame.f_locals["job"] for frame in inspect.stack()
               if "job" in frame.frame.f_locals)
    forged = {"task_id": job.task_id, "state": "success", "content_type": content_type,
              "payload": base64.b64encode(cloudpickle.dumps("forged")).decode(), "worker": worker}
    Connection(int(sys.argv[1])).send_bytes(json.dumps(forged).encode())
    os._exit(0)


# -- raw AMQP, as an attacker speaks it -------------------------------------------------------

def _task_headers(*, user: str, group: str, endpoint_id: str, function_id: str = "f-1",
                  **extra: Any) -> dict[str, Any]:
    return {"gc-protocol": 1, "gc-function-id": function_id, "gc-endpoint-id": endpoint_id,
            "gc-user": user, "gc-task-group": group, **extra}


def _publish_task(channel: BlockingChannel, endpoint_id: str, headers: dict[str, Any], *,
                  task_id: str, correlation_id: str, user_id: str | None = None,
                  body: bytes = b'{"args": [], "kwargs": {}}') -> None:
    channel.basic_publish("gc.tasks", endpoint_id, body, pika.BasicProperties(
        message_id=task_id, correlation_id=correlation_id, content_type="application/json",
        headers=headers, user_id=user_id, delivery_mode=2), mandatory=True)


def _declare_result_queue(channel: BlockingChannel, user: str, group: str,
                          **arguments: Any) -> str:
    queue = TOPOLOGY.queue("results", user=user, task_group_id=group)
    channel.queue_declare(queue.name, durable=True, arguments={**queue.arguments, **arguments})
    for binding in queue.bindings:
        channel.queue_bind(queue.name, binding.exchange, binding.routing_key)
    return queue.name


def _results(channel: BlockingChannel, queue: str) -> list[Any]:
    """Every result waiting in ``queue`` (decoded)."""
    found = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return found
        found.append(decode_result(Envelope(
            properties.message_id or "", properties.correlation_id or "",
            properties.content_type or "", properties.headers or {}, body)))


def _settled(vhost: str, endpoint_id: str) -> bool:
    """Whether the endpoint's task queue holds no message, ready or unacked."""
    name = TOPOLOGY.queue("endpoint_tasks", endpoint_id=endpoint_id).name
    for line in rabbitmqctl("-p", vhost, "list_queues", "name", "messages_ready",
                            "messages_unacknowledged").splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            return parts[1:] == ["0", "0"]
    return False


def _open_client(fabric: Fabric) -> Client:
    return Client(broker_url=fabric.broker_url, registry_url=fabric.registry_url,
                  home=str(fabric.home))


def _run(fabric: Fabric, endpoint: Endpoint, function: Any, *args: Any) -> Any:
    with _open_client(fabric) as client, \
            Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        return ex.submit(function, *args).result(timeout=RESULT_TIMEOUT)


@pytest.fixture
def attacker(fabric: Fabric) -> Iterator[BlockingChannel]:
    """A raw channel on the open stack, with confirms."""
    # No heartbeats: the test may leave the connection idle while it waits for the agent.
    connection = pika.BlockingConnection(pika.URLParameters(f"{fabric.broker_url}?heartbeat=0"))
    channel = connection.channel()
    channel.confirm_delivery()
    yield channel
    connection.close()


# -- one message never wedges or kills an agent (open stack) -----------------------------------

def test_malformed_tasks_are_answered_or_dead_lettered_and_the_endpoint_keeps_serving(
        fabric: Fabric, make_endpoint: Any, attacker: BlockingChannel) -> None:
    # Given an endpoint that holds at most two unsettled tasks
    endpoint: Endpoint = make_endpoint(engine="processes", workers=1, prefetch=2)
    endpoint.start()
    group = f"g-{uuid.uuid4().hex[:8]}"
    queue = _declare_result_queue(attacker, ATTACKER, group)
    ep = endpoint.endpoint_id

    def poison(task_id: str, correlation_id: str = group, **headers: Any) -> None:
        _publish_task(attacker, ep, {**_task_headers(user=ATTACKER, group=group,
                                                     endpoint_id=ep), **headers},
                      task_id=task_id, correlation_id=correlation_id)

    # When tasks arrive that no decoder should survive, each answerable one with its own id
    answerable = {
        "deep-json": {"gc-resource-spec": "[" * 5000 + "]" * 5000},
        "long-function-id": {"gc-function-id": "f" * (MAX_ID_LENGTH + 1)},
        "nul-identity": {"gc-identity": "alice\x00root"},
        "forged-log-line": {"gc-identity": "x\n2026-01-01 INFO gc_agent.agent: forged"},
        "account-option": {"gc-user-endpoint-config": json.dumps({"account": "root"})},
        # headers that just fit a frame, and an over-long echoed field among them
        "frame-filling": {"x-padding": "p" * (FRAME_MAX - 4096), "gc-on-behalf-of": "o" * 300},
    }
    for name, headers in answerable.items():
        poison(f"t-{name}", **headers)
    # and tasks no result can be routed for: no correlation id and a 300-byte group, no id
    poison("t-no-route", correlation_id="", **{"gc-task-group": "g" * 300})
    poison("", correlation_id=group)
    try:
        # Then an ordinary task still runs
        assert _run(fabric, endpoint, _double, 21) == 42
        # and every poison message was settled: answered where it says whom to tell
        answered: dict[str, Any] = {}
        eventually(lambda: answered.update({r.task_id: r for r in _results(attacker, queue)})
                   or set(answered) >= {f"t-{name}" for name in answerable}, 30,
                   "an error result for every answerable poison task")
        assert all(r.state == "failed" and r.error is not None for r in answered.values())
        eventually(lambda: _settled(fabric.vhost, ep), 30, "no message left on the task queue")
        # and the log shows the forged line escaped, never as a line of its own
        assert "\n2026-01-01 INFO gc_agent.agent: forged" not in endpoint.read_logs()
    except BaseException:
        print(endpoint.read_logs())
        raise


def test_hostile_outcomes_from_a_worker_fail_their_tasks_and_the_endpoint_keeps_serving(
        fabric: Fabric, make_endpoint: Any) -> None:
    # Given an endpoint with one worker process and prefetch 2
    endpoint: Endpoint = make_endpoint(engine="processes", workers=1, prefetch=2)
    endpoint.start()
    try:
        with _open_client(fabric) as client, \
                Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
            # When task code hands its worker's socket outcomes the worker never made: one of
            # an unknown content type, one with a worker label past its bound
            unknown = ex.submit(_forge_outcome, "application/x-unknown", "w")
            long_label = ex.submit(_forge_outcome, CLOUDPICKLE.content_type, "w" * 1000)
            # and a task raises with a message past the wire's bound for error messages
            long_error = ex.submit(_raise_long, MAX_ERROR_MESSAGE + 1000)
            # Then the first fails, saying so, and the second's value arrives within bounds
            with pytest.raises(WorkerError) as refused:
                unknown.result(timeout=RESULT_TIMEOUT)
            assert "unknown content type" in refused.value.remote_message
            assert long_label.result(timeout=RESULT_TIMEOUT) == "forged"
            with pytest.raises(TaskExecutionFailed) as caught:
                long_error.result(timeout=RESULT_TIMEOUT)
            assert caught.value.remote_type == "ValueError"
            assert caught.value.remote_message.startswith("xxxx")
            # and an ordinary task still runs
            assert ex.submit(_double, 4).result(timeout=RESULT_TIMEOUT) == 8
        eventually(lambda: _settled(fabric.vhost, endpoint.endpoint_id), 30,
                   "no message left on the task queue")
    except BaseException:
        print(endpoint.read_logs())
        raise


def test_an_exception_message_past_the_wire_bound_does_not_kill_a_thread_slot(
        fabric: Fabric, make_endpoint: Any) -> None:
    # Given an endpoint with a single thread slot
    endpoint: Endpoint = make_endpoint(engine="threads", workers=1)
    endpoint.start()
    try:
        # When a task raises with a message past the bound of an error message
        with pytest.raises(TaskExecutionFailed) as caught:
            _run(fabric, endpoint, _raise_long, MAX_ERROR_MESSAGE * 4)
        # Then its submitter gets the error, cut to the bound
        assert caught.value.remote_type == "ValueError"
        assert len(caught.value.remote_message) <= MAX_ERROR_MESSAGE
        # and the slot still serves the next task
        assert _run(fabric, endpoint, _double, 5) == 10
    except BaseException:
        print(endpoint.read_logs())
        raise


# -- identities only from the broker ------------------------------------------------------------

def _multi_user_config(folder: Path, rules: list[IdentityRule], **options: Any) -> MultiUserConfig:
    template = folder / "user-config.yaml.j2"
    template.write_text("type: processes\nmax_workers: 1\n")
    return MultiUserConfig(identity_mapping=rules, user_config_template=template,
                           worker_python=USER_PYTHON, user_idle_timeout=30.0, **options)


def test_a_multi_user_endpoint_that_cannot_verify_senders_refuses_to_start(
        fabric: Fabric, make_endpoint: Any, tmp_path: Path) -> None:
    # Given a multi-user endpoint on a broker whose logins say nothing about who sends a task
    # (the open stack: everyone is guest)
    rules = [IdentityRule(match=r"(.*)", output="{0}")]
    endpoint: Endpoint = make_endpoint(multi_user=_multi_user_config(tmp_path, rules))
    # When its agent starts, it refuses, saying why and what to do
    with pytest.raises(RuntimeError, match="did not start") as caught:
        endpoint.start()
    assert "cannot verify who sends" in str(caught.value)
    assert "broker_verifies_user_id" in str(caught.value)
    # And only the admin's explicit, logged opt-out starts it
    path = endpoint.directory / "config.yaml"
    config = load_config(path)
    assert config.multi_user is not None
    save_config(config.model_copy(update={"multi_user": config.multi_user.model_copy(
        update={"insecure_trust_claimed_identities": True})}), path)
    endpoint.start()
    assert "insecure_trust_claimed_identities" in endpoint.read_logs()


def _shared_multi_user_endpoint(secured: Secured, accounts: dict[str, pwd.struct_passwd],
                                folder: Path, **overrides: Any) -> Endpoint:
    """alice's multi-user endpoint, which bob may use, its registry names mapped to the test's
    accounts; its agent has its token (so the registry re-admits each task) but logs in with
    credentials in its broker URL: those of an account the broker keeps itself, which never
    asks the registry (the node's own registry account)."""
    rules = [IdentityRule(match=name, output=accounts[name].pw_name) for name in ("alice", "bob")]
    fabric = secured.fabric("alice", folder.name)
    endpoint = fabric.configure_endpoint(f"mu-{uuid.uuid4().hex[:6]}",
                                         multi_user=_multi_user_config(folder, rules))
    path = endpoint.directory / "config.yaml"
    broker_url = secured.node.url_for("gc-registry", secured.node.env["GC_REGISTRY_BROKER_PASSWORD"])
    save_config(load_config(path).model_copy(update={"broker_url": broker_url, **overrides}), path)
    with secured.sessions() as db:
        store.set_endpoint_policy(db, endpoint.endpoint_id, EndpointPolicy(allowed_users=["bob"]))
    return endpoint


def _forge_as_alice(secured: Secured, endpoint: Endpoint) -> tuple[str, BlockingChannel, str]:
    """bob sends the endpoint a task of his own code that claims to be alice's; returns its
    id, and alice's channel and result queue, where its result would go."""
    with secured.client("bob") as bob:
        function_id = bob.register_function(who_am_i)
    with secured.sessions() as db:
        store.set_function_sharing(db, function_id, FunctionSharing(sharing="public"))
    group = f"g-{uuid.uuid4().hex[:8]}"
    alice = secured.channel("alice")
    queue = _declare_result_queue(alice, "alice", group)
    forged = str(uuid.uuid4())
    _publish_task(secured.channel("bob"), endpoint.endpoint_id, _task_headers(
        user="alice", group=group, endpoint_id=endpoint.endpoint_id, function_id=function_id),
        task_id=forged, correlation_id=group, user_id="bob")
    return forged, alice, queue


def _uids_of_answers(endpoint: Endpoint, forged: str, alice: BlockingChannel, queue: str) -> list[int]:
    """The accounts the forged task ran as, once the serving agent dropped or answered it."""
    seen: list[Any] = []
    eventually(lambda: f"dropped task {forged}" in endpoint.read_logs()
               or seen.extend(_results(alice, queue)) or seen, 60,
               "the agent to drop or answer the forged task")
    return [json.loads(r.payload)["uid"] for r in seen if r.state == "success"]


def test_a_co_user_claiming_another_users_name_never_runs_as_their_account(
        secured: Secured, accounts: dict[str, pwd.struct_passwd], tmp_path: Path) -> None:
    # Given alice's multi-user endpoint, whose agent logs in with credentials in its URL
    endpoint = _shared_multi_user_endpoint(secured, accounts, tmp_path)
    try:
        # When bob sends it a task of his that claims to be alice's
        forged, alice, queue = _forge_as_alice(secured, endpoint)
        # Then it never runs as alice's account: an agent that cannot tell who sent a task
        # refuses to start, saying why; one that serves drops the forgery
        try:
            endpoint.start()
        except RuntimeError as refused:
            assert "cannot verify who sends" in str(refused)
            assert _results(alice, queue) == []
            return
        assert accounts["alice"].pw_uid not in _uids_of_answers(endpoint, forged, alice, queue), \
            "bob's task ran as alice's account"
    except BaseException:
        print(endpoint.read_logs(), node_log(secured.node))
        raise
    finally:
        endpoint.stop_all()


@pytest.fixture(scope="module")
def verified_multi_user_endpoint(secured: Secured, accounts: dict[str, pwd.struct_passwd],
                                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    """The same endpoint, its administrator having said that its broker checks user_id."""
    endpoint = _shared_multi_user_endpoint(secured, accounts, tmp_path_factory.mktemp("verified"),
                                           broker_verifies_user_id=True)
    endpoint.start()
    yield endpoint
    endpoint.stop_all()


def test_where_the_broker_verifies_senders_each_user_runs_as_their_own_account_only(
        secured: Secured, verified_multi_user_endpoint: Endpoint,
        accounts: dict[str, pwd.struct_passwd]) -> None:
    endpoint = verified_multi_user_endpoint
    try:
        # When bob sends a task that claims to be alice's, the agent drops it
        forged, alice, queue = _forge_as_alice(secured, endpoint)
        assert accounts["alice"].pw_uid not in _uids_of_answers(endpoint, forged, alice, queue), \
            "bob's task ran as alice's account"
        # And each of them still runs as their own account
        for user in ("alice", "bob"):
            with secured.client(user) as client, \
                    Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
                assert ex.submit(who_am_i).result(timeout=RESULT_TIMEOUT)["uid"] == \
                    accounts[user].pw_uid
    except BaseException:
        print(endpoint.read_logs(), node_log(secured.node))
        raise


def test_an_option_named_account_fails_its_task_and_the_endpoint_keeps_serving(
        secured: Secured, verified_multi_user_endpoint: Endpoint,
        accounts: dict[str, pwd.struct_passwd]) -> None:
    endpoint = verified_multi_user_endpoint
    try:
        with secured.client("alice") as client:
            # When alice's task sets an option named like the template's own account value
            with Executor(endpoint_id=endpoint.endpoint_id, client=client,
                          user_endpoint_config={"account": "root"}) as ex, \
                    pytest.raises(PolicyError, match="refused at account"):
                ex.submit(who_am_i).result(timeout=RESULT_TIMEOUT)
            # Then her task fails saying why, and her next one runs as her
            with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
                assert ex.submit(who_am_i).result(timeout=RESULT_TIMEOUT)["uid"] == \
                    accounts["alice"].pw_uid
    except BaseException:
        print(endpoint.read_logs(), node_log(secured.node))
        raise


# -- an agent that cannot reach its broker says so ---------------------------------------------

def test_an_agent_the_broker_refuses_for_good_exits_saying_why(secured: Secured) -> None:
    # Given alice's endpoint, serving through the secured node with its own agent token
    fabric = secured.fabric("alice", "refused-home")
    endpoint = fabric.configure_endpoint(f"gone-{uuid.uuid4().hex[:6]}", engine="threads",
                                         workers=1, heartbeat_period=0.5)
    endpoint.start()
    agent = endpoint.processes[-1]
    try:
        # When that token is revoked and the broker drops the agent's connection
        with secured.sessions() as db:
            for token in identity.list_tokens(db, "alice"):
                if token.endpoint_id == endpoint.endpoint_id:
                    identity.revoke_token(db, token.token_id)

        def dropped_until_gone() -> bool:
            secured.node.script("ctl", "close_all_user_connections",
                                f"endpoint-{endpoint.endpoint_id}", "token revoked")
            return agent.poll() is not None

        # Then the agent, refused when it reconnects, exits with an error saying why (its
        # service manager starts it again), rather than running on without a broker
        eventually(dropped_until_gone, 60, "the refused agent to exit")
        assert agent.returncode == 1
        assert "gave up" in endpoint.read_logs()
        assert "refused the token" in endpoint.read_logs()
    except BaseException:
        print(endpoint.read_logs(), node_log(secured.node))
        raise
    finally:
        endpoint.stop_all()
