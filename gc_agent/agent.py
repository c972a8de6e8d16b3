"""The endpoint daemon: consume tasks, check them, run them, publish results, heartbeat.

Reliability hinges on one rule: a task delivery is acked only after the broker has
confirmed its result. Until then the delivery is ours, so an agent killed at any
moment loses nothing — the broker hands its unacked tasks to the next agent.

A message is hostile until checked, and whatever one message makes fail costs that message
only: each delivery travels with a :class:`_Ticket`, and every path — a result, a requeue,
a dead letter, an exception anywhere on the way — ends in exactly one answer, so no
delivery (and no prefetch slot) is ever left unsettled.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pydantic import ValidationError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_when_event_set,
    wait_exponential,
)

from gc_agent import metrics
from gc_agent.admission import Admission, AdmissionKey
from gc_agent.cancels import Cancels
from gc_agent.config import EndpointConfig
from gc_agent.engines import Engine, make_engine
from gc_agent.execution import Job, Outcome, checked_outcome, error_info
from gc_agent.policy import check_identities_verifiable, refusal, verifies_senders
from gc_agent.requeue_seal import RequeueSeal
from gc_agent.task_batches import BatchDelivery, unfinished_in_ledger, unsplit_tasks
from gc_core.batches import encode_result_batch, is_batch, split_batch
from gc_core.broker import BrokerSession, QueueCounts
from gc_core.broker_consumers import Delivery, Settlement
from gc_core.broker_limits import Refusal
from gc_core.broker_login import token_login
from gc_core.broker_publisher import ConfirmCallback
from gc_core.coalesce import Coalescer
from gc_core.errors import GCError, ProtocolError, RegistryUnreachable
from gc_core.protocol import (
    H_GROUP,
    H_USER,
    CancelCommand,
    Envelope,
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
    new_result,
)
from gc_core.registry_api.client import RegistryClient
from gc_core.serialize import JSON, PYTHON_VERSION, SERIALIZERS
from gc_core.settings import AGENT_PREFIX, FabricSettings
from gc_core.topology import load_topology

__all__ = ["Agent"]

logger = logging.getLogger(__name__)

#: Unacked tasks per worker when the config does not say: enough to cover confirm round trips.
PREFETCH_PER_WORKER = 16
#: Task ids whose results were confirmed, remembered to ack their redeliveries without rerunning.
DONE_MEMORY = 20_000
#: Cancelled task ids not yet delivered here, remembered so they are answered, not run.
CANCEL_MEMORY = 100_000
#: Seconds the agent waits for the broker to say how many commands wait for it at start.
MESSAGE_COUNT_TIMEOUT = 5.0
#: What to do when the broker refuses the agent's token.
AGENT_TOKEN_REMEDY = ("give the agent its endpoint's token: token_file in its config.yaml, "
                      "from `gc-agent configure` while logged in, or `POST /tokens` with the "
                      "endpoint_id")
#: How a cancel is logged, by what it found (else, by what the engine did).
_CANCEL_SHOWN = {
    # not here yet: still queued at the broker, or its function is being fetched
    "remembered": "remembered until it arrives", "unknown": "remembered until it arrives",
    "deferred": "cancelled as soon as it reaches the engine",
    "already": "already being cancelled",
}
#: Which heartbeat counter a result state counts in.
_COUNTER = {"success": "succeeded", "failed": "failed", "cancelled": "cancelled"}
#: Characters of an untrusted value (an exception's text, a forged id) a log line shows.
LOGGED_TEXT = 300
#: Seconds a task whose function must be fetched waits for a registry that cannot be
#: reached (restarting, upgraded) before it fails saying so.
REGISTRY_PATIENCE = 300.0


@dataclass(frozen=True, slots=True)
class _Function:
    """A registered function as the agent keeps it: serialized bytes and their Python."""

    payload: bytes
    python: str


@dataclass(eq=False)
class _Ticket:
    """One task delivery on its way to exactly one answer: a result, a requeue or a dead
    letter. Whoever claims the ticket first gives that answer; a later attempt (an outcome
    after an error, an error after an outcome) is dropped."""

    delivery: Delivery
    received: float
    #: The task, once decoding checked it: only then may a result echo what it says.
    task: TaskMessage | None = None
    #: The batch it came in, if it shares its delivery with other tasks.
    batch: BatchDelivery | None = None
    #: Whether its sender is who it claims (only then may it go back to the queue alone).
    verified: bool = False
    _claimed: bool = False
    _settled: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def claim(self) -> bool:
        """True the first time only: the caller then answers the task."""
        with self._lock:
            claimed, self._claimed = self._claimed, True
        return not claimed

    def settle(self) -> bool:
        """True the first time only: the caller then acks or rejects the delivery."""
        with self._lock:
            settled, self._settled = self._settled, True
        return not settled


class Agent:
    """One endpoint's agent."""

    def __init__(self, config: EndpointConfig, settings: FabricSettings, *,
                 on_heartbeat: Callable[[Heartbeat, str | None], None] | None = None) -> None:
        self.config = config
        self._on_heartbeat = on_heartbeat
        self.endpoint_id = config.endpoint_id
        self._broker_url = config.broker_url_or(settings.broker_url)
        # On a secured broker (a URL without credentials) the agent logs in with its token.
        self._login = token_login(self._broker_url, AGENT_PREFIX + config.endpoint_id,
                                  settings.token, remedy=AGENT_TOKEN_REMEDY)
        #: Whether each task's broker-checked user_id names its sender (else names are claims).
        self._verified = verifies_senders(config, token_login=self._login is not None)
        check_identities_verifiable(config, verified=self._verified)
        self._registry_url = config.registry_url or settings.registry_url
        self._topology = load_topology()
        self._engine: Engine = make_engine(config)
        self._registry: RegistryClient | None = None
        #: The agent's token: with one, the registry checks tokens and re-admits each task.
        self._token = settings.token
        self._admission: Admission | None = None
        self._broker: BrokerSession | None = None
        # Threads: the broker's IO thread takes tasks and commands and hears confirms; the
        # fetch threads ready tasks whose function must be fetched; the engine's threads
        # report outcomes; the heartbeat thread reads counts. What more than one of them
        # changes is behind a lock: the fetch queue (_fetch_lock), task owners and early
        # cancels (inside _cancels), counts and in-flight tasks (_lock).
        #: Fetched functions: whole entries set and read, so a race only fetches one twice.
        self._functions: dict[str, _Function] = {}
        self._fetching: dict[AdmissionKey, list[_Ticket]] = {}
        self._fetch_lock = threading.Lock()
        self._fetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fetch")
        #: Tasks whose results were confirmed: the IO thread's alone (tasks and confirms).
        self._done: OrderedDict[str, None] = OrderedDict()
        self._cancels = Cancels(CANCEL_MEMORY)
        #: Seals the tasks this agent puts back alone, which the broker stamps as its own.
        self._requeue_seal = RequeueSeal(settings.endpoints_dir / config.name / "requeue.key")
        #: Results of batched tasks finished while one of their group's waits for its
        #: confirm go together.
        self._results: Coalescer[ResultMessage] = Coalescer(
            lambda key, _results, envelope, on_confirm:
                self._publish_results(key, envelope, on_confirm), encode_result_batch,
            lambda result: len(result.payload) + len(result.stdout) + len(result.stderr),
            linger=config.result_linger)
        self._in_flight = 0
        self._counts = {"received": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        #: Set when the agent has been idle for ``idle_heartbeats`` periods and wants to stop.
        self.idle = threading.Event()
        #: Set when its broker session gave up for good: the agent cannot serve and wants to
        #: exit with an error, so that its service manager starts it again.
        self.broken = threading.Event()
        self._started_at = time.time()
        self._queue_depth: int | None = None
        self._metrics = metrics.AgentMetrics()  # none served until start()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the workers, connect, and begin consuming.

        Raises:
            BrokerUnreachable: the broker did not answer within ``timeout``.
            ConfigError: the config's ``metrics_port`` cannot be bound.
        """
        self._metrics = metrics.serve(self.config, metrics.Readings(
            self.heartbeat, lambda: self._in_flight, lambda: self._broker))
        self._registry = RegistryClient(self._registry_url, token=self._token)
        if self._token:
            self._admission = Admission(self._registry, self.endpoint_id)
        self._engine.start()
        tasks_queue = self._topology.queue("endpoint_tasks", endpoint_id=self.endpoint_id)
        commands_queue = self._topology.queue("endpoint_commands", endpoint_id=self.endpoint_id)
        # Every command reaches this agent through its own queue, and maybe once more through
        # the shared one (a cancel is answered the same however often it comes).
        own_commands = self._topology.queue("agent_commands", endpoint_id=self.endpoint_id,
                                            agent_id=uuid.uuid4().hex)
        prefetch = self.config.prefetch or PREFETCH_PER_WORKER * self._engine.capacity
        self._broker = BrokerSession(
            self._broker_url, name=f"gc-agent:{self.endpoint_id}", topology=self._topology,
            queues=[tasks_queue, commands_queue, own_commands], prefetch=prefetch,
            login=self._login, stamp_user_id=self._verified)
        self._broker.consume(commands_queue.name, self._on_command)
        self._broker.consume(own_commands.name, self._on_command)
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
        if self.config.multi_user is not None and not self._verified:
            logger.warning("endpoint %s maps the identity each task claims without verifying "
                           "it (multi_user.insecure_trust_claimed_identities): whoever can send "
                           "it a task runs code as any account its mapping reaches",
                           self.endpoint_id)

    def _drain_commands(self, queue: str, timeout: float) -> None:
        assert self._broker is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Each ask waits for its own answer: a late one cannot pass for a later ask's.
            counts = self._broker.counts(queue, MESSAGE_COUNT_TIMEOUT)
            if counts is not None and counts.messages == 0:
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
        self._metrics.close()
        logger.info("agent for endpoint %s stopped", self.endpoint_id)

    # -- the task path (IO thread) -------------------------------------------------------

    def _on_task(self, delivery: Delivery) -> None:
        if is_batch(delivery.envelope):
            self._on_batch(delivery)
            return
        ticket = _Ticket(delivery, time.time())
        with self._lock:
            self._counts["received"] += 1
            self._in_flight += 1
        self._handling(ticket, self._take)

    def _handling(self, ticket: _Ticket, step: Callable[[_Ticket], None]) -> None:
        """Run one step of a task's way; whatever it raises answers the task instead of
        leaking its delivery (a bug, or a message no check foresaw)."""
        try:
            step(ticket)
        except Exception as exc:  # noqa: BLE001 - one task's failure costs that task alone
            self._fail(ticket, exc)

    def _take(self, ticket: _Ticket) -> None:
        delivery = ticket.delivery
        try:
            task = decode_task(delivery.envelope)
        except ProtocolError as exc:
            self._refuse_undecodable(ticket, exc)
            return
        ticket.task = task
        if task.task_id in self._done:
            logger.debug("task %s redelivered after its result was confirmed; acking", task.task_id)
            self._settle(ticket, Settlement.ACK)
            return
        if not self._sent_by(delivery, task.user):
            logger.warning("dropped task %s: it claims to come from %s, the broker says %r%s",
                           task.task_id, task.user, delivery.user_id, self._own_stamp_note(delivery))
            self._metrics.count_refusal("ForgedSender")
            self._settle(ticket, Settlement.ACK)
            return
        ticket.verified = True
        problem = refusal(task, endpoint_id=self.endpoint_id,
                          allowed_serializers=self.config.allowed_serializers,
                          allowed_functions=self.config.allowed_functions)
        if problem is not None:
            self._answer_error(ticket, problem)
            return
        function = self._functions.get(task.function_id)
        if function is None or (self._admission is not None and not self._admission.admitted(task)):
            self._prepare_then_run(ticket, task)
        else:
            self._run(ticket, function)

    def _prepare_then_run(self, ticket: _Ticket, task: TaskMessage) -> None:
        """Off the IO thread: have the registry admit the task (when it checks tokens) and
        fetch its function once; tasks with the same needs wait for the same answer."""
        key = AdmissionKey.of(task)
        with self._fetch_lock:
            waiting = self._fetching.get(key)
            if waiting is not None:
                waiting.append(ticket)
                return
            self._fetching[key] = [ticket]
        try:
            self._fetcher.submit(self._prepare, key, task)
        except RuntimeError:  # the agent is stopping: whoever waits goes back to the queue
            with self._fetch_lock:
                waiting = self._fetching.pop(key, [])
            for each in waiting:
                self._settle(each, Settlement.REQUEUE)

    def _prepare(self, key: AdmissionKey, task: TaskMessage) -> None:
        function: _Function | ErrorInfo | None
        try:
            function = self._admitted_function(task)
        except Exception as exc:  # noqa: BLE001 - the registry's answer is as untrusted as any message
            # (a registry still unreachable when the agent stops: the tasks go back, below)
            function = None if self._stopped.is_set() else error_info(
                type(exc).__name__, f"cannot fetch function {task.function_id}: {exc}")
        with self._fetch_lock:
            waiting = self._fetching.pop(key, [])
        for ticket in waiting:
            if function is None:
                self._settle(ticket, Settlement.REQUEUE)
            elif isinstance(function, _Function):
                self._handling(ticket, partial(self._run, function=function))
            else:
                self._handling(ticket, partial(self._answer_error, error=function))

    def _admitted_function(self, task: TaskMessage) -> _Function | ErrorInfo:
        """The task's function, once the registry admits the task (else its refusal). A
        registry that cannot be reached (restarting, say) is asked again, for up to
        ``REGISTRY_PATIENCE`` seconds or until the agent stops: the task waits, unacked."""
        def waiting(state: RetryCallState) -> None:
            if state.attempt_number == 1:
                logger.warning("cannot fetch function %s for task %s (%s); waiting for the "
                               "registry, up to %.0f s", task.function_id, task.task_id,
                               state.outcome.exception() if state.outcome else "",
                               REGISTRY_PATIENCE)

        patiently = Retrying(
            retry=retry_if_exception_type(RegistryUnreachable), reraise=True,
            stop=stop_after_delay(REGISTRY_PATIENCE) | stop_when_event_set(self._stopped),
            wait=wait_exponential(multiplier=0.25, max=5), sleep=self._pause,
            before_sleep=waiting)
        return patiently(lambda: self._admit(task) or self._function(task.function_id))

    def _admit(self, task: TaskMessage) -> ErrorInfo | None:
        """The registry's refusal of ``task`` as an error result, or None."""
        if self._admission is None:
            return None
        reason = self._admission.refusal(task)
        if reason is None:
            return None
        return error_info("PolicyError",
                          f"endpoint {self.endpoint_id} refuses task {task.task_id}: {reason}")

    def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the agent stops meanwhile."""
        self._stopped.wait(seconds)

    def _identity_of(self, task: TaskMessage) -> str:
        """Whom a multi-user endpoint maps to a local account: the sender the broker
        verified. A claimed ``gc-identity`` could name anyone's account, so it counts only
        where the administrator chose to trust claims (the agent refuses to start a
        multi-user endpoint that can verify no sender otherwise)."""
        return task.user if self._verified else task.identity or task.user

    def _function(self, function_id: str) -> _Function:
        """A function from the cache, or fetched from the registry once."""
        function = self._functions.get(function_id)
        if function is None:
            assert self._registry is not None
            found = self._registry.get_function(function_id)
            function = _Function(base64.b64decode(found.payload_b64), found.python_version)
            self._functions[function_id] = function
        return function

    def _run(self, ticket: _Ticket, function: _Function) -> None:
        task = ticket.task
        assert task is not None
        if not self._cancels.begin(task.task_id, task.user):
            logger.info("task %s was cancelled before it started", task.task_id)
            error = ErrorInfo(type="TaskCancelled",
                              message=f"task {task.task_id} was cancelled before it started")
            self._answer(ticket, error_result(task, error, state="cancelled",
                                              timings=Timings(received=ticket.received)))
            return
        job = Job(task.task_id, task.function_id, function.payload, function.python,
                  task.content_type, task.payload, task.sender_python, task.sender_serializer,
                  self.config.output_limit, task.resource_spec, self._identity_of(task),
                  task.user_endpoint_config, self.config.result_size_limit)
        self._engine.submit(job, lambda outcome: self._handling(
            ticket, partial(self._on_outcome, outcome=outcome)))
        if self._cancels.submitted(task.task_id):  # cancelled while it was being submitted
            logger.info("cancel task %s: %s", task.task_id, self._engine.cancel(task.task_id))

    def _on_outcome(self, ticket: _Ticket, outcome: Outcome) -> None:
        task = ticket.task
        assert task is not None
        self._cancels.end(task.task_id)
        if outcome.lost:
            self._settle(ticket, Settlement.REQUEUE)
            return
        outcome = checked_outcome(outcome, self.config.result_size_limit)
        self._answer(ticket, new_result({
            "task_id": task.task_id, "task_group_id": task.task_group_id,
            "endpoint_id": self.endpoint_id, "function_id": task.function_id, "user": task.user,
            "on_behalf_of": task.on_behalf_of, "state": outcome.state,
            "content_type": outcome.content_type, "payload": outcome.payload,
            "error": outcome.error,
            "timings": {"received": ticket.received, "started": outcome.started,
                        "finished": outcome.finished},
            "worker": outcome.worker, "stdout": outcome.stdout, "stderr": outcome.stderr,
            "sender_python": PYTHON_VERSION,
            "sender_serializer": SERIALIZERS[outcome.content_type].label
            if outcome.content_type else ""}))

    # -- answers: each delivery gets exactly one ----------------------------------------

    def _fail(self, ticket: _Ticket, exc: Exception) -> None:
        """Something raised on a task's way: tell its sender if the task was decoded (so we
        know whom), else dead-letter it; nothing if it was answered already."""
        task = ticket.task
        logger.warning("handling task %s failed: %s: %r", task.task_id if task else
                       _shown(ticket.delivery.envelope.message_id), type(exc).__name__,
                       str(exc)[:LOGGED_TEXT])
        logger.debug("the failure in full", exc_info=exc)
        if task is None:
            self._settle(ticket, Settlement.DEAD_LETTER)
            return
        self._cancels.end(task.task_id)
        self._answer_error(ticket, error_info(
            "AgentError", f"endpoint {self.endpoint_id} could not handle task {task.task_id}: "
                          f"{type(exc).__name__}: {exc}"))

    def _answer_error(self, ticket: _Ticket, error: ErrorInfo) -> None:
        assert ticket.task is not None
        logger.warning("refused task %s: %s", ticket.task.task_id, error.message)
        self._metrics.count_refusal(error.type)
        self._answer(ticket, error_result(ticket.task, error,
                                          timings=Timings(received=ticket.received)))

    def _answer(self, ticket: _Ticket, result: ResultMessage) -> None:
        """Answer a task with ``result``, unless it was answered already."""
        if ticket.claim():
            self._send(ticket, result, last_try=False)

    def _send(self, ticket: _Ticket, result: ResultMessage, *, last_try: bool) -> None:
        """Publish a result; settle the task once the broker answers: ack it when confirmed,
        requeue it when the broker may take the result later, and when it never will (a
        :class:`Refusal`), answer with a small error result instead, or dead-letter it if
        even that is refused."""
        assert self._broker is not None

        def confirmed(reason: str | None) -> None:
            if reason is None:
                self._remember_done(result.task_id)
                with self._lock:
                    self._counts[_COUNTER[result.state]] += 1
                self._metrics.observe_result(result)
                self._finish(ticket, Settlement.ACK)
            elif not isinstance(reason, Refusal):
                logger.warning("result of task %s not confirmed (%s); requeueing the task",
                               result.task_id, reason)
                self._finish(ticket, Settlement.REQUEUE)
            elif last_try:
                logger.warning("the broker refused the error result of task %s too (%s); "
                               "dead-lettering the task", result.task_id, reason)
                self._finish(ticket, Settlement.DEAD_LETTER)
            else:
                logger.warning("the broker refused the result of task %s for good (%s); "
                               "answering with an error instead", result.task_id, reason)
                self._send(ticket, _refused(result, reason), last_try=True)

        try:
            key = self._topology.routing_key("result", user=result.user,
                                             task_group_id=result.task_group_id)
            if ticket.batch is None:  # a sender of single tasks gets single results
                self._publish_results(key, encode_result(result), confirmed)
            elif last_try:
                self._results.add(key, result, confirmed)
            else:
                ticket.batch.answer(lambda more_coming: self._results.add(
                    key, result, confirmed, more_coming=more_coming))
        except Exception as exc:  # noqa: BLE001 - a publish that cannot even be queued never succeeds
            logger.warning("cannot publish the result of task %s (%s: %r); dead-lettering the "
                           "task", result.task_id, type(exc).__name__, str(exc)[:LOGGED_TEXT])
            self._finish(ticket, Settlement.DEAD_LETTER)

    def _settle(self, ticket: _Ticket, how: Settlement) -> None:
        """Answer a task without a result (ack, requeue or dead-letter it), unless it was
        answered already."""
        if ticket.claim():
            self._finish(ticket, how)

    def _finish(self, ticket: _Ticket, how: Settlement) -> None:
        """Ack, requeue or dead-letter the delivery: once, whatever calls this twice."""
        assert self._broker is not None
        if not ticket.settle():
            return
        if ticket.batch is None:
            self._broker.settle(ticket.delivery, how)
        else:
            self._settle_in_batch(ticket, how)
        with self._lock:
            self._in_flight -= 1

    def _refuse_undecodable(self, ticket: _Ticket, exc: ProtocolError) -> None:
        """Answer a malformed task if it names, within bounds, an id and a sender the
        broker vouches for; else dead-letter it."""
        envelope = ticket.delivery.envelope
        logger.warning("undecodable task %s (%d bytes): %r", _shown(envelope.message_id),
                       len(exc.raw), str(exc)[:LOGGED_TEXT])
        self._metrics.count_refusal("ProtocolError")
        headers = envelope.headers if isinstance(envelope.headers, dict) else {}
        try:
            result = ResultMessage(
                task_id=envelope.message_id,
                task_group_id=envelope.correlation_id or _header_text(headers, H_GROUP),
                endpoint_id=self.endpoint_id, user=_header_text(headers, H_USER),
                state="failed", content_type=JSON.content_type,
                error=error_info("ProtocolError", str(exc)),
                timings=Timings(received=ticket.received))
        except ValidationError:
            result = None  # no id or sender within bounds: nobody to tell
        if result is None or not self._sent_by(ticket.delivery, result.user):
            self._settle(ticket, Settlement.DEAD_LETTER)
        else:
            self._answer(ticket, result)

    # -- batches: several tasks in one delivery ------------------------------------------

    def _on_batch(self, delivery: Delivery) -> None:
        """IO thread: each task of a batch goes its own way, as if it had come alone; a
        redelivered batch (its agent died, or a task of it could not be settled) is split
        into single tasks instead, so that a task killing its agent is dead-lettered alone."""
        try:
            entries = split_batch(delivery.envelope)
        except ProtocolError as exc:
            logger.warning("dead-lettering a malformed batch (%d bytes) from %r: %r",
                           len(exc.raw), delivery.user_id, str(exc)[:LOGGED_TEXT])
            self._broker_session().settle(delivery, Settlement.DEAD_LETTER)
            return
        if delivery.redelivered:
            self._split(delivery, entries)
            return
        batch, received = BatchDelivery(delivery, len(entries)), time.time()
        with self._lock:
            self._counts["received"] += len(entries)
            self._in_flight += len(entries)
        with self._engine.together():
            for entry in entries:
                self._handling(_Ticket(delivery.carrying(entry), received, batch=batch),
                               self._take)

    def _settle_in_batch(self, ticket: _Ticket, how: Settlement) -> None:
        """One task of a batch is done: a task to requeue goes back to the queue alone (its
        sender checked), where the broker counts its deliveries apart from its batch-mates';
        one to dead-letter (whose sender could not be told) is dropped."""
        batch = ticket.batch
        assert batch is not None
        if how is Settlement.REQUEUE and ticket.verified:
            logger.info("task %s of a batch goes back to the queue alone",
                        _shown(ticket.delivery.envelope.message_id))
            self._requeue_alone(ticket.delivery.envelope, partial(self._batch_task_done, batch))
            return
        if how is Settlement.DEAD_LETTER:
            logger.warning("dropped task %s of a batch from %r: it could not be answered",
                           _shown(ticket.delivery.envelope.message_id), ticket.delivery.user_id)
        self._batch_task_done(batch, "unsettled" if how is Settlement.REQUEUE else None)

    def _batch_task_done(self, batch: BatchDelivery, reason: str | None) -> None:
        """A task of ``batch`` is settled (``reason``: it could not be); settle the batch's
        delivery once all are."""
        how = batch.task_settled(settled_alone=reason is None)
        if how is not None:
            self._broker_session().settle(batch.delivery, how)

    def _requeue_alone(self, envelope: Envelope, on_confirm: ConfirmCallback) -> None:
        """Send a task of a batch back to our own queue as a single message."""
        self._broker_session().publish(
            self._topology.exchange("tasks"),
            self._topology.routing_key("task", endpoint_id=self.endpoint_id),
            self._requeue_seal.seal(envelope), on_confirm=on_confirm)

    def _split(self, delivery: Delivery, entries: list[Envelope]) -> None:
        """IO thread: put each task of a redelivered batch back alone, but those whose
        sender is not who they claim, or whose result is confirmed already (here, or in the
        ledger: asked off this thread); ack the batch once the broker has them all."""
        waiting = unsplit_tasks(entries, lambda task: self._sent_by(delivery, task.user)
                                and task.task_id not in self._done)
        try:
            self._fetcher.submit(self._split_unfinished, delivery, waiting)
        except RuntimeError:  # the agent is stopping: the batch goes back as it came
            self._broker_session().settle(delivery, Settlement.REQUEUE)

    def _split_unfinished(self, delivery: Delivery, waiting: dict[str, Envelope]) -> None:
        unfinished = unfinished_in_ledger(self._registry, waiting)
        logger.info("split a redelivered batch of endpoint %s: %d of its tasks go back to the "
                    "queue alone", self.endpoint_id, len(unfinished))
        if not unfinished:
            self._broker_session().settle(delivery, Settlement.ACK)
            return
        batch = BatchDelivery(delivery, len(unfinished))
        for envelope in unfinished:
            self._requeue_alone(envelope, partial(self._batch_task_done, batch))

    def _publish_results(self, key: str, envelope: Envelope, on_confirm: ConfirmCallback) -> None:
        self._broker_session().publish(self._topology.exchange("results"), key, envelope,
                                       on_confirm=on_confirm)

    def _broker_session(self) -> BrokerSession:
        assert self._broker is not None
        return self._broker

    # -- commands ------------------------------------------------------------------------

    def _on_command(self, delivery: Delivery) -> None:
        """A command from gc.commands: cancel tasks that are waiting, running or yet to come.
        Whatever a command is, it is acked once: a bad one is dropped, never left unacked."""
        assert self._broker is not None
        try:
            command = decode_event(delivery.envelope)
            if isinstance(command, CancelCommand) and self._sent_by(delivery, command.user):
                for task_id in command.task_ids:
                    self._cancel(task_id, command.user)
        except Exception as exc:  # noqa: BLE001 - one bad command costs that command alone
            logger.warning("dropped a command (%d bytes) that could not be handled: %s: %r",
                           len(delivery.envelope.body), type(exc).__name__,
                           str(exc)[:LOGGED_TEXT])
        finally:
            self._broker.ack(delivery)

    def _sent_by(self, delivery: Delivery, user: str) -> bool:
        """Whether ``user`` sent it: where the broker verifies senders the ``user_id`` it
        checked must match (or be a trusted publisher's); elsewhere the claim is all there
        is."""
        return (not self._verified or delivery.user_id == user
                or delivery.user_id in self.config.trusted_publishers
                or self._split_by_us(delivery))

    def _split_by_us(self, delivery: Delivery) -> bool:
        """Whether we sent it: a task this agent took out of a batch, once it had checked
        that the batch's sender sent it (:meth:`_requeue_alone`). Our account's stamp alone
        is not enough: whoever holds our broker login has it too, but not our seal's key."""
        return (self._stamped_by_us(delivery)
                and self._requeue_seal.sealed_by_us(delivery.envelope))

    def _stamped_by_us(self, delivery: Delivery) -> bool:
        """Whether the broker stamped it with our own account's ``user_id``."""
        own = self._broker.user_id if self._broker is not None else None
        return own is not None and delivery.user_id == own

    def _own_stamp_note(self, delivery: Delivery) -> str:
        """What else drops a task with our own account's stamp than someone holding our
        login: an agent of this endpoint on another host, which seals with its own key."""
        if not self._stamped_by_us(delivery):
            return ""
        return ("; it is stamped with this agent's own account but not sealed with this "
                "agent's requeue.key: if another host runs this endpoint's agent too, give "
                "every host the same requeue.key (from the endpoint's folder), or its split "
                "batches are dropped here")

    def _cancel(self, task_id: str, user: str) -> None:
        step, owner = self._cancels.cancel(task_id, user)
        if step == "refused":
            logger.warning("refused %s's request to cancel task %s of %s", user, task_id, owner)
            return
        how: str = step
        if step == "at-engine":
            how = self._engine.cancel(task_id)
            if how == "unknown":  # it finished meanwhile: a redelivery is answered, not run
                self._cancels.remember(task_id, user)
        logger.info("cancel task %s: %s", task_id, _CANCEL_SHOWN.get(how, how))

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
            if self._broker.gave_up is not None:
                logger.error("the broker session of endpoint %s gave up (%s); the agent stops",
                             self.endpoint_id, self._broker.gave_up)
                self.broken.set()
                return
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
        self._broker.queue_counts(queue, self._note_depth)
        heartbeat = self.heartbeat()
        self._broker.publish(self._topology.exchange("events"), key, encode_event(heartbeat),
                             persistent=False)
        if self._on_heartbeat is not None:
            self._on_heartbeat(heartbeat, self.broker_problem())

    def broker_problem(self) -> str | None:
        """What keeps the agent from its broker, as its session reports it; None while
        connected."""
        broker = self._broker
        if broker is None:
            return "not started"
        if broker.gave_up is not None:
            return f"gave up: {broker.gave_up}"
        if not broker.connected:
            return "disconnected; reconnecting"
        if broker.blocked is not None:
            return (f"the broker takes no messages ({broker.blocked}): results wait until its "
                    "memory or disk alarm clears")
        return None

    def _note_depth(self, counts: QueueCounts) -> None:
        self._queue_depth = counts.messages

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


def _refused(result: ResultMessage, reason: str) -> ResultMessage:
    """The small error result that answers a task whose result the broker refused for good."""
    return ResultMessage(
        task_id=result.task_id, task_group_id=result.task_group_id,
        endpoint_id=result.endpoint_id, function_id=result.function_id, user=result.user,
        on_behalf_of=result.on_behalf_of, state="failed", content_type=JSON.content_type,
        error=error_info("ResultRefused", f"the broker refused the result of task "
                                          f"{result.task_id} for good: {reason}"),
        timings=result.timings, worker=result.worker, sender_python=PYTHON_VERSION)


def _header_text(headers: dict[str, Any], name: str) -> str:
    """A header as text, or "" if it is not text (the model's checks do the rest)."""
    value = headers.get(name, "")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""


def _shown(untrusted: str) -> str:
    """An unchecked value as a log line may show it: escaped and cut, so it cannot forge
    a line of its own."""
    return repr(untrusted[:LOGGED_TEXT])
