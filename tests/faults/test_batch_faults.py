"""Batched messages under faults and attacks, on the real broker.

Faults: an agent killed mid-sweep while tasks travel in batches loses none and resolves
each future once; a task that kills its worker, sent in one message with others, is the
only one dead-lettered. Attacks (the open stack, where anyone may publish tasks): a batch
out of its bounds, or lying about itself, costs its sender alone, and each task inside a
batch is checked as if it had come on its own.
"""

from __future__ import annotations

import json
import signal
import struct
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from gc_client import Client, Executor, TaskDeadLettered
from gc_core.batches import BATCH_CONTENT_TYPE, MAX_BATCH_TASKS, decode_results
from gc_core.protocol import Envelope, ResultMessage
from tests.fabric import Endpoint, Fabric, eventually
from tests.faults.test_agent_faults import _count_resolutions, crash_the_worker, triple
from tests.security.test_agent_attacks import ATTACKER, RESULT_TIMEOUT, TOPOLOGY, _settled

#: Tasks in the swept-through-a-kill test.
SWEEP = 2000


def double(x: int) -> int:
    return 2 * x


def _kill_and_restart_once(ep: Endpoint, futures: list[Future[Any]], results: int) -> int:
    """SIGKILL the agent once ``results`` futures are done, start another; how many were
    done at the kill."""
    eventually(lambda: sum(f.done() for f in futures) >= results, 120, f"{results} results")
    ep.kill(signal.SIGKILL)
    done = sum(f.done() for f in futures)
    ep.start()
    return done


# -- faults --------------------------------------------------------------------------------

