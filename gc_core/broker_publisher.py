"""The publishing half of a broker session: sending publishes and settling their confirms.

A :class:`Publisher` lives on a :class:`~gc_core.broker.BrokerSession`'s IO thread. It
sends each :class:`Publish` on the session's confirm-mode channel (or fails it at once,
with a :class:`~gc_core.broker_limits.Refusal`, if the broker could never take it), keeps
the ones the broker has not confirmed yet, and tells each publisher the broker's answer
through its :data:`ConfirmCallback`. What the broker never confirmed goes back to the
session to be sent again after a reconnect; so does what it nacked, for a while (see
:meth:`Publisher.confirmed`): callers see at-least-once.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import pika.exceptions
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from gc_core.broker_errors import PublishRefused, describe
from gc_core.broker_limits import Refusal, header_may_overflow, header_refusal, oversize_refusal
from gc_core.protocol import Envelope

__all__ = ["ConfirmCallback", "Publish", "Publisher"]

logger = logging.getLogger(__name__)

#: Called once per publish on the IO thread: None when confirmed, else the reason it was not
#: (a :class:`Refusal` when it is refused for good).
ConfirmCallback = Callable[[str | None], None]
#: Runs a callback on the IO thread so that a bug in it cannot stop the connection.
Guard = Callable[[Callable[[], Any]], None]
#: Seconds a publish the broker keeps nacking is sent again before its publisher is told:
#: far longer than a quorum queue's leader election after a node loss.
NACK_RETRY_SECONDS = 30.0


@dataclass(slots=True)
class Publish:
    """One publish on its way from any thread to the broker."""

    exchange: str
    routing_key: str
    envelope: Envelope
    persistent: bool
    mandatory: bool
    on_confirm: ConfirmCallback | None
    #: Whether a nack means "not now" (send it again) rather than "never" (a queue that is
    #: full and rejects publishes, say).
    retry_nacked: bool = True
    #: When the broker first nacked it (monotonic clock), or None.
    nacked_since: float | None = None
    #: When it was last sent (monotonic clock).
    sent_at: float = 0.0


class Publisher:
    """The publishes a session has sent on its current channel and the broker has not
    confirmed yet, and why any of them came back unroutable. It lives on the session's IO
    thread (every method runs there), so it has no lock; other threads only peek whether
    any publish waits (:meth:`__bool__`)."""

    def __init__(self, session: str, *, user_id: str | None, max_message_size: int,
                 guard: Guard) -> None:
        self._session = session
        self._user_id = user_id
        self._max_message_size = max_message_size
        self._guard = guard
        self._unconfirmed: OrderedDict[int, Publish] = OrderedDict()
        #: Nacked publishes to send again after reconnecting (:meth:`take_unconfirmed`).
        self._nacked: list[Publish] = []
        self._returned: dict[str, str] = {}
        self._seq = 0

    def __bool__(self) -> bool:
        """True while some publish waits for the broker's confirm."""
        return bool(self._unconfirmed or self._nacked)

    def new_channel(self) -> None:
        """A new channel numbers its publishes from one again."""
        self._seq = 0

    def send(self, channel: Channel, op: Publish, frame_max: int) -> bool:
        """Publish ``op``, or fail it at once if the broker could never take it: a message
        that cannot be encoded, does not fit a frame or is over the size limit would
        otherwise kill the IO thread or be refused and re-sent for ever. False when the
        channel is closing: the caller sends ``op`` again after reconnecting."""
        properties = BasicProperties(
            message_id=op.envelope.message_id, correlation_id=op.envelope.correlation_id,
            content_type=op.envelope.content_type, headers=op.envelope.headers,
            delivery_mode=2 if op.persistent else 1,
            user_id=self._user_id)
        try:
            problem = self._unsendable(op, properties, frame_max)
            if problem is None:
                channel.basic_publish(op.exchange, op.routing_key, op.envelope.body, properties,
                                      mandatory=op.mandatory)
        except (pika.exceptions.ChannelWrongStateError, pika.exceptions.ConnectionWrongStateError):
            return False
        except Exception as exc:  # noqa: BLE001 - pika could not encode what the caller gave it
            problem = f"it cannot be encoded as an AMQP message: {describe(exc)}"
        if problem is not None:
            logger.warning("%s: not publishing message %r to %s (%r): %s", self._session,
                           op.envelope.message_id[:80], op.exchange, op.routing_key[:80], problem)
            if op.on_confirm is not None:
                on_confirm = op.on_confirm
                self._guard(lambda: on_confirm(Refusal(problem)))
            return True
        self._seq += 1
        op.sent_at = time.monotonic()
        self._unconfirmed[self._seq] = op
        return True

    def oldest_wait(self) -> float:
        """Seconds the oldest publish sent on this channel has waited for its confirm (0
        when none waits)."""
        if not self._unconfirmed:
            return 0.0
        return time.monotonic() - next(iter(self._unconfirmed.values())).sent_at

    def _unsendable(self, op: Publish, properties: BasicProperties,
                    frame_max: int) -> str | None:
        """Why the broker would refuse ``op`` for good (its size), or None."""
        oversize = oversize_refusal(len(op.envelope.body), self._max_message_size)
        if oversize is not None:
            return oversize
        if not header_may_overflow(op.envelope):
            return None
        return header_refusal(len(b"".join(properties.encode())), frame_max)

    def returned(self, method: Basic.Return, props: BasicProperties) -> None:
        """The broker could not route a mandatory publish: its confirm will say why."""
        self._returned[props.message_id or ""] = (
            f"the broker could not route it ({method.reply_text}): exchange {method.exchange!r} "
            f"has no queue bound for routing key {method.routing_key!r}")

    def confirmed(self, method: Basic.Ack | Basic.Nack) -> bool:
        """The broker acked or nacked publishes up to ``method.delivery_tag``: tell each.

        A nacked publish is kept to send again after reconnecting, until it has been nacked
        for :data:`NACK_RETRY_SECONDS`: RabbitMQ nacks what a quorum queue cannot take for
        now, and (3.10, measured) goes on nacking every publish on a channel that published
        to a quorum queue whose leader died, while a new channel is served. True when some
        publish waits to be sent again: the session should reconnect."""
        tag = method.delivery_tag
        if method.multiple:
            settled = []
            while self._unconfirmed and next(iter(self._unconfirmed)) <= tag:
                settled.append(self._unconfirmed.popitem(last=False)[1])
        else:
            single = self._unconfirmed.pop(tag, None)
            settled = [single] if single is not None else []
        kept = False
        if isinstance(method, Basic.Nack):
            settled, kept = self._keep_nacked(settled)
        nacked = isinstance(method, Basic.Nack)
        for publish in settled:
            reason = self._returned.pop(publish.envelope.message_id, None) if self._returned else None
            if nacked:
                reason = "the broker refused it (basic.nack)" + (
                    f" for {NACK_RETRY_SECONDS:.0f}s" if publish.retry_nacked else "")
            if publish.on_confirm is not None:
                self._guard(partial(publish.on_confirm, reason))
        return kept

    def _keep_nacked(self, nacked: list[Publish]) -> tuple[list[Publish], bool]:
        """Keep the nacked publishes still worth sending again; the others, to be told."""
        now = time.monotonic()
        given_up = []
        for publish in nacked:
            publish.nacked_since = publish.nacked_since or now
            if publish.retry_nacked and now - publish.nacked_since < NACK_RETRY_SECONDS:
                self._nacked.append(publish)
            else:
                given_up.append(publish)
        return given_up, len(given_up) < len(nacked)

    def refused(self, refused: PublishRefused) -> None:
        """The broker closed the channel over a publish: confirms come in order, so it is
        the oldest unconfirmed one. It fails (with ``same_target``, so does every other
        unconfirmed one to the same exchange and routing key, which would be refused too);
        the rest are sent again after reconnecting."""
        if not self._unconfirmed:
            return
        first = next(iter(self._unconfirmed.values()))
        target = (first.exchange, first.routing_key)
        failed = [seq for seq, p in self._unconfirmed.items()
                  if (p.exchange, p.routing_key) == target] if refused.same_target else \
            [next(iter(self._unconfirmed))]
        logger.warning("the broker refused %d publishes to %s (%r): %s", len(failed),
                       first.exchange, first.routing_key[:80], refused.reply_text)
        for seq in failed:
            on_confirm = self._unconfirmed.pop(seq).on_confirm
            if on_confirm is not None:
                self._guard(partial(on_confirm, Refusal(str(refused))))

    def take_unconfirmed(self) -> list[Publish]:
        """Every publish the broker never confirmed, oldest first, forgotten here."""
        pending = self._nacked + list(self._unconfirmed.values())
        self._nacked = []
        self._unconfirmed.clear()
        self._returned.clear()
        return pending
