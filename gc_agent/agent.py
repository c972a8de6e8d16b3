"""The endpoint daemon: consume tasks, check them, run them, publish results, heartbeat.

Reliability hinges on one rule: a task delivery is acked only after the broker has
confirmed its result. Until then the delivery is ours, so an agent killed at any
moment loses nothing — the broker hands its unacked tasks to the next agent.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

from gc_agent.admission import Admission, AdmissionKey
from gc_agent.config import EndpointConfig
from gc_agent.engines import Engine, make_engine
from gc_agent.execution import Job, Outcome
from gc_agent.policy import refusal
from gc_core.broker import BrokerSession, Delivery, token_login
from gc_core.errors import GCError, ProtocolError
from gc_core.protocol import (
    CancelCommand,
    ErrorInfo,
    Heartbeat,
    ResultMessage,
    TaskMessage,
    Timings,
    decode_event,
    decode_task,
    encode_event,
    encode_result,
    error_result,
)
from gc_core.registry.client import RegistryClient
from gc_core.registry.identity import AGENT_PREFIX
from gc_core.serialize import JSON, PYTHON_VERSION, SERIALIZERS
from gc_core.settings import FabricSettings
from gc_core.topology import load_topology, safe_name_part

__all__ = ["Agent"]

logger = logging.getLogger(__name__)

#: Unacked tasks per worker when the config does not say: enough to cover confirm round trips.
PREFETCH_PER_WORKER = 16
#: Task ids whose results were confirmed, remembered to ack their redeliveries without rerunning.
DONE_MEMORY = 20_000
#: Cancelled task ids not yet delivered here, remembered so they are answered, not run.
CANCEL_MEMORY = 100_000
#: What to do when the broker refuses the agent's token.
AGENT_TOKEN_REMEDY = ("give the agent its endpoint's token: token_file in its config.yaml, "
                      "from `gc-agent configure` while logged in, or `POST /tokens` with the "
                      "endpoint_id")
#: Which heartbeat counter a result state counts in.
_COUNTER = {"success": "succeeded", "failed": "failed", "cancelled": "cancelled"}


@dataclass(frozen=True, slots=True)
class _Function:
    """A registered function as the agent keeps it: serialized bytes and their Python."""

    payload: bytes
    python: str


class Agent:
    """One endpoint's agent."""

    def __init__(self, config: EndpointConfig, settings: FabricSettings, *,
                 on_heartbeat: Callable[[Heartbeat, bool], None] | None = None) -> None:
        self.config = config
        self._on_heartbeat = on_heartbeat
        self.endpoint_id = config.endpoint_id
        self._broker_url = config.broker_url or settings.broker_url
        # On a secured broker (a URL without credentials) the agent logs in with its token.
        self._login = token_login(self._broker_url, AGENT_PREFIX + config.endpoint_id,
                                  settings.token, remedy=AGENT_TOKEN_REMEDY)
        self._registry_url = config.registry_url or settings.registry_url
        self._topology = load_topology()
        self._engine: Engine = make_engine(config)
        self._registry: RegistryClient | None = None
        #: The agent's token: with one, the registry checks tokens and re-admits each task.
        self._token = settings.token
        self._admission: Admission | None = None
        self._broker: BrokerSession | None = None
        self._functions: dict[str, _Function] = {}
        self._fetching: dict[AdmissionKey, list[tuple[Delivery, TaskMessage, float]]] = {}
        self._fetch_lock = threading.Lock()
        self._fetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fetch")
        self._done: OrderedDict[str, None] = OrderedDict()
        self._in_flight = 0
        self._counts = {"received": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
        self._owners: dict[str, str] = {}
        self._cancelled: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        #: Set when the agent has been idle for ``idle_heartbeats`` periods and wants to stop.
        self.idle = threading.Event()
        self._started_at = time.time()
        self._queue_depth: int | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the workers, connect, and begin consuming.

        Raises:
            BrokerUnreachable: the broker did not answer within ``timeout``.
        """
        self._registry = RegistryClient(self._registry_url, token=self._token)
        if self._token:
            self._admission = Admission(self._registry, self.endpoint_id)
        self._engine.start()
        tasks_queue = self._topology.queue("endpoint_tasks", endpoint_id=self.endpoint_id)
        commands_queue = self._topology.queue("endpoint_commands", endpoint_id=self.endpoint_id)
        prefetch = self.config.prefetch or PREFETCH_PER_WORKER * self._engine.capacity
        self._broker = BrokerSession(
            self._broker_url, name=f"gc-agent:{self.endpoint_id}", topology=self._topology,
            queues=[tasks_queue, commands_queue], prefetch=prefetch, login=self._login)
        self._broker.consume(commands_queue.name, self._on_command)
        try:
            self._broker.start(timeout=timeout)
        except GCError:
            self._engine.shutdown()
            raise
        # Cancels sent while the agent was down must be known before their tasks arrive.
        self._drain_commands(commands_queue.name, timeout)
        self._broker.consume(tasks_queue.name, self._on_task)
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        logger.info("agent for endpoint %s started: %s engine, %d workers, prefetch %d, broker %s",
                    self.endpoint_id, self._engine.name, self._engine.capacity, prefetch,
                    self._broker.url)

    def _drain_commands(self, queue: str, timeout: float) -> None:
        assert self._broker is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counted = threading.Event()
            depth: list[int] = []

            def note(count: int) -> None:
                depth.append(count)
                counted.set()

            self._broker.queue_message_count(queue, note)
            if counted.wait(5) and depth[0] == 0:
                return
            time.sleep(0.05)
        logger.warning("commands queue %s not drained within %.0fs; consuming tasks anyway",
                       queue, timeout)

    def stop(self) -> None:
        """Drain: stop consuming, requeue tasks not started, let running ones finish, close."""
        broker = self._broker
        if broker is None or self._stopped.is_set():
            return
        self._stopped.set()
        logger.info("agent for endpoint %s draining (%d tasks in flight)", self.endpoint_id,
                    self._in_flight)
        broker.stop_consuming()
        for job, on_done in self._engine.take_waiting():
            on_done(Outcome(job.task_id, "failed", lost=True))
        deadline = time.monotonic() + self.config.drain_timeout
        while self._in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._in_flight:
            logger.warning("%d tasks still running after %.0fs; the broker will redeliver them",
                           self._in_flight, self.config.drain_timeout)
        self._engine.shutdown()
        broker.wait_settled(5.0)
        broker.close()
        self._fetcher.shutdown(wait=False, cancel_futures=True)
        if self._registry is not None:
            self._registry.close()
        logger.info("agent for endpoint %s stopped", self.endpoint_id)

    # -- the task path (IO thread) -------------------------------------------------------

    def _on_task(self, delivery: Delivery) -> None:
        received = time.time()
        with self._lock:
            self._counts["received"] += 1
            self._in_flight += 1
        try:
            task = decode_task(delivery.envelope)
        except ProtocolError as exc:
            self._refuse_undecodable(delivery, exc, received)
            return
        if task.task_id in self._done:
            logger.debug("task %s redelivered after its result was confirmed; acking", task.task_id)
            self._settle(delivery, requeue=None)
            return
        if not self._sent_by(delivery, task.user):
            logger.warning("dropped task %s: it claims to come from %s, the broker says %r",
                           task.task_id, task.user, delivery.user_id)
            self._settle(delivery, requeue=None)
            return
        problem = refusal(task, endpoint_id=self.endpoint_id,
                          allowed_serializers=self.config.allowed_serializers)
        if problem is not None:
            logger.warning("refused task %s: %s", task.task_id, problem.message)
            self._publish(delivery, error_result(task, problem, timings=Timings(received=received)))
            return
        function = self._functions.get(task.function_id)
        if function is None or (self._admission is not None and not self._admission.admitted(task)):
            self._prepare_then_run(delivery, task, received)
        else:
            self._run(delivery, task, function, received)

    def _prepare_then_run(self, delivery: Delivery, task: TaskMessage, received: float) -> None:
        """Off the IO thread: have the registry admit the task (when it checks tokens) and
        fetch its function once; tasks with the same needs wait for the same answer."""
        key = AdmissionKey.of(task)
        with self._fetch_lock:
            waiting = self._fetching.get(key)
            if waiting is not None:
                waiting.append((delivery, task, received))
                return
            self._fetching[key] = [(delivery, task, received)]
        self._fetcher.submit(_logged(self._prepare), key, task)

    def _prepare(self, key: AdmissionKey, task: TaskMessage) -> None:
        function: _Function | ErrorInfo
        try:
            function = self._admit(task) or self._function(task.function_id)
        except GCError as exc:
            function = ErrorInfo(type=type(exc).__name__,
                                 message=f"cannot fetch function {task.function_id}: {exc}")
        with self._fetch_lock:
            waiting = self._fetching.pop(key, [])
        for delivery, waiting_task, received in waiting:
            if isinstance(function, _Function):
                self._run(delivery, waiting_task, function, received)
            else:
                logger.warning("refused task %s: %s", waiting_task.task_id, function.message)
                self._publish(delivery, error_result(waiting_task, function,
                                                     timings=Timings(received=received)))

    def _admit(self, task: TaskMessage) -> ErrorInfo | None:
        """The registry's refusal of ``task`` as an error result, or None."""
        if self._admission is None:
            return None
        reason = self._admission.refusal(task)
        if reason is None:
            return None
        return ErrorInfo(type="PolicyError",
                         message=f"endpoint {self.endpoint_id} refuses task {task.task_id}: {reason}")

    def _identity_of(self, task: TaskMessage) -> str:
        """Whom a multi-user endpoint maps to a local account. When the registry checks
        tokens, only the authenticated user counts: a claimed ``gc-identity`` could name
        anyone's account."""
        return task.user if self._admission is not None else task.identity or task.user

    def _function(self, function_id: str) -> _Function:
        """A function from the cache, or fetched from the registry once."""
        function = self._functions.get(function_id)
        if function is None:
            assert self._registry is not None
            found = self._registry.get_function(function_id)
            function = _Function(base64.b64decode(found.payload_b64), found.python_version)
            self._functions[function_id] = function
        return function

    def _run(self, delivery: Delivery, task: TaskMessage, function: _Function,
             received: float) -> None:
        if self._cancelled.get(task.task_id) == task.user:
            self._cancelled.pop(task.task_id, None)
            logger.info("task %s was cancelled before it started", task.task_id)
            error = ErrorInfo(type="TaskCancelled",
                              message=f"task {task.task_id} was cancelled before it started")
            self._publish(delivery, error_result(task, error, state="cancelled",
                                                 timings=Timings(received=received)))
            return
        self._owners[task.task_id] = task.user
        job = Job(task.task_id, task.function_id, function.payload, function.python,
                  task.content_type, task.payload, task.sender_python, task.sender_serializer,
                  self.config.output_limit, task.resource_spec, self._identity_of(task),
                  task.user_endpoint_config)
        self._engine.submit(job, lambda outcome: self._on_outcome(delivery, task, received, outcome))

    def _on_outcome(self, delivery: Delivery, task: TaskMessage, received: float,
                    outcome: Outcome) -> None:
        self._owners.pop(task.task_id, None)
        if outcome.lost:
            self._settle(delivery, requeue=True)
            return
        outcome = _within_size_limit(outcome, self.config.result_size_limit)
        result = ResultMessage(
            task_id=task.task_id, task_group_id=task.task_group_id, endpoint_id=self.endpoint_id,
            function_id=task.function_id, user=task.user, on_behalf_of=task.on_behalf_of,
            state=outcome.state,
            content_type=outcome.content_type, payload=outcome.payload, error=outcome.error,
            timings=Timings(received=received, started=outcome.started, finished=outcome.finished),
            worker=outcome.worker, stdout=outcome.stdout, stderr=outcome.stderr,
            sender_python=PYTHON_VERSION,
            sender_serializer=SERIALIZERS[outcome.content_type].label if outcome.content_type else "")
        self._publish(delivery, result)

    def _publish(self, delivery: Delivery, result: ResultMessage) -> None:
        """Publish a result; ack the task once the broker confirms it, requeue if it refuses."""
        assert self._broker is not None
        key = self._topology.routing_key("result", user=result.user,
                                         task_group_id=result.task_group_id)

        def confirmed(reason: str | None) -> None:
            if reason is not None:
                logger.warning("result of task %s not confirmed (%s); requeueing the task",
                               result.task_id, reason)
                self._settle(delivery, requeue=True)
                return
            self._remember_done(result.task_id)
            with self._lock:
                self._counts[_COUNTER[result.state]] += 1
            self._settle(delivery, requeue=None)

        self._broker.publish(self._topology.exchange("results"), key, encode_result(result),
                             on_confirm=confirmed)

    def _on_command(self, delivery: Delivery) -> None:
        """A command from gc.commands: cancel tasks that are waiting, running or yet to come."""
        assert self._broker is not None
        try:
            command = decode_event(delivery.envelope)
        except ProtocolError as exc:
            logger.warning("dropped an undecodable command (%d bytes): %s", len(exc.raw), exc)
            self._broker.ack(delivery)
            return
        if isinstance(command, CancelCommand) and self._sent_by(delivery, command.user):
            for task_id in command.task_ids:
                self._cancel(task_id, command.user)
        self._broker.ack(delivery)

    def _sent_by(self, delivery: Delivery, user: str) -> bool:
        """Whether ``user`` sent it: on a secured broker (we log in with a token) the
        ``user_id`` the broker checked must match; elsewhere the claim is all there is."""
        return (self._login is None or delivery.user_id == user
                or delivery.user_id in self.config.trusted_publishers)

    def _cancel(self, task_id: str, user: str) -> None:
        owner = self._owners.get(task_id)
        if owner is not None and owner != user:
            logger.warning("refused %s's request to cancel task %s of %s", user, task_id, owner)
            return
        how = self._engine.cancel(task_id) if owner is not None else "unknown"
        if how == "unknown":
            # Not here yet (still queued at the broker, or its function is being fetched).
            self._cancelled[task_id] = user
            if len(self._cancelled) > CANCEL_MEMORY:
                self._cancelled.popitem(last=False)
        logger.info("cancel task %s: %s", task_id, "remembered until it arrives"
                    if how == "unknown" else how)

    def _refuse_undecodable(self, delivery: Delivery, exc: ProtocolError, received: float) -> None:
        """Answer a malformed task if we can tell who sent it; else dead-letter it."""
        envelope = delivery.envelope
        user = envelope.headers.get("gc-user")
        user = user.decode("utf-8", "replace") if isinstance(user, bytes) else user
        logger.warning("undecodable task %r (%d bytes): %s", envelope.message_id, len(exc.raw), exc)
        if isinstance(user, str) and envelope.message_id and _routable(user, envelope.correlation_id):
            stub = TaskMessage(task_id=envelope.message_id, task_group_id=envelope.correlation_id,
                               endpoint_id=self.endpoint_id, function_id="?", user=user,
                               content_type=envelope.content_type, payload=b"")
            error = ErrorInfo(type="ProtocolError", message=str(exc))
            self._publish(delivery, error_result(stub, error, timings=Timings(received=received)))
        else:
            self._settle(delivery, requeue=False)

    def _settle(self, delivery: Delivery, *, requeue: bool | None) -> None:
        """Ack (``requeue`` None), requeue (True) or dead-letter (False) a delivery."""
        assert self._broker is not None
        if requeue is None:
            self._broker.ack(delivery)
        else:
            self._broker.reject(delivery, requeue=requeue)
        with self._lock:
            self._in_flight -= 1

    def _remember_done(self, task_id: str) -> None:
        self._done[task_id] = None
        if len(self._done) > DONE_MEMORY:
            self._done.popitem(last=False)

    # -- heartbeats ------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        assert self._broker is not None
        queue = self._topology.queue("endpoint_tasks", endpoint_id=self.endpoint_id).name
        key = self._topology.routing_key("heartbeat", endpoint_id=self.endpoint_id)
        idle_periods, last_received = 0, -1
        while not self._stopped.is_set():
            received = self._counts["received"]
            idle_periods = idle_periods + 1 if received == last_received and not self._in_flight else 0
            last_received = received
            if self.config.idle_heartbeats and idle_periods > self.config.idle_heartbeats:
                logger.info("agent for endpoint %s idle for %d heartbeats; shutting down",
                            self.endpoint_id, self.config.idle_heartbeats)
                self.idle.set()
                return
            try:
                self._send_heartbeat(queue, key)
            except Exception:  # heartbeats must outlive a bad one
                logger.exception("sending the heartbeat of endpoint %s failed", self.endpoint_id)
            self._stopped.wait(self.config.heartbeat_period)

    def _send_heartbeat(self, queue: str, key: str) -> None:
        assert self._broker is not None
        self._broker.queue_message_count(queue, self._note_depth)
        heartbeat = self.heartbeat()
        self._broker.publish(self._topology.exchange("events"), key, encode_event(heartbeat),
                             persistent=False)
        if self._on_heartbeat is not None:
            self._on_heartbeat(heartbeat, self._broker.connected)

    def _note_depth(self, depth: int) -> None:
        self._queue_depth = depth

    def heartbeat(self) -> Heartbeat:
        """The agent's status now."""
        with self._lock:
            counts = dict(self._counts)
        return Heartbeat(
            endpoint_id=self.endpoint_id, hostname=socket.gethostname(), pid=os.getpid(),
            sent=time.time(), period=self.config.heartbeat_period, started=self._started_at,
            engine=self._engine.name, workers=self._engine.capacity,
            workers_busy=self._engine.busy, tasks_received=counts["received"],
            tasks_succeeded=counts["succeeded"], tasks_failed=counts["failed"],
            tasks_cancelled=counts["cancelled"],
            queue_depth=self._queue_depth, engine_status=self._engine.status())


def _routable(*words: str) -> bool:
    """Whether these can form a result routing key (else the error has nowhere to go)."""
    try:
        for word in words:
            safe_name_part(word, "routing key word")
    except GCError:
        return False
    return True


def _logged(fn: Callable[[AdmissionKey, TaskMessage], None]
            ) -> Callable[[AdmissionKey, TaskMessage], None]:
    """A thread pool swallows exceptions; this says them instead."""

    def run(key: AdmissionKey, task: TaskMessage) -> None:
        try:
            fn(key, task)
        except Exception:
            logger.exception("preparing task %s (function %s) failed", task.task_id,
                             task.function_id)

    return run


def _within_size_limit(outcome: Outcome, limit: int) -> Outcome:
    """Refuse a result too large to send inline, saying how large and what the limit is."""
    if len(outcome.payload) <= limit:
        return outcome
    message = (f"the result of task {outcome.task_id} is {len(outcome.payload):,} bytes, over this "
               f"endpoint's limit of {limit:,} bytes (result_size_limit); write large outputs to "
               "storage both sides can reach and return their location instead")
    return replace(outcome, state="failed", payload=b"", content_type=JSON.content_type,
                   error=ErrorInfo(type="ResultTooLarge", message=message))
