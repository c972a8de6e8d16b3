"""A delivery that carries several tasks, and when it may be settled.

The broker acks or requeues a batch as one message, but every promise is about tasks, so
the agent settles a batch's delivery only once each of its tasks is settled: acked when
every one ended in a confirmed result or went back to the queue alone, requeued whole
(to be split on its redelivery) when one of them could not.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from gc_core.broker_consumers import Delivery, Settlement
from gc_core.errors import GCError, ProtocolError
from gc_core.protocol import Envelope, TaskMessage, decode_task
from gc_core.registry_api.client import RegistryClient

__all__ = ["BatchDelivery", "unfinished_in_ledger", "unsplit_tasks"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class BatchDelivery:
    """One delivery of a batch, waiting for ``remaining`` of its tasks to be settled."""

    delivery: Delivery
    remaining: int
    #: Its tasks with no result on the way yet (see :meth:`answer`); all of them at first.
    unanswered: int = field(init=False)
    #: Whether some task of it could be neither answered nor sent back alone: then the
    #: whole batch goes back to the queue, and is split when it comes again.
    requeue: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.unanswered = self.remaining

    def answer(self, send: Callable[[bool], None]) -> None:
        """One more of its tasks has its result: ``send`` it, told whether some of its
        batch-mates have none yet. The batch's answers are sent one at a time, so the last
        is sent after all the others. (A task settled without a result never counts: its
        batch-mates' results are then held a little longer than they need be, never lost.)"""
        with self._lock:
            self.unanswered -= 1
            send(self.unanswered > 0)

    def task_settled(self, *, settled_alone: bool = True) -> Settlement | None:
        """One task of the batch is settled (``settled_alone`` False: it could not be);
        once every task is, how to settle the batch's delivery, else None."""
        with self._lock:
            self.requeue = self.requeue or not settled_alone
            self.remaining -= 1
            if self.remaining:
                return None
        return Settlement.REQUEUE if self.requeue else Settlement.ACK


def unsplit_tasks(entries: list[Envelope], keep: Callable[[TaskMessage], bool]) -> dict[str, Envelope]:
    """The entries of a redelivered batch to put back alone, by task id: those that decode
    to a task ``keep`` accepts. The others cost their sender alone: dropped, with a warning."""
    kept: dict[str, Envelope] = {}
    for entry in entries:
        try:
            task = decode_task(entry)
        except ProtocolError as exc:
            logger.warning("dropped an undecodable task (%d bytes) of a redelivered batch: %r",
                           len(exc.raw), str(exc)[:300])
            continue
        if keep(task):
            kept[task.task_id] = entry
    return kept


def unfinished_in_ledger(registry: RegistryClient | None,
                         waiting: dict[str, Envelope]) -> list[Envelope]:
    """The entries of ``waiting`` whose task the ledger does not record as finished: after
    a crash, those with a confirmed result are not run again. Every one when the ledger
    cannot be asked (a rerun's duplicate result is dropped by its client)."""
    if registry is None or not waiting:
        return list(waiting.values())
    try:
        known = registry.get_tasks(list(waiting))
    except GCError as exc:
        logger.info("could not ask the ledger which tasks of a redelivered batch finished "
                    "(%s); putting them all back", exc)
        return list(waiting.values())
    finished = {task.task_id for task in known if task.status not in ("waiting", "unknown")}
    return [entry for task_id, entry in waiting.items() if task_id not in finished]
