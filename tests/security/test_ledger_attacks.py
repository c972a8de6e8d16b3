"""Attacks on the registry's ledger: what it records must rest on the broker's checks.

On the secured node alice owns endpoint A and bob owns endpoint B. No agent runs here: the
tests publish as each broker account themselves (alice's manifests and tasks, the agents'
results, heartbeats and dead letters), so they decide what reaches ``gc.ledger`` and in
which order. The ledger consumes one queue in order, so "bob's forgery first, then the real
message" shows, without any timing, which of the two it kept.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from gc_core.broker import BrokerSession
from gc_core.protocol import (
    Envelope,
    GroupManifest,
    Heartbeat,
    ResultMessage,
    TaskMessage,
    decode_result,
    encode_event,
    encode_result,
    encode_task,
)
from gc_core.registry import identity, store
from gc_core.registry.app import RegistrySettings, create_app
from gc_core.registry_api.schemas import EndpointIn
from gc_core.serialize import CLOUDPICKLE, JSON
from gc_core.topology import load_topology
from tests.fabric import Fabric, eventually, free_port
from tests.secured_broker import Secured

TOPOLOGY = load_topology()

#: Seconds a test waits for the ledger before it fails instead of hanging.
LEDGER_TIMEOUT = 30.0
#: A group name longer than an AMQP short string (255 bytes): the routing key it would make
#: cannot be sent at all.
LONG_GROUP = "g" * 300


@dataclass
class Submitted:
    """Tasks alice submitted: the ledger knows them from her manifest."""

    group: str
    task_ids: list[str]


def _publish(secured: Secured, who: str, exchange: str, routing_key: str,
             envelope: Envelope, *, stamp: bool = True) -> None:
    """Publish as broker user ``who``, with ``who`` as the user_id the broker checks (none
    unless ``stamp``); the broker must confirm it."""
    secured.publish(who, exchange, routing_key, envelope, user_id=who if stamp else None)


def _submit(secured: Secured, endpoint_id: str, count: int = 1) -> Submitted:
    """alice's manifest for ``count`` new tasks in a new group, as her client sends it;
    returns once the ledger lists them as waiting."""
    submitted = Submitted(f"g-{uuid.uuid4().hex[:8]}", [str(uuid.uuid4()) for _ in range(count)])
    _publish(secured, "alice", TOPOLOGY.exchange("events"),
             TOPOLOGY.routing_key("group_submitted", task_group_id=submitted.group),
             encode_event(GroupManifest(task_group_id=submitted.group, endpoint_id=endpoint_id,
                                        user="alice", task_ids=submitted.task_ids,
                                        submitted=time.time())))
    eventually(lambda: all(_task(secured, t)["status"] == "waiting" for t in submitted.task_ids),
               LEDGER_TIMEOUT, "the ledger to record alice's manifest")
    return submitted


def _result(task_id: str, group: str, endpoint_id: str, payload: bytes, *,
            content_type: str = JSON.content_type) -> Envelope:
    return encode_result(ResultMessage(
        task_id=task_id, task_group_id=group, endpoint_id=endpoint_id, user="alice",
        state="success", content_type=content_type, payload=payload))


def _send_result(secured: Secured, who: str, task_id: str, group: str, payload: bytes, *,
                 content_type: str = JSON.content_type, stamp: bool = True) -> None:
    """A success result for alice's task, claiming endpoint A, published as ``who``."""
    _publish(secured, who, TOPOLOGY.exchange("results"),
             TOPOLOGY.routing_key("result", user="alice", task_group_id=group),
             _result(task_id, group, secured.endpoint_a, payload, content_type=content_type),
             stamp=stamp)


def _alice(secured: Secured, path: str) -> Any:
    """GET a registry path as alice sees it."""
    response = httpx.get(f"{secured.registry_url}{path}", timeout=30,
                         headers={"Authorization": f"Bearer {secured.tokens['alice']}"})
    assert response.status_code == 200, response.text
    return response.json()


def _task(secured: Secured, task_id: str) -> dict[str, Any]:
    task: dict[str, Any] = _alice(secured, f"/tasks/{task_id}")
    return task


