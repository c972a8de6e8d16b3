"""The agent's Debian package: built, installed with apt on this machine, run, and purged.

Slow (one build: a virtualenv with every dependency, then compression), so it is one test.
It installs for real into /opt/gc-fabric, /usr/bin and /lib/systemd/system and creates the
gc-agent user, and purges all of it again, also when an assertion fails.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "gc-fabric-agent"
PREFIX = Path("/opt/gc-fabric")
COMMAND = Path("/usr/bin/gc-agent")
UNIT = Path("/lib/systemd/system/gc-agent@.service")
ENV_DIR = Path("/etc/gc-fabric")
STATE_DIR = Path("/var/lib/gc-fabric")
DOC_DIR = Path("/usr/share/doc/gc-fabric-agent")
#: Held from install to purge, so two suites on one machine do not install over each other.
LOCK = Path("/run/lock/gc-fabric-agent-test.lock")
#: Seconds for the build: about 70 on an idle 2-core machine.
BUILD_TIMEOUT = 600
#: Seconds for one apt-get or dpkg call, waiting for the dpkg lock included.
APT_TIMEOUT = 300
VERBS = ("configure", "start", "stop", "restart", "status", "logs", "list", "render-config",
         "delete", "enable-on-boot", "disable-on-boot")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="installs a .deb system-wide: needs root"),
    pytest.mark.skipif(shutil.which("dpkg-deb") is None,
                       reason="dpkg-deb is missing: not a Debian-family system"),
]


def _run(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True,
                          env=env, timeout=timeout)


def _apt(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """apt-get ARGS, waiting for the dpkg lock (another apt may be running)."""
    return _run("apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=240", *args,
                timeout=APT_TIMEOUT)


def _installed() -> bool:
    status = _run("dpkg-query", "-W", "-f=${db:Status-Status}", PACKAGE)
    return status.returncode == 0 and status.stdout not in ("", "not-installed")


def _install(deb: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("apt-get"):
        return _apt("install", deb.resolve())
    return _run("dpkg", "-i", deb, timeout=APT_TIMEOUT)


def _purge() -> subprocess.CompletedProcess[str] | None:
    """Purge the package if dpkg knows it (installed, half-installed or config-files)."""
    if not _installed():
        return None
    if shutil.which("apt-get"):
        return _apt("remove", "--purge", PACKAGE)
    return _run("dpkg", "--purge", PACKAGE, timeout=APT_TIMEOUT)


@contextmanager
def _machine_lock() -> Iterator[None]:
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _verify_unit_instance(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on gc-agent@x.service, a copy of the installed template."""
    units = tmp_path / "units"
    units.mkdir()
    instance = units / "gc-agent@x.service"
    shutil.copy(UNIT, instance)
    (ENV_DIR / "agent-x.env").write_text("GC_HOME=/var/lib/gc-fabric\n")
    return _run("systemd-analyze", "verify", instance)


@pytest.mark.timeout(BUILD_TIMEOUT + 3 * APT_TIMEOUT)
def test_the_agent_deb_builds_installs_runs_and_purges_without_a_trace(tmp_path: Path) -> None:
    # Given: the .deb built from this checkout
    build = _run("bash", REPO / "deploy" / "debian" / "build-deb.sh", tmp_path / "out",
                 timeout=BUILD_TIMEOUT)
    assert build.returncode == 0, build.stdout + build.stderr[-4000:]
    arch = _run("dpkg", "--print-architecture").stdout.strip()
    deb = tmp_path / "out" / f"{PACKAGE}_{version('gc-fabric')}_{arch}.deb"
    assert deb.is_file(), list((tmp_path / "out").iterdir())

    with _machine_lock():
        leftover = _purge()     # from a run that was killed before its own purge
        assert leftover is None or leftover.returncode == 0, leftover.stderr
        if PREFIX.exists():
            pytest.fail(f"{PREFIX} exists and belongs to no package; move it away first")
        try:
            # When: apt installs it
            installed = _install(deb)
            assert installed.returncode == 0, installed.stdout + installed.stderr

            # Then: gc-agent is on the path, self-contained, and runs as the service user
            assert COMMAND.resolve() == PREFIX / "bin" / "gc-agent"
            assert (PREFIX / "bin" / "gc-agent").read_text().startswith(f"#!{PREFIX}/bin/python\n")
            bare = subprocess.run([str(COMMAND), "--help"], check=False, capture_output=True,
                                  text=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
            assert bare.returncode == 0, bare.stderr
            assert all(verb in bare.stdout for verb in VERBS), bare.stdout
            as_user = _run("runuser", "-u", "gc-agent", "--", COMMAND, "--help")
            assert as_user.returncode == 0 and "enable-on-boot" in as_user.stdout, as_user.stderr

            # and it holds the agent's extra but no registry service
            layers = _run(PREFIX / "bin" / "python", "-c",
                          "import importlib.util as u, jinja2, jsonschema, gc_agent.cli; "
                          "print([m for m in ('fastapi', 'sqlalchemy', 'alembic', 'uvicorn') "
                          "if u.find_spec(m)])")
            assert layers.returncode == 0 and layers.stdout == "[]\n", layers.stderr

            # and the system user, its folders and the unit are there
            user = _run("id", "gc-agent")
            assert user.returncode == 0, user.stderr
            assert STATE_DIR.owner() == "gc-agent" and ENV_DIR.group() == "gc-agent"
            unit = UNIT.read_text()
            assert f"ExecStart={PREFIX}/bin/gc-agent start %i" in unit
            assert "User=gc-agent" in unit and f"EnvironmentFile={ENV_DIR}/agent-%i.env" in unit
            verify = _verify_unit_instance(tmp_path)
            assert verify.returncode == 0, verify.stderr

            # and the example config for a service, metrics on, is there and valid
            example = DOC_DIR / "examples" / "config.example.yaml"
            checked = _run(PREFIX / "bin" / "python", "-c",
                           "import sys, yaml; from gc_agent.config import parse_config; "
                           "print(parse_config(yaml.safe_load(open(sys.argv[1])), sys.argv[1])"
                           ".metrics_port)", example)
            assert checked.returncode == 0 and checked.stdout == "9465\n", checked.stderr

            # and installing again changes nothing (the maintainer scripts are idempotent)
            again = (_apt("install", "--reinstall", deb.resolve()) if shutil.which("apt-get")
                     else _run("dpkg", "-i", deb, timeout=APT_TIMEOUT))
            assert again.returncode == 0, again.stderr
        finally:
            purged = _purge()

    # Then: the purge leaves nothing behind
    assert purged is not None and purged.returncode == 0, purged and purged.stderr
    assert not _installed()
    for path in (PREFIX, COMMAND, UNIT, ENV_DIR, STATE_DIR, DOC_DIR):
        assert not os.path.lexists(path), f"{path} survived the purge"
    assert _run("getent", "passwd", "gc-agent").returncode == 2
    assert _run("getent", "group", "gc-agent").returncode == 2
