"""Dramatiq peer: a RabbitMQ broker in a fresh vhost, results in Redis, one worker subprocess.

Dramatiq runs as its users run it: its defaults (persistent messages on durable queues,
a task acked after it ran, no publisher confirms) and its Redis result backend, whose keys
live under a namespace of this run's own that ``stop()`` deletes. The worker is Dramatiq's
CLI with ``processes`` processes of ``threads`` threads each.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import redis

from bench.cpu import ProcessRoot
from bench.harness import TASK_TIMEOUT_S, System, time_round_trips, time_sweep
from bench.peers import _process
from bench.peers._amqp import create_vhost, delete_vhost, vhost_url
from bench.peers.dramatiq_app import (
    AMQP_URL_VARIABLE,
    NAMESPACE_VARIABLE,
    QUEUE,
    READY_MARKER,
    REDIS_URL,
    DramatiqSetup,
    make_broker,
)

#: Worker processes, and threads in each: like the other peers, two of them at once.
DRAMATIQ_PROCESSES = 1
DRAMATIQ_THREADS = 2
#: Seconds to wait for the first worker process to consume.
WORKER_START_TIMEOUT_S = 60.0


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 100)


def _check_redis() -> None:
    try:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5) as client:
            client.ping()
    except redis.RedisError as exc:
        raise RuntimeError(f"the Dramatiq peer keeps its results in Redis at {REDIS_URL}, which "
                           f"does not answer ({exc}): start redis-server (Debian package "
                           "redis-server)") from exc


class DramatiqSystem(System):
    """A Dramatiq client in this process and one ``dramatiq`` worker subprocess."""

    name = "dramatiq"

    def __init__(self, processes: int = DRAMATIQ_PROCESSES, threads: int = DRAMATIQ_THREADS) -> None:
        self.processes_count = processes
        self.threads = threads
        self._vhost: str | None = None
        self._namespace = f"bench-dramatiq-{uuid.uuid4().hex[:8]}"
        self._setup: DramatiqSetup | None = None
        self._worker: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> None:
        """Create the vhost, build the client's broker, start the worker and wait until it consumes.

        Raises:
            RuntimeError: if Redis does not answer.
        """
        _check_redis()
        self._vhost = create_vhost("dramatiq")
        url = vhost_url(self._vhost)
        self._setup = make_broker(url, self._namespace)
        self._workdir = tempfile.TemporaryDirectory(prefix="bench-dramatiq-")
        log_path = Path(self._workdir.name) / "worker.log"
        args = [sys.executable, "-m", "dramatiq", "bench.peers.dramatiq_app:setup_from_environment",
                "--processes", str(self.processes_count), "--threads", str(self.threads),
                "--queues", QUEUE]
        self._worker = _process.start_worker(
            args, log_path, {AMQP_URL_VARIABLE: url, NAMESPACE_VARIABLE: self._namespace})
        _process.wait_for_line(self._worker, READY_MARKER, WORKER_START_TIMEOUT_S, log_path)

    def stop(self) -> None:
        """Stop the worker, close the client's broker, delete the vhost and our Redis keys."""
        try:
            _process.stop_worker(self._worker)
            self._worker = None
            if self._setup is not None:
                self._setup.broker.close()
                self._setup = None
        finally:
            if self._vhost is not None:
                delete_vhost(self._vhost)
                self._vhost = None
            with redis.Redis.from_url(REDIS_URL) as client:
                keys = list(client.scan_iter(match=f"{self._namespace}:*", count=1000))
                if keys:
                    client.delete(*keys)
            if self._workdir is not None:
                self._workdir.cleanup()
                self._workdir = None

    def run_throughput(self, n: int) -> float:
        """``send()`` ``n`` messages, then block on every result."""
        setup = self._started()
        return time_sweep(n, setup.noop.send, lambda message, left: message.get_result(
            backend=setup.backend, block=True, timeout=_ms(left)))

    def run_latency(self, n: int) -> list[float]:
        """``send().get_result(block=True)`` ``n`` times."""
        setup = self._started()
        return time_round_trips(n, lambda: setup.noop.send().get_result(
            backend=setup.backend, block=True, timeout=_ms(TASK_TIMEOUT_S)))

    def processes(self) -> list[ProcessRoot]:
        """The worker (its forked worker processes with it) and the Redis server."""
        assert self._worker is not None, "start() first"
        with redis.Redis.from_url(REDIS_URL) as client:
            redis_pid = int(client.info("server")["process_id"])
        return [ProcessRoot("workers", pid=self._worker.pid),
                ProcessRoot("result store", pid=redis_pid, descendants=False)]

    def _started(self) -> DramatiqSetup:
        assert self._setup is not None, "start() first"
        return self._setup