def _recorded(secured: Secured, task_id: str) -> dict[str, Any] | None:
    task = _task(secured, task_id)
    return task if task["status"] not in ("waiting", "unknown") else None


def _healthy(secured: Secured) -> bool:
    response = httpx.get(f"{secured.registry_url}/health", timeout=30)
    return response.status_code == 200 and response.json()["ledger"] == "consuming"


# -- results ----------------------------------------------------------------------------

def test_bobs_agent_cannot_plant_a_result_for_alices_task(
        secured: Secured, caplog: pytest.LogCaptureFixture) -> None:
    # Given alice's task on endpoint A, known to the ledger from her manifest
    caplog.set_level(logging.WARNING, logger="gc_core.registry.ledger")
    mine = _submit(secured, secured.endpoint_a)
    (task_id,) = mine.task_ids
    # When bob, with his own endpoint's agent token, publishes a cloudpickle "result" for it
    # to her group's routing key, claiming to be endpoint A (with the user_id the broker
    # checks, and with none), and one for a task id nobody submitted
    bob = f"endpoint-{secured.endpoint_b}"
    forged = CLOUDPICKLE.dumps("bob's code")
    for stamp in (True, False):
        _send_result(secured, bob, task_id, mine.group, forged,
                     content_type=CLOUDPICKLE.content_type, stamp=stamp)
    stray = str(uuid.uuid4())
    _send_result(secured, bob, stray, mine.group, forged, content_type=CLOUDPICKLE.content_type)
    # and then endpoint A's agent sends the real one
    _send_result(secured, f"endpoint-{secured.endpoint_a}", task_id, mine.group, b"42")
    # Then the ledger recorded endpoint A's result only, under alice's task as she sent it
    task = eventually(lambda: _recorded(secured, task_id), LEDGER_TIMEOUT,
                      "the ledger to record endpoint A's result")
    assert (task["status"], task["content_type"]) == ("success", JSON.content_type), task
    assert base64.b64decode(task["payload_b64"]) == b"42"
    assert (task["user"], task["endpoint_id"]) == ("alice", secured.endpoint_a)
    # and nothing for the task nobody submitted, in her group or anywhere
    assert _task(secured, stray)["status"] == "unknown"
    assert [t["task_id"] for t in _alice(secured, f"/task-groups/{mine.group}/tasks")] == [task_id]
    # and each forgery cost one warning line, naming its sender escaped
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and repr(task_id) in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert any(repr(bob) in w for w in warnings), warnings


def test_bob_cannot_put_tasks_in_alices_name_or_take_over_hers(secured: Secured) -> None:
    # Given alice's task on endpoint A
    mine = _submit(secured, secured.endpoint_a)
    (task_id,) = mine.task_ids
    bob, bobs_agent = "bob", f"endpoint-{secured.endpoint_b}"
    planted = str(uuid.uuid4())
    # When bob publishes a manifest in alice's name, in her group, for his own endpoint B,
    # and one in his own name that claims her task for endpoint B
    for user, task_ids in (("alice", [planted]), (bob, [task_id])):
        _publish(secured, bob, TOPOLOGY.exchange("events"),
                 TOPOLOGY.routing_key("group_submitted", task_group_id=mine.group),
                 encode_event(GroupManifest(task_group_id=mine.group,
                                            endpoint_id=secured.endpoint_b, user=user,
                                            task_ids=task_ids, submitted=time.time())))
    # and his agent B answers both, as endpoint B
    for target in (planted, task_id):
        _publish(secured, bobs_agent, TOPOLOGY.exchange("results"),
                 TOPOLOGY.routing_key("result", user="alice", task_group_id=mine.group),
                 _result(target, mine.group, secured.endpoint_b, CLOUDPICKLE.dumps("bob"),
                         content_type=CLOUDPICKLE.content_type))
    _send_result(secured, f"endpoint-{secured.endpoint_a}", task_id, mine.group, b"42")
    # Then her group holds her task alone, answered by endpoint A
    task = eventually(lambda: _recorded(secured, task_id), LEDGER_TIMEOUT,
                      "the ledger to record endpoint A's result")
    assert base64.b64decode(task["payload_b64"]) == b"42"
    assert (task["user"], task["endpoint_id"]) == ("alice", secured.endpoint_a)
    assert [t["task_id"] for t in _alice(secured, f"/task-groups/{mine.group}/tasks")] == [task_id]


