"""Multi-user endpoints: tasks run under each submitter's own local account, never root."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gc_agent.config import IdentityRule, MultiUserConfig
from gc_client import Client, Executor
from gc_core.errors import ConfigError, PolicyError
from tests.fabric import Endpoint, Fabric

#: Debian's interpreter: user workers must run a Python every account can read.
USER_PYTHON = "/usr/bin/python3"

TEMPLATE = """\
type: processes
max_workers: {{ workers }}
"""
SCHEMA = {
    "type": "object",
    "properties": {"workers": {"type": "integer", "minimum": 1, "maximum": 2, "default": 1}},
    "additionalProperties": False,
}
#: The same, as a Globus Compute multi-user endpoint's template would have it.
GLOBUS_TEMPLATE = """\
engine:
  type: ProcessPoolEngine
  max_workers: {{ workers | default(1) }}
"""


def who_am_i() -> dict[str, Any]:
    import getpass
    import os

    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
            "groups": sorted(os.getgroups()), "user": getpass.getuser(),
            "home": os.environ.get("HOME"), "cwd": os.getcwd(),
            "env": sorted(os.environ)}


@pytest.fixture(scope="module")
def accounts() -> Iterator[dict[str, pwd.struct_passwd]]:
    if os.geteuid() != 0:
        pytest.skip("multi-user endpoints need root to create accounts and switch to them")
    if not Path(USER_PYTHON).exists():
        pytest.skip(f"{USER_PYTHON} is missing")
    suffix = uuid.uuid4().hex[:6]
    names = {"alice": f"gca{suffix}", "bob": f"gcb{suffix}"}
    for name in names.values():
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    try:
        probe = (f"PYTHONPATH={os.pathsep.join(_import_paths())} {USER_PYTHON} -c "
                 "'import gc_agent.engines.worker'")
        readable = subprocess.run(["su", names["alice"], "-s", "/bin/sh", "-c", probe],
                                  capture_output=True, text=True)
        if readable.returncode != 0:
            pytest.skip("this checkout or its virtualenv is not readable by other accounts, so "
                        f"user workers cannot import gc-fabric: {readable.stderr.strip()[-200:]}")
        yield {short: pwd.getpwnam(name) for short, name in names.items()}
    finally:
        for name in names.values():
            subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
            subprocess.run(["userdel", "--remove", name], capture_output=True)


def _import_paths() -> tuple[str, ...]:
    from gc_agent.engines.processes import WorkerLaunch

    return WorkerLaunch().import_paths


@contextmanager
def _started(fabric: Fabric, accounts: dict[str, pwd.struct_passwd], folder: Path,
             template: str, schema: dict[str, Any]) -> Iterator[Endpoint]:
    """A running multi-user endpoint whose users' engines ``template`` makes."""
    (folder / "user-config.yaml.j2").write_text(template)
    (folder / "user-config.schema.json").write_text(json.dumps(schema))
    suffix = accounts["alice"].pw_name[3:]
    multi_user = MultiUserConfig(
        identity_mapping=[IdentityRule(match=r"(alice|bob)@uni\.edu", output="gc{0[0]}" + suffix),
                          IdentityRule(match=r"(.*)@admin\.uni\.edu", output="{0}")],
        user_config_template=folder / "user-config.yaml.j2",
        user_config_schema=folder / "user-config.schema.json",
        worker_python=USER_PYTHON, user_idle_timeout=2.0,
        # The open stack cannot tell who sent a task: this one-person test box opts out.
        insecure_trust_claimed_identities=True)
    ep = fabric.configure_endpoint(f"mu-{uuid.uuid4().hex[:6]}", multi_user=multi_user)
    ep.start()
    try:
        yield ep
    finally:
        ep.stop_all()


