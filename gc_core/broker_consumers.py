"""The consuming half of a broker session: deliveries, how they are settled, and consumers.

:class:`Consumers` keeps which queues a :class:`~gc_core.broker.BrokerSession` consumes
with which handler and starts them on each new channel, as dramatiq keeps its RabbitMQ
consumer apart from its broker; each message reaches its handler as a :class:`Delivery`,
which goes back to the session with a :class:`Settlement`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from gc_core.protocol import Envelope

__all__ = ["Consumers", "Delivery", "Settlement"]

#: Runs a callback on the IO thread so that a bug in it cannot stop the connection.
Guard = Callable[[Callable[[], Any]], None]


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message handed to a consumer, with what is needed to ack it later."""

    envelope: Envelope
    exchange: str
    routing_key: str
    redelivered: bool
    generation: int
    tag: int
    #: The AMQP ``user_id`` the publisher set; a secured broker has checked it is theirs.
    user_id: str = ""

    def carrying(self, envelope: Envelope) -> Delivery:
        """This delivery as one entry of it (a batch's task) is settled: the same tag, with
        ``envelope``. (``dataclasses.replace`` cost more than the rest of a task's split.)"""
        return Delivery(envelope, self.exchange, self.routing_key, self.redelivered,
                        self.generation, self.tag, self.user_id)


class Settlement(Enum):
    """What becomes of a delivery its consumer is done with."""

    #: Acknowledged: the broker forgets it.
    ACK = "ack"
    #: Returned to its queue, for this consumer or another.
    REQUEUE = "requeue"
    #: Rejected for good: the queue's dead-letter exchange takes it.
    DEAD_LETTER = "dead-letter"


class Consumers:
    """The consuming half of a session, kept apart as dramatiq keeps its RabbitMQ
    consumer: which queues are consumed with which handler, and which of them the current
    channel consumes. It lives on the session's IO thread (every method runs there), so
    it has no lock; ``guard`` runs each handler there."""

    def __init__(self, session: str, guard: Guard) -> None:
        self._session = session
        self._guard = guard
        self._handlers: dict[str, Callable[[Delivery], None]] = {}
        self._active: set[str] = set()

    def add(self, queue: str, on_message: Callable[[Delivery], None]) -> None:
        """Consume ``queue`` with ``on_message`` on this channel (at :meth:`start`) and every
        later one."""
        self._handlers[queue] = on_message

    def forget(self, queue: str) -> None:
        """Consume ``queue`` on no later channel (it is being deleted)."""
        self._handlers.pop(queue, None)

    def start(self, channel: Channel, generation: int) -> None:
        """Start every consumer ``channel`` does not have yet; ``generation`` numbers it."""
        for queue, on_message in self._handlers.items():
            if queue not in self._active:
                self._active.add(queue)
                channel.basic_consume(queue, _deliverer(on_message, generation, self._guard),
                                      consumer_tag=self._tag(queue))

    def cancel(self, channel: Channel | None) -> None:
        """Cancel every consumer of ``channel`` (unacked deliveries stay ours)."""
        if channel is not None:
            for queue in self._active:
                channel.basic_cancel(self._tag(queue))
        self._active.clear()

    def new_channel(self) -> None:
        """A new channel consumes nothing yet."""
        self._active.clear()

    def _tag(self, queue: str) -> str:
        return f"{self._session}:{queue}"


def _deliverer(on_message: Callable[[Delivery], None], generation: int,
               guard: Guard) -> Callable[[Channel, Basic.Deliver, BasicProperties, bytes], None]:
    """pika's callback for one consumer: each message as a :class:`Delivery` of the
    channel ``generation`` it came on."""

    def deliver(_ch: Channel, method: Basic.Deliver, props: BasicProperties,
                body: bytes) -> None:
        headers = props.headers or {}
        delivery = Delivery(
            envelope=Envelope(props.message_id or "", props.correlation_id or "",
                              props.content_type or "", headers, body),
            exchange=method.exchange, routing_key=method.routing_key,
            redelivered=method.redelivered,
            generation=generation, tag=method.delivery_tag, user_id=props.user_id or "")
        guard(lambda: on_message(delivery))

    return deliver
