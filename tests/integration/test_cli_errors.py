"""Every command-line program turns an error into the same kind of line and exit status
(README, "Command line"): ``Error: <what happened>`` on stderr, never a traceback, and
1 for the fabric's errors, 2 for a failed task, 3 for a pending one, 130 when interrupted;
a closed pipe ends a command quietly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from tests.fabric import Endpoint, Fabric, free_port

#: Where the console scripts are.
BIN = Path(sys.executable).parent


def _run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / args[0]), *args[1:]], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command wrote to stderr (and that it wrote only that)."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


def _offline_env(home: Path) -> dict[str, str]:
    """A GC_HOME of its own, with a registry and a broker where nothing listens."""
    return {**os.environ, "GC_HOME": str(home),
            "GC_REGISTRY_URL": f"http://127.0.0.1:{free_port()}",
            "GC_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"}


def test_a_registry_that_is_down_is_one_line_and_exit_1_from_every_program(tmp_path: Path) -> None:
    env = _offline_env(tmp_path)
    url = env["GC_REGISTRY_URL"]
    for args in (("gc-client", "endpoints"), ("gc-client", "whoami"),
                 ("gc-agent", "configure", "offline")):
        done = _run(*args, env=env)

        assert done.returncode == 1, (args, done.stderr)
        assert _one_error_line(done).startswith(f"Error: cannot reach the registry at {url}: ")

    # gc-registry reaches no registry but is one: its database is what can be down.
    db_url = f"postgresql+psycopg://gc:s3cret@127.0.0.1:{free_port()}/registry"
    done = _run("gc-registry", "user", "list", "--db", db_url, env=env)

    assert done.returncode == 1, done.stderr
    line = _one_error_line(done)
    assert line.startswith("Error: cannot open the registry database at postgresql+psycopg://gc:***@")
    assert "s3cret" not in line


def test_a_corrupt_stored_login_is_one_line_and_exit_1_from_every_program(tmp_path: Path) -> None:
    env = _offline_env(tmp_path)
    (tmp_path / "credentials.json").write_text('{"token": "t0k", ')
    for args in (("gc-client", "endpoints"), ("gc-client", "whoami"), ("gc-client", "logout"),
                 ("gc-agent", "list"), ("gc-registry", "user", "list")):
        done = _run(*args, env=env)

        assert done.returncode == 1, (args, done.stderr)
        assert _one_error_line(done).startswith(
            f"Error: cannot read the stored login {tmp_path / 'credentials.json'} ")


def test_a_task_still_pending_exits_3_from_run_wait_and_from_result(
        fabric: Fabric, make_endpoint: Any, tmp_path: Path) -> None:
    # Given an endpoint whose agent is not running, so its tasks stay queued
    ep: Endpoint = make_endpoint()
    source = tmp_path / "science.py"
    source.write_text(textwrap.dedent("""
        def double(x):
            return 2 * x
    """))
    function_id = fabric.cli("gc-client", "register", f"{source}:double").stdout.strip()

    # When a run waits less than the task takes, and its result is asked for
    waited = fabric.cli("gc-client", "run", "--endpoint", ep.endpoint_id, "--function",
                        function_id, "3", "--wait", "--timeout", "1", check=False)
    task_id = fabric.cli("gc-client", "run", "--endpoint", ep.endpoint_id, "--function",
                         function_id, "4").stdout.strip()
    asked = fabric.cli("gc-client", "result", task_id, check=False)

    # Then both say the task is not finished, with the exit status of a pending task
    assert waited.returncode == 3, waited.stderr
    assert "is not finished (status: waiting)" in _one_error_line(waited)
    assert asked.returncode == 3, asked.stderr
    assert _one_error_line(asked) == f"Error: task {task_id} is not finished (status: waiting)"


#: Runs argv[1:] with SIGINT's default disposition, whatever this process's is.
INTERRUPTIBLE = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                 "os.execv(sys.argv[1], sys.argv[1:])")


def test_ctrl_c_ends_a_command_with_exit_130_and_no_traceback(fabric: Fabric,
                                                              make_endpoint: Any) -> None:
    ep: Endpoint = make_endpoint()
    (ep.directory / "agent.log").write_text("an old line\n")
    # (through a shim that lets SIGINT in again: a suite started in the background, as
    # `make test &` is, hands its children SIGINT ignored, and a terminal's Ctrl-C is the case)
    follow = subprocess.Popen([sys.executable, "-c", INTERRUPTIBLE, str(BIN / "gc-agent"), "logs",
                               ep.name, "-f"], env=fabric.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None and follow.stdout.readline() == "an old line\n"
        follow.send_signal(signal.SIGINT)
        _out, err = follow.communicate(timeout=30)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()

    assert follow.returncode == 130, err
    assert err == "Interrupted.\n"


def test_a_closed_pipe_ends_a_listing_quietly_with_exit_141(fabric: Fabric, endpoint: Endpoint,
                                                            tmp_path: Path) -> None:
    # `gc-agent list | head -0`: the reader is gone before the first line is written.
    for args, env in ((("gc-agent", "list"), _offline_env(tmp_path)),
                      (("gc-client", "endpoints"), fabric.env)):
        reader, writer = os.pipe()
        os.close(reader)
        try:
            done = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, stdout=writer,
                                  stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(writer)

        assert (done.returncode, done.stderr) == (141, ""), args
