"""The only module that talks pika: a broker session in a background thread.

A :class:`BrokerSession` owns one pika ``SelectConnection`` and one confirm-mode
channel, driven by its own IO thread. Publishes from any thread are queued and
flushed in batches, so confirms pipeline (pika's BlockingConnection waits for
each confirm in turn). When the connection drops, the session reconnects with
tenacity backoff, declares its queues again, resumes its consumers and
re-publishes whatever the broker had not confirmed: callers see at-least-once.

On a secured broker (``broker_config/rabbitmq.conf``) a session logs in with a
:class:`TokenLogin`: the registry token is the password, every publish carries the
``user_id`` the broker checks, and exchanges are only looked up (passively declared),
since only the registry's own account may create them.
"""

from __future__ import annotations

import logging
import ssl
import struct
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pika
import pika.data
import pika.exceptions
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic, BasicProperties
from tenacity import Retrying, retry_if_exception_type, wait_exponential_jitter

from gc_core.errors import BrokerError, BrokerUnreachable, find_certificate_failure
from gc_core.protocol import Envelope
from gc_core.topology import QueueDeclaration, Topology

__all__ = ["CA_FILE_PARAMETER", "DEFAULT_MAX_MESSAGE_SIZE", "BrokerSession", "ConfirmCallback",
           "Delivery", "Refusal", "TokenLogin", "broker_tls", "certificate_refusal",
           "oversize_refusal", "redact_url", "token_login"]

logger = logging.getLogger(__name__)

#: Default publishes and acks handled per IO-loop turn, so incoming frames are read in between.
FLUSH_BATCH = 500
#: AMQP heartbeat (seconds) unless the URL sets one: a dead peer is noticed within ~2x this.
HEARTBEAT_SECONDS = 20
#: Reply codes that no reconnect can fix (access refused, precondition failed, not allowed).
FATAL_REPLY_CODES = frozenset({403, 406, 530})
#: RabbitMQ's default ``max_message_size``: a larger message is refused by the broker.
DEFAULT_MAX_MESSAGE_SIZE = 128 * 2**20
#: Bytes of header-frame framing: a message's properties must fit ``frame_max`` less this.
_FRAME_OVERHEAD = 8 + 14
#: Header bytes below which a message's properties certainly fit the smallest frame_max
#: RabbitMQ negotiates (4096); above it they are measured exactly before sending.
_SURELY_FITS = 3000

#: Words in a channel-close reply that mean the broker refused a publish (its exchange or
#: routing key, or a forged user_id), not the session: such publishes fail, the rest go on.
_PUBLISH_REFUSALS = ("access to topic", "access to exchange", "user_id property")
#: Words of the broker's reply to a message over its max_message_size: only that one fails.
_SIZE_REFUSAL = "larger than configured max size"


class Refusal(str):
    """Why the broker will never take a publish (too large, not encodable as AMQP, not
    permitted): sending it again cannot help, so the caller fails it instead of retrying.
    A plain ``str`` reason (a ``basic.nack``, an unroutable message) may be worth a retry."""


#: Called once per publish on the IO thread: None when confirmed, else the reason it was not
#: (a :class:`Refusal` when it is refused for good).
ConfirmCallback = Callable[[str | None], None]


