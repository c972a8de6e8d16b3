"""What every engine offers the agent, and the worker-slot pool both local engines share."""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Literal

from gc_agent.execution import Job, Outcome, error_info
from gc_core.protocol import ErrorInfo

__all__ = ["CancelResult", "Engine", "OnDone", "SlotPool", "cancelled_outcome"]

logger = logging.getLogger(__name__)

#: Called from an engine thread once a job has an outcome.
OnDone = Callable[[Outcome], None]

#: What cancelling a job did: it had not started (removed), its worker was stopped
#: (interrupted), it runs on but its outcome is dropped (abandoned), or it is not here.
CancelResult = Literal["removed", "interrupted", "abandoned", "unknown"]


def cancelled_outcome(task_id: str, how: str) -> Outcome:
    """The outcome reported for a cancelled job."""
    return Outcome(task_id, "cancelled", error=ErrorInfo(
        type="TaskCancelled", message=f"task {task_id} was cancelled {how}"))


class Engine(ABC):
    """Runs jobs somewhere and reports each outcome once."""

    #: Short name for status and logs.
    name: str = "engine"

    @property
    @abstractmethod
    def capacity(self) -> int:
        """How many jobs can run at once."""

    @property
    @abstractmethod
    def busy(self) -> int:
        """How many jobs are running now."""

    @abstractmethod
    def start(self) -> None:
        """Bring the workers up."""

    def status(self) -> dict[str, Any]:
        """Engine-specific status for the heartbeat (the htex engine: blocks, managers,
        workers); empty when the heartbeat's worker counts say it all."""
        return {}

    @abstractmethod
    def submit(self, job: Job, on_done: OnDone) -> None:
        """Queue a job; ``on_done`` is called exactly once with its outcome."""

    @abstractmethod
    def cancel(self, task_id: str) -> CancelResult:
        """Cancel a job; its ``on_done`` gets a cancelled outcome unless the result is unknown."""

    @abstractmethod
    def take_waiting(self) -> list[tuple[Job, OnDone]]:
        """Remove and return the jobs that have not started (a draining agent requeues them)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the workers; a job still running is abandoned."""


class SlotPool(Engine):
    """A fixed number of slots, each a thread that takes jobs from one shared queue.

    Subclasses say what a slot does with a job (run it in the thread, or hand it to a
    worker process and wait) and whether a running job can be interrupted.
    """

    def __init__(self, max_workers: int) -> None:
        self._max_workers = max_workers
        self._order: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._waiting: dict[str, tuple[Job, OnDone]] = {}
        self._running: dict[str, tuple[int, OnDone]] = {}
        self._cancelled_running: set[str] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closing = False

    @property
    def capacity(self) -> int:
        return self._max_workers

    @property
    def busy(self) -> int:
        return len(self._running)

    def start(self) -> None:
        for slot in range(self._max_workers):
            self._start_slot(slot)
            thread = threading.Thread(target=self._serve, args=(slot,), daemon=True,
                                      name=f"{self.name}-slot-{slot}")
            thread.start()
            self._threads.append(thread)

    def submit(self, job: Job, on_done: OnDone) -> None:
        with self._lock:
            self._waiting[job.task_id] = (job, on_done)
        self._order.put(job.task_id)

    def cancel(self, task_id: str) -> CancelResult:
        # Under the lock the slot cannot finish this job and start another, so an
        # interrupt hits this job and no other.
        with self._lock:
            waiting = self._waiting.pop(task_id, None)
            running = self._running.get(task_id)
            if running is not None:
                self._cancelled_running.add(task_id)
                interrupted = self._interrupt(running[0])
        if waiting is not None:
            waiting[1](cancelled_outcome(task_id, "before it started"))
            return "removed"
        if running is None:
            return "unknown"
        if interrupted:
            return "interrupted"  # the slot reports the cancelled outcome once its worker is gone
        running[1](cancelled_outcome(task_id, "while running; it runs on in its thread, "
                                              "and its result will be dropped"))
        return "abandoned"

    def take_waiting(self) -> list[tuple[Job, OnDone]]:
        with self._lock:
            waiting, self._waiting = list(self._waiting.values()), {}
        return waiting

    def shutdown(self) -> None:
        self._closing = True
        for _ in self._threads:
            self._order.put(None)
        for slot in range(self._max_workers):
            self._stop_slot(slot)
        for thread in self._threads:
            thread.join(timeout=5)

    def _serve(self, slot: int) -> None:
        while (task_id := self._order.get()) is not None:
            with self._lock:
                item = self._waiting.pop(task_id, None)
                if item is None:
                    continue  # cancelled or taken back while it waited
                job, on_done = item
                self._running[task_id] = (slot, on_done)
            outcome = self._outcome(slot, job)
            with self._lock:
                del self._running[task_id]
                cancelled = task_id in self._cancelled_running
                self._cancelled_running.discard(task_id)
            if cancelled and self._interruptible:
                outcome = cancelled_outcome(task_id, "while running; its worker was stopped")
            elif cancelled:
                continue  # the cancelled outcome went out already; drop the late result
            try:
                on_done(outcome)
            except Exception:
                logger.exception("handling the outcome of task %s failed", task_id)

    def _outcome(self, slot: int, job: Job) -> Outcome:
        """Run a job; whatever goes wrong fails that job and never ends the slot's thread."""
        try:
            return self._run(slot, job)
        except Exception as exc:  # noqa: BLE001 - a failing slot fails its task, not the engine
            logger.warning("slot %d of the %s engine failed running task %s: %s: %r", slot,
                           self.name, job.task_id, type(exc).__name__, str(exc)[:300])
            return Outcome(job.task_id, "failed", error=error_info(
                "EngineError", f"the {self.name} engine failed running task {job.task_id}: "
                               f"{type(exc).__name__}: {exc}"))

    #: Whether ``_interrupt`` can stop a running job (a process can be killed, a thread not).
    _interruptible = False

    def _interrupt(self, slot: int) -> bool:
        """Stop the job running in ``slot``; False if this engine cannot."""
        return False

    def _start_slot(self, slot: int) -> None:
        """Prepare a slot before its thread starts (a process pool spawns its worker)."""

    def _stop_slot(self, slot: int) -> None:
        """Release what a slot holds."""

    @abstractmethod
    def _run(self, slot: int, job: Job) -> Outcome:
        """Run one job in ``slot`` and return its outcome."""
