"""Attacks on a client: results it must not trust, and a task too large for the broker.

On the secured node alice owns endpoint A and bob owns endpoint B. No agent serves A here:
the tests publish A's results themselves with A's agent token, so they decide what reaches
alice's result queue, and in which order. Messages on one queue arrive in the order they
were published, so "bob's forged result first, then the real one" shows, without any
timing, which of the two resolved her future.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from gc_client import AsyncExecutor, Client, Executor
from gc_core.errors import GCError, SerializationError, TaskDeadLettered
from gc_core.protocol import ResultMessage, encode_result
from gc_core.serialize import CLOUDPICKLE, JSON
from gc_core.topology import load_topology
from tests.fabric import Endpoint, Fabric, eventually
from tests.secured_broker import Secured

TOPOLOGY = load_topology()

#: Seconds a test waits for a future before it fails instead of hanging.
RESULT_TIMEOUT = 60.0
#: The broker's max_message_size (RabbitMQ's default, which the shared broker keeps).
BROKER_LIMIT = 128 * 2**20


class _Bomb:
    """Unpickling this creates ``marker``: the forged "result" is bob's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def _double(x: int) -> int:
    return 2 * x


def _size(data: bytes) -> int:
    return len(data)


@pytest.fixture
def endpoint_a_queues(secured: Secured) -> Iterator[str]:
    """Endpoint A's queues, declared by A's agent account, so alice's tasks are routed to
    them; whatever tasks the test left there are purged afterwards."""
    channel = secured.channel(f"endpoint-{secured.endpoint_a}")
    names = []
    for kind in ("endpoint_tasks", "endpoint_commands"):
        queue = TOPOLOGY.queue(kind, endpoint_id=secured.endpoint_a)
        channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
        for binding in queue.bindings:
            channel.queue_bind(queue.name, binding.exchange, binding.routing_key)
        names.append(queue.name)
    yield secured.endpoint_a
    for name in names:
        channel.queue_purge(name)
    channel.connection.close()


def _publish_result(secured: Secured, who: str, *, task_id: str, group: str,
                    content_type: str, payload: bytes, user_id: str | None) -> bool:
    """Publish a successful result for alice's task as broker user ``who``; False if the
    broker refused it (then the attack failed at the broker already)."""
    envelope = encode_result(ResultMessage(
        task_id=task_id, task_group_id=group, endpoint_id=secured.endpoint_a, user="alice",
        state="success", content_type=content_type, payload=payload))
    try:
        secured.publish(who, TOPOLOGY.exchange("results"),
                        TOPOLOGY.routing_key("result", user="alice", task_group_id=group),
                        envelope, user_id=user_id)
        return True
    except pika.exceptions.AMQPError:
        return False


def _forge_as_bob(secured: Secured, task_id: str, group: str, marker: Path) -> None:
    """bob's attack with his endpoint's agent token: a cloudpickle "result" for alice's task,
    once with the user_id the broker checks and once with none (the broker checks only a
    user_id that is set)."""
    bomb = CLOUDPICKLE.dumps(_Bomb(marker))
    endpoint_b = f"endpoint-{secured.endpoint_b}"
    for user_id in (endpoint_b, None):
        _publish_result(secured, endpoint_b, task_id=task_id, group=group,
                        content_type=CLOUDPICKLE.content_type, payload=bomb, user_id=user_id)


def _answer_as_endpoint_a(secured: Secured, task_id: str, group: str, value: Any) -> None:
    endpoint_a = f"endpoint-{secured.endpoint_a}"
    assert _publish_result(secured, endpoint_a, task_id=task_id, group=group,
                           content_type=CLOUDPICKLE.content_type,
                           payload=CLOUDPICKLE.dumps(value), user_id=endpoint_a)


