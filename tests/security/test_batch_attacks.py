"""Batches on the secured node: a task inside a batch is checked as if it came alone.

alice owns a process endpoint whose agent logs in with its token, so the broker's
``user_id`` on each message names its sender. A batch's entries each claim a user; only
those that claim the batch's sender run. And the agent's own way of isolating a task that
kills its worker (it puts that task back on its queue alone, as itself) holds up here: the
broker lets it publish to its own endpoint only, and the ledger hands the task's dead
letter to alice.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from gc_agent.requeue_seal import SEAL_HEADER
from gc_client import Executor, TaskDeadLettered
from gc_core.batches import encode_task_batch
from gc_core.protocol import ResultMessage, TaskMessage, encode_task
from gc_core.serialize import JSON
from gc_core.topology import load_topology
from tests.fabric import Endpoint, eventually
from tests.faults.test_batch_faults import results_in
from tests.secured_broker import Secured, node_log

TOPOLOGY = load_topology()
#: Seconds a test waits for a future before it fails instead of hanging.
RESULT_TIMEOUT = 120.0


def double(x: int) -> int:
    return 2 * x


def crash_the_worker() -> None:
    import os

    os._exit(13)


@pytest.fixture(scope="module")
def alices_endpoint(secured: Secured) -> Iterator[Endpoint]:
    """alice's endpoint, its agent logged in with its own token."""
    alice = secured.fabric("alice", f"alice-batches-{uuid.uuid4().hex[:6]}")
    endpoint = alice.configure_endpoint(f"batches-{uuid.uuid4().hex[:6]}", engine="processes",
                                        workers=2, broker_url=secured.node.url)
    endpoint.start()
    yield endpoint
    endpoint.stop_all()


def _task(task_id: str, group: str, endpoint_id: str, function_id: str, user: str,
          x: int) -> TaskMessage:
    return TaskMessage(task_id=task_id, task_group_id=group, endpoint_id=endpoint_id,
                       function_id=function_id, user=user, content_type=JSON.content_type,
                       payload=JSON.dumps({"args": [x], "kwargs": {}}))


def _alices_result_queue(secured: Secured) -> tuple[str, str, str, BlockingChannel]:
    """``double`` registered by alice, a new group of hers, its result queue's name, and a
    channel of hers on which that queue is declared and bound."""
    with secured.client("alice") as client:
        function_id = client.register_function(double)
    group = f"g-{uuid.uuid4().hex[:8]}"
    queue = TOPOLOGY.queue("results", user="alice", task_group_id=group)
    channel = secured.channel("alice")
    channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
    channel.queue_bind(queue.name, "gc.results", f"alice.{group}")
    return function_id, group, queue.name, channel


def test_a_task_in_alices_batch_that_claims_to_be_bobs_is_dropped_alone(
        secured: Secured, alices_endpoint: Endpoint) -> None:
    # Given alice's result queue for a group of hers
    ep = alices_endpoint.endpoint_id
    function_id, group, queue, channel = _alices_result_queue(secured)
    # When alice sends one batch whose middle task claims to be bob's
    forged = f"forged-{uuid.uuid4().hex[:8]}"
    batch = encode_task_batch([_task("t-first", group, ep, function_id, "alice", 1),
                               _task(forged, group, ep, function_id, "bob", 2),
                               _task("t-last", group, ep, function_id, "alice", 3)])
    secured.publish("alice", "gc.tasks", ep, batch, user_id="alice", mandatory=True)
    try:
        # Then her own tasks run, and the forged one is dropped, unanswered
        answered: dict[str, ResultMessage] = {}
        eventually(lambda: answered.update({r.task_id: r for r in results_in(channel, queue)})
                   or len(answered) >= 2, 60, "alice's two results")
        eventually(lambda: f"dropped task {forged}" in alices_endpoint.read_logs(), 30,
                   "the agent to drop the forged task")
        assert {task_id: r.payload for task_id, r in answered.items()} == \
            {"t-first": b"2", "t-last": b"6"}
    except BaseException:
        print(alices_endpoint.read_logs(), node_log(secured.node))
        raise
    finally:
        channel.connection.close()


