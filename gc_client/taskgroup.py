"""One task group's bookkeeping, shared by both executors: everything but the I/O.

A :class:`TaskGroup` builds the group's messages (tasks, manifests, cancel commands),
tracks which tasks still wait for the broker's confirm and which for their result,
and turns results into resolved futures. The executors only move its messages over
their own broker session (pika's IO thread for :class:`~gc_client.executor.Executor`,
aio-pika for :class:`~gc_client.async_executor.AsyncExecutor`), so the two cannot drift.

Memory stays flat however many tasks a group runs: a future is held only until it is
done (after that, as long as the caller holds it), and the few ids and results kept
for later are bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from gc_client.client import Client
from gc_client.tasks import (
    Outgoing,
    cancel_message,
    make_task,
    manifest_message,
    new_id,
    not_accepted,
    oversize,
    result_value,
    task_out_value,
)
from gc_core.batches import decode_results
from gc_core.errors import ProtocolError
from gc_core.protocol import Envelope, ResultMessage, TaskMessage
from gc_core.registry_api.schemas import TaskOut
from gc_core.serialize import Serializer, get_serializer
from gc_core.topology import safe_name_part

__all__ = ["GroupFuture", "TaskGroup", "TaskGroupFront", "TaskGroupOptions"]

logger = logging.getLogger(__name__)

#: Ids of finished tasks remembered, so that a late duplicate result (a task redelivered
#: after its agent died) is recognised as one.
RECENTLY_FINISHED = 10_000
#: Seconds between the ledger look-ups for pending tasks whose results may not come on
#: the queue (see :meth:`TaskGroup.followed_pending`).
LEDGER_FOLLOW_UP = 2.0
#: Seconds between looks at how many consume the group's queue, while tasks are pending
#: (see :meth:`TaskGroup.note_consumers`).
CONSUMER_CHECK = 10.0
#: Task ids asked of the ledger at once (the registry takes up to 10,000).
LEDGER_BATCH = 1_000
#: Results held for tasks this group does not know yet (until ``reload_tasks`` claims
#: them); beyond either bound the oldest go: the ledger still has them.
UNCLAIMED_RESULTS = 10_000
UNCLAIMED_BYTES = 64 * 2**20

#: This process's task groups whose executors consume results, by broker, user and task
#: group id. Two executors of one group (a notebook cell re-run while the first is still
#: open) consume its one result queue, and the broker gives each result to either: one
#: taken by the group that did not submit its task goes to the one that did (held instead,
#: it left that future waiting for ever, and that executor's exit with it), and the queue
#: is deleted by the last of them to close, not the first.
_LIVE: dict[tuple[str, str, str], weakref.WeakSet[TaskGroup[Any]]] = {}
_LIVE_LOCK = threading.Lock()


class GroupFuture(Protocol):
    """What a task group needs of a future: both executors' futures have it."""

    task_id: str
    endpoint_id: str
    stdout: str
    stderr: str

    def done(self) -> bool: ...
    def set_result(self, result: Any, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...
    def add_done_callback(self, fn: Callable[[Any], object], /) -> None: ...


F = TypeVar("F", bound=GroupFuture)


@dataclass(frozen=True)
class TaskGroupOptions:
    """What every task of a group shares, as the executors take it."""

    task_group_id: str
    endpoint_id: str | None
    serializer: Serializer
    resource_specification: dict[str, Any] | None = None
    user_endpoint_config: dict[str, Any] | None = None
    on_behalf_of: str | None = None

    @classmethod
    def of(cls, *, task_group_id: str | uuid.UUID | None, endpoint_id: str | uuid.UUID | None,
           serializer: str, resource_specification: dict[str, Any] | None,
           user_endpoint_config: dict[str, Any] | None,
           on_behalf_of: str | None) -> TaskGroupOptions:
        """The options an executor was given, checked: ids as text (a ``uuid.UUID`` too, as
        Globus Compute takes them), a new group id if none, the serializer by name."""
        return cls(task_group_id=safe_name_part(str(task_group_id or new_id()), "task_group_id"),
                   endpoint_id=checked_endpoint_id(endpoint_id),
                   serializer=get_serializer(serializer),
                   resource_specification=resource_specification,
                   user_endpoint_config=user_endpoint_config, on_behalf_of=on_behalf_of)


class TaskGroup(Generic[F]):
    """The tasks one executor submitted to one endpoint under one task group id.

    Thread-safe: tasks are made on the caller's thread while results and confirms
    arrive on the I/O side. ``make_future(task_id, endpoint_id)`` builds the front end's
    own future type (and gives it the front end's way to cancel remotely).
    """

    def __init__(self, client: Client, options: TaskGroupOptions,
                 make_future: Callable[[str, str], F]) -> None:
        self.client = client
        self.task_group_id = options.task_group_id
        self.endpoint_id = options.endpoint_id
        self.serializer = options.serializer
        self.resource_specification = options.resource_specification
        self.user_endpoint_config = options.user_endpoint_config
        self.user = client.settings.user
        #: The end user a service account submits for (default: the client's).
        self.on_behalf_of = (client.on_behalf_of if options.on_behalf_of is None
                             else options.on_behalf_of)
        self._make_future = make_future
        self._pending: dict[str, F] = {}
        self._reloaded: set[str] = set()
        #: Whether another process was seen consuming the group's queue: from then on every
        #: pending task is followed up in the ledger.
        self._shared_elsewhere = False
        self._unconfirmed: set[str] = set()
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._unclaimed: OrderedDict[str, list[tuple[ResultMessage, str]]] = OrderedDict()
        self._unclaimed_bytes = 0
        self._lock = threading.Lock()
        #: Results dropped because their future had already resolved (a redelivered task)
        #: or had been cancelled.
        self.duplicates_dropped = 0
        #: Bound once: every future holds it, and a method bound anew is an object a future.
        self._forget_when_done = self._forget
        #: How a result taken on another thread reaches this group's futures (the async
        #: executor's: through its event loop).
        self.deliver: Callable[[Callable[[], None]], object] = _call
        self._siblings: weakref.WeakSet[TaskGroup[Any]] = weakref.WeakSet()

    # -- building messages ---------------------------------------------------------------

    def new_task(self, function_id: str, args: Iterable[Any],
                 kwargs: dict[str, Any] | None) -> tuple[TaskMessage | None, F]:
        """A task calling ``function_id`` and its future, tracked until done. A task over
        the client's ``max_message_size`` is not made: its future fails at once."""
        if self.endpoint_id is None:
            raise ValueError("this executor has no endpoint_id; pass endpoint_id=...")
        task = make_task(endpoint_id=self.endpoint_id, function_id=function_id, user=self.user,
                         task_group_id=self.task_group_id, serializer=self.serializer,
                         args=tuple(args), kwargs=dict(kwargs or {}),
                         resource_spec=self.resource_specification,
                         identity=self.client.settings.identity, on_behalf_of=self.on_behalf_of,
                         user_endpoint_config=self.user_endpoint_config)
        future = self._make_future(task.task_id, self.endpoint_id)
        too_large = oversize(task, self.client.max_message_size)
        if too_large is not None:
            future.set_exception(too_large)
            return None, future
        with self._lock:
            self._pending[task.task_id] = future
            self._unconfirmed.add(task.task_id)
        future.add_done_callback(self._forget_when_done)
        return task, future

    def manifest(self, tasks: Sequence[TaskMessage]) -> Outgoing:
        """Tell the ledger which tasks the group holds before their results exist. ``tasks``
        went out together, so to one endpoint (maybe one the executor is no longer
        pointed at)."""
        return manifest_message(self.client.topology, [task.task_id for task in tasks],
                                task_group_id=self.task_group_id,
                                endpoint_id=tasks[0].endpoint_id, user=self.user)

    def cancel_command(self, task_ids: list[str], endpoint_id: str) -> Outgoing:
        """Ask ``endpoint_id`` to cancel these tasks of ours."""
        return cancel_message(self.client.topology, task_ids, endpoint_id=endpoint_id,
                              user=self.user)

    # -- what the broker said ------------------------------------------------------------

    def confirmed(self, task_id: str, future: F, reason: object | None) -> None:
        """The broker took the task (``reason`` None) or refused it: then its future fails."""
        with self._lock:
            self._unconfirmed.discard(task_id)
        if reason is not None:
            _settle(future, partial(_raise, not_accepted(
                f"task {task_id} was", future.endpoint_id, reason)))

    def on_result(self, envelope: Envelope, sender: str) -> None:
        """Resolve the futures a result (or a batch of them) belongs to, each if broker user
        ``sender`` may send it; hold one whose task is not known yet (see :meth:`adopt`)."""
        try:
            results = decode_results(envelope)
        except ProtocolError as exc:
            results = [exc]
        for result in results:
            if isinstance(result, ProtocolError):
                logger.warning("dropped an undecodable result (%d bytes): %s", len(result.raw),
                               result)
            else:
                self._on_one_result(result, sender)

    def _on_one_result(self, result: ResultMessage, sender: str) -> None:
        with self._lock:
            future = self._pending.get(result.task_id)
            if future is None and result.task_id in self._finished:
                self.duplicates_dropped += 1
                return
        if future is not None:
            self._accept(future, result, sender)
        elif not self._hand_to_sibling(result, sender):
            with self._lock:
                self._hold(result, sender)

    def join(self) -> None:
        """This group's executor consumes its result queue from now on."""
        with _LIVE_LOCK:
            self._siblings = _LIVE.setdefault(self._live_key, weakref.WeakSet())
            self._siblings.add(self)

    def leave(self) -> bool:
        """This group's executor closes; whether another of this process still consumes the
        group's queue (then it stays)."""
        with _LIVE_LOCK:
            self._siblings.discard(self)
            if self._siblings:
                return True
            # (a process making executor after executor keeps no entry per group made; one
            # made since for the same key, by a group joining after, is not this one's)
            if _LIVE.get(self._live_key) is self._siblings:
                del _LIVE[self._live_key]
            return False

    @property
    def _live_key(self) -> tuple[str, str, str]:
        return self.client.settings.broker_url, self.user, self.task_group_id

    def _hand_to_sibling(self, result: ResultMessage, sender: str) -> bool:
        """Give a result to the group of this process's that submitted its task, if any."""
        with _LIVE_LOCK:
            siblings = [group for group in self._siblings if group is not self]
        return any(group._claim(result, sender) for group in siblings)

    def _claim(self, result: ResultMessage, sender: str) -> bool:
        """Take a result another group of ours received, if its task is one of ours."""
        with self._lock:
            future = self._pending.get(result.task_id)
        if future is None:
            return False
        try:
            self.deliver(partial(self._accept, future, result, sender))
        except RuntimeError:  # its event loop has ended, the executor never closed
            return False
        return True

    # -- reattaching ---------------------------------------------------------------------

    def adopt(self, known: list[TaskOut]) -> list[F]:
        """Futures for the group's tasks the ledger listed (from ``reload_tasks``): the
        finished resolve from the ledger, the others from held or later results, or from
        the ledger again (:meth:`followed_pending`)."""
        futures: list[F] = []
        for task in known:
            with self._lock:
                future = self._pending.get(task.task_id)
                adopted = future is None
                if future is None:
                    future = self._make_future(task.task_id, task.endpoint_id)
                    self._pending[task.task_id] = future
                    self._reloaded.add(task.task_id)
                held = self._take_held(task.task_id)
            if adopted:
                future.add_done_callback(self._forget_when_done)
            futures.append(future)
            for result, sender in held:
                self._accept(future, result, sender)
        self.update_from_ledger(known)
        return futures

    def update_from_ledger(self, known: list[TaskOut]) -> None:
        """Resolve the pending futures of tasks the ledger says are finished."""
        for task in known:
            with self._lock:
                future = self._pending.get(task.task_id)
            if future is not None and not future.done() and \
                    task.status not in ("waiting", "unknown"):
                self._resolve(future, partial(task_out_value, task, self.serializer),
                              task.stdout, task.stderr)

    # -- state ---------------------------------------------------------------------------

    def waiting(self) -> bool:
        """Whether any task of the group waits for its result (cheaper than pending())."""
        return bool(self._pending)

    def pending(self) -> list[F]:
        """Futures not done yet."""
        with self._lock:
            return [f for f in self._pending.values() if not f.done()]

    def followed_pending(self) -> list[list[str]]:
        """Ids of pending tasks whose results may never come on the queue, in batches for
        the ledger: reloaded ones (an earlier consumer of the group took them while the
        ledger was still writing them down), and every one once another process consumes
        the queue (:meth:`note_consumers`). The front ends ask the ledger about them every
        ``LEDGER_FOLLOW_UP`` seconds (:meth:`update_from_ledger`)."""
        with self._lock:
            followed = self._pending if self._shared_elsewhere else self._reloaded
            ids = [task_id for task_id in followed if not self._pending[task_id].done()]
        return [ids[start:start + LEDGER_BATCH] for start in range(0, len(ids), LEDGER_BATCH)]

    def note_consumers(self, consumers: int) -> None:
        """The broker says ``consumers`` consume the group's queue. More than this process's
        executors of the group: another process does, and takes some of the results of
        this one's tasks (and this one some of its). Said once."""
        with _LIVE_LOCK:
            ours = len(self._siblings)
        if consumers <= ours or self._shared_elsewhere:
            return
        self._shared_elsewhere = True
        logger.warning(
            "%d consumers take results from the queue of task group %r, %d of them in this "
            "process: another process uses the task group too, and the broker gives each "
            "result to one of them. This process now asks the ledger about its pending tasks "
            "every %g s, so they still resolve here; give each process a task group of its "
            "own to get every result from the queue", consumers, self.task_group_id, ours,
            LEDGER_FOLLOW_UP)

    def unconfirmed(self) -> list[str]:
        """Ids of tasks the broker has not confirmed yet."""
        with self._lock:
            return list(self._unconfirmed)

    def idle(self) -> bool:
        """Nothing pending and nothing held: the group's result queue can go."""
        with self._lock:
            return not self._unclaimed and all(f.done() for f in self._pending.values())

    def reattach_hint(self, unfinished: int, front_end: str) -> str:
        """How to pick up the results of ``unfinished`` tasks after this process is gone."""
        return (f"{unfinished} tasks of task group {self.task_group_id!r} had not finished "
                "when this program stopped waiting for them; their results wait in the ledger "
                f"and the group's queue. Reattach with {front_end}(endpoint_id="
                f"{self.endpoint_id!r}, task_group_id={self.task_group_id!r}).reload_tasks()")

    # -- internals -----------------------------------------------------------------------

    def _accept(self, future: F, result: ResultMessage, sender: str) -> None:
        if not self.client.refuses_result(result, sender, future.endpoint_id):
            self._resolve(future, partial(result_value, result, self.serializer),
                          result.stdout, result.stderr)

    def _resolve(self, future: F, value: Callable[[], Any], stdout: str, stderr: str) -> None:
        if future.done():
            self.duplicates_dropped += 1
            return
        future.stdout, future.stderr = stdout, stderr
        if not _settle(future, value):
            self.duplicates_dropped += 1  # cancelled or resolved meanwhile by another thread

    def _forget(self, future: F) -> None:
        """A done future leaves the group: from now on only its holder keeps it."""
        with self._lock:
            self._pending.pop(future.task_id, None)
            self._unconfirmed.discard(future.task_id)
            self._reloaded.discard(future.task_id)
            self._finished[future.task_id] = None
            if len(self._finished) > RECENTLY_FINISHED:
                self._finished.popitem(last=False)

    def _take_held(self, task_id: str) -> list[tuple[ResultMessage, str]]:
        """Under the lock: the results held for ``task_id``, no longer held."""
        held = self._unclaimed.pop(task_id, [])
        self._unclaimed_bytes -= sum(len(result.payload) for result, _ in held)
        return held

    def _hold(self, result: ResultMessage, sender: str) -> None:
        """Under the lock: keep a result for a task not known yet, within the bounds."""
        self._unclaimed.setdefault(result.task_id, []).append((result, sender))
        self._unclaimed_bytes += len(result.payload)
        while len(self._unclaimed) > UNCLAIMED_RESULTS or self._unclaimed_bytes > UNCLAIMED_BYTES:
            task_id = next(iter(self._unclaimed))
            self._take_held(task_id)
            logger.info("let go of the held result of task %s of task group %s (the ledger "
                        "keeps it for reload_tasks)", task_id, self.task_group_id)


class TaskGroupFront(Generic[F]):
    """What both executors show of their task group."""

    _group: TaskGroup[F]

    @property
    def endpoint_id(self) -> str | None:
        """Where tasks submitted from now on go; may be reassigned (text or ``uuid.UUID``),
        as Globus Compute's Executor allows."""
        return self._group.endpoint_id

    @endpoint_id.setter
    def endpoint_id(self, value: str | uuid.UUID | None) -> None:
        self._group.endpoint_id = checked_endpoint_id(value)

    @property
    def task_group_id(self) -> str:
        return self._group.task_group_id

    @property
    def duplicates_dropped(self) -> int:
        """Results dropped because their future had already resolved (a redelivered task)
        or had been cancelled."""
        return self._group.duplicates_dropped


def checked_endpoint_id(value: str | uuid.UUID | None) -> str | None:
    """An endpoint id as text (given as a ``uuid.UUID`` too), or None; refused if it cannot
    be one."""
    return None if value is None else safe_name_part(str(value), "endpoint_id")


def _call(work: Callable[[], None]) -> None:
    work()


def _settle(future: GroupFuture, value: Callable[[], Any]) -> bool:
    """Set ``future`` to what ``value()`` returns or raises; False if it was already done
    (cancelled or resolved by another thread meanwhile)."""
    try:
        try:
            outcome = value()
        except Exception as exc:  # noqa: BLE001 - a remote failure, or a value undecodable here
            future.set_exception(exc)
        else:
            future.set_result(outcome)
    except (concurrent.futures.InvalidStateError, asyncio.InvalidStateError):
        return False
    return True


def _raise(error: BaseException) -> Any:
    raise error
