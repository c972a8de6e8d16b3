"""Failure behaviour on the real broker: agents killed, poison tasks, forced disconnects."""

from __future__ import annotations

import re
import signal
import threading
from collections import Counter
from concurrent.futures import Future
from typing import Any

import pytest

from gc_client import Client, Executor, TaskDeadLettered
from gc_core.errors import WorkerError
from tests.fabric import Endpoint, eventually, rabbitmqctl


def triple(x: int) -> int:
    import time

    time.sleep(0.002)
    return 3 * x


def crash_the_worker() -> None:
    import os

    os._exit(13)


def _count_resolutions(futures: list[Future[Any]]) -> Counter[str]:
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    for future in futures:
        def note(f: Future[Any]) -> None:
            with lock:
                counts[f.task_id] += 1  # type: ignore[attr-defined]
        future.add_done_callback(note)
    return counts



def test_kill_9_of_the_agent_mid_sweep_loses_no_task(client: Client, make_endpoint: Any) -> None:
    # Given an agent running a 2,000-task sweep
    ep: Endpoint = make_endpoint()
    ep.start()
    with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
        futures = [ex.submit(triple, x) for x in range(2000)]
        resolutions = _count_resolutions(futures)
        eventually(lambda: sum(f.done() for f in futures) >= 300, 120, "300 results")
        # When it is killed with SIGKILL and a new agent takes over
        ep.kill(signal.SIGKILL)
        done_at_kill = sum(f.done() for f in futures)
        ep.start()
        # Then every future resolves, with the right value, exactly once
        values = [f.result(timeout=300) for f in futures]
    assert done_at_kill < 2000, "the sweep finished before the kill; the test proved nothing"
    assert values == [3 * x for x in range(2000)]
    assert set(resolutions.values()) == {1} and len(resolutions) == 2000
    # and the ledger, which commits asynchronously, ends up with the same picture
    eventually(lambda: {t.status for t in client.registry.list_group_tasks(ex.task_group_id)}
                == {"success"}, 60, "the ledger to record every result")
    assert len(client.registry.list_group_tasks(ex.task_group_id)) == 2000


def test_a_task_that_kills_its_worker_every_time_ends_dead_lettered(client: Client,
                                                                    make_endpoint: Any) -> None:
    ep: Endpoint = make_endpoint()
    ep.start()
    with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
        poison = ex.submit(crash_the_worker)
        with pytest.raises(TaskDeadLettered, match="delivery limit") as caught:
            poison.result(timeout=240)
        assert caught.value.task_id == poison.task_id
        # and the agent keeps serving
        assert ex.submit(triple, 5).result(timeout=60) == 15
    eventually(lambda: client.get_task(poison.task_id).status == "failed", 60, "the ledger")
    error = client.get_task(poison.task_id).error
    assert error is not None and error.type == "TaskDeadLettered"


def _connections_named(prefix: str, vhost: str) -> list[str]:
    """Broker pids of connections whose connection_name starts with ``prefix``."""
    out = rabbitmqctl("list_connections", "pid", "vhost", "client_properties")
    pids = []
    for line in out.splitlines():
        match = re.match(r"(<[^>]+>)\s+(\S+)\s+(.*)", line)
        if match and match.group(2) == vhost and \
                re.search(r'\{"connection_name","' + re.escape(prefix), match.group(3)):
            pids.append(match.group(1))
    return pids


def test_forced_connection_close_of_client_and_agent_recovers(client: Client, make_endpoint: Any,
                                                              vhost: str) -> None:
    ep: Endpoint = make_endpoint()
    ep.start()
    with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
        futures = [ex.submit(triple, x) for x in range(1500)]
        eventually(lambda: sum(f.done() for f in futures) >= 200, 120, "200 results")
        # When the broker closes both the agent's and the client's connections
        agent_conns = _connections_named(f"gc-agent:{ep.endpoint_id}", vhost)
        client_conns = _connections_named(f"gc-client:{client.settings.user}:{ex.task_group_id}",
                                          vhost)
        assert agent_conns and client_conns
        for pid in agent_conns + client_conns:
            rabbitmqctl("close_connection", pid, "test: forced close")
        # Then both reconnect and the sweep completes
        assert [f.result(timeout=300) for f in futures] == [3 * x for x in range(1500)]
        assert ex.submit(triple, 1).result(timeout=60) == 3
    assert _connections_named(f"gc-agent:{ep.endpoint_id}", vhost), "agent did not reconnect"


def test_sigterm_drains_the_agent_and_loses_nothing(client: Client, make_endpoint: Any) -> None:
    ep: Endpoint = make_endpoint()
    process = ep.start()
    with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
        futures = [ex.submit(triple, x) for x in range(600)]
        eventually(lambda: sum(f.done() for f in futures) >= 100, 120, "100 results")
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, ep.read_logs()
        assert "draining" in ep.read_logs()
        ep.start()
        assert [f.result(timeout=300) for f in futures] == [3 * x for x in range(600)]


def forge_an_outcome(marker: str) -> str:
    """Task code that writes a pickle to its worker's socket which, if the agent
    unpickled it, would create ``marker`` as the agent's user."""
    import os
    import sys
    from multiprocessing.connection import Connection

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return os.system, (f"touch {marker}",)

    Connection(int(sys.argv[1])).send(Payload())
    return "the agent read our answer instead"


def test_a_task_writing_to_its_workers_socket_cannot_run_code_in_the_agent(
        client: Client, make_endpoint: Any, tmp_path: Any) -> None:
    ep = make_endpoint(workers=1)
    ep.start()
    marker = tmp_path / "agent-ran-our-code"
    with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
        with pytest.raises(WorkerError, match="malformed outcome") as failed:
            ex.submit(forge_an_outcome, str(marker)).result(timeout=60)
        assert failed.value.remote_type == "WorkerError"
        assert ex.submit(triple, 3).result(timeout=60) == 9  # a fresh worker took the slot
    assert not marker.exists()
