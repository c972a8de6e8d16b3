"""The endpoint as a sysadmin runs it: status, restart, logs, config, delete, systemd."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml

from gc_client import Client, Executor
from tests.fabric import Endpoint, Fabric, eventually


def triple(x: int) -> int:
    import time

    time.sleep(0.003)
    return 3 * x



def test_status_shows_pid_uptime_broker_queue_and_tasks(fabric: Fabric, client: Client,
                                                        make_endpoint: Any) -> None:
    ep: Endpoint = make_endpoint(heartbeat_period=0.3)
    assert "agent:      stopped" in fabric.cli("gc-agent", "status", ep.name).stdout
    fabric.cli("gc-agent", "start", ep.name, "--detach")
    try:
        with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
            assert ex.submit(triple, 2).result(timeout=60) == 6
        out = eventually(lambda: (o := fabric.cli("gc-agent", "status", ep.name).stdout)
                         and "1 succeeded" in o and o)
        assert "running, pid" in out and "uptime:" in out
        assert "connected (amqp://guest:***@" in out and "2 workers" in out
        assert "tasks waiting" in out
    finally:
        fabric.cli("gc-agent", "stop", ep.name)


def test_restart_keeps_the_id_serves_at_once_and_loses_no_task(fabric: Fabric, client: Client,
                                                                make_endpoint: Any) -> None:
    ep: Endpoint = make_endpoint()
    fabric.cli("gc-agent", "start", ep.name, "--detach")
    try:
        with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
            futures = [ex.submit(triple, x) for x in range(400)]
            eventually(lambda: sum(f.done() for f in futures) >= 50)
            out = fabric.cli("gc-agent", "restart", ep.name).stdout
            assert "restarted" in out
            assert [f.result(timeout=120) for f in futures] == [3 * x for x in range(400)]
            assert ex.submit(triple, 1).result(timeout=60) == 3
        listing = fabric.cli("gc-agent", "list").stdout
        assert any(ep.endpoint_id in line and "running" in line for line in listing.splitlines())
    finally:
        fabric.cli("gc-agent", "stop", ep.name)


def test_render_config_logs_and_delete(fabric: Fabric, make_endpoint: Any) -> None:
    ep: Endpoint = make_endpoint(engine="threads", workers=3)
    effective = yaml.safe_load(fabric.cli("gc-agent", "render-config", ep.name).stdout)
    assert (effective["engine"]["type"], effective["engine"]["max_workers"]) == ("threads", 3)
    assert effective["drain_timeout"] == 30.0 and effective["output_limit"] == 16384
    assert "***" in effective["broker_url"] and effective["endpoint_id"] == ep.endpoint_id
    fabric.cli("gc-agent", "start", ep.name, "--detach")
    fabric.cli("gc-agent", "stop", ep.name)
    log = fabric.cli("gc-agent", "logs", ep.name, "-n", "5").stdout
    assert "stopped" in log and ep.endpoint_id in log
    assert "deleted" in fabric.cli("gc-agent", "delete", ep.name, "--yes").stdout
    assert not ep.directory.exists()
    gone = fabric.cli("gc-agent", "status", ep.name, check=False)
    assert gone.returncode == 1 and "gc-agent configure" in gone.stderr


def test_a_stale_pid_file_is_reported_and_replaced(fabric: Fabric, make_endpoint: Any) -> None:
    ep: Endpoint = make_endpoint()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (ep.directory / "agent.pid").write_text(str(dead.pid))
    done = fabric.cli("gc-agent", "start", ep.name, "--detach")
    try:
        assert "stale pid file" in done.stderr and "started, pid" in done.stdout
    finally:
        fabric.cli("gc-agent", "stop", ep.name)


def test_an_unreachable_broker_is_named_in_the_error(fabric: Fabric, make_endpoint: Any) -> None:
    ep: Endpoint = make_endpoint(connect_timeout=2.0)
    env = {**fabric.env, "GC_BROKER_URL": "amqp://guest:secret@127.0.0.1:1/%2F"}
    done = subprocess.run([str(Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin" / "gc-agent"),
                           "start", ep.name], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "cannot reach the broker at amqp://guest:***@127.0.0.1:1/%2F" in done.stderr
    assert "secret" not in done.stderr


def test_an_idle_agent_stops_by_itself_when_configured(make_endpoint: Any) -> None:
    ep: Endpoint = make_endpoint(heartbeat_period=0.2, idle_heartbeats=3)
    process = ep.start()
    assert process.wait(30) == 0
    assert "idle for 3 heartbeats" in ep.read_logs()


def test_enable_on_boot_writes_a_unit_systemd_accepts_and_its_exec_start_runs(
        fabric: Fabric, make_endpoint: Any, tmp_path: Path) -> None:
    ep: Endpoint = make_endpoint()
    units, envs = tmp_path / "units", tmp_path / "env"
    out = fabric.cli("gc-agent", "enable-on-boot", ep.name, "--unit-dir", str(units),
                     "--env-dir", str(envs)).stdout
    assert f"the unit is {units}/gc-agent@.service" in out
    unit = (units / "gc-agent@.service").read_text()
    assert "Restart=always" in unit and f"EnvironmentFile={envs}/agent-%i.env" in unit
    env_file = envs / f"agent-{ep.name}.env"
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    # systemd-analyze verifies an instance of the template
    instance = units / f"gc-agent@{ep.name}.service"
    instance.write_text(unit)
    verify = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True,
                            text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    # and the unit's ExecStart line, with %i and its EnvironmentFile, starts a working agent
    exec_start = next(line.split("=", 1)[1] for line in unit.splitlines()
                      if line.startswith("ExecStart="))
    settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert settings["GC_HOME"] == str(fabric.home)
    agent = subprocess.Popen(shlex.split(exec_start.replace("%i", ep.name)),
                             env={"PATH": os.environ["PATH"], **settings},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        eventually((ep.directory / "agent.pid").exists, 60)
    finally:
        agent.terminate()
        assert agent.wait(60) == 0
    out = fabric.cli("gc-agent", "disable-on-boot", ep.name, "--unit-dir", str(units),
                     "--env-dir", str(envs)).stdout
    assert "disabled" in out and not env_file.exists()
