"""Executor: a ``concurrent.futures.Executor`` whose tasks run on a gc-fabric endpoint.

Each Executor owns one task group and one durable result queue
(``gc.results.<user>.<group>``). Submissions are queued and published in
batches with publisher confirms; results resolve futures as they arrive, and a
duplicate result (a task redelivered after an agent died) is dropped, so a
future resolves exactly once.

Nothing submitted is lost when the program stops early: at ``shutdown``, when the
Executor is garbage-collected and at interpreter exit, every task is first confirmed by
the broker (up to ``confirm_timeout``); any it did not confirm is named on stderr, and
so is how to reattach to tasks that were still running.
"""

from __future__ import annotations

import atexit
import logging
import operator
import os
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor as _BaseExecutor
from concurrent.futures import Future
from concurrent.futures._base import PENDING
from functools import partial
from itertools import islice
from typing import Any

from tqdm.auto import tqdm

from gc_client.client import Client
from gc_client.lean_condition import LeanCondition
from gc_client.taskgroup import (
    CONSUMER_CHECK,
    LEDGER_FOLLOW_UP,
    TaskGroup,
    TaskGroupFront,
    TaskGroupOptions,
)
from gc_client.tasks import Outgoing, task_routing_key, tasks_message
from gc_core.batches import encode_task_batch
from gc_core.broker import FLUSH_BATCH, BrokerSession
from gc_core.broker_consumers import Delivery
from gc_core.broker_publisher import ConfirmCallback
from gc_core.coalesce import Coalescer
from gc_core.errors import GCError
from gc_core.forks import current_pid
from gc_core.protocol import Envelope, TaskMessage

__all__ = ["ComputeFuture", "Executor"]

logger = logging.getLogger(__name__)

#: Results the executor may hold unacked; bounds memory while futures resolve.
RESULT_PREFETCH = 1000
#: Seconds ``shutdown`` and interpreter exit wait for the broker to confirm the tasks.
CONFIRM_TIMEOUT = 60.0


class ComputeFuture(Future[Any]):
    """A future for one task; ``task_id`` names it in the ledger and on the wire.

    ``cancel()`` also cancels the task at the endpoint: a queued task never runs, a
    running one has its worker stopped (processes engine). It returns True whenever the
    future was still pending; if the cancel races the task's completion, the ledger
    records what really happened.
    """

    def __init__(self, task_id: str, on_cancel: Callable[[list[str]], None] | None = None, *,
                 endpoint_id: str = "") -> None:
        # what Future.__init__ sets, but a LeanCondition for its threading.Condition (see
        # lean_condition), not built and then dropped; a test checks that nothing is missing
        self._condition = LeanCondition()
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[Future[Any]], object]] = []
        self.task_id = task_id
        #: The endpoint the task was sent to: on a secured broker only its agent (or the
        #: registry) may send the result.
        self.endpoint_id = endpoint_id
        #: What the task printed (bounded by the endpoint's output_limit), once it finished.
        self.stdout = ""
        self.stderr = ""
        self._on_cancel = on_cancel
        #: The process whose Executor resolves it: a forked child's copy is never resolved.
        self._pid = current_pid()

    def result(self, timeout: float | None = None) -> Any:
        self._check_waitable()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._check_waitable()
        return super().exception(timeout)

    def _check_waitable(self) -> None:
        """Refuse to wait in a process forked from the one whose Executor made this future:
        its result goes to that one, and the child would wait for ever."""
        if self._pid != current_pid() and not self.done():
            raise RuntimeError(
                f"task {self.task_id} was submitted by process {self._pid}, which this process "
                "was forked from: its result goes to that process, never here. Wait for it "
                "there, or in this process ask the ledger (Client().get_result(task_id)) or "
                "reattach to its task group (Executor(endpoint_id=..., task_group_id=...)"
                ".reload_tasks())")

    def cancel(self) -> bool:
        """Cancel locally and at the endpoint."""
        if not super().cancel():
            return False
        if self._on_cancel is not None:
            self._on_cancel([self.task_id])
        return True


