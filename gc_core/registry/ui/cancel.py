"""Cancelling a task from the dashboard: the cancel command every other path sends
(``gc-client cancel``, ``future.cancel()``, an action's cancel), published by the registry."""

from __future__ import annotations

import logging
import time

from sqlalchemy.orm import Session

from gc_core.errors import BrokerError, Forbidden, NotFound, RegistryError
from gc_core.protocol import CancelCommand, encode_event
from gc_core.registry import store
from gc_core.registry.actions import ActionPublisher
from gc_core.registry.identity import Principal

__all__ = ["cancel_task"]

logger = logging.getLogger(__name__)


def cancel_task(db: Session, principal: Principal, task_id: str,
                publisher: ActionPublisher) -> bool:
    """Ask the task's endpoint to cancel it; False when it had already finished.

    Raises:
        NotFound: ``principal`` may not see the task (or there is none).
        Forbidden: ``principal`` may see it but did not submit it (an agent, say).
        RegistryError: the broker could not be reached or did not take the command (503).
    """
    task = store.get_tasks(db, [task_id], principal)[0]
    if task.status == "unknown":
        raise NotFound(f"no task {task_id} (or it is not yours)")
    if not (principal.admin or principal.name == task.user):
        raise Forbidden(f"only {task.user}, who submitted task {task_id}, may cancel it")
    if task.status != "waiting":
        return False
    command = CancelCommand(task_ids=[task_id], user=task.user, sent=time.time())
    topology = publisher.topology
    try:
        refused = publisher.send(topology.exchange("commands"),
                                 topology.routing_key("command", endpoint_id=task.endpoint_id),
                                 encode_event(command), mandatory=False)
    except BrokerError as exc:
        raise RegistryError(f"the registry could not send the cancel of task {task_id}: {exc}",
                            status=503) from exc
    if refused is not None:
        raise RegistryError(f"the broker did not take the cancel of task {task_id} ({refused})",
                            status=503)
    logger.info("task %s: cancel sent to endpoint %s from the dashboard", task_id,
                task.endpoint_id)
    return True
