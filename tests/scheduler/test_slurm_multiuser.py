"""A multi-user endpoint with the shipped Slurm template: each user's tasks run in Slurm jobs
that user submitted, from an htex engine process running as that user."""

from __future__ import annotations

import pwd
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("parsl", reason="the htex engine needs Parsl (pip install parsl)")

from gc_agent.config import IdentityRule, MultiUserConfig
from gc_client import Client, Executor
from tests.fabric import Fabric, eventually
from tests.integration.test_multiuser import USER_PYTHON, accounts  # noqa: F401 - a fixture
from tests.scheduler.conftest import Slurm

TEMPLATES = Path(__file__).resolve().parents[2] / "deploy" / "templates"
#: Seconds for the first result: the user's engine, its interchange and a block start first.
RESULT_TIMEOUT = 180


def who_and_where() -> dict[str, Any]:
    import os

    return {"uid": os.getuid(), "gid": os.getgid(), "home": os.environ.get("HOME"),
            "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
            "broker_url": os.environ.get("GC_BROKER_URL")}


def test_a_slurm_template_endpoint_runs_a_users_task_in_a_slurm_job_of_that_user(
        fabric: Fabric, slurm: Slurm, accounts: dict[str, pwd.struct_passwd]) -> None:  # noqa: F811
    # Given a multi-user endpoint whose users get the shipped Slurm template
    alice = accounts["alice"]
    ep = fabric.configure_endpoint(f"mu-slurm-{uuid.uuid4().hex[:6]}", multi_user=MultiUserConfig(
        identity_mapping=[IdentityRule(match=r"alice@uni\.edu", output=alice.pw_name)],
        user_config_template=TEMPLATES / "slurm.yaml.j2",
        user_config_schema=TEMPLATES / "slurm.schema.json", worker_python=USER_PYTHON,
        # The open stack cannot tell who sent a task: this one-person test box opts out.
        insecure_trust_claimed_identities=True),
        heartbeat_period=1.0)
    ep.start()
    try:
        # When alice runs a task there, asking for one block of one worker
        with Client(broker_url=fabric.broker_url, registry_url=fabric.registry_url,
                    home=str(fabric.home), identity="alice@uni.edu") as client, \
                Executor(endpoint_id=ep.endpoint_id, client=client, user_endpoint_config={
                    "partition": slurm.partition, "max_blocks": 1, "workers_per_node": 1}) as ex:
            seen = ex.submit(who_and_where).result(timeout=RESULT_TIMEOUT)
            # and the endpoint's status shows her engine's running block
            engines = eventually(lambda: _user_engines(client, ep.endpoint_id), 30,
                                 "a heartbeat with alice's engine")

        # Then it ran as alice, with her home, inside a Slurm job that is hers
        assert (seen["uid"], seen["gid"], seen["home"]) == (alice.pw_uid, alice.pw_gid, alice.pw_dir)
        assert seen["slurm_job"] and seen["broker_url"] is None
        job = subprocess.run(["scontrol", "show", "job", seen["slurm_job"]], capture_output=True,
                             text=True, check=True).stdout
        assert f"UserId={alice.pw_name}({alice.pw_uid})" in job
        # and the interchange that fed it, a descendant of the root agent, runs as alice
        interchanges = [uid for uid, args in _descendants(ep.processes[-1].pid)
                        if "interchange" in args.lower()]
        assert interchanges == [alice.pw_uid]
        assert [(e["account"], e["provider"]) for e in engines] == [(alice.pw_name, "slurm")]
    finally:
        # When the endpoint stops, alice's engine releases her block
        ep.stop_all()
    eventually(lambda: not _jobs_of(alice.pw_name), 60, f"{alice.pw_name}'s Slurm jobs to end")


def _jobs_of(user: str) -> list[str]:
    done = subprocess.run(["squeue", "-h", "-u", user, "-o", "%i"], capture_output=True, text=True,
                          check=True)
    return done.stdout.split()


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(uid, command line) of every process below ``pid``."""
    rows = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,uid=,args="], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    table = [(int(p), int(pp), int(uid), args) for p, pp, uid, args in
             (row.split(None, 3) for row in rows if len(row.split(None, 3)) == 4)]
    below, found = {pid}, []
    for _ in range(10):  # a few levels: agent, user engine, interchange
        for child, parent, uid, args in table:
            if parent in below and child not in below:
                below.add(child)
                found.append((uid, args))
    return found


def _user_engines(client: Client, endpoint_id: str) -> list[dict[str, Any]] | None:
    details = client.get_endpoint_status(endpoint_id).details or {}
    engines = (details.get("engine_status") or {}).get("user_engines") or []
    return engines if any(e.get("blocks_running") for e in engines) else None
