"""AsyncExecutor: run functions on a gc-fabric endpoint from asyncio code.

The asyncio front end beside :class:`gc_client.executor.Executor`, sharing everything
but the I/O with it (:class:`gc_client.taskgroup.TaskGroup`): one task group and one
durable result queue per executor; tasks published ``mandatory`` with publisher
confirms, coalesced as the Executor's are (``gc_core.coalesce``: what is submitted while
a publish awaits its confirm shares the next message), with group manifests for the
ledger; results decoded, turned into values or exceptions, and acked after their future
resolved. A duplicate result (a task redelivered after an agent died) is dropped, so a
future resolves exactly once.
``await submit(...)`` returns once the broker has confirmed the task, so nothing
submitted is lost when the program ends. The broker side is
:class:`gc_core.broker_async.AsyncBrokerSession` (aio-pika).

Example:
    >>> async with AsyncExecutor(endpoint_id=ENDPOINT_ID, client=client) as ex:
    ...     future = await ex.submit(pow, 2, 10)
    ...     print(await future)
    1024
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from itertools import islice
from typing import Any

from gc_client.client import Client
from gc_client.executor import RESULT_PREFETCH, check_buffersize
from gc_client.taskgroup import (
    CONSUMER_CHECK,
    LEDGER_FOLLOW_UP,
    TaskGroup,
    TaskGroupFront,
    TaskGroupOptions,
)
from gc_client.tasks import Outgoing, task_routing_key, tasks_message
from gc_core.batches import encode_task_batch
from gc_core.broker import FLUSH_BATCH
from gc_core.broker_async import AsyncBrokerSession
from gc_core.broker_limits import Refusal
from gc_core.broker_publisher import ConfirmCallback
from gc_core.coalesce import Coalescer
from gc_core.errors import BrokerError, GCError
from gc_core.protocol import Envelope, TaskMessage
from gc_core.topology import QueueDeclaration

__all__ = ["AsyncComputeFuture", "AsyncExecutor"]

logger = logging.getLogger(__name__)


class AsyncComputeFuture(asyncio.Future[Any]):
    """An asyncio future for one task; ``task_id`` names it in the ledger and on the wire.

    ``cancel()`` also cancels the task at the endpoint, as ``ComputeFuture.cancel`` does.
    """

    def __init__(self, task_id: str, on_cancel: Callable[[list[str]], None] | None = None, *,
                 endpoint_id: str = "") -> None:
        super().__init__()
        self.task_id = task_id
        #: The endpoint the task was sent to: on a secured broker only its agent (or the
        #: registry) may send the result.
        self.endpoint_id = endpoint_id
        #: What the task printed (bounded by the endpoint's output_limit), once it finished.
        self.stdout = ""
        self.stderr = ""
        self._on_cancel = on_cancel

    def cancel(self, msg: Any | None = None) -> bool:
        """Cancel locally and at the endpoint."""
        if not super().cancel(msg):
            return False
        if self._on_cancel is not None:
            self._on_cancel([self.task_id])
        return True


class AsyncExecutor(TaskGroupFront[AsyncComputeFuture]):
    """Run Python functions on an endpoint and await their results.

    ``await submit(...)`` returns once the broker has the task. A lone submission goes at
    once, as a single-task message; submissions made while one waits for its confirm
    (``asyncio.gather``, ``map``) share the next message, at most ``batch_size`` tasks to
    one; one ``await submit`` after another waits for each confirm in turn.

    Example:
        >>> async with AsyncExecutor(endpoint_id=ENDPOINT_ID) as ex:
        ...     futures = [await ex.submit(pow, 2, n) for n in range(3)]
        ...     async for future in ex.as_completed(futures):
        ...         print(future.task_id, await future)
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
        on_behalf_of: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.client = client or Client()
        self._owns_client = client is None
        self._group: TaskGroup[AsyncComputeFuture] = TaskGroup(self.client, TaskGroupOptions.of(
            task_group_id=task_group_id, endpoint_id=endpoint_id, serializer=serializer,
            resource_specification=resource_specification,
            user_endpoint_config=user_endpoint_config, on_behalf_of=on_behalf_of),
            self._new_future)
        self.batch_size = batch_size
        #: Tasks submitted while one of ours waits for its confirm go together, in one message.
        self._tasks: Coalescer[TaskMessage] = Coalescer(
            self._publish_tasks, encode_task_batch, lambda task: len(task.payload),
            max_items=batch_size)
        self._publishing: set[asyncio.Task[None]] = set()
        self._registering: dict[int, asyncio.Future[str]] = {}
        self._session: AsyncBrokerSession | None = None
        #: Watches the group's queue and the ledger while connected (_watch).
        self._watcher: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self._shutdown = False

    # -- submitting -----------------------------------------------------------------------

    async def submit(self, fn: Callable[..., Any], /, *args: Any,
                     **kwargs: Any) -> AsyncComputeFuture:
        """Run ``fn(*args, **kwargs)`` on the endpoint; await the returned future for its value.

        Returns once the broker confirmed the task. The function is registered once (in
        a worker thread: registration is an HTTP call).

        Raises:
            BrokerUnreachable: the first submission could not connect.
            RegistryError: the function could not be registered.
        """
        self._refuse_after_shutdown()
        function_id = await self._function_id(fn)
        return await self.submit_to_registered_function(function_id, args, kwargs)

    async def submit_to_registered_function(self, function_id: str, args: Iterable[Any] = (),
                                            kwargs: dict[str, Any] | None = None
                                            ) -> AsyncComputeFuture:
        """Run an already registered function by id; returns once the broker confirmed it.

        A task the broker refuses, or one over the client's ``max_message_size`` (not
        sent), fails its future.
        """
        self._refuse_after_shutdown()
        await self._connected()
        task, future = self._group.new_task(function_id, args, kwargs)
        if task is not None:
            await self._sent(task, future)
        return future

    async def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
                  timeout: float | None = None, buffersize: int | None = None) -> list[Any]:
        """``[fn(*args) for args in zip(*iterables)]``, run remotely; values in order.

        ``buffersize`` keeps at most that many tasks in flight, reading the iterables
        lazily. On a failure or timeout the tasks not yet done are cancelled.

        Raises:
            TimeoutError: not every task finished within ``timeout`` seconds.
            TaskExecutionFailed: the first (in order) task that failed remotely.
        """
        check_buffersize(buffersize)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        calls = zip(*iterables)
        window: deque[AsyncComputeFuture] = deque()
        values: list[Any] = []
        try:
            while True:
                room = None if buffersize is None else buffersize - len(window)
                window.extend(await asyncio.gather(*(self.submit(fn, *args)
                                                     for args in islice(calls, room))))
                if not window:
                    return values
                left = None if deadline is None else max(deadline - loop.time(), 0)
                try:
                    values.append(await asyncio.wait_for(asyncio.shield(window[0]), left))
                except asyncio.TimeoutError:
                    raise TimeoutError(f"{len(window)} tasks unfinished after {timeout}s") from None
                window.popleft()
        finally:
            self._cancel(list(window))

    async def as_completed(self, futures: Iterable[AsyncComputeFuture], *,
                           timeout: float | None = None) -> AsyncIterator[AsyncComputeFuture]:
        """Yield each of ``futures`` as it finishes (resolved, failed or cancelled).

        Raises:
            TimeoutError: not every future finished within ``timeout`` seconds.
        """
        waiting = set(futures)
        finished: asyncio.Queue[AsyncComputeFuture] = asyncio.Queue()
        notify = finished.put_nowait
        for future in waiting:
            future.add_done_callback(notify)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            for left in range(len(waiting), 0, -1):
                if deadline is None:
                    yield await finished.get()
                    continue
                try:
                    future = await asyncio.wait_for(finished.get(), max(deadline - loop.time(), 0))
                except asyncio.TimeoutError:
                    raise TimeoutError(f"{left} of {len(waiting)} futures unfinished "
                                       f"after {timeout}s") from None
                yield future
        finally:
            for future in waiting:
                future.remove_done_callback(notify)

    # -- reattaching ----------------------------------------------------------------------

    async def reload_tasks(self) -> list[AsyncComputeFuture]:
        """Futures for every task of this task group, after the submitting process is gone.

        Finished tasks resolve at once from the ledger; the others resolve as their
        results arrive on the group's queue. Values are decoded only with this executor's
        serializer: build it with the one the tasks were sent with.
        """
        known = await asyncio.to_thread(self.client.registry.list_group_tasks,
                                        self.task_group_id)
        await self._connected()
        return self._group.adopt(known)

    # -- stopping -------------------------------------------------------------------------

    async def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally wait for all futures, or cancel the pending ones.

        Without ``wait`` the futures still resolve while the event loop runs; the
        connection closes once the last one has. Results of tasks unfinished when the
        loop ends stay in the group's queue and the ledger:
        ``AsyncExecutor(task_group_id=...).reload_tasks()`` picks them up.
        """
        self._shutdown = True
        pending = self._group.pending()
        if cancel_futures:
            self._cancel(pending)
        while self._publishing:  # a confirm may send the tasks queued behind it: wait again
            await asyncio.gather(*self._publishing, return_exceptions=True)
        pending = [f for f in pending if not f.done()]
        if wait and pending:
            await asyncio.wait(pending)
        if self._group.idle():
            await self._close()
        else:
            self._spawn(self._close_when_idle())

    async def __aenter__(self) -> AsyncExecutor:
        await self._connected()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            await self.shutdown(wait=False, cancel_futures=True)
        else:
            await self.shutdown(wait=True)

    # -- internals ------------------------------------------------------------------------

    def _refuse_after_shutdown(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot submit to an AsyncExecutor after shutdown")

    def _new_future(self, task_id: str, endpoint_id: str) -> AsyncComputeFuture:
        return AsyncComputeFuture(task_id, self._cancel_remotely, endpoint_id=endpoint_id)

    def _result_queue(self) -> QueueDeclaration:
        return self.client.topology.queue("results", user=self._group.user,
                                          task_group_id=self.task_group_id)

    async def _connected(self) -> AsyncBrokerSession:
        session = self._session
        if session is not None:
            return session
        async with self._connect_lock:
            if self._session is None:
                queue = self._result_queue()
                session = AsyncBrokerSession(
                    self.client.settings.broker_url, topology=self.client.topology,
                    name=f"gc-client:{self._group.user}:{self.task_group_id}", queues=[queue],
                    prefetch=RESULT_PREFETCH, login=self.client.broker_login,
                    max_message_size=self.client.max_message_size)
                await session.connect()
                self._group.deliver = asyncio.get_running_loop().call_soon_threadsafe
                self._group.join()  # before the first result can come
                try:
                    await session.consume(queue.name, self._group.on_result)
                except BaseException:
                    self._group.leave()
                    await session.close()
                    raise
                self._session = session
                self._watcher = asyncio.get_running_loop().create_task(
                    self._watch(session, queue.name))
            return self._session

    async def _function_id(self, fn: Callable[..., Any]) -> str:
        """The function's id from the client's cache, else registered in a worker thread:
        concurrent first submissions of one function share one registration."""
        known = self.client.registered_function_id(fn)
        if known is not None:
            return known
        in_flight = self._registering.get(id(fn))
        if in_flight is None:
            in_flight = asyncio.ensure_future(asyncio.to_thread(self.client.register_function, fn))
            self._registering[id(fn)] = in_flight
            in_flight.add_done_callback(lambda _done: self._registering.pop(id(fn), None))
        return await asyncio.shield(in_flight)

    async def _sent(self, task: TaskMessage, future: AsyncComputeFuture) -> None:
        """Hand ``task`` to the coalescer; return once the broker confirmed it."""
        loop = asyncio.get_running_loop()
        confirmed: asyncio.Future[None] = loop.create_future()

        def on_confirm(reason: str | None) -> None:
            self._group.confirmed(task.task_id, future, reason)
            if not confirmed.done():
                confirmed.set_result(None)

        self._tasks.add(task_routing_key(self.client.topology, task), task, on_confirm)
        await asyncio.shield(confirmed)

    async def _publish_manifest(self, session: AsyncBrokerSession, manifest: Outgoing) -> None:
        try:
            await _publish(session, manifest)
        except BrokerError as exc:  # the ledger waits for it a while, then takes the results
            logger.warning("manifest of task group %s not confirmed: %s", self.task_group_id, exc)

    def _publish_tasks(self, routing_key: str, tasks: Sequence[TaskMessage], envelope: Envelope,
                       on_confirm: ConfirmCallback) -> None:
        """The coalescer's publish (on the event loop): one task or a batch, confirmed in
        the background, then their manifest for the ledger."""
        session = self._session
        assert session is not None
        self._spawn(self._publish_confirmed(session, routing_key, envelope, on_confirm))
        self._spawn(self._publish_manifest(
            session, self._group.manifest(tasks)))

    async def _publish_confirmed(self, session: AsyncBrokerSession, routing_key: str,
                                 envelope: Envelope, on_confirm: ConfirmCallback) -> None:
        """Publish tasks, then tell the coalescer what the broker said."""
        try:
            await _publish(session, tasks_message(self.client.topology, routing_key, envelope))
        except BrokerError as exc:
            on_confirm(_reason(exc))
        else:
            on_confirm(None)

    async def _watch(self, session: AsyncBrokerSession, queue: str) -> None:
        """While connected: with tasks pending, count the consumers of the group's queue
        now and then (another process's take results of ours), and ask the ledger about
        the pending tasks whose results may not come on the queue."""
        loop = asyncio.get_running_loop()
        next_count = 0.0
        while self._session is session and not self.client.registry.closed:
            await asyncio.sleep(LEDGER_FOLLOW_UP)
            if self._group.waiting() and loop.time() >= next_count:
                next_count = loop.time() + CONSUMER_CHECK
                try:
                    consumers = await session.consumer_count(queue)
                except BrokerError as exc:  # the queue is gone: the results are the ledger's
                    logger.info("could not count the consumers of %s: %s", queue, exc)
                else:
                    if consumers is not None:
                        self._group.note_consumers(consumers)
            for task_ids in self._group.followed_pending():
                try:
                    known = await asyncio.to_thread(self.client.registry.get_tasks, task_ids)
                except GCError as exc:  # the registry is down: the queue may still deliver
                    logger.info("could not ask the ledger about pending tasks: %s", exc)
                else:
                    self._group.update_from_ledger(known)

    def _cancel(self, futures: list[AsyncComputeFuture]) -> None:
        """Cancel these futures locally one by one, then tell the endpoint in one command."""
        cancelled = [f.task_id for f in futures if asyncio.Future.cancel(f)]
        if cancelled:
            self._cancel_remotely(cancelled)

    def _cancel_remotely(self, task_ids: list[str]) -> None:
        session, endpoint_id = self._session, self.endpoint_id
        if session is not None and endpoint_id is not None:
            self._spawn(self._publish_cancel(session, self._group.cancel_command(task_ids,
                                                                                 endpoint_id)))

    @staticmethod
    async def _publish_cancel(session: AsyncBrokerSession, command: Outgoing) -> None:
        try:
            await _publish(session, command)
        except BrokerError as exc:
            logger.warning("cancel command not confirmed: %s", exc)

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _close_when_idle(self) -> None:
        try:
            pending = self._group.pending()
            if pending:
                await asyncio.wait(pending)
        finally:
            unfinished = len(self._group.pending())
            if unfinished:
                logger.warning(self._group.reattach_hint(unfinished, "AsyncExecutor"))
            await self._close()

    async def _close(self) -> None:
        session, self._session = self._session, None
        if self._watcher is not None:
            self._watcher.cancel()
        if session is not None:
            if not self._group.leave() and self._group.idle():
                try:
                    await session.delete_queue(self._result_queue().name)
                except BrokerError as exc:
                    logger.warning("could not delete the result queue of task group %s: %s",
                                   self.task_group_id, exc)
            await session.close()
        if self._owns_client:
            self.client.close()


def _reason(exc: BrokerError) -> str:
    """Why the broker did not take a publish, kept a :class:`Refusal` when it is one (then
    the coalescer sends a batch's tasks again one by one, and only the one at fault fails)."""
    first = exc.args[0] if exc.args else None
    return first if isinstance(first, Refusal) else str(exc)


async def _publish(session: AsyncBrokerSession, message: Outgoing) -> None:
    await session.publish(message.exchange, message.routing_key, message.envelope,
                          mandatory=message.mandatory)