class Executor(TaskGroupFront[ComputeFuture], _BaseExecutor):
    """Run Python functions on an endpoint and get futures back.

    Example:
        >>> with Executor(endpoint_id=ENDPOINT_ID) as ex:
        ...     print(ex.submit(pow, 2, 10).result())
        1024
    """

    def __init__(
        self,
        endpoint_id: str | uuid.UUID | None = None,
        *,
        client: Client | None = None,
        task_group_id: str | uuid.UUID | None = None,
        resource_specification: dict[str, Any] | None = None,
        user_endpoint_config: dict[str, Any] | None = None,
        serializer: str = "cloudpickle",
        batch_size: int = FLUSH_BATCH,
        linger: float = 0.0,
        on_behalf_of: str | None = None,
        confirm_timeout: float = CONFIRM_TIMEOUT,
    ) -> None:
        if batch_size < 1 or linger < 0 or confirm_timeout < 0:
            raise ValueError("batch_size must be at least 1, and linger and confirm_timeout "
                             "(seconds) at least 0")
        self.client = client or Client()
        self._wire = _Wire(TaskGroupOptions.of(
            task_group_id=task_group_id, endpoint_id=endpoint_id, serializer=serializer,
            resource_specification=resource_specification,
            user_endpoint_config=user_endpoint_config, on_behalf_of=on_behalf_of),
            self.client, owns_client=client is None, batch_size=batch_size, linger=linger,
            confirm_timeout=confirm_timeout)
        self._group = self._wire.group
        self._shutdown = False
        # An Executor nobody holds any more finishes like one shut down without waiting:
        # its tasks are confirmed, and its session lives on until the last result is in
        # (or the interpreter exits).
        weakref.finalize(self, self._wire.abandoned).atexit = False

    # -- concurrent.futures API ----------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> ComputeFuture:
        """Run ``fn(*args, **kwargs)`` on the endpoint; the function is registered once."""
        self._refuse_after_shutdown()
        function_id = self.client.register_function(fn)
        return self.submit_to_registered_function(function_id, args, kwargs)

    def submit_to_registered_function(self, function_id: str, args: Iterable[Any] = (),
                                      kwargs: dict[str, Any] | None = None) -> ComputeFuture:
        """Run an already registered function by id.

        A task over the client's ``max_message_size`` is not sent: its future fails at once.
        """
        self._refuse_after_shutdown()
        task, future = self._group.new_task(function_id, args, kwargs)
        if task is not None:
            self._wire.send(task, future)
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None,
            progress: bool = False) -> Iterator[Any]:
        """Like ``concurrent.futures.Executor.map``; ``progress=True`` shows a tqdm bar.

        ``buffersize`` (as in Python 3.14) keeps at most that many tasks submitted ahead
        of the values yielded, reading the iterables lazily: a sweep over a million
        arguments (or an endless generator) in bounded memory. Without it every task is
        submitted at once. Closing the iterator early cancels the tasks not yet yielded.
        """
        del chunksize  # every call is its own task; batching happens on the wire
        check_buffersize(buffersize)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = tqdm(total=_total(iterables), desc=getattr(fn, "__name__", "tasks"), unit="task",
                   disable=not progress)
        calls = zip(*iterables)
        submit = partial(self._submit_counted, fn, bar)
        futures = deque(submit(*args) for args in islice(calls, buffersize))
        if buffersize is None and bar.total is None:
            bar.total = len(futures)
            bar.refresh()
        more = None if buffersize is None else (submit(*args) for args in calls)
        return self._results_in_order(futures, more, deadline, bar)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally wait for all futures, or cancel the pending ones.

        Either way every submitted task is confirmed by the broker first (up to
        ``confirm_timeout``). Without ``wait``, futures still resolve as long as the
        program runs; results of tasks that have not finished when it exits stay in the
        group's queue and in the ledger: ``Executor(task_group_id=...).reload_tasks()``
        picks them up later.
        """
        self._shutdown = True
        if self._wire.forked_away:
            return  # a forked child's copy: its tasks are the parent's to wait for
        pending = self._group.pending()
        if cancel_futures:
            self._cancel(pending)
        if wait:
            for future in pending:
                if not future.cancelled():
                    future.exception()
        self._wire.confirm_all()
        self._wire.close_when_idle()

    # -- reattaching ---------------------------------------------------------------------

    def reload_tasks(self) -> list[ComputeFuture]:
        """Futures for every task of this task group, after the submitting process is gone.

        Finished tasks resolve at once from the ledger; the others resolve as their
        results arrive on the group's queue. Values are decoded only with this Executor's
        serializer: build it with the one the tasks were sent with.
        """
        known = self.client.registry.list_group_tasks(self.task_group_id)
        self._wire.connected()
        return self._group.adopt(known)

    # -- internals -----------------------------------------------------------------------

    def _refuse_after_shutdown(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot submit to an Executor after shutdown")

    def _submit_counted(self, fn: Callable[..., Any], bar: tqdm[Any],
                        *args: Any) -> ComputeFuture:
        future = self.submit(fn, *args)
        future.add_done_callback(lambda _done: bar.update(1))
        return future

    def _results_in_order(self, futures: deque[ComputeFuture], more: Iterator[ComputeFuture] | None,
                          deadline: float | None, bar: tqdm[Any]) -> Iterator[Any]:
        """Yield each value in submission order, topping ``futures`` up from ``more`` and
        keeping no future whose value it yielded."""
        try:
            while futures:
                following = next(more, None) if more is not None else None
                if following is not None:
                    futures.append(following)
                yield _value_or_cancel(futures.popleft(), deadline)
        finally:
            bar.close()
            self._cancel(list(futures))

    def _cancel(self, futures: list[ComputeFuture]) -> None:
        """Cancel these futures locally one by one, then tell the endpoint in one command."""
        cancelled = [f.task_id for f in futures if Future.cancel(f)]
        if cancelled:
            self._wire.cancel(cancelled)


def check_buffersize(buffersize: int | None) -> None:
    """``map``'s ``buffersize``: None or a positive integer, as Python 3.14 checks it."""
    if buffersize is None:
        return
    if not isinstance(buffersize, int):
        raise TypeError(f"buffersize must be an integer or None, got {buffersize!r}")
    if buffersize < 1:
        raise ValueError(f"buffersize must be at least 1, got {buffersize}")


