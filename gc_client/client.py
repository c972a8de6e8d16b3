"""Client: register functions, submit tasks, look up tasks and results in the ledger.

Names follow the Globus Compute SDK so its users feel at home.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gc_client.pickling import CapturedState, pickle_function
from gc_client.tasks import (
    Outgoing,
    cancel_message,
    make_task,
    manifest_message,
    new_id,
    not_accepted,
    oversize,
    task_message,
    task_out_value,
    untrusted_sender,
)
from gc_core.broker import BrokerSession
from gc_core.broker_limits import DEFAULT_MAX_MESSAGE_SIZE
from gc_core.broker_login import TokenLogin, token_login
from gc_core.errors import PublishNotConfirmed, TaskNotFound, TaskPending
from gc_core.protocol import ResultMessage, TaskMessage
from gc_core.registry_api.client import RegistryClient
from gc_core.registry_api.schemas import (
    MAX_SOURCE_LENGTH,
    EndpointOut,
    EndpointPolicy,
    EndpointStatus,
    FunctionOut,
    FunctionSharing,
    TaskOut,
    WhoAmI,
)
from gc_core.serialize import CLOUDPICKLE, JSON, Serializer, get_serializer
from gc_core.settings import REGISTRY_BROKER_USER, FabricSettings, resolve_settings
from gc_core.topology import Topology, load_topology, safe_name_part

__all__ = ["Batch", "Client"]

logger = logging.getLogger(__name__)

#: Seconds ``run`` and ``batch_run`` wait for the broker to confirm their tasks.
CONFIRM_TIMEOUT = 30.0
#: Seconds ``get_result`` and ``get_batch_result`` keep asking the ledger about a task id it
#: does not know before they raise TaskNotFound: the manifest of a task submitted a moment
#: ago, perhaps by another process, may still be on its way to the ledger.
UNKNOWN_TASK_GRACE = 5.0
#: Seconds between those questions.
UNKNOWN_TASK_POLL = 0.2


@dataclass
class Batch:
    """Tasks to submit together with :meth:`Client.batch_run`."""

    task_group_id: str
    serializer: Serializer = CLOUDPICKLE
    resource_specification: dict[str, Any] | None = None
    user_endpoint_config: dict[str, Any] | None = None
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)

    def add(self, function_id: str, args: tuple[Any, ...] | list[Any] | None = (),
            kwargs: dict[str, Any] | None = None) -> None:
        """Add one call of a registered function."""
        self.calls.append((function_id, tuple(args or ()), dict(kwargs or {})))


class Client:
    """The fabric as seen from a script: the registry over HTTP, tasks over AMQP.

    ``max_message_size`` (bytes; RabbitMQ's default, 128 MiB) bounds one task's serialized
    arguments: a larger task fails at once, unsent, since the broker would refuse it. Set
    it to the broker's ``max_message_size`` if that differs. ``trusted_publishers`` are the
    broker accounts besides a task's own endpoint whose results the client accepts on a
    secured broker (the registry's, which hands on dead letters).
    """

    def __init__(self, *, broker_url: str | None = None, registry_url: str | None = None,
                 token: str | None = None, home: str | None = None, user: str | None = None,
                 identity: str | None = None, on_behalf_of: str = "",
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 trusted_publishers: frozenset[str] = frozenset({REGISTRY_BROKER_USER})) -> None:
        if max_message_size < 1:
            raise ValueError("max_message_size must be a positive number of bytes")
        self.settings: FabricSettings = resolve_settings(
            broker_url=broker_url, registry_url=registry_url, token=token, home=home, user=user,
            identity=identity)
        safe_name_part(self.settings.user, "user name (GC_USER)")
        #: For a service account (a science gateway): the end user its tasks are run for,
        #: recorded in the ledger beside the account itself.
        self.on_behalf_of = on_behalf_of
        self.max_message_size = max_message_size
        self.trusted_publishers = trusted_publishers
        self.topology: Topology = load_topology()
        self.registry = RegistryClient(self.settings.registry_url, token=self.settings.token)
        #: Task group of tasks sent with :meth:`run`.
        self.task_group_id = new_id()
        self._by_object: weakref.WeakKeyDictionary[Any, tuple[str, CapturedState]] = \
            weakref.WeakKeyDictionary()
        self._by_hash: dict[str, str] = {}
        self._publisher: BrokerSession | None = None
        self._lock = threading.Lock()

    # -- functions and endpoints ------------------------------------------------------------

    def register_function(self, function: Callable[..., Any], *, name: str | None = None) -> str:
        """Register ``function`` once per process and return its id.

        The same function object, or the same serialized bytes, never goes to the
        registry twice. A function from a module of your own (not installed, not the
        standard library) is sent by value, so the endpoint need not import that module.

        Raises:
            SerializationError: the function cannot be pickled; the message names it and
                what it captures.
        """
        cached = self.registered_function_id(function)
        if cached is not None:
            return cached
        captured = CapturedState(function)
        payload = pickle_function(function)
        digest = hashlib.sha256(payload).hexdigest()
        function_id = self._by_hash.get(digest)
        if function_id is None:
            function_id = self.registry.register_function(
                payload, name=str(name or getattr(function, "__name__", type(function).__name__)),
                source=_source_of(function), owner=self.settings.user)
            self._by_hash[digest] = function_id
        try:
            self._by_object[function] = (function_id, captured)
        except TypeError:
            pass  # not weak-referenceable: the hash cache still spares the registry
        return function_id

    def registered_function_id(self, function: Callable[..., Any]) -> str | None:
        """The id :meth:`register_function` gave this very function object, if any (no
        registry call, no pickling: for callers that must not block)."""
        try:
            cached = self._by_object.get(function)
        except TypeError:
            return None
        if cached is None or cached[1].changed():
            return None  # (changed: pickled again, registered anew if its bytes differ)
        return cached[0]

    def delete_function(self, function_id: str) -> FunctionOut:
        """Forget a function you own at the registry (and in this client's cache, so the
        same function registers anew); returns what it was."""
        gone = self.registry.delete_function(function_id)
        for digest in [digest for digest, cached in self._by_hash.items() if cached == function_id]:
            del self._by_hash[digest]
        for function in [function for function, (cached, _) in self._by_object.items()
                         if cached == function_id]:
            del self._by_object[function]
        return gone

    def delete_endpoint(self, endpoint_id: str) -> EndpointOut:
        """Forget an endpoint you own and revoke its agent tokens; returns what it was.
        Its agent keeps running until stopped (``gc-agent delete`` stops it too)."""
        return self.registry.delete_endpoint(endpoint_id)

    def list_endpoints(self) -> list[EndpointOut]:
        """Every endpoint you may see: listed ones, and private ones shared with you."""
        return self.registry.list_endpoints()

    def whoami(self) -> WhoAmI:
        """The identity the registry takes your token to be (``anonymous`` on an open one)."""
        return self.registry.whoami()

    def get_allowed_functions(self, endpoint_id: str) -> list[FunctionOut]:
        """The functions you may run on ``endpoint_id``: shared with you and, if the endpoint
        permits only some, among those."""
        return self.registry.allowed_functions(endpoint_id)

    def set_endpoint_policy(self, endpoint_id: str, policy: EndpointPolicy) -> EndpointOut:
        """Replace who may use an endpoint you own, and what it runs."""
        return self.registry.set_endpoint_policy(endpoint_id, policy)

    def share_function(self, function_id: str, sharing: FunctionSharing) -> FunctionOut:
        """Change who may run a function you own."""
        return self.registry.share_function(function_id, sharing)

    def get_endpoint_status(self, endpoint_id: str) -> EndpointStatus:
        """Online/offline and the latest heartbeat's details."""
        return self.registry.get_endpoint_status(endpoint_id)

    # -- submitting -----------------------------------------------------------------------

    def run(self, *args: Any, endpoint_id: str, function_id: str,
            serializer: str = "cloudpickle", **kwargs: Any) -> str:
        """Submit one call; returns its task id once the broker has it."""
        batch = self.create_batch(serializer=serializer)
        batch.add(function_id, args, kwargs)
        return self.batch_run(endpoint_id, batch)[0]

    def create_batch(self, *, task_group_id: str | None = None, serializer: str = "cloudpickle",
                     resource_specification: dict[str, Any] | None = None,
                     user_endpoint_config: dict[str, Any] | None = None) -> Batch:
        """An empty batch for :meth:`batch_run`."""
        return Batch(task_group_id=task_group_id or self.task_group_id,
                     serializer=get_serializer(serializer),
                     resource_specification=resource_specification,
                     user_endpoint_config=user_endpoint_config)

    def batch_run(self, endpoint_id: str, batch: Batch) -> list[str]:
        """Submit every call in ``batch``; returns the task ids once the broker confirmed them.

        Raises:
            PublishNotConfirmed: the broker refused a task or did not confirm in time, or a
                task is over ``max_message_size`` (then none is sent).
        """
        tasks = [make_task(endpoint_id=endpoint_id, function_id=function_id,
                           user=self.settings.user, task_group_id=batch.task_group_id,
                           serializer=batch.serializer, args=args, kwargs=kwargs,
                           resource_spec=batch.resource_specification,
                           user_endpoint_config=batch.user_endpoint_config,
                           identity=self.settings.identity, on_behalf_of=self.on_behalf_of)
                 for function_id, args, kwargs in batch.calls]
        too_large = [e for e in (oversize(t, self.max_message_size) for t in tasks) if e]
        if too_large:
            raise too_large[0]
        self._publish_confirmed(endpoint_id, batch.task_group_id, tasks)
        return [t.task_id for t in tasks]

    def cancel(self, task_ids: list[str], *, endpoint_id: str | None = None) -> list[str]:
        """Cancel tasks at their endpoints: queued ones never run, running ones are stopped.

        The endpoint of each task comes from the ledger unless ``endpoint_id`` is given.
        Returns the ids a cancel command was sent for (tasks the ledger knows, or all with
        ``endpoint_id``); a task that already finished keeps its result.
        """
        by_endpoint: dict[str, list[str]] = {}
        if endpoint_id is not None:
            by_endpoint[endpoint_id] = list(task_ids)
        else:
            for task in self.registry.get_tasks(list(task_ids)):
                if task.endpoint_id:
                    by_endpoint.setdefault(task.endpoint_id, []).append(task.task_id)
        publisher = self._connected_publisher()
        for endpoint, ids in by_endpoint.items():
            self._publish_and_wait(publisher, [cancel_message(
                self.topology, ids, endpoint_id=endpoint, user=self.settings.user)])
        return [t for ids in by_endpoint.values() for t in ids]

    # -- results from the ledger ------------------------------------------------------------

    def get_task(self, task_id: str) -> TaskOut:
        """A task's status and timings (and result, once finished) from the ledger."""
        return self.registry.get_tasks([task_id])[0]

    def get_result(self, task_id: str, *, serializer: str | None = None,
                   unknown_grace: float = UNKNOWN_TASK_GRACE) -> Any:
        """The task's value.

        ``serializer`` names the one the task was sent with: the value is decoded with it
        only. None decodes whatever the ledger recorded, which a pickled value from a
        task's endpoint can run code with: use it only with endpoints you trust that far.
        A task id the ledger does not know is asked about again for ``unknown_grace``
        seconds, in case its task was submitted a moment ago.

        Raises:
            TaskPending: the task exists but has not finished.
            TaskNotFound: the ledger still does not know the task id after ``unknown_grace``.
            TaskExecutionFailed: the function raised remotely.
            GCError: the fabric failed the task: ``WorkerLost``, ``PolicyError``,
                ``ResultTooLarge`` … (the class its endpoint reported).
            SerializationError: the value came in another serializer than ``serializer``.
        """
        task = self._known_tasks([task_id], unknown_grace)[0]
        if task.status == "unknown":
            raise TaskNotFound(task_id)
        if task.status == "waiting":
            raise TaskPending(task_id, task.status)
        return task_out_value(task, _expected(task, serializer))

    def get_batch_result(self, task_ids: list[str], *, serializer: str | None = None,
                         unknown_grace: float = UNKNOWN_TASK_GRACE) -> dict[str, dict[str, Any]]:
        """Per task id: ``pending``, ``status``, and ``result`` or ``exception``
        (``serializer`` and ``unknown_grace`` as for :meth:`get_result`; a task id still
        unknown is not pending: its exception is a TaskNotFound)."""
        answer: dict[str, dict[str, Any]] = {}
        for task in self._known_tasks(task_ids, unknown_grace):
            entry: dict[str, Any] = {"pending": task.status == "waiting", "status": task.status}
            if task.status == "unknown":
                entry["exception"] = TaskNotFound(task.task_id)
            elif not entry["pending"]:
                try:
                    entry["result"] = task_out_value(task, _expected(task, serializer))
                except Exception as exc:  # noqa: BLE001 - each entry carries its own error
                    entry["exception"] = exc
            answer[task.task_id] = entry
        return answer

    def _known_tasks(self, task_ids: list[str], grace: float) -> list[TaskOut]:
        """The tasks from the ledger, those it does not know asked about again until they
        appear or ``grace`` seconds have passed."""
        tasks = self.registry.get_tasks(task_ids)
        deadline = time.monotonic() + grace
        while (unknown := [i for i, t in enumerate(tasks) if t.status == "unknown"]) \
                and time.monotonic() < deadline:
            time.sleep(min(UNKNOWN_TASK_POLL, max(0.0, deadline - time.monotonic())))
            for index, task in zip(unknown, self.registry.get_tasks(
                    [tasks[i].task_id for i in unknown])):
                tasks[index] = task
        return tasks

    def close(self) -> None:
        """Close the broker connection and the HTTP pool."""
        if self._publisher is not None:
            self._publisher.close()
        self.registry.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- for the executors ------------------------------------------------------------------

    def refuses_result(self, result: ResultMessage, sender: str, endpoint_id: str) -> bool:
        """Whether to drop ``result``, published by broker user ``sender`` for a task sent to
        ``endpoint_id``; logs one warning when it does.

        Logged in with a token the broker checks each publisher's ``user_id``, so a result
        is taken only from the task's own endpoint or a trusted publisher. Elsewhere (an
        open broker) ``user_id`` proves nothing and everything is taken.
        """
        if self.broker_login is None:
            return False
        why = untrusted_sender(sender, endpoint_id, self.trusted_publishers)
        if why is None:
            return False
        logger.warning("dropped a result for task %r of task group %r sent by %r: %s",
                       result.task_id, result.task_group_id, sender, why)
        return True

    # -- internals ------------------------------------------------------------------------

    @property
    def broker_login(self) -> TokenLogin | None:
        """This user's name and token as broker credentials, when the broker URL has none
        of its own (a secured broker: ``broker_config/rabbitmq.conf``)."""
        return token_login(self.settings.broker_url, self.settings.user, self.settings.token)

    def broker_session(self, name: str, **options: Any) -> BrokerSession:
        """A new broker session with this client's settings (the Executor uses one each)."""
        return BrokerSession(self.settings.broker_url, name=name, topology=self.topology,
                             login=self.broker_login, max_message_size=self.max_message_size,
                             **options)

    def _connected_publisher(self) -> BrokerSession:
        with self._lock:
            # A forked child cannot use its parent's connection: it opens its own.
            if self._publisher is None or self._publisher.forked_away:
                session = self.broker_session(f"gc-client:{self.settings.user}")
                session.start()
                self._publisher = session
            return self._publisher

    def _publish_confirmed(self, endpoint_id: str, task_group_id: str,
                           tasks: list[TaskMessage]) -> None:
        manifest = manifest_message(self.topology, [t.task_id for t in tasks],
                                    task_group_id=task_group_id, endpoint_id=endpoint_id,
                                    user=self.settings.user)
        messages = [manifest, *(task_message(self.topology, task) for task in tasks)]
        failures = self._publish_and_wait(self._connected_publisher(), messages)
        if failures:
            raise not_accepted(f"{len(failures)} of {len(tasks)} tasks were", endpoint_id,
                               failures[0])

    @staticmethod
    def _publish_and_wait(publisher: BrokerSession, messages: list[Outgoing]) -> list[str]:
        """Publish ``messages``; wait for every confirm and return the reasons of those the
        broker did not take."""
        failures: list[str] = []
        done = threading.Semaphore(0)

        def confirmed(reason: str | None) -> None:
            if reason is not None:
                failures.append(reason)
            done.release()

        for message in messages:
            publisher.publish(message.exchange, message.routing_key, message.envelope,
                              on_confirm=confirmed, mandatory=message.mandatory)
        for _ in messages:
            if not done.acquire(timeout=CONFIRM_TIMEOUT):
                raise PublishNotConfirmed(
                    f"the broker did not confirm within {CONFIRM_TIMEOUT:.0f}s")
        return failures


def _expected(task: TaskOut, serializer: str | None) -> Serializer:
    """The serializer to decode ``task``'s value with: the one named, else the recorded one
    (only a successful task has a value; the others raise their error without decoding)."""
    if serializer is not None:
        return get_serializer(serializer)
    return get_serializer(task.content_type) if task.status == "success" else JSON


def _source_of(function: Callable[..., Any]) -> str | None:
    """The function's source, to show beside it; None where there is none, or where it is
    longer than the registry keeps (generated code: it is shown, never run)."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return None
    return source if len(source) <= MAX_SOURCE_LENGTH else None
