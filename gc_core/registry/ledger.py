"""The task ledger: consume ``gc.ledger`` and write what happened to the database.

The broker copies every result, dead letter, heartbeat and task-group manifest
to ``gc.ledger``. The consumer collects deliveries on the broker's IO thread and
a writer thread commits them in batches, acking only after the commit: a
registry crash loses nothing, it only replays.

Dead letters reach their submitter through the ledger too: result queues do not bind
to ``gc.dead`` (a headers binding escapes the broker's topic authorization), so after
committing a dead-lettered task the ledger publishes it to ``gc.results`` as a failed
result under the submitter's routing key, and acks only once the broker confirmed that.

Whose word counts. Every message claims who sent it and whom it is for; the ledger
believes only its own records and, on a secured broker, the ``user_id`` the broker checked
(:class:`Senders`). A task is recorded when a manifest names it, and is its submitter's on
the manifest's endpoint from then on. With ``verified`` senders (a tokens-mode registry):

- a manifest counts only from its user (or the registry's own account, which submits
  actions for users), and never takes a task id recorded for another user or endpoint;
- a result counts only for a task some manifest named, from ``endpoint-<its endpoint>``;
- a heartbeat counts only from ``endpoint-<its endpoint>``.

In open mode (nobody's ``user_id`` is checked) what a message claims is all there is: a
result or dead letter for a task no manifest named is recorded (and a dead letter handed
on) as it claims, as before; a result for a recorded task counts only if it names the
task's user and endpoint. In both modes a dead letter of a recorded task goes to the user,
task group and endpoint the ledger recorded, never to those its headers name; a heartbeat
counts as sent no later than it arrived, and whatever one message makes fail costs that
message alone: it is dropped with one warning line, and the batch goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    StatementError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from gc_core.broker import BrokerSession
from gc_core.broker_consumers import Delivery
from gc_core.broker_limits import Refusal
from gc_core.errors import GCError
from gc_core.protocol import (
    CancelCommand,
    GroupManifest,
    Heartbeat,
    ResultMessage,
    decode_event,
    decode_result,
    encode_result,
)
from gc_core.registry import store
from gc_core.registry.identity import AGENT_PREFIX
from gc_core.topology import Topology, safe_name_part

__all__ = ["Ledger", "Retention", "Senders"]

logger = logging.getLogger(__name__)

#: How often (seconds) the writer commits what has arrived.
COMMIT_INTERVAL = 0.05
#: Unacked deliveries the ledger may hold; bounds one commit's size.
LEDGER_PREFETCH = 2000
#: Seconds the writer waits for the broker to confirm republished dead letters.
REPUBLISH_TIMEOUT = 30.0
#: How often (seconds) the writer drops results past their time to live.
EXPIRE_INTERVAL = 60.0
#: Deliveries of a result whose task no manifest has named yet before the ledger drops it.
#: A client publishes a batch's manifest just after its first task, so a quick result may
#: reach the ledger first; returned to the queue, it comes back after the manifest. Each
#: return costs a commit interval, so this waits at least a few seconds, and bounds what
#: a forged result for a task that never existed costs.
MANIFEST_WAIT_DELIVERIES = 60
#: Longest description of an error in a warning line, in characters.
MAX_DESCRIPTION = 300

#: What the ledger records: a delivery decodes to one of these (or to nothing).
Recordable = ResultMessage | GroupManifest | Heartbeat


@dataclass(frozen=True)
class Retention:
    """How much of each result the ledger keeps, and for how long (None: no limit)."""

    size_limit: int | None = 10 * 2**20
    ttl: float | None = 30 * 86400.0

    @property
    def ttl_text(self) -> str:
        days, seconds = divmod(self.ttl or 0, 86400)
        return f"{days:g} days" if days and not seconds else f"{self.ttl:g} seconds"


@dataclass(frozen=True)
class Senders:
    """Whose broker-checked ``user_id`` the ledger believes, and which account is its own."""

    #: True when the broker checks every publisher's ``user_id`` (a tokens-mode registry on
    #: a secured broker); False in open mode, where messages' claims are all there is.
    verified: bool = False
    #: The registry's own broker account: it submits actions for users and republishes dead
    #: letters, so its word counts for anyone ("" if its broker URL names no user).
    registry: str = ""

    def any_of(self, sender: str, *owners: str) -> bool:
        """Whether ``sender`` is one of ``owners`` or the registry's own account."""
        return sender in {name for name in (*owners, self.registry) if name}


