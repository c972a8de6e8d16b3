"""The only module that talks pika: a broker session in a background thread.

A :class:`BrokerSession` owns one pika ``SelectConnection`` and one confirm-mode
channel, driven by its own IO thread. Publishes from any thread are queued and
flushed in batches, so confirms pipeline (pika's BlockingConnection waits for
each confirm in turn). When the connection drops, the session reconnects (to the
next node, when its URL names a cluster's nodes; with tenacity backoff once none
answers), declares its queues again, resumes its consumers and re-publishes
whatever the broker had not confirmed: callers see at-least-once.

On a secured broker (``broker_config/rabbitmq.conf``) a session logs in with a
:class:`TokenLogin`: the registry token is the password, every publish carries the
``user_id`` the broker checks, and exchanges are only looked up (passively declared),
since only the registry's own account may create them.

Threads: a session's public methods may be called from any thread; everything pika
touches belongs to the session's IO thread (see :class:`BrokerSession`). pika's exceptions
and the broker's close frames become our errors in one place,
:func:`gc_core.broker_errors.translate`, and what one thread learns reaches another as an
exception, never as a string.

The session's parts with jobs of their own live beside it: the URL, login and TLS in
:mod:`gc_core.broker_login`, the consuming half in :mod:`gc_core.broker_consumers`, the
publishing half and its confirms in :mod:`gc_core.broker_publisher`, what the broker will
never take in :mod:`gc_core.broker_limits`, and pika's hardened field decoder in
:mod:`gc_core.broker_hardening`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
from pika import spec
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic, BasicProperties
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from gc_core.broker_consumers import Consumers, Delivery, Settlement
from gc_core.broker_errors import FailureContext, PublishRefused, translate
from gc_core.broker_hardening import harden_pika
from gc_core.broker_limits import DEFAULT_MAX_MESSAGE_SIZE
from gc_core.broker_login import HEARTBEAT_SECONDS, TokenLogin, broker_tls, broker_urls, redact_url
from gc_core.broker_publisher import ConfirmCallback, Publish, Publisher
from gc_core.errors import BrokerError, BrokerRefused, BrokerUnreachable
from gc_core.forks import current_pid
from gc_core.protocol import Envelope
from gc_core.topology import QueueDeclaration, Topology

__all__ = ["FLUSH_BATCH", "BrokerSession", "QueueCounts"]

logger = logging.getLogger(__name__)

#: Default publishes and acks handled per IO-loop turn, so incoming frames are read in between.
FLUSH_BATCH = 500
#: Seconds from a nack to closing the connection, to send what was nacked again on a new
#: one: publishes nacked meanwhile go with it.
NACK_PAUSE = 0.25
#: Seconds a publish may wait for its confirm before the session takes it for lost and sends
#: it again on a new connection (seen on a cluster: a result routed to a quorum queue as its
#: leader died was delivered but never confirmed, so its task was never acked), and how often
#: that is checked. Confirms normally take milliseconds, seconds under a backlog.
CONFIRM_DEADLINE = 20.0
CONFIRM_CHECK = 5.0
#: The one channel a session opens on each connection.
_CHANNEL = 1


@dataclass(slots=True)
class _Settle:
    generation: int
    tag: int
    how: Settlement
    multiple: bool = False


#: What the outbox carries to the IO thread.
_Op = Publish | _Settle | Callable[[], None]

_T = TypeVar("_T")


@dataclass(frozen=True)
class QueueCounts:
    """What the broker says of a queue: messages ready to deliver, and its consumers."""

    messages: int
    consumers: int


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


def _connection_parameters(url: str) -> pika.URLParameters:
    """pika's parameters for ``url``, with the TLS of :func:`broker_tls` (pika takes no
    ``cafile``; it checks the certificate against the URL's host name)."""
    bare, context = broker_tls(url)
    params = pika.URLParameters(bare)
    if context is not None:
        params.ssl_options = pika.SSLOptions(context)
    return params


