"""Batched transport on the real broker: tasks submitted together share AMQP messages, and
every per-task promise (one resolution, output, cancel, the ledger's record) still holds.

A tap queue bound beside the endpoint's (and the group's result queue) shows what really
crossed the broker: how many messages, and which of them were batches.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from gc_client import Client, Executor
from gc_core.batches import is_batch, split_batch
from gc_core.protocol import Envelope
from tests.fabric import Endpoint, Fabric, eventually

#: Seconds a test waits for a future before it fails instead of hanging.
RESULT_TIMEOUT = 120.0
SWEEP = 300


def square(x: int) -> int:
    return x * x


def shout(x: int) -> int:
    import sys

    print(f"out {x}")
    print(f"err {x}", file=sys.stderr)
    return x


def mark_after(path: str, seconds: float) -> str:
    import pathlib
    import time

    time.sleep(seconds)
    pathlib.Path(path).touch()
    return path


class Tap:
    """Copies of what the broker routes to an endpoint, or to a task group's results."""

    def __init__(self, channel: BlockingChannel, exchange: str, routing_key: str) -> None:
        self._channel = channel
        self.queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(self.queue, exchange, routing_key)

    def messages(self) -> list[list[str]]:
        """The task ids each message routed so far carries (one, unless a batch)."""
        found = []
        while True:
            method, properties, body = self._channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return found
            envelope = Envelope(properties.message_id or "", properties.correlation_id or "",
                                properties.content_type or "", properties.headers or {}, body)
            entries = split_batch(envelope) if is_batch(envelope) else [envelope]
            found.append([entry.message_id for entry in entries])


@pytest.fixture(scope="module")
def batch_endpoint(fabric: Fabric) -> Iterator[Endpoint]:
    """One endpoint with a 2-worker process engine for this module's tests."""
    ep = fabric.configure_endpoint(f"batches-{uuid.uuid4().hex[:8]}")
    ep.start()
    yield ep
    ep.stop_all()


@pytest.fixture
def channel(fabric: Fabric) -> Iterator[BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(f"{fabric.broker_url}?heartbeat=0"))
    yield connection.channel()
    connection.close()


def _tapped_group(channel: BlockingChannel, client: Client,
                  endpoint: Endpoint) -> tuple[str, Tap, Tap]:
    """A new task group id, with taps on the endpoint's tasks and on the group's results."""
    group = str(uuid.uuid4())
    return (group, Tap(channel, "gc.tasks", endpoint.endpoint_id),
            Tap(channel, "gc.results", f"{client.settings.user}.{group}"))


def test_a_sweep_travels_in_batches_and_each_future_resolves_once_with_its_value(
        client: Client, batch_endpoint: Endpoint, channel: BlockingChannel) -> None:
    # Given taps on the endpoint's tasks and the group's results
    group, tasks_tap, results_tap = _tapped_group(channel, client, batch_endpoint)
    # When a sweep is submitted as fast as the API allows
    with Executor(endpoint_id=batch_endpoint.endpoint_id, client=client,
                  task_group_id=group) as ex:
        futures = [ex.submit(square, x) for x in range(SWEEP)]
        values = [f.result(timeout=RESULT_TIMEOUT) for f in futures]
        duplicates = ex.duplicates_dropped
    # Then every value is right, resolved once
    assert values == [x * x for x in range(SWEEP)]
    assert duplicates == 0
    # and the tasks crossed the broker in fewer messages than tasks, each task once
    ids = sorted(f.task_id for f in futures)
    sent = tasks_tap.messages()
    assert sorted(task_id for message in sent for task_id in message) == ids
    assert len(sent) < SWEEP
    # and so did the results: each once, several to a message
    answered = results_tap.messages()
    assert sorted(task_id for message in answered for task_id in message) == ids
    assert len(answered) < SWEEP


