"""Raw AMQP peer: pika's asynchronous SelectConnection on both sides, no framework.

Reliable mode is the baseline every other system is compared with: persistent messages on
durable queues, publisher confirms on the client's task publishes and on the worker's result
publishes, and the worker acks a task only after its result is confirmed. Transient mode
drops persistence, confirms and acks, and is the upper bound. Quorum mode is reliable mode
on quorum queues, the queue type of every gc-fabric queue: what the same wire costs with
the queues gc-fabric's guarantees need (a delivery limit, a queue that outlives its node).

Confirms pipeline only on an asynchronous connection: BlockingConnection waits for each one.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pika
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic, BasicProperties

from bench.cpu import ProcessRoot
from bench.harness import TASK_TIMEOUT_S, System, throughput_timeout
from bench.peers import _process
from bench.peers._amqp import AMQP_URL, delete_broker_objects, queue_arguments, unique_name
from bench.peers._confirms import ConfirmTracker
from bench.peers.raw_amqp_worker import READY_MARKER

logger = logging.getLogger(__name__)

#: Tasks published per turn of the I/O loop, so confirms and results are read in between.
PUBLISH_BATCH = 200
#: Results acked in one multiple-ack frame during a throughput run.
RESULT_ACK_EVERY = 100
#: Unacked results the broker may push to the client.
RESULT_PREFETCH = 2000
#: Body of every task message (the worker ignores it: the task is a no-op).
TASK_BODY = b"noop"
#: Mean round trip (seconds) beyond which a latency run is abandoned as stuck.
MAX_MEAN_ROUND_TRIP_S = 0.1
#: Seconds to wait for the worker to connect and consume.
WORKER_START_TIMEOUT_S = 30.0


class RawAmqpClient:
    """Submits tasks and collects results on one channel, running pika's I/O loop on demand."""

    def __init__(self, url: str, task_queue: str, reply_queue: str, reliable: bool,
                 quorum: bool = False) -> None:
        self.url = url
        self.task_queue = task_queue
        self.reply_queue = reply_queue
        self.reliable = reliable
        self.quorum = quorum
        self._connection: SelectConnection | None = None
        self._channel: Channel | None = None
        self._unconfirmed = ConfirmTracker[None]()
        self._failure: Exception | None = None
        self._closing = False
        self._on_progress: Callable[[], None] = lambda: None
        self._results = 0
        self._last_result_tag = 0
        self._acked_result_tag = 0
        self._last_correlation_id: str | None = None

    def connect(self) -> None:
        """Open the connection, declare both queues and start consuming results."""
        self._connection = SelectConnection(
            pika.URLParameters(self.url),
            on_open_callback=lambda c: c.channel(on_open_callback=self._on_channel_open),
            on_open_error_callback=lambda _c, error: self._fail(f"cannot connect: {error}"),
            on_close_callback=self._on_connection_closed,
        )
        self._run_loop(TASK_TIMEOUT_S)

    def close(self) -> None:
        """Close the connection, waiting briefly for the broker to agree."""
        if self._connection is None or self._connection.is_closed:
            return
        self._closing = True
        self._connection.close()
        try:
            self._run_loop(TASK_TIMEOUT_S)
        except RuntimeError:
            logger.warning("connection did not close cleanly")

    def run_throughput(self, n: int) -> float:
        """Publish ``n`` tasks in batches; return seconds from first publish to last result."""
        start_results = self._results
        published = 0
        started = finished = 0.0

        def publish_batch() -> None:
            nonlocal published, started
            if published == 0:
                started = time.perf_counter()
            for _ in range(min(PUBLISH_BATCH, n - published)):
                self._publish(str(published))
                published += 1
            if published < n:
                self._loop().call_later(0, publish_batch)

        def on_progress() -> None:
            nonlocal finished
            if self._results - start_results == n and not self._unconfirmed:
                finished = time.perf_counter()
                self._ack_results()
                self._loop().stop()

        self._on_progress = on_progress
        self._loop().call_later(0, publish_batch)
        self._run_loop(throughput_timeout(n))
        return finished - started

    def run_latency(self, n: int) -> list[float]:
        """Run ``n`` tasks one at a time; return each publish-to-result-and-confirm time."""
        round_trips: list[float] = []
        started = 0.0
        self._last_correlation_id = None

        def publish_next() -> None:
            nonlocal started
            started = time.perf_counter()
            self._publish(str(len(round_trips)))

        def on_progress() -> None:
            expected = str(len(round_trips))
            if self._last_correlation_id != expected or self._unconfirmed:
                return
            round_trips.append(time.perf_counter() - started)
            self._last_correlation_id = None
            self._ack_results()
            if len(round_trips) == n:
                self._loop().stop()
            else:
                publish_next()

        self._on_progress = on_progress
        self._loop().call_later(0, publish_next)
        self._run_loop(TASK_TIMEOUT_S + n * MAX_MEAN_ROUND_TRIP_S)
        return round_trips

    def _loop(self) -> pika.adapters.select_connection.IOLoop:
        assert self._connection is not None
        return self._connection.ioloop

    def _run_loop(self, timeout_s: float) -> None:
        """Run the I/O loop until a callback stops it; raise if it failed or timed out."""
        self._failure = None
        timer = self._loop().call_later(timeout_s, lambda: self._fail(f"timed out after {timeout_s:.0f}s"))
        try:
            self._loop().start()
        finally:
            self._loop().remove_timeout(timer)
        if self._failure is not None:
            raise self._failure

    def _fail(self, message: str) -> None:
        self._failure = RuntimeError(message)
        self._loop().stop()

    def _on_connection_closed(self, _connection: SelectConnection, reason: BaseException) -> None:
        if self._closing:
            self._loop().stop()
        else:
            self._fail(f"connection closed: {reason}")

    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        if self.reliable:
            channel.confirm_delivery(self._on_confirm, callback=lambda _: self._declare_queues())
        else:
            self._declare_queues()

    def _declare_queues(self) -> None:
        assert self._channel is not None
        channel, arguments = self._channel, queue_arguments(self.quorum)
        channel.queue_declare(
            self.task_queue,
            durable=self.reliable,
            arguments=arguments,
            callback=lambda _: channel.queue_declare(
                self.reply_queue, durable=self.reliable, arguments=arguments,
                callback=self._on_queues_declared,
            ),
        )

    def _on_queues_declared(self, _frame: Method) -> None:
        assert self._channel is not None
        channel = self._channel
        channel.basic_qos(
            prefetch_count=RESULT_PREFETCH,
            callback=lambda _: channel.basic_consume(
                self.reply_queue,
                self._on_result,
                auto_ack=not self.reliable,
                callback=lambda _: self._loop().stop(),
            ),
        )

    def _publish(self, correlation_id: str) -> None:
        assert self._channel is not None
        properties = BasicProperties(
            reply_to=self.reply_queue,
            correlation_id=correlation_id,
            delivery_mode=2 if self.reliable else 1,
        )
        self._channel.basic_publish("", self.task_queue, TASK_BODY, properties)
        if self.reliable:
            self._unconfirmed.published(None)

    def _on_confirm(self, frame: Method) -> None:
        method = frame.method
        released = self._unconfirmed.confirm(method.delivery_tag, method.multiple)
        if isinstance(method, Basic.Nack):
            self._fail(f"broker nacked {len(released)} task publishes")
            return
        self._on_progress()

    def _on_result(
        self, _channel: Channel, method: Basic.Deliver, properties: BasicProperties, _body: bytes
    ) -> None:
        self._results += 1
        self._last_result_tag = method.delivery_tag
        self._last_correlation_id = properties.correlation_id
        if self.reliable and self._results % RESULT_ACK_EVERY == 0:
            self._ack_results()
        self._on_progress()

    def _ack_results(self) -> None:
        """Ack every result received so far in one frame."""
        if self.reliable and self._last_result_tag > self._acked_result_tag:
            assert self._channel is not None
            self._channel.basic_ack(self._last_result_tag, multiple=True)
            self._acked_result_tag = self._last_result_tag


