"""The task ledger: consume ``gc.ledger`` and write what happened to the database.

The broker copies every result, dead letter, heartbeat and task-group manifest
to ``gc.ledger``. The consumer collects deliveries on the broker's IO thread and
a writer thread commits them in batches, acking only after the commit: a
registry crash loses nothing, it only replays.

Several registries may share one database and consume ``gc.ledger`` side by side, each
taking some of its deliveries (their vhost is claimed for that database first:
:mod:`~gc_core.registry.vhost_claim`). Every write is an upsert keyed on the task, or a
conditional update, so a message recorded twice (after a redelivery, by one registry or
two) leaves one row; rows are written in task id order, so two registries writing the same
tasks lock them in one order (and a transaction PostgreSQL still ends to break a deadlock
is tried again); and a registry killed mid-batch had acked nothing it had not committed,
so the broker hands what it held to the others.

A result before its manifest. A client publishes a batch's manifest just after its first
task, and with two registries the manifest may reach one while the task's result reaches
the other, which then looks for the task before the first has committed the manifest, or
while the first stalls (its database slow or locked). Where manifests decide whose word
counts (``verified`` senders, below), such a result is set aside in the database
(``early_results``), unchecked, and its delivery acked; whichever registry commits a
manifest naming the task takes it back at once, and every registry sweeps up, each
SWEEP_INTERVAL, those whose manifest came while they were being set aside. Only then, the
task's owner known, is it checked as any result is: set aside, a result is never counted
before a manifest names its task, nor from a sender that manifest does not allow, and it
is not lost for coming early. Returned to the queue instead until the manifest is there, it would
cost a redelivery every commit for as long as the manifest is held (for ever, for one that
never comes), and a bound on redeliveries would drop a real result whenever the registry
holding its manifest stalls for longer than that bound. Set aside, it costs one row: kept
for EARLY_RESULT_TTL, at most MAX_EARLY_RESULTS_PER_SENDER of one sender at a time.

Dead letters reach their submitter through the ledger too
(:mod:`~gc_core.registry.dead_letters`): after committing a dead-lettered task it publishes
it to ``gc.results`` as a failed result, and acks only once the broker confirmed that.

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

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from gc_core.batches import decode_results, entry_count, is_batch
from gc_core.broker import BrokerSession
from gc_core.broker_consumers import Delivery
from gc_core.protocol import (
    CancelCommand,
    Envelope,
    GroupManifest,
    Heartbeat,
    ResultMessage,
    decode_event,
)
from gc_core.registry import store, vhost_claim
from gc_core.registry.database_outage import DatabaseOutage
from gc_core.registry.dead_letters import republish
from gc_core.registry.identity import AGENT_PREFIX
from gc_core.registry.ledger_rules import (
    Senders,
    conflict,
    describe,
    message_fault,
    result_refusal,
)
from gc_core.registry.metrics import observe_commit
from gc_core.registry.store import ReceivedResult
from gc_core.registry.vhost_claim import DatabaseClaim
from gc_core.topology import Topology

__all__ = ["Ledger", "Retention", "Senders"]

logger = logging.getLogger(__name__)

#: How long (seconds) what has arrived may wait for the writer's commit: each commit costs
#: a few milliseconds whatever it holds (at 50 ms, a third of the ledger's CPU on an
#: htex endpoint's sweep went to committing).
COMMIT_INTERVAL = 0.2
#: Unacked deliveries the ledger may hold, while the rest waits in the queue. A delivery
#: may be a batch of hundreds of results: over a million-task sweep at 4,000 tasks a second
#: (bench.memory) the registry's RSS grew +305% at 2,000 and +13% at 100; at 30, +2.5%,
#: the sweep as fast.
LEDGER_PREFETCH = 30
#: Deliveries that make the writer commit at once, before its interval is up, so that the
#: broker never waits for a commit to deliver more.
COMMIT_BATCH = LEDGER_PREFETCH // 2
#: Most results (and other messages) one commit decodes and holds: the registry's memory
#: follows its largest commit, and 30 deliveries of batches may hold 30,000 results (a
#: backlog's commit held ~5,500 in bench.memory). A batch is never split: the bound holds
#: while no batch is larger (MAX_BATCH_TASKS).
COMMIT_RESULTS = 2_000
#: How often (seconds) the writer drops results past their time to live.
EXPIRE_INTERVAL = 60.0
#: Seconds a result set aside waits for a manifest to name its task before it is dropped:
#: long past any manifest held by a registry that stalls until the broker gives up on it.
EARLY_RESULT_TTL = 900.0
#: Results of one sender set aside at a time; more are dropped, each with a warning.
MAX_EARLY_RESULTS_PER_SENDER = 10_000
#: How often (seconds) the writer takes back results set aside whose task is recorded.
SWEEP_INTERVAL = 1.0
#: Tries of one batch's transaction that PostgreSQL ended to break a deadlock or a
#: serialization conflict with another registry, before the batch goes back to the queue.
CONFLICT_ATTEMPTS = 3
#: Expired results named one warning line each, at most; the rest are counted in one.
MAX_EXPIRED_LINES = 20

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
class _Received:
    """One delivery and what it decoded to (None: nothing to record; it is acked)."""

    delivery: Delivery
    message: Recordable | None
    dead: bool


class Ledger:
    """Consumes the ledger queue into the database."""

    def __init__(self, *, broker_url: str, topology: Topology, sessions: sessionmaker[Any],
                 retention: Retention = Retention(), verify_senders: bool = False,
                 claim: DatabaseClaim | None = None, database: str = "the registry's") -> None:
        self._broker_url = broker_url
        self._sessions = sessions
        #: ``database`` (for people: ``describe_database``) being away, when it is.
        self._outage = DatabaseOutage(database)
        self._retention = retention
        self._senders = Senders(verified=verify_senders,
                                registry=urlsplit(broker_url).username or "")
        self._next_expiry = 0.0
        self._next_sweep = 0.0
        #: The task ids the writer's last batch's manifests named: results set aside for
        #: them are taken back at once.
        self._named: list[str] = []
        self._topology = topology
        self._queue = topology.queue("ledger")
        self._claim = claim
        #: Why the ledger stopped for good, once the writer has found out (None: it runs).
        self._failure: str | None = None
        # The claim is declared first, on every connection: refused, nothing is consumed.
        queues = [self._queue] if claim is None else [claim.queue(topology), self._queue]
        # Republished dead letters carry the registry's user_id, checked by the broker, so
        # their submitters' clients can tell them from forgeries.
        self._broker = BrokerSession(broker_url, name="gc-registry:ledger", topology=topology,
                                     queues=queues, prefetch=LEDGER_PREFETCH,
                                     stamp_user_id=True)
        self._pending: list[Delivery] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        #: Set when COMMIT_BATCH deliveries wait, or to stop: the writer commits at once.
        self._commit_now = threading.Event()
        self._writer: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        """Whether the ledger's queue is declared and consumed right now."""
        return self._broker.connected

    @property
    def reconnects(self) -> int:
        """Times the ledger's broker session was ready again after losing its connection."""
        return self._broker.reconnects

    @property
    def writing(self) -> bool:
        """Whether the writer thread runs: without it nothing is recorded or acked."""
        return self._writer is not None and self._writer.is_alive()

    @property
    def database_problem(self) -> str | None:
        """What keeps the ledger from writing while its database is away (None: nothing)."""
        return self._outage.problem

    @property
    def failure(self) -> str | None:
        """Why the ledger stopped for good: the broker refused it (another database holds
        its vhost, say). None while it consumes or waits for the broker."""
        refused = self._broker.gave_up
        return self._failure or (None if refused is None else str(refused))

    def start(self) -> None:
        """Start consuming in the background; the broker may come later."""
        self._broker.consume(self._queue.name, self._on_delivery)
        if self._claim is not None:
            # The database's description, for a registry of another one to read; a
            # registry of this one may have put it there already (then the full queue
            # refuses it for good).
            self._broker.publish("", self._claim.queue(self._topology).name,
                                 self._claim.envelope(), retry_nacked=False)
        self._broker.start(timeout=None)
        self._writer = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
        self._writer.start()

    def stop(self) -> None:
        """Commit what has arrived, then close."""
        self._stop.set()
        self._commit_now.set()
        if self._writer is not None:
            self._writer.join(10)
        self._broker.close()

    def _on_delivery(self, delivery: Delivery) -> None:
        with self._lock:
            self._pending.append(delivery)
            if len(self._pending) >= COMMIT_BATCH:
                self._commit_now.set()

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            pause = self._outage.wait()
            if pause:  # the database is away: what arrives meanwhile waits with the rest
                self._stop.wait(pause)
                continue
            if pause is None:
                self._commit_now.wait(COMMIT_INTERVAL)
            elif not self._pending:
                self._try_database()  # nothing to write: ask whether it is back
            self._commit_now.clear()
            self._commit_pending()
            if self._outage.wait() is None:
                self._take_back_early_results()
                self._expire_old_results()
            self._note_failure()
        while self._pending and self._outage.wait() is None:
            self._commit_pending()

    def _try_database(self) -> None:
        try:
            with self._sessions() as db:
                db.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - whatever fails it, the database is not back
            self._hold([], exc)
            return
        self._outage.answered()

    def _note_failure(self) -> None:
        """Once the broker has refused the ledger for good, say why, naming the database
        that holds the vhost when that is why."""
        refused = self._broker.gave_up
        if refused is None or self._failure is not None:
            return
        failure: Exception = refused
        if self._claim is not None:
            failure = vhost_claim.refusal(self._broker_url, self._topology, self._claim,
                                          refused)
        self._failure = str(failure)
        logger.error("ledger stopped, nothing is recorded: %s", failure)

    def _expire_old_results(self) -> None:
        ttl, now = self._retention.ttl, time.time()
        if ttl is None or now < self._next_expiry:
            return
        self._next_expiry = now + EXPIRE_INTERVAL
        try:
            with self._sessions() as db:
                dropped = store.expire_results(db, now - ttl, self._retention.ttl_text)
                db.commit()
        except Exception as exc:
            if not message_fault(exc):
                self._hold([], exc)  # the database is away: wait for it
                return
            logger.exception("ledger could not drop expired results; it will try again")
            return
        if dropped:
            logger.info("ledger dropped %d results older than %s", dropped,
                        self._retention.ttl_text)

    def _commit_pending(self) -> None:
        """Commit the oldest deliveries waiting, up to COMMIT_RESULTS messages; if more wait,
        the writer comes back at once."""
        with self._lock:
            taken = messages = 0
            for delivery in self._pending:
                messages += _messages_in(delivery.envelope)
                if taken and messages > COMMIT_RESULTS:
                    self._commit_now.set()
                    break
                taken += 1
            batch, self._pending = self._pending[:taken], self._pending[taken:]
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
        received = [item for delivery in batch for item in self._decode(delivery)]
        retry: list[Delivery] = []
        failure: Exception | None = None
        try:
            dead_letters = self._write(received)
        except Exception as exc:  # noqa: BLE001 - the database's fault or a message's: sorted below
            if not message_fault(exc):
                # The database's fault (away, locked, full): the batch waits, unacked, and
                # is written once it answers (DatabaseOutage).
                self._hold(batch, exc)
                return
            logger.warning("ledger could not commit %d messages (%s); writing them one at a "
                           "time to drop only the one at fault", len(batch), describe(exc))
            dead_letters, retry, failure = self._write_each(received)
        if dead_letters and not republish(self._broker, self._topology, dead_letters):
            self._requeue(batch)
            return
        if not retry:
            # Deliveries arrive and are committed in order: one ack covers the whole batch.
            self._broker.ack(batch[-1], multiple=True)
            self._outage.answered()
        else:
            self._ack_all_but(batch, retry)
            self._hold(retry, failure or RuntimeError("the database failed"))
        # Those held are the batch's tail (_write_each): the rest were committed.
        held = {delivery.tag for delivery in retry}
        observe_commit([item.message for item in received if item.delivery.tag not in held])
        self._named += [task_id for item in received if isinstance(item.message, GroupManifest)
                        for task_id in item.message.task_ids]
        logger.debug("ledger committed %d messages", len(batch) - len(retry))

    def _write(self, received: list[_Received]) -> list[ResultMessage]:
        """Record what ``received`` holds in one transaction; return the dead letters to
        republish. A transaction PostgreSQL ended for another registry's sake is tried
        again (CONFLICT_ATTEMPTS in all)."""
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                with self._sessions() as db:
                    dead_letters = self._record(db, received)
                    db.commit()
                return dead_letters
            except DBAPIError as exc:
                if attempt == CONFLICT_ATTEMPTS or not conflict(exc):
                    raise
                logger.info("ledger's commit of %d messages met another's (%s); trying again",
                            len(received), describe(exc))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _write_each(self, received: list[_Received]) -> tuple[
            list[ResultMessage], list[Delivery], Exception | None]:
        """Record each message in a transaction of its own, dropping those that fail; return
        the dead letters to republish, the deliveries to hold (all from the first the
        database itself failed on) and how it failed."""
        dead_letters: list[ResultMessage] = []
        for index, item in enumerate(received):
            try:
                dead_letters += self._write([item])
            except Exception as exc:  # noqa: BLE001 - the database's fault or this message's
                if not message_fault(exc):
                    # (a batch's entries share their delivery: each is held once)
                    held = {later.delivery.tag: later.delivery for later in received[index:]}
                    return dead_letters, list(held.values()), exc
                logger.warning("ledger dropped a message it could not record (from %r, %s "
                               "%r): %s", item.delivery.user_id, item.delivery.exchange,
                               item.delivery.routing_key, describe(exc))
        return dead_letters, [], None

    def _record(self, db: Session, received: list[_Received]) -> list[ResultMessage]:
        results: list[ReceivedResult] = []
        for item in received:
            message, sender = item.message, item.delivery.user_id
            if isinstance(message, GroupManifest):
                self._record_manifest(db, message, sender)
            elif isinstance(message, Heartbeat):
                self._record_heartbeat(db, message, sender)
            elif message is not None:
                results.append(ReceivedResult(message, sender, item.dead))
        # After the manifests: a result whose manifest came in the same batch is not early.
        return self._record_results(db, results)

    def _record_results(self, db: Session, results: list[ReceivedResult]) -> list[ResultMessage]:
        """Record the results (and dead letters) that count; set aside those no manifest
        has named the task of yet. Returns the dead letters to republish."""
        accepted = self._accepted_results(db, results)
        first: dict[str, ReceivedResult] = {}
        for item in accepted:
            first.setdefault(item.result.task_id, item)
        store.record_results(db, [item.result for item in accepted],
                             size_limit=self._retention.size_limit,
                             dropped_sizes={task_id: item.dropped_size
                                            for task_id, item in first.items()
                                            if item.dropped_size is not None})
        return [item.result for item in accepted if item.dead]

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

    def _accepted_results(self, db: Session, results: list[ReceivedResult]
                          ) -> list[ReceivedResult]:
        """The results (and dead letters) to record, each under the user, task group and
        endpoint the ledger recorded for its task. With verified senders, those whose task
        no manifest has named yet are set aside (the module docstring says why)."""
        owners = store.task_owners(db, [item.result.task_id for item in results])
        accepted: list[ReceivedResult] = []
        early: list[ReceivedResult] = []
        for item in results:
            result, owner = item.result, owners.get(item.result.task_id)
            if owner is None:
                # Unverified, the headers are all there is (and the decoder has bounded them).
                (early if self._senders.verified else accepted).append(item)
                continue
            refusal = result_refusal(result, owner, item.sender, self._senders, dead=item.dead)
            if refusal is not None:
                logger.warning("ledger dropped a %s for task %r from %r: %s",
                               _kind(item), result.task_id, item.sender, refusal)
                continue
            accepted.append(item if (result.user, result.task_group_id, result.endpoint_id)
                            == (owner.user, owner.task_group_id, owner.endpoint_id)
                            else ReceivedResult(result.model_copy(update={
                                "user": owner.user, "task_group_id": owner.task_group_id,
                                "endpoint_id": owner.endpoint_id}), item.sender, item.dead,
                                item.dropped_size))
        if early:
            self._set_aside(db, early)
        return accepted

    def _set_aside(self, db: Session, early: list[ReceivedResult]) -> None:
        """Keep ``early`` in the database until a manifest names their tasks, up to
        MAX_EARLY_RESULTS_PER_SENDER of each sender."""
        counts = store.early_result_counts(db, {item.sender for item in early})
        kept = []
        for item in early:
            if counts.get(item.sender, 0) >= MAX_EARLY_RESULTS_PER_SENDER:
                logger.warning("ledger dropped a %s for task %r from %r: no manifest named its "
                               "task, and %d of that sender's wait for theirs already",
                               _kind(item), item.result.task_id, item.sender,
                               MAX_EARLY_RESULTS_PER_SENDER)
                continue
            counts[item.sender] = counts.get(item.sender, 0) + 1
            kept.append(item)
        store.set_aside_results(db, kept, size_limit=self._retention.size_limit)
        logger.debug("ledger set aside %d results until a manifest names their tasks",
                     len(kept))

    def _take_back_early_results(self) -> None:
        """Record the results set aside whose task is recorded now: at once for the tasks
        the last batch's manifests named, and each SWEEP_INTERVAL for any (another
        registry may have committed the manifest while this one set the result aside).
        The sweep also drops those older than EARLY_RESULT_TTL."""
        named, self._named = self._named, []
        now = time.time()
        sweep = now >= self._next_sweep
        if not (named or sweep) or not self._senders.verified:
            return  # (unverified, nothing is ever set aside)
        if sweep:
            self._next_sweep = now + SWEEP_INTERVAL
        try:
            with self._sessions() as db:
                if not store.any_early_results(db):
                    return
                taken = store.take_early_results(db, None if sweep else named)
                expired = store.expire_early_results(db, now - EARLY_RESULT_TTL) if sweep else []
                if not (taken or expired):
                    return
                dead_letters = self._record_results(db, taken)
                # Handed on before the commit: if the broker does not take them, the
                # rollback keeps them set aside for the next sweep.
                if dead_letters and not republish(self._broker, self._topology, dead_letters):
                    db.rollback()
                    return
                db.commit()
        except Exception as exc:  # noqa: BLE001  # the rows stay set aside: the next sweep tries again
            if not message_fault(exc):
                self._hold([], exc)  # the database is away: wait for it
                return
            logger.warning("ledger could not take back results set aside (%s); it will try "
                           "again", describe(exc))
            return
        if taken:
            logger.debug("ledger took back %d results set aside", len(taken))
        for task_id, sender in expired[:MAX_EXPIRED_LINES]:
            logger.warning("ledger dropped a result for task %r from %r: no manifest named its "
                           "task within %.0f seconds", task_id, sender, EARLY_RESULT_TTL)
        if len(expired) > MAX_EXPIRED_LINES:
            logger.warning("ledger dropped %d more results no manifest named the task of",
                           len(expired) - MAX_EXPIRED_LINES)

    def _requeue(self, batch: list[Delivery]) -> None:
        for delivery in batch:
            self._broker.reject(delivery, requeue=True)

    def _ack_all_but(self, batch: list[Delivery], held: list[Delivery]) -> None:
        kept = {delivery.tag for delivery in held}
        for delivery in batch:
            if delivery.tag not in kept:
                self._broker.ack(delivery)

    def _hold(self, deliveries: list[Delivery], failure: Exception) -> None:
        """Keep ``deliveries`` (unacked, in order, before what arrived since) for the next
        try, once the database answers."""
        with self._lock:
            self._pending[:0] = deliveries
            held = len(self._pending)
        self._outage.failed(failure, held)

    def _decode(self, delivery: Delivery) -> list[_Received]:
        """What a delivery holds: one message, or each result of a batch (a batch's
        malformed entry costs that entry alone)."""
        dead = delivery.exchange == self._topology.exchange("dead")
        try:
            if delivery.exchange == self._topology.exchange("events"):
                event = decode_event(delivery.envelope)
                return [_Received(delivery, None if isinstance(event, CancelCommand) else event,
                                  dead)]
            decoded: list[ResultMessage | Exception] = [*decode_results(delivery.envelope)]
        except Exception as exc:  # noqa: BLE001  # decoders promise ProtocolError; a slip costs one message too
            decoded = [exc]
        received = []
        for item in decoded:
            if isinstance(item, Exception):
                logger.warning("ledger dropped an undecodable message from %r (%s %r, %d "
                               "bytes): %s", delivery.user_id, delivery.exchange,
                               delivery.routing_key, len(delivery.envelope.body), describe(item))
            else:
                received.append(_Received(delivery, item, dead))
        return received or [_Received(delivery, None, dead)]


def _messages_in(envelope: Envelope) -> int:
    """How many messages a delivery says it holds: a batch's count (one if that is out of
    bounds: the batch is refused when decoded), else one."""
    return (entry_count(envelope) or 1) if is_batch(envelope) else 1


def _kind(item: ReceivedResult) -> str:
    return "dead letter" if item.dead else "result"