def test_kill_9_of_the_agent_mid_sweep_of_batches_loses_no_task(client: Client,
                                                                make_endpoint: Any) -> None:
    # Given a sweep that travels in batches to an agent
    ep: Endpoint = make_endpoint()
    ep.start()
    client.register_function(triple)
    with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
        futures = [ex.submit(triple, x) for x in range(SWEEP)]
        resolutions = _count_resolutions(futures)
        # When the agent is killed with SIGKILL mid-way, and another takes over
        done_at_kill = _kill_and_restart_once(ep, futures, SWEEP // 6)
        # Then every future resolves once, with its value
        assert [f.result(timeout=300) for f in futures] == [3 * x for x in range(SWEEP)]
    assert done_at_kill < SWEEP, "the sweep finished before the kill; the test proved nothing"
    assert Counter(resolutions.values()) == {1: SWEEP}
    # and the new agent split the batches it got again into single tasks
    assert "split a redelivered batch" in ep.read_logs()
    eventually(lambda: {t.status for t in client.registry.list_group_tasks(ex.task_group_id)}
               == {"success"}, 60, "the ledger to record every result")


def test_a_task_killing_its_worker_inside_a_batch_is_dead_lettered_alone(
        client: Client, make_endpoint: Any) -> None:
    # Given tasks submitted together, one of which kills its worker every time
    ep: Endpoint = make_endpoint()
    ep.start()
    # (registered first, so that the submissions come close enough together to share messages)
    client.register_function(triple)
    client.register_function(crash_the_worker)
    with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
        before = [ex.submit(triple, x) for x in range(20)]
        poison = ex.submit(crash_the_worker)
        after = [ex.submit(triple, x) for x in range(20, 40)]
        # Then the poison task alone is given up
        with pytest.raises(TaskDeadLettered, match="delivery limit"):
            poison.result(timeout=240)
        # and its batch-mates all succeed
        assert [f.result(timeout=RESULT_TIMEOUT) for f in before + after] == \
            [3 * x for x in range(40)]
    # (it came in a batch, which its agent put back on the queue without it, so the batch
    # was never redelivered)
    logs = ep.read_logs()
    assert f"task '{poison.task_id}' of a batch goes back to the queue alone" in logs
    assert "split a redelivered batch" not in logs
    eventually(lambda: client.get_task(poison.task_id).status == "failed", 60, "the ledger")
    statuses = Counter(t.status for t in client.registry.list_group_tasks(ex.task_group_id))
    assert statuses == {"success": 40, "failed": 1}


# -- attacks: raw AMQP, as an attacker speaks it ---------------------------------------------

def _entry(task_id: str, group: str, headers: dict[str, Any], body: bytes) -> bytes:
    """One batch entry as the contract frames it."""
    head = json.dumps({"message_id": task_id, "correlation_id": group,
                       "content_type": "application/json", "headers": headers}).encode()
    return struct.pack(">I", len(head)) + head + struct.pack(">I", len(body)) + body


def _headers(*, group: str, endpoint_id: str, function_id: str) -> dict[str, Any]:
    return {"gc-protocol": 1, "gc-function-id": function_id, "gc-endpoint-id": endpoint_id,
            "gc-user": ATTACKER, "gc-task-group": group}


def _publish_batch(channel: BlockingChannel, endpoint_id: str, group: str, body: bytes,
                   count: Any) -> None:
    channel.basic_publish("gc.tasks", endpoint_id, body, pika.BasicProperties(
        message_id=str(uuid.uuid4()), correlation_id=group, content_type=BATCH_CONTENT_TYPE,
        headers={"gc-protocol": 1, "gc-batch": count, "gc-user": ATTACKER}, delivery_mode=2),
        mandatory=True)


def results_in(channel: BlockingChannel, queue: str) -> list[ResultMessage]:
    """Every result waiting in ``queue``, batches split."""
    found: list[ResultMessage] = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return found
        found += [r for r in decode_results(Envelope(
            properties.message_id or "", properties.correlation_id or "",
            properties.content_type or "", properties.headers or {}, body))
            if isinstance(r, ResultMessage)]


@pytest.fixture
def small_endpoint(client: Client, make_endpoint: Any) -> tuple[str, str]:
    """An endpoint that holds at most two unsettled messages, and a function it may run."""
    endpoint: Endpoint = make_endpoint(workers=1, prefetch=2)
    endpoint.start()
    return endpoint.endpoint_id, client.register_function(double)


@pytest.fixture
def attacker(fabric: Fabric) -> Iterator[tuple[BlockingChannel, str, str]]:
    """A raw channel on the open stack with confirms, and a result queue of the attacker's."""
    connection = pika.BlockingConnection(pika.URLParameters(f"{fabric.broker_url}?heartbeat=0"))
    channel = connection.channel()
    channel.confirm_delivery()
    group = f"g-{uuid.uuid4().hex[:8]}"
    queue = TOPOLOGY.queue("results", user=ATTACKER, task_group_id=group)
    channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
    channel.queue_bind(queue.name, "gc.results", f"{ATTACKER}.{group}")
    yield channel, queue.name, group
    channel.queue_delete(queue.name)
    connection.close()


def test_batches_out_of_bounds_cost_their_sender_alone(
        client: Client, fabric: Fabric, small_endpoint: tuple[str, str],
        attacker: tuple[BlockingChannel, str, str]) -> None:
    # Given an endpoint that holds at most two unsettled messages
    channel, queue, group = attacker
    ep, function_id = small_endpoint
    good = _entry("t-good", group, _headers(group=group, endpoint_id=ep,
                                            function_id=function_id), b'{"args": [1]}')
    # When batches arrive that break the contract's framing or bounds
    hostile = {
        "too many": ([good] * (MAX_BATCH_TASKS + 1), MAX_BATCH_TASKS + 1),
        "count that lies": ([good] * 3, 2),
        "count that is text": ([good], "1"),
        "no count": ([good], None),
        "length past the end": ([good + struct.pack(">I", 10**6) + b"{}"], 1),
        "cut short": ([good[:3]], 1),
        "deep head": ([struct.pack(">I", 100_000) + b"[" * 100_000 + b"\0\0\0\0"], 1),
        "head over its bound": ([struct.pack(">I", 2**20) + b" " * 2**20 + b"\0\0\0\0"], 1),
    }
    for entries, count in hostile.values():
        _publish_batch(channel, ep, group, b"".join(entries), count)
    # Then an ordinary task from someone else still runs
    with Executor(endpoint_id=ep, client=client) as ex:
        assert ex.submit(double, 21).result(timeout=RESULT_TIMEOUT) == 42
    # and none of the hostile batches is left unsettled, or ran a task
    eventually(lambda: _settled(fabric.vhost, ep), 30, "no message left on the queue")
    assert "t-good" not in {r.task_id for r in results_in(channel, queue)}


def test_each_task_inside_a_batch_is_checked_as_if_it_came_alone(
        fabric: Fabric, small_endpoint: tuple[str, str],
        attacker: tuple[BlockingChannel, str, str]) -> None:
    # Given an endpoint, and a batch whose tasks are good, addressed elsewhere, or malformed
    channel, queue, group = attacker
    ep, function_id = small_endpoint
    headers = _headers(group=group, endpoint_id=ep, function_id=function_id)
    entries = [
        _entry("t-good", group, headers, b'{"args": [21], "kwargs": {}}'),
        _entry("t-elsewhere", group, {**headers, "gc-endpoint-id": "another-endpoint"},
               b'{"args": [1], "kwargs": {}}'),
        _entry("t-bad-function-id", group, {**headers, "gc-function-id": "f" * 100},
               b'{"args": [1], "kwargs": {}}'),
        _entry("t-deep-spec", group, {**headers, "gc-resource-spec": "[" * 5000 + "]" * 5000},
               b'{"args": [1], "kwargs": {}}'),
        _entry("t-good-too", group, headers, b'{"args": [5], "kwargs": {}}'),
    ]
    # When it arrives as one message
    _publish_batch(channel, ep, group, b"".join(entries), len(entries))
    # Then each task gets its own answer: the good ones their values, the others an error
    answered: dict[str, ResultMessage] = {}
    eventually(lambda: answered.update({r.task_id: r for r in results_in(channel, queue)})
               or len(answered) >= 5, 60, "an answer for each task of the batch")
    assert (answered["t-good"].state, answered["t-good"].payload) == ("success", b"42")
    assert (answered["t-good-too"].state, answered["t-good-too"].payload) == ("success", b"10")
    errors = {task_id: r.error.type for task_id, r in answered.items() if r.error is not None}
    assert errors == {"t-elsewhere": "PolicyError", "t-bad-function-id": "ProtocolError",
                      "t-deep-spec": "ProtocolError"}
    eventually(lambda: _settled(fabric.vhost, ep), 30, "no message left on the queue")
