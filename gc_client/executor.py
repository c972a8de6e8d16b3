"""Executor: a ``concurrent.futures.Executor`` whose tasks run on a gc-fabric endpoint.

Each Executor owns one task group and one durable result queue
(``gc.results.<user>.<group>``). Submissions are queued and published in
batches with publisher confirms; results resolve futures as they arrive, and a
duplicate result (a task redelivered after an agent died) is dropped, so a
future resolves exactly once.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Executor as _BaseExecutor
from concurrent.futures import Future, InvalidStateError
from functools import partial
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm

from gc_client.client import Client
from gc_client.tasks import (
    make_manifest,
    make_task,
    new_id,
    not_accepted,
    oversize,
    result_value,
    task_out_value,
)
from gc_core.broker import FLUSH_BATCH, BrokerSession, Delivery
from gc_core.errors import ProtocolError
from gc_core.protocol import (
    CancelCommand,
    ResultMessage,
    decode_result,
    encode_event,
    encode_task,
)
from gc_core.serialize import get_serializer
from gc_core.topology import safe_name_part

__all__ = ["ComputeFuture", "Executor"]

logger = logging.getLogger(__name__)

#: Results the executor may hold unacked; bounds memory while futures resolve.
RESULT_PREFETCH = 1000


class ComputeFuture(Future[Any]):
    """A future for one task; ``task_id`` names it in the ledger and on the wire.

    ``cancel()`` also cancels the task at the endpoint: a queued task never runs, a
    running one has its worker stopped (processes engine). It returns True whenever the
    future was still pending; if the cancel races the task's completion, the ledger
    records what really happened.
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

    def cancel(self) -> bool:
        """Cancel locally and at the endpoint."""
        if not super().cancel():
            return False
        if self._on_cancel is not None:
            self._on_cancel([self.task_id])
        return True


