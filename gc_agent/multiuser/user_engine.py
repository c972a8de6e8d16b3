"""A user's htex engine process: started by ``RemoteEngine`` as that user, serves root's socket.

``python -m gc_agent.multiuser.user_engine FD`` — FD is its end of a socket pair. The first
message names the engine and carries its config; then come ``submit``, ``cancel``,
``take_waiting`` and ``shutdown``. It answers with ``outcome``, ``cancelled``, ``taken``,
``status`` (every few seconds) and, if its engine cannot start, ``failed``. Parsl's files
(logs, submit scripts, CurveZMQ keys) live under ``~/.gc-fabric/htex/<name>``, its log in
``engine.log`` there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from gc_agent.config import HtexEngineConfig
from gc_agent.engines.htex import HtexEngine
from gc_agent.wire import job_from_wire, outcome_to_wire

__all__ = ["serve"]

logger = logging.getLogger(__name__)

#: Seconds between status reports to root (its heartbeat shows the latest).
STATUS_PERIOD = 2.0


class _Channel:
    """JSON lines to root, from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.reader = sock.makefile("r", encoding="utf-8")
        self._writer = sock.makefile("w", encoding="utf-8")
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._writer.write(json.dumps(message) + "\n")
            self._writer.flush()


def serve(channel: _Channel) -> None:
    """Run one htex engine for root until told to stop or root goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the agent's to handle
    start = json.loads(channel.reader.readline())
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(start["name"]))
    run_dir = Path.home() / ".gc-fabric" / "htex" / name
    _log_to(run_dir / "engine.log")
    try:
        engine = HtexEngine(HtexEngineConfig.model_validate(start["config"]), run_dir)
        engine.start()
    except Exception as exc:
        logger.exception("the htex engine did not start")
        channel.send({"op": "failed", "message": f"{type(exc).__name__}: {exc}"})
        return
    stopping = threading.Event()
    threading.Thread(target=_report_status, args=(engine, channel, stopping), daemon=True).start()
    try:
        for line in channel.reader:
            if not _handle(engine, channel, json.loads(line)):
                break
    finally:
        stopping.set()
        engine.shutdown()


def _handle(engine: HtexEngine, channel: _Channel, message: dict[str, Any]) -> bool:
    """Act on one request from root; False means stop."""
    op = str(message["op"])
    if op == "submit":
        engine.submit(job_from_wire(message["job"]), lambda outcome: channel.send(
            {"op": "outcome", "outcome": outcome_to_wire(outcome)}))
    elif op == "cancel":
        result = engine.cancel(message["task_id"])
        channel.send({"op": "cancelled", "task_id": message["task_id"], "result": result})
    elif op == "take_waiting":
        channel.send({"op": "taken", "result": [job.task_id for job, _ in engine.take_waiting()]})
    return op != "shutdown"


def _report_status(engine: HtexEngine, channel: _Channel, stopping: threading.Event) -> None:
    while not stopping.wait(STATUS_PERIOD):
        try:
            channel.send({"op": "status", "status": engine.status()})
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
