"""Reading a worker's answers in bulk: many per system call, not two each.

A worker process answers each job as it ends, with ``Connection.send_bytes``: a 4-byte
big-endian length (or -1 and an 8-byte length), then the answer. Read back with
``Connection.recv_bytes`` that is two reads per answer, and each read lets go of the GIL;
the slot thread then waits to get it back from the agent's IO thread, which is busy
decoding and publishing for the whole endpoint, up to the interpreter's switch interval
(5 ms) each time. The engine alone, 30,000 no-op jobs on two workers with another thread
of the process kept busy, ran 540-980 jobs a second that way; reading whatever the socket
holds at once (one read for many answers), 3,900-5,200, and with no other thread busy it is
no slower (28,700-31,200 against 25,800-29,900 in alternating runs). Framing and bounds are
the ones ``recv_bytes`` applies.
"""

from __future__ import annotations

import os
import struct

__all__ = ["AnswerReader"]

#: Bytes asked of the socket per read: room for a batch's worth of small answers.
READ_SIZE = 256 * 2**10

_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")


class AnswerReader:
    """The answers arriving on ``fd``, one frame at a time, read ahead in bulk.

    Whatever task code writes to the socket is read here too: a length that is negative
    (but the long form's -1) or over the caller's bound is refused as ``recv_bytes``
    refuses it (OSError), and the socket closing, even mid-answer, is EOFError.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        #: Where the next unread byte of ``_buffer`` is.
        self._start = 0

    def next(self, limit: int) -> bytes:
        """The next answer, at most ``limit`` bytes long.

        Raises:
            EOFError: the socket closed before a whole answer came.
            OSError: the socket failed, or the answer's length is malformed or over ``limit``.
        """
        buffer, start = self._buffer, self._start
        if len(buffer) - start >= _LENGTH.size:  # most answers: already read, whole
            (length,) = _LENGTH.unpack_from(buffer, start)
            end = start + _LENGTH.size + length
            if 0 <= length <= limit and end <= len(buffer):
                answer = bytes(buffer[start + _LENGTH.size:end])
                self._advance(end)
                return answer
        (length,) = _LENGTH.unpack(self._take(_LENGTH.size))
        if length == -1:
            (length,) = _LONG_LENGTH.unpack(self._take(_LONG_LENGTH.size))
        if length < 0 or length > limit:
            raise OSError("bad message length")
        return self._take(length)

    def _take(self, size: int) -> bytes:
        """The next ``size`` bytes, reading until they are here."""
        while len(self._buffer) - self._start < size:
            self._read(size - (len(self._buffer) - self._start))
        end = self._start + size
        with memoryview(self._buffer) as view:  # (released at once: the buffer may change next)
            taken = bytes(view[self._start:end])
        self._advance(end)
        return taken

    def _advance(self, end: int) -> None:
        """Everything before ``end`` is handed out. A buffer grown past READ_SIZE for a large
        answer goes once all of it is, not at the next read: that could be long after, and
        the agent would hold up to a result's size a slot meanwhile."""
        if end == len(self._buffer) and end > READ_SIZE:
            self._buffer, self._start = bytearray(), 0
        else:
            self._start = end

    def _read(self, wanted: int) -> None:
        if self._start:  # drop what was taken before the buffer grows
            del self._buffer[:self._start]
            self._start = 0
        chunk = os.read(self._fd, max(READ_SIZE, wanted))
        if not chunk:
            raise EOFError
        self._buffer += chunk
