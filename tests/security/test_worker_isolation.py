"""Task code against the agent that runs it: credentials, log, session, slot threads, accounts.

A task runs code its submitter wrote. On a single-user endpoint that may be a co-user the
owner allowed; on a multi-user endpoint it is any mapped user. Each test is the attack: what
task code tries from inside its worker, and what the agent and the next task still get.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from gc_agent.engines.processes import Account, ProcessEngine, WorkerLaunch
from gc_agent.execution import Job, Outcome
from gc_agent.multiuser.mapping import (
    DEFAULT_UID_MIN,
    lookup_account,
    parse_uid_min,
    privilege_refusal,
)
from gc_agent.multiuser.remote import RemoteEngine
from gc_agent.wire import outcome_to_wire
from gc_client import Client, Executor
from gc_core.errors import PolicyError, WorkerError
from gc_core.registry import store
from gc_core.registry_api.schemas import EndpointPolicy
from gc_core.serialize import CLOUDPICKLE, PYTHON_VERSION
from tests.fabric import Endpoint, Fabric, eventually
from tests.integration.test_multiuser import (  # noqa: F401 (fixtures, used by name)
    _client,
    accounts,
    multi_user_endpoint,
)
from tests.secured_broker import Secured, SecuredFabric

# -- task code: what an attacker runs inside a worker -----------------------------------


def grab_the_agents_secrets(canary: str) -> dict[str, Any]:
    """Read every place the agent's credentials could be, and write into the agent's log."""
    import os
    import sys

    print(f"{canary} printed")
    os.write(1, f"{canary} on descriptor 1\n".encode())
    os.write(2, f"{canary} on descriptor 2\n".encode())
    for stream in (sys.__stdout__, sys.__stderr__):  # the streams the worker started with
        if stream is not None:
            stream.write(f"{canary} on the original stream\n")
            stream.flush()
    with open("/proc/self/environ", "rb") as environ:
        proc_environ = environ.read().decode(errors="replace")
    return {"environ": dict(os.environ), "proc_environ": proc_environ}


def garble_the_workers_socket(attack: str) -> str:
    """Write to the socket the worker answers the agent on, as task code can."""
    import os
    import struct
    import sys

    socket_fd = int(sys.argv[1])  # `python -m gc_agent.engines.worker FD`
    garbage = {
        # a well-framed answer nested too deep for any JSON decoder
        "deep": struct.pack("!i", 5000) + b"[" * 5000,
        # a frame whose length prefix claims far more than any result can be
        "huge": struct.pack("!i", 2**31 - 1) + b"{",
        # raw bytes with no framing at all: their first four bytes read as a length
        "raw": b"[" * 5000,
    }[attack]
    os.write(socket_fd, garbage)
    return "the agent took our garbage for an answer"


def add(x: int, y: int) -> int:
    return x + y


def describe_session(canary: str) -> dict[str, Any]:
    """Where a multi-user worker's output goes, and whose session it is in."""
    import os

    os.write(1, f"{canary} on descriptor 1\n".encode())
    os.write(2, f"{canary} on descriptor 2\n".encode())
    return {"sid": os.getsid(0), "pgid": os.getpgid(0),
            "stdout": os.readlink("/proc/self/fd/1"), "stderr": os.readlink("/proc/self/fd/2")}


# -- item 7: a co-user's task never sees the agent's credentials or log ------------------


@pytest.fixture
def alices_shared_endpoint(secured: Secured) -> Iterator[tuple[Endpoint, str]]:
    """alice's single-user process endpoint, which she lets bob use; its agent was started
    from alice's shell, whose environment holds her token and a broker URL with the agent's
    password. Yields the endpoint and its agent token."""
    alice = secured.fabric("alice", f"alice-{uuid.uuid4().hex[:6]}")
    endpoint = alice.configure_endpoint("shared-laptop", engine="processes", workers=1,
                                        broker_url=secured.node.url)
    agent_token = (endpoint.directory / "agent.token").read_text().strip()
    with secured.sessions() as db:
        store.set_endpoint_policy(db, endpoint.endpoint_id, EndpointPolicy(allowed_users=["bob"]))
    shell = SecuredFabric(
        broker_url=secured.node.url_for(f"endpoint-{endpoint.endpoint_id}", agent_token),
        registry_url=secured.registry_url, home=alice.home, vhost="/", user="alice",
        token=secured.tokens["alice"])
    started = Endpoint(shell, endpoint.name, endpoint.endpoint_id)
    started.start()
    try:
        yield started, agent_token
    finally:
        started.stop_all()


