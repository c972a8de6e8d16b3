"""The asyncio twin of :mod:`gc_core.broker`: one aio-pika connection with confirmed publishes.

An :class:`AsyncBrokerSession` owns one robust aio-pika connection and one confirm-mode
channel on the caller's event loop. It declares the topology's exchanges and the queues
it was given, publishes and waits for the broker's confirm (so callers pipeline confirms
by publishing concurrently), and consumes queues with acks batched every few milliseconds.
aio-pika reconnects on its own (to the next node, when the URL names a cluster's nodes)
and declares the exchanges, queues, bindings and consumers again; a publish caught by a lost connection is sent again on the new one
until its confirm timeout runs out, so callers see at-least-once, as with the sync
session. This module and :mod:`gc_core.broker` are the only ones that import an AMQP
library, and :func:`_translate` is the one place their exceptions become ours.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustQueue,
    UnderlayConnection,
)
from aio_pika.connection import make_url
from aio_pika.robust_connection import RobustConnection
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential_jitter
from yarl import URL

from gc_core.broker_causes import (
    connect_failure,
    login_refusal,
    permissions_hint,
    vhost_refusal,
)
from gc_core.broker_limits import DEFAULT_MAX_MESSAGE_SIZE, oversize_refusal
from gc_core.broker_login import (
    HEARTBEAT_SECONDS,
    TokenLogin,
    broker_tls,
    broker_urls,
    certificate_refusal,
    redact_url,
)
from gc_core.errors import (
    BrokerError,
    BrokerRefused,
    BrokerUnreachable,
    ConnectionLost,
    PublishNotConfirmed,
)
from gc_core.protocol import Envelope
from gc_core.topology import QueueDeclaration, Topology

__all__ = ["AsyncBrokerSession", "MessageCallback"]

logger = logging.getLogger(__name__)

#: Seconds :meth:`AsyncBrokerSession.connect` keeps trying to reach the broker.
CONNECT_TIMEOUT = 15.0
#: Seconds a publish may wait for its confirm, across reconnects, before it fails.
CONFIRM_TIMEOUT = 30.0
#: Publishes awaiting their confirm at once; more wait their turn before their clock starts.
MAX_UNCONFIRMED = 1000
#: Seconds deliveries wait to be acked together (one frame for all consumed meanwhile).
ACK_LINGER = 0.005
#: Seconds aio-pika waits between reconnect attempts after a lost connection.
RECONNECT_INTERVAL = 1.0
#: Seconds a publish caught by a lost connection pauses before it is sent again.
REPUBLISH_PAUSE = 0.2

#: Called on the event loop with each consumed message and the ``user_id`` its publisher
#: set ("" if none; a secured broker checked it is theirs); the message is acked once it returns.
MessageCallback = Callable[[Envelope, str], None]

#: What aio-pika and aiormq raise for broker trouble (ChannelInvalidStateError is a RuntimeError).
_AMQP_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError,
    OSError, asyncio.TimeoutError)
#: Refusals that no reconnect or retry can fix.
_FINAL_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AuthenticationError, aiormq.exceptions.ProbableAuthenticationError,
    aiormq.exceptions.IncompatibleProtocolError, aiormq.exceptions.DeliveryError,
    aiormq.exceptions.ChannelAccessRefused, aiormq.exceptions.ChannelPreconditionFailed,
    aiormq.exceptions.ChannelNotFoundEntity, aiormq.exceptions.ConnectionNotAllowed)


#: The broker's reply to a message over its max_message_size, with the limit it applies. The
#: channel closes over it, so every publish then in flight on it gets this reply.
_SIZE_REFUSAL = re.compile(r"larger than configured max size (\d+)")

#: How aiormq reports a refused login or vhost.
_LOGIN_REFUSALS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AuthenticationError, aiormq.exceptions.ProbableAuthenticationError,
    aiormq.exceptions.ConnectionNotAllowed)


class _ClusterConnection(RobustConnection):
    """aio-pika's robust connection, over the nodes of a cluster.

    aio-pika reconnects to its ``url`` alone. Once this connection has opened, every new
    attempt to connect moves ``url`` to the next node, so a reconnect after a node died
    goes to another. The move happens where aio-pika (9.4 to 10) sets ``transport`` to None,
    right before each attempt; tests/cluster/test_failover.py holds it to that.
    """

    def __init__(self, nodes: Sequence[URL], first: int, **kwargs: Any) -> None:
        self._nodes, self._node, self._opened_once = tuple(nodes), first, False
        self._transport: UnderlayConnection | None = None
        super().__init__(self._nodes[first], **kwargs)

    @property  # aio-pika's plain attribute, read and written alike
    def transport(self) -> UnderlayConnection | None:
        return self._transport

    @transport.setter
    def transport(self, value: UnderlayConnection | None) -> None:
        if value is None and self._opened_once:
            self._node = (self._node + 1) % len(self._nodes)
            self.url = self._nodes[self._node]
        self._transport = value

    async def _on_connected(self) -> None:
        self._opened_once = True
        await super()._on_connected()


class _ConfirmTimeout(Exception):
    """No confirm within the publish deadline (translated like any aio-pika error)."""


class AsyncBrokerSession:
    """One robust AMQP connection with a confirm-mode channel, for asyncio code.

    Example:
        >>> session = AsyncBrokerSession(url, name="me", topology=load_topology())
        >>> await session.connect()
        >>> await session.publish("gc.tasks", endpoint_id, envelope, mandatory=True)
        >>> await session.close()
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        topology: Topology,
        queues: Sequence[QueueDeclaration] = (),
        prefetch: int = 0,
        confirm_timeout: float = CONFIRM_TIMEOUT,
        max_unconfirmed: int = MAX_UNCONFIRMED,
        login: TokenLogin | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        if prefetch < 0 or confirm_timeout <= 0 or max_unconfirmed < 1 or max_message_size < 1:
            raise ValueError("prefetch must be at least 0, confirm_timeout above 0, and "
                             "max_unconfirmed and max_message_size at least 1")
        self._login = login
        self._max_message_size = max_message_size
        #: The brokers to try, the nodes of a cluster (one URL, or several: broker_urls).
        self._nodes = [login.apply(node) if login is not None else node
                       for node in broker_urls(url)]
        #: Which of _nodes connect() tried last (aio-pika's reconnects move on by themselves).
        self._node = -1
        self._name = name
        self._topology = topology
        self._queue_declarations = list(queues)
        self._prefetch = prefetch
        self._confirm_timeout = confirm_timeout
        self._connection: _ClusterConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._queues: dict[str, AbstractRobustQueue] = {}
        self._consumer_tags: dict[str, str] = {}
        self._ack_next: AbstractIncomingMessage | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        #: The reconnect a nack started, until it is done (_reconnect_after_nack).
        self._nack_reconnect: asyncio.Task[None] | None = None
        self._window = asyncio.Semaphore(max_unconfirmed)

    @property
    def url(self) -> str:
        """The URL of the broker in use (or tried next), without its password."""
        connection = self._connection
        return redact_url(str(connection.url.with_query(None)) if connection is not None
                          else self._url)

    @property
    def _url(self) -> str:
        return self._nodes[max(self._node, 0)]

    @property
    def connected(self) -> bool:
        """True while the connection is open (aio-pika may be restoring the channel)."""
        return self._connection is not None and not self._connection.is_closed

    # -- lifecycle ------------------------------------------------------------------------

    async def connect(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Connect, open a confirm-mode channel and declare the topology, retrying with backoff.

        Raises:
            BrokerUnreachable: no connection within ``timeout`` (the reason says why and
                what to do).
            BrokerRefused: the broker refused the login or the virtual host, or the TLS
                handshake failed: retrying would not help.
            BrokerError: the broker refused a declaration (for example mismatched arguments),
                its certificate failed verification, or the URL's TLS settings are unusable.
        """
        try:
            tls = broker_tls(self._url)[1]  # one CA checks a cluster's nodes
            bare = [broker_tls(node)[0] for node in self._nodes]
        except ValueError as exc:
            raise BrokerError(str(exc)) from exc
        retrying = AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
            stop=stop_after_delay(timeout),
            before_sleep=lambda state: logger.warning(
                "broker %s unreachable (%s); retrying in %.1fs", self.url,
                _describe(state.outcome.exception()) if state.outcome else "?",
                state.upcoming_sleep),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._open(timeout, bare, tls)
        except _AMQP_ERRORS as exc:
            if self._login is not None and isinstance(exc, _LOGIN_REFUSALS):
                raise BrokerRefused(self._login.refusal(
                    self._url, vhost_refused=_vhost_refused(exc))) from exc
            raise _translate(exc, self.url, connecting=True) from exc
        logger.info("connection %s to %s open", self._name, self.url)

    async def close(self) -> None:
        """Send the last acks and close the connection (unacked deliveries go back to their queue)."""
        self._flush_ack()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        connection, self._connection, self._channel = self._connection, None, None
        self._exchanges.clear()
        self._queues.clear()
        if connection is not None:
            try:
                await connection.close()
            except _AMQP_ERRORS as exc:
                logger.debug("closing connection %s: %s", self._name, _describe(exc))

    async def __aenter__(self) -> AsyncBrokerSession:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, exchange: str, routing_key: str, envelope: Envelope, *,
                      mandatory: bool = False, persistent: bool = True) -> None:
        """Publish ``envelope`` and return once the broker confirmed it.

        Publish many at once (``asyncio.gather``) and their confirms pipeline. A publish
        caught by a lost connection is sent again once aio-pika has reconnected, until
        the confirm timeout runs out; the broker may then hold it twice (at-least-once).
        One the broker refuses for good (too large, not permitted) fails at once.

        Raises:
            PublishNotConfirmed: the body is over ``max_message_size`` (not sent), or the
                broker nacked it, could not route a ``mandatory`` one, refused it or the
                channel, or did not confirm it in time.
        """
        size = len(envelope.body)
        oversize = oversize_refusal(size, self._max_message_size)
        if oversize is not None:
            raise PublishNotConfirmed(oversize)
        message = aio_pika.Message(
            envelope.body, headers=envelope.headers, content_type=envelope.content_type or None,
            message_id=envelope.message_id or None, correlation_id=envelope.correlation_id or None,
            user_id=self._login.username if self._login is not None else None,
            delivery_mode=(aio_pika.DeliveryMode.PERSISTENT if persistent
                           else aio_pika.DeliveryMode.NOT_PERSISTENT))
        loop = asyncio.get_running_loop()
        async with self._window:  # the clock starts once sent, not while queued behind others
            deadline = loop.time() + self._confirm_timeout
            while True:
                failure = await self._publish_once(message, exchange, routing_key, mandatory,
                                                   deadline - loop.time())
                if failure is None:
                    return
                if not _worth_resending(failure, size) or loop.time() + REPUBLISH_PAUSE >= deadline:
                    raise _translate(failure, self.url, publishing=True) from failure
                logger.debug("publish to %s caught by a lost connection or a nack (%s); sending "
                             "it again", exchange, _describe(failure))
                if _nacked(failure):
                    self._reconnect_after_nack()
                await asyncio.sleep(REPUBLISH_PAUSE)

    async def _publish_once(self, message: aio_pika.Message, exchange: str, routing_key: str,
                            mandatory: bool, seconds: float) -> BaseException | None:
        """One attempt: None once confirmed, else what went wrong."""
        target = self._exchanges.get(exchange) or await self._exchange(exchange)
        try:
            await _within(max(seconds, 0.001),
                          target.publish(message, routing_key, mandatory=mandatory))
            return None
        except asyncio.CancelledError as exc:
            if _cancelled_from_outside():
                raise
            return exc  # aiormq cancelled the confirm with its channel
        except asyncio.TimeoutError:
            return _ConfirmTimeout(f"no confirm within {self._confirm_timeout:.0f}s")
        except _AMQP_ERRORS as exc:
            return exc

    # -- consuming ------------------------------------------------------------------------

    async def consume(self, queue: str, on_message: MessageCallback) -> None:
        """Call ``on_message`` with each message of ``queue``, now and after every reconnect.

        ``queue`` must be one this session declared. The callback runs on the event loop,
        one message at a time in delivery order; each message is acked once the callback
        has returned (or raised, which is logged), with one ack frame per loop turn.

        Raises:
            BrokerError: the broker refused the consumer.
        """
        declared = self._queues[queue]

        async def deliver(message: AbstractIncomingMessage) -> None:
            # No await before the ack is queued: callbacks then finish in delivery order.
            try:
                on_message(_envelope(message), message.user_id or "")
            except Exception:
                logger.exception("consumer of queue %s failed on message %s", queue,
                                 message.message_id)
            self._ack_in_order(message)

        try:
            self._consumer_tags[queue] = await declared.consume(
                deliver, consumer_tag=f"{self._name}:{queue}")
        except _AMQP_ERRORS as exc:
            raise _translate(exc, self.url) from exc

    async def consumer_count(self, queue: str) -> int | None:
        """How many consume ``queue`` (it must exist), this session's consumer included;
        None while disconnected.

        Raises:
            BrokerError: the broker refused (no such queue, say).
        """
        if self._channel is None:
            return None
        try:
            # Asked of aiormq's channel: aio-pika answers a passive declare of a queue its
            # robust channel declared with that first declaration's counts.
            channel = await self._channel.get_underlay_channel()
            declared = await channel.queue_declare(queue, passive=True)
        except _AMQP_ERRORS as exc:
            raise _translate(exc, self.url) from exc
        return int(declared.consumer_count or 0)

    async def delete_queue(self, queue: str) -> None:
        """Stop consuming ``queue``, delete it, and stop declaring it on reconnect.

        Raises:
            BrokerError: the broker refused, or the connection was lost.
        """
        declared = self._queues.pop(queue, None)
        consumer_tag = self._consumer_tags.pop(queue, None)
        self._flush_ack()
        try:
            if declared is not None:
                if consumer_tag is not None:  # else the broker cancels it, and aio-pika warns
                    await declared.cancel(consumer_tag)
                await declared.delete(if_unused=False, if_empty=False)
            elif self._channel is not None:
                await self._channel.queue_delete(queue)
        except _AMQP_ERRORS as exc:
            raise _translate(exc, self.url) from exc

    # -- internals ------------------------------------------------------------------------

    async def _open(self, timeout: float, nodes: list[str], tls: ssl.SSLContext | None) -> None:
        """One connection attempt, to the next node: connect, open the channel, declare;
        close again on failure."""
        options: dict[str, Any] = {"reconnect_interval": RECONNECT_INTERVAL}
        if "heartbeat" not in self._url:
            options["heartbeat"] = HEARTBEAT_SECONDS
        self._node = (self._node + 1) % len(nodes)
        try:
            # As aio_pika.connect_robust does, with our connection class.
            connection = _ClusterConnection(
                [make_url(node, **options) for node in nodes], self._node, ssl_context=tls,
                client_properties={"connection_name": self._name})
            await connection.connect(timeout=timeout)
        except _AMQP_ERRORS as exc:
            untrusted = certificate_refusal(self._url, exc)
            if untrusted is None:
                raise
            raise BrokerError(untrusted) from exc  # not an AMQP error: no retry
        try:
            # on_return_raises: an unroutable mandatory publish fails instead of "succeeding"
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            assert isinstance(channel, AbstractRobustChannel)
            await channel.set_qos(prefetch_count=self._prefetch)
            exchanges: dict[str, AbstractExchange] = {}
            for name, kind in self._topology.exchanges.values():
                # Logged in with a token we may not create exchanges: only check they exist.
                exchanges[name] = await channel.declare_exchange(
                    name, kind, durable=True, passive=self._login is not None)
            queues: dict[str, AbstractRobustQueue] = {}
            for declaration in self._queue_declarations:
                queue = await channel.declare_queue(
                    declaration.name, durable=declaration.durable,
                    auto_delete=declaration.auto_delete, arguments=declaration.arguments)
                for binding in declaration.bindings:
                    await queue.bind(exchanges.get(binding.exchange, binding.exchange),
                                     binding.routing_key, arguments=binding.arguments or None)
                queues[declaration.name] = queue
        except BaseException:
            await connection.close()
            raise
        self._connection, self._channel = connection, channel
        self._exchanges, self._queues = exchanges, queues
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)

    def _on_connection_lost(self, _connection: object, reason: BaseException | None) -> None:
        if self._connection is not None:  # not our own close()
            logger.warning("connection %s to %s lost (%s); reconnecting", self._name, self.url,
                           _describe(reason))

    def _on_reconnected(self, _connection: object) -> None:
        logger.info("connection %s to %s restored", self._name, self.url)

    async def _exchange(self, name: str) -> AbstractExchange:
        """An exchange the topology does not list (the default one, say), looked up once."""
        if self._channel is None:
            raise ConnectionLost(f"session {self._name} is not connected (call connect first)")
        if name == "":
            exchange: AbstractExchange = self._channel.default_exchange
        else:
            exchange = await self._channel.get_exchange(name, ensure=False)
        self._exchanges[name] = exchange
        return exchange

    def _ack_in_order(self, message: AbstractIncomingMessage) -> None:
        """Ack ``message`` and every earlier delivery of its channel, one frame per ACK_LINGER.

        Correct because callbacks finish in delivery order: aiormq creates one task per
        delivery, in order, each starts its callback as a task at once, and the callback
        does not await before it gets here.
        """
        previous = self._ack_next
        if previous is not None and previous.channel is not message.channel:
            self._flush_ack()  # a reconnect in between: settle the old channel's ones apart
        self._ack_next = message
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_LINGER, self._flush_ack)

    def _reconnect_after_nack(self) -> None:
        """Reconnect (once for a wave of nacks), so that what the broker nacked is sent again
        on a new channel: RabbitMQ nacks what a quorum queue cannot take for now and (3.10,
        measured) goes on nacking on a channel that published to a quorum queue whose leader
        died, while a new channel is served (gc_core.broker_publisher says the same)."""
        connection = self._connection
        if connection is None or self._nack_reconnect is not None:
            return
        logger.warning("connection %s to %s: the broker nacked publishes; reconnecting to send "
                       "them again", self._name, self.url)

        async def reconnect() -> None:
            try:
                await connection.reconnect()
            except _AMQP_ERRORS as exc:  # aio-pika goes on reconnecting by itself
                logger.debug("reconnecting %s after a nack: %s", self._name, _describe(exc))
            finally:
                self._nack_reconnect = None

        self._nack_reconnect = asyncio.get_running_loop().create_task(reconnect())
        self._background.add(self._nack_reconnect)
        self._nack_reconnect.add_done_callback(self._background.discard)

    def _flush_ack(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        message, self._ack_next = self._ack_next, None
        if message is not None:
            task = asyncio.get_running_loop().create_task(self._ack(message))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.ack(multiple=True)
        except _AMQP_ERRORS as exc:
            # The channel it came on is gone, so the broker has requeued it already.
            logger.debug("ack of %s lost with its channel: %s", message.message_id, _describe(exc))


def _envelope(message: AbstractIncomingMessage) -> Envelope:
    return Envelope(message.message_id or "", message.correlation_id or "",
                    message.content_type or "", dict(message.headers or {}), message.body)


async def _within(seconds: float, awaitable: Awaitable[Any]) -> None:
    """Await under a deadline; ``asyncio.timeout`` (3.11+) spares ``wait_for``'s extra task."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            await awaitable
    else:
        await asyncio.wait_for(awaitable, seconds)


def _is_transient(exc: BaseException | None) -> bool:
    """Whether a reconnect may fix it: a lost or unready connection, not a refusal."""
    if isinstance(exc, asyncio.CancelledError):
        return True  # aiormq cancels pending confirms when their channel closes
    return isinstance(exc, _AMQP_ERRORS) and not isinstance(exc, _FINAL_ERRORS) and not (
        _refused_at_open(exc) or connect_failure(exc, "").permanent)


def _refused_at_open(exc: BaseException) -> bool:
    """Whether the broker closed the connection in answer to Connection.Open, which it does
    to refuse the virtual host (NOT_ALLOWED: none of that name, or no permissions on it).
    aiormq reports that as an unexpected frame and drops the broker's reply, so the stage
    it names is all there is to go by (pika's ProbableAccessDeniedError goes by it too)."""
    return isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.OpenOk" in str(exc)


def _nacked(failure: BaseException) -> bool:
    """Whether the broker nacked the publish (not: could not route it)."""
    return isinstance(failure, aiormq.exceptions.DeliveryError) and not isinstance(
        failure, aiormq.exceptions.PublishError)


def _worth_resending(failure: BaseException, size: int) -> bool:
    """Whether a publish of ``size`` bytes that failed so may succeed if sent again: after a
    lost connection, a nack (see :meth:`AsyncBrokerSession._reconnect_after_nack`), or when
    the broker closed the channel over another, larger message."""
    if _nacked(failure):
        return True
    refused_size = (_SIZE_REFUSAL.search(str(failure)) if isinstance(
        failure, aiormq.exceptions.ChannelPreconditionFailed) else None)
    if refused_size is not None:
        return size <= int(refused_size.group(1))
    return _is_transient(failure)


def _vhost_refused(exc: BaseException) -> bool:
    return isinstance(exc, aiormq.exceptions.ConnectionNotAllowed) or "vhost" in str(exc)


def _cancelled_from_outside() -> bool:
    """Whether the running task itself was cancelled (not just a future it awaited)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return task is None or cancelling is None or cancelling() > 0


def _translate(exc: BaseException, url: str, *, connecting: bool = False,
               publishing: bool = False) -> BrokerError:
    """The one place where aio-pika, aiormq and socket errors become gc-fabric errors."""
    reason = _describe(exc)
    if isinstance(exc, aiormq.exceptions.PublishError):
        frame = exc.frame
        return PublishNotConfirmed(
            f"the broker could not route it ({getattr(frame, 'reply_text', 'NO_ROUTE')}): "
            f"exchange {getattr(frame, 'exchange', '?')!r} has no queue bound for routing key "
            f"{getattr(frame, 'routing_key', '?')!r}")
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return PublishNotConfirmed("the broker refused it (basic.nack)")
    if isinstance(exc, (aiormq.exceptions.AuthenticationError,
                        aiormq.exceptions.ProbableAuthenticationError)):
        return BrokerRefused(login_refusal(url, reason))
    if _refused_at_open(exc) or isinstance(exc, aiormq.exceptions.ConnectionNotAllowed):
        return BrokerRefused(vhost_refusal(url))
    if isinstance(exc, aiormq.exceptions.AMQPChannelError):
        message = f"the broker at {url} refused: {reason}"
        if isinstance(exc, aiormq.exceptions.ChannelAccessRefused) and not publishing:
            message += f"; {permissions_hint(url)}"
        return PublishNotConfirmed(message) if publishing else BrokerError(message)
    if publishing:
        return PublishNotConfirmed(f"the broker did not confirm it: {reason}")
    if connecting:
        failure = connect_failure(exc, url)
        return BrokerRefused(failure.reason) if failure.permanent else \
            BrokerUnreachable(url, failure.reason)
    return ConnectionLost(f"connection to the broker at {url} lost: {reason}")


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    text = str(error) or type(error).__name__
    if isinstance(error, asyncio.CancelledError):
        text = "the channel closed before the broker answered"
    elif isinstance(error, asyncio.TimeoutError) and not str(error):
        text = "timed out"
    return text if len(text) < 300 else text[:300] + "…"