class Executor(_BaseExecutor):
    """Run Python functions on an endpoint and get futures back.

    Example:
        >>> with Executor(endpoint_id=ENDPOINT_ID) as ex:
        ...     print(ex.submit(pow, 2, 10).result())
        1024
    """

    def __init__(
        self,
        endpoint_id: str | None = None,
        *,
        client: Client | None = None,
        task_group_id: str | None = None,
        resource_specification: dict[str, Any] | None = None,
        user_endpoint_config: dict[str, Any] | None = None,
        serializer: str = "cloudpickle",
        batch_size: int = FLUSH_BATCH,
        linger: float = 0.0,
        on_behalf_of: str | None = None,
    ) -> None:
        if batch_size < 1 or linger < 0:
            raise ValueError("batch_size must be at least 1 and linger (seconds) at least 0")
        self.endpoint_id = endpoint_id
        self.client = client or Client()
        self._owns_client = client is None
        self.task_group_id = safe_name_part(task_group_id or new_id(), "task_group_id")
        self.resource_specification = resource_specification
        self.user_endpoint_config = user_endpoint_config
        self.serializer = get_serializer(serializer)
        self.batch_size = batch_size
        self.linger = linger
        self._user = self.client.settings.user
        #: The end user a service account submits for (default: the client's).
        self.on_behalf_of = self.client.on_behalf_of if on_behalf_of is None else on_behalf_of
        self._futures: dict[str, ComputeFuture] = {}
        #: Results for tasks this Executor does not know yet (see reload_tasks), with the
        #: broker user that sent each.
        self._unclaimed: dict[str, list[tuple[ResultMessage, str]]] = {}
        self._manifest_ids: list[str] = []
        self._session: BrokerSession | None = None
        self._lock = threading.Lock()
        self._shutdown = False
        #: Results dropped because their future had already resolved (a redelivered task)
        #: or had been cancelled.
        self.duplicates_dropped = 0

    # -- concurrent.futures API ----------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> ComputeFuture:
        """Run ``fn(*args, **kwargs)`` on the endpoint; the function is registered once."""
        function_id = self.client.register_function(fn)
        return self.submit_to_registered_function(function_id, args, kwargs)

    def submit_to_registered_function(self, function_id: str, args: Iterable[Any] = (),
                                      kwargs: dict[str, Any] | None = None) -> ComputeFuture:
        """Run an already registered function by id.

        A task over the client's ``max_message_size`` is not sent: its future fails at once.
        """
        if self._shutdown:
            raise RuntimeError("cannot submit to an Executor after shutdown")
        if self.endpoint_id is None:
            raise ValueError("this Executor has no endpoint_id; pass Executor(endpoint_id=...)")
        session = self._connected()
        task = make_task(endpoint_id=self.endpoint_id, function_id=function_id, user=self._user,
                         task_group_id=self.task_group_id, serializer=self.serializer,
                         args=tuple(args), kwargs=dict(kwargs or {}),
                         resource_spec=self.resource_specification,
                         identity=self.client.settings.identity, on_behalf_of=self.on_behalf_of,
                         user_endpoint_config=self.user_endpoint_config)
        future = ComputeFuture(task.task_id, self._cancel_remotely, endpoint_id=self.endpoint_id)
        too_large = oversize(task, self.client.max_message_size)
        if too_large is not None:
            future.set_exception(too_large)
            return future
        with self._lock:
            self._futures[task.task_id] = future
            self._manifest_ids.append(task.task_id)
            first_of_batch = len(self._manifest_ids) == 1
        topology = self.client.topology
        session.publish(topology.exchange("tasks"),
                        topology.routing_key("task", endpoint_id=self.endpoint_id),
                        encode_task(task), mandatory=True,
                        on_confirm=lambda reason: self._on_task_confirm(future, reason))
        if first_of_batch:
            # After the batch's first task, not before: the ledger copes with either order,
            # and the task should not queue behind the manifest's write to the ledger.
            session.call_soon(self._publish_manifest)
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, progress: bool = False) -> Iterator[Any]:
        """Like ``concurrent.futures.Executor.map``; ``progress=True`` shows a tqdm bar."""
        del chunksize  # every call is its own task; batching happens on the wire
        futures = [self.submit(fn, *args) for args in zip(*iterables)]
        bar = tqdm(total=len(futures), desc=getattr(fn, "__name__", "tasks"), unit="task",
                   disable=not progress)
        for future in futures:
            future.add_done_callback(lambda _f: bar.update(1))
        return self._results_in_order(futures, timeout, bar)

    @staticmethod
    def _results_in_order(futures: list[ComputeFuture], timeout: float | None,
                          bar: tqdm[Any]) -> Iterator[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for future in futures:
                yield future.result(None if deadline is None else deadline - time.monotonic())
        finally:
            bar.close()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally wait for all futures, or cancel the pending ones.

        Results of tasks still pending when this returns stay in the group's queue and in
        the ledger: ``Executor(task_group_id=...).reload_tasks()`` picks them up later.
        """
        self._shutdown = True
        with self._lock:
            pending = [f for f in self._futures.values() if not f.done()]
        if cancel_futures:
            # Cancel locally one by one, then tell the endpoint in one command.
            cancelled = [f.task_id for f in pending if Future.cancel(f)]
            if cancelled:
                self._cancel_remotely(cancelled)
        if wait:
            for future in pending:
                if not future.cancelled():
                    future.exception()
        session = self._session
        if session is not None:
            session.wait_settled(10.0)
            with self._lock:
                all_done = all(f.done() for f in self._futures.values())
            if all_done and not self._unclaimed:
                session.delete_queue(self._result_queue().name)
                session.wait_settled(5.0)
            session.close()
            self._session = None
        if self._owns_client:
            self.client.close()

    # -- reattaching ---------------------------------------------------------------------

    def reload_tasks(self) -> list[ComputeFuture]:
        """Futures for every task of this task group, after the submitting process is gone.

        Finished tasks resolve at once from the ledger; the others resolve as their
        results arrive on the group's queue. Values are decoded only with this Executor's
        serializer: build it with the one the tasks were sent with.
        """
        known = self.client.registry.list_group_tasks(self.task_group_id)
        with self._lock:
            futures = [self._futures.setdefault(t.task_id, ComputeFuture(
                t.task_id, self._cancel_remotely, endpoint_id=t.endpoint_id)) for t in known]
        for task in known:
            if task.status not in ("waiting", "unknown"):
                self._resolve_from(task.task_id, partial(task_out_value, task, self.serializer),
                                   task.stdout, task.stderr)
        self._connected()
        with self._lock:
            claimed = [(self._futures[task_id], self._unclaimed.pop(task_id))
                       for task_id in list(self._unclaimed) if task_id in self._futures]
        for future, results in claimed:
            for result, sender in results:
                self._accept(future, result, sender)
        return futures

    # -- internals -----------------------------------------------------------------------

    def _result_queue(self) -> Any:
        return self.client.topology.queue("results", user=self._user,
                                          task_group_id=self.task_group_id)

    def _connected(self) -> BrokerSession:
        session = self._session
        if session is not None:
            return session
        with self._lock:
            if self._session is None:
                queue = self._result_queue()
                session = self.client.broker_session(
                    f"gc-client:{self._user}:{self.task_group_id}", queues=[queue],
                    prefetch=RESULT_PREFETCH, linger=self.linger, batch_size=self.batch_size)
                session.consume(queue.name, self._on_result)
                session.start()
                self._session = session
            return self._session

    def _publish_manifest(self) -> None:
        """Runs on the IO thread ahead of a batch's tasks: tell the ledger their ids."""
        with self._lock:
            task_ids, self._manifest_ids = self._manifest_ids, []
        if not task_ids or self._session is None or self.endpoint_id is None:
            return
        topology = self.client.topology
        manifest = make_manifest(task_ids, task_group_id=self.task_group_id,
                                 endpoint_id=self.endpoint_id, user=self._user)
        self._session.publish(
            topology.exchange("events"),
            topology.routing_key("group_submitted", task_group_id=self.task_group_id),
            encode_event(manifest))

    def _cancel_remotely(self, task_ids: list[str]) -> None:
        """Send the endpoint a cancel command for these tasks of ours."""
        session = self._session
        if session is None or self.endpoint_id is None:
            return
        topology = self.client.topology
        command = CancelCommand(task_ids=task_ids, user=self._user, sent=time.time())
        session.publish(topology.exchange("commands"),
                        topology.routing_key("command", endpoint_id=self.endpoint_id),
                        encode_event(command))

    def _on_task_confirm(self, future: ComputeFuture, reason: str | None) -> None:
        if reason is None:
            return
        with self._lock:
            self._futures.pop(future.task_id, None)
        if not future.done():
            future.set_exception(not_accepted(f"task {future.task_id} was",
                                              str(self.endpoint_id), reason))

    def _on_result(self, delivery: Delivery) -> None:
        """IO thread: resolve the future this result belongs to, then ack it."""
        assert self._session is not None
        try:
            result = decode_result(delivery.envelope)
        except ProtocolError as exc:
            logger.warning("dropped an undecodable result (%d bytes): %s", len(exc.raw), exc)
            self._session.ack_in_order(delivery)
            return
        with self._lock:
            future = self._futures.get(result.task_id)
            if future is None:
                self._unclaimed.setdefault(result.task_id, []).append((result, delivery.user_id))
        if future is not None:
            self._accept(future, result, delivery.user_id)
        self._session.ack_in_order(delivery)

    def _accept(self, future: ComputeFuture, result: ResultMessage, sender: str) -> None:
        """Resolve ``future`` from a result broker user ``sender`` published, if they may."""
        if not self.client.refuses_result(result, sender, future.endpoint_id):
            self._resolve_from(result.task_id, partial(result_value, result, self.serializer),
                               result.stdout, result.stderr)

    def _resolve_from(self, task_id: str, value: Callable[[], Any], stdout: str,
                      stderr: str) -> None:
        future = self._futures.get(task_id)
        if future is None or future.done():
            self.duplicates_dropped += 1
            return
        future.stdout, future.stderr = stdout, stderr
        try:
            try:
                future.set_result(value())
            except Exception as exc:  # a remote failure, or a value that cannot be decoded here
                future.set_exception(exc)
        except InvalidStateError:
            self.duplicates_dropped += 1  # cancelled or resolved meanwhile by another thread