def test_a_co_users_task_sees_no_credential_of_the_agent_and_cannot_write_its_log(
        secured: Secured, alices_shared_endpoint: tuple[Endpoint, str]) -> None:
    endpoint, agent_token = alices_shared_endpoint
    canary = f"canary-{uuid.uuid4().hex}"
    # When bob, whom alice allowed, runs code that looks for secrets and writes to fds 1 and 2
    with secured.client("bob") as client, \
            Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        future = ex.submit(grab_the_agents_secrets, canary)
        seen = future.result(timeout=60)
        # Then the service still works for him
        assert ex.submit(add, 2, 3).result(timeout=60) == 5
    # and nothing he saw holds alice's token or the agent's, nor any of the fabric's settings
    everything = repr(seen)
    assert secured.tokens["alice"] not in everything
    assert agent_token not in everything
    assert not [name for name in seen["environ"] if name.startswith("GC_")]
    assert "GC_" not in seen["proc_environ"]
    # and not one of his writes reached the agent's log
    assert canary not in endpoint.read_logs()
    # while his output still comes back to him, on his own future
    assert f"{canary} printed" in future.stdout
    assert f"{canary} on descriptor 1" in future.stdout
    assert f"{canary} on descriptor 2" in future.stderr


# -- item 5, worker side: nothing a task writes to its socket kills a slot ---------------


def _heartbeat_workers(client: Client, endpoint_id: str) -> tuple[Any, Any] | None:
    status = client.get_endpoint_status(endpoint_id)
    if status.status != "online":
        return None
    return status.details.get("workers"), status.details.get("workers_busy")


def test_garbage_a_task_writes_to_its_workers_socket_costs_that_task_not_the_slot(
        client: Client, make_endpoint: Any) -> None:
    # Given an endpoint with one slot, so every task runs in the slot attacked
    endpoint: Endpoint = make_endpoint(workers=1, heartbeat_period=0.5)
    endpoint.start()
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        for attack in ("deep", "huge", "raw"):
            # When task code writes garbage to the socket its worker answers on
            with pytest.raises(WorkerError) as failed:
                ex.submit(garble_the_workers_socket, attack).result(timeout=60)
            # Then that task fails, saying its worker broke the protocol
            assert failed.value.remote_type == "WorkerError", attack
            assert "malformed outcome" in failed.value.remote_message, attack
        # and the same slot, with a fresh worker, runs the next task
        assert ex.submit(add, 20, 22).result(timeout=60) == 42
    # and the heartbeat says the one worker is there and idle
    eventually(lambda: _heartbeat_workers(client, endpoint.endpoint_id) == (1, 0), 30,
               "the heartbeat to report one idle worker")
    assert "Traceback" not in endpoint.read_logs()


def _job(function: Callable[..., Any], *args: Any) -> Job:
    """A job as the agent builds it (cloudpickle, this Python)."""
    return Job(task_id=str(uuid.uuid4()), function_id="fn-1",
               function_payload=cloudpickle.dumps(function), function_python=PYTHON_VERSION,
               content_type=CLOUDPICKLE.content_type, payload=CLOUDPICKLE.dumps((args, {})),
               sender_python=PYTHON_VERSION, sender_serializer=CLOUDPICKLE.label)


def _run(engine: ProcessEngine, job: Job, timeout: float = 30) -> Outcome:
    done: list[Outcome] = []
    engine.submit(job, done.append)
    return eventually(lambda: done and done[0], timeout, f"an outcome for task {job.task_id}")


def crash_the_worker() -> None:
    import os

    os._exit(13)


