"""Test helpers for driving a real fabric: a vhost, a registry in a thread, agent processes."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from gc_agent.config import load_config, save_config
from gc_core.registry.app import RegistrySettings, create_app

#: Seconds to wait for a process or server to come up in tests.
START_TIMEOUT = 60.0


def eventually(check: Callable[[], Any], timeout: float = 60, what: str = "a condition") -> Any:
    """Poll ``check`` until it returns something truthy, and return that.

    Raises:
        AssertionError: still falsy after ``timeout`` seconds (names ``what``).
    """
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
    return value


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


#: Ports tests choose for listeners of their own: below the kernel's ephemeral range
#: (32768-60999 here), from which outgoing connections take their local ports, and clear of
#: the fixed ports tests use (5672-5673, 5701.., 25672-25673, 25701..).
TEST_PORTS = range(30000, 32768)
#: One file per port handed out, naming the process it went to: no two tests, in any
#: xdist worker or run on this machine, are given one port while the first's listener may
#: still be starting (a secured node takes seconds). A claim ends with its process.
PORT_CLAIMS = Path(tempfile.gettempdir()) / "gc-test-ports"


def _claim(port: int) -> bool:
    """Claim ``port`` for this process; False if a live process holds it."""
    PORT_CLAIMS.mkdir(exist_ok=True)
    path = PORT_CLAIMS / str(port)
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            owner = int(path.read_text())
        except (OSError, ValueError):  # being written this moment
            return False
        if owner == os.getpid() or pid_alive(owner):
            return False
        path.unlink(missing_ok=True)  # a finished process's: free again
        return _claim(port)
    with os.fdopen(descriptor, "w") as claim:
        claim.write(str(os.getpid()))
    return True


def free_port() -> int:
    """A port nothing listens on now, for a listener a test starts soon after. Not one the
    kernel hands out (binding port 0): until the listener binds it, any outgoing connection
    may take it as its local port (the likely reason a secured node once failed to start,
    its distribution port 'already used' by something that was no Erlang node). No other
    test is given it meanwhile (``PORT_CLAIMS``); a server in this process can take
    :func:`held_port` instead, bound from the start."""
    with held_port() as sock:
        return int(sock.getsockname()[1])


def held_port() -> socket.socket:
    """A socket bound to a free port of TEST_PORTS, claimed for this process (a server
    started in this process listens on it)."""
    for port in random.sample(TEST_PORTS, 100):
        if not _claim(port):
            continue
        try:
            return bound_socket(port)
        except OSError:
            continue
    raise RuntimeError(f"no free port among 100 tried in {TEST_PORTS}")


def bound_socket(port: int) -> socket.socket:
    """A socket bound to ``port`` on 127.0.0.1, not listening: connections to it are
    refused, and nothing else can bind the port while it is open.

    Raises:
        OSError: the port is taken.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """Run rabbitmqctl against the local node and return its output."""
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


@contextmanager
def fresh_vhost(prefix: str) -> Iterator[str]:
    """A new vhost on the local broker, named ``prefix-<random>``, where guest may do
    anything; deleted after."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


class RegistryServer:
    """The real registry app served by uvicorn in a background thread."""

    def __init__(self, db_url: str, broker_url: str, *, auth: str = "open",
                 broker_auth_secret: str | None = None,
                 broker_checks_user_id: bool = True) -> None:
        # Held from now on, not only once it serves: a secured node starts between the two.
        self._socket = held_port()
        self.port = int(self._socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        #: What the broker presents on /auth/* (None: the registry answers its own host).
        self.broker_auth_secret = broker_auth_secret
        app = create_app(RegistrySettings(
            db_url=db_url, broker_url=broker_url, auth=auth,  # type: ignore[arg-type]
            broker_auth_secret=broker_auth_secret,  # type: ignore[arg-type]
            broker_checks_user_id=broker_checks_user_id))
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, args=([self._socket],),
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("registry did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(15)
        self._socket.close()  # (uvicorn closed it if it served; if it never started, here)


@dataclass
class Fabric:
    """Where a test's fabric lives: broker vhost URL, registry URL, GC_HOME."""

    broker_url: str
    registry_url: str
    home: Path
    vhost: str

    @property
    def env(self) -> dict[str, str]:
        """Environment for CLI subprocesses."""
        return {**os.environ, "GC_BROKER_URL": self.broker_url,
                "GC_REGISTRY_URL": self.registry_url, "GC_HOME": str(self.home)}

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a console script (gc-agent, gc-client, ...) from the venv with this fabric's env."""
        exe = Path(sys.executable).parent / args[0]
        done = subprocess.run([str(exe), *args[1:]], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def endpoint_status(self, endpoint_id: str) -> dict[str, str]:
        """`gc-client status --endpoint ID`'s row, by column."""
        header, row = self.cli("gc-client", "status", "--endpoint", endpoint_id
                               ).stdout.splitlines()[:2]
        columns = header.replace("ENDPOINT ID", "ENDPOINT_ID").split()
        return dict(zip(columns, row.split(), strict=True))

    def configure_endpoint(self, name: str, *, engine: str = "processes", workers: int = 2,
                           **overrides: object) -> Endpoint:
        """`gc-agent configure NAME`, then apply config overrides (e.g. heartbeat_period)."""
        out = self.cli("gc-agent", "configure", name, "--engine", engine, "--workers", str(workers))
        endpoint_id = out.stdout.split(":", 1)[1].split()[0]
        path = self.home / "endpoints" / name / "config.yaml"
        if overrides:
            save_config(load_config(path).model_copy(update=overrides), path)
        return Endpoint(self, name, endpoint_id)


@dataclass
class Endpoint:
    """A configured endpoint and its agent processes (started in the foreground, as a child)."""

    fabric: Fabric
    name: str
    endpoint_id: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return self.fabric.home / "endpoints" / self.name

    @property
    def log(self) -> Path:
        return self.directory / f"agent-{len(self.processes)}.log"

    def start(self) -> subprocess.Popen[bytes]:
        """Start an agent and wait until it serves (its pid file appears)."""
        pid_file = self.directory / "agent.pid"
        pid_file.unlink(missing_ok=True)
        with open(self.log, "wb") as log:  # the agent keeps its own copy of the descriptor
            process = subprocess.Popen(
                [sys.executable, "-m", "gc_agent.cli", "start", self.name],
                env=self.fabric.env, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        deadline = time.monotonic() + START_TIMEOUT
        while not (pid_file.exists() and pid_file.read_text().strip() == str(process.pid)):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent {self.name} did not start:\n{self.read_logs()}")
            time.sleep(0.05)
        return process

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the newest agent and wait for it to exit."""
        process = self.processes[-1]
        process.send_signal(sig)
        process.wait(60)

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def read_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.directory.glob("agent-*.log")))