@dataclass(frozen=True)
class _Received:
    """One delivery and what it decoded to (None: nothing to record; it is acked)."""

    delivery: Delivery
    message: Recordable | None
    dead: bool


class Ledger:
    """Consumes the ledger queue into the database."""

    def __init__(self, *, broker_url: str, topology: Topology, sessions: sessionmaker[Any],
                 retention: Retention = Retention(), verify_senders: bool = False) -> None:
        self._sessions = sessions
        self._retention = retention
        self._senders = Senders(verified=verify_senders,
                                registry=urlsplit(broker_url).username or "")
        self._next_expiry = 0.0
        #: The writer's results of this batch whose manifest may still be on its way.
        self._early: list[Delivery] = []
        self._topology = topology
        self._queue = topology.queue("ledger")
        # Republished dead letters carry the registry's user_id, checked by the broker, so
        # their submitters' clients can tell them from forgeries.
        self._broker = BrokerSession(broker_url, name="gc-registry:ledger", topology=topology,
                                     queues=[self._queue], prefetch=LEDGER_PREFETCH,
                                     stamp_user_id=True)
        self._pending: list[Delivery] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        """Whether the ledger's queue is declared and consumed right now."""
        return self._broker.connected

    @property
    def writing(self) -> bool:
        """Whether the writer thread runs: without it nothing is recorded or acked."""
        return self._writer is not None and self._writer.is_alive()

    def start(self) -> None:
        """Start consuming in the background; the broker may come later."""
        self._broker.consume(self._queue.name, self._on_delivery)
        self._broker.start(timeout=None)
        self._writer = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
        self._writer.start()

    def stop(self) -> None:
        """Commit what has arrived, then close."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join(10)
        self._broker.close()

    def _on_delivery(self, delivery: Delivery) -> None:
        with self._lock:
            self._pending.append(delivery)

    def _write_loop(self) -> None:
        while not self._stop.wait(COMMIT_INTERVAL):
            self._commit_pending()
            self._expire_old_results()
        self._commit_pending()

    def _expire_old_results(self) -> None:
        ttl, now = self._retention.ttl, time.time()
        if ttl is None or now < self._next_expiry:
            return
        self._next_expiry = now + EXPIRE_INTERVAL
        try:
            with self._sessions() as db:
                dropped = store.expire_results(db, now - ttl, self._retention.ttl_text)
                db.commit()
        except Exception:
            logger.exception("ledger could not drop expired results; it will try again")
            return
        if dropped:
            logger.info("ledger dropped %d results older than %s", dropped,
                        self._retention.ttl_text)

    def _commit_pending(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            self._commit(batch)
        except Exception:
            # Each message's faults are handled in _commit: this is a bug of ours. The
            # writer must outlive it, and no delivery may be left unsettled.
            logger.exception("ledger failed on %d messages; returning them to the queue",
                             len(batch))
            self._requeue(batch)

    def _commit(self, batch: list[Delivery]) -> None:
        received = [self._decode(delivery) for delivery in batch]
        retry: list[Delivery] = []
        self._early.clear()
        try:
            dead_letters = self._write(received)
        except Exception as exc:
            if not _message_fault(exc):
                # The database's fault (gone, locked, restarted): the batch goes back to the
                # queue and is written again, which the upserts make harmless.
                logger.exception("ledger could not commit %d messages; returning them to "
                                 "the queue", len(batch))
                self._requeue(batch)
                return
            logger.warning("ledger could not commit %d messages (%s); writing them one at a "
                           "time to drop only the one at fault", len(batch), _describe(exc))
            self._early.clear()
            dead_letters, retry = self._write_each(received)
        retry += self._early
        if dead_letters and not self._republish(dead_letters):
            self._requeue(batch)
            return
        if not retry:
            # Deliveries arrive and are committed in order: one ack covers the whole batch.
            self._broker.ack(batch[-1], multiple=True)
        else:
            self._settle_each(batch, retry)
        logger.debug("ledger committed %d messages", len(batch) - len(retry))

    def _write(self, received: list[_Received]) -> list[ResultMessage]:
        """Record what ``received`` holds in one transaction; return the dead letters to
        republish."""
        with self._sessions() as db:
            dead_letters = self._record(db, received)
            db.commit()
        return dead_letters

    def _write_each(self, received: list[_Received]) -> tuple[list[ResultMessage],
                                                             list[Delivery]]:
        """Record each message in a transaction of its own, dropping those that fail; return
        the dead letters to republish and the deliveries to return to the queue (all from
        the first the database itself failed on)."""
        dead_letters: list[ResultMessage] = []
        for index, item in enumerate(received):
            try:
                dead_letters += self._write([item])
            except Exception as exc:
                if not _message_fault(exc):
                    logger.exception("ledger could not commit; returning %d messages to the "
                                     "queue", len(received) - index)
                    return dead_letters, [later.delivery for later in received[index:]]
                logger.warning("ledger dropped a message it could not record (from %r, %s "
                               "%r): %s", item.delivery.user_id, item.delivery.exchange,
                               item.delivery.routing_key, _describe(exc))
        return dead_letters, []

    def _record(self, db: Session, received: list[_Received]) -> list[ResultMessage]:
        results: list[tuple[ResultMessage, _Received]] = []
        for item in received:
            message, sender = item.message, item.delivery.user_id
            if isinstance(message, GroupManifest):
                self._record_manifest(db, message, sender)
            elif isinstance(message, Heartbeat):
                self._record_heartbeat(db, message, sender)
            elif message is not None:
                results.append((message, item))
        accepted = self._accepted_results(db, results)
        store.record_results(db, [result for result, _dead in accepted],
                             size_limit=self._retention.size_limit)
        return [result for result, dead in accepted if dead]

    def _record_manifest(self, db: Session, manifest: GroupManifest, sender: str) -> None:
        if self._senders.verified and not self._senders.any_of(sender, manifest.user):
            logger.warning("ledger dropped a manifest of task group %r in %r's name: it was "
                           "sent by %r", manifest.task_group_id, manifest.user, sender)
            return
        taken = store.record_manifest(db, manifest)
        if taken:
            logger.warning("ledger kept %d task ids of %r's manifest (task group %r, from %r) "
                           "with the user and endpoint they were recorded for, e.g. %r",
                           len(taken), manifest.user, manifest.task_group_id, sender, taken[0])

    def _record_heartbeat(self, db: Session, heartbeat: Heartbeat, sender: str) -> None:
        agent = f"{AGENT_PREFIX}{heartbeat.endpoint_id}"
        if self._senders.verified and sender != agent:
            logger.warning("ledger dropped a heartbeat of endpoint %r: it was sent by %r, not "
                           "by %r", heartbeat.endpoint_id, sender, agent)
            return
        store.record_heartbeat(db, heartbeat)

    def _accepted_results(self, db: Session, results: list[tuple[ResultMessage, _Received]]
                          ) -> list[tuple[ResultMessage, bool]]:
        """The results (and dead letters) to record, each under the user, task group and
        endpoint the ledger recorded for its task; with whether it is a dead letter."""
        owners = store.task_owners(db, [result.task_id for result, _item in results])
        accepted = []
        for result, item in results:
            sender = item.delivery.user_id
            owner = owners.get(result.task_id)
            refusal = _result_refusal(result, owner, sender, self._senders, dead=item.dead)
            if (owner is None and refusal is not None
                    and item.delivery.delivery_count < MANIFEST_WAIT_DELIVERIES):
                self._early.append(item.delivery)  # its manifest may be just behind it
                continue
            if refusal is not None:
                logger.warning("ledger dropped a %s for task %r from %r: %s",
                               "dead letter" if item.dead else "result", result.task_id,
                               sender, refusal)
                continue
            recorded = result if owner is None else result.model_copy(update={
                "user": owner.user, "task_group_id": owner.task_group_id,
                "endpoint_id": owner.endpoint_id})
            accepted.append((recorded, item.dead))
        return accepted

    def _requeue(self, batch: list[Delivery]) -> None:
        for delivery in batch:
            self._broker.reject(delivery, requeue=True)

    def _settle_each(self, batch: list[Delivery], retry: list[Delivery]) -> None:
        """Return ``retry`` to the queue and ack the rest of ``batch``."""
        again = {delivery.tag for delivery in retry}
        for delivery in batch:
            if delivery.tag in again:
                self._broker.reject(delivery, requeue=True)
            else:
                self._broker.ack(delivery)

    def _republish(self, dead_letters: list[ResultMessage]) -> bool:
        """Send dead-lettered tasks to their submitters as failed results; True once the
        broker took (or refused for good) each of them. False: it did not answer in time,
        or answered something worth another try, and the batch is replayed (duplicates are
        harmless). One refused for good would be refused again: it is not sent again, and
        its task stays recorded as dead-lettered."""
        answered = threading.Semaphore(0)
        refused: list[str] = []
        failed: list[str] = []

        def on_confirm(reason: str | None) -> None:
            if reason is not None:
                (refused if isinstance(reason, Refusal) else failed).append(reason)
            answered.release()

        sent = 0
        for result in dead_letters:
            try:
                key = self._topology.routing_key(
                    "result", user=safe_name_part(result.user, "user"),
                    task_group_id=safe_name_part(result.task_group_id, "task group id"))
            except GCError as exc:
                logger.warning("dead-lettered task %r has no submitter to tell: %s",
                               result.task_id, exc)
                continue
            self._broker.publish(self._topology.exchange("results"), key, encode_result(result),
                                 on_confirm=on_confirm)
            sent += 1
        for _ in range(sent):
            if not answered.acquire(timeout=REPUBLISH_TIMEOUT):
                failed.append(f"no confirm within {REPUBLISH_TIMEOUT:.0f}s")
                break
        if failed:
            logger.warning("ledger could not republish %d dead letters (%s); replaying them",
                           sent, failed[0])
            return False
        if refused:
            logger.warning("the broker refused %d of %d republished dead letters for good (%s); "
                           "their tasks stay recorded as dead-lettered", len(refused), sent,
                           refused[0])
        logger.info("ledger republished %d dead-lettered tasks as failed results",
                    sent - len(refused))
        return True

    def _decode(self, delivery: Delivery) -> _Received:
        dead = delivery.exchange == self._topology.exchange("dead")
        try:
            if delivery.exchange == self._topology.exchange("events"):
                event = decode_event(delivery.envelope)
                return _Received(delivery, None if isinstance(event, CancelCommand) else event,
                                 dead)
            return _Received(delivery, decode_result(delivery.envelope), dead)
        except Exception as exc:  # noqa: BLE001  # decoders promise ProtocolError; a slip costs one message too
            logger.warning("ledger dropped an undecodable message from %r (%s %r, %d bytes): "
                           "%s", delivery.user_id, delivery.exchange, delivery.routing_key,
                           len(delivery.envelope.body), _describe(exc))
        return _Received(delivery, None, dead)


def _result_refusal(result: ResultMessage, owner: store.TaskOwner | None, sender: str,
                    senders: Senders, *, dead: bool) -> str | None:
    """Why the ledger must not record ``result`` (a dead letter if ``dead``) for the task
    ``owner`` describes (None: no manifest named it), or None."""
    if owner is None:
        # Unverified, the headers are all there is (and the decoder has bounded them).
        if not senders.verified:
            return None
        return ("no manifest named its task, so it has no recipient" if dead
                else "no manifest named its task")
    if senders.verified:
        # A dead letter is the submitter's own task message: the broker kept its user_id.
        expected = owner.user if dead else f"{AGENT_PREFIX}{owner.endpoint_id}"
        if not senders.any_of(sender, expected):
            return f"only {expected!r} may send it"
        return None
    if not dead and (result.user, result.endpoint_id) != (owner.user, owner.endpoint_id):
        return (f"it claims user {result.user!r} and endpoint {result.endpoint_id!r}, but the "
                f"task is {owner.user!r}'s on endpoint {owner.endpoint_id!r}")
    return None


def _message_fault(exc: Exception) -> bool:
    """Whether ``exc`` is one message's fault (it is dropped) rather than the database's
    (gone, locked, restarting, its schema missing: the batch waits in the queue)."""
    if isinstance(exc, (DataError, IntegrityError)):  # a value its column cannot hold
        return True
    return not isinstance(exc, (DBAPIError, DisconnectionError, PoolTimeout))


def _describe(exc: Exception) -> str:
    """What failed, escaped, without a statement's parameters (they hold payloads)."""
    cause = exc.orig if isinstance(exc, StatementError) else exc
    text = repr(f"{type(cause).__name__}: {cause}")
    return text if len(text) <= MAX_DESCRIPTION else text[:MAX_DESCRIPTION] + "…"
