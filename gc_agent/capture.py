"""Capture what a task prints, per thread and bounded, with truncation marked.

``sys.stdout`` and ``sys.stderr`` are process-wide, and the thread engine runs several
tasks at once, so redirecting them per task would mix outputs. Instead a dispatching
stream is installed once; each thread running a task points it at that task's buffer,
and every other thread writes through to the original stream.

Output written to the file descriptors directly (by a subprocess, C code, or a thread the
task started) is captured only in a process worker, which runs one task at a time: it
points descriptors 1 and 2 at files of its own (``redirect_descriptors``) and adds what
reached them to the task's output (``with_descriptor_output``). So nothing a task writes
ever reaches the agent's log, which a worker would otherwise inherit as its descriptors.
"""

from __future__ import annotations

import fcntl
import io
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TextIO

__all__ = ["BoundedText", "captured_output", "clear_descriptors", "redirect_descriptors",
           "with_descriptor_output"]


class BoundedText:
    """Keeps the first ``limit`` bytes (UTF-8) written to it and counts the rest.

    Only the per-thread dispatcher writes to it, so it needs no more of the file API
    than ``write`` and ``flush`` (and stays cheap to create for every task).
    """

    __slots__ = ("_dropped", "_limit", "_parts", "_size")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[str] = []
        self._size = 0
        self._dropped = 0

    def flush(self) -> None:
        """Nothing to flush: the text stays in memory."""

    def write(self, text: str) -> int:
        room = self._limit - self._size
        data = text.encode("utf-8", "replace")
        if len(data) <= room:
            self._parts.append(text)
            self._size += len(data)
        else:
            kept = data[:max(room, 0)].decode("utf-8", "ignore")
            self._parts.append(kept)
            self._size += len(kept.encode())
            self._dropped += len(data) - len(kept.encode())
        return len(text)

    def skip(self, size: int) -> None:
        """Count ``size`` more bytes as cut, without reading them."""
        self._dropped += size

    def text(self) -> str:
        """What was kept, with a marker saying how much was cut."""
        kept = "".join(self._parts)
        if self._dropped:
            kept += (f"\n[gc-fabric: output truncated, {self._dropped} more bytes not kept; "
                     "raise output_limit in the endpoint config to keep more]\n")
        return kept


class _PerThreadStream(io.TextIOBase):
    """Writes to the current thread's capture buffer if it has one, else to ``fallback``."""

    def __init__(self, fallback: TextIO) -> None:
        super().__init__()
        self.fallback = fallback
        self.local = threading.local()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        target: BoundedText | TextIO = getattr(self.local, "buffer", None) or self.fallback
        return target.write(text)

    def flush(self) -> None:
        target: BoundedText | TextIO = getattr(self.local, "buffer", None) or self.fallback
        target.flush()


_install_lock = threading.Lock()


def _dispatcher(name: str) -> _PerThreadStream:
    current = getattr(sys, name)
    if isinstance(current, _PerThreadStream):
        return current  # installed already: no lock on the hot path
    with _install_lock:
        current = getattr(sys, name)
        if not isinstance(current, _PerThreadStream):
            current = _PerThreadStream(current)
            setattr(sys, name, current)
        return current


@contextmanager
def captured_output(limit: int) -> Iterator[tuple[BoundedText, BoundedText]]:
    """Capture this thread's ``print`` output and stderr into two bounded buffers."""
    out, err = BoundedText(limit), BoundedText(limit)
    streams = (_dispatcher("stdout"), _dispatcher("stderr"))
    for stream, buffer in zip(streams, (out, err)):
        stream.local.buffer = buffer
    try:
        yield out, err
    finally:
        for stream in streams:
            stream.local.buffer = None


#: Standard output and standard error, as file descriptors.
_DESCRIPTORS = (1, 2)


def redirect_descriptors() -> None:
    """Point descriptors 1 and 2 at unnamed files of this process's own, append-only.

    Append-only because a task's subprocesses share these descriptors (and their offset):
    after ``with_descriptor_output`` empties a file, their next write lands at its start.
    """
    for descriptor in _DESCRIPTORS:
        with tempfile.TemporaryFile() as file:
            flags = fcntl.fcntl(file.fileno(), fcntl.F_GETFL)
            fcntl.fcntl(file.fileno(), fcntl.F_SETFL, flags | os.O_APPEND)
            os.dup2(file.fileno(), descriptor)


def clear_descriptors() -> None:
    """Forget what reached descriptors 1 and 2 so far (output of no task's, between tasks)."""
    for descriptor in _DESCRIPTORS:
        # Emptying an empty file still costs ~3 µs, looking at its size ~1, and most tasks
        # print nothing (a worker process clears both files before each task).
        if os.fstat(descriptor).st_size:
            os.ftruncate(descriptor, 0)


def with_descriptor_output(stdout: str, stderr: str, limit: int) -> tuple[str, str]:
    """What a task printed, each followed by what reached descriptors 1 and 2 since they were
    cleared (they are emptied again); each stream's whole kept within ``limit`` bytes, the
    rest counted and marked."""
    for stream in (sys.stdout, sys.stderr):
        # What other threads wrote through Python's own buffers; a task may have closed them.
        with suppress(ValueError, OSError):
            stream.flush()
    out, err = (_followed_by(text, descriptor, limit)
                for text, descriptor in zip((stdout, stderr), _DESCRIPTORS))
    return out, err


def _followed_by(text: str, descriptor: int, limit: int) -> str:
    """``text`` followed by what reached ``descriptor``, which is emptied after it is read
    (one look at its size serves both: most tasks print nothing)."""
    size = os.fstat(descriptor).st_size
    if size == 0:
        return text
    room = max(limit - len(text.encode("utf-8", "replace")), 0)
    data = os.pread(descriptor, min(size, room), 0)
    os.ftruncate(descriptor, 0)
    kept = BoundedText(room)
    kept.write(data.decode("utf-8", "replace"))
    kept.skip(size - len(data))
    return text + kept.text()