def test_a_slot_whose_worker_cannot_be_restarted_fails_the_task_and_serves_on(
        tmp_path: Path) -> None:
    # Given a process engine whose worker Python is a launcher the test can break
    launcher = tmp_path / "python"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    launcher.chmod(0o755)
    engine = ProcessEngine(1, WorkerLaunch(python=str(launcher)))
    engine.start()
    try:
        # When the task kills its worker while no new worker can be started
        launcher.chmod(0o644)
        lost = _run(engine, _job(crash_the_worker))
        # Then the task is reported, and the slot is not left busy
        assert lost.state == "failed" and lost.error is not None
        assert engine.busy == 0
        # and the next task says why it cannot run, naming the cause
        refused = _run(engine, _job(add, 1, 2))
        assert refused.state == "failed" and refused.error is not None
        assert refused.error.type == "WorkerStartFailed"
        assert "Permission denied" in refused.error.message
        # and once workers can start again, the same slot runs tasks
        launcher.chmod(0o755)
        ran = _run(engine, _job(add, 1, 2))
        assert ran.state == "success" and CLOUDPICKLE.loads(ran.payload) == 3
        assert engine.busy == 0
    finally:
        engine.shutdown()


def test_a_user_engine_that_sends_garbage_loses_no_task_of_its_user(tmp_path: Path) -> None:
    # Given a user's engine process (here a stand-in, a real process) that answers each task
    # first with a line nested too deep for JSON, then with the task's real outcome
    outcome = json.loads(outcome_to_wire(Outcome("TASK", "success", CLOUDPICKLE.content_type,
                                                 CLOUDPICKLE.dumps(7))))
    fake = tmp_path / "python"
    fake.write_text(f"""#!{sys.executable}
import json, os, sys
channel = os.fdopen(int(sys.argv[3]), "r+b", buffering=0)
for line in channel:
    message = json.loads(line)
    if message["op"] == "submit":
        outcome = {outcome!r}
        outcome["task_id"] = message["job"]["task_id"]
        channel.write(b"[" * 5000 + b"\\n")
        channel.write(json.dumps({{"op": "outcome", "outcome": outcome}}).encode() + b"\\n")
    elif message["op"] == "shutdown":
        break
""")
    fake.chmod(0o755)
    from gc_agent.config import HtexEngineConfig

    engine = RemoteEngine(HtexEngineConfig(type="htex"), WorkerLaunch(python=str(fake)), name="stand-in")
    engine.start()
    try:
        # When root hands it a task
        done: list[Outcome] = []
        job = _job(add, 3, 4)
        engine.submit(job, done.append)
        # Then root's reader survives the garbage and delivers the task's outcome
        got = eventually(lambda: done and done[0], 30, "the task's outcome")
        assert got.state == "success" and CLOUDPICKLE.loads(got.payload) == 7
    finally:
        engine.shutdown()


# -- item 9: identity mapping refuses privileged accounts --------------------------------

ORDINARY = Account("alice", 1001, 1001, "/home/alice")


def test_an_ordinary_account_may_run_tasks() -> None:
    assert privilege_refusal(ORDINARY, {1001: "alice", 100: "users"}, uid_min=1000) is None


@pytest.mark.parametrize(("account", "groups", "reason"), [
    (Account("backup", 34, 34, "/var/backups"), {34: "backup"}, "system account"),
    (Account("alice", 1001, 0, "/home/alice"), {0: "root"}, "group 0"),
    (Account("alice", 1001, 1001, "/home/alice"), {1001: "alice", 0: ""}, "group 0"),
    (Account("alice", 1001, 1001, "/home/alice"), {1001: "alice", 27: "sudo"}, "'sudo'"),
    (Account("alice", 1001, 1001, "/home/alice"), {1001: "alice", 4: "adm"}, "'adm'"),
    (Account("alice", 1001, 1001, "/home/alice"), {1001: "alice", 998: "docker"}, "'docker'"),
    (Account("alice", 1001, 1001, "/home/alice"), {1001: "alice", 10: "wheel"}, "'wheel'"),
    (Account("alice", 1001, 1001, "/home/alice"), {1001: "alice", 42: "shadow"}, "'shadow'"),
    (Account("alice", 1001, 1001, "/home/alice"), {1001: "alice", 6: "disk"}, "'disk'"),
])
def test_system_accounts_and_members_of_privileged_groups_are_refused(
        account: Account, groups: dict[int, str], reason: str) -> None:
    refusal = privilege_refusal(account, groups, uid_min=1000)
    assert refusal is not None and reason in refusal


