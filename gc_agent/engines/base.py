"""What every engine offers the agent, and the worker-slot pool both local engines share."""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from gc_agent.engines.run_times import RunTimes
from gc_agent.execution import Job, Outcome, error_info
from gc_core.protocol import ErrorInfo

__all__ = ["CancelResult", "Engine", "OnDone", "SlotPool", "cancelled_outcome"]

logger = logging.getLogger(__name__)

#: Called from an engine thread once a job has an outcome.
OnDone = Callable[[Outcome], None]

#: What cancelling a job did: it had not started (removed), its worker was stopped
#: (interrupted), it runs on but its outcome is dropped (abandoned), or it is not here.
CancelResult = Literal["removed", "interrupted", "abandoned", "already", "unknown"]


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

    def together(self) -> AbstractContextManager[None]:
        """Jobs submitted inside arrived together (one batch of tasks): an engine may hold
        them until the end and send them on together (the htex engine does)."""
        return nullcontext()

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
    """A fixed number of slots, each a thread that takes jobs from one shared backlog, a
    batch at a time, or is handed them when it is idle.

    Subclasses say what a slot does with a batch (run it in the thread, or hand it to a
    worker process and wait), whether a job handed to an idle slot can be sent on by the
    submitting thread itself, and whether a running job can be interrupted.
    """

    def __init__(self, max_workers: int) -> None:
        self._max_workers = max_workers
        #: Ids of waiting jobs in their order (a cancelled or taken job's id stays until met).
        self._backlog: deque[str] = deque()
        #: Slots whose thread waits on its inbox for work; the rest take from the backlog.
        self._idle: list[int] = []
        #: Per slot: a batch handed to it while idle (and whether it was sent already), or
        #: None to look at the backlog again.
        self._inboxes: list[queue.SimpleQueue[_Handed | None]] = [
            queue.SimpleQueue() for _ in range(max_workers)]
        self._waiting: dict[str, tuple[Job, OnDone]] = {}
        self._running: dict[str, _Claim] = {}
        self._cancelled_running: set[str] = set()
        #: Jobs put back after their worker went away with several of them unanswered: each
        #: runs in a batch of its own next time, so that one that kills its worker is known.
        self._alone: set[str] = set()
        #: How long each function's runs take, for slots that take several jobs at once.
        self._run_times = RunTimes()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closing = False

    @property
    def capacity(self) -> int:
        return self._max_workers

    @property
    def busy(self) -> int:
        with self._lock:  # a slot handed a batch is one busy worker
            return len({claim.slot for claim in self._running.values()})

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
            self._backlog.append(job.task_id)
            if not self._idle:
                return  # a busy slot takes it from the backlog
            slot = self._idle.pop()
            jobs = self._claim(slot)
        # An idle slot's worker gets the job from this thread, while the slot's thread wakes
        # to read the answer: the wake-up is off the job's way.
        self._inboxes[slot].put(_Handed(jobs, bool(jobs) and self._send_now(slot, jobs)))

    def cancel(self, task_id: str) -> CancelResult:
        # Under the lock the slot cannot finish this job and start another, so an
        # interrupt hits this job's worker (its batch-mates run again) and no other.
        with self._lock:
            if task_id in self._cancelled_running:
                return "already"  # a cancel came twice: its job is answered once
            waiting = self._waiting.pop(task_id, None)
            running = self._running.get(task_id)
            if running is not None:
                self._cancelled_running.add(task_id)
                interrupted = self._interrupt(running.slot)
        if waiting is not None:
            waiting[1](cancelled_outcome(task_id, "before it started"))
            return "removed"
        if running is None:
            return "unknown"
        if interrupted:
            return "interrupted"  # the slot reports the cancelled outcome once its worker is gone
        running.on_done(cancelled_outcome(task_id, "while running; it runs on in its thread, "
                                                   "and its result will be dropped"))
        return "abandoned"

    def take_waiting(self) -> list[tuple[Job, OnDone]]:
        with self._lock:
            waiting, self._waiting = list(self._waiting.values()), {}
        return waiting

    def shutdown(self) -> None:
        self._closing = True
        for inbox in self._inboxes:
            inbox.put(None)
        for slot in range(self._max_workers):
            self._stop_slot(slot)
        for thread in self._threads:
            thread.join(timeout=5)

    def _serve(self, slot: int) -> None:
        while not self._closing:
            with self._lock:
                jobs = self._claim(slot)
                if not jobs:
                    self._idle.append(slot)
            if jobs:
                self._run_safely(slot, jobs, sent=False)
            elif (handed := self._inboxes[slot].get()) is not None and handed.jobs:
                self._run_safely(slot, handed.jobs, sent=handed.sent)

    def _claim(self, slot: int) -> list[Job]:
        """Under the lock: the next waiting job and, while more wait than one per slot, a
        fair share of the quick ones after it (at most ``_batch_limit``, see
        ``_batch_seconds``), now running in ``slot``. A job to run alone, or one of a
        function not known to be quick, goes in a batch of its own."""
        jobs: list[Job] = []
        share = min(self._batch_limit, 1 + len(self._backlog) // self._max_workers)
        seconds: float | None = 0.0
        while self._backlog and len(jobs) < share and seconds is not None:
            task_id = self._backlog[0]
            item = self._waiting.get(task_id)
            if item is None:
                self._backlog.popleft()
                continue  # cancelled or taken back while it waited
            job, on_done = item
            seconds = self._with(seconds, job, jobs)
            if seconds is None and jobs:
                break  # it goes in a batch of its own
            self._backlog.popleft()
            del self._waiting[task_id]
            self._running[task_id] = _Claim(slot, on_done, job.function_id)
            jobs.append(job)
        return jobs

    def _with(self, seconds: float, job: Job, batch: list[Job]) -> float | None:
        """Under the lock: the seconds of ``batch`` (``seconds`` so far) with ``job`` added,
        or None if ``job`` is to run alone or may not join it (``RunTimes.added``)."""
        if job.task_id in self._alone:
            return None
        return self._run_times.added(seconds, job, batch[0] if batch else None,
                                     self._batch_seconds)

    def _wake_idle(self) -> None:
        """Have the idle slots look at the backlog again."""
        with self._lock:
            idle, self._idle = self._idle, []
        for slot in idle:
            self._inboxes[slot].put(None)

    def _run_safely(self, slot: int, jobs: list[Job], *, sent: bool) -> None:
        """Run a batch; whatever goes wrong fails its jobs still unanswered and never ends
        the slot's thread."""
        try:
            self._run_batch(slot, jobs, sent=sent)
        except Exception as exc:  # noqa: BLE001 - a failing slot fails its tasks, not the engine
            logger.warning("slot %d of the %s engine failed running %d tasks: %s: %r", slot,
                           self.name, len(jobs), type(exc).__name__, str(exc)[:300])
            with self._lock:
                unanswered = [job.task_id for job in jobs
                              if (claim := self._running.get(job.task_id)) and claim.slot == slot]
            for task_id in unanswered:
                self._report(task_id, Outcome(task_id, "failed", error=error_info(
                    "EngineError", f"the {self.name} engine failed running task {task_id}: "
                                   f"{type(exc).__name__}: {exc}")))

    def _report(self, task_id: str, outcome: Outcome) -> None:
        """Hand on the outcome of a job that ran: one cancelled meanwhile is answered
        cancelled if its worker was stopped, and not again if it ran on in its thread."""
        with self._lock:
            claim = self._running.pop(task_id)
            if self._batch_seconds is not None:  # (what the run times are read for)
                self._run_times.note(claim.function_id, outcome)
            on_done = claim.on_done
            cancelled = task_id in self._cancelled_running
            self._cancelled_running.discard(task_id)
            self._alone.discard(task_id)
        if cancelled and self._interruptible:
            outcome = cancelled_outcome(task_id, "while running; its worker was stopped")
        elif cancelled:
            return  # the cancelled outcome went out already; drop the late result
        try:
            on_done(outcome)
        except Exception:
            logger.exception("handling the outcome of task %s failed", task_id)

    def _run_again(self, jobs: list[Job], *, alone: bool) -> None:
        """Put running jobs back to wait, their worker gone before it answered them
        (``alone``: each to run in a batch of its own); one cancelled meanwhile is answered
        cancelled instead, since its worker was stopped."""
        cancelled = []
        with self._lock:
            for job in reversed(jobs):  # first in the backlog, in their order
                if job.task_id in self._cancelled_running:
                    cancelled.append(job.task_id)
                    continue
                self._waiting[job.task_id] = (job, self._running.pop(job.task_id).on_done)
                self._backlog.appendleft(job.task_id)
                if alone:
                    self._alone.add(job.task_id)
        self._wake_idle()
        for task_id in cancelled:
            self._report(task_id, Outcome(task_id, "cancelled"))  # made the cancelled outcome

    def _interrupted(self, jobs: list[Job]) -> bool:
        """Whether one of ``jobs`` was cancelled while it ran (so its worker was stopped)."""
        with self._lock:
            return any(job.task_id in self._cancelled_running for job in jobs)

    #: Whether ``_interrupt`` can stop a running job (a process can be killed, a thread not).
    _interruptible = False
    #: Most jobs a slot takes at once, when more wait than there are slots.
    _batch_limit = 1
    #: Seconds the runs of the jobs a slot takes at once may add up to, by their functions'
    #: recent runs: a job waiting behind another in its worker has its start held back, and
    #: cannot be cancelled without stopping that worker. None: a batch is bounded by
    #: ``_batch_limit`` alone.
    _batch_seconds: float | None = None

    def _interrupt(self, slot: int) -> bool:
        """Stop the job running in ``slot``; False if this engine cannot."""
        return False

    def _start_slot(self, slot: int) -> None:
        """Prepare a slot before its thread starts (a process pool spawns its worker)."""

    def _stop_slot(self, slot: int) -> None:
        """Release what a slot holds."""

    def _send_now(self, slot: int, jobs: list[Job]) -> bool:
        """Start ``jobs`` in idle ``slot`` from the submitting thread; False if this engine
        leaves that to the slot's thread."""
        return False

    @abstractmethod
    def _run_batch(self, slot: int, jobs: list[Job], *, sent: bool) -> None:
        """Run ``jobs`` in ``slot`` (``sent``: ``_send_now`` started them) and ``_report``
        each one's outcome (or ``_run_again`` those it cannot answer)."""


class _Claim(NamedTuple):
    """A job a slot has taken: the slot, whom to tell its outcome, and its function."""

    slot: int
    on_done: OnDone
    function_id: str


@dataclass(frozen=True, slots=True)
class _Handed:
    """A batch handed to an idle slot; ``sent``: already on its way to the slot's worker."""

    jobs: list[Job]
    sent: bool
