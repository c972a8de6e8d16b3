"""Running workers inside a container: the config keys and the command lines, as Globus Compute.

An engine section may name a container (``container_type``, ``container_uri``,
``container_cmd_options``, Globus Compute's keys). The processes engine then starts each
worker with ``<runtime> run … <image> python3 -m gc_agent.engines.worker``, and the htex
engine wraps Parsl's worker pool the same way. The image must have a ``python3`` of the
agent's minor version that imports gc-fabric (and Parsl, for htex): an image with
gc-fabric installed, or the agent's installation mounted in through
``container_cmd_options``. Only these pure parts live here; starting the processes is
``gc_agent.engines.container_workers``'s job.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, model_validator

__all__ = ["CONTAINER_PYTHON", "Container", "ContainerSettings", "container_command",
           "containerized_launch_cmd"]

#: Runtimes a worker can be started in; ``none`` (or no key) runs workers on the host.
ContainerType = Literal["docker", "podman", "apptainer", "singularity", "none"]
#: Runtimes with a daemon or a conmon of their own: a container outlives its killed client,
#: so it is named and stopped by name.
DAEMON_RUNTIMES = ("docker", "podman")
#: The Python a worker runs inside the image (from the image's PATH).
CONTAINER_PYTHON = "python3"


@dataclass(frozen=True)
class Container:
    """A container to run workers in: runtime, image, and the user's extra options."""

    runtime: str
    uri: str
    options: tuple[str, ...] = ()

    @property
    def stopped_by_name(self) -> bool:
        """Whether killing the runtime's client process leaves the container running."""
        return self.runtime in DAEMON_RUNTIMES


class ContainerSettings(BaseModel):
    """The container keys of an engine section (Globus Compute's names and meanings)."""

    container_type: ContainerType | None = Field(
        default=None, description="Run each worker in a container: docker, podman, apptainer "
                                  "or singularity; none (the default) runs them on the host.")
    container_uri: str | None = Field(
        default=None, description="The image: a name the runtime knows (docker, podman) or an "
                                  "image file or URI (apptainer, singularity). It needs a "
                                  "python3 that imports gc-fabric.")
    container_cmd_options: str | None = Field(
        default=None, description="Extra options for the runtime's run (or exec) command, as "
                                  "one shell-quoted string, e.g. '-v /data:/data'.")

    @model_validator(mode="after")
    def _complete(self) -> ContainerSettings:
        if self.container_type in (None, "none"):
            if self.container_uri or self.container_cmd_options:
                raise ValueError("container_uri and container_cmd_options need a container_type "
                                 "(docker, podman, apptainer or singularity)")
            return self
        if not self.container_uri:
            raise ValueError(f"container_type {self.container_type!r} needs container_uri: the "
                             "image to start workers from")
        try:
            shlex.split(self.container_cmd_options or "")
        except ValueError as exc:
            raise ValueError(f"container_cmd_options is not a valid shell-quoted string: "
                             f"{exc}") from exc
        return self

    @property
    def container(self) -> Container | None:
        """The container workers run in, or None on the host."""
        if self.container_type in (None, "none") or not self.container_uri:
            return None
        return Container(self.container_type, self.container_uri,
                         tuple(shlex.split(self.container_cmd_options or "")))


def container_command(container: Container, command: Sequence[str], *,
                      mounts: Sequence[str] = (), name: str | None = None,
                      environment: Mapping[str, str] | None = None) -> list[str]:
    """The command line running ``command`` in ``container``, with ``mounts`` (host
    directories) at the same paths inside and ``environment`` set there.

    Docker and podman containers share the host's network unless the options name one (a
    worker pool reaches its interchange on the agent's address), are removed on exit, and
    run the command under the runtime's init: as PID 1 it would ignore the SIGTERM with
    which a provider cancels its block. Apptainer and singularity share the network and
    the process space anyway.

    >>> container_command(Container("podman", "img"), ["python3"], mounts=["/run/x"])
    ['podman', 'run', '--rm', '--init', '--network', 'host', '-v', '/run/x:/run/x', 'img', 'python3']
    >>> container_command(Container("apptainer", "img.sif", ("--cleanenv",)), ["python3"],
    ...                   mounts=["/run/x"])
    ['apptainer', 'exec', '--bind', '/run/x', '--cleanenv', 'img.sif', 'python3']
    """
    options = list(container.options)
    variables = [part for item in (environment or {}).items() for part in ("--env", "=".join(item))]
    if container.runtime in DAEMON_RUNTIMES:
        named = ["--name", name] if name else []
        network = [] if any(o.startswith(("--network", "--net")) for o in options) \
            else ["--network", "host"]
        volumes = [part for mount in mounts for part in ("-v", f"{mount}:{mount}")]
        return [container.runtime, "run", "--rm", "--init", *named, *network, *volumes, *variables,
                *options, container.uri, *command]
    binds = [part for mount in mounts for part in ("--bind", mount)]
    return [container.runtime, "exec", *binds, *variables, *options, container.uri, *command]


def containerized_launch_cmd(container: Container, launch_cmd: str, run_dir: str) -> str:
    """Parsl's worker-pool launch command template, run in ``container`` with the run
    directory (logs, CurveZMQ keys) mounted: Globus Compute's way for its engine. The pool
    runs as a module of the image's Python, whose PATH need not hold Parsl's scripts.

    Raises:
        ValueError: ``launch_cmd`` does not start Parsl's ``process_worker_pool.py``.
    """
    program, _, arguments = launch_cmd.partition(" ")
    if program != "process_worker_pool.py":
        raise ValueError(f"cannot run {program!r} in a container: expected Parsl's "
                         "process_worker_pool.py launch command")
    pool = f"{CONTAINER_PYTHON} -m parsl.executors.high_throughput.process_worker_pool"
    prefix = container_command(container, [], mounts=[run_dir])
    # Parsl formats the template twice (its settings, then each block's id): a brace in a
    # path or an option is doubled twice to come out whole.
    quoted = " ".join(shlex.quote(part).replace("{", "{{{{").replace("}", "}}}}")
                      for part in prefix)
    return f"{quoted} {pool} {arguments}"
