"""deploy/local-stack.sh as a newcomer meets it: ``up`` says which GC_HOME to export,
``down`` returns only once what it stopped has exited, and ``down --delete-endpoint`` (the
demo's, for the endpoint it made) leaves no queue behind on the broker.

The stack runs for real on a vhost of its own (a registry claims its vhost for its
database, so it cannot share the session's), with its registry on a free port.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest

from gc_core.topology import load_topology
from tests.conftest import BROKER_HOST, BROKER_PORT
from tests.fabric import free_port, fresh_vhost

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "local-stack.sh"


@pytest.fixture(scope="module")
def stack_vhost(vhost: str) -> Iterator[str]:  # `vhost`: the broker is there, or the run skips
    with fresh_vhost("gc-stack") as name:
        yield name


def _stack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, f"local-stack.sh {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie nobody reaped yet has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _queue_exists(broker_url: str, queue: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        connection.channel().queue_declare(queue, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as closed:
        assert closed.reply_code == 404, closed
        return False
    finally:
        if connection.is_open:
            connection.close()


def test_up_says_what_to_export_and_down_waits_for_what_it_stopped_and_deletes_queues(
        stack_vhost: str, tmp_path: Path) -> None:
    home = tmp_path / "stack"
    broker_url = f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{stack_vhost}"
    registry_url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "GC_HOME": str(home), "GC_REGISTRY_URL": registry_url,
           "GC_BROKER_URL": broker_url}
    try:
        # Given the stack up
        up = _stack(env, "up").stdout.splitlines()
        endpoint_id = up[-1]
        queues = [load_topology().queue(kind, endpoint_id=endpoint_id).name
                  for kind in ("endpoint_tasks", "endpoint_commands")]
        # Then it says what to export, right before the endpoint id
        assert up[-2].strip() == f"export GC_HOME={home} GC_REGISTRY_URL={registry_url}"
        registry_pid = int((home / "registry.pid").read_text())
        agent_pid = int((home / "endpoints" / "demo" / "agent.pid").read_text())
        assert _running(registry_pid) and _running(agent_pid)
        assert all(_queue_exists(broker_url, queue) for queue in queues)

        # When it goes down deleting its endpoint (as the demo does for the one it made)
        assert _queue_exists(broker_url, load_topology().queue("registry_database", database_id="").name)
        _stack(env, "down", "--delete-endpoint")
        # Then what it stopped is gone by the time `down` returns
        assert not _running(registry_pid) and not _running(agent_pid)
        # and so are the endpoint's queues on the broker, and its files
        assert not any(_queue_exists(broker_url, queue) for queue in queues)
        assert not (home / "endpoints" / "demo").exists()
        # and its throwaway database lets the vhost go, so that another stack may take it
        assert not _queue_exists(broker_url, load_topology().queue("registry_database", database_id="").name)
        assert _stack({**env, "GC_HOME": str(tmp_path / "another")}, "up").stdout
    finally:
        subprocess.run(["bash", str(SCRIPT), "down"],
                       env={**env, "GC_HOME": str(tmp_path / "another")}, capture_output=True,
                       timeout=240)
        subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True, timeout=240)
