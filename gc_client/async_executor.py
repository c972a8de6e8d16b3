"""AsyncExecutor: run functions on a gc-fabric endpoint from asyncio code.

The asyncio front end beside :class:`gc_client.executor.Executor`, with the same wire
behaviour and the same pure core (:mod:`gc_client.tasks`): one task group and one
durable result queue per executor; tasks published ``mandatory`` with publisher
confirms, each batch after a group manifest for the ledger; results decoded, turned
into values or exceptions, and acked after their future resolved. A duplicate result
(a task redelivered after an agent died) is dropped, so a future resolves exactly once.
The broker side is :class:`gc_core.broker_async.AsyncBrokerSession` (aio-pika).

Example:
    >>> async with AsyncExecutor(endpoint_id=ENDPOINT_ID, client=client) as ex:
    ...     future = await ex.submit(pow, 2, 10)
    ...     print(await future)
    1024
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any

from gc_client.client import Client
from gc_client.executor import RESULT_PREFETCH
from gc_client.tasks import make_manifest, make_task, new_id, not_accepted, oversize, result_value
from gc_core.broker import FLUSH_BATCH
from gc_core.broker_async import AsyncBrokerSession
from gc_core.errors import BrokerError, ProtocolError
from gc_core.protocol import Envelope, GroupManifest, TaskMessage, decode_result, encode_event, encode_task
from gc_core.serialize import get_serializer
from gc_core.topology import QueueDeclaration

__all__ = ["AsyncComputeFuture", "AsyncExecutor"]

logger = logging.getLogger(__name__)


class AsyncComputeFuture(asyncio.Future[Any]):
    """An asyncio future for one task; ``task_id`` names it in the ledger and on the wire."""

    def __init__(self, task_id: str, *, endpoint_id: str = "") -> None:
        super().__init__()
        self.task_id = task_id
        #: The endpoint the task was sent to: on a secured broker only its agent (or the
        #: registry) may send the result.
        self.endpoint_id = endpoint_id


class AsyncExecutor:
    """Run Python functions on an endpoint and await their results.

    Submissions made in one turn of the event loop are published together, in batches
    of at most ``batch_size`` tasks, each behind its group manifest; the tasks of a batch
    are published concurrently, so their confirms pipeline.

    Example:
        >>> async with AsyncExecutor(endpoint_id=ENDPOINT_ID) as ex:
        ...     futures = [await ex.submit(pow, 2, n) for n in range(3)]
        ...     async for future in ex.as_completed(futures):
        ...         print(future.task_id, await future)
    """

    def __init__(
        self,
        endpoint_id: str | None = None,
        *,
        client: Client | None = None,
        resource_specification: dict[str, Any] | None = None,
        serializer: str = "cloudpickle",
        batch_size: int = FLUSH_BATCH,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.endpoint_id = endpoint_id
        self.client = client or Client()
        self._owns_client = client is None
        self.task_group_id = new_id()
        self.resource_specification = resource_specification
        self.serializer = get_serializer(serializer)
        self.batch_size = batch_size
        self._user = self.client.settings.user
        self._futures: dict[str, AsyncComputeFuture] = {}
        self._outbox: list[tuple[TaskMessage, AsyncComputeFuture]] = []
        self._flush_scheduled = False
        self._publishing: set[asyncio.Task[None]] = set()
        self._function_ids: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._registering: dict[int, asyncio.Future[str]] = {}
        self._session: AsyncBrokerSession | None = None
        self._connect_lock = asyncio.Lock()
        self._shutdown = False
        #: Results dropped because their future had already resolved (redelivered tasks).
        self.duplicates_dropped = 0

    # -- submitting -----------------------------------------------------------------------

    async def submit(self, fn: Callable[..., Any], /, *args: Any,
                     **kwargs: Any) -> AsyncComputeFuture:
        """Run ``fn(*args, **kwargs)`` on the endpoint; await the returned future for its value.

        The function is registered once (in a worker thread: registration is an HTTP call).

        Raises:
            BrokerUnreachable: the first submission could not connect.
            RegistryError: the function could not be registered.
        """
        if self._shutdown:
            raise RuntimeError("cannot submit to an AsyncExecutor after shutdown")
        function_id = await self._function_id(fn)
        return await self.submit_to_registered_function(function_id, args, kwargs)

    async def submit_to_registered_function(self, function_id: str, args: Iterable[Any] = (),
                                            kwargs: dict[str, Any] | None = None
                                            ) -> AsyncComputeFuture:
        """Run an already registered function by id.

        A task over the client's ``max_message_size`` is not sent: its future fails at once.
        """
        if self._shutdown:
            raise RuntimeError("cannot submit to an AsyncExecutor after shutdown")
        if self.endpoint_id is None:
            raise ValueError("this AsyncExecutor has no endpoint_id; pass "
                             "AsyncExecutor(endpoint_id=...)")
        await self._connected()
        task = make_task(endpoint_id=self.endpoint_id, function_id=function_id, user=self._user,
                         task_group_id=self.task_group_id, serializer=self.serializer,
                         args=tuple(args), kwargs=dict(kwargs or {}),
                         resource_spec=self.resource_specification)
        future = AsyncComputeFuture(task.task_id, endpoint_id=task.endpoint_id)
        too_large = oversize(task, self.client.max_message_size)
        if too_large is not None:
            future.set_exception(too_large)
            return future
        self._futures[task.task_id] = future
        self._outbox.append((task, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return future

    async def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
                  timeout: float | None = None) -> list[Any]:
        """``[fn(*args) for args in zip(*iterables)]``, run remotely; values in order.

        Raises:
            TimeoutError: not every task finished within ``timeout`` seconds.
            TaskExecutionFailed: the first (in order) task that failed remotely.
        """
        futures = [await self.submit(fn, *args) for args in zip(*iterables)]
        if futures:
            _done, pending = await asyncio.wait(futures, timeout=timeout)
            if pending:
                raise TimeoutError(f"{len(pending)} of {len(futures)} tasks unfinished "
                                   f"after {timeout}s")
        return [future.result() for future in futures]

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

    # -- stopping -------------------------------------------------------------------------

    async def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally wait for all futures, or cancel the pending ones.

        A task whose future is cancelled before it was published is never published.
        The result queue is deleted once every future is done; otherwise the results of
        the unfinished tasks still reach the queue and the ledger (``Client.get_result``).
        """
        self._shutdown = True
        pending = [f for f in self._futures.values() if not f.done()]
        if cancel_futures:
            for future in pending:
                future.cancel()
        self._flush()
        if self._publishing:
            await asyncio.gather(*self._publishing, return_exceptions=True)
        pending = [f for f in pending if not f.done()]
        if wait and pending:
            await asyncio.wait(pending)
        session, self._session = self._session, None
        if session is not None:
            if all(f.done() for f in self._futures.values()):
                try:
                    await session.delete_queue(self._result_queue().name)
                except BrokerError as exc:
                    logger.warning("could not delete the result queue of task group %s: %s",
                                   self.task_group_id, exc)
            await session.close()
        if self._owns_client:
            self.client.close()

    async def __aenter__(self) -> AsyncExecutor:
        await self._connected()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            await self.shutdown(wait=False, cancel_futures=True)
        else:
            await self.shutdown(wait=True)

    # -- internals ------------------------------------------------------------------------

    def _result_queue(self) -> QueueDeclaration:
        return self.client.topology.queue("results", user=self._user,
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
                    name=f"gc-client:{self._user}:{self.task_group_id}", queues=[queue],
                    prefetch=RESULT_PREFETCH, login=self.client.broker_login,
                    max_message_size=self.client.max_message_size)
                await session.connect()
                try:
                    await session.consume(queue.name, self._on_result)
                except BaseException:
                    await session.close()
                    raise
                self._session = session
            return self._session

    async def _function_id(self, fn: Callable[..., Any]) -> str:
        """The function's id, registering it once: concurrent first submissions share one call,
        and later ones skip the worker thread."""
        try:
            known = self._function_ids.get(fn)
        except TypeError:  # not weak-referenceable: the Client's hash cache still helps
            known = None
        if known is not None:
            return known
        in_flight = self._registering.get(id(fn))
        if in_flight is None:
            in_flight = asyncio.ensure_future(asyncio.to_thread(self.client.register_function, fn))
            self._registering[id(fn)] = in_flight
            in_flight.add_done_callback(lambda done: self._remember(fn, done))
        return await asyncio.shield(in_flight)

    def _remember(self, fn: Callable[..., Any], done: asyncio.Future[str]) -> None:
        self._registering.pop(id(fn), None)
        if done.cancelled() or done.exception() is not None:
            return  # every waiter sees the error; a later submission tries again
        try:
            self._function_ids[fn] = done.result()
        except TypeError:
            pass

    def _flush(self) -> None:
        """Start publishing what was submitted since the last flush: per batch its manifest,
        then its tasks, each publish a task of its own so that their confirms pipeline."""
        self._flush_scheduled = False
        outbox, self._outbox = [entry for entry in self._outbox if not entry[1].cancelled()], []
        session = self._session
        if not outbox or session is None or self.endpoint_id is None:
            return
        for start in range(0, len(outbox), self.batch_size):
            batch = outbox[start:start + self.batch_size]
            manifest = make_manifest([task.task_id for task, _ in batch],
                                     task_group_id=self.task_group_id,
                                     endpoint_id=self.endpoint_id, user=self._user)
            self._spawn(self._publish_manifest(session, manifest))
            for task, future in batch:
                self._spawn(self._publish_task(session, task, future))

    def _spawn(self, publish: Coroutine[Any, Any, None]) -> None:
        job = asyncio.get_running_loop().create_task(publish)
        self._publishing.add(job)
        job.add_done_callback(self._publishing.discard)

    async def _publish_manifest(self, session: AsyncBrokerSession,
                                manifest: GroupManifest) -> None:
        topology = self.client.topology
        try:
            await session.publish(
                topology.exchange("events"),
                topology.routing_key("group_submitted", task_group_id=self.task_group_id),
                encode_event(manifest))
        except BrokerError as exc:  # the ledger still learns each task from its result
            logger.warning("manifest of task group %s not confirmed: %s", self.task_group_id, exc)

    async def _publish_task(self, session: AsyncBrokerSession, task: TaskMessage,
                            future: AsyncComputeFuture) -> None:
        topology = self.client.topology
        try:
            await session.publish(topology.exchange("tasks"),
                                  topology.routing_key("task", endpoint_id=task.endpoint_id),
                                  encode_task(task), mandatory=True)
        except BrokerError as exc:
            if not future.done():
                future.set_exception(not_accepted(f"task {task.task_id} was", task.endpoint_id,
                                                  exc))

    def _on_result(self, envelope: Envelope, sender: str) -> None:
        """Resolve the future this result belongs to, if broker user ``sender`` may send it;
        the session acks it afterwards."""
        try:
            result = decode_result(envelope)
        except ProtocolError as exc:
            logger.warning("dropped an undecodable result (%d bytes): %s", len(exc.raw), exc)
            return
        future = self._futures.get(result.task_id)
        if future is None:
            logger.warning("dropped a result for task %s, which task group %s did not submit",
                           result.task_id, self.task_group_id)
            return
        if self.client.refuses_result(result, sender, future.endpoint_id):
            return
        if future.done():
            self.duplicates_dropped += 1
            return
        try:
            future.set_result(result_value(result, self.serializer))
        except Exception as exc:  # a remote failure, or a value that cannot be decoded here
            future.set_exception(exc)
