"""Capture what a task prints, per thread and bounded, with truncation marked.

``sys.stdout`` and ``sys.stderr`` are process-wide, and the thread engine runs several
tasks at once, so redirecting them per task would mix outputs. Instead a dispatching
stream is installed once; each thread running a task points it at that task's buffer,
and every other thread writes through to the original stream. Output written to the
file descriptors directly (by a subprocess, or C code) is not captured.
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["BoundedText", "captured_output"]


class BoundedText:
    """Keeps the first ``limit`` bytes (UTF-8) written to it and counts the rest.

    Only the per-thread dispatcher writes to it, so it needs no more of the file API
    than ``write`` and ``flush`` (and stays cheap to create for every task).
    """

    __slots__ = ("_limit", "_parts", "_size", "_dropped")

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
