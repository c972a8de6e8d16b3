"""What a worker process that runs task after task gives each one, whatever the one before
changed: its working directory, environment, import path, file-mode mask, signal handlers,
no timer running, the root logger (its handlers and level, logging not disabled) and the
interpreter's own settings (a recursion limit not lowered, the cyclic collector, tracer
and profiler, default socket timeout, no warnings made errors).

A worker of the processes or htex engine runs the tasks of many functions, maybe of many
users of a gateway. A task that moved into a directory (maybe one it then deleted), set
OMP_NUM_THREADS, put a folder first on ``sys.path``, set ``umask(0)``, ignored SIGCHLD
(every later subprocess then reports exit code 0), armed ``signal.alarm`` as a timeout
and returned without disarming it (it fires in the next task), called
``logging.basicConfig(level=DEBUG)`` (every library's debug lines in the tasks after it,
written by its handler), lowered the recursion limit
(later tasks' pickling fails) or left a tracer installed (later tasks run several times
slower) leaves none of it to the next.
Modules it imported stay, and so does what threads it left behind do. A timer already
running before the first task is the host's (Parsl's worker, a test runner's timeout) and
keeps running.
"""

from __future__ import annotations

# signal.getsignal turns each answer into an enum member, ~1 µs a signal; the C function it
# wraps answers in ~0.05, and the state is looked at after every task.
import _signal  # type: ignore[import-not-found]
import gc
import logging
import os
import signal
import socket
import sys
import threading
import warnings
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any, cast

from gc_agent.execution import FunctionCache, Job, Outcome, run_job

__all__ = ["StartingState"]

#: Signals a task can set a handler for: the classic ones but SIGKILL and SIGSTOP, which
#: take none. (The real-time ones are left alone: hardly any Python code sets them.)
_SIGNALS = tuple(int(number) for number in signal.valid_signals()
                 if number < signal.SIGRTMIN and number not in (signal.SIGKILL, signal.SIGSTOP))
#: The process's interval timers, each firing its own signal, and how a task sets each.
_TIMERS = ((signal.ITIMER_REAL, "ITIMER_REAL: signal.alarm or setitimer"),
           (signal.ITIMER_VIRTUAL, "ITIMER_VIRTUAL"),
           (signal.ITIMER_PROF, "ITIMER_PROF"))


@dataclass(frozen=True)
class StartingState:
    """A worker's state before its first task, to give back to each task after it."""

    home: str
    environment: dict[bytes, bytes]
    import_path: list[str]
    umask: int
    handlers: tuple[Any, ...]
    interpreter: _Interpreter
    #: Timers that ran before the first task: the host process's, never stopped.
    hosts_timers: frozenset[int]

    @classmethod
    def of_this_process(cls) -> StartingState:
        umask = os.umask(0o077)
        os.umask(umask)
        running = frozenset(which for which, _ in _TIMERS if signal.getitimer(which)[0] > 0)
        return cls(os.getcwd(), dict(_environment()), list(sys.path), umask, _handlers(),
                   _Interpreter.now(), running)

    def run(self, job: Job, functions: FunctionCache) -> Outcome:
        """Run ``job``, then put back what it changed; a timer it left running is stopped
        as soon as its function returns (due while the value is serialized, it would end
        the worker or raise in the middle of pickling), and its error output says so (its
        author has a timeout to disarm)."""
        stopped: list[str] = []
        outcome = run_job(job, functions, returned=lambda: stopped.extend(self.stop_timers()))
        stopped = list(dict.fromkeys([*stopped, *self.restore()]))
        if not stopped:
            return outcome
        return replace(outcome, stderr=outcome.stderr + "".join(
            f"[gc-fabric: this task left a timer running ({timer}); it was stopped so that it "
            "cannot fire in a later task: disarm it before returning, in a finally block]\n"
            for timer in stopped))

    def restore(self) -> list[str]:
        """Put all of it back (~4.5 µs where nothing changed); returns the timers that were
        running (but the host's). Timers stop first: a handler put back must not meet their
        signal."""
        stopped = self.stop_timers()
        os.umask(self.umask)
        if _handlers() != self.handlers and threading.current_thread() is threading.main_thread():
            for number, handler in zip(_SIGNALS, self.handlers, strict=True):
                if _signal.getsignal(number) is not handler:
                    signal.signal(number, handler)
        try:
            moved = os.getcwd() != self.home
        except FileNotFoundError:  # the directory a task moved into is gone
            moved = True
        if moved:
            with suppress(OSError):  # the worker's own directory is gone: the task runs where it is
                os.chdir(self.home)
        if _environment() != self.environment:
            self._restore_environment()
        if sys.path != self.import_path:
            sys.path[:] = self.import_path
        self.interpreter.restore()
        return stopped

    def stop_timers(self) -> list[str]:
        """Stop the timers running now but the host's; returns those that were running."""
        return [name for which, name in _TIMERS
                if which not in self.hosts_timers and signal.setitimer(which, 0)[0] > 0]

    def _restore_environment(self) -> None:
        # Through os.environ, so that the process's own environment (subprocesses') follows.
        now = _environment()
        for key in [key for key in now if key not in self.environment]:
            del os.environ[os.fsdecode(key)]
        for key, value in self.environment.items():
            if now.get(key) != value:
                os.environ[os.fsdecode(key)] = os.fsdecode(value)


