"""The console scripts, run as a user would run them."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import click
from click.testing import CliRunner

from gc_agent import cli as agent_cli
from gc_client import cli as client_cli
from gc_core.registry import cli as registry_cli
from tests.fabric import Endpoint, Fabric, eventually


def test_every_verb_has_help(fabric: Fabric) -> None:
    # One real process per program; the verbs' help is checked in-process (click renders
    # it the same way) to keep the suite fast.
    groups = {"gc-agent": agent_cli.main, "gc-client": client_cli.main,
              "gc-registry": registry_cli.main}
    for program, group in groups.items():
        assert "Usage:" in fabric.cli(program, "--help").stdout
        assert isinstance(group, click.Group)
        for verb in group.commands:
            done = CliRunner().invoke(group, [verb, "--help"])
            assert done.exit_code == 0 and "Usage:" in done.output, (program, verb)
            assert len(done.output.splitlines()) > 3, (program, verb)


def test_register_run_wait_and_result(fabric: Fabric, endpoint: Endpoint, tmp_path: Path) -> None:
    source = tmp_path / "science.py"
    source.write_text(textwrap.dedent("""
        def scale(values, factor=1):
            return [v * factor for v in values]
    """))
    function_id = fabric.cli("gc-client", "register", f"{source}:scale").stdout.strip()
    out = fabric.cli("gc-client", "run", "--endpoint", endpoint.endpoint_id, "--function",
                     function_id, "--kwargs", '{"factor": 10}', "[1, 2]", "--wait")
    assert json.loads(out.stdout) == [10, 20]
    task_id = fabric.cli("gc-client", "run", "--endpoint", endpoint.endpoint_id, "--function",
                         function_id, "[3]").stdout.strip()
    assert json.loads(fabric.cli("gc-client", "result", task_id, "--wait").stdout) == [3]


def test_a_remote_failure_is_one_clear_message_not_a_traceback(fabric: Fabric, endpoint: Endpoint,
                                                               tmp_path: Path) -> None:
    source = tmp_path / "broken.py"
    source.write_text("def explode():\n    raise KeyError('missing input')\n")
    function_id = fabric.cli("gc-client", "register", f"{source}:explode").stdout.strip()
    done = fabric.cli("gc-client", "run", "--endpoint", endpoint.endpoint_id, "--function",
                      function_id, "--wait", check=False)
    assert done.returncode == 2
    assert "KeyError: 'missing input'" in done.stderr
    assert "gc_client" not in done.stderr  # the remote traceback only, no local one


def test_bad_arguments_get_clear_errors(fabric: Fabric, tmp_path: Path) -> None:
    done = fabric.cli("gc-client", "register", "nofile.py:f", check=False)
    assert done.returncode == 2 and "no such file: nofile.py" in done.stderr
    done = fabric.cli("gc-client", "run", "--endpoint", "e", "--function", "f",
                      "--kwargs", "[1]", check=False)
    assert done.returncode == 2 and "--kwargs must be a JSON object" in done.stderr
    done = fabric.cli("gc-agent", "start", "never-configured", check=False)
    assert done.returncode == 1 and "gc-agent configure" in done.stderr


def test_configure_twice_and_stop_when_stopped_say_what_to_do(fabric: Fabric,
                                                              make_endpoint: Any) -> None:
    ep = make_endpoint()
    done = fabric.cli("gc-agent", "configure", ep.name, check=False)
    assert done.returncode == 1 and "already configured" in done.stderr
    done = fabric.cli("gc-agent", "stop", ep.name, check=False)
    assert done.returncode == 1 and "not running" in done.stderr


def test_start_detach_list_and_stop(fabric: Fabric, make_endpoint: Any) -> None:
    ep = make_endpoint()
    out = fabric.cli("gc-agent", "start", ep.name, "--detach").stdout
    assert "started, pid" in out
    listing = fabric.cli("gc-agent", "list").stdout
    assert any(line.startswith(ep.name) and ep.endpoint_id in line and "running" in line
               for line in listing.splitlines())
    again = fabric.cli("gc-agent", "start", ep.name, check=False)
    assert again.returncode == 1 and "already running" in again.stderr
    assert "stopped" in fabric.cli("gc-agent", "stop", ep.name).stdout
    assert f"{ep.name} " in fabric.cli("gc-agent", "list").stdout
    assert "stopped" in next(line for line in fabric.cli("gc-agent", "list").stdout.splitlines()
                             if line.startswith(ep.name))


def test_endpoints_lists_status_last_heartbeat_queue_and_workers(fabric: Fabric,
                                                                   endpoint: Endpoint) -> None:
    def row() -> list[str]:
        out = fabric.cli("gc-client", "endpoints").stdout
        return next(line.split() for line in out.splitlines()
                    if line.startswith(endpoint.endpoint_id))

    eventually(lambda: row()[1] == "online", timeout=30)
    _endpoint_id, status, seen, _ago, queued, busy, idle, name = row()
    assert (status, name) == ("online", "shared")
    assert seen.endswith("s") and queued.isdigit()
    assert int(busy) + int(idle) == 2  # the shared endpoint's two workers
