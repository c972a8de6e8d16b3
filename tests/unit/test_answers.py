"""A worker's answers read in bulk: the framing and bounds of Connection.recv_bytes, kept."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from gc_agent.engines.answers import READ_SIZE, AnswerReader

LIMIT = 1 << 20


@pytest.fixture
def pair() -> Iterator[tuple[Connection, socket.socket, AnswerReader]]:
    """The worker's end (a Connection, and its raw socket for hostile bytes) and our reader."""
    ours, theirs = socket.socketpair()
    worker = Connection(os.dup(theirs.fileno()))
    try:
        yield worker, theirs, AnswerReader(ours.fileno())
    finally:
        worker.close()
        theirs.close()
        ours.close()


def test_answers_come_back_whole_and_in_order_however_the_bytes_arrive(
        pair: tuple[Connection, socket.socket, AnswerReader]) -> None:
    worker, _, answers = pair
    sent = [b"", b"a" * 100, b"b" * 20_000, b"c" * (READ_SIZE + 3), b"d"]
    # Written while they are read (more than a socket buffers): a read takes several
    # answers, or part of one.
    writer = threading.Thread(target=lambda: [worker.send_bytes(answer) for answer in sent])
    writer.start()
    assert [answers.next(LIMIT) for _ in sent] == sent
    writer.join()


def test_a_large_answer_is_let_go_once_read(
        pair: tuple[Connection, socket.socket, AnswerReader]) -> None:
    # The reader keeps no copy of an answer it handed out: the agent would hold up to a
    # result's size per slot until that worker's next answer.
    worker, _, answers = pair
    size = 8 * 2**20
    writer = threading.Thread(target=worker.send_bytes, args=(b"x" * size,))
    writer.start()
    tracemalloc.start()
    try:
        assert len(answers.next(2 * size)) == size  # (dropped at once)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        writer.join()
    assert held < size // 8


def test_an_answer_written_in_pieces_waits_for_its_last_byte(
        pair: tuple[Connection, socket.socket, AnswerReader]) -> None:
    _, raw, answers = pair
    frame = struct.pack("!i", 6) + b"abcdef" + struct.pack("!i", 1) + b"g"

    def dribble() -> None:
        for byte in frame:
            raw.sendall(bytes([byte]))
            time.sleep(0.001)

    writer = threading.Thread(target=dribble)
    writer.start()
    assert answers.next(LIMIT) == b"abcdef"
    assert answers.next(LIMIT) == b"g"
    writer.join()


def test_the_long_length_form_is_read_as_recv_bytes_reads_it(
        pair: tuple[Connection, socket.socket, AnswerReader]) -> None:
    _, raw, answers = pair
    raw.sendall(struct.pack("!i", -1) + struct.pack("!Q", 3) + b"xyz")
    assert answers.next(LIMIT) == b"xyz"


@pytest.mark.parametrize("header", [
    struct.pack("!i", LIMIT + 1),                           # over the bound
    struct.pack("!i", -2),                                  # negative, not the long form
    struct.pack("!i", -1) + struct.pack("!Q", LIMIT + 1),   # the long form, over the bound
], ids=["over the bound", "negative", "long form over the bound"])
def test_a_length_task_code_forged_is_refused_before_anything_is_read_for_it(
        pair: tuple[Connection, socket.socket, AnswerReader], header: bytes) -> None:
    _, raw, answers = pair
    raw.sendall(header)
    with pytest.raises(OSError, match="bad message length"):
        answers.next(LIMIT)


@pytest.mark.parametrize("written", [b"", struct.pack("!i", 10) + b"short", b"\x00\x00"],
                         ids=["nothing", "half an answer", "half a length"])
def test_the_socket_closing_before_a_whole_answer_is_end_of_file(
        pair: tuple[Connection, socket.socket, AnswerReader], written: bytes) -> None:
    worker, raw, answers = pair
    raw.sendall(written)
    raw.close()
    worker.close()
    with pytest.raises(EOFError):
        answers.next(LIMIT)
