"""What every command-line program shares: how an error ends a command, tables, waiting.

``gc-client``, ``gc-agent`` and ``gc-registry`` are click groups of class
:class:`CommandLine`: whatever a command (or its group) raises goes through
:func:`reported_errors`, which prints one line and exits with one of the ``EXIT_`` statuses
(README, "Command line"). Click's own usage errors keep click's shape, which is the same:
``Error: <message>`` on stderr.

Only click, pydantic and tenacity are imported: the client-only install has them.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_exponential

from gc_core.errors import GCError, TaskError, TaskPending
from gc_core.version import VERSION

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TASK_FAILED",
    "EXIT_TASK_PENDING",
    "EXIT_USAGE",
    "HELP_OPTIONS",
    "VERSION_LINE",
    "CommandLine",
    "format_table",
    "poll",
    "report",
    "reported_errors",
]

_T = TypeVar("_T")

#: A command did what it was asked.
EXIT_OK = 0
#: An error of the fabric's: registry, broker, configuration, policy, the stored login.
EXIT_ERROR = 1
#: A task failed, or the ledger has no such task.
EXIT_TASK_FAILED = 2
#: The command was given something it refuses: click's usage errors exit 2, and so does a
#: value one of the fabric's schemas refuses (the status a failed task shares).
EXIT_USAGE = 2
#: The task has no result yet.
EXIT_TASK_PENDING = 3
#: Ctrl-C: 128 + SIGINT, as a shell reports a program the signal ended.
EXIT_INTERRUPTED = 130
#: Whoever read the output went away: 128 + SIGPIPE, as a shell reports it.
EXIT_BROKEN_PIPE = 141


#: What asks any command for its help.
HELP_OPTIONS = ["-h", "--help"]
#: ``--version``'s answer: the program, gc-fabric's version, and the Python that runs it.
VERSION_LINE = f"%(prog)s %(version)s (gc-fabric, Python {platform.python_version()})"

#: First pause (seconds) between two polls; each next one is 1.5 times longer.
FIRST_POLL_INTERVAL = 0.05
#: Longest pause (seconds) between two polls, unless the caller asks for a shorter one.
MAX_POLL_INTERVAL = 1.0


def report(error: BaseException) -> tuple[int, str] | None:
    """The exit status and the line to print for ``error`` (empty: print nothing), or None
    for an error no command expects: a bug, whose traceback should show.

    >>> report(TaskPending("t1", "waiting"))
    (3, 'Error: task t1 is not finished (status: waiting)')
    """
    if isinstance(error, TaskPending):
        return EXIT_TASK_PENDING, f"Error: {error}"
    if isinstance(error, GCError):
        # An error a task's endpoint reported is the task's, whatever its class.
        failed = isinstance(error, TaskError) or bool(error.remote_type)
        return (EXIT_TASK_FAILED if failed else EXIT_ERROR), f"Error: {error}"
    if isinstance(error, ValidationError):
        return EXIT_USAGE, "Error: " + "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'value'}: {problem['msg']}"
            for problem in error.errors())
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "Interrupted."
    if isinstance(error, BrokenPipeError):
        return EXIT_BROKEN_PIPE, ""
    return None


@contextmanager
def reported_errors() -> Iterator[None]:
    """Run a command body: an error :func:`report` knows becomes its line on stderr and
    its exit status (click's ``Exit``); any other error goes on, traceback and all."""
    try:
        yield
    except BaseException as exc:  # every error is looked up; those not known go on as they are
        known = report(exc)
        if known is None:
            raise
        status, line = known
        if isinstance(exc, BrokenPipeError):
            _discard_stdout()
        elif line:
            click.echo(line, err=True)
        raise click.exceptions.Exit(status) from None


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the flush at exit does not fail on the broken pipe
    again (https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (click's CliRunner): nothing to flush
        pass


class CommandLine(click.Group):
    """A click group whose commands, and the group's own callback, end through
    :func:`reported_errors`; it and its commands take ``-h`` for ``--help``, and it answers
    ``--version`` (before its callback runs, so without the extras the callback checks)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = dict(kwargs.pop("context_settings", None) or {})
        settings.setdefault("help_option_names", HELP_OPTIONS)
        super().__init__(*args, context_settings=settings, **kwargs)
        click.version_option(VERSION, message=VERSION_LINE)(self)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with reported_errors():
                return super().invoke(ctx)
        except click.NoSuchOption as exc:
            if _number(exc.option_name) is None or exc.ctx is None:
                raise
            raise click.UsageError(
                f"{exc.message} An argument that starts with '-' goes after --, which ends the "
                f"options: {exc.ctx.command_path} [OPTIONS] -- ARGS...", ctx=exc.ctx) from exc


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Rows under a header as plain text: columns two spaces apart, numbers aligned right
    (floats with three decimals), a missing value (None) as ``-``, each row on one line
    (a value's line breaks become spaces), no trailing spaces.

    >>> print(format_table(["NAME", "TASKS"], [["a", 3], ["bcd", None]]))
    NAME  TASKS
    a         3
    bcd       -
    """
    body = [list(row) for row in rows]
    numeric = [any(_is_number(row[i]) for row in body)
               and all(_is_number(row[i]) or row[i] is None for row in body)
               for i in range(len(header))]
    cells = [list(header), *([_cell(value) for value in row] for row in body)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(text.rjust(width) if right else text.ljust(width)
                  for text, width, right in zip(row, widths, numeric)).rstrip()
        for row in cells)


def _number(text: str) -> float | None:
    """``text`` as a number (``-5``, ``-0.5``, ``-1e3``), or None."""
    try:
        return float(text)
    except ValueError:
        return None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return " ".join(str(value).split())  # one line a row, whatever a value holds


def poll(check: Callable[[], _T], *, timeout: float, longest: float = MAX_POLL_INTERVAL) -> _T:
    """``check()``'s first truthy value, asking again after pauses that grow from
    :data:`FIRST_POLL_INTERVAL` to ``longest``; its last (falsy) value once ``timeout``
    seconds have passed. An error ``check`` raises ends the wait at once.
    """
    retrying = Retrying(
        retry=retry_if_result(lambda value: not value),
        stop=stop_after_delay(timeout),
        wait=wait_exponential(multiplier=FIRST_POLL_INTERVAL, exp_base=1.5, max=longest),
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else None)
    return retrying(check)
