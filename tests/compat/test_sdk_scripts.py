"""Programs written for Globus Compute's SDK, with only their import line changed, run
against the session's fabric (a real broker, registry and agent).

Each script in ``scripts/`` is tutorial-style SDK code; it runs as its own process, as a
user would run it, and prints what it got back.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.fabric import Endpoint, Fabric, free_port

SCRIPTS = Path(__file__).parent / "scripts"
#: Seconds one script may take.
SCRIPT_TIMEOUT = 180


def run_script(fabric: Fabric, endpoint: Endpoint | None, name: str, *args: str,
               **environment: str) -> str:
    """Run ``scripts/name`` with the fabric's settings; its standard output."""
    env = {**fabric.env, **environment}
    if endpoint is not None:
        env["ENDPOINT_ID"] = endpoint.endpoint_id
    done = subprocess.run([sys.executable, str(SCRIPTS / name), *args], env=env,
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT, check=False)
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def lines(output: str) -> list[str]:
    return output.strip().splitlines()


def test_hello_world(fabric: Fabric, endpoint: Endpoint) -> None:
    assert lines(run_script(fabric, endpoint, "hello_world.py"))[-1] == "Hello World!"


def test_a_parameter_sweep_with_as_completed_and_map(fabric: Fabric, endpoint: Endpoint) -> None:
    out = run_script(fabric, endpoint, "parameter_sweep.py")
    assert "radius 3: area 28.274" in out
    assert "squares: [0, 1, 4, 9, 16]" in out


def test_client_register_run_and_poll(fabric: Fabric, endpoint: Endpoint) -> None:
    assert lines(run_script(fabric, endpoint, "client_run.py")) == [
        "Hello Bob Smith", "status: success", "Hello Ada Lovelace"]


def test_a_batch_and_its_batch_result(fabric: Fabric, endpoint: Endpoint) -> None:
    assert lines(run_script(fabric, endpoint, "batch.py")) == [
        "task group: True", "endpoint: True",
        "results: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]", "completion times: True"]


def test_shell_functions(fabric: Fabric, endpoint: Endpoint) -> None:
    out = lines(run_script(fabric, endpoint, "shell_function.py"))
    assert out[:3] == ["hello from the shell 0", "ls failed: True True", "walltime: 124"]
    assert "'returncode': 0" in out[3] and "'stdout': 'two\\nthree" in out[3]


def test_an_mpi_function(fabric: Fabric, endpoint: Endpoint) -> None:
    out = lines(run_script(fabric, endpoint, "mpi_function.py"))
    assert out[0] == "ranks: 3"
    assert out[1].startswith("command: mpiexec -n 3 ")


def test_reload_tasks_from_another_process(fabric: Fabric, endpoint: Endpoint) -> None:
    group = lines(run_script(fabric, endpoint, "reload_tasks.py", "submit"))[-1]
    assert lines(run_script(fabric, endpoint, "reload_tasks.py", "collect", group)) == [
        "reloaded: 6", "values: [0, 2, 4, 6, 8, 10]"]


def test_two_executors_share_a_task_group(fabric: Fabric, endpoint: Endpoint) -> None:
    assert lines(run_script(fabric, endpoint, "task_group.py")) == [
        "done: a done: b", "same group: True", "done: c",
        "group holds: ['done: a', 'done: b', 'done: c']"]


def test_endpoint_list_status_and_metadata(fabric: Fabric, endpoint: Endpoint) -> None:
    assert lines(run_script(fabric, endpoint, "endpoint_info.py")) == [
        "listed: 1 True", "status: online", "workers: 2 True", "host: True True"]


def test_worker_hardware_details(fabric: Fabric, endpoint: Endpoint) -> None:
    out = lines(run_script(fabric, endpoint, "hardware.py"))
    assert out == [f"Compute Endpoint worker on {socket.gethostname()}", "has cpus: True",
                   f"client report: Compute Endpoint worker on {socket.gethostname()}"]


def test_a_remote_exception(fabric: Fabric, endpoint: Endpoint) -> None:
    assert lines(run_script(fabric, endpoint, "remote_errors.py")) == [
        "0.25", "failed with: ZeroDivisionError", "traceback names the function: True"]


def test_deleting_a_function_and_an_endpoint(fabric: Fabric) -> None:
    scratch = fabric.configure_endpoint(f"scratch-{uuid.uuid4().hex[:8]}")
    out = lines(run_script(fabric, None, "cleanup.py", SCRATCH_ENDPOINT_NAME=scratch.name))
    assert out == ["deleted function: True", "registered again: True",
                   f"deleted endpoint {scratch.name}", "left: []"]


def test_amqp_port_reaches_the_broker_on_that_port(fabric: Fabric, endpoint: Endpoint) -> None:
    # Given a broker URL whose port nothing listens on
    closed = free_port()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", closed), timeout=2):
        pass
    parts = urlsplit(fabric.broker_url)
    wrong = urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.port}", f":{closed}")))
    # When the script names the broker's real port as amqp_port, its tasks still run.
    out = run_script(fabric, endpoint, "amqp_port.py", GC_BROKER_URL=wrong,
                     AMQP_PORT=str(parts.port))
    assert lines(out) == ["ran on: True"]


def test_version_check(fabric: Fabric) -> None:
    assert lines(run_script(fabric, None, "version_check.py")) == [
        "version check passed", "old endpoint refused: VersionMismatch"]
