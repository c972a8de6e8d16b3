"""The benchmark's CPU reader on a real process tree: roles, descendants, CPU a child burnt."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bench import cpu

#: CPU seconds the busy child burns before it says it is ready.
BURN_S = 0.3
#: The child that burns CPU, then waits; and the idle one, named like Parsl's interchange.
BUSY = ("import sys, time\n"
        f"while time.process_time() < {BURN_S}: pass\n"
        "print('ready', flush=True); sys.stdin.read()")
IDLE = "import sys; print('ready', flush=True); sys.stdin.read()"
#: The parent: starts both children, says ready once they are, lives until its stdin closes.
PARENT = f"""
import subprocess, sys
children = [subprocess.Popen([sys.executable, '-c', code, *names], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
            for code, names in (({BUSY!r}, []), ({IDLE!r}, ['parsl: HTEX interchange']))]
for child in children: child.stdout.readline()
print(' '.join(str(child.pid) for child in children), flush=True)
sys.stdin.read()
"""


@dataclass(frozen=True)
class Tree:
    parent: int
    busy: int
    interchange: int
    loner: int
    token: str


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


@pytest.fixture(scope="module")
def tree() -> Iterator[Tree]:
    # Given a parent with a busy child and an interchange-named one, and an unrelated
    # process known only by a token on its command line
    token = f"bench-cpu-test-{uuid.uuid4().hex}"
    parent = _start([sys.executable, "-c", PARENT])
    loner = _start([sys.executable, "-c", IDLE, token])
    try:
        assert parent.stdout is not None and loner.stdout is not None
        busy, interchange = (int(pid) for pid in parent.stdout.readline().split())
        loner.stdout.readline()
        yield Tree(parent.pid, busy, interchange, loner.pid, token)
    finally:
        for process in (parent, loner):
            process.communicate(timeout=30)  # closing stdin ends it, and the parent's children


def test_descendants_take_their_roots_role_but_an_interchange_is_itself(tree: Tree) -> None:
    roots = [cpu.ProcessRoot("agent", pid=tree.parent, descendants_role="workers"),
             cpu.ProcessRoot("registry", cmdline=tree.token)]

    roles = cpu.assign_roles(cpu.read_processes(), roots)

    assert roles == {tree.parent: "agent", tree.busy: "workers",
                     tree.interchange: "interchange", tree.loner: "registry"}


def test_an_earlier_root_keeps_a_process_a_later_one_names(tree: Tree) -> None:
    roots = [cpu.ProcessRoot("workers", pid=tree.busy),
             cpu.ProcessRoot("client", pid=tree.parent)]

    roles = cpu.assign_roles(cpu.read_processes(), roots)

    assert roles == {tree.busy: "workers", tree.parent: "client", tree.interchange: "interchange"}


def test_the_cpu_a_child_burnt_counts_to_its_role(tree: Tree) -> None:
    roots = [cpu.ProcessRoot("agent", pid=tree.parent, descendants_role="workers")]

    used = cpu.seconds_by_role(cpu.CpuSnapshot({}), cpu.snapshot(roots))

    # the child stopped burning at BURN_S of its own clock; /proc counts in clock ticks
    assert used["workers"] >= BURN_S - 1 / cpu.CLOCK_TICKS
    assert cpu.cpu_seconds(tree.busy) >= BURN_S - 1 / cpu.CLOCK_TICKS


def test_a_process_that_is_gone_is_named_in_the_error() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()

    with pytest.raises(ProcessLookupError, match=str(process.pid)):
        cpu.cpu_seconds(process.pid)
