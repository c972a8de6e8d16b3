"""What every engine offers the agent, and the worker-slot pool both local engines share."""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from typing import Callable

from gc_agent.execution import Job, Outcome

__all__ = ["Engine", "OnDone", "SlotPool"]

logger = logging.getLogger(__name__)

#: Called from an engine thread once a job has an outcome.
OnDone = Callable[[Outcome], None]


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

    @abstractmethod
    def submit(self, job: Job, on_done: OnDone) -> None:
        """Queue a job; ``on_done`` is called exactly once with its outcome."""

    @abstractmethod
    def take_waiting(self) -> list[tuple[Job, OnDone]]:
        """Remove and return the jobs that have not started (a draining agent requeues them)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the workers; a job still running is abandoned."""


class SlotPool(Engine):
    """A fixed number of slots, each a thread that takes jobs from one shared queue.

    Subclasses say what a slot does with a job: run it in the thread, or hand it to a
    worker process and wait.
    """

    def __init__(self, max_workers: int) -> None:
        self._max_workers = max_workers
        self._jobs: queue.SimpleQueue[tuple[Job, OnDone] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._closing = False

    @property
    def capacity(self) -> int:
        return self._max_workers

    @property
    def busy(self) -> int:
        return self._busy

    def start(self) -> None:
        for slot in range(self._max_workers):
            self._start_slot(slot)
            thread = threading.Thread(target=self._serve, args=(slot,), daemon=True,
                                      name=f"{self.name}-slot-{slot}")
            thread.start()
            self._threads.append(thread)

    def submit(self, job: Job, on_done: OnDone) -> None:
        self._jobs.put((job, on_done))

    def take_waiting(self) -> list[tuple[Job, OnDone]]:
        waiting = []
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return waiting
            if item is not None:
                waiting.append(item)

    def shutdown(self) -> None:
        self._closing = True
        for _ in self._threads:
            self._jobs.put(None)
        for slot in range(self._max_workers):
            self._stop_slot(slot)
        for thread in self._threads:
            thread.join(timeout=5)

    def _serve(self, slot: int) -> None:
        while (item := self._jobs.get()) is not None:
            job, on_done = item
            with self._busy_lock:
                self._busy += 1
            try:
                outcome = self._run(slot, job)
            finally:
                with self._busy_lock:
                    self._busy -= 1
            try:
                on_done(outcome)
            except Exception:
                logger.exception("handling the outcome of task %s failed", job.task_id)

    def _start_slot(self, slot: int) -> None:
        """Prepare a slot before its thread starts (a process pool spawns its worker)."""

    def _stop_slot(self, slot: int) -> None:
        """Release what a slot holds."""

    @abstractmethod
    def _run(self, slot: int, job: Job) -> Outcome:
        """Run one job in ``slot`` and return its outcome."""