@dataclass(frozen=True)
class TokenLogin:
    """Log in to a secured broker as ``username`` (a user, or ``endpoint-<id>`` for an agent)
    with a registry token as the password."""

    username: str
    token: str = field(repr=False)
    #: What to do when the broker refuses the token, for the error message.
    remedy: str = "run `gc-client login` with a valid token"

    def apply(self, url: str) -> str:
        """``url`` with these credentials in place of its own."""
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        netloc = f"{quote(self.username, safe='')}:{quote(self.token, safe='')}@{host}" + (
            f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    def refusal(self, url: str, vhost_refused: bool) -> str:
        """One line saying the broker refused this login, and what to do."""
        if vhost_refused:
            return (f"the broker at {redact_url(url)} refused {self.username} access to its "
                    "virtual host: the registry knows no such user or endpoint, or this is not "
                    "the fabric's vhost")
        return (f"the broker at {redact_url(url)} refused the token for {self.username}: it is "
                f"unknown, revoked or expired, or not {self.username}'s; {self.remedy}")


def token_login(url: str, username: str, token: str | None, *,
                remedy: str = TokenLogin.remedy) -> TokenLogin | None:
    """Log in with ``token`` when there is one and ``url`` names no user of its own (a URL
    with credentials, like the demo's guest one, keeps them: an open broker knows no tokens)."""
    if token is None or urlsplit(url).username:
        return None
    return TokenLogin(username, token, remedy)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message handed to a consumer, with what is needed to ack it later."""

    envelope: Envelope
    exchange: str
    routing_key: str
    redelivered: bool
    delivery_count: int
    generation: int
    tag: int
    #: The AMQP ``user_id`` the publisher set; a secured broker has checked it is theirs.
    user_id: str = ""


@dataclass(slots=True)
class _Publish:
    exchange: str
    routing_key: str
    envelope: Envelope
    persistent: bool
    mandatory: bool
    on_confirm: ConfirmCallback | None


@dataclass(slots=True)
class _Settle:
    generation: int
    tag: int
    ack: bool
    requeue: bool
    multiple: bool = False


class _Fatal(BrokerError):
    """The broker refused something a reconnect will not fix."""


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


#: The broker URL's query parameter naming the CA file that verifies an ``amqps://`` broker's
#: certificate (aiormq's name for it); without it the system's trust store does.
CA_FILE_PARAMETER = "cafile"
#: aiormq's other TLS parameters and pika's own, refused: a URL means the same to both
#: sessions, and nothing switches verification off.
_OTHER_TLS_PARAMETERS = frozenset({"capath", "cadata", "certfile", "keyfile", "no_verify_ssl",
                                   "ssl_options"})
#: OpenSSL's verify codes for a certificate that does not name the host connected to
#: (X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH).
_NAME_MISMATCHES = frozenset({62, 64})


def broker_tls(url: str) -> tuple[str, ssl.SSLContext | None]:
    """``url`` without its ``cafile`` parameter, and the TLS context to reach it with: for
    ``amqps://`` one that checks the broker's certificate and host name against that CA file,
    or else the system's trust store; None for ``amqp://``.

    Raises:
        ValueError: the URL sets TLS options we do not take, or names a CA file that is
            unreadable or that a plaintext ``amqp://`` URL would ignore.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    refused = sorted({name for name, _ in query} & _OTHER_TLS_PARAMETERS)
    if refused:
        raise ValueError(f"the broker URL {redact_url(url)} sets {', '.join(refused)}: only "
                         f"{CA_FILE_PARAMETER} is taken, and certificates are always verified")
    cafile = dict(query).get(CA_FILE_PARAMETER) or None
    bare = urlunsplit(parts._replace(
        query=urlencode([(name, value) for name, value in query if name != CA_FILE_PARAMETER])))
    if parts.scheme != "amqps":
        if cafile is not None:
            raise ValueError(f"the broker URL {redact_url(url)} names a CA file but does not "
                             "encrypt: write amqps:// (and the broker's TLS port)")
        return bare, None
    try:
        return bare, ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the CA file {cafile} that the broker URL names: "
                         f"{exc}") from exc


def certificate_refusal(url: str, error: BaseException) -> str | None:
    """One sentence for a broker whose certificate failed verification, or None when
    ``error`` is something else."""
    failure = find_certificate_failure(error)
    if failure is None:
        return None
    parts = urlsplit(url)
    broker = redact_url(urlunsplit(parts._replace(query="")))
    if failure.verify_code in _NAME_MISMATCHES:
        return (f"the broker at {broker} presented a certificate that is not valid for "
                f"{parts.hostname}; connect by a name the certificate holds")
    cafile = dict(parse_qsl(parts.query)).get(CA_FILE_PARAMETER)
    trusted = f"the CA in {cafile}" if cafile else "the system's trust store"
    return (f"the broker at {broker} presented a certificate not signed by {trusted} "
            f"({failure.verify_message or failure}); set {CA_FILE_PARAMETER}=<PEM file> in the "
            "broker URL to the CA that signed it")


def _connection_parameters(url: str) -> pika.URLParameters:
    """pika's parameters for ``url``, with the TLS of :func:`broker_tls` (pika takes no
    ``cafile``; it checks the certificate against the URL's host name)."""
    bare, context = broker_tls(url)
    params = pika.URLParameters(bare)
    if context is not None:
        params.ssl_options = pika.SSLOptions(context)
    return params


