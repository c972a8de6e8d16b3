"""A property-based fuzz run: generated hostile messages at a live agent and at the ledger.

Hypothesis draws messages (``tests/security/wire_strategies.py``) for six targets: the
agent's task and command queues, ``gc.results``, ``gc.events``, ``gc.dead`` and
``gc.ledger`` itself; a loop publishes them with raw pika, confirms on. Ordinary tasks go in
between. Afterwards the agent and the ledger must be alive, every queue settled (nothing
left unacked), the agent's memory flat, every ordinary task done, and no pickle loaded.

``GC_FUZZ_MESSAGES`` sets the count (the suite's default is small), ``GC_FUZZ_SEED`` the
seed, so a failure replays exactly; with ``GC_FUZZ_REPORT`` the figures are written there
as JSON (``tests/security/fuzz_report.py`` runs the full count and prints them).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pika
import pika.exceptions
import pytest
from hypothesis import HealthCheck, Phase, given, settings

from gc_client import Client, Executor
from gc_core.topology import load_topology
from tests.fabric import Endpoint, Fabric, eventually, rabbitmqctl
from tests.security.wire_strategies import (
    TARGETS,
    Aim,
    Material,
    Unencodable,
    WireMessage,
    compose,
    describe,
    materials,
)

#: Messages the suite's run generates; GC_FUZZ_MESSAGES raises it for the full figures.
DEFAULT_MESSAGES = 600
#: Seed of the run (GC_FUZZ_SEED): the same seed replays the same messages.
DEFAULT_SEED = 11
#: How much the agent's resident memory may grow over the run.
RSS_GROWTH_LIMIT = 50 * 2**20
#: An ordinary task goes to the agent after every this many generated messages.
CANARY_EVERY = 100
#: Messages between looks at the agent's log and the ledger's threads.
CHECK_EVERY = 25
#: Recent messages per target kept to show with a harm, and how much of each is shown.
RECENT_PER_TARGET, DESCRIBE_LIMIT = 4, 500
#: Seconds for the fabric to settle after the run, plus this many per message.
SETTLE_SECONDS, SETTLE_SECONDS_PER_MESSAGE = 60.0, 0.03
#: Log lines that mean a message killed a thread, escaped its handler, or broke the
#: connection it came on (pika's IO loop hit an exception: every unacked delivery replays).
FATAL_LOG_LINES = ("Exception in thread", "callback on the broker IO thread failed",
                   "lost (Stream connection lost")
#: Log words of a broker connection lost (and re-made).
RECONNECT_LOG_WORDS = (" lost (",)
#: The ledger's threads (the registry runs in this process).
LEDGER_THREADS = ("broker-gc-registry:ledger", "ledger-writer")
#: The targets whose messages reach the agent; every other target reaches the ledger.
AGENT_TARGETS = ("agent tasks", "agent commands")
#: Where a log record starts: a timestamp, or the interpreter reporting a thread's death.
_RECORD_START = re.compile(r"^(\d{4}-\d\d-\d\d |Exception in thread )")
#: A log record's timestamp.
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \S+ ")
#: Quoted values in a log line: what differs between two messages doing the same harm.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|amqps?://\S+")

TOPOLOGY = load_topology()


def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The registered function fuzzed tasks may call (with JSON arguments only)."""
    return {"args": list(args), "kwargs": kwargs}


def square(x: int) -> int:
    return x * x


@dataclass
class Figures:
    """What the run did and what it cost: the README's security section quotes these."""

    seed: int
    generated: int = 0
    #: Per target: messages the broker confirmed.
    published: Counter[str] = field(default_factory=Counter)
    #: Per target: messages the broker refused (it closed the channel or connection).
    refused: Counter[str] = field(default_factory=Counter)
    #: Per target: drawn messages no AMQP encoding can carry (an int past 64 bits, a key or
    #: id over 255 bytes); skipped, not counted as tried.
    unencodable: Counter[str] = field(default_factory=Counter)
    #: Each kind of crash (a thread died, a handler let an exception out) and how often.
    crashes: dict[str, int] = field(default_factory=dict)
    #: Queues left holding messages after the run: name -> [ready, unacked].
    wedged: dict[str, list[int]] = field(default_factory=dict)
    ordinary_tasks: int = 0
    lost_tasks: list[str] = field(default_factory=list)
    agent_reconnects: int = 0
    ledger_reconnects: int = 0
    rss_before: int = 0
    rss_after: int = 0
    #: Seconds spent generating and publishing, and in all (with the wait to settle).
    publish_seconds: float = 0.0
    seconds: float = 0.0

    def summary(self) -> str:
        tried = {t: self.published[t] + self.refused[t] for t in sorted(self.published | self.refused)}
        return (f"seed {self.seed}: {sum(tried.values()):,} messages tried ({tried}); the broker "
                f"refused {sum(self.refused.values()):,}, {sum(self.unencodable.values()):,} "
                f"unencodable skipped; {sum(self.crashes.values())} crashes, wedged slots "
                f"{self.wedged or 'none'}, {len(self.lost_tasks)} of {self.ordinary_tasks} "
                f"ordinary tasks lost; reconnects: agent {self.agent_reconnects}, ledger "
                f"{self.ledger_reconnects}; agent RSS {self.rss_before / 2**20:.1f} -> "
                f"{self.rss_after / 2**20:.1f} MiB; {self.publish_seconds:.0f}s to publish, "
                f"{self.seconds:.0f}s in all")