def _client_warnings_about(caplog: pytest.LogCaptureFixture, task_id: str) -> list[str]:
    """The client's warnings naming ``task_id`` (the registry's ledger, in this process too,
    logs its own)."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("gc_client.")
            and r.levelno == logging.WARNING and task_id in r.getMessage()]


def test_bobs_forged_result_never_runs_in_alices_executor(
        secured: Secured, endpoint_a_queues: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # Given alice's task on endpoint A, which no agent serves yet
    marker = tmp_path / "bob-was-here"
    caplog.set_level(logging.WARNING, logger="gc_client")
    with secured.client("alice") as client, \
            Executor(endpoint_id=endpoint_a_queues, client=client) as ex:
        future = ex.submit(_double, 21)
        # When bob publishes a cloudpickle "result" for it to her group's routing key,
        # then endpoint A sends the real one
        _forge_as_bob(secured, future.task_id, ex.task_group_id, marker)
        _answer_as_endpoint_a(secured, future.task_id, ex.task_group_id, 42)
        # Then her future resolves from endpoint A's result only, and bob's code never ran
        assert future.result(timeout=RESULT_TIMEOUT) == 42
    assert not marker.exists()
    # and each forged result cost one warning naming its sender (escaped)
    warnings = _client_warnings_about(caplog, future.task_id)
    assert len(warnings) == 2, warnings
    assert any(repr(f"endpoint-{secured.endpoint_b}") in w for w in warnings), warnings


def test_bobs_forged_result_never_runs_in_alices_async_executor(
        secured: Secured, endpoint_a_queues: str, tmp_path: Path) -> None:
    marker = tmp_path / "bob-was-here"

    async def main(client: Client) -> Any:
        async with AsyncExecutor(endpoint_id=endpoint_a_queues, client=client) as ex:
            future = await ex.submit(_double, 21)
            await asyncio.to_thread(_forge_as_bob, secured, future.task_id, ex.task_group_id,
                                    marker)
            await asyncio.to_thread(_answer_as_endpoint_a, secured, future.task_id,
                                    ex.task_group_id, 42)
            return await asyncio.wait_for(future, RESULT_TIMEOUT)

    with secured.client("alice") as client:
        assert asyncio.run(main(client)) == 42
    assert not marker.exists()


def test_a_pickled_result_for_a_json_task_is_never_unpickled(
        secured: Secured, endpoint_a_queues: str, tmp_path: Path) -> None:
    # Given alice's task sent with JSON to endpoint A
    marker = tmp_path / "endpoint-code-ran"
    with secured.client("alice") as client:
        with Executor(endpoint_id=endpoint_a_queues, client=client, serializer="json") as ex:
            future = ex.submit(_double, 21)
            group = ex.task_group_id
            # When its result comes from endpoint A itself, but pickled
            _answer_as_endpoint_a(secured, future.task_id, group, _Bomb(marker))
            # Then the future fails with a sentence naming both serializers, and nothing ran
            error = future.exception(timeout=RESULT_TIMEOUT)
        assert isinstance(error, SerializationError), error
        assert CLOUDPICKLE.content_type in str(error) and JSON.content_type in str(error)
        assert not marker.exists()
        # And reloading the group from the ledger (which recorded that result) does not run
        # it either
        eventually(lambda: client.get_task(future.task_id).status == "success", 30,
                   "the ledger to record the result")
        with Executor(endpoint_id=endpoint_a_queues, client=client, task_group_id=group,
                      serializer="json") as later:
            (reloaded,) = later.reload_tasks()
            assert isinstance(reloaded.exception(timeout=RESULT_TIMEOUT), SerializationError)
    assert not marker.exists()


def test_a_pickled_result_for_a_json_task_is_never_unpickled_by_the_async_executor(
        secured: Secured, endpoint_a_queues: str, tmp_path: Path) -> None:
    marker = tmp_path / "endpoint-code-ran"

    async def main(client: Client) -> BaseException | None:
        async with AsyncExecutor(endpoint_id=endpoint_a_queues, client=client,
                                 serializer="json") as ex:
            future = await ex.submit(_double, 21)
            await asyncio.to_thread(_answer_as_endpoint_a, secured, future.task_id,
                                    ex.task_group_id, _Bomb(marker))
            await asyncio.wait([future], timeout=RESULT_TIMEOUT)
            return future.exception()

    with secured.client("alice") as client:
        error = asyncio.run(main(client))
    assert isinstance(error, SerializationError), error
    assert not marker.exists()


def test_a_dead_letter_the_registry_hands_on_still_fails_alices_future(
        secured: Secured, endpoint_a_queues: str) -> None:
    # Given alice's task waiting in endpoint A's queue
    with secured.client("alice") as client, \
            Executor(endpoint_id=endpoint_a_queues, client=client) as ex:
        future = ex.submit(_double, 21)
        # When A's agent rejects it, so the broker dead-letters it to the ledger, which
        # republishes it to her as the registry's own broker account
        agent = secured.channel(f"endpoint-{secured.endpoint_a}")
        tasks = TOPOLOGY.queue("endpoint_tasks", endpoint_id=secured.endpoint_a).name
        delivered = eventually(lambda: agent.basic_get(tasks)[0], 30, "the task to arrive")
        agent.basic_reject(delivered.delivery_tag, requeue=False)
        agent.connection.close()
        # Then her client trusts that sender, and her future fails with the reason
        assert isinstance(future.exception(timeout=RESULT_TIMEOUT), TaskDeadLettered)


def test_a_task_over_the_brokers_size_limit_fails_at_once_and_the_executor_goes_on(
        fabric: Fabric, endpoint: Endpoint, tmp_path: Path) -> None:
    # Given an argument 1 MiB over the broker's max_message_size
    client = Client(broker_url=fabric.broker_url, registry_url=fabric.registry_url,
                    home=str(tmp_path))
    with client, Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        # When it is submitted
        big = ex.submit(_size, bytes(BROKER_LIMIT + 2**20))
        # Then its future fails with a sentence naming both sizes and what to do
        error = big.exception(timeout=RESULT_TIMEOUT)
        assert isinstance(error, GCError), error
        message = str(error)
        assert "129.0 MiB" in message and "128.0 MiB" in message, message
        assert "by reference" in message, message
        # and the next task of the same Executor still runs (and the with-block exits)
        assert ex.submit(_double, 21).result(timeout=RESULT_TIMEOUT) == 42


def test_a_task_the_broker_refuses_as_too_large_fails_alone_in_the_async_executor(
        fabric: Fabric, endpoint: Endpoint, tmp_path: Path) -> None:
    # Given a client whose own size check lets more through than the broker takes
    client = Client(broker_url=fabric.broker_url, registry_url=fabric.registry_url,
                    home=str(tmp_path), max_message_size=2 * BROKER_LIMIT)
    size_id, double_id = client.register_function(_size), client.register_function(_double)

    async def main() -> tuple[BaseException | None, list[int]]:
        async with AsyncExecutor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
            # When a task the broker refuses is published together with small ones, on the
            # channel the broker closes over it
            big = await ex.submit_to_registered_function(size_id, (bytes(BROKER_LIMIT + 2**20),))
            small = [await ex.submit_to_registered_function(double_id, (x,)) for x in range(3)]
            # Then it fails (it is not sent again and again), and the small ones still run
            await asyncio.wait([big], timeout=RESULT_TIMEOUT)
            values = [await asyncio.wait_for(f, RESULT_TIMEOUT) for f in small]
            return big.exception() if big.done() else None, values

    with client:
        error, values = asyncio.run(main())
    assert isinstance(error, GCError), error
    assert "134217728" in str(error), error  # the broker's own words name both sizes
    assert values == [0, 2, 4]
