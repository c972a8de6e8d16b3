"""Diagnostics: every command line's --version and -h, each package's __version__, and
``gc-agent diagnose``'s archive — complete, and with no secret inside.

Secrets are planted where they really live: a broker user created with rabbitmqctl whose
password (with characters a URL must encode) is in the endpoint's config, real registry
tokens in the environment and in the agent's token file, other secrets in the environment,
and all of them in lines of the agent's log. Every member of every archive is searched for
each, as written and URL-encoded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import distribution
from pathlib import Path
from urllib.parse import quote

import pytest

import gc_agent
import gc_client
import gc_core
from gc_agent.config import load_config, save_config
from gc_core.registry import identity
from gc_core.registry.db import open_database
from tests.conftest import BROKER_HOST, BROKER_PORT
from tests.fabric import Fabric, free_port, rabbitmqctl

VERSION = distribution("gc-fabric").version
#: The console scripts the installed distribution declares (pyproject.toml's scripts).
SCRIPTS = sorted(entry.name for entry in distribution("gc-fabric").entry_points
                 if entry.group == "console_scripts")
#: What every archive holds.
MEMBERS = {"summary.txt", "versions.json", "config.yaml", "environment.json", "checks.json",
           "status.json", "agent.log"}


def _script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


# -- versions and help ----------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_every_command_line_tells_its_version_from_the_package_metadata(script: str) -> None:
    done = subprocess.run([_script(script), "--version"], capture_output=True, text=True)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{script} {VERSION} ")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_command_line_and_its_commands_take_dash_h_for_help(script: str) -> None:
    top = subprocess.run([_script(script), "-h"], capture_output=True, text=True)
    assert top.returncode == 0 and top.stdout.startswith(f"Usage: {script} "), top.stderr
    commands = top.stdout.split("Commands:", 1)[1].split()
    sub = subprocess.run([_script(script), commands[0], "-h"], capture_output=True, text=True)

    assert sub.returncode == 0 and f"Usage: {script} {commands[0]}" in sub.stdout, sub.stderr


def test_each_package_has_the_distributions_version() -> None:
    assert gc_core.__version__ == gc_agent.__version__ == gc_client.__version__ == VERSION


# -- gc-agent diagnose ------------------------------------------------------------------------

@dataclass
class Site:
    """A GC_HOME of its own with two endpoints and the secrets planted around them."""

    home: Path
    env: dict[str, str]
    secrets: list[str]
    log_marker: str
    missing_vhost: str

    def agent(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([_script("gc-agent"), *args], env=self.env, capture_output=True,
                              text=True, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"gc-agent {' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stdout}\n{done.stderr}")
        return done

    def diagnose(self, name: str) -> tuple[str, dict[str, str]]:
        """Run ``gc-agent diagnose NAME``; its output and the archive's members by name."""
        archive = self.home / f"{name}.tar.gz"
        done = self.agent("diagnose", name, "--output", str(archive), "--timeout", "10")
        with tarfile.open(archive) as opened:
            members = {Path(member.name).name: opened.extractfile(member).read().decode()  # type: ignore[union-attr]
                       for member in opened.getmembers()}
        return done.stdout, members


