"""Raw pika worker for the raw AMQP peer: run no-op tasks and publish one result per task.

Reliable mode: results are persistent and published with confirms, and a task is acked only
after the broker has confirmed its result. Transient mode: no confirms, no acks. With
``--quorum`` it declares its task queue as the client did, a quorum queue.

Run as ``python -m bench.peers.raw_amqp_worker --queue bench.raw.x [--transient | --quorum]``;
it prints ``ready`` on stdout once it consumes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

import pika
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic, BasicProperties

from bench.peers._amqp import AMQP_URL, queue_arguments
from bench.peers._confirms import ConfirmTracker

logger = logging.getLogger(__name__)

#: Unacked tasks the broker may push ahead; deep enough that confirms pipeline.
WORKER_PREFETCH = 1000
#: Body of every result message.
RESULT_BODY = b"null"
#: Line printed on stdout once the worker consumes.
READY_MARKER = b"ready"


@dataclass(frozen=True)
class WorkerSettings:
    """Where the worker consumes from and how safely it works."""

    url: str
    task_queue: str
    reliable: bool
    quorum: bool = False


class RawWorker:
    """A single-channel asynchronous worker on pika's SelectConnection."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self._channel: Channel | None = None
        self._results = ConfirmTracker[int]()  # result publish -> its task's delivery tag
        self._delivery_mode = 2 if settings.reliable else 1

    def run(self) -> None:
        """Connect and process tasks until the connection closes."""
        connection = SelectConnection(
            pika.URLParameters(self.settings.url),
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_failed,
            on_close_callback=self._on_connection_closed,
        )
        connection.ioloop.start()

    def _on_connection_open(self, connection: SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_failed(self, connection: SelectConnection, error: BaseException) -> None:
        logger.error("cannot connect: %s", error)
        connection.ioloop.stop()

    def _on_connection_closed(self, connection: SelectConnection, reason: BaseException) -> None:
        logger.info("connection closed: %s", reason)
        connection.ioloop.stop()

    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        if self.settings.reliable:
            channel.confirm_delivery(self._on_confirm, callback=lambda _: self._declare())
        else:
            self._declare()

    def _declare(self) -> None:
        assert self._channel is not None
        self._channel.queue_declare(
            self.settings.task_queue, durable=self.settings.reliable,
            arguments=queue_arguments(self.settings.quorum), callback=self._on_declared
        )

    def _on_declared(self, _frame: Method) -> None:
        assert self._channel is not None
        self._channel.basic_qos(prefetch_count=WORKER_PREFETCH, callback=self._on_qos)

    def _on_qos(self, _frame: Method) -> None:
        assert self._channel is not None
        self._channel.basic_consume(
            self.settings.task_queue,
            self._on_task,
            auto_ack=not self.settings.reliable,
            callback=lambda _: _announce_ready(),
        )

    def _on_task(
        self, channel: Channel, method: Basic.Deliver, properties: BasicProperties, _body: bytes
    ) -> None:
        result_properties = BasicProperties(
            correlation_id=properties.correlation_id, delivery_mode=self._delivery_mode
        )
        channel.basic_publish("", properties.reply_to, RESULT_BODY, result_properties)
        if self.settings.reliable:
            self._results.published(method.delivery_tag)

    def _on_confirm(self, frame: Method) -> None:
        assert self._channel is not None
        method = frame.method
        tasks = self._results.confirm(method.delivery_tag, method.multiple)
        if not tasks:
            return
        if isinstance(method, Basic.Nack):
            logger.warning("%d results nacked; requeueing their tasks", len(tasks))
            for tag in tasks:
                self._channel.basic_nack(tag, requeue=True)
            return
        oldest = self._results.oldest()
        if oldest is None or oldest > tasks[-1]:
            # every task up to the newest confirmed one is done: one frame acks them all
            self._channel.basic_ack(tasks[-1], multiple=True)
        else:
            for tag in tasks:
                self._channel.basic_ack(tag)


def _announce_ready() -> None:
    sys.stdout.buffer.write(READY_MARKER + b"\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the worker until it is killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", required=True, help="task queue to consume")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--transient", action="store_true", help="no persistence, confirms or acks")
    mode.add_argument("--quorum", action="store_true", help="the task queue is a quorum queue")
    parser.add_argument("--url", default=AMQP_URL)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    RawWorker(WorkerSettings(url=args.url, task_queue=args.queue, reliable=not args.transient,
                             quorum=args.quorum)).run()


if __name__ == "__main__":
    main()