class BrokerSession:
    """One AMQP connection with confirmed publishes, consumers and automatic reconnect."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        topology: Topology,
        queues: Sequence[QueueDeclaration] = (),
        prefetch: int = 0,
        linger: float = 0.0,
        batch_size: int = FLUSH_BATCH,
        login: TokenLogin | None = None,
        stamp_user_id: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        _harden_pika()  # before any frame of ours is decoded
        self._login = login
        self._max_message_size = max_message_size
        self._url = login.apply(url) if login is not None else url
        # The broker checks user_id against the login, so a stamped id proves the sender.
        self._user_id = login.username if login is not None else (
            urlsplit(url).username if stamp_user_id else None)
        self._name = name
        self._topology = topology
        self._queues = list(queues)
        self._prefetch = prefetch
        self._linger = linger
        self._batch_size = batch_size
        self._consumers: dict[str, Callable[[Delivery], None]] = {}
        self._consuming = True
        self._active_consumers: set[str] = set()
        self._outbox: deque[_Publish | _Settle | Callable[[], None]] = deque()
        self._unconfirmed: OrderedDict[int, _Publish] = OrderedDict()
        self._returned: dict[str, str] = {}
        self._seq = 0
        self._generation = 0
        self._connection: SelectConnection | None = None
        self._channel: Channel | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._flush_scheduled = False
        self._in_order_ack: Delivery | None = None
        self._in_order_ack_scheduled = False
        self._ever_ready = False
        self._opened = False
        self._last_error = "no attempt made yet"
        self._fatal: str | None = None
        self._thread: threading.Thread | None = None
        self._start_waits = False
        self._io_thread_id: int | None = None
        #: How often the IO loop died of an unexpected error and was started again.
        self.io_loop_restarts = 0

    # -- public API, callable from any thread -------------------------------------------

    @property
    def url(self) -> str:
        """The broker URL without its password."""
        return redact_url(self._url)

    @property
    def connected(self) -> bool:
        """True while the channel is open and declared."""
        return self._ready.is_set()

    @property
    def gave_up(self) -> str | None:
        """Why the session stopped for good (the broker refused it), or None while it is
        connected or still trying to reconnect."""
        return self._fatal

    @property
    def on_io_thread(self) -> bool:
        """True when called on this session's IO thread, which must never wait on itself."""
        return threading.get_ident() == self._io_thread_id

    def start(self, timeout: float | None = 15.0) -> None:
        """Connect in the background; return once ready (at once if ``timeout`` is None).

        Raises:
            BrokerUnreachable: no connection within ``timeout``.
            BrokerError: the broker refused a declaration (for example mismatched arguments).
        """
        # A caller waiting in start() raises the fatal error itself; only log it for others.
        self._start_waits = timeout is not None
        self._thread = threading.Thread(target=self._run, name=f"broker-{self._name}", daemon=True)
        self._thread.start()
        if timeout is None:
            return
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self._fatal is not None or time.monotonic() > deadline:
                self.close(timeout=2)
                if self._fatal is not None:
                    raise BrokerError(self._fatal)
                raise BrokerUnreachable(self.url, self._last_error)

    def publish(self, exchange: str, routing_key: str, envelope: Envelope, *,
                on_confirm: ConfirmCallback | None = None, persistent: bool = True,
                mandatory: bool = False) -> None:
        """Queue a publish; ``on_confirm`` runs on the IO thread once the broker answers."""
        self._submit(_Publish(exchange, routing_key, envelope, persistent, mandatory, on_confirm))

    def consume(self, queue: str, on_message: Callable[[Delivery], None]) -> None:
        """Consume ``queue`` now and after every reconnect; ``on_message`` runs on the IO thread."""
        self._consumers[queue] = on_message
        self._submit(lambda: self._start_consumer(queue))

    def stop_consuming(self) -> None:
        """Cancel every consumer (unacked deliveries stay ours until acked or rejected)."""
        self._consuming = False
        self._submit(self._cancel_consumers)

    def ack(self, delivery: Delivery, *, multiple: bool = False) -> None:
        """Acknowledge a delivery (with ``multiple``, every earlier one of its channel too);
        a delivery from before a reconnect is ignored: the broker has requeued it."""
        self._submit(_Settle(delivery.generation, delivery.tag, True, False, multiple))

    def ack_in_order(self, delivery: Delivery) -> None:
        """IO thread only, for a consumer that settles deliveries in the order they came:
        ack this one and all before it with one frame per batch of frames read."""
        self._in_order_ack = delivery
        if not self._in_order_ack_scheduled and self._connection is not None:
            self._in_order_ack_scheduled = True
            self._connection.ioloop.call_later(0, self._flush_in_order_ack)

    def _flush_in_order_ack(self) -> None:
        self._in_order_ack_scheduled = False
        delivery, self._in_order_ack = self._in_order_ack, None
        if delivery is not None and self._channel is not None:
            self._execute(_Settle(delivery.generation, delivery.tag, True, False, True))

    def reject(self, delivery: Delivery, *, requeue: bool) -> None:
        """Return a delivery to its queue (``requeue``) or dead-letter it."""
        self._submit(_Settle(delivery.generation, delivery.tag, False, requeue))

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the IO thread once connected."""
        self._submit(fn)

    def queue_message_count(self, queue: str, on_count: Callable[[int], None]) -> None:
        """Ask the broker how many ready messages ``queue`` holds (it must exist)."""

        def ask() -> None:
            assert self._channel is not None
            self._channel.queue_declare(
                queue, passive=True,
                callback=lambda frame: on_count(frame.method.message_count))

        self._submit(ask)

    def delete_queue(self, queue: str) -> None:
        """Delete a queue this session declared, and stop declaring it on reconnect."""
        self._queues = [q for q in self._queues if q.name != queue]
        self._consumers.pop(queue, None)

        def delete() -> None:
            assert self._channel is not None
            self._channel.queue_delete(queue)

        self._submit(delete)

    def wait_settled(self, timeout: float) -> bool:
        """Wait until every queued publish and ack has been confirmed; False on timeout
        (at once on the IO thread, which would otherwise wait on itself)."""
        if self.on_io_thread:
            return not (self._outbox or self._unconfirmed)
        deadline = time.monotonic() + timeout
        while self._outbox or self._unconfirmed:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Close the connection and stop the IO thread."""
        self._stopping.set()
        connection = self._connection
        if connection is not None:
            connection.ioloop.add_callback_threadsafe(self._close_connection)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- queueing work for the IO thread -------------------------------------------------

    def _submit(self, op: _Publish | _Settle | Callable[[], None]) -> None:
        if self.on_io_thread and self._ready.is_set() and not self._outbox:
            self._execute(op)
            return
        self._outbox.append(op)
        if not self._flush_scheduled and self._ready.is_set():
            self._flush_scheduled = True
            connection = self._connection
            if connection is not None:
                connection.ioloop.add_callback_threadsafe(self._on_wake)

    def _on_wake(self) -> None:
        if self._linger > 0 and len(self._outbox) < self._batch_size and self._connection is not None:
            self._connection.ioloop.call_later(self._linger, self._flush)
        else:
            self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._ready.is_set():
            return
        for _ in range(self._batch_size):
            if not self._outbox:
                return
            self._execute(self._outbox.popleft())
        if self._outbox and self._connection is not None:
            self._flush_scheduled = True
            self._connection.ioloop.call_later(0, self._flush)

    def _execute(self, op: _Publish | _Settle | Callable[[], None]) -> None:
        channel = self._channel
        assert channel is not None
        if isinstance(op, _Publish):
            self._send(channel, op)
        elif isinstance(op, _Settle):
            if op.generation != self._generation or not channel.is_open:
                return  # the channel it came on is gone or closing: the broker requeues it
            if op.ack:
                channel.basic_ack(op.tag, multiple=op.multiple)
            else:
                channel.basic_nack(op.tag, requeue=op.requeue)
        else:
            _guarded(op)

    def _send(self, channel: Channel, op: _Publish) -> None:
        """Publish ``op``, or fail it at once if the broker could never take it: a message
        that cannot be encoded, does not fit a frame or is over the size limit would
        otherwise kill this thread or be refused and re-sent for ever."""
        properties = BasicProperties(
            message_id=op.envelope.message_id, correlation_id=op.envelope.correlation_id,
            content_type=op.envelope.content_type, headers=op.envelope.headers,
            delivery_mode=2 if op.persistent else 1,
            user_id=self._user_id)
        try:
            problem = self._unsendable(op, properties)
            if problem is None:
                channel.basic_publish(op.exchange, op.routing_key, op.envelope.body, properties,
                                      mandatory=op.mandatory)
        except (pika.exceptions.ChannelWrongStateError, pika.exceptions.ConnectionWrongStateError):
            self._outbox.appendleft(op)  # the channel is closing: send it after reconnecting
            return
        except Exception as exc:  # pika could not encode what the caller gave it
            problem = f"it cannot be encoded as an AMQP message: {_describe(exc)}"
        if problem is not None:
            logger.warning("%s: not publishing message %r to %s (%r): %s", self._name,
                           op.envelope.message_id[:80], op.exchange, op.routing_key[:80], problem)
            if op.on_confirm is not None:
                on_confirm = op.on_confirm
                _guarded(lambda: on_confirm(Refusal(problem)))
            return
        self._seq += 1
        self._unconfirmed[self._seq] = op

    def _unsendable(self, op: _Publish, properties: BasicProperties) -> str | None:
        """Why the broker would refuse ``op`` for good (its size), or None."""
        oversize = oversize_refusal(len(op.envelope.body), self._max_message_size)
        if oversize is not None:
            return oversize
        if _rough_header_size(op.envelope) < _SURELY_FITS:
            return None
        frame_max = self._connection.params.frame_max if self._connection is not None else 0
        header = len(b"".join(properties.encode())) + _FRAME_OVERHEAD
        if frame_max and header > frame_max:
            return (f"its properties and headers take {header:,} bytes, over the "
                    f"{frame_max:,}-byte AMQP frame they must fit in")
        return None

    # -- the IO thread -------------------------------------------------------------------

    def _run(self) -> None:
        self._io_thread_id = threading.get_ident()
        while not self._stopping.is_set():
            retrying = Retrying(
                retry=retry_if_exception_type(BrokerUnreachable),
                wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
                stop=lambda _state: self._stopping.is_set() or self._fatal is not None,
                sleep=self._sleep_unless_closing,
                before_sleep=lambda state: logger.warning(
                    "broker %s unreachable (%s); retrying in %.1fs", self.url, self._last_error,
                    state.upcoming_sleep),
                reraise=True,
            )
            try:
                retrying(self._run_connection)
            except BrokerUnreachable:
                return
            except _Fatal as exc:
                self._fatal = str(exc)
                logger.log(logging.DEBUG if self._start_waits and not self._ever_ready
                           else logging.ERROR, "broker session %s stopped: %s", self._name, exc)
                return
            except Exception:  # a bug in a callback escaped the IO loop: start a new one
                self.io_loop_restarts += 1
                logger.exception("the IO loop of broker session %s failed; reconnecting",
                                 self._name)
                self._abandon_connection()
                self._sleep_unless_closing(0.5)

    def _abandon_connection(self) -> None:
        """After the IO loop died: drop its connection, so the broker requeues what we
        held, and queue what it never confirmed to be sent again."""
        connection, self._connection = self._connection, None
        self._ready.clear()
        self._channel = None
        self._requeue_unconfirmed()
        if connection is not None:
            try:
                connection._adapter_disconnect_stream()  # pika has no public abort
            except Exception:  # already closed or never opened: nothing to drop
                logger.debug("dropping the connection of %s failed", self._name, exc_info=True)

    def _sleep_unless_closing(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def _run_connection(self) -> None:
        """Run one connection until it closes; raise if it never opened."""
        self._opened = False
        try:
            params = _connection_parameters(self._url)
        except ValueError as exc:  # a bad URL or CA file: no reconnect fixes it
            raise _Fatal(str(exc)) from exc
        if "heartbeat" not in self._url:
            params.heartbeat = HEARTBEAT_SECONDS
        params.connection_attempts = 1
        params.client_properties = {"connection_name": self._name}
        connection = SelectConnection(
            params, on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed)
        self._connection = connection
        connection.ioloop.start()
        self._connection = None
        if self._fatal is not None:
            raise _Fatal(self._fatal)
        if not self._opened and not self._stopping.is_set():
            raise BrokerUnreachable(self.url, self._last_error)

    def _on_connection_open(self, connection: SelectConnection) -> None:
        self._opened = True
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, connection: SelectConnection, error: BaseException) -> None:
        untrusted = certificate_refusal(self._url, error)
        self._last_error = untrusted or _describe(error)
        refused = isinstance(error, (pika.exceptions.ProbableAuthenticationError,
                                     pika.exceptions.AuthenticationError))
        if untrusted is not None and not self._ever_ready:
            # Fatal at start; a broker that was trusted before is retried, in case its
            # certificate is being replaced.
            self._fatal = untrusted
        elif self._login is not None and (refused or isinstance(
                error, pika.exceptions.ProbableAccessDeniedError)):
            self._fatal = self._login.refusal(self._url, vhost_refused=not refused)
        elif refused:
            self._fatal = f"the broker at {self.url} refused the credentials: {error}"
        connection.ioloop.stop()

    def _on_connection_closed(self, connection: SelectConnection, reason: BaseException) -> None:
        was_ready = self._ready.is_set()
        self._ready.clear()
        self._channel = None
        self._requeue_unconfirmed()
        if was_ready and not self._stopping.is_set():
            logger.warning("connection %s to %s lost (%s); reconnecting", self._name, self.url,
                           _describe(reason))
        connection.ioloop.stop()

    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        self._active_consumers.clear()
        self._generation += 1
        self._seq = 0
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(self._on_confirm)
        for name, kind in self._topology.exchanges.values():
            # Logged in with a token we may not create exchanges: only check they exist.
            channel.exchange_declare(name, kind, durable=True, passive=self._login is not None)
        for queue in self._queues:
            channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
            for binding in queue.bindings:
                channel.queue_bind(queue.name, binding.exchange, binding.routing_key,
                                   arguments=binding.arguments or None)
        channel.basic_qos(prefetch_count=self._prefetch, callback=self._on_declared)

    def _on_declared(self, _frame: Method) -> None:
        channel = self._channel
        assert channel is not None
        if self._consuming:
            for queue in self._consumers:
                self._start_consumer(queue)
        if self._ever_ready:
            logger.info("connection %s to %s restored", self._name, self.url)
        self._ever_ready = True
        self._ready.set()
        self._flush_scheduled = False
        self._flush()

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        code = getattr(reason, "reply_code", 0)
        text = str(getattr(reason, "reply_text", ""))
        if code in FATAL_REPLY_CODES and not self._ready.is_set() and not self._stopping.is_set():
            self._fatal = f"the broker at {self.url} refused session {self._name}: {reason}"
        elif code in FATAL_REPLY_CODES and _SIZE_REFUSAL in text:
            self._fail_refused_publish(text, same_target=False)
        elif code in FATAL_REPLY_CODES and any(w in text for w in _PUBLISH_REFUSALS):
            self._fail_refused_publish(text, same_target=True)
        elif not self._stopping.is_set():
            logger.warning("channel of %s closed (%s); reconnecting", self._name, reason)
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close()

    def _start_consumer(self, queue: str) -> None:
        if self._channel is None or not self._consuming or queue in self._active_consumers:
            return
        self._active_consumers.add(queue)
        on_message = self._consumers[queue]
        generation = self._generation

        def deliver(_ch: Channel, method: Basic.Deliver, props: BasicProperties,
                    body: bytes) -> None:
            headers = props.headers or {}
            delivery = Delivery(
                envelope=Envelope(props.message_id or "", props.correlation_id or "",
                                  props.content_type or "", headers, body),
                exchange=method.exchange, routing_key=method.routing_key,
                redelivered=method.redelivered,
                delivery_count=_delivery_count(headers),
                generation=generation, tag=method.delivery_tag, user_id=props.user_id or "")
            _guarded(lambda: on_message(delivery))

        self._channel.basic_consume(queue, deliver, consumer_tag=f"{self._name}:{queue}")

    def _cancel_consumers(self) -> None:
        if self._channel is not None:
            for queue in self._active_consumers:
                self._channel.basic_cancel(f"{self._name}:{queue}")
        self._active_consumers.clear()

    def _on_return(self, _ch: Channel, method: Basic.Return, props: BasicProperties,
                   _body: bytes) -> None:
        self._returned[props.message_id or ""] = (
            f"the broker could not route it ({method.reply_text}): exchange {method.exchange!r} "
            f"has no queue bound for routing key {method.routing_key!r}")

    def _on_confirm(self, frame: Method) -> None:
        method = frame.method
        tag = method.delivery_tag
        if method.multiple:
            settled = []
            while self._unconfirmed and next(iter(self._unconfirmed)) <= tag:
                settled.append(self._unconfirmed.popitem(last=False)[1])
        else:
            single = self._unconfirmed.pop(tag, None)
            settled = [single] if single is not None else []
        refused = None if isinstance(method, Basic.Ack) else "the broker refused it (basic.nack)"
        for publish in settled:
            reason = self._returned.pop(publish.envelope.message_id, None) if self._returned else None
            if publish.on_confirm is not None:
                on_confirm, why = publish.on_confirm, refused or reason
                _guarded(lambda: on_confirm(why))

    def _fail_refused_publish(self, text: str, *, same_target: bool) -> None:
        """The broker closed the channel over a publish: confirms come in order, so it is
        the oldest unconfirmed one. It fails (with ``same_target``, so does every other
        unconfirmed one to the same exchange and routing key, which would be refused too);
        the rest are sent again after reconnecting."""
        if not self._unconfirmed:
            return
        first = next(iter(self._unconfirmed.values()))
        target = (first.exchange, first.routing_key)
        refused = [seq for seq, p in self._unconfirmed.items()
                   if (p.exchange, p.routing_key) == target] if same_target else \
            [next(iter(self._unconfirmed))]
        logger.warning("the broker refused %d publishes to %s (%r): %s", len(refused),
                       first.exchange, first.routing_key[:80], text)
        for seq in refused:
            on_confirm = self._unconfirmed.pop(seq).on_confirm
            if on_confirm is not None:
                _guarded(lambda: on_confirm(Refusal(f"the broker refused it: {text}")))

    def _requeue_unconfirmed(self) -> None:
        """Put publishes the broker never confirmed back at the front, in order."""
        pending = list(self._unconfirmed.values())
        self._unconfirmed.clear()
        self._returned.clear()
        self._outbox.extendleft(reversed(pending))
        self._flush_scheduled = False

    def _close_connection(self) -> None:
        connection = self._connection
        if connection is None:
            return
        try:
            connection.close()
        except pika.exceptions.ConnectionWrongStateError:
            connection.ioloop.stop()


