"""Which process this is, kept current in a forked child without a system call each time.

A connection belongs to the process that opened it: a child forked from it (as
``multiprocessing`` forks on Linux) holds copies of its sockets but not the threads that
serve them. Whatever holds a connection remembers :func:`current_pid` when it opens one,
and compares before using it.
"""

from __future__ import annotations

import os

__all__ = ["current_pid"]

_pid = os.getpid()


def _forked() -> None:
    global _pid  # noqa: PLW0603 - one number, rewritten only in a new child
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def current_pid() -> int:
    """This process's id (``os.getpid()`` asks the kernel on every call)."""
    return _pid
