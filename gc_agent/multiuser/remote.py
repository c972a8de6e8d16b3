"""A user's own high-throughput engine, run as that user in a process of its own.

On a multi-user endpoint the root agent must not run Parsl for a user: the interchange
and every batch job it submits would be root's. ``RemoteEngine`` starts
``python -m gc_agent.multiuser.user_engine`` as the mapped account (initgroups, setgid,
setuid, a clean environment, the account's home, a session of its own and none of root's
standard streams, like the user's process workers), which runs an ``HtexEngine`` — so
``sbatch`` runs as the user and the jobs are the user's.

The two talk JSON lines over a socket pair, the messages of ``gc_agent.wire``. Nothing the
user's process sends is unpickled by root: each line is decoded into a validated model, and
an outcome counts only for a task id root handed over. A line that does not decode is logged
with its problem and dropped; one longer than any outcome can be stops the engine.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from typing import Any, BinaryIO

from gc_agent.config import HtexEngineConfig
from gc_agent.engines.base import CancelResult, Engine, OnDone
from gc_agent.engines.processes import MAX_ANSWER_BYTES, WorkerLaunch
from gc_agent.execution import Job, Outcome
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
    decode_report,
    encode_message,
)
from gc_core.errors import ProtocolError
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
        self._replies: dict[str, CancelledReport | TakenReport] = {}
        self._replied = threading.Condition(self._lock)
        self._status: dict[str, Any] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._writer: BinaryIO | None = None
        self._failure = ""
        self.alive = False

    @property
    def capacity(self) -> int:
        provider = self._config.provider
        return self._config.workers_per_node * provider.nodes_per_block * provider.max_blocks

    @property
    def busy(self) -> int:
        return len(self._pending)

    def status(self) -> dict[str, Any]:
        return dict(self._status)

    def start(self) -> None:
        """Start the user's engine process; it brings up its interchange and blocks itself."""
        self._process, ours = self._launch.spawn("gc_agent.multiuser.user_engine")
        self._writer = ours.makefile("wb")
        reader = ours.makefile("rb")
        self.alive = True
        self._send(StartRequest(name=self._name, config=self._config))
        threading.Thread(target=self._read, args=(reader,), daemon=True,
                         name=f"user-engine-{self._name}").start()

    def submit(self, job: Job, on_done: OnDone) -> None:
        with self._lock:
            self._pending[job.task_id] = (job, on_done)
        if not self._send(SubmitRequest(job=job)):
            self._finish(job.task_id, Outcome(job.task_id, "failed", lost=True))

    def cancel(self, task_id: str) -> CancelResult:
        with self._lock:
            if task_id not in self._pending:
                return "unknown"
        answer = self._ask(CancelRequest(task_id=task_id))
        return answer.result if isinstance(answer, CancelledReport) else "unknown"

    def take_waiting(self) -> list[tuple[Job, OnDone]]:
        answer = self._ask(TakeWaitingRequest())
        task_ids = answer.task_ids if isinstance(answer, TakenReport) else []
        with self._lock:
            return [self._pending.pop(task_id) for task_id in task_ids if task_id in self._pending]

    def shutdown(self) -> None:
        if self._process is None:
            return  # never started
        self._send(ShutdownRequest())
        try:
            self._process.wait(self._config.shutdown_timeout + EXIT_GRACE)
        except subprocess.TimeoutExpired:
            logger.warning("user engine %s did not stop; killing it", self._name)
            self._process.kill()
            self._process.wait()

    # -- the channel ---------------------------------------------------------------------

    def _send(self, request: Request) -> bool:
        if self._writer is None:
            return False  # never started
        try:
            with self._send_lock:
                self._writer.write(encode_message(request))
                self._writer.flush()
            return True
        except (OSError, ValueError):
            return False  # the user's engine is gone; _read reports its tasks

    def _ask(self, request: CancelRequest | TakeWaitingRequest) -> CancelledReport | TakenReport | None:
        """Send a request and wait for its answer (None if none comes in time)."""
        key = _reply_key(request)
        if not self._send(request):
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
                report = decode_report(line)
            except ProtocolError as exc:  # a user's process may send anything: drop the line
                logger.warning("user engine %s sent a malformed message (%d bytes): %s",
                               self._name, len(line), exc)
                continue
            self._handle(report)
        self._gone()

    def _handle(self, report: Report) -> None:
        """Act on one message from the user's engine."""
        if isinstance(report, OutcomeReport):
            self._finish(report.outcome.task_id, report.outcome)
        elif isinstance(report, StatusReport):
            self._status = report.status
        elif isinstance(report, (CancelledReport, TakenReport)):
            with self._replied:
                self._replies[_reply_key(report)] = report
                self._replied.notify_all()
        elif isinstance(report, StartFailedReport):
            self._failure = report.reason
            logger.error("the engine of %s failed to start: %s", self._name, self._failure)
        elif isinstance(report, RefusedReport):
            # root sent something the user's engine could not decode: a bug, or two versions
            logger.error("the engine of %s refused a message from this agent: %s",
                         self._name, report.problem)

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


def _reply_key(message: CancelRequest | TakeWaitingRequest | CancelledReport | TakenReport) -> str:
    """What pairs a request with its answer: the task for a cancel, the op for a take-back."""
    if isinstance(message, (CancelRequest, CancelledReport)):
        return f"cancel {message.task_id}"
    return "take_waiting"