# -- heartbeats -------------------------------------------------------------------------

def test_a_result_that_reaches_the_ledger_before_its_manifest_is_still_recorded(
        secured: Secured) -> None:
    # A client publishes a batch's manifest just after its first task, so a quick agent's
    # result can reach the ledger first. Dropping it for want of a manifest would leave the
    # task "waiting" in the ledger for ever; the ledger waits a little for the manifest.
    group, task_id = f"g-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    _send_result(secured, f"endpoint-{secured.endpoint_a}", task_id, group, b"42")
    time.sleep(0.5)  # several of the ledger's commits go by without the manifest
    _publish(secured, "alice", TOPOLOGY.exchange("events"),
             TOPOLOGY.routing_key("group_submitted", task_group_id=group),
             encode_event(GroupManifest(task_group_id=group, endpoint_id=secured.endpoint_a,
                                        user="alice", task_ids=[task_id], submitted=time.time())))
    recorded = eventually(lambda: _recorded(secured, task_id), LEDGER_TIMEOUT,
                          "the early result to be recorded")
    assert recorded["status"] == "success"


def _heartbeat(endpoint_id: str, hostname: str, sent: float) -> Envelope:
    return encode_event(Heartbeat(
        endpoint_id=endpoint_id, hostname=hostname, pid=1, sent=sent, period=10.0,
        started=sent, engine="threads", workers=1, workers_busy=0, tasks_received=0,
        tasks_succeeded=0, tasks_failed=0))


def _status(secured: Secured, endpoint_id: str) -> dict[str, Any]:
    status: dict[str, Any] = _alice(secured, f"/endpoints/{endpoint_id}/status")
    return status


def _endpoint_of_alices(secured: Secured, name: str) -> str:
    """A new endpoint alice owns, with an agent token: the broker account that returns."""
    with secured.sessions() as db:
        endpoint = store.create_endpoint(db, EndpointIn(name=name), owner="alice").endpoint_id
        secured.tokens[f"endpoint-{endpoint}"] = identity.issue_token(
            db, "alice", endpoint_id=endpoint).token
    return f"endpoint-{endpoint}"


def test_nobody_forges_an_endpoints_heartbeat_or_freezes_its_status(secured: Secured) -> None:
    # Given an endpoint of alice's that never sent a heartbeat
    agent = _endpoint_of_alices(secured, "beats")
    endpoint = agent.removeprefix("endpoint-")
    future = time.time() + 10 * 365 * 86400
    # When bob forges one for it, sent ten years from now
    _publish(secured, "bob", TOPOLOGY.exchange("events"),
             TOPOLOGY.routing_key("group_submitted", task_group_id="beat"),
             _heartbeat(endpoint, "bob", future))
    # Then the ledger drops it (it is done with bob's message once it has alice's manifest,
    # which came later into the same queue)
    _submit(secured, endpoint)
    assert _status(secured, endpoint)["status"] == "never seen"
    # And when its own agent's clock runs ten years ahead once, the ledger records the time
    # it received that heartbeat, so the agent's next one (with a true clock) still counts
    _publish(secured, agent, TOPOLOGY.exchange("events"),
             TOPOLOGY.routing_key("heartbeat", endpoint_id=endpoint),
             _heartbeat(endpoint, "ahead", future))
    eventually(lambda: _status(secured, endpoint)["details"].get("hostname") == "ahead",
               LEDGER_TIMEOUT, "the agent's heartbeat to be recorded")
    assert _status(secured, endpoint)["last_seen"] <= time.time()
    _publish(secured, agent, TOPOLOGY.exchange("events"),
             TOPOLOGY.routing_key("heartbeat", endpoint_id=endpoint),
             _heartbeat(endpoint, "true", time.time()))
    eventually(lambda: _status(secured, endpoint)["details"].get("hostname") == "true",
               LEDGER_TIMEOUT, "the agent's true heartbeat to be recorded")


