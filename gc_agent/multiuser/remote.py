"""A user's own high-throughput engine, run as that user in a process of its own.

On a multi-user endpoint the root agent must not run Parsl for a user: the interchange
and every batch job it submits would be root's. ``RemoteEngine`` starts
``python -m gc_agent.multiuser.user_engine`` as the mapped account (initgroups, setgid,
setuid, a clean environment, the account's home, a session of its own and none of root's
standard streams, like the user's process workers), which runs an ``HtexEngine`` — so
``sbatch`` runs as the user and the jobs are the user's.

The two talk JSON lines over a socket pair. Nothing the user's process sends is unpickled
by root: outcomes are validated models, and only for task ids root handed over. A line
that does not decode is dropped; one longer than any outcome can be stops the engine.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
from typing import Any, BinaryIO

from gc_agent.config import HtexEngineConfig
from gc_agent.engines.base import CancelResult, Engine, OnDone
from gc_agent.engines.processes import MAX_ANSWER_BYTES, WorkerLaunch
from gc_agent.execution import Job, Outcome
from gc_agent.wire import job_to_wire, outcome_from_wire
from gc_core.protocol import ErrorInfo

__all__ = ["RemoteEngine"]

logger = logging.getLogger(__name__)

#: Seconds root waits for the user's engine to answer a cancel or a take-back.
REPLY_TIMEOUT = 10.0
#: Seconds a stopping user engine gets beyond its own shutdown timeout before it is killed.
EXIT_GRACE = 30.0
class RemoteEngine(Engine):
    """Root's handle on a user's htex engine process."""

    name = "htex"

    def __init__(self, config: HtexEngineConfig, launch: WorkerLaunch, *, name: str) -> None:
        self._config = config
        self._launch = launch
        self._name = name
        self._pending: dict[str, tuple[Job, OnDone]] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._replies: dict[str, Any] = {}
        self._replied = threading.Condition(self._lock)
        self._status: dict[str, Any] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._writer: Any = None
        self._failure = ""
        self.alive = False

    @property
    def capacity(self) -> int:
        provider = self._config.provider
        return self._config.max_workers_per_node * provider.nodes_per_block * provider.max_blocks

    @property
    def busy(self) -> int:
        return len(self._pending)

    def status(self) -> dict[str, Any]:
        return dict(self._status)

    def start(self) -> None:
        """Start the user's engine process; it brings up its interchange and blocks itself."""
        self._process, ours = self._launch.spawn("gc_agent.multiuser.user_engine")
        self._writer = ours.makefile("w", encoding="utf-8")
        reader = ours.makefile("rb")
        self.alive = True
        self._send({"op": "start", "name": self._name, "config": self._config.model_dump(mode="json")})
        threading.Thread(target=self._read, args=(reader,), daemon=True,
                         name=f"user-engine-{self._name}").start()

    def submit(self, job: Job, on_done: OnDone) -> None:
        with self._lock:
            self._pending[job.task_id] = (job, on_done)
        if not self._send({"op": "submit", "job": job_to_wire(job)}):
            self._finish(job.task_id, Outcome(job.task_id, "failed", lost=True))

    def cancel(self, task_id: str) -> CancelResult:
        with self._lock:
            if task_id not in self._pending:
                return "unknown"
        answer = self._ask({"op": "cancel", "task_id": task_id}, f"cancel {task_id}")
        return answer if answer in ("removed", "abandoned", "interrupted") else "unknown"

    def take_waiting(self) -> list[tuple[Job, OnDone]]:
        answer = self._ask({"op": "take_waiting"}, "take_waiting")
        with self._lock:
            return [self._pending.pop(task_id) for task_id in answer or []
                    if isinstance(task_id, str) and task_id in self._pending]

    def shutdown(self) -> None:
        if self._process is None:
            return  # never started
        self._send({"op": "shutdown"})
        try:
            self._process.wait(self._config.shutdown_timeout + EXIT_GRACE)
        except subprocess.TimeoutExpired:
            logger.warning("user engine %s did not stop; killing it", self._name)
            self._process.kill()
            self._process.wait()

    # -- the channel ---------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> bool:
        try:
            with self._send_lock:
                self._writer.write(json.dumps(message) + "\n")
                self._writer.flush()
            return True
        except (OSError, ValueError):
            return False  # the user's engine is gone; _read reports its tasks

    def _ask(self, message: dict[str, Any], key: str) -> Any:
        """Send a request and wait for its answer (None if none comes in time)."""
        if not self._send(message):
            return None
        with self._replied:
            self._replied.wait_for(lambda: key in self._replies or not self.alive, REPLY_TIMEOUT)
            return self._replies.pop(key, None)

    def _read(self, reader: BinaryIO) -> None:
        while line := reader.readline(MAX_ANSWER_BYTES + 1):
            if len(line) > MAX_ANSWER_BYTES:
                # Longer than any outcome can be: the rest of the stream cannot be trusted
                # to line up with messages, so the engine is stopped and its tasks reported.
                logger.warning("user engine %s sent a message over %d bytes; stopping it",
                               self._name, MAX_ANSWER_BYTES)
                if self._process is not None:
                    self._process.kill()
                break
            try:
                self._handle(json.loads(line))
            except Exception as exc:  # noqa: BLE001 - a user's process may send anything
                # (deep JSON raises RecursionError): one bad message is dropped, never the reader.
                logger.warning("user engine %s sent a malformed message (%d bytes): %s",
                               self._name, len(line), type(exc).__name__)
        self._gone()

    def _handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "outcome":
            outcome = outcome_from_wire(message["outcome"])
            self._finish(outcome.task_id, outcome)
        elif op == "status" and isinstance(message["status"], dict):
            self._status = message["status"]
        elif op in ("cancelled", "taken"):
            key = f"cancel {message['task_id']}" if op == "cancelled" else "take_waiting"
            with self._replied:
                self._replies[key] = message["result"]
                self._replied.notify_all()
        elif op == "failed":
            self._failure = str(message["message"])
            logger.error("the engine of %s failed to start: %s", self._name, self._failure)

    def _finish(self, task_id: str, outcome: Outcome) -> None:
        with self._lock:
            item = self._pending.pop(task_id, None)
        if item is None:
            return  # not ours, or reported already
        try:
            item[1](outcome)
        except Exception:
            logger.exception("handling the outcome of task %s failed", task_id)

    def _gone(self) -> None:
        """The process ended: its tasks fail with the reason it gave, else go back to the queue."""
        with self._replied:
            self.alive = False
            self._replied.notify_all()
            pending, self._pending = list(self._pending.items()), {}
        for task_id, (_job, on_done) in pending:
            if self._failure:
                on_done(Outcome(task_id, "failed", error=ErrorInfo(
                    type="EngineStartFailed", message=f"the htex engine of {self._name} could "
                                                      f"not start: {self._failure}")))
            else:
                on_done(Outcome(task_id, "failed", lost=True))