class RawAmqpSystem(System):
    """Raw pika client plus one raw pika worker process: reliable or transient, on classic
    queues or (reliable only) quorum queues."""

    def __init__(self, reliable: bool, quorum: bool = False) -> None:
        if quorum and not reliable:
            raise ValueError("a quorum queue is durable: quorum mode is reliable mode")
        self.reliable = reliable
        self.quorum = quorum
        self.name = "raw-amqp-quorum" if quorum else \
            "raw-amqp-reliable" if reliable else "raw-amqp-transient"
        self._client: RawAmqpClient | None = None
        self._worker: subprocess.Popen[bytes] | None = None
        self._queues: list[str] = []
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> None:
        """Declare the queues, connect the client and start the worker process."""
        base = unique_name("raw")
        task_queue, reply_queue = f"{base}.tasks", f"{base}.results"
        self._queues = [task_queue, reply_queue]
        self._workdir = tempfile.TemporaryDirectory(prefix="bench-raw-")
        self._client = RawAmqpClient(AMQP_URL, task_queue, reply_queue, self.reliable,
                                     self.quorum)
        self._client.connect()
        args = [sys.executable, "-m", "bench.peers.raw_amqp_worker", "--queue", task_queue]
        if not self.reliable:
            args.append("--transient")
        if self.quorum:
            args.append("--quorum")
        log_path = Path(self._workdir.name) / "worker.log"
        self._worker = _process.start_worker(args, log_path)
        _process.wait_for_line(self._worker, READY_MARKER, WORKER_START_TIMEOUT_S, log_path)

    def stop(self) -> None:
        """Kill the worker, close the client and delete the queues."""
        try:
            _process.stop_worker(self._worker)
            self._worker = None
            if self._client is not None:
                self._client.close()
                self._client = None
        finally:
            delete_broker_objects(queues=self._queues)
            self._queues = []
            if self._workdir is not None:
                self._workdir.cleanup()
                self._workdir = None

    def run_throughput(self, n: int) -> float:
        """Publish ``n`` tasks as fast as pika allows and wait for every result."""
        assert self._client is not None, "start() first"
        return self._client.run_throughput(n)

    def run_latency(self, n: int) -> list[float]:
        """Run ``n`` tasks one at a time."""
        assert self._client is not None, "start() first"
        return self._client.run_latency(n)

    def processes(self) -> list[ProcessRoot]:
        """The worker process."""
        assert self._worker is not None, "start() first"
        return [ProcessRoot("workers", pid=self._worker.pid)]