class _Publisher:
    """The attacker's side: raw pika, confirms on. The broker closes the channel or the
    connection over some messages (a frame too large, a field it cannot parse): reconnect."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None

    def send(self, message: WireMessage) -> str:
        """``published``, ``refused`` or ``unencodable``."""
        if self._channel is None or not self._channel.is_open:
            self._connect()
        try:
            self._channel.basic_publish(message.exchange, message.routing_key, message.body,
                                        message.properties)
        except (Unencodable, pika.exceptions.ShortStringTooLong):
            return "unencodable"  # pika marshals the whole frame before it writes a byte
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError):
            return "refused"
        except pika.exceptions.AMQPError:
            self.close()
            return "refused"
        return "published"

    def _connect(self) -> None:
        self.close()
        self._connection = pika.BlockingConnection(pika.URLParameters(self._url))
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()

    def close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            try:
                self._connection.close()
            except pika.exceptions.AMQPError:
                pass
        self._connection = self._channel = None



@dataclass
class _Watch:
    """Looks at the agent and the ledger as the run goes. Each kind of harm is reported
    once, with how often it happened and the last messages sent to its side before it was
    first seen (the agent works asynchronously: the culprit is among them, not always last)."""

    agent: Endpoint
    caplog: pytest.LogCaptureFixture
    harms: dict[str, list[Any]] = field(default_factory=dict)
    recent: dict[str, deque[str]] = field(default_factory=dict)
    _log_offset: int = 0
    _records_seen: int = 0

    def sent(self, number: int, outcome: str, message: WireMessage) -> None:
        recent = self.recent.setdefault(message.target, deque(maxlen=RECENT_PER_TARGET))
        recent.append(f"#{number} {outcome}: {describe(message)[:DESCRIBE_LIMIT]}")

    def look(self, sent: int) -> None:
        for (harm, example), agent_side in [*((h, True) for h in self._agent_harms()),
                                            *((h, False) for h in self._ledger_harms())]:
            if harm in self.harms:
                self.harms[harm][0] += 1
                continue
            shown = [line for target, lines in sorted(self.recent.items())
                     if (target in AGENT_TARGETS) == agent_side for line in lines]
            self.harms[harm] = [1, f"first seen after message {sent:,}: {example}\n    the last "
                                   "messages to its side before that:\n      "
                                   + "\n      ".join(shown)]

    @property
    def crashes(self) -> dict[str, int]:
        return {harm: seen[0] for harm, seen in self.harms.items()}

    def report(self) -> list[str]:
        return [f"{harm} ({seen[0]} times) | {seen[1]}" for harm, seen in self.harms.items()]

    def _agent_harms(self) -> list[tuple[str, str]]:
        process = self.agent.processes[-1]
        found = [] if process.poll() is None else [
            (f"the agent exited with code {process.returncode}", "")]
        text = self.agent.read_logs()
        new, self._log_offset = text[self._log_offset:], len(text)
        return found + [(f"agent: {key}", example) for key, example in _fatal_records(new)]

    def _ledger_harms(self) -> list[tuple[str, str]]:
        alive = {t.name for t in threading.enumerate() if t.is_alive()}
        found = [(f"the ledger's thread {name} died", "") for name in LEDGER_THREADS
                 if name not in alive]
        records, self._records_seen = (self.caplog.records[self._records_seen:],
                                       len(self.caplog.records))
        return found + [(f"ledger: {_QUOTED.sub('…', r.getMessage())[:200]}{_exception(r)[0]}",
                         r.getMessage()[:300] + _exception(r)[1])
                        for r in records if r.threadName in LEDGER_THREADS
                        and any(words in r.getMessage() for words in FATAL_LOG_LINES)]


def _fatal_records(log_text: str) -> list[tuple[str, str]]:
    """Each fatal record of a log as (its first line without the timestamp and the type of
    the exception that ends its traceback, that exception in full)."""
    records: list[list[str]] = []
    for line in log_text.splitlines():
        if _RECORD_START.match(line) or not records:
            records.append([line])
        else:
            records[-1].append(line)
    found = []
    for first, *rest in records:
        if any(words in first for words in FATAL_LOG_LINES):
            exception = _raised(rest)
            message = _QUOTED.sub("…", _TIMESTAMP.sub("", first))[:200]
            key = f"{message}: {exception.split(':', 1)[0]}" if exception else message
            found.append((key, exception or first[:400]))
    return found


def _raised(traceback_lines: list[str]) -> str:
    """The exception a logged traceback ends with: its first unindented line after the
    last stack, and the next two lines (pydantic says what failed there)."""
    last_stack = max((i for i, line in enumerate(traceback_lines)
                      if line.startswith("Traceback ")), default=-1)
    after = traceback_lines[last_stack + 1:]
    start = next((i for i, line in enumerate(after) if line and not line[0].isspace()), None)
    return "" if start is None else " / ".join(line.strip() for line in after[start:start + 3])[:400]


def _exception(record: logging.LogRecord) -> tuple[str, str]:
    """The type of the exception a log record carries, and the exception in full."""
    if record.exc_info is None or record.exc_info[0] is None:
        return "", ""
    return (f": {record.exc_info[0].__name__}",
            " / " + traceback.format_exception_only(*record.exc_info[:2])[-1].strip()[:300])


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _queue_counts(vhost: str, names: list[str]) -> dict[str, list[int]]:
    """Ready and unacked messages of each named queue."""
    counts = {}
    for line in rabbitmqctl("-p", vhost, "list_queues", "name", "messages_ready",
                            "messages_unacknowledged").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in names:
            counts[parts[0]] = [int(parts[1]), int(parts[2])]
    return counts


def _remaining(deadline: float) -> float:
    return max(5.0, deadline - time.monotonic())


def _unsettled(vhost: str, queues: list[str], deadline: float) -> dict[str, list[int]]:
    """Queues still holding messages (ready, unacked) once the deadline has passed."""
    left: dict[str, list[int]] = {}

    def settled() -> bool:
        left.clear()
        left.update({q: c for q, c in _queue_counts(vhost, queues).items() if any(c)})
        return not left

    try:
        eventually(settled, timeout=_remaining(deadline), what="queues to settle")
    except AssertionError:
        pass
    return left


def _lost(futures: list[Future[Any]], deadline: float) -> list[str]:
    """The ordinary tasks that did not succeed by the deadline, and why."""
    wait(futures, timeout=_remaining(deadline))
    lost = []
    for future in futures:
        task = getattr(future, "task_id", "?")
        if not future.done():
            lost.append(f"{task}: no result")
        elif future.exception() is not None:
            lost.append(f"{task}: {type(future.exception()).__name__} {future.exception()}"[:300])
        elif future.result() != square(7):
            lost.append(f"{task}: wrong value {future.result()!r}")
    return lost


def _count_env(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _publish_generated(aim: Aim, count: int, seed: int,
                       on_message: Callable[[WireMessage], None]) -> None:
    """Draw ``count`` messages and hand each to ``on_message``, the targets in turn.

    Hypothesis draws the values (generation only: there is nothing to shrink, the harm is
    judged after the run); a Random seeded by ``seed`` and the message's number composes
    them, so the same seed replays the same messages.
    """
    targets, sent = list(TARGETS), [0]

    @hypothesis.seed(seed)
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(material=materials(aim))
    def publish(material: Material) -> None:
        number = sent[0]
        sent[0] += 1
        on_message(compose(targets[number % len(targets)], random.Random(f"{seed}:{number}"),
                           aim, material))

    publish()


def _recorded(client: Client, task_id: str, deadline: float) -> str | None:
    """None once the ledger records ``task_id`` as a success, else what it says instead."""
    try:
        eventually(lambda: client.get_task(task_id).status == "success",
                   timeout=_remaining(deadline), what="the ledger to record the task")
    except AssertionError:
        return (f"the ledger never recorded the ordinary task {task_id} after the run as a "
                f"success (it says {client.get_task(task_id).status!r})")
    return None


def _health(fabric: Fabric) -> str | None:
    answer = httpx.get(f"{fabric.registry_url}/health", timeout=10).json()
    if answer.get("status") != "ok" or answer.get("ledger") != "consuming":
        return f"the registry's /health says {answer}"
    return None


def _reconnects(lines: list[str]) -> int:
    return sum(any(words in line for words in RECONNECT_LOG_WORDS) for line in lines)


@dataclass
class _Run:
    """One fuzz run against a live agent: publish, then see what is left standing."""

    fabric: Fabric
    endpoint: Endpoint
    client: Client
    executor: Executor
    watch: _Watch
    figures: Figures
    canaries: list[Future[Any]] = field(default_factory=list)

    def publish(self, aim: Aim, count: int) -> None:
        """Publish ``count`` generated messages, an ordinary task every CANARY_EVERY."""
        publisher = _Publisher(self.fabric.broker_url)

        def on_message(message: WireMessage) -> None:
            self.figures.generated += 1
            outcome = publisher.send(message)
            getattr(self.figures, outcome)[message.target] += 1
            self.watch.sent(self.figures.generated, outcome, message)
            if self.figures.generated % CANARY_EVERY == 0:
                self.canaries.append(self.executor.submit(square, 7))
            if self.figures.generated % CHECK_EVERY == 0:
                self.watch.look(self.figures.generated)

        try:
            _publish_generated(aim, count, self.figures.seed, on_message)
        finally:
            publisher.close()
        self.watch.look(self.figures.generated)

    def judge(self, deadline: float) -> list[str]:
        """Fill in the figures; the problems found, each one sentence or more."""
        figures, agent = self.figures, self.endpoint.processes[-1]
        final = self.executor.submit(square, 7)
        figures.ordinary_tasks = len(self.canaries) + 1
        figures.lost_tasks = _lost([*self.canaries, final], deadline)
        problems = [p for p in (_recorded(self.client, final.task_id, deadline),
                                _health(self.fabric)) if p is not None]
        queues = [TOPOLOGY.queue(kind, endpoint_id=self.endpoint.endpoint_id).name
                  for kind in ("endpoint_tasks", "endpoint_commands")]
        figures.wedged = _unsettled(self.fabric.vhost, [*queues, TOPOLOGY.queue("ledger").name],
                                    deadline)
        self.watch.look(figures.generated)
        figures.crashes = self.watch.crashes
        figures.rss_after = _rss(agent.pid) if agent.poll() is None else 0
        figures.agent_reconnects = _reconnects(self.endpoint.read_logs().splitlines())
        figures.ledger_reconnects = _reconnects([r.getMessage() for r in self.watch.caplog.records
                                                 if "gc-registry:ledger" in r.getMessage()])
        problems += self.watch.report()
        if figures.wedged:
            problems.append(f"queues still hold messages (ready, unacked) after the run: "
                            f"{figures.wedged}")
        if figures.rss_after - figures.rss_before > RSS_GROWTH_LIMIT:
            problems.append(f"the agent's memory grew by "
                            f"{(figures.rss_after - figures.rss_before) / 2**20:.0f} MiB, over "
                            f"the {RSS_GROWTH_LIMIT / 2**20:.0f} MiB allowed")
        if figures.lost_tasks:
            problems.append(f"ordinary tasks lost: {figures.lost_tasks}")
        return problems


def test_generated_hostile_messages_leave_the_agent_and_the_ledger_working(
        fabric: Fabric, make_endpoint: Any, client: Client, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    count = _count_env("GC_FUZZ_MESSAGES", DEFAULT_MESSAGES)
    # Given a live agent, a function it may run, and a user with an ordinary Executor
    endpoint: Endpoint = make_endpoint(heartbeat_period=1.0)
    agent = endpoint.start()
    marker = tmp_path / f"pickle-was-loaded-{uuid.uuid4().hex[:8]}"
    aim = Aim(TOPOLOGY, endpoint.endpoint_id, client.register_function(echo), "fuzz", str(marker))
    executor = Executor(endpoint_id=endpoint.endpoint_id, client=client)
    run = _Run(fabric, endpoint, client, executor, _Watch(endpoint, caplog),
               Figures(seed=_count_env("GC_FUZZ_SEED", DEFAULT_SEED)))
    try:
        assert executor.submit(square, 7).result(timeout=60) == square(7)
        alive = {t.name for t in threading.enumerate()}
        assert set(LEDGER_THREADS) <= alive, f"no ledger threads named {LEDGER_THREADS} to watch"
        run.figures.rss_before = _rss(agent.pid)
        started = time.monotonic()
        # When thousands of generated messages reach the agent, the ledger and gc.dead
        run.publish(aim, count)
        run.figures.publish_seconds = time.monotonic() - started
        # Then the agent and the ledger are alive and settled, and ordinary tasks succeed
        problems = run.judge(time.monotonic() + SETTLE_SECONDS + SETTLE_SECONDS_PER_MESSAGE * count)
        run.figures.seconds = time.monotonic() - started
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    _report(run.figures)
    # ... and no generated pickle was ever loaded, by anyone
    if marker.exists():
        problems.append(f"a generated pickle was loaded: {marker} exists")
    assert not problems, run.figures.summary() + "\n\n" + "\n\n".join(problems)


def _report(figures: Figures) -> None:
    """Write the figures where GC_FUZZ_REPORT says (fuzz_report.py reads them)."""
    path = os.environ.get("GC_FUZZ_REPORT")
    if path:
        # Not asdict(): it rebuilds a Counter from its (key, count) pairs, as keys.
        Path(path).write_text(json.dumps({**vars(figures), "summary": figures.summary()},
                                         indent=2, default=str))