@pytest.fixture(scope="module")
def site(fabric: Fabric, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tag = uuid.uuid4().hex[:8]
    # A broker user whose password a URL must encode, with rights on the fabric's vhost.
    broker_user, password = f"gc-diag-{tag}", f"Pl4nted/{tag}+pw"
    rabbitmqctl("add_user", broker_user, password)
    rabbitmqctl("set_permissions", "-p", fabric.vhost, broker_user, ".*", ".*", ".*")
    broker_url = (f"amqp://{broker_user}:{quote(password, safe='')}@{BROKER_HOST}:{BROKER_PORT}/"
                  f"{fabric.vhost}")
    # A registry user with a real token (the agent's comes from `configure`, below).
    user = f"diag{tag}"
    with open_database(f"sqlite:///{fabric.home / 'registry.db'}")() as db:
        identity.create_user(db, user)
        user_token = identity.issue_token(db, user, label="diagnostics test").token
    home = tmp_path_factory.mktemp("diag-home")
    env = {**fabric.env, "GC_HOME": str(home), "GC_USER": user, "GC_TOKEN": user_token,
           "GC_BROKER_URL": broker_url,
           "GC_REGISTRY_BROKER_AUTH_SECRET": f"auth-secret-{tag}",
           "LAB_DATABASE_PASSWORD": f"db-password-{tag}"}
    site = Site(home, env, [password, quote(password, safe=""), user_token,
                            f"auth-secret-{tag}", f"db-password-{tag}"],
                f"diag-marker-{tag}", f"gc-missing-{tag}")
    try:
        site.agent("configure", "healthy", "--engine", "threads", "--workers", "1")
        site.agent("configure", "broken", "--engine", "threads", "--workers", "1")
        agent_token = (home / "endpoints" / "healthy" / "agent.token").read_text().strip()
        site.secrets.append(agent_token)
        # The broken one: its vhost does not exist, and nothing listens where its registry is.
        broken = home / "endpoints" / "broken" / "config.yaml"
        save_config(load_config(broken).model_copy(update={
            "broker_url": broker_url.rsplit("/", 1)[0] + f"/{site.missing_vhost}",
            "registry_url": f"http://127.0.0.1:{free_port()}"}), broken)
        site.agent("start", "healthy", "--detach")
        # A log that leaked every secret (a debugging session, an old bug), and a marker.
        with open(home / "endpoints" / "healthy" / "agent.log", "a") as log:
            log.write(f"DEBUG connecting to {broker_url} as {broker_user} password={password}\n"
                      f"DEBUG Authorization: Bearer {user_token}\n"
                      f"DEBUG agent token {agent_token}; GC_TOKEN {user_token}\n"
                      f"DEBUG secrets {env['GC_REGISTRY_BROKER_AUTH_SECRET']} "
                      f"{env['LAB_DATABASE_PASSWORD']}\n"
                      f"INFO {site.log_marker}\n")
        yield site
    finally:
        site.agent("stop", "healthy", check=False)
        rabbitmqctl("delete_user", broker_user)


@pytest.fixture(scope="module")
def healthy(site: Site) -> tuple[str, dict[str, str]]:
    return site.diagnose("healthy")


@pytest.fixture(scope="module")
def broken(site: Site) -> tuple[str, dict[str, str]]:
    return site.diagnose("broken")


@pytest.mark.parametrize("which", ["healthy", "broken"])
def test_no_secret_is_in_any_member_of_the_archive(site: Site, which: str,
                                                   request: pytest.FixtureRequest) -> None:
    output, members = request.getfixturevalue(which)

    assert set(members) == MEMBERS
    leaks = [(member, secret) for member, text in {**members, "(stdout)": output}.items()
             for secret in site.secrets if secret in text]
    assert leaks == []


def test_the_archive_of_a_running_endpoint_says_all_is_well_and_holds_its_state(
        site: Site, healthy: tuple[str, dict[str, str]]) -> None:
    output, members = healthy
    checks = {check["name"]: check for check in json.loads(members["checks.json"])}

    assert all(check["ok"] for check in checks.values()), checks
    assert set(checks) == {"agent token", "broker", "queue depth", "registry", "agent"}
    assert "tasks waiting in gc.ep." in checks["queue depth"]["detail"]
    assert "running, pid" in checks["agent"]["detail"] and "engine threads" in checks["agent"]["detail"]
    assert "online" in checks["registry"]["detail"] or "never" in checks["registry"]["detail"]
    assert json.loads(members["versions.json"])["gc-fabric"] == VERSION
    assert "endpoint_id:" in members["config.yaml"] and "***" in members["config.yaml"]
    assert json.loads(members["environment.json"])["GC_TOKEN"] == "***"
    assert site.log_marker in members["agent.log"]
    assert "FAIL" not in members["summary.txt"] and "Wrote " in output


def test_the_archive_of_a_broken_endpoint_names_each_cause(
        site: Site, broken: tuple[str, dict[str, str]]) -> None:
    _output, members = broken
    checks = {check["name"]: check for check in json.loads(members["checks.json"])}

    failed = {name for name, check in checks.items() if not check["ok"]}
    assert failed == {"broker", "queue depth", "registry", "agent"}, checks
    assert f"refused access to virtual host '{site.missing_vhost}'" in checks["broker"]["detail"]
    assert "cannot reach the registry" in checks["registry"]["detail"]
    assert "not running" in checks["agent"]["detail"]
    assert "no log at" in members["agent.log"]
    assert members["summary.txt"].count("FAIL") == 4