class BrokerSession:
    """One AMQP connection with confirmed publishes, consumers and automatic reconnect.

    Threads: the public methods may be called from any thread, except where their
    docstrings say otherwise. Everything pika touches belongs to the session's IO thread
    and has no lock: the connection's IO loop, the channel, the unconfirmed publishes, the
    consumers. Methods named ``_io_*``, and every method of its :class:`Consumers` and
    :class:`Publisher`, run on the
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
        harden_pika()  # before any frame of ours is decoded
        # -- set here, only read afterwards (any thread) --
        self._login = login
        #: The brokers to try, the nodes of a cluster (one URL, or several: broker_urls).
        self._nodes = [login.apply(node) if login is not None else node
                       for node in broker_urls(url)]
        # The broker checks user_id against the login, so a stamped id proves the sender.
        # pika logs in with the URL's user name unquoted: stamp that, or the broker refuses.
        username = urlsplit(self._nodes[0]).username
        user_id = login.username if login is not None else (
            unquote(username) if stamp_user_id and username else None)
        #: The ``user_id`` stamped on every publish (None: none is).
        self.user_id = user_id
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
        #: How often the session was ready again after losing its connection (a metric).
        self.reconnects = 0
        # -- set by start() before the IO thread exists --
        self._thread: threading.Thread | None = None
        #: Why the broker stopped reading what this session sends, and since when
        #: (monotonic seconds); None while it reads (see ``blocked``).
        self._blocked: tuple[str, float] | None = None
        #: The process that started the session: its connection and IO thread are that
        #: process's alone (see ``forked_away``).
        self._started_in: int | None = None
        self._start_waits = False
        # -- the IO thread's alone (wait_settled only peeks whether _publisher has any) --
        self._queues = list(queues)
        self._consumers = Consumers(name, _guarded)
        self._publisher = Publisher(name, user_id=user_id, max_message_size=max_message_size,
                                    guard=_guarded)
        #: Which of _nodes the IO thread connects to now, or tries next.
        self._node = 0
        #: Whether the current connection is to be closed for a nack (_io_on_confirm).
        self._reconnect_scheduled = False
        self._generation = 0
        self._channel: Channel | None = None
        self._closed_by: tuple[int, int] | None = None
        self._refusal: BrokerRefused | None = None
        self._in_order_ack: Delivery | None = None
        self._in_order_ack_scheduled = False
        self._ever_ready = False
        self._opened = False
        #: Whether the current connection declared its queues, and why its channel closed.
        self._declared = False
        self._channel_failure: BrokerError | None = None

    # -- public API, callable from any thread -------------------------------------------

    @property
    def url(self) -> str:
        """The URL of the broker in use (or tried next), without its password."""
        return redact_url(self._url)

    @property
    def _url(self) -> str:
        return self._nodes[self._node]

    @property
    def connected(self) -> bool:
        """True while the channel is open and declared."""
        return self._ready.is_set()

    @property
    def blocked(self) -> str | None:
        """Why the broker takes no messages from this session now (RabbitMQ's reason, as
        ``low on memory``: a resource alarm), or None while it takes them."""
        blocked = self._blocked
        return None if blocked is None else blocked[0]

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
        self._started_in = current_pid()
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
                raise BrokerUnreachable(redact_url(",".join(self._nodes)),
                                        last.reason if last is not None else "no attempt made yet"
                                        ) from last

    def publish(self, exchange: str, routing_key: str, envelope: Envelope, *,
                on_confirm: ConfirmCallback | None = None, persistent: bool = True,
                mandatory: bool = False, retry_nacked: bool = True) -> None:
        """Queue a publish; ``on_confirm`` runs on the IO thread once the broker answers.
        A nacked one is sent again for a while, unless ``retry_nacked`` is False (a nack
        from a queue that rejects publishes when full means "never")."""
        self._hand_over(Publish(exchange, routing_key, envelope, persistent, mandatory,
                                on_confirm, retry_nacked))

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

    def queue_counts(self, queue: str, on_counts: Callable[[QueueCounts], None]) -> None:
        """Ask the broker how many ready messages and consumers ``queue`` has (it must
        exist); ``on_counts`` runs on the IO thread with the answer."""
        self._hand_over(partial(self._io_ask_counts, queue, on_counts))

    def counts(self, queue: str, timeout: float) -> QueueCounts | None:
        """How many ready messages and consumers ``queue`` has, or None when the broker has
        not said within ``timeout``. Each call waits for an answer of its own (an
        :class:`_Answer`): one that comes after its caller gave up is dropped with it.

        Raises:
            RuntimeError: called on the IO thread, which would wait on itself.
        """
        if self.on_io_thread:
            raise RuntimeError(f"broker session {self._name}: counts would wait on its own "
                               "IO thread; use queue_counts there")
        answer: _Answer[QueueCounts] = _Answer()
        self.queue_counts(queue, answer.give)
        return answer.wait(timeout)

    def delete_queue(self, queue: str) -> None:
        """Delete a queue this session declared, and stop declaring it on reconnect."""
        self._hand_over(partial(self._io_delete_queue, queue))

    def wait_settled(self, timeout: float) -> bool:
        """Wait until every queued publish and ack has been confirmed; False on timeout
        (at once on the IO thread, which would otherwise wait on itself). Other threads
        only peek at whether the outbox and the unconfirmed publishes are empty."""
        if self.on_io_thread:
            return not (self._outbox or self._publisher)
        deadline = time.monotonic() + timeout
        while self._outbox or self._publisher:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    @property
    def forked_away(self) -> bool:
        """Whether this process was forked from the one that started the session: the
        connection and its IO thread stayed there, and nothing handed over here would
        ever be sent."""
        return self._started_in is not None and self._started_in != current_pid()

    @property
    def started_in(self) -> int | None:
        """The id of the process that started the session (None: not started)."""
        return self._started_in

    def close(self, timeout: float = 10.0) -> None:
        """Close the connection and stop the IO thread (in a forked child: leave the
        parent's connection alone)."""
        if self.forked_away:
            return
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
        if isinstance(op, Publish):
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

    def _io_send(self, channel: Channel, op: Publish) -> None:
        """Publish ``op`` (see :meth:`Publisher.send`); while the channel is closing, keep it
        to send first after reconnecting."""
        frame_max = self._connection.params.frame_max if self._connection is not None else 0
        if not self._publisher.send(channel, op, frame_max):
            self._outbox.appendleft(op)

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

    def _io_ask_counts(self, queue: str, on_counts: Callable[[QueueCounts], None]) -> None:
        assert self._channel is not None
        self._channel.queue_declare(queue, passive=True, callback=lambda frame: on_counts(
            QueueCounts(frame.method.message_count, frame.method.consumer_count)))

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
        """``error`` as ours (:func:`~gc_core.broker_errors.translate`), with what this
        thread knows now."""
        return translate(error, FailureContext(
            self._url, self._name, self._login, opening=opening,
            declaring=not self._ready.is_set() and not self._stopping.is_set(),
            trusted_before=self._ever_ready, closed_by=self._closed_by))

    def _io_run_connection(self) -> None:
        """Run one connection until it closes, to the first node that answers, starting with
        the one after the node whose connection closed last; raise if the broker refused,
        or if no node answered."""
        for attempt in range(len(self._nodes)):
            try:
                self._io_run_connection_to_node()
            except BrokerUnreachable:
                self._node = (self._node + 1) % len(self._nodes)
                if attempt == len(self._nodes) - 1 or self._stopping.is_set():
                    raise
            else:
                # The node may be gone: a reconnect tries another first (one node: itself).
                self._node = (self._node + 1) % len(self._nodes)
                return

    def _io_run_connection_to_node(self) -> None:
        """Run one connection to the current node until it closes; raise if it never got
        ready (never opened, or closed before its queues were declared) or was refused:
        either way the next attempt waits its backoff."""
        self._opened = self._declared = False
        self._refusal = self._channel_failure = None
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
        connection.ioloop.close()  # its selector and wake-up sockets, else a file leak each time
        if self._refusal is not None:
            raise self._refusal
        if self._opened and not self._declared and not self._stopping.is_set():
            raise BrokerUnreachable(self.url, "the session closed before it was ready"
                                    + (f" ({self._channel_failure})" if self._channel_failure else ""))
        if not self._opened and not self._stopping.is_set():
            raise self._last_failure or BrokerUnreachable(self.url, "the connection closed "
                                                                    "before it opened")

    def _io_on_connection_open(self, connection: SelectConnection) -> None:
        self._opened = True
        self._blocked = None
        connection.add_on_connection_blocked_callback(self._io_on_blocked)
        connection.add_on_connection_unblocked_callback(self._io_on_unblocked)
        # pika tells our close callback the reply code and text only; this sees the whole
        # Channel.Close first, whose class and method ids say which command it refused.
        connection.callbacks.add(_CHANNEL, spec.Channel.Close, self._io_note_channel_close,
                                 one_shot=False)
        connection.channel(_CHANNEL, on_open_callback=self._io_on_channel_open)

    def _io_on_blocked(self, _connection: SelectConnection, frame: Method) -> None:
        reason = str(getattr(frame.method, "reason", "") or "no reason given")[:200]
        self._blocked = (reason, time.monotonic())
        logger.warning("the broker at %s stopped taking messages from %s: %s. A broker does so "
                       "while it runs low on memory or disk (a resource alarm), until its "
                       "operator frees some; what is sent meanwhile waits, and nothing is lost",
                       self.url, self._name, reason)

    def _io_on_unblocked(self, _connection: SelectConnection, _frame: Method) -> None:
        if self._blocked is not None:
            logger.info("the broker at %s takes messages again from %s (after %.0f s)",
                        self.url, self._name, time.monotonic() - self._blocked[1])
        self._blocked = None

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
        self._reconnect_scheduled = False
        self._closed_by = None
        self._consumers.new_channel()
        self._generation += 1
        self._publisher.new_channel()
        channel.add_on_close_callback(self._io_on_channel_closed)
        channel.add_on_return_callback(self._io_on_return)
        channel.confirm_delivery(self._io_on_confirm)
        for name, kind in self._topology.exchanges.values():
            # Logged in with a token we may not create exchanges: only check they exist.
            channel.exchange_declare(name, kind, durable=True, passive=self._login is not None)
        for queue in self._queues:
            channel.queue_declare(queue.name, durable=queue.durable,
                                  auto_delete=queue.auto_delete, arguments=queue.arguments)
            for binding in queue.bindings:
                channel.queue_bind(queue.name, binding.exchange, binding.routing_key,
                                   arguments=binding.arguments or None)
        channel.basic_qos(prefetch_count=self._prefetch, callback=self._io_on_declared)

    def _io_on_declared(self, _frame: Method) -> None:
        self._declared = True
        if self._connection is not None:
            self._io_check_confirms(self._connection)
        self._io_start_consumers()
        if self._ever_ready:
            self.reconnects += 1
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
        elif isinstance(failure, PublishRefused):
            self._publisher.refused(failure)
        elif not self._stopping.is_set():
            logger.warning("%s; reconnecting", failure)
        self._channel_failure = failure
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close()

    def _io_on_return(self, _ch: Channel, method: Basic.Return, props: BasicProperties,
                      _body: bytes) -> None:
        self._publisher.returned(method, props)

    def _io_on_confirm(self, frame: Method) -> None:
        connection = self._connection
        if self._publisher.confirmed(frame.method) and connection is not None and \
                not self._reconnect_scheduled:
            self._reconnect_scheduled = True
            connection.ioloop.call_later(NACK_PAUSE, partial(self._io_reconnect_after_nack,
                                                             connection))

    def _io_reconnect_after_nack(self, connection: SelectConnection) -> None:
        """Close ``connection`` so that what the broker nacked is sent again on a new one
        (:meth:`Publisher.confirmed` says why a new channel is needed)."""
        self._io_reconnect(connection, "the broker nacked publishes")

    def _io_check_confirms(self, connection: SelectConnection) -> None:
        """Every CONFIRM_CHECK seconds while ``connection`` is the current one: reconnect
        if a publish has waited CONFIRM_DEADLINE for its confirm."""
        current = self._connection
        if current is None or current is not connection:
            return
        if self._publisher.oldest_wait() > CONFIRM_DEADLINE:
            self._io_reconnect(connection, f"a publish has had no confirm for "
                                           f"{CONFIRM_DEADLINE:.0f}s")
            return
        current.ioloop.call_later(CONFIRM_CHECK, partial(self._io_check_confirms, current))

    def _io_reconnect(self, connection: SelectConnection, why: str) -> None:
        """Close ``connection``, if still the current one, to send again on a new one what
        the broker has not confirmed."""
        current = self._connection
        if current is None or current is not connection or not current.is_open:
            return  # closed meanwhile: the reconnect sends them again anyway
        logger.warning("connection %s to %s: %s; reconnecting to send them again", self._name,
                       self.url, why)
        current.close(reply_text=f"reconnecting: {why}")

    def _io_requeue_unconfirmed(self) -> None:
        """Put publishes the broker never confirmed back at the front, in order."""
        self._outbox.extendleft(reversed(self._publisher.take_unconfirmed()))

    def _io_close_connection(self) -> None:
        connection = self._connection
        if connection is None:
            return
        try:
            connection.close()
        except pika.exceptions.ConnectionWrongStateError:
            connection.ioloop.stop()

def _guarded(fn: Callable[[], Any]) -> None:
    """Run a callback on the IO thread; a bug in it must not stop the connection."""
    try:
        fn()
    except Exception:
        logger.exception("callback on the broker IO thread failed")

