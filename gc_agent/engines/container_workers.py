"""Worker processes inside a container, for the process engine.

A container cannot inherit the agent's end of a socket pair (docker's client hands the
command to a daemon; podman's conmon stands between), so each worker gets a Unix socket
in a private directory mounted into its container, connects to it, and from then on speaks
exactly as a worker on the host does. Killing the runtime's client does not stop a docker
or podman container, so each is named and killed by name (apptainer and singularity run
as plain children: their session's process group is killed).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import IO, Any

from gc_agent.containers import CONTAINER_PYTHON, Container, container_command
from gc_agent.engines.processes import WorkerLaunch
from gc_core.errors import ConfigError

__all__ = ["ContainerLaunch", "ContainerProcess"]

#: Seconds a container gets to start and its worker to connect (a first start may unpack
#: or convert the image).
CONNECT_TIMEOUT = 120.0
#: Seconds between checks that the runtime's client is still alive while waiting.
CONNECT_POLL = 0.2
#: Seconds the runtime gets to kill a container by name.
STOP_TIMEOUT = 30.0
#: Bytes of the runtime's error output quoted when a container fails to start.
MAX_START_ERROR = 2000


class ContainerProcess(subprocess.Popen[bytes]):
    """The runtime's client process of one worker container; ``kill`` stops the container."""

    def __init__(self, args: list[str], *, container: Container, name: str,
                 **options: Any) -> None:
        super().__init__(args, **options)
        self.container = container
        self.container_name = name

    def kill(self) -> None:
        if self.poll() is None:
            if self.container.stopped_by_name:
                subprocess.run([self.container.runtime, "kill", self.container_name],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=STOP_TIMEOUT, check=False)
            with suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)  # the worker leads a session of its own
        super().kill()


@dataclass(frozen=True)
class ContainerLaunch(WorkerLaunch):
    """Start each worker in ``container`` as the agent's own account."""

    container: Container = field(kw_only=True)

    def spawn(self, module: str, environment: Mapping[str, str] | None = None,
              ) -> tuple[subprocess.Popen[bytes], socket.socket]:
        """Start ``python3 -m module SOCKET`` in the container, with ``environment`` set
        there; returns the runtime's client process and the connection the worker made."""
        directory = tempfile.mkdtemp(prefix="gc-worker-")
        path = os.path.join(directory, "agent.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(1)
            name = f"gc-worker-{uuid.uuid4().hex[:16]}"
            command = container_command(self.container, [CONTAINER_PYTHON, "-m", module, path],
                                        mounts=[directory], name=name,
                                        environment=environment)
            with tempfile.TemporaryFile() as errors:
                process = ContainerProcess(command, container=self.container, name=name,
                                           **{**self.popen_options(), "stderr": errors})
                try:
                    return process, _accept(listener, process, errors, command)
                except BaseException:
                    process.kill()
                    process.wait()
                    raise
        finally:
            listener.close()
            shutil.rmtree(directory, ignore_errors=True)


def _accept(listener: socket.socket, process: subprocess.Popen[bytes], errors: IO[bytes],
            command: list[str]) -> socket.socket:
    """The worker's connection, once its container is up.

    Raises:
        ConfigError: the runtime exited, or no worker connected in time; says why.
    """
    listener.settimeout(CONNECT_POLL)
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            if process.poll() is not None:
                raise ConfigError(
                    f"the worker container exited with code {process.returncode} before its "
                    f"worker connected: {_tail(errors) or 'no error output'}; check "
                    f"container_uri (the image needs {CONTAINER_PYTHON} importing gc-fabric) "
                    f"and container_cmd_options. Command: {shlex.join(command)}") from None
            continue
        connection.settimeout(None)
        return connection
    raise ConfigError(f"no worker connected from its container within {CONNECT_TIMEOUT:.0f} s; "
                       f"command: {shlex.join(command)}")


def _tail(errors: IO[bytes]) -> str:
    """The end of what the runtime wrote to its standard error."""
    errors.seek(0, os.SEEK_END)
    errors.seek(max(0, errors.tell() - MAX_START_ERROR))
    return errors.read().decode(errors="replace").strip()