def test_an_account_the_admin_lists_may_run_tasks_despite_its_privileges() -> None:
    sysadmin = Account("ops", 1002, 1002, "/home/ops")
    assert privilege_refusal(sysadmin, {1002: "ops", 27: "sudo"}, uid_min=1000,
                             allowed={"ops"}) is None
    service = Account("svc", 500, 500, "/srv")
    assert privilege_refusal(service, {500: "svc"}, uid_min=1000, allowed={"svc"}) is None
    # and the list names accounts, not anyone in a listed account's groups
    assert privilege_refusal(service, {500: "svc"}, uid_min=1000, allowed={"ops"}) is not None


def test_root_is_refused_even_when_listed() -> None:
    root = Account("root", 0, 0, "/root")
    refusal = privilege_refusal(root, {0: "root"}, uid_min=1000, allowed={"root"})
    assert refusal is not None and "root" in refusal


@pytest.mark.parametrize(("text", "expected"), [
    ("UID_MIN\t\t\t 1000\nUID_MAX 60000\n", 1000),
    ("# UID_MIN 10\nUID_MIN 500\n", 500),
    ("UID_MAX 60000\n", DEFAULT_UID_MIN),
    ("UID_MIN lots\n", DEFAULT_UID_MIN),
    ("", DEFAULT_UID_MIN),
])
def test_uid_min_is_read_from_login_defs_with_a_safe_default(text: str, expected: int) -> None:
    assert parse_uid_min(text) == expected


@pytest.fixture(scope="module")
def local_accounts() -> Iterator[dict[str, str]]:
    """Real local accounts: a system one, one in group adm, an ordinary one."""
    if os.geteuid() != 0:
        pytest.skip("creating local accounts needs root")
    suffix = uuid.uuid4().hex[:6]
    names = {"system": f"gcs{suffix}", "adm": f"gcd{suffix}", "ordinary": f"gco{suffix}"}
    subprocess.run(["useradd", "--system", "--no-create-home", names["system"]], check=True)
    subprocess.run(["useradd", "--groups", "adm", names["adm"]], check=True)
    subprocess.run(["useradd", names["ordinary"]], check=True)
    try:
        yield names
    finally:
        for name in names.values():
            subprocess.run(["userdel", name], check=False, capture_output=True)


def test_real_system_and_adm_accounts_are_refused_unless_listed(
        local_accounts: dict[str, str]) -> None:
    with pytest.raises(PolicyError, match="system account") as system:
        lookup_account(local_accounts["system"], "svc@uni.edu")
    assert "allowed_privileged_accounts" in str(system.value)
    with pytest.raises(PolicyError, match="privileged group 'adm'"):
        lookup_account(local_accounts["adm"], "ops@uni.edu")
    listed = lookup_account(local_accounts["adm"], "ops@uni.edu",
                            allowed=frozenset({local_accounts["adm"]}))
    assert listed.name == local_accounts["adm"]
    assert lookup_account(local_accounts["ordinary"], "al@uni.edu").uid >= DEFAULT_UID_MIN


# -- item 9: multi-user workers get their own output and session -------------------------


def test_a_multi_user_worker_has_its_own_session_and_output(
        fabric: Fabric, multi_user_endpoint: Endpoint) -> None:  # noqa: F811 (a fixture)
    canary = f"canary-{uuid.uuid4().hex}"
    with _client(fabric, "alice@uni.edu") as client, \
            Executor(endpoint_id=multi_user_endpoint.endpoint_id, client=client) as ex:
        future = ex.submit(describe_session, canary)
        seen = future.result(timeout=120)
    agent_pid = multi_user_endpoint.processes[-1].pid
    # the worker leads a session of its own: no way back to root's terminal or process group
    assert seen["sid"] != os.getsid(agent_pid) and seen["sid"] == seen["pgid"]
    # its output is not root's log, and what it writes reaches its own task only
    assert os.readlink(f"/proc/{agent_pid}/fd/1") not in (seen["stdout"], seen["stderr"])
    assert canary not in multi_user_endpoint.read_logs()
    assert f"{canary} on descriptor 1" in future.stdout
    assert f"{canary} on descriptor 2" in future.stderr

