"""Errors an endpoint reports are caught by their class on the client, through the whole
fabric; a task id the ledger never heard of is TaskNotFound, not pending."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gc_agent.config import HtexEngineConfig, load_config, save_config
from gc_client import Client, Executor
from gc_client.tasks import make_task
from gc_core.errors import (
    PolicyError,
    ResultNotSerializable,
    ResultTooLarge,
    SerializationError,
    SerializerNotAllowed,
    TaskError,
    TaskExecutionFailed,
    TaskNotFound,
    TaskPending,
    WorkerLost,
)
from gc_core.protocol import TaskMessage, encode_task
from gc_core.serialize import JSON
from tests.fabric import Endpoint, Fabric, eventually

#: Repository root: htex workers import this module's functions from it.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Seconds a test waits for a result (an htex pool takes a few to come up).
RESULT_TIMEOUT = 90


def make_lock() -> Any:
    import threading

    return threading.Lock()


def big_text(size: int) -> str:
    return "x" * size


def kill_own_worker() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def square(x: int) -> int:
    return x * x


@pytest.fixture(scope="module")
def strict_endpoint(fabric: Fabric) -> Iterator[Endpoint]:
    """An endpoint that takes JSON tasks only and sends back results of 4 KiB at most."""
    ep = fabric.configure_endpoint(f"strict-{uuid.uuid4().hex[:8]}", result_size_limit=4096,
                                   allowed_serializers=frozenset({"json"}))
    ep.start()
    yield ep
    ep.stop_all()


@pytest.fixture
def htex_endpoint(fabric: Fabric) -> Iterator[Endpoint]:
    """An htex endpoint that gives a task up the first time it loses its worker."""
    pytest.importorskip("parsl", reason="the htex engine needs Parsl (pip install parsl)")
    from gc_agent.providers import LocalProviderConfig

    ep = fabric.configure_endpoint(f"htex-{uuid.uuid4().hex[:8]}", heartbeat_period=1.0)
    engine = HtexEngineConfig(
        type="htex", max_workers_per_node=1, max_retries_on_system_failure=0,
        heartbeat_period=1,
        provider=LocalProviderConfig(init_blocks=1, min_blocks=1, max_blocks=1,
                                     worker_init=f"export PYTHONPATH={REPO_ROOT}"))
    path = ep.directory / "config.yaml"
    save_config(load_config(path).model_copy(update={"engine": engine}), path)
    ep.start()
    yield ep
    ep.stop_all()


def test_a_task_that_kills_its_worker_raises_worker_lost(client: Client,
                                                         htex_endpoint: Endpoint) -> None:
    with Executor(endpoint_id=htex_endpoint.endpoint_id, client=client) as ex:
        future = ex.submit(kill_own_worker)
        with pytest.raises(WorkerLost) as caught:
            future.result(timeout=RESULT_TIMEOUT)

    assert caught.value.task_id == future.task_id
    assert caught.value.remote_type == "WorkerLost"
    assert "lost with its worker" in caught.value.remote_message
    assert not isinstance(caught.value, TaskExecutionFailed)


def test_a_task_addressed_to_another_endpoint_raises_policy_error(
        client: Client, endpoint: Endpoint) -> None:
    # Given a task that names another endpoint, routed to this one's queue
    task = make_task(endpoint_id=f"elsewhere-{uuid.uuid4().hex[:8]}", function_id="fn-none",
                     user=client.settings.user, task_group_id=str(uuid.uuid4()),
                     serializer=JSON, args=(), kwargs={})
    _publish(client, endpoint.endpoint_id, task)

    # When its result reaches the ledger, Then the refusal comes back as a PolicyError
    eventually(lambda: client.get_task(task.task_id).status == "failed", 60, "the refusal")
    with pytest.raises(PolicyError, match="not to this one") as caught:
        client.get_result(task.task_id)
    assert caught.value.task_id == task.task_id and caught.value.remote_type == "PolicyError"


def _publish(client: Client, endpoint_id: str, task: TaskMessage) -> None:
    session = client.broker_session("forger")
    session.start()
    confirmed = threading.Event()
    try:
        session.publish(client.topology.exchange("tasks"),
                        client.topology.routing_key("task", endpoint_id=endpoint_id),
                        encode_task(task), on_confirm=lambda _reason: confirmed.set(),
                        mandatory=True)
        assert confirmed.wait(30), "the broker did not confirm the task"
    finally:
        session.close()


def test_a_serializer_the_endpoint_does_not_allow_raises_serializer_not_allowed(
        client: Client, strict_endpoint: Endpoint) -> None:
    with Executor(endpoint_id=strict_endpoint.endpoint_id, client=client) as ex, \
            pytest.raises(SerializerNotAllowed, match="is not allowed here") as caught:
        ex.submit(square, 3).result(timeout=60)

    assert isinstance(caught.value, SerializationError)
    assert caught.value.remote_type == "SerializerNotAllowed"


def test_a_result_over_the_size_limit_raises_result_too_large(client: Client,
                                                              strict_endpoint: Endpoint) -> None:
    with Executor(endpoint_id=strict_endpoint.endpoint_id, client=client,
                  serializer="json") as ex, \
            pytest.raises(ResultTooLarge, match="result_size_limit") as caught:
        ex.submit(big_text, 10_000).result(timeout=60)

    assert isinstance(caught.value, TaskError) and caught.value.remote_type == "ResultTooLarge"


def test_a_result_that_cannot_be_pickled_says_so_and_what_to_do(client: Client,
                                                                endpoint: Endpoint) -> None:
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        future = ex.submit(make_lock)
        with pytest.raises(ResultNotSerializable) as caught:
            future.result(timeout=60)

    message = caught.value.remote_message
    assert f"the result of task {future.task_id}" in message and "_thread.lock" in message
    assert "cloudpickle" in message and "return plain data" in message
    assert isinstance(caught.value, SerializationError)
    # and the ledger's copy says the same
    eventually(lambda: client.get_task(future.task_id).status == "failed", 60, "the ledger")
    with pytest.raises(ResultNotSerializable):
        client.get_result(future.task_id)


def test_get_result_of_a_task_id_nobody_submitted_raises_task_not_found(client: Client) -> None:
    task_id = str(uuid.uuid4())

    with pytest.raises(TaskNotFound, match=task_id) as caught:
        client.get_result(task_id, unknown_grace=0.5)

    assert caught.value.task_id == task_id
    assert not isinstance(caught.value, TaskPending)
    batch = client.get_batch_result([task_id], unknown_grace=0.5)
    assert batch[task_id]["pending"] is False
    assert isinstance(batch[task_id]["exception"], TaskNotFound)


def test_a_just_submitted_task_is_pending_not_missing(client: Client, make_endpoint: Any) -> None:
    idle = make_endpoint()  # configured, not started: the task waits in its queue
    task_id = client.run(1, endpoint_id=idle.endpoint_id,
                         function_id=client.register_function(square))

    with pytest.raises(TaskPending):
        client.get_result(task_id)


def test_gc_client_result_wait_of_an_unknown_task_id_exits_saying_so(fabric: Fabric) -> None:
    task_id = str(uuid.uuid4())

    done = fabric.cli("gc-client", "result", task_id, "--wait", "--timeout", "600", check=False)

    assert done.returncode != 0
    assert task_id in done.stderr and "no task" in done.stderr
    assert "Traceback" not in done.stderr
