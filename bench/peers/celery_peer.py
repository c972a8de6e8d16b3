"""Celery 5 peer: rpc:// results on the same RabbitMQ, a threads or prefork worker with c=2."""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from celery import Celery, Task
from celery.result import AsyncResult

from bench.cpu import ProcessRoot
from bench.harness import TASK_TIMEOUT_S, System, time_round_trips, time_sweep
from bench.peers import _process
from bench.peers._amqp import delete_broker_objects, unique_name
from bench.peers.celery_app import NOOP_TASK_NAME, READY_MARKER, make_app

logger = logging.getLogger(__name__)

#: Worker processes or threads.
CELERY_CONCURRENCY = 2
#: Seconds to wait for the worker to report ready.
WORKER_START_TIMEOUT_S = 60.0


class CelerySystem(System):
    """A Celery client in this process and one ``celery worker`` subprocess."""

    def __init__(self, pool: str) -> None:
        if pool not in ("threads", "prefork"):
            raise ValueError(f"unsupported Celery pool {pool!r}")
        self.pool = pool
        self.name = f"celery-{pool}"
        self._queue: str | None = None
        self._app: Celery | None = None
        self._worker: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> None:
        """Start the worker on a fresh queue and build the client app."""
        self._queue = unique_name(f"celery.{self.pool}")
        self._workdir = tempfile.TemporaryDirectory(prefix="bench-celery-")
        self._app = make_app(self._queue)
        log_path = Path(self._workdir.name) / "worker.log"
        args = [
            sys.executable, "-m", "celery", "-A", "bench.peers.celery_app", "worker",
            "--pool", self.pool, "--concurrency", str(CELERY_CONCURRENCY),
            "--queues", self._queue, "--hostname", f"{self._queue}@%h",
            "--without-heartbeat", "--without-gossip", "--without-mingle",
            "--loglevel", "WARNING",
        ]  # fmt: skip
        self._worker = _process.start_worker(args, log_path)
        _process.wait_for_line(self._worker, READY_MARKER, WORKER_START_TIMEOUT_S, log_path)

    def stop(self) -> None:
        """Stop the worker, close the client app and delete the queue and its exchange."""
        try:
            _process.stop_worker(self._worker)
            self._worker = None
            if self._app is not None:
                self._app.close()
                self._app = None
        finally:
            if self._queue is not None:
                # Celery names the default exchange after the default queue
                delete_broker_objects(queues=[self._queue], exchanges=[self._queue])
                self._queue = None
            if self._workdir is not None:
                self._workdir.cleanup()
                self._workdir = None

    def run_throughput(self, n: int) -> float:
        """``.delay()`` ``n`` tasks, then ``.get()`` every result."""
        task = self._task()

        def wait(result: AsyncResult, left: float) -> None:
            result.get(timeout=left)

        return time_sweep(n, task.delay, wait)

    def run_latency(self, n: int) -> list[float]:
        """``.delay().get()`` ``n`` times."""
        task = self._task()
        return time_round_trips(n, lambda: task.delay().get(timeout=TASK_TIMEOUT_S))

    def processes(self) -> list[ProcessRoot]:
        """The worker process (and its prefork children)."""
        assert self._worker is not None, "start() first"
        return [ProcessRoot("workers", pid=self._worker.pid)]

    def _task(self) -> Task:
        assert self._app is not None, "start() first"
        return self._app.tasks[NOOP_TASK_NAME]