def oversize_refusal(size: int, limit: int) -> Refusal | None:
    """Why a message body of ``size`` bytes will never be taken by a broker whose
    ``max_message_size`` is ``limit``, or None when it fits."""
    if size <= limit:
        return None
    return Refusal(f"it is {size:,} bytes, over the broker's limit of {limit:,} bytes "
                   "(max_message_size)")


def _rough_header_size(envelope: Envelope) -> int:
    """An upper-bound guess at a message's encoded properties, cheap enough for every
    publish; a nested header counts as large, so it is measured exactly."""
    size = len(envelope.message_id) + len(envelope.correlation_id) + len(envelope.content_type)
    for name, value in envelope.headers.items():
        if isinstance(value, (str, bytes)):
            size += len(name) + 4 * len(value) + 6  # 4: the most bytes a character encodes to
        elif isinstance(value, (dict, list, tuple)):
            return _SURELY_FITS
        else:
            size += len(name) + 24
    return size


def _delivery_count(headers: dict[str, Any]) -> int:
    """The broker's count of earlier deliveries; a publisher may have put anything there
    (a quorum queue overwrites it only on redelivery)."""
    count = headers.get("x-delivery-count", 0)
    return count if type(count) is int and count >= 0 else 0


_pika_decode_value = pika.data.decode_value


def _decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
    """pika's field decoder, except that a timestamp past what ``datetime`` holds stays an
    int. pika raises there, inside its IO loop: the connection drops and the broker hands
    the same message to the next connection, for ever (one forged header, ~1,900
    reconnects, other users' tasks dead-lettered)."""
    if encoded[offset:offset + 1] == b"T":
        (seconds,) = struct.unpack_from(">Q", encoded, offset + 1)
        try:
            return datetime.fromtimestamp(seconds, timezone.utc), offset + 9
        except (OverflowError, OSError, ValueError):
            return seconds, offset + 9
    decoded: tuple[Any, int] = _pika_decode_value(encoded, offset)
    return decoded


def _harden_pika() -> None:
    """Install :func:`_decode_value` as pika's field decoder (pika looks it up by module
    attribute, for nested tables and arrays too; it has no hook for this). Idempotent."""
    pika.data.decode_value = _decode_value


def _guarded(fn: Callable[[], Any]) -> None:
    """Run a callback on the IO thread; a bug in it must not stop the connection."""
    try:
        fn()
    except Exception:
        logger.exception("callback on the broker IO thread failed")


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) < 300 else text[:300] + "…"
