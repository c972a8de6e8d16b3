"""Client: run, batches, results and status from the ledger."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from gc_client import Client, TaskExecutionFailed, TaskPending
from tests.fabric import Endpoint, Fabric


def add(a: int, b: int = 0) -> int:
    return a + b


def fail() -> None:
    raise RuntimeError("remote failure")


def _eventually(check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (TaskPending, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_run_then_get_result_and_get_task(client: Client, endpoint: Endpoint) -> None:
    function_id = client.register_function(add)
    task_id = client.run(2, endpoint_id=endpoint.endpoint_id, function_id=function_id, b=40)
    assert _eventually(lambda: client.get_result(task_id)) == 42
    task = client.get_task(task_id)
    assert task.status == "success"
    assert task.endpoint_id == endpoint.endpoint_id
    assert task.timings.received <= task.timings.started <= task.timings.finished


def test_get_result_raises_task_pending_until_done(client: Client, make_endpoint: Any) -> None:
    idle = make_endpoint()  # configured, not started: the task waits in its queue
    task_id = client.run(1, endpoint_id=idle.endpoint_id, function_id=client.register_function(add))
    status = _eventually(lambda: _status_is(client, task_id, "waiting"))
    assert status == "waiting"
    with pytest.raises(TaskPending, match="waiting"):
        client.get_result(task_id)


def _status_is(client: Client, task_id: str, expected: str) -> str:
    status = client.get_task(task_id).status
    assert status == expected
    return status


def test_batch_run_and_get_batch_result(client: Client, endpoint: Endpoint) -> None:
    add_id, fail_id = client.register_function(add), client.register_function(fail)
    batch = client.create_batch()
    for i in range(5):
        batch.add(add_id, args=(i,), kwargs={"b": 100})
    batch.add(fail_id)
    task_ids = client.batch_run(endpoint.endpoint_id, batch)

    def all_done() -> dict[str, dict[str, Any]]:
        results = client.get_batch_result(task_ids)
        assert not any(r["pending"] for r in results.values())
        return results

    results = _eventually(all_done)
    assert [results[t]["result"] for t in task_ids[:5]] == [100, 101, 102, 103, 104]
    assert isinstance(results[task_ids[5]]["exception"], TaskExecutionFailed)
    assert results[task_ids[5]]["status"] == "failed"


def test_list_endpoints_and_status_from_heartbeats(client: Client, endpoint: Endpoint) -> None:
    assert endpoint.endpoint_id in {e.endpoint_id for e in client.list_endpoints()}
    status = _eventually(lambda: _online(client, endpoint.endpoint_id))
    assert status.details["workers"] == 2
    assert status.details["engine"] == "processes"


def _online(client: Client, endpoint_id: str) -> Any:
    status = client.get_endpoint_status(endpoint_id)
    assert status.status == "online"
    return status


def test_an_endpoint_that_stopped_goes_offline(client: Client, make_endpoint: Any) -> None:
    ep = make_endpoint(heartbeat_period=0.5)
    ep.start()
    _eventually(lambda: _online(client, ep.endpoint_id))
    ep.kill()
    time.sleep(2.0)
    assert client.get_endpoint_status(ep.endpoint_id).status == "offline"


def test_results_outlive_the_process_that_submitted_them(fabric: Fabric, endpoint: Endpoint,
                                                        client: Client) -> None:
    function_id = client.register_function(add)
    # Another process submits and exits at once; this one reads what the ledger kept.
    task_ids = [fabric.cli("gc-client", "run", "--endpoint", endpoint.endpoint_id,
                           "--function", function_id, str(n), "--kwargs", '{"b": 1}'
                           ).stdout.strip() for n in (1, 2)]
    with Client(broker_url=fabric.broker_url, registry_url=fabric.registry_url,
                home=str(fabric.home)) as later:
        assert _eventually(lambda: later.get_result(task_ids[0])) == 2
        batch = _eventually(lambda: _all_done(later.get_batch_result(task_ids)))
        assert [batch[t]["result"] for t in task_ids] == [2, 3]
        history = later.get_task(task_ids[1]).history
    assert [event.state for event in history] == ["waiting", "received", "running", "success"]
    times = [event.at for event in history]
    assert times == sorted(times)


def _all_done(batch: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    assert not any(entry["pending"] for entry in batch.values())
    return batch
