"""Capture what a task prints, per thread and bounded, with truncation marked.

``sys.stdout`` and ``sys.stderr`` are process-wide, and the thread engine runs several
tasks at once, so redirecting them per task would mix outputs. Instead a dispatching
stream is installed once; each thread running a task points it at that task's buffer,
and every other thread writes through to the original stream.

Output written to the file descriptors directly (by a subprocess, C code, or a thread the
task started) is captured only in a process worker, which runs one task at a time: it
points descriptors 1 and 2 at files of its own and adds what reached them to the task's
output (``WorkerOutput``). So nothing a task writes
ever reaches the agent's log, which a worker would otherwise inherit as its descriptors.
"""

from __future__ import annotations

import fcntl
import io
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TextIO

__all__ = ["BoundedText", "WorkerOutput", "captured_output", "utf8_text"]


def utf8_text(text: str) -> str:
    """``text`` as UTF-8 can carry it: a lone surrogate (a file name that is no UTF-8, as
    ``os.listdir`` and ``os.fsdecode`` give it) shown as its escape, ``\\udcff``. JSON and
    AMQP carry no such character: one printed or in an error message failed the whole
    answer, and on a worker process cost the worker and the task."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


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
        written, room = len(text), self._limit - self._size
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            text = utf8_text(text)
            data = text.encode("utf-8")
        if len(data) <= room:
            self._parts.append(text)
            self._size += len(data)
        else:
            kept = data[:max(room, 0)].decode("utf-8", "ignore")
            self._parts.append(kept)
            self._size += len(kept.encode())
            self._dropped += len(data) - len(kept.encode())
        return written

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
#: Seconds between looks at a worker's output files (see ``WorkerOutput``).
WATCH_INTERVAL = 0.25
#: Bytes a worker's output file may hold past the running task's limit before the excess
#: is cut: enough not to cut at every look, little beside a node's temporary disk.
FILE_SLACK = 2**20


class WorkerOutput:
    """A process worker's standard output and error, captured per task.

    Descriptors 1 and 2 point at unnamed append-only files of the worker's own, which it
    reads and empties only through descriptors of its own; ``sys.stdout`` and
    ``sys.stderr`` are the per-thread dispatchers. Task code may undo either (close a
    descriptor, point it at a pipe, open a file that takes number 1; set ``sys.stdout`` to
    None to silence a library): before each task both are put back, and what the last task
    did costs it its descriptor output at most, never the worker (which would end it, the
    task then retried as lost until dead-lettered) nor the task's own file (emptied as if it
    were the worker's). Append-only because a task's subprocesses share these files (and
    their offset): after they are emptied, their next write lands at the start.

    Only the first ``limit`` bytes of each are ever kept, so a thread watches them while a
    task runs: a file past that (and ``FILE_SLACK``) is cut back to it, and what was cut
    is counted. A chatty subprocess therefore takes at most what it writes in
    ``WATCH_INTERVAL`` of the node's temporary disk, not all it writes (an unnamed file
    shows in no ``du``).
    """

    def __init__(self) -> None:
        self._files = tuple(_append_only_file() for _ in _DESCRIPTORS)
        self._streams = (_dispatcher("stdout"), _dispatcher("stderr"))
        #: Taken by the watch and by whoever empties or reads the files.
        self._lock = threading.Lock()
        #: Bytes of each file the running task may keep; bytes cut from each since clear().
        self._limit = 0
        self._cut = [0 for _ in _DESCRIPTORS]
        self.clear(0)
        threading.Thread(target=self._watch, name="gc-output-watch", daemon=True).start()

    def clear(self, limit: int) -> None:
        """Put the descriptors and streams back and forget what reached the descriptors so
        far (output of no task's, between tasks); keep ``limit`` bytes of each from now."""
        sys.stdout, sys.stderr = self._streams
        with self._lock:
            self._limit, self._cut = limit, [0 for _ in _DESCRIPTORS]
            for file, descriptor in zip(self._files, _DESCRIPTORS):
                os.dup2(file, descriptor)
                # The end's offset is the file's size: a third of the cost of os.fstat's, and
                # most tasks print nothing (this runs before and after each of them).
                if os.lseek(file, 0, os.SEEK_END):
                    os.ftruncate(file, 0)

    def following(self, stdout: str, stderr: str, limit: int) -> tuple[str, str]:
        """What a task printed, each followed by what reached descriptors 1 and 2 since
        :meth:`clear` (the files are emptied again); each stream's whole kept within
        ``limit`` bytes, the rest counted and marked."""
        for stream in self._streams:
            # What other threads wrote through Python's own buffers; a task may have closed them.
            with suppress(ValueError, OSError):
                stream.flush()
        with self._lock:
            out, err = (_followed_by(text, file, limit, cut) for text, file, cut
                        in zip((stdout, stderr), self._files, self._cut))
            self._cut = [0 for _ in _DESCRIPTORS]
        return out, err

    def _watch(self) -> None:
        """Cut each file back to the running task's limit once it grows past it."""
        while True:
            time.sleep(WATCH_INTERVAL)
            # (task code may close any descriptor, ours too: then there is nothing to cut)
            with self._lock, suppress(OSError):
                for index, file in enumerate(self._files):
                    # (a write that lands between the two calls is cut uncounted: the
                    # count is a floor)
                    size = os.lseek(file, 0, os.SEEK_END)
                    if size > self._limit + FILE_SLACK:
                        os.ftruncate(file, self._limit)
                        self._cut[index] += size - self._limit


def _append_only_file() -> int:
    """A descriptor of a new unnamed file, opened for appending; not inherited."""
    with tempfile.TemporaryFile() as file:
        flags = fcntl.fcntl(file.fileno(), fcntl.F_GETFL)
        fcntl.fcntl(file.fileno(), fcntl.F_SETFL, flags | os.O_APPEND)
        return os.dup(file.fileno())


def _followed_by(text: str, file: int, limit: int, cut: int) -> str:
    """``text`` followed by what reached ``file`` (which is emptied after it is read) and
    the count of the ``cut`` bytes that reached it too."""
    size = os.lseek(file, 0, os.SEEK_END)
    if size == 0 and not cut:
        return text
    room = max(limit - len(text.encode("utf-8", "replace")), 0)
    data = os.pread(file, min(size, room), 0)
    os.ftruncate(file, 0)
    kept = BoundedText(room)
    kept.write(data.decode("utf-8", "replace"))
    kept.skip(size - len(data) + cut)
    return text + kept.text()
