"""Cancellation that really cancels, and captured output, on the real broker."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from gc_agent.config import load_config, save_config
from gc_client import Client, Executor, TaskExecutionFailed
from gc_core.errors import ResultTooLarge
from tests.fabric import Endpoint, Fabric, eventually, pid_alive, rabbitmqctl


def mark_and_sleep(marker: str, seconds: float) -> int:
    import os
    import time
    from pathlib import Path

    Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def chatty(lines: int) -> str:
    import sys

    for i in range(lines):
        print(f"line {i}")
    print("a warning", file=sys.stderr)
    return "done"


def chatty_failure() -> None:
    print("about to fail")
    raise ValueError("it failed")


def big_result(size: int) -> bytes:
    return b"x" * size



def test_cancelling_a_queued_task_means_it_never_runs(client: Client, make_endpoint: Any,
                                                      tmp_path: Path) -> None:
    # Given a task waiting in the queue of an endpoint whose agent is not running
    ep: Endpoint = make_endpoint()
    marker = tmp_path / "ran"
    with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
        future = ex.submit(mark_and_sleep, str(marker), 0)
        ex._wire.connected().wait_settled(30)
        # When it is cancelled, and the agent starts afterwards
        assert future.cancel() and future.cancelled()
        ep.start()
        # Then the ledger records it cancelled and it never ran
        eventually(lambda: client.get_task(future.task_id).status == "cancelled", 60, "cancelled")
        assert not marker.exists()
        assert ex.submit(mark_and_sleep, str(marker), 0).result(timeout=60) > 0  # agent serves


def test_cancelling_a_task_waiting_at_the_agent_removes_it(client: Client, make_endpoint: Any,
                                                            tmp_path: Path) -> None:
    # Given one worker busy, and a second task delivered to the agent, waiting behind it
    ep: Endpoint = make_endpoint(workers=1, heartbeat_period=0.3)
    ep.start()
    busy, waiting = tmp_path / "busy", tmp_path / "waiting"
    with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
        blocker = ex.submit(mark_and_sleep, str(busy), 5)
        eventually(busy.exists, 60, "the first task to start")
        queued = ex.submit(mark_and_sleep, str(waiting), 0)
        eventually(lambda: _received(ep) >= 2, 30, "the agent to take the second task")
        # When the waiting one is cancelled
        assert queued.cancel()
        # Then it is recorded cancelled before the running one even finishes, and never runs
        eventually(lambda: client.get_task(queued.task_id).status == "cancelled", 30,
                    "cancelled")
        assert not blocker.done()
        assert blocker.result(timeout=60) > 0
        assert not waiting.exists()
    error = client.get_task(queued.task_id).error
    assert error is not None and "before it started" in error.message


def _received(ep: Endpoint) -> int:
    """Tasks the agent has taken from its queue, from the status it records each heartbeat."""
    import json

    try:
        return int(json.loads((ep.directory / "status.json").read_text())["tasks_received"])
    except (OSError, ValueError, KeyError):
        return 0


def test_cancelling_a_running_task_stops_its_worker(client: Client, make_endpoint: Any,
                                                    tmp_path: Path) -> None:
    ep: Endpoint = make_endpoint(workers=1)
    ep.start()
    marker = tmp_path / "started"
    with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
        future = ex.submit(mark_and_sleep, str(marker), 120)
        eventually(marker.exists, 60, "the task to start")
        worker_pid = int(marker.read_text())
        cancelled_at = time.monotonic()
        assert future.cancel()
        eventually(lambda: client.get_task(future.task_id).status == "cancelled", 60, "cancelled")
        eventually(lambda: not pid_alive(worker_pid), 30, "the worker to be stopped")
        assert time.monotonic() - cancelled_at < 30
        # and a new worker takes the slot
        assert ex.submit(chatty, 0).result(timeout=60) == "done"
    error = client.get_task(future.task_id).error
    assert error is not None and error.type == "TaskCancelled" and "worker was stopped" in error.message


def test_shutdown_with_cancel_futures_cancels_at_the_endpoint(client: Client, make_endpoint: Any,
                                                              tmp_path: Path) -> None:
    ep: Endpoint = make_endpoint()
    ex = Executor(endpoint_id=ep.endpoint_id, client=client)
    futures = [ex.submit(mark_and_sleep, str(tmp_path / f"ran-{i}"), 0) for i in range(5)]
    ex._wire.connected().wait_settled(30)
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in futures)
    ep.start()
    for future in futures:
        eventually(lambda f=future: client.get_task(f.task_id).status == "cancelled", 60,
                    "cancelled")
    assert not list(tmp_path.glob("ran-*"))


def test_gc_client_cancel_stops_a_running_task(fabric: Fabric, client: Client, make_endpoint: Any,
                                               tmp_path: Path) -> None:
    ep: Endpoint = make_endpoint(workers=1)
    ep.start()
    marker = tmp_path / "started"
    task_id = client.run(str(marker), 120, endpoint_id=ep.endpoint_id,
                         function_id=client.register_function(mark_and_sleep))
    eventually(marker.exists, 60, "the task to start")
    eventually(lambda: client.get_task(task_id).status == "waiting", 30, "the ledger")
    out = fabric.cli("gc-client", "cancel", task_id)
    assert "cancel sent" in out.stdout
    eventually(lambda: client.get_task(task_id).status == "cancelled", 60, "cancelled")


def test_a_cancel_reaches_every_agent_of_an_endpoint_on_several_hosts(
        fabric: Fabric, client: Client, make_endpoint: Any, tmp_path: Path) -> None:
    # Given one endpoint served by two agents, as on two login nodes (the second host's
    # endpoint folder a copy of the first's), each running one task of the same user
    ep_a: Endpoint = make_endpoint(workers=1, prefetch=1)
    host_b = Fabric(fabric.broker_url, fabric.registry_url, tmp_path / "host-b", fabric.vhost)
    shutil.copytree(ep_a.directory, host_b.home / "endpoints" / ep_a.name)
    ep_b = Endpoint(host_b, ep_a.name, ep_a.endpoint_id)
    ep_a.start()
    ep_b.start()
    try:
        markers = [tmp_path / "first", tmp_path / "second"]
        with Executor(endpoint_id=ep_a.endpoint_id, client=client) as ex:
            futures = []
            for marker in markers:  # one at a time: the second goes to the idle agent
                futures.append(ex.submit(mark_and_sleep, str(marker), 120))
                eventually(marker.exists, 60, f"task {marker.name} to start")
            workers = [int(marker.read_text()) for marker in markers]
            # When the user cancels both in one command
            client.cancel([f.task_id for f in futures], endpoint_id=ep_a.endpoint_id)
            # Then both stop, whichever agent took the command off the endpoint's queue
            for future in futures:
                eventually(lambda f=future: client.get_task(f.task_id).status == "cancelled",
                           60, "each task cancelled")
            for worker in workers:
                eventually(lambda w=worker: not pid_alive(w), 30, "each worker to be stopped")
        # Each agent's own commands queue goes with it, however it ends
        assert len(_agent_command_queues(fabric, ep_a.endpoint_id)) == 2
        ep_b.kill(signal.SIGKILL)
        eventually(lambda: len(_agent_command_queues(fabric, ep_a.endpoint_id)) == 1, 30,
                   "the killed agent's own queue to go")
    finally:
        ep_b.stop_all()


def test_the_status_of_an_endpoint_on_several_hosts_counts_every_agent(
        fabric: Fabric, client: Client, make_endpoint: Any, tmp_path: Path) -> None:
    # Given one endpoint served by two agents, as on two login nodes, with 2 and 3 workers
    ep_a: Endpoint = make_endpoint(workers=2, heartbeat_period=1.0)
    host_b = Fabric(fabric.broker_url, fabric.registry_url, tmp_path / "host-b", fabric.vhost)
    shutil.copytree(ep_a.directory, host_b.home / "endpoints" / ep_a.name)
    config_b = host_b.home / "endpoints" / ep_a.name / "config.yaml"
    config = load_config(config_b)
    save_config(config.model_copy(update={"engine": config.engine.model_copy(
        update={"max_workers": 3})}), config_b)
    ep_b = Endpoint(host_b, ep_a.name, ep_a.endpoint_id)
    ep_a.start()
    ep_b.start()
    try:
        # Then the endpoint's status counts both agents' workers, not whichever beat last
        eventually(lambda: client.get_endpoint_status(ep_a.endpoint_id).details.get("workers") == 5,
                   30, "5 workers in all")
        details = client.get_endpoint_status(ep_a.endpoint_id).details
        assert sorted(agent["workers"] for agent in details["agents"]) == [2, 3]
        assert fabric.endpoint_status(ep_a.endpoint_id)["AGENTS"] == "2"
        # And an agent that is gone stops counting once its heartbeats are overdue
        ep_b.kill(signal.SIGKILL)
        eventually(lambda: client.get_endpoint_status(ep_a.endpoint_id).details.get("workers") == 2,
                   30, "the remaining agent's 2 workers")
        status = client.get_endpoint_status(ep_a.endpoint_id)
        assert status.status == "online" and len(status.details["agents"]) == 1
    finally:
        ep_b.stop_all()


def _agent_command_queues(fabric: Fabric, endpoint_id: str) -> list[str]:
    listed = rabbitmqctl("list_queues", "-q", "-p", fabric.vhost, "name").split()
    return [name for name in listed if name.startswith(f"gc.ep.{endpoint_id}.commands.")]


def test_stdout_and_stderr_are_captured_on_the_future_and_in_the_ledger(
        fabric: Fabric, client: Client, endpoint: Endpoint) -> None:
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        future = ex.submit(chatty, 3)
        assert future.result(timeout=60) == "done"
        assert future.stdout == "line 0\nline 1\nline 2\n"
        assert future.stderr == "a warning\n"
        failing = ex.submit(chatty_failure)
        with pytest.raises(TaskExecutionFailed):
            failing.result(timeout=60)
        assert failing.stdout == "about to fail\n"
    eventually(lambda: client.get_task(future.task_id).stdout, 30, "the ledger")
    out = fabric.cli("gc-client", "result", future.task_id, "--output")
    assert "line 2" in out.stderr and "a warning" in out.stderr and '"done"' in out.stdout


def test_output_beyond_the_limit_is_cut_and_marked(client: Client, endpoint: Endpoint) -> None:
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        future = ex.submit(chatty, 10_000)
        assert future.result(timeout=60) == "done"
    assert len(future.stdout.encode()) < 16_384 + 200
    assert "output truncated" in future.stdout and "output_limit" in future.stdout
    assert future.stdout.startswith("line 0\n")


def test_a_result_over_the_size_limit_is_refused_with_both_sizes(client: Client,
                                                                 make_endpoint: Any) -> None:
    ep: Endpoint = make_endpoint(result_size_limit=4096)
    ep.start()
    with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
        with pytest.raises(ResultTooLarge) as caught:
            ex.submit(big_result, 10_000).result(timeout=60)
        assert ex.submit(big_result, 100).result(timeout=60) == b"x" * 100
    assert caught.value.remote_type == "ResultTooLarge"
    assert "4,096" in caught.value.remote_message and "result_size_limit" in caught.value.remote_message


def test_a_result_too_large_even_for_the_workers_socket_is_refused_as_too_large(
        client: Client, endpoint: Endpoint) -> None:
    # 200 MiB: past the endpoint's limit, and past what a worker process may write back
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        with pytest.raises(ResultTooLarge) as caught:
            ex.submit(big_result, 200 * 2**20).result(timeout=120)
        assert ex.submit(big_result, 100).result(timeout=60) == b"x" * 100
    assert "result_size_limit" in caught.value.remote_message
    assert "209,715,2" in caught.value.remote_message  # its size, in bytes