def test_a_lone_call_goes_as_a_plain_single_task_message(
        client: Client, batch_endpoint: Endpoint, channel: BlockingChannel) -> None:
    group, tasks_tap, _ = _tapped_group(channel, client, batch_endpoint)
    with Executor(endpoint_id=batch_endpoint.endpoint_id, client=client,
                  task_group_id=group) as ex:
        first = ex.submit(square, 7)
        assert first.result(timeout=RESULT_TIMEOUT) == 49
        second = ex.submit(square, 8)
        assert second.result(timeout=RESULT_TIMEOUT) == 64
    # One task at a time: each went at once, alone, as the message other languages send
    assert tasks_tap.messages() == [[first.task_id], [second.task_id]]


def test_each_task_of_a_batch_keeps_its_own_output_and_ledger_record(
        client: Client, batch_endpoint: Endpoint) -> None:
    with Executor(endpoint_id=batch_endpoint.endpoint_id, client=client) as ex:
        futures = [ex.submit(shout, x) for x in range(100)]
        assert [f.result(timeout=RESULT_TIMEOUT) for f in futures] == list(range(100))
    # What each task printed is on its own future
    assert [(f.stdout, f.stderr) for f in futures] == [(f"out {x}\n", f"err {x}\n")
                                                      for x in range(100)]
    # and the ledger holds each task, with its own output
    eventually(lambda: {t.status for t in client.registry.list_group_tasks(ex.task_group_id)}
               == {"success"}, 60, "the ledger to record every result")
    recorded = {t.task_id: t for t in client.registry.list_group_tasks(ex.task_group_id)}
    assert len(recorded) == 100
    for x, future in enumerate(futures):
        assert recorded[future.task_id].stdout == f"out {x}\n"
        assert client.get_result(future.task_id) == x


def test_a_task_cancelled_inside_a_batch_never_runs_and_its_batch_mates_do(
        client: Client, make_endpoint: Any, tmp_path: Path, channel: BlockingChannel) -> None:
    # Given an endpoint with one worker, busy with a batch of slow tasks
    endpoint: Endpoint = make_endpoint(workers=1)
    endpoint.start()
    tasks_tap = Tap(channel, "gc.tasks", endpoint.endpoint_id)
    marks = [tmp_path / f"mark-{n}" for n in range(6)]
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        futures = [ex.submit(mark_after, str(mark), 0.5) for mark in marks]
        # When the last one, still queued behind the others, is cancelled
        eventually(marks[0].exists, 60, "the first task to run")
        victim = futures[-1]
        assert victim.cancel()
        # Then the others finish, and the cancelled one never runs
        assert [f.result(timeout=RESULT_TIMEOUT) for f in futures[:-1]] == \
            [str(mark) for mark in marks[:-1]]
    with pytest.raises(CancelledError):
        victim.result()
    eventually(lambda: client.get_task(victim.task_id).status == "cancelled", 60,
               "the ledger to record the cancel")
    assert not marks[-1].exists()
    # (it did share its message with others)
    assert any(victim.task_id in message and len(message) > 1
               for message in tasks_tap.messages())


def test_the_results_of_a_batch_wait_for_each_other_and_travel_in_one_message(
        client: Client, make_endpoint: Any, channel: BlockingChannel) -> None:
    # Given an endpoint whose results of a batch may wait a whole second for their mates
    endpoint: Endpoint = make_endpoint(engine="threads", workers=4, result_linger=1.0)
    endpoint.start()
    group, tasks_tap, results_tap = _tapped_group(channel, client, endpoint)
    # When a few tasks are submitted at once (the first goes alone, the rest behind it)
    with Executor(endpoint_id=endpoint.endpoint_id, client=client, task_group_id=group) as ex:
        futures = [ex.submit(square, x) for x in range(40)]
        assert [f.result(timeout=RESULT_TIMEOUT) for f in futures] == [x * x for x in range(40)]
    # Then each batch's results came back together, in one message (the last of them sent
    # what was held)
    results = [set(message) for message in results_tap.messages()]
    batches = [set(message) for message in tasks_tap.messages() if len(message) > 1]
    assert batches, "the tasks went in no batch: nothing to check"
    for batch in batches:
        assert batch in results, \
            f"the results of a batch of {len(batch)} came in messages of {[len(r) for r in results]}"