@pytest.fixture(scope="module")
def multi_user_endpoint(fabric: Fabric, accounts: dict[str, pwd.struct_passwd],
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    with _started(fabric, accounts, tmp_path_factory.mktemp("multi-user"), TEMPLATE,
                  SCHEMA) as ep:
        yield ep


def _client(fabric: Fabric, identity: str) -> Client:
    return Client(broker_url=fabric.broker_url, registry_url=fabric.registry_url,
                  home=str(fabric.home), identity=identity)


def _run_as(fabric: Fabric, endpoint: Endpoint, identity: str, **options: Any) -> Any:
    with _client(fabric, identity) as client, \
            Executor(endpoint_id=endpoint.endpoint_id, client=client,
                     user_endpoint_config=options or None) as ex:
        return ex.submit(who_am_i).result(timeout=120)


def test_each_identity_runs_as_its_own_account_with_its_home(
        fabric: Fabric, multi_user_endpoint: Endpoint, accounts: dict[str, pwd.struct_passwd]) -> None:
    for short in ("alice", "bob"):
        account = accounts[short]
        seen = _run_as(fabric, multi_user_endpoint, f"{short}@uni.edu")
        assert (seen["uid"], seen["euid"], seen["gid"]) == (account.pw_uid, account.pw_uid,
                                                            account.pw_gid)
        assert seen["user"] == account.pw_name
        assert seen["home"] == seen["cwd"] == account.pw_dir
        assert 0 not in seen["groups"]
        # a clean environment: nothing of the root agent's (no broker URL, no GC_HOME)
        assert not {"GC_BROKER_URL", "GC_HOME", "GC_REGISTRY_URL"} & set(seen["env"])


def test_an_unmapped_identity_is_refused(fabric: Fabric, multi_user_endpoint: Endpoint) -> None:
    with pytest.raises(PolicyError) as caught:
        _run_as(fabric, multi_user_endpoint, "carol@elsewhere.org")
    assert caught.value.remote_type == "PolicyError"
    assert "no identity mapping rule matches" in caught.value.remote_message


def test_root_is_never_a_target(fabric: Fabric, multi_user_endpoint: Endpoint) -> None:
    with pytest.raises(PolicyError) as caught:
        _run_as(fabric, multi_user_endpoint, "root@admin.uni.edu")
    assert caught.value.remote_type == "PolicyError"
    assert "tasks never run as root" in caught.value.remote_message


def test_an_option_the_schema_rejects_is_refused_and_an_allowed_one_applies(
        fabric: Fabric, multi_user_endpoint: Endpoint, accounts: dict[str, pwd.struct_passwd]) -> None:
    with pytest.raises(PolicyError) as caught:
        _run_as(fabric, multi_user_endpoint, "alice@uni.edu", workers=5)
    assert "user_endpoint_config refused at workers" in caught.value.remote_message
    assert "maximum of 2" in caught.value.remote_message
    with pytest.raises(PolicyError) as unknown:
        _run_as(fabric, multi_user_endpoint, "alice@uni.edu", partition="gpu")
    assert "partition" in unknown.value.remote_message
    assert _run_as(fabric, multi_user_endpoint, "alice@uni.edu", workers=2)["uid"] == \
        accounts["alice"].pw_uid


def test_no_worker_of_a_multi_user_endpoint_runs_as_root(
        fabric: Fabric, multi_user_endpoint: Endpoint) -> None:
    _run_as(fabric, multi_user_endpoint, "bob@uni.edu")
    agent_pid = multi_user_endpoint.processes[-1].pid
    children = subprocess.run(["ps", "-o", "pid=,uid=,args=", "--ppid", str(agent_pid)],
                              capture_output=True, text=True).stdout.splitlines()
    workers = [line.split(None, 2) for line in children if "gc_agent.engines.worker" in line]
    assert workers, children
    assert all(int(uid) != 0 for _pid, uid, _args in workers)


def test_idle_user_workers_stop_and_restart_on_demand(
        fabric: Fabric, multi_user_endpoint: Endpoint, accounts: dict[str, pwd.struct_passwd]) -> None:
    import time

    _run_as(fabric, multi_user_endpoint, "alice@uni.edu")
    uid = accounts["alice"].pw_uid
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-u", str(uid), "-f", "gc_agent.engines.worker"],
                         capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "idle user workers were not stopped"
        time.sleep(0.2)
    assert _run_as(fabric, multi_user_endpoint, "alice@uni.edu")["uid"] == uid


def test_a_globus_compute_template_runs_each_task_as_its_submitter(
        fabric: Fabric, accounts: dict[str, pwd.struct_passwd],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    with _started(fabric, accounts, tmp_path_factory.mktemp("globus-template"),
                  GLOBUS_TEMPLATE, {"type": "object"}) as endpoint:
        seen = _run_as(fabric, endpoint, "alice@uni.edu", workers=2)

    assert (seen["uid"], seen["user"]) == (accounts["alice"].pw_uid, accounts["alice"].pw_name)


def test_a_template_failing_every_user_is_named_when_the_agent_starts(
        fabric: Fabric, accounts: dict[str, pwd.struct_passwd],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    broken = "idle_heartbeats_soft: 10\n" + GLOBUS_TEMPLATE
    with _started(fabric, accounts, tmp_path_factory.mktemp("broken-template"), broken,
                  {"type": "object"}) as endpoint:
        logged_at_start = endpoint.read_logs()
        with pytest.raises(ConfigError) as caught:
            _run_as(fabric, endpoint, "alice@uni.edu")

    assert "idle_heartbeats_soft" in logged_at_start
    assert "tried with the schema's defaults" in logged_at_start
    assert "idle_heartbeats_soft" in caught.value.remote_message