def _value_or_cancel(future: ComputeFuture, deadline: float | None) -> Any:
    """The future's value by ``deadline``; a future that times out is cancelled with the
    rest (the caller holds no other reference to it)."""
    try:
        return future.result(None if deadline is None else deadline - time.monotonic())
    except TimeoutError:
        future.cancel()
        raise


def _total(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """How many calls ``zip(*iterables)`` makes, if the iterables tell (for the bar)."""
    hints = [operator.length_hint(it, -1) for it in iterables]
    return None if not hints or min(hints) < 0 else min(hints)


class _Wire:
    """An Executor's broker side: its session and what runs on the session's IO thread.

    It holds no reference to its Executor, so an Executor its caller dropped can be
    collected while its tasks are still finishing; the wire closes itself once they are.
    """

    def __init__(self, options: TaskGroupOptions, client: Client, *, owns_client: bool,
                 batch_size: int, linger: float, confirm_timeout: float) -> None:
        self.group: TaskGroup[ComputeFuture] = TaskGroup(client, options, self._new_future)
        self._group = self.group
        self._client = client
        self._owns_client = owns_client
        self._batch_size = batch_size
        self._linger = linger
        self._confirm_timeout = confirm_timeout
        self._session: BrokerSession | None = None
        #: Tasks submitted while one of ours waits for its confirm go together, in one message.
        self._tasks: Coalescer[TaskMessage] = Coalescer(
            self._publish_tasks, encode_task_batch, lambda task: len(task.payload),
            max_items=batch_size)
        self._lock = threading.Lock()
        self._closing = False
        self._closed = False
        #: Bound once: every future holds it, and a method bound anew is an object a future.
        self._cancel_for_future = self.cancel

    def connected(self) -> BrokerSession:
        """The session, connected and consuming the group's result queue."""
        session = self._session
        if session is not None and not self._closed:
            if session.forked_away:
                raise RuntimeError(_unusable_in_child(session))
            return session
        with self._lock:
            if self._closed:
                raise RuntimeError("this Executor's connection is closed")
            if self._session is None:
                queue = self._result_queue()
                session = self._client.broker_session(
                    f"gc-client:{self._group.user}:{self._group.task_group_id}", queues=[queue],
                    prefetch=RESULT_PREFETCH, linger=self._linger, batch_size=self._batch_size)
                self._group.join()  # before the first result can come
                try:
                    session.consume(queue.name, self._on_result)
                    session.start()
                except BaseException:
                    self._group.leave()
                    raise
                self._session = session
                _OPEN_WIRES.add(self)
                threading.Thread(target=self._watch, args=(session, queue.name),
                                 name="gc-client-watch", daemon=True).start()
            return self._session

    @property
    def forked_away(self) -> bool:
        """Whether this is a forked child's copy of a wire its parent connected."""
        return self._session is not None and self._session.forked_away

    def send(self, task: TaskMessage, future: ComputeFuture) -> None:
        """Publish ``task``, alone or with those submitted close to it (_publish_tasks)."""
        self.connected()
        self._tasks.add(task_routing_key(self._client.topology, task), task,
                        partial(self._group.confirmed, task.task_id, future))

    def _watch(self, session: BrokerSession, queue: str) -> None:
        """Until the wire closes (on a thread of its own): with tasks pending, count the
        consumers of the group's queue now and then (another process's take results of
        ours), and ask the ledger about the pending tasks whose results may not come."""
        next_count = 0.0
        while not (self._closed or self._client.registry.closed):
            time.sleep(LEDGER_FOLLOW_UP)
            if self._group.waiting() and time.monotonic() >= next_count:
                next_count = time.monotonic() + CONSUMER_CHECK
                counts = session.counts(queue, CONSUMER_CHECK)
                if counts is not None:
                    self._group.note_consumers(counts.consumers)
            for task_ids in self._group.followed_pending():
                try:
                    self._group.update_from_ledger(self._client.registry.get_tasks(task_ids))
                except GCError as exc:  # the registry is down: the queue may still deliver
                    logger.info("could not ask the ledger about pending tasks: %s", exc)

    def cancel(self, task_ids: list[str]) -> None:
        """Send the endpoint a cancel command for these tasks of ours."""
        session, endpoint_id = self._session, self._group.endpoint_id
        if session is not None and endpoint_id is not None:
            self._publish(session, self._group.cancel_command(task_ids, endpoint_id))

    def confirm_all(self) -> None:
        """Wait (up to ``confirm_timeout``) until the broker confirmed every task; name
        on stderr those it did not."""
        session = self._session
        if session is None or session.on_io_thread or session.forked_away:
            return  # collected on the IO thread, it cannot wait on itself; forked, nothing's here
        deadline = time.monotonic() + self._confirm_timeout
        # Tasks waiting in the coalescer are not the session's yet: wait for both.
        while not (session.wait_settled(max(0.0, deadline - time.monotonic()))
                   and self._tasks.idle()) and time.monotonic() < deadline:
            time.sleep(0.005)
        unconfirmed = self._group.unconfirmed()
        if unconfirmed:
            why = "" if session.blocked is None else (
                f" (it takes no messages: {session.blocked}, a memory or disk alarm its "
                "operator must clear)")
            _tell(f"the broker did not confirm {len(unconfirmed)} tasks of task group "
                  f"{self._group.task_group_id!r} within {self._confirm_timeout:g}s{why}; they "
                  f"may never run: {' '.join(sorted(unconfirmed))}")

    def close_when_idle(self, *, in_background: bool = False) -> None:
        """Close now (``in_background``: on a thread of its own) if every future is done,
        else once the last one is."""
        self._closing = True
        if self._group.idle():
            self._close_on(in_background)

    def abandoned(self) -> None:
        """Its Executor was collected: confirm every task, and close once all are done."""
        self.confirm_all()
        self.close_when_idle(in_background=True)

    def at_exit(self) -> None:
        """The interpreter is exiting: confirm every task, say how to reattach to those
        still running, and close."""
        self.confirm_all()
        pending = len(self._group.pending())
        if pending:
            _tell(self._group.reattach_hint(pending, "Executor"))
        self._close()

    # -- internals -----------------------------------------------------------------------

    def _result_queue(self) -> Any:
        return self._client.topology.queue("results", user=self._group.user,
                                           task_group_id=self._group.task_group_id)

    @staticmethod
    def _publish(session: BrokerSession, message: Outgoing,
                 on_confirm: Callable[[str | None], None] | None = None) -> None:
        session.publish(message.exchange, message.routing_key, message.envelope,
                        mandatory=message.mandatory, on_confirm=on_confirm)

    def _publish_tasks(self, routing_key: str, tasks: Sequence[TaskMessage], envelope: Envelope,
                       on_confirm: ConfirmCallback) -> None:
        """Publish one task or a batch of them (the coalescer's publish), then their manifest
        for the ledger: after the tasks, so that they do not queue behind its write to the
        ledger (which copes with either order)."""
        assert self._session is not None
        self._publish(self._session, tasks_message(self._client.topology, routing_key, envelope),
                      on_confirm=on_confirm)
        self._publish(self._session, self._group.manifest(tasks))

    def _on_result(self, delivery: Delivery) -> None:
        """IO thread: resolve the future this result belongs to, then ack it."""
        assert self._session is not None
        self._group.on_result(delivery.envelope, delivery.user_id)
        self._session.ack_in_order(delivery)
        if self._closing and self._group.idle():
            self._close_on(in_background=True)  # closing waits for this IO thread to settle
        # A caller blocked in result() needs the GIL, which this thread would keep through
        # pika's bookkeeping until it next waits on its socket: ~0.1 ms of a lone call.
        time.sleep(0)

    def _new_future(self, task_id: str, endpoint_id: str) -> ComputeFuture:
        return ComputeFuture(task_id, self._cancel_for_future, endpoint_id=endpoint_id)

    def _close_on(self, in_background: bool) -> None:
        if in_background:
            threading.Thread(target=self._close, name="gc-client-close", daemon=True).start()
        else:
            self._close()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Kept until closed: a result may still arrive and be acked meanwhile.
            session = self._session
        _OPEN_WIRES.discard(self)
        if session is not None and not session.forked_away:
            session.wait_settled(self._confirm_timeout)
            if not self._group.leave() and self._group.idle():
                session.delete_queue(self._result_queue().name)
                session.wait_settled(5.0)
            session.close()
        if self._owns_client:
            self._client.close()


def _tell(message: str) -> None:
    """Say something on stderr that must be seen even where logging is not configured."""
    print(f"gc-fabric: {message}", file=sys.stderr, flush=True)


#: Wires with a session open; at interpreter exit each confirms its tasks and closes.
_OPEN_WIRES: set[_Wire] = set()
# A forked child's copies are its parent's to confirm and close, not the child's.
os.register_at_fork(after_in_child=_OPEN_WIRES.clear)


def _unusable_in_child(session: BrokerSession) -> str:
    """Why an Executor cannot be used in a process forked from the one it connected in."""
    return (f"this Executor's connection belongs to process {session.started_in}, which this "
            "process was forked from: a forked child cannot send through it, and its results "
            "would never come here. Make an Executor in the child (with multiprocessing: "
            "inside the function the pool runs), or start child processes with the 'spawn' "
            "method")


@atexit.register
def _close_open_wires() -> None:
    for wire in list(_OPEN_WIRES):
        wire.at_exit()