# -- dead letters and the poison pill -----------------------------------------------------

def _forged_dead_letter(task_id: str, *, group: str, user: str) -> Envelope:
    """A dead letter as the broker makes one, forged: no correlation id, the group and user
    in headers, an ``x-death`` header."""
    return Envelope(task_id, "", JSON.content_type,
                    {"gc-protocol": 1, "gc-function-id": "f", "gc-user": user,
                     "gc-task-group": group,
                     "x-death": [{"reason": "rejected", "queue": "forged", "count": 1}]},
                    b"{}")


def _declare_queue(channel: BlockingChannel, kind: str, **names: str) -> str:
    queue = TOPOLOGY.queue(kind, **names)
    channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
    for binding in queue.bindings:
        channel.queue_bind(queue.name, binding.exchange, binding.routing_key)
    return queue.name


def _dead_letter_for_real(secured: Secured, agent: str, task: TaskMessage) -> None:
    """alice publishes ``task``; its endpoint's agent account rejects it, so the broker
    dead-letters it to gc.dead (as an agent does with a task it cannot answer)."""
    channel = secured.channel(agent)
    try:
        tasks_queue = _declare_queue(channel, "endpoint_tasks", endpoint_id=task.endpoint_id)
        _publish(secured, "alice", TOPOLOGY.exchange("tasks"), task.endpoint_id,
                 encode_task(task))
        delivered = eventually(lambda: channel.basic_get(tasks_queue)[0], LEDGER_TIMEOUT,
                               "alice's task to reach its queue")
        channel.basic_reject(delivered.delivery_tag, requeue=False)
    finally:
        channel.connection.close()


def _first_result(channel: BlockingChannel, queue: str) -> tuple[ResultMessage, str]:
    """The first message in one of alice's result queues, and who the broker says sent it."""
    _method, properties, body = eventually(
        lambda: (got := channel.basic_get(queue, auto_ack=True))[0] and got,
        LEDGER_TIMEOUT, "a result in alice's queue")
    envelope = Envelope(properties.message_id or "", properties.correlation_id or "",
                        properties.content_type or "", properties.headers or {}, body)
    return decode_result(envelope), properties.user_id or ""


def test_forged_dead_letters_reach_nobody_and_never_stop_the_ledger(secured: Secured) -> None:
    # Given two tasks alice submitted to an endpoint of hers, and her group's result queue
    agent = _endpoint_of_alices(secured, "dead")
    endpoint = agent.removeprefix("endpoint-")
    mine = _submit(secured, endpoint, count=2)
    doomed, answered = mine.task_ids
    alice = secured.channel("alice")
    queue = _declare_queue(alice, "results", user="alice", task_group_id=mine.group)
    bob = f"endpoint-{secured.endpoint_b}"
    # When bob's agent publishes to gc.dead the poison pill (a task nobody submitted, no
    # correlation id, a group name too long for any routing key), a dead letter for a task
    # nobody submitted that names alice's group, and one for her task that names his own
    for forged in (_forged_dead_letter(str(uuid.uuid4()), group=LONG_GROUP, user="alice"),
                   _forged_dead_letter(str(uuid.uuid4()), group=mine.group, user="alice"),
                   _forged_dead_letter(doomed, group="bobs-group", user="bob")):
        _publish(secured, bob, TOPOLOGY.exchange("dead"), "", forged)
    # and then the broker really dead-letters her task
    _dead_letter_for_real(secured, agent, TaskMessage(
        task_id=doomed, task_group_id=mine.group, endpoint_id=endpoint, function_id="f",
        user="alice", content_type=JSON.content_type, payload=b"{}"))
    # Then the first thing in her queue is the real dead letter, sent by the registry's own
    # broker account (which her client can trust), naming the queue the broker gave up in
    result, sender = _first_result(alice, queue)
    assert (result.task_id, result.state, sender) == (doomed, "failed", "gc-registry")
    assert result.error is not None and f"gc.ep.{endpoint}.tasks" in result.error.message
    alice.connection.close()
    # and the ledger recorded it under her task, as she sent it
    task = eventually(lambda: _recorded(secured, doomed), LEDGER_TIMEOUT, "the dead letter")
    assert (task["status"], task["user"], task["task_group_id"]) == ("failed", "alice", mine.group)
    assert task["error"]["message"] == result.error.message
    # and her group lists her two tasks only
    listed = {t["task_id"] for t in _alice(secured, f"/task-groups/{mine.group}/tasks")}
    assert listed == {doomed, answered}
    # And the ledger goes on: her other task's result is recorded, and /health says so
    _publish(secured, agent, TOPOLOGY.exchange("results"),
             TOPOLOGY.routing_key("result", user="alice", task_group_id=mine.group),
             _result(answered, mine.group, endpoint, b"42"))
    eventually(lambda: _recorded(secured, answered), LEDGER_TIMEOUT, "the result after them")
    assert _healthy(secured)


