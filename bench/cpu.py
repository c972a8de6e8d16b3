"""CPU time per process of a system under test, read from /proc before and after a run.

Each system names its processes by role (:class:`ProcessRoot`): a pid, or every process
whose command line holds a string (a worker pool that its launcher's shell left behind
holds its run directory there), each with its descendants. The harness adds the client
(this process, and those of its descendants no root claimed: the Parsl peer's interchange)
and, for a system on RabbitMQ, the broker's ``beam.smp``. A descendant whose command line
names Parsl's interchange counts as ``interchange`` wherever it sits.

CPU is utime + stime of ``/proc/<pid>/stat``: every thread of the process, none of its
children. A process that ends between the two readings loses its share (none does in a
run: workers live from ``start()`` to ``stop()``). The second reading waits until the
system's own processes go quiet, so work a run leaves behind (a ledger still writing its
results) counts too. The broker and Redis serve other users of the machine too: on a busy
machine their figures are upper bounds.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

#: Clock ticks per second, the unit of /proc/<pid>/stat's CPU fields.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Seconds between readings while waiting for a system to finish what a run left behind.
SETTLE_INTERVAL_S = 0.5
#: CPU seconds per interval under which the system's own processes count as quiet.
QUIET_CPU_S = 0.02
#: Longest wait for them to go quiet.
SETTLE_TIMEOUT_S = 10.0
#: Roles that serve other users too: their use never counts as the system still working.
SHARED_ROLES = ("broker", "result store")
#: Roles in the order the CPU table shows them.
ROLES = ("client", "broker", "result store", "agent", "interchange", "workers", "registry")
#: A command line holding one of these is Parsl's interchange, whoever started it (it
#: renames itself once it runs).
INTERCHANGE_MARKERS = ("high_throughput.interchange", "HTEX interchange")


@dataclass(frozen=True)
class ProcessRoot:
    """Processes of one role: ``pid``, or every process whose command line holds ``cmdline``.

    Their descendants count as ``descendants_role`` (the role itself when None) unless
    ``descendants`` is False.
    """

    role: str
    pid: int | None = None
    cmdline: str | None = None
    descendants: bool = True
    descendants_role: str | None = None


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    ticks: int
    cmdline: str


def _read_process(pid: int) -> ProcessInfo | None:
    """One process's parent, CPU ticks and command line; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after it
    fields = stat.rsplit(")", 1)[1].split()
    return ProcessInfo(pid=pid, ppid=int(fields[1]), ticks=int(fields[11]) + int(fields[12]),
                    cmdline=cmdline.replace(b"\0", b" ").decode(errors="replace"))


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used.

    Raises:
        ProcessLookupError: if there is no such process.
    """
    process = _read_process(pid)
    if process is None:
        raise ProcessLookupError(f"no process {pid}")
    return process.ticks / CLOCK_TICKS


def read_processes() -> dict[int, ProcessInfo]:
    """Every process on the machine now, by pid."""
    processes = (_read_process(int(entry.name)) for entry in os.scandir("/proc") if entry.name.isdigit())
    return {process.pid: process for process in processes if process is not None}


def assign_roles(processes: Mapping[int, ProcessInfo], roots: Sequence[ProcessRoot]) -> dict[int, str]:
    """Which role each process of ``roots`` plays: earlier roots claim a process first."""
    children: dict[int, list[int]] = {}
    for process in processes.values():
        children.setdefault(process.ppid, []).append(process.pid)
    roles: dict[int, str] = {}
    for root in roots:
        tops = [p.pid for p in processes.values()
                if p.pid == root.pid or (root.cmdline and root.cmdline in p.cmdline)]
        for top in tops:
            if top in roles:
                continue
            roles[top] = root.role
            if root.descendants:
                _claim_descendants(top, root.descendants_role or root.role, children, processes, roles)
    return roles


def _claim_descendants(top: int, role: str, children: Mapping[int, list[int]],
                       processes: Mapping[int, ProcessInfo], roles: dict[int, str]) -> None:
    stack = [(child, role) for child in children.get(top, [])]
    while stack:
        pid, inherited = stack.pop()
        if pid in roles:  # another root's process, with its own subtree
            continue
        cmdline = processes[pid].cmdline
        own = "interchange" if any(marker in cmdline for marker in INTERCHANGE_MARKERS) else inherited
        roles[pid] = own
        stack.extend((child, own) for child in children.get(pid, []))


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU ticks of every process of a system, with its role, at one moment."""

    ticks: Mapping[int, tuple[str, int]]


def snapshot(roots: Sequence[ProcessRoot]) -> CpuSnapshot:
    """Read the CPU ticks of every process ``roots`` name, and of their descendants."""
    processes = read_processes()
    roles = assign_roles(processes, roots)
    return CpuSnapshot({pid: (role, processes[pid].ticks) for pid, role in roles.items()})


def seconds_by_role(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds each role used between two snapshots (a process born between counts from 0)."""
    used: dict[str, float] = {}
    for pid, (role, ticks) in after.ticks.items():
        start = before.ticks.get(pid, (role, 0))[1]
        used[role] = used.get(role, 0.0) + (ticks - start) / CLOCK_TICKS
    return used


def settled_snapshot(roots: Sequence[ProcessRoot]) -> CpuSnapshot:
    """A snapshot taken once the processes of ``roots`` (but the shared ones) have gone
    quiet, or after SETTLE_TIMEOUT_S."""
    current = snapshot(roots)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        time.sleep(SETTLE_INTERVAL_S)
        previous, current = current, snapshot(roots)
        used = seconds_by_role(previous, current)
        if sum(seconds for role, seconds in used.items() if role not in SHARED_ROLES) < QUIET_CPU_S:
            break
    return current


@cache
def broker_pid() -> int:
    """The pid of the local RabbitMQ node's ``beam.smp`` (asked of the node itself).

    Raises:
        RuntimeError: if ``rabbitmqctl`` cannot reach the node.
    """
    try:
        done = subprocess.run(["rabbitmqctl", "-q", "eval", "os:getpid()."], capture_output=True,
                              text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"cannot ask the local RabbitMQ node for its pid ({exc}): is it "
                           "running, and is rabbitmqctl on PATH?") from exc
    return int(done.stdout.strip().strip('"'))


def client_roots() -> list[ProcessRoot]:
    """This process (the client) and those of its descendants no earlier root claimed."""
    return [ProcessRoot("client", pid=os.getpid())]


def broker_roots() -> list[ProcessRoot]:
    """The local RabbitMQ node, without its helper children."""
    return [ProcessRoot("broker", pid=broker_pid(), descendants=False)]
