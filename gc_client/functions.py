"""Functions that run commands: ShellFunction for any command, MPIFunction under MPI.

Both are ordinary callables: register and submit them like any Python function, and
the endpoint runs the command with ``subprocess``. Their results are ``ShellResult``.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from typing import Any

from gc_core.errors import ConfigError
from gc_core.task_context import current_resource_spec

__all__ = ["MPIFunction", "ShellFunction", "ShellResult"]

#: Exit status reported when a command outlives its walltime (as coreutils' timeout does).
WALLTIME_EXCEEDED = 124


@dataclass(frozen=True)
class ShellResult:
    """What a command did: its return code and the tails of its output."""

    cmd: str
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"$ {self.cmd}\n[exit {self.returncode}]\n{self.stdout}{self.stderr}"


class ShellFunction:
    """Run ``cmd`` with ``{placeholders}`` filled from the call's keyword arguments.

    Example:
        >>> sf = ShellFunction("echo {message}", walltime=10)
        >>> ex.submit(sf, message="hello").result().stdout
        'hello\\n'
    """

    def __init__(self, cmd: str, *, walltime: float | None = None, snippet_lines: int = 1000,
                 name: str | None = None) -> None:
        if walltime is not None and walltime <= 0:
            raise ValueError("walltime must be a positive number of seconds")
        self.cmd = cmd
        self.walltime = walltime
        self.snippet_lines = snippet_lines
        self.__name__ = name or "shell_function"

    def __call__(self, **kwargs: Any) -> ShellResult:
        return self._execute(self.format_command(**kwargs))

    def format_command(self, **kwargs: Any) -> str:
        """The command with its placeholders filled in."""
        try:
            return self.cmd.format(**kwargs)
        except (KeyError, IndexError) as exc:
            raise ConfigError(f"command {self.cmd!r} needs a value for {exc}; pass it as a "
                              "keyword argument when submitting") from exc

    def _execute(self, command: str) -> ShellResult:
        try:
            done = subprocess.run(command, shell=True, capture_output=True, text=True,
                                  timeout=self.walltime, check=False)
        except subprocess.TimeoutExpired as exc:
            return ShellResult(command, WALLTIME_EXCEEDED, self._tail(_text(exc.stdout)),
                               self._tail(_text(exc.stderr)) +
                               f"[gc-fabric: walltime of {self.walltime:g}s exceeded; killed]\n")
        return ShellResult(command, done.returncode, self._tail(done.stdout),
                           self._tail(done.stderr))

    def _tail(self, text: str) -> str:
        lines = text.splitlines(keepends=True)
        return "".join(lines[-self.snippet_lines:])


class MPIFunction(ShellFunction):
    """A ShellFunction run under an MPI launcher, sized by the task's resource specification.

    Submit it from an Executor created with ``resource_specification={"num_nodes": 1,
    "ranks_per_node": 4}`` (or ``num_ranks``); the endpoint prefixes the command with
    ``mpiexec -n <ranks>`` plus ``launcher_options``.
    """

    def __init__(self, cmd: str, *, walltime: float | None = None, snippet_lines: int = 1000,
                 launcher: str = "mpiexec", name: str | None = None) -> None:
        super().__init__(cmd, walltime=walltime, snippet_lines=snippet_lines,
                         name=name or "mpi_function")
        self.launcher = launcher

    def __call__(self, **kwargs: Any) -> ShellResult:
        prefix = mpi_prefix(self.launcher, current_resource_spec())
        return self._execute(f"{prefix} {self.format_command(**kwargs)}")


def mpi_prefix(launcher: str, spec: dict[str, Any]) -> str:
    """``mpiexec -n 4 [options]`` from a resource specification.

    Only ``num_ranks``, ``num_nodes``, ``ranks_per_node`` and ``launcher_options`` size
    the launch; ``priority`` is the scheduler's, and the agent refused any key no engine
    honours before the task ran (``gc_agent.policy.RESOURCE_KEYS``).

    Raises:
        ConfigError: a rank count that is not a positive integer.
    """
    ranks = spec.get("num_ranks", spec.get("num_nodes", 1) * spec.get("ranks_per_node", 1))
    if not isinstance(ranks, int) or ranks < 1:
        raise ConfigError(f"the rank count must be a positive integer, got {ranks!r}")
    options = spec.get("launcher_options", "")
    return " ".join(part for part in (shlex.quote(launcher), "-n", str(ranks), options) if part)


def _text(output: str | bytes | None) -> str:
    if isinstance(output, bytes):
        return output.decode("utf-8", "replace")
    return output or ""