@dataclass(frozen=True)
class _Interpreter:
    """Settings of the interpreter a task may change for the whole process."""

    recursion_limit: int
    root_handlers: list[logging.Handler]
    root_level: int
    logging_disabled: int
    collecting: bool
    tracer: Any
    profiler: Any
    socket_timeout: float | None
    warning_filters: list[Any]

    @classmethod
    def now(cls) -> _Interpreter:
        root = logging.root
        return cls(sys.getrecursionlimit(), list(root.handlers), root.level,
                   root.manager.disable, gc.isenabled(), sys.gettrace(), sys.getprofile(),
                   socket.getdefaulttimeout(), list(warnings.filters))

    def restore(self) -> None:
        """Put back what harms the tasks after: a lower recursion limit, the root logger
        changed or logging disabled, the collector off, a tracer or profiler, a socket
        timeout, warnings turned into errors. A limit raised
        and filters that ignore warnings stay: libraries set those as they are imported,
        and they stay imported."""
        if sys.getrecursionlimit() < self.recursion_limit:
            sys.setrecursionlimit(self.recursion_limit)
        self._restore_root_logger()
        if gc.isenabled() != self.collecting:
            (gc.enable if self.collecting else gc.disable)()
        if sys.gettrace() is not self.tracer:
            sys.settrace(self.tracer)
        if sys.getprofile() is not self.profiler:
            sys.setprofile(self.profiler)
        if socket.getdefaulttimeout() != self.socket_timeout:
            socket.setdefaulttimeout(self.socket_timeout)
        if warnings.filters != self.warning_filters:
            kept = [entry for entry in warnings.filters
                    if entry[0] != "error" or entry in self.warning_filters]
            if len(kept) < len(warnings.filters):
                warnings.resetwarnings()  # (marks every warning registry stale)
                cast(list[Any], warnings.filters).extend(kept)

    def _restore_root_logger(self) -> None:
        """The root logger's handlers and level as they were, logging not disabled; a
        handler a task added is closed (a file it opened is flushed and let go)."""
        root = logging.root
        if root.handlers != self.root_handlers:
            for handler in [h for h in root.handlers if h not in self.root_handlers]:
                root.removeHandler(handler)
                handler.close()
            for handler in self.root_handlers:
                if handler not in root.handlers:
                    root.addHandler(handler)
        if root.level != self.root_level:
            root.setLevel(self.root_level)
        if root.manager.disable != self.logging_disabled:
            logging.disable(self.logging_disabled)


def _handlers() -> tuple[Any, ...]:
    return tuple(map(_signal.getsignal, _SIGNALS))


def _environment() -> dict[bytes, bytes]:
    """``os.environ``'s own mapping, as the process holds it: comparing it takes 0.3 µs,
    comparing ``os.environ`` (which decodes every entry) 16."""
    data: dict[bytes, bytes] = os.environ._data  # type: ignore[attr-defined]
    return data
