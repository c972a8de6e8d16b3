"""Where a configured endpoint keeps its files, and starting/stopping its agent process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gc_core.cli import poll
from gc_core.errors import ConfigError
from gc_core.protocol import Heartbeat
from gc_core.settings import FabricSettings
from gc_core.topology import safe_name_part

__all__ = ["EndpointFiles", "is_running", "spawn_detached", "stop_process"]

#: Longest pause (seconds) between two looks at an agent starting or stopping: the
#: command that waits for it should end soon after it does.
_LONGEST_WAIT = 0.2
#: Seconds to wait for a killed agent to be gone (the kernel frees it at once, unless it is
#: stuck in uninterruptible IO).
_KILL_WAIT = 10.0


@dataclass(frozen=True)
class EndpointFiles:
    """The files of one configured endpoint under ``$GC_HOME/endpoints/<name>/``."""

    directory: Path

    @classmethod
    def of(cls, settings: FabricSettings, name: str) -> EndpointFiles:
        """The files of endpoint ``name``."""
        safe_name_part(name, "endpoint name")
        return cls(settings.endpoints_dir / name)

    @property
    def config(self) -> Path:
        return self.directory / "config.yaml"

    @property
    def pid(self) -> Path:
        return self.directory / "agent.pid"

    @property
    def log(self) -> Path:
        return self.directory / "agent.log"

    @property
    def status(self) -> Path:
        return self.directory / "status.json"

    def write_status(self, heartbeat: Heartbeat, broker_problem: str | None,
                     broker_url: str) -> None:
        """Record the agent's latest heartbeat, and what keeps it from its broker (None:
        nothing), for `gc-agent status` (atomically)."""
        record = {**heartbeat.model_dump(), "broker_connected": broker_problem is None,
                  "broker_problem": broker_problem, "broker_url": broker_url}
        partial = self.status.with_suffix(".tmp")
        partial.write_text(json.dumps(record))
        partial.replace(self.status)

    def read_status(self) -> dict[str, Any] | None:
        """The latest recorded status, or None."""
        try:
            record: dict[str, Any] = json.loads(self.status.read_text())
        except (OSError, ValueError):
            return None
        return record

    def running_pid(self) -> int | None:
        """The agent's pid if it is running; a stale pid file is removed."""
        try:
            pid = int(self.pid.read_text().strip())
        except (OSError, ValueError):
            return None
        if is_running(pid):
            return pid
        self.pid.unlink(missing_ok=True)
        return None


def is_running(pid: int) -> bool:
    """Whether a process with this pid exists (and is not a zombie of ours)."""
    try:
        finished, _status = os.waitpid(pid, os.WNOHANG)
        if finished == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spawn_detached(files: EndpointFiles, name: str, *, timeout: float = 60.0) -> int:
    """Start ``gc-agent start NAME`` in the background; return its pid once it is serving.

    Raises:
        ConfigError: the agent exited or did not become ready; the log's tail says why.
    """
    files.directory.mkdir(parents=True, exist_ok=True)
    with open(files.log, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gc_agent.cli", "start", name, "--log-file", str(files.log)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    # Settled: serving (its pid file names it) or exited; else still starting at the timeout.
    settled = poll(lambda: files.running_pid() == process.pid or process.poll() is not None,
                   timeout=timeout, longest=_LONGEST_WAIT)
    if settled and process.poll() is None:
        return process.pid
    if not settled:
        process.kill()
    tail = "\n".join(files.log.read_text(errors="replace").splitlines()[-8:])
    raise ConfigError(f"the agent for {name} did not start; last lines of {files.log}:\n{tail}")


def stop_process(pid: int, *, timeout: float) -> bool:
    """SIGTERM (the agent drains), then wait; SIGKILL after ``timeout``, and wait for that
    too, so the caller goes on once the process is gone. True if it drained."""
    os.kill(pid, signal.SIGTERM)
    if poll(lambda: not is_running(pid), timeout=timeout, longest=_LONGEST_WAIT):
        return True
    os.kill(pid, signal.SIGKILL)
    poll(lambda: not is_running(pid), timeout=_KILL_WAIT, longest=_LONGEST_WAIT)
    return False
