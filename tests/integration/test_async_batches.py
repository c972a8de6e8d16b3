"""The AsyncExecutor's coalescing on the real broker: tasks submitted together share AMQP
messages, a lone call goes alone, and each future keeps its own value and cancel.

The taps of ``test_batches`` show what really crossed the broker.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from pika.adapters.blocking_connection import BlockingChannel

from gc_client import AsyncExecutor, Client
from tests.fabric import Endpoint, eventually
from tests.integration.test_batches import (
    RESULT_TIMEOUT,
    SWEEP,
    Tap,
    batch_endpoint,
    channel,
    mark_after,
    square,
)

__all__ = ["batch_endpoint", "channel"]  # fixtures this module shares with test_batches


def test_a_gathered_sweep_travels_in_batches_and_each_future_resolves_once(
        client: Client, batch_endpoint: Endpoint, channel: BlockingChannel) -> None:
    # Given a tap on the endpoint's tasks
    group = str(uuid.uuid4())
    tasks_tap = Tap(channel, "gc.tasks", batch_endpoint.endpoint_id)

    # When a sweep is submitted all together
    async def main() -> tuple[list[str], list[int], int]:
        async with AsyncExecutor(endpoint_id=batch_endpoint.endpoint_id, client=client,
                                 task_group_id=group) as ex:
            futures = await asyncio.gather(*(ex.submit(square, x) for x in range(SWEEP)))
            values = await asyncio.wait_for(asyncio.gather(*futures), RESULT_TIMEOUT)
            return [f.task_id for f in futures], list(values), ex.duplicates_dropped

    task_ids, values, duplicates = asyncio.run(main())

    # Then every value is right, resolved once
    assert values == [x * x for x in range(SWEEP)]
    assert duplicates == 0
    # and the tasks crossed the broker in fewer messages than tasks, each task once
    sent = tasks_tap.messages()
    assert sorted(task_id for message in sent for task_id in message) == sorted(task_ids)
    assert len(sent) < SWEEP


def test_one_awaited_submit_after_another_goes_as_plain_single_task_messages(
        client: Client, batch_endpoint: Endpoint, channel: BlockingChannel) -> None:
    tasks_tap = Tap(channel, "gc.tasks", batch_endpoint.endpoint_id)

    async def main() -> list[str]:
        async with AsyncExecutor(endpoint_id=batch_endpoint.endpoint_id, client=client) as ex:
            first = await ex.submit(square, 7)
            second = await ex.submit(square, 8)
            values = await asyncio.wait_for(asyncio.gather(first, second), RESULT_TIMEOUT)
            assert list(values) == [49, 64]
            return [first.task_id, second.task_id]

    first_id, second_id = asyncio.run(main())

    # Each submit waited for its confirm, so nothing queued behind it: one task a message
    assert tasks_tap.messages() == [[first_id], [second_id]]


@pytest.fixture
def one_worker_endpoint(make_endpoint: Any) -> Endpoint:
    """An endpoint with a single worker, so that a batch of slow tasks queues behind it."""
    endpoint: Endpoint = make_endpoint(workers=1)
    endpoint.start()
    return endpoint


def test_a_task_cancelled_inside_an_async_batch_never_runs_and_its_batch_mates_do(
        client: Client, one_worker_endpoint: Endpoint, tmp_path: Path,
        channel: BlockingChannel) -> None:
    # Given an endpoint with one worker, busy with a batch of slow tasks
    endpoint = one_worker_endpoint
    marks = [tmp_path / f"mark-{n}" for n in range(6)]
    tasks_tap = Tap(channel, "gc.tasks", endpoint.endpoint_id)

    async def main() -> tuple[list[str], str, bool]:
        async with AsyncExecutor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
            futures = await asyncio.gather(*(ex.submit(mark_after, str(mark), 0.5)
                                             for mark in marks))
            # When the last one, still queued behind the others, is cancelled
            await asyncio.to_thread(eventually, marks[0].exists, 60, "the first task to run")
            victim = futures[-1]
            assert victim.cancel()
            # Then the others finish
            values = await asyncio.wait_for(asyncio.gather(*futures[:-1]), RESULT_TIMEOUT)
            with pytest.raises(asyncio.CancelledError):
                await victim
            return list(values), victim.task_id, victim.cancelled()

    values, victim_id, cancelled = asyncio.run(main())

    assert values == [str(mark) for mark in marks[:-1]]
    assert cancelled
    # and the cancelled one never runs: the ledger records the cancel
    eventually(lambda: client.get_task(victim_id).status == "cancelled", 60,
               "the ledger to record the cancel")
    assert not marks[-1].exists()
    # (it did share its message with others)
    assert any(victim_id in message and len(message) > 1 for message in tasks_tap.messages())
