"""The task ledger: consume ``gc.ledger`` and write what happened to the database.

The broker copies every result, dead letter, heartbeat and task-group manifest
to ``gc.ledger``. The consumer collects deliveries on the broker's IO thread and
a writer thread commits them in batches, acking only after the commit: a
registry crash loses nothing, it only replays.

Dead letters reach their submitter through the ledger too: result queues do not bind
to ``gc.dead`` (a headers binding escapes the broker's topic authorization), so after
committing a dead-lettered task the ledger publishes it to ``gc.results`` as a failed
result under the submitter's routing key, and acks only once the broker confirmed that.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from gc_core.broker import BrokerSession, Delivery
from gc_core.errors import GCError, ProtocolError
from gc_core.protocol import (
    ControlMessage,
    GroupManifest,
    Heartbeat,
    ResultMessage,
    decode_event,
    decode_result,
    encode_result,
)
from gc_core.registry import store
from gc_core.topology import Topology, safe_name_part

__all__ = ["Ledger", "Retention"]

logger = logging.getLogger(__name__)

#: How often (seconds) the writer commits what has arrived.
COMMIT_INTERVAL = 0.05
#: Unacked deliveries the ledger may hold; bounds one commit's size.
LEDGER_PREFETCH = 2000
#: Seconds the writer waits for the broker to confirm republished dead letters.
REPUBLISH_TIMEOUT = 30.0
#: How often (seconds) the writer drops results past their time to live.
EXPIRE_INTERVAL = 60.0


@dataclass(frozen=True)
class Retention:
    """How much of each result the ledger keeps, and for how long (None: no limit)."""

    size_limit: int | None = 10 * 2**20
    ttl: float | None = 30 * 86400.0

    @property
    def ttl_text(self) -> str:
        days, seconds = divmod(self.ttl or 0, 86400)
        return f"{days:g} days" if days and not seconds else f"{self.ttl:g} seconds"


class Ledger:
    """Consumes the ledger queue into the database."""

    def __init__(self, *, broker_url: str, topology: Topology, sessions: sessionmaker[Any],
                 retention: Retention = Retention()) -> None:
        self._sessions = sessions
        self._retention = retention
        self._next_expiry = 0.0
        self._topology = topology
        self._queue = topology.queue("ledger")
        self._broker = BrokerSession(broker_url, name="gc-registry:ledger", topology=topology,
                                     queues=[self._queue], prefetch=LEDGER_PREFETCH)
        self._pending: list[Delivery] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        """Whether the ledger's queue is declared and consumed right now."""
        return self._broker.connected

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
        except SQLAlchemyError:
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
        results: list[ResultMessage] = []
        dead_letters: list[ResultMessage] = []
        try:
            with self._sessions() as db:
                for delivery in batch:
                    item = self._decode(delivery)
                    if isinstance(item, ResultMessage):
                        results.append(item)
                        if delivery.exchange == self._topology.exchange("dead"):
                            dead_letters.append(item)
                    elif isinstance(item, GroupManifest):
                        store.record_manifest(db, item)
                    elif isinstance(item, Heartbeat):
                        store.record_heartbeat(db, item)
                store.record_results(db, results, size_limit=self._retention.size_limit)
                db.commit()
        except SQLAlchemyError:
            # The writer must outlive a database hiccup (locked, restarted): the batch goes
            # back to the queue and is written again, which the upserts make harmless.
            logger.exception("ledger could not commit %d messages; returning them to the queue",
                             len(batch))
            self._requeue(batch)
            return
        if dead_letters and not self._republish(dead_letters):
            self._requeue(batch)
            return
        # Deliveries arrive and are committed in order: one ack covers the whole batch.
        self._broker.ack(batch[-1], multiple=True)
        logger.debug("ledger committed %d messages (%d results)", len(batch), len(results))

    def _requeue(self, batch: list[Delivery]) -> None:
        for delivery in batch:
            self._broker.reject(delivery, requeue=True)

    def _republish(self, dead_letters: list[ResultMessage]) -> bool:
        """Send dead-lettered tasks to their submitters as failed results; True once the
        broker confirmed all of them (False: the batch is replayed, duplicates are harmless)."""
        confirmed = threading.Semaphore(0)
        refusals: list[str] = []

        def on_confirm(reason: str | None) -> None:
            if reason is not None:
                refusals.append(reason)
            confirmed.release()

        sent = 0
        for result in dead_letters:
            try:
                key = self._topology.routing_key(
                    "result", user=safe_name_part(result.user, "user"),
                    task_group_id=safe_name_part(result.task_group_id, "task group id"))
            except GCError as exc:
                logger.warning("dead-lettered task %s has no submitter to tell: %s",
                               result.task_id, exc)
                continue
            self._broker.publish(self._topology.exchange("results"), key, encode_result(result),
                                 on_confirm=on_confirm)
            sent += 1
        for _ in range(sent):
            if not confirmed.acquire(timeout=REPUBLISH_TIMEOUT):
                refusals.append(f"no confirm within {REPUBLISH_TIMEOUT:.0f}s")
                break
        if refusals:
            logger.warning("ledger could not republish %d dead letters (%s); replaying them",
                           sent, refusals[0])
            return False
        logger.info("ledger republished %d dead-lettered tasks as failed results", sent)
        return True

    def _decode(self, delivery: Delivery) -> ResultMessage | ControlMessage | None:
        try:
            if delivery.exchange == self._topology.exchange("events"):
                return decode_event(delivery.envelope)
            return decode_result(delivery.envelope)
        except ProtocolError as exc:
            logger.warning("ledger dropped an undecodable message from %s (%s, %d bytes): %s",
                           delivery.exchange, delivery.routing_key, len(exc.raw), exc)
            return None
