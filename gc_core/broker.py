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

Threads: a session's public methods may be called from any thread; everything pika
touches belongs to the session's IO thread (see :class:`BrokerSession`). pika's exceptions
and the broker's close frames become our errors in one place, :func:`_translate`, and what
one thread learns reaches another as an exception, never as a string.
"""

from __future__ import annotations

import logging
import ssl
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum, IntEnum
from functools import partial
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import pika
import pika.data
import pika.exceptions
from pika import spec
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic, BasicProperties
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from gc_core.errors import (
    BrokerError,
    BrokerRefused,
    BrokerUnreachable,
    ConnectionLost,
    PublishNotConfirmed,
    find_certificate_failure,
)
from gc_core.protocol import Envelope
from gc_core.topology import QueueDeclaration, Topology

__all__ = ["CA_FILE_PARAMETER", "DEFAULT_MAX_MESSAGE_SIZE", "BrokerSession", "ConfirmCallback",
           "Delivery", "Refusal", "Settlement", "TokenLogin", "broker_tls", "certificate_refusal",
           "oversize_refusal", "redact_url", "token_login"]

logger = logging.getLogger(__name__)

#: Default publishes and acks handled per IO-loop turn, so incoming frames are read in between.
FLUSH_BATCH = 500
#: AMQP heartbeat (seconds) unless the URL sets one: a dead peer is noticed within ~2x this.
HEARTBEAT_SECONDS = 20
#: RabbitMQ's default ``max_message_size``: a larger message is refused by the broker.
DEFAULT_MAX_MESSAGE_SIZE = 128 * 2**20
#: Bytes of header-frame framing: a message's properties must fit ``frame_max`` less this.
_FRAME_OVERHEAD = 8 + 14
#: Header bytes below which a message's properties certainly fit the smallest frame_max
#: RabbitMQ negotiates (4096); above it they are measured exactly before sending.
_SURELY_FITS = 3000

#: The one channel a session opens on each connection.
_CHANNEL = 1


class _ReplyCode(IntEnum):
    """The AMQP 0-9-1 reply codes a session tells apart (the spec's constants). RabbitMQ
    adds an English explanation to each, which is shown to people and never matched."""

    ACCESS_REFUSED = 403
    PRECONDITION_FAILED = 406
    NOT_ALLOWED = 530


#: Basic.Publish's (class id, method id): a channel close that names it refused a publish.
_PUBLISH_METHOD = divmod(Basic.Publish.INDEX, 0x10000)
#: Reply codes that refuse the session itself when they close the channel while it is
#: still declaring (its queues' arguments, its permissions): no reconnect can fix them.
_SESSION_REFUSALS = frozenset({_ReplyCode.ACCESS_REFUSED, _ReplyCode.PRECONDITION_FAILED,
                               _ReplyCode.NOT_ALLOWED})
#: Reply codes that refuse one publish for good when they close the channel over it, and
#: whether every other unconfirmed publish to its exchange and routing key goes with it:
#: ACCESS_REFUSED is about the target (topic or exchange permissions), so all of those
#: would be refused too; PRECONDITION_FAILED is about that message (over the broker's
#: max_message_size; the user_id we stamp is always the login's), so only it fails.
_PUBLISH_REFUSALS: dict[int, bool] = {_ReplyCode.ACCESS_REFUSED: True,
                                      _ReplyCode.PRECONDITION_FAILED: False}


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


class Settlement(Enum):
    """What becomes of a delivery its consumer is done with."""

    #: Acknowledged: the broker forgets it.
    ACK = "ack"
    #: Returned to its queue, for this consumer or another.
    REQUEUE = "requeue"
    #: Rejected for good: the queue's dead-letter exchange takes it.
    DEAD_LETTER = "dead-letter"


@dataclass(slots=True)
class _Settle:
    generation: int
    tag: int
    how: Settlement
    multiple: bool = False


#: What the outbox carries to the IO thread.
_Op = _Publish | _Settle | Callable[[], None]

_T = TypeVar("_T")


class _Answer(Generic[_T]):
    """One request's answer, handed from the IO thread to the thread that waits for it.
    Each request makes its own, so an answer that comes after its waiter gave up lands
    here and goes nowhere else: never into a later request's."""

    def __init__(self) -> None:
        self._given = threading.Event()
        self._value: _T | None = None

    def give(self, value: _T) -> None:
        """IO thread: the broker answered."""
        self._value = value
        self._given.set()

    def wait(self, timeout: float) -> _T | None:
        """The answer, or None when it has not come within ``timeout``."""
        return self._value if self._given.wait(timeout) else None


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


class _PublishRefused(PublishNotConfirmed):
    """The broker closed the channel over a publish it will never take (the oldest
    unconfirmed one: confirms come in order); with ``same_target``, every unconfirmed
    publish to its exchange and routing key would be refused too."""

    def __init__(self, reply_text: str, *, same_target: bool) -> None:
        super().__init__(f"the broker refused it: {reply_text}")
        self.reply_text = reply_text
        self.same_target = same_target


@dataclass(frozen=True, slots=True)
class _Where:
    """What the IO thread knows when something fails, for :func:`_translate`."""

    #: The URL with its password: a certificate refusal names its ``cafile``; never shown.
    url: str
    session: str
    login: TokenLogin | None
    #: Opening the connection (else it was open, or its channel was).
    opening: bool = False
    #: The channel is open and still declaring: the session is not ready yet.
    declaring: bool = False
    #: The session was connected before: a certificate it now refuses may be being replaced.
    trusted_before: bool = False
    #: The (class id, method id) a broker's Channel.Close named, when it closed the channel.
    closed_by: tuple[int, int] | None = None


def _translate(error: BaseException, where: _Where) -> BrokerError:
    """The one place where pika's exceptions and the broker's close frames become ours.

    :class:`BrokerRefused`: no reconnect can fix it, the session stops.
    :class:`_PublishRefused`: a publish fails for good, the session reconnects and goes on.
    :class:`BrokerUnreachable`: the connection did not open; retried with backoff.
    :class:`ConnectionLost`: the connection or channel closed; the session reconnects.
    Each is chained to ``error``.
    """
    translated = _translated(error, where)
    translated.__cause__ = error
    return translated


def _translated(error: BaseException, where: _Where) -> BrokerError:
    url = redact_url(where.url)
    if isinstance(error, ValueError):  # broker_tls: the URL or its CA file cannot be used
        return BrokerRefused(str(error))
    if where.opening:
        return _open_failure(error, where, url)
    code = getattr(error, "reply_code", 0)  # a close frame's, by the broker
    if where.declaring and code in _SESSION_REFUSALS:
        return BrokerRefused(f"the broker at {url} refused session {where.session}: {error}")
    if isinstance(error, pika.exceptions.ChannelClosedByBroker):
        same_target = _PUBLISH_REFUSALS.get(code) if where.closed_by == _PUBLISH_METHOD else None
        if same_target is not None:
            return _PublishRefused(str(error.reply_text), same_target=same_target)
        return ConnectionLost(f"channel of {where.session} closed ({error})")
    return ConnectionLost(f"connection {where.session} to {url} lost ({_describe(error)})")


def _open_failure(error: BaseException, where: _Where, url: str) -> BrokerError:
    """A connection that did not open: refused for good, or worth another try. pika tells
    the broker's refusals apart by type (from the reply code and how far the handshake
    got): a refused login, a refused virtual host."""
    untrusted = certificate_refusal(where.url, error)
    if untrusted is not None:
        # Fatal at start; a broker that was trusted before is retried, in case its
        # certificate is being replaced.
        return BrokerUnreachable(url, untrusted) if where.trusted_before else \
            BrokerRefused(untrusted)
    refused = isinstance(error, (pika.exceptions.ProbableAuthenticationError,
                                 pika.exceptions.AuthenticationError))
    if where.login is not None and (
            refused or isinstance(error, pika.exceptions.ProbableAccessDeniedError)):
        return BrokerRefused(where.login.refusal(where.url, vhost_refused=not refused))
    if refused:
        return BrokerRefused(f"the broker at {url} refused the credentials: {error}")
    return BrokerUnreachable(url, _describe(error))


class _Consumers:
    """The consuming half of a session, kept apart as dramatiq keeps its RabbitMQ
    consumer: which queues are consumed with which handler, and which of them the current
    channel consumes. It lives on the session's IO thread (every method runs there), so
    it has no lock."""

    def __init__(self, session: str) -> None:
        self._session = session
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
                channel.basic_consume(queue, _deliverer(on_message, generation),
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


def _deliverer(on_message: Callable[[Delivery], None], generation: int) -> Callable[
        [Channel, Basic.Deliver, BasicProperties, bytes], None]:
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
            delivery_count=_delivery_count(headers),
            generation=generation, tag=method.delivery_tag, user_id=props.user_id or "")
        _guarded(lambda: on_message(delivery))

    return deliver


class BrokerSession:
    """One AMQP connection with confirmed publishes, consumers and automatic reconnect.

    Threads: the public methods may be called from any thread, except where their
    docstrings say otherwise. Everything pika touches belongs to the session's IO thread
    and has no lock: the connection's IO loop, the channel, the unconfirmed publishes, the
    consumers. Methods named ``_io_*``, and every method of :class:`_Consumers`, run on the
    IO thread only, as pika's callbacks or handed over through the outbox
    (:meth:`_hand_over`); those that would corrupt that state from another thread check
    where they run (:meth:`_io_only`). ``__init__`` says, field by field, what the other
    threads may touch.
    """

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
        # -- set here, only read afterwards (any thread) --
        self._login = login
        self._max_message_size = max_message_size
        self._url = login.apply(url) if login is not None else url
        # The broker checks user_id against the login, so a stamped id proves the sender.
        # pika logs in with the URL's user name unquoted: stamp that, or the broker refuses.
        username = urlsplit(url).username
        self._user_id = login.username if login is not None else (
            unquote(username) if stamp_user_id and username else None)
        self._name = name
        self._topology = topology
        self._prefetch = prefetch
        self._linger = linger
        self._batch_size = batch_size
        # -- shared by every thread, each safe by its type --
        #: Work for the IO thread: any thread appends, the IO thread pops (each atomic).
        self._outbox: deque[_Op] = deque()
        #: Guards _wake_pending, the one field both sides write (see _enqueue, _io_flush).
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._consuming_stopped = threading.Event()
        # -- written by the IO thread, read by any (a reference is assigned atomically) --
        #: The current connection: other threads only reach its IO loop through it, with
        #: add_callback_threadsafe, pika's one thread-safe call.
        self._connection: SelectConnection | None = None
        #: Why the session stopped for good; set once, as the IO thread ends.
        self._fatal: BrokerRefused | None = None
        #: The latest attempt to connect that failed, for start() to report.
        self._last_failure: BrokerUnreachable | None = None
        self._io_thread_id: int | None = None
        #: How often the IO loop died of an unexpected error and was started again.
        self.io_loop_restarts = 0
        # -- set by start() before the IO thread exists --
        self._thread: threading.Thread | None = None
        self._start_waits = False
        # -- the IO thread's alone (wait_settled only peeks whether _unconfirmed is empty) --
        self._queues = list(queues)
        self._consumers = _Consumers(name)
        self._unconfirmed: OrderedDict[int, _Publish] = OrderedDict()
        self._returned: dict[str, str] = {}
        self._seq = 0
        self._generation = 0
        self._channel: Channel | None = None
        self._closed_by: tuple[int, int] | None = None
        self._refusal: BrokerRefused | None = None
        self._in_order_ack: Delivery | None = None
        self._in_order_ack_scheduled = False
        self._ever_ready = False
        self._opened = False

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
    def gave_up(self) -> BrokerRefused | None:
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
            BrokerRefused: the broker refused the login, its certificate failed the check,
                or it refused a declaration (for example mismatched arguments).
        """
        # A caller waiting in start() raises the fatal error itself; only log it for others.
        self._start_waits = timeout is not None
        self._thread = threading.Thread(target=self._io_run, name=f"broker-{self._name}",
                                        daemon=True)
        self._thread.start()
        if timeout is None:
            return
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self._fatal is not None or time.monotonic() > deadline:
                self.close(timeout=2)
                fatal, last = self._fatal, self._last_failure
                if fatal is not None:
                    raise fatal
                raise BrokerUnreachable(
                    self.url, last.reason if last is not None else "no attempt made yet") from last

    def publish(self, exchange: str, routing_key: str, envelope: Envelope, *,
                on_confirm: ConfirmCallback | None = None, persistent: bool = True,
                mandatory: bool = False) -> None:
        """Queue a publish; ``on_confirm`` runs on the IO thread once the broker answers."""
        self._hand_over(_Publish(exchange, routing_key, envelope, persistent, mandatory,
                                 on_confirm))

    def consume(self, queue: str, on_message: Callable[[Delivery], None]) -> None:
        """Consume ``queue`` now and after every reconnect; ``on_message`` runs on the IO thread."""
        self._hand_over(partial(self._io_consume, queue, on_message))

    def stop_consuming(self) -> None:
        """Cancel every consumer (unacked deliveries stay ours until acked or rejected)."""
        self._consuming_stopped.set()  # at once: a reconnect meanwhile must not resume them
        self._hand_over(self._io_cancel_consumers)

    def settle(self, delivery: Delivery, how: Settlement) -> None:
        """Ack, requeue or dead-letter a delivery; one from before a reconnect is ignored:
        the broker has requeued it."""
        self._hand_over(_Settle(delivery.generation, delivery.tag, how))

    def ack(self, delivery: Delivery, *, multiple: bool = False) -> None:
        """Acknowledge a delivery (with ``multiple``, every earlier one of its channel too);
        a delivery from before a reconnect is ignored: the broker has requeued it."""
        self._hand_over(_Settle(delivery.generation, delivery.tag, Settlement.ACK, multiple))

    def reject(self, delivery: Delivery, *, requeue: bool) -> None:
        """Return a delivery to its queue (``requeue``) or dead-letter it."""
        self.settle(delivery, Settlement.REQUEUE if requeue else Settlement.DEAD_LETTER)

    def ack_in_order(self, delivery: Delivery) -> None:
        """IO thread only, for a consumer that settles deliveries in the order they came:
        ack this one and all before it with one frame per batch of frames read.

        Raises:
            RuntimeError: called from another thread.
        """
        self._io_only()
        self._in_order_ack = delivery
        if not self._in_order_ack_scheduled and self._connection is not None:
            self._in_order_ack_scheduled = True
            self._connection.ioloop.call_later(0, self._io_flush_in_order_ack)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the IO thread once connected."""
        self._hand_over(fn)

    def queue_message_count(self, queue: str, on_count: Callable[[int], None]) -> None:
        """Ask the broker how many ready messages ``queue`` holds (it must exist);
        ``on_count`` runs on the IO thread with the answer."""
        self._hand_over(partial(self._io_ask_message_count, queue, on_count))

    def message_count(self, queue: str, timeout: float) -> int | None:
        """How many ready messages ``queue`` holds, or None when the broker has not said
        within ``timeout``. Each call waits for an answer of its own (an :class:`_Answer`):
        one that comes after its caller gave up is dropped with it.

        Raises:
            RuntimeError: called on the IO thread, which would wait on itself.
        """
        if self.on_io_thread:
            raise RuntimeError(f"broker session {self._name}: message_count would wait on "
                               "its own IO thread; use queue_message_count there")
        answer: _Answer[int] = _Answer()
        self.queue_message_count(queue, answer.give)
        return answer.wait(timeout)

    def delete_queue(self, queue: str) -> None:
        """Delete a queue this session declared, and stop declaring it on reconnect."""
        self._hand_over(partial(self._io_delete_queue, queue))

    def wait_settled(self, timeout: float) -> bool:
        """Wait until every queued publish and ack has been confirmed; False on timeout
        (at once on the IO thread, which would otherwise wait on itself). Other threads
        only peek at whether the outbox and the unconfirmed publishes are empty."""
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
            connection.ioloop.add_callback_threadsafe(self._io_close_connection)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- handing work to the IO thread (any thread) --------------------------------------

    def _hand_over(self, op: _Op) -> None:
        """Have the IO thread run ``op`` after everything handed over before it. On the IO
        thread itself, connected and with nothing queued ahead, that is now (the same order,
        without a wake-up); anywhere else, or while disconnected, through the outbox."""
        if self.on_io_thread and self._ready.is_set() and not self._outbox:
            self._io_execute(op)
        else:
            self._enqueue(op)

    def _enqueue(self, op: _Op) -> None:
        """Queue ``op`` and wake the IO thread, unless a flush is pending already.

        Why no op is stranded: the append and the look at ``_wake_pending`` happen under
        ``_wake_lock``, and :meth:`_io_flush` clears ``_wake_pending`` under the same lock
        only after seeing the outbox empty. So either that flush sees this op, or this
        call sees no flush pending and wakes the IO thread itself. While disconnected
        nobody wakes it: the next connection's first flush (:meth:`_io_on_declared`) takes
        the outbox, and resets a flag a dead connection's wake-up left set.
        """
        with self._wake_lock:
            self._outbox.append(op)
            if self._wake_pending or not self._ready.is_set():
                return
            self._wake_pending = True
            connection = self._connection
        if connection is not None:
            connection.ioloop.add_callback_threadsafe(self._io_wake)

    # -- the IO thread: the outbox, the channel, the consumers ------------------------------

    def _io_only(self) -> None:
        """Refuse to go on outside the IO thread: the state a caller would touch has no lock."""
        if threading.get_ident() != self._io_thread_id:
            raise RuntimeError(f"broker session {self._name}: called on thread "
                               f"{threading.current_thread().name!r}; only its IO thread may "
                               "touch its channel")

    def _io_wake(self) -> None:
        """The outbox has work: flush it now, or after ``linger`` to fill a batch."""
        connection = self._connection
        if self._linger > 0 and len(self._outbox) < self._batch_size and connection is not None:
            connection.ioloop.call_later(self._linger, self._io_flush)
        else:
            self._io_flush()

    def _io_flush(self) -> None:
        """Run up to a batch of queued ops, then schedule the next batch if more wait, so
        incoming frames are read in between (see :meth:`_enqueue` for the wake-up flag)."""
        self._io_only()
        if self._ready.is_set():
            for _ in range(self._batch_size):
                if not self._outbox:
                    break
                self._io_execute(self._outbox.popleft())
        with self._wake_lock:
            more = self._wake_pending = self._ready.is_set() and bool(self._outbox)
        if more and self._connection is not None:
            self._connection.ioloop.call_later(0, self._io_flush)

    def _io_execute(self, op: _Op) -> None:
        self._io_only()
        channel = self._channel
        assert channel is not None
        if isinstance(op, _Publish):
            self._io_send(channel, op)
        elif isinstance(op, _Settle):
            if op.generation != self._generation or not channel.is_open:
                return  # the channel it came on is gone or closing: the broker requeues it
            if op.how is Settlement.ACK:
                channel.basic_ack(op.tag, multiple=op.multiple)
            else:
                channel.basic_nack(op.tag, requeue=op.how is Settlement.REQUEUE)
        else:
            _guarded(op)

    def _io_send(self, channel: Channel, op: _Publish) -> None:
        """Publish ``op``, or fail it at once if the broker could never take it: a message
        that cannot be encoded, does not fit a frame or is over the size limit would
        otherwise kill this thread or be refused and re-sent for ever."""
        properties = BasicProperties(
            message_id=op.envelope.message_id, correlation_id=op.envelope.correlation_id,
            content_type=op.envelope.content_type, headers=op.envelope.headers,
            delivery_mode=2 if op.persistent else 1,
            user_id=self._user_id)
        try:
            problem = self._io_unsendable(op, properties)
            if problem is None:
                channel.basic_publish(op.exchange, op.routing_key, op.envelope.body, properties,
                                      mandatory=op.mandatory)
        except (pika.exceptions.ChannelWrongStateError, pika.exceptions.ConnectionWrongStateError):
            self._outbox.appendleft(op)  # the channel is closing: send it after reconnecting
            return
        except Exception as exc:  # noqa: BLE001 - pika could not encode what the caller gave it
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

    def _io_unsendable(self, op: _Publish, properties: BasicProperties) -> str | None:
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

    def _io_flush_in_order_ack(self) -> None:
        self._in_order_ack_scheduled = False
        delivery, self._in_order_ack = self._in_order_ack, None
        if delivery is not None and self._channel is not None:
            self._io_execute(_Settle(delivery.generation, delivery.tag, Settlement.ACK, True))

    def _io_consume(self, queue: str, on_message: Callable[[Delivery], None]) -> None:
        self._consumers.add(queue, on_message)
        self._io_start_consumers()

    def _io_start_consumers(self) -> None:
        if self._channel is not None and not self._consuming_stopped.is_set():
            self._consumers.start(self._channel, self._generation)

    def _io_cancel_consumers(self) -> None:
        self._consumers.cancel(self._channel)

    def _io_ask_message_count(self, queue: str, on_count: Callable[[int], None]) -> None:
        assert self._channel is not None
        self._channel.queue_declare(queue, passive=True,
                                    callback=lambda frame: on_count(frame.method.message_count))

    def _io_delete_queue(self, queue: str) -> None:
        self._queues = [q for q in self._queues if q.name != queue]
        self._consumers.forget(queue)
        assert self._channel is not None
        self._channel.queue_delete(queue)

    # -- the IO thread: connecting, reconnecting, and what the broker says -----------------

    def _io_run(self) -> None:
        """The IO thread: connect and run the connection, again and again (with backoff
        while the broker is unreachable), until closed or refused for good."""
        self._io_thread_id = threading.get_ident()
        while not self._stopping.is_set():
            retrying = Retrying(
                retry=retry_if_exception_type(BrokerUnreachable),
                wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
                stop=lambda _state: self._stopping.is_set(),
                sleep=self._io_sleep_unless_closing,
                before_sleep=self._io_log_retry,
                reraise=True,
            )
            try:
                retrying(self._io_run_connection)
            except BrokerUnreachable:
                return
            except BrokerRefused as exc:
                self._fatal = exc  # start(), gave_up and the heartbeat read it from here on
                logger.log(logging.DEBUG if self._start_waits and not self._ever_ready
                           else logging.ERROR, "broker session %s stopped: %s", self._name, exc)
                return
            except Exception:  # a bug in a callback escaped the IO loop: start a new one
                self.io_loop_restarts += 1
                logger.exception("the IO loop of broker session %s failed; reconnecting",
                                 self._name)
                self._io_abandon_connection()
                self._io_sleep_unless_closing(0.5)

    def _io_log_retry(self, state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome is not None else None
        logger.warning("broker %s unreachable (%s); retrying in %.1fs", self.url,
                       getattr(failure, "reason", failure), state.upcoming_sleep or 0.0)

    def _io_abandon_connection(self) -> None:
        """After the IO loop died: drop its connection, so the broker requeues what we
        held, and queue what it never confirmed to be sent again."""
        self._ready.clear()  # before the connection goes: see _enqueue
        connection, self._connection = self._connection, None
        self._channel = None
        self._io_requeue_unconfirmed()
        if connection is not None:
            try:
                connection._adapter_disconnect_stream()  # pika has no public abort
            except Exception:  # already closed or never opened: nothing to drop
                logger.debug("dropping the connection of %s failed", self._name, exc_info=True)

    def _io_sleep_unless_closing(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def _io_failure(self, error: BaseException, *, opening: bool = False) -> BrokerError:
        """``error`` as ours (:func:`_translate`), with what this thread knows now."""
        return _translate(error, _Where(
            self._url, self._name, self._login, opening=opening,
            declaring=not self._ready.is_set() and not self._stopping.is_set(),
            trusted_before=self._ever_ready, closed_by=self._closed_by))

    def _io_run_connection(self) -> None:
        """Run one connection until it closes; raise if it never opened or was refused."""
        self._opened = False
        self._refusal = None
        try:
            params = _connection_parameters(self._url)
        except ValueError as exc:  # a bad URL or CA file: no reconnect fixes it
            raise self._io_failure(exc, opening=True) from exc
        if "heartbeat" not in self._url:
            params.heartbeat = HEARTBEAT_SECONDS
        params.connection_attempts = 1
        params.client_properties = {"connection_name": self._name}
        connection = SelectConnection(
            params, on_open_callback=self._io_on_connection_open,
            on_open_error_callback=self._io_on_connection_open_error,
            on_close_callback=self._io_on_connection_closed)
        self._connection = connection
        connection.ioloop.start()
        self._connection = None
        if self._refusal is not None:
            raise self._refusal
        if not self._opened and not self._stopping.is_set():
            raise self._last_failure or BrokerUnreachable(self.url, "the connection closed "
                                                                    "before it opened")

    def _io_on_connection_open(self, connection: SelectConnection) -> None:
        self._opened = True
        # pika tells our close callback the reply code and text only; this sees the whole
        # Channel.Close first, whose class and method ids say which command it refused.
        connection.callbacks.add(_CHANNEL, spec.Channel.Close, self._io_note_channel_close,
                                 one_shot=False)
        connection.channel(_CHANNEL, on_open_callback=self._io_on_channel_open)

    def _io_on_connection_open_error(self, connection: SelectConnection,
                                     error: BaseException) -> None:
        failure = self._io_failure(error, opening=True)
        if isinstance(failure, BrokerRefused):
            self._refusal = failure
        else:
            assert isinstance(failure, BrokerUnreachable)
            self._last_failure = failure
        connection.ioloop.stop()

    def _io_on_connection_closed(self, connection: SelectConnection,
                                 reason: BaseException) -> None:
        if self._ready.is_set() and not self._stopping.is_set():
            logger.warning("%s; reconnecting", self._io_failure(reason))
        self._ready.clear()
        self._channel = None
        self._io_requeue_unconfirmed()
        connection.ioloop.stop()

    def _io_on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        self._closed_by = None
        self._consumers.new_channel()
        self._generation += 1
        self._seq = 0
        channel.add_on_close_callback(self._io_on_channel_closed)
        channel.add_on_return_callback(self._io_on_return)
        channel.confirm_delivery(self._io_on_confirm)
        for name, kind in self._topology.exchanges.values():
            # Logged in with a token we may not create exchanges: only check they exist.
            channel.exchange_declare(name, kind, durable=True, passive=self._login is not None)
        for queue in self._queues:
            channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
            for binding in queue.bindings:
                channel.queue_bind(queue.name, binding.exchange, binding.routing_key,
                                   arguments=binding.arguments or None)
        channel.basic_qos(prefetch_count=self._prefetch, callback=self._io_on_declared)

    def _io_on_declared(self, _frame: Method) -> None:
        self._io_start_consumers()
        if self._ever_ready:
            logger.info("connection %s to %s restored", self._name, self.url)
        self._ever_ready = True
        self._ready.set()
        self._io_flush()

    def _io_note_channel_close(self, frame: Method) -> None:
        self._closed_by = (frame.method.class_id, frame.method.method_id)

    def _io_on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        failure = self._io_failure(reason)
        if isinstance(failure, BrokerRefused):
            self._refusal = failure
        elif isinstance(failure, _PublishRefused):
            self._io_fail_refused_publish(failure)
        elif not self._stopping.is_set():
            logger.warning("%s; reconnecting", failure)
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close()

    def _io_on_return(self, _ch: Channel, method: Basic.Return, props: BasicProperties,
                      _body: bytes) -> None:
        self._returned[props.message_id or ""] = (
            f"the broker could not route it ({method.reply_text}): exchange {method.exchange!r} "
            f"has no queue bound for routing key {method.routing_key!r}")

    def _io_on_confirm(self, frame: Method) -> None:
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
                _guarded(partial(publish.on_confirm, refused or reason))

    def _io_fail_refused_publish(self, refused: _PublishRefused) -> None:
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
                _guarded(partial(on_confirm, Refusal(str(refused))))

    def _io_requeue_unconfirmed(self) -> None:
        """Put publishes the broker never confirmed back at the front, in order."""
        pending = list(self._unconfirmed.values())
        self._unconfirmed.clear()
        self._returned.clear()
        self._outbox.extendleft(reversed(pending))

    def _io_close_connection(self) -> None:
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
