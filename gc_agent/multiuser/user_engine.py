"""A user's htex engine process: started by ``RemoteEngine`` as that user, serves root's socket.

``python -m gc_agent.multiuser.user_engine FD`` — FD is its end of a socket pair, carrying the
messages of ``gc_agent.wire``. The first, ``start``, names the engine and carries its config;
then come ``submit``, ``cancel``, ``take_waiting`` and ``shutdown``. It answers with
``outcome``, ``cancelled``, ``taken``, ``status`` (every few seconds), ``refused`` for a
request it cannot decode and, if its engine cannot start, ``start_failed``. Parsl's files
(logs, submit scripts, CurveZMQ keys) live under ``~/.gc-fabric/htex/<name>``, its log in
``engine.log`` there.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from gc_agent.engines.base import Engine
from gc_agent.engines.htex import HtexEngine
from gc_agent.wire import (
    CancelledReport,
    CancelRequest,
    OutcomeReport,
    RefusedReport,
    Report,
    Request,
    ShutdownRequest,
    StartFailedReport,
    StartRequest,
    StatusReport,
    SubmitRequest,
    TakenReport,
    TakeWaitingRequest,
    decode_request,
    encode_message,
)
from gc_core.errors import ProtocolError

__all__ = ["handle_requests", "serve"]

logger = logging.getLogger(__name__)

#: Seconds between status reports to root (its heartbeat shows the latest).
STATUS_PERIOD = 2.0


class _Channel:
    """JSON lines from root, and to root from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.reader = sock.makefile("rb")
        self._writer = sock.makefile("wb")
        self._lock = threading.Lock()

    def send(self, report: Report) -> None:
        with self._lock:
            self._writer.write(encode_message(report))
            self._writer.flush()


def serve(channel: _Channel) -> None:
    """Run one htex engine for root until told to stop or root goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the agent's to handle
    start = _read_start(channel)
    if start is None:
        return
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", start.name)
    run_dir = Path.home() / ".gc-fabric" / "htex" / name
    _log_to(run_dir / "engine.log")
    try:
        engine = HtexEngine(start.config, run_dir)
        engine.start()
    except Exception as exc:
        logger.exception("the htex engine did not start")
        channel.send(StartFailedReport(reason=f"{type(exc).__name__}: {exc}"))
        return
    stopping = threading.Event()
    threading.Thread(target=_report_status, args=(engine, channel, stopping), daemon=True).start()
    try:
        handle_requests(engine, channel.reader, channel.send)
    finally:
        stopping.set()
        engine.shutdown()


def _read_start(channel: _Channel) -> StartRequest | None:
    """Root's first message; None if root is gone, or has been told why it is no good start."""
    line = channel.reader.readline()
    if not line:
        return None
    try:
        request = decode_request(line)
    except ProtocolError as exc:
        problem = str(exc)
    else:
        if isinstance(request, StartRequest):
            return request
        problem = f"the first message must be start, not {request.op}"
    channel.send(StartFailedReport(reason=problem))
    return None


def handle_requests(engine: Engine, lines: Iterable[bytes], send: Callable[[Report], None]) -> None:
    """Act on root's requests, one a line, until a shutdown or the end of ``lines``.

    A line that does not decode is refused (root logs the problem) and the next one served.
    """
    for line in lines:
        try:
            request = decode_request(line)
        except ProtocolError as exc:
            logger.error("refused a malformed request from root (%d bytes): %s", len(line), exc)
            send(RefusedReport(problem=str(exc)))
            continue
        if isinstance(request, ShutdownRequest):
            return
        _handle(engine, request, send)


def _handle(engine: Engine, request: Request, send: Callable[[Report], None]) -> None:
    """Act on one request from root (a shutdown is the caller's)."""
    if isinstance(request, SubmitRequest):
        engine.submit(request.job, lambda outcome: send(OutcomeReport(outcome=outcome)))
    elif isinstance(request, CancelRequest):
        send(CancelledReport(task_id=request.task_id, result=engine.cancel(request.task_id)))
    elif isinstance(request, TakeWaitingRequest):
        send(TakenReport(task_ids=[job.task_id for job, _ in engine.take_waiting()]))
    elif isinstance(request, StartRequest):
        send(RefusedReport(problem="start: this engine has started already"))


def _report_status(engine: HtexEngine, channel: _Channel, stopping: threading.Event) -> None:
    while not stopping.wait(STATUS_PERIOD):
        try:
            channel.send(StatusReport(status=engine.status()))
        except OSError:
            return


def _log_to(path: Path) -> None:
    """This process's log (and Parsl's warnings) in a file of the user's; stray prints too."""
    from gc_core.logs import configure_logging

    path.parent.mkdir(parents=True, exist_ok=True)
    configure_logging("INFO", log_file=path)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)


if __name__ == "__main__":
    serve(_Channel(socket.socket(fileno=int(sys.argv[1]))))
