"""Dead letters reach their submitters through the ledger.

Result queues do not bind to ``gc.dead`` (a headers binding escapes the broker's topic
authorization), so after committing a dead-lettered task the ledger publishes it to
``gc.results`` as a failed result under the submitter's routing key, with the registry's
own ``user_id`` (checked by the broker, so the submitter's client can tell it from a
forgery), and acks only once the broker confirmed that.
"""

from __future__ import annotations

import logging
import threading

from gc_core.broker import BrokerSession
from gc_core.broker_limits import Refusal
from gc_core.errors import GCError
from gc_core.protocol import ResultMessage, encode_result
from gc_core.topology import Topology, safe_name_part

__all__ = ["REPUBLISH_TIMEOUT", "republish"]

logger = logging.getLogger(__name__)

#: Seconds to wait for the broker to confirm republished dead letters.
REPUBLISH_TIMEOUT = 30.0


def republish(broker: BrokerSession, topology: Topology, dead_letters: list[ResultMessage],
              timeout: float = REPUBLISH_TIMEOUT) -> bool:
    """Send dead-lettered tasks to their submitters as failed results; True once the
    broker took (or refused for good) each of them. False: it did not answer within
    ``timeout``, or answered something worth another try, and the ledger replays them
    (duplicates are harmless). One refused for good would be refused again: it is not
    sent again, and its task stays recorded as dead-lettered."""
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
            key = topology.routing_key(
                "result", user=safe_name_part(result.user, "user"),
                task_group_id=safe_name_part(result.task_group_id, "task group id"))
        except GCError as exc:
            logger.warning("dead-lettered task %r has no submitter to tell: %s",
                           result.task_id, exc)
            continue
        broker.publish(topology.exchange("results"), key, encode_result(result),
                       on_confirm=on_confirm)
        sent += 1
    for _ in range(sent):
        if not answered.acquire(timeout=timeout):
            failed.append(f"no confirm within {timeout:.0f}s")
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