# -- open mode: no user_id is checked ---------------------------------------------------

def test_on_an_open_registry_a_result_cannot_take_over_a_task_of_another_endpoint(
        fabric: Fabric) -> None:
    # Given alice's task on endpoint "a", known to an open registry's ledger from her manifest
    group, task_id = f"g-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    eventually(lambda: httpx.get(f"{fabric.registry_url}/health").json()["ledger"] == "consuming",
               LEDGER_TIMEOUT, "the ledger's queue (nothing is routed to it before)")
    publisher = BrokerSession(fabric.broker_url, name="test-open-ledger", topology=TOPOLOGY)
    publisher.start()
    try:
        publisher.publish(TOPOLOGY.exchange("events"),
                          TOPOLOGY.routing_key("group_submitted", task_group_id=group),
                          encode_event(GroupManifest(task_group_id=group, endpoint_id="a",
                                                     user="alice", task_ids=[task_id],
                                                     submitted=time.time())))
        # When a result claiming endpoint "b" comes first, then endpoint "a"'s own
        key = TOPOLOGY.routing_key("result", user="alice", task_group_id=group)
        for endpoint_id, payload in (("b", CLOUDPICKLE.dumps("b's code")), ("a", b"42")):
            publisher.publish(TOPOLOGY.exchange("results"), key,
                              _result(task_id, group, endpoint_id, payload))
        assert publisher.wait_settled(LEDGER_TIMEOUT)
    finally:
        publisher.close()

    def recorded() -> dict[str, Any] | None:
        task: dict[str, Any] = httpx.get(f"{fabric.registry_url}/tasks/{task_id}").json()
        return task if task["status"] != "waiting" and task["status"] != "unknown" else None

    # Then the ledger kept the result of the endpoint the manifest named
    task = eventually(recorded, LEDGER_TIMEOUT, "the ledger to record the result")
    assert (task["endpoint_id"], base64.b64decode(task["payload_b64"])) == ("a", b"42")


# -- /health ------------------------------------------------------------------------------

def test_health_says_so_when_the_ledger_has_stopped(tmp_path: Path) -> None:
    # Given a registry whose ledger waits for a broker that is not there
    app = create_app(RegistrySettings(
        db_url=f"sqlite:///{tmp_path / 'registry.db'}", auth="open",
        broker_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"))

    async def health_before_and_after_the_ledger_stops() -> tuple[httpx.Response, ...]:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://registry") as http:
            waiting = await http.get("/health")
            # When its ledger stops (its writer thread ends, its broker session closes)
            await asyncio.to_thread(app.state.ledger.stop)
            return waiting, await http.get("/health")

    waiting, stopped = asyncio.run(health_before_and_after_the_ledger_stops())
    assert (waiting.status_code, waiting.json()["ledger"]) == (200, "waiting for the broker")
    # Then /health says the ledger is down, with a status a load balancer acts on
    assert stopped.status_code == 503, stopped.text
    assert "stopped" in stopped.json()["ledger"]