def test_a_task_killing_its_worker_in_a_batch_is_dead_lettered_alone_and_alice_is_told(
        secured: Secured, alices_endpoint: Endpoint) -> None:
    with secured.client("alice") as client, \
            Executor(endpoint_id=alices_endpoint.endpoint_id, client=client) as ex:
        # (registered first, so that the submissions come close enough together to share
        # messages)
        client.register_function(double)
        client.register_function(crash_the_worker)
        mates = [ex.submit(double, x) for x in range(10)]
        poison = ex.submit(crash_the_worker)
        mates += [ex.submit(double, x) for x in range(10, 20)]
        try:
            with pytest.raises(TaskDeadLettered, match="delivery limit"):
                poison.result(timeout=240)
            assert [f.result(timeout=RESULT_TIMEOUT) for f in mates] == \
                [2 * x for x in range(20)]
            # (it came in a batch, which its agent put back on the queue without it, so the
            # batch was never redelivered)
            logs = alices_endpoint.read_logs()
            assert f"task '{poison.task_id}' of a batch goes back to the queue alone" in logs
            assert "split a redelivered batch" not in logs
        except BaseException:
            print(alices_endpoint.read_logs(), node_log(secured.node))
            raise
        eventually(lambda: Counter(t.status for t in client.registry.list_group_tasks(
            ex.task_group_id)) == {"success": 20, "failed": 1}, 60, "the ledger")



@pytest.mark.parametrize("seal", [None, "0" * 64], ids=["unsealed", "made-up seal"])
def test_a_task_put_on_the_queue_with_the_agents_login_but_without_its_seal_is_dropped(
        secured: Secured, alices_endpoint: Endpoint, seal: str | None) -> None:
    # Given alice's result queue, and her endpoint's broker login in someone else's hands
    # (its token read off an unencrypted connection, say): the account the broker stamps on
    # the tasks the agent puts back alone, whose claims the agent takes on trust
    ep = alices_endpoint.endpoint_id
    agent_login = f"endpoint-{ep}"
    agent_token = (alices_endpoint.directory / "agent.token").read_text().strip()
    function_id, group, queue, channel = _alices_result_queue(secured)
    # When its holder puts a task claiming to be alice's on her endpoint's queue, unsealed or
    # with a seal of its own making
    injected = f"injected-{uuid.uuid4().hex[:8]}"
    envelope = encode_task(_task(injected, group, ep, function_id, "alice", 5))
    if seal is not None:
        envelope = envelope._replace(headers={**envelope.headers, SEAL_HEADER: seal})
    injector = secured.connect(agent_login, agent_token).channel()
    injector.confirm_delivery()
    injector.basic_publish("gc.tasks", ep, envelope.body, pika.BasicProperties(
        message_id=envelope.message_id, correlation_id=envelope.correlation_id,
        content_type=envelope.content_type, headers=envelope.headers, user_id=agent_login,
        delivery_mode=2), mandatory=True)
    injector.connection.close()
    try:
        # Then the agent drops it: it never runs as alice, and nothing answers it; its log
        # line says what else drops such a task (another host's agent with another key)
        eventually(lambda: f"dropped task {injected}" in alices_endpoint.read_logs(), 60,
                   "the agent to drop the injected task")
        assert [r.task_id for r in results_in(channel, queue)] == []
        (line,) = [line for line in alices_endpoint.read_logs().splitlines()
                   if f"dropped task {injected}" in line]
        assert "not sealed with this agent's requeue.key" in line
        assert "another host" in line
    except BaseException:
        print(alices_endpoint.read_logs(), node_log(secured.node))
        raise
    finally:
        channel.connection.close()
