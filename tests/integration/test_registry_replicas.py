"""Several registries on one PostgreSQL database consume ``gc.ledger`` side by side.

Each test has a vhost and a PostgreSQL database of its own (``CREATE DATABASE``, dropped
after). The sweeps' registries are ``gc-registry serve`` processes, so that one can be
killed with SIGKILL; the ordering test runs its two ledgers in this process, so that it can
hold one of them still while the other goes on.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
from sqlalchemy import create_engine, text

from gc_client import Client, Executor
from gc_core.protocol import (
    GroupManifest,
    Heartbeat,
    ResultMessage,
    encode_event,
    encode_result,
)
from gc_core.registry import identity, store
from gc_core.registry import ledger as ledger_module
from gc_core.registry.db import EndpointRow, open_database
from gc_core.registry.ledger import Ledger, Retention
from gc_core.topology import load_topology
from tests.conftest import BROKER_HOST, BROKER_PORT
from tests.fabric import (
    START_TIMEOUT,
    Fabric,
    RegistryServer,
    eventually,
    free_port,
    rabbitmqctl,
)
from tests.integration.conftest import fresh_postgres_database
from tests.secured_broker import CACHE_TTL_MS, SecuredFabric, SecuredNode, rabbitmq_installed

TOPOLOGY = load_topology()
GC_REGISTRY = Path(sys.executable).parent / "gc-registry"
#: Tasks in each sweep.
SWEEP = 2000
#: Results in when a sweep's ``midway`` step (a registry killed, say) runs.
MIDWAY = 300
#: Seconds a sweep's futures, or the ledger, may take before the test fails.
SWEEP_TIMEOUT = 300.0


#: Seconds each of a sweep's tasks takes: 2,000 of them on 4 workers outlast, by far, the
#: SIGKILL of a registry at MIDWAY results, however fast the machine (no-op tasks did not:
#: on a fast one the sweep ended before the killed registry was gone).
TASK_SECONDS = 0.002


def triple(x: int) -> int:
    import time

    time.sleep(TASK_SECONDS)
    return 3 * x


# -- fixtures: a database and a vhost of each test's own ----------------------------------

@pytest.fixture
def database() -> Iterator[str]:
    """A fresh PostgreSQL database (SQLAlchemy URL), dropped after the test."""
    with fresh_postgres_database("gc_replicas") as url:
        yield url


def _amqp_url(vhost: str, credentials: str = "guest:guest") -> str:
    return f"amqp://{credentials}@{BROKER_HOST}:{BROKER_PORT}/{vhost}"


# -- registries as processes --------------------------------------------------------------

@dataclass
class Served:
    """A ``gc-registry serve`` process and where it answers."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def exit_code(self, timeout: float = 60) -> int:
        """The exit status of a registry that should stop by itself (stopped if not)."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"gc-registry serve went on serving:\n{self.output()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _serve(db_url: str, home: Path, *args: str, name: str, vhost: str = "",
           port: int | None = None) -> Served:
    """Start ``gc-registry serve`` on ``db_url`` with ``args`` (open auth, its ledger on
    ``vhost`` of the shared broker, unless they say otherwise)."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = home / f"{name}.log"
    env = {**os.environ, "GC_HOME": str(home)}
    if vhost:
        env["GC_BROKER_URL"] = _amqp_url(vhost)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(GC_REGISTRY), "serve", "--db", db_url, "--port", str(port), "--log-level",
             "INFO", *(args or ("--auth", "open"))], env=env, stdout=out, stderr=subprocess.STDOUT)
    return Served(process, f"http://127.0.0.1:{port}", log)


def serving(db_url: str, home: Path, *, vhost: str, port: int | None = None) -> Served:
    """``_serve`` on ``vhost`` (open auth), once its ledger consumes."""
    served = _serve(db_url, home, name=f"registry-{uuid.uuid4().hex[:4]}", vhost=vhost, port=port)
    eventually(lambda: _consuming(served), START_TIMEOUT, "the registry to serve")
    return served


def fabric_served_by(served: Served, home: Path, vhost: str) -> Fabric:
    """Where clients and agents of ``served``'s vhost live (GC_HOME ``home``)."""
    return Fabric(broker_url=_amqp_url(vhost), registry_url=served.url, home=home, vhost=vhost)


def _consuming(served: Served) -> bool:
    if served.process.poll() is not None:
        raise AssertionError(f"gc-registry serve exited {served.process.returncode}:\n"
                             f"{served.output()}")
    try:
        return bool(httpx.get(f"{served.url}/health", timeout=5).json()["ledger"] == "consuming")
    except httpx.HTTPError:
        return False


def _all_consuming(registries: list[Served]) -> None:
    for served in registries:
        eventually(lambda served=served: _consuming(served), START_TIMEOUT,  # type: ignore[misc]
                   "the registry's ledger")


def _registries(db_url: str, vhost: str, home: Path, count: int) -> list[Served]:
    """``count`` registries on one database and one vhost, each consuming gc.ledger."""
    started = [_serve(db_url, home, name=f"registry-{n}", vhost=vhost) for n in range(count)]
    _all_consuming(started)
    eventually(lambda: _ledger_consumers(rabbitmqctl, vhost) == count, 30,
               f"{count} consumers of gc.ledger")
    return started


def _ledger_consumers(ctl: Callable[..., str], vhost: str) -> int:
    out = ctl("list_queues", "-p", vhost, "name", "consumers", "--no-table-headers")
    counts = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
    return int(counts.get(TOPOLOGY.queue("ledger").name, 0))


def _task_rows(db_url: str, table: str = "tasks") -> list[tuple[str, str]]:
    """(task id, status) of every row of the ledger's tasks table (of results set aside:
    (task id, sender))."""
    column = "status" if table == "tasks" else "sender"
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            return [(row[0], row[1]) for row in connection.execute(
                text(f"SELECT task_id, {column} FROM {table}"))]
    finally:
        engine.dispose()


def _all_finished(db_url: str, task_ids: set[str]) -> list[tuple[str, str]] | None:
    rows = _task_rows(db_url)
    finished = {task_id for task_id, status in rows if status != "waiting"}
    return rows if task_ids <= finished else None


@dataclass
class Replicas:
    """Two registries on one PostgreSQL database consuming one vhost's gc.ledger, and
    alice's side of the fabric: ``fabric`` runs her CLI (``gc-agent``)."""

    registries: list[Served]
    fabric: Fabric
    #: rabbitmqctl on the vhost's node.
    ctl: Callable[..., str]
    vhost: str
    #: alice's registry token, on a secured broker (None: an open one).
    token: str | None = None

    def client(self) -> Client:
        return Client(broker_url=self.fabric.broker_url, registry_url=self.fabric.registry_url,
                      home=str(self.fabric.home), token=self.token,
                      user="alice" if self.token else None)


@pytest.fixture(params=["open", "secured"])
def replicas(request: pytest.FixtureRequest, database: str,
             tmp_path: Path) -> Iterator[Replicas]:
    """Two registries on ``database``: open ones on a vhost of the shared broker, or
    tokens-mode ones on a secured node of their own, whose ledgers believe only the
    senders the broker checked (so a result may come before its manifest)."""
    home = tmp_path / "home"
    if request.param == "open":
        vhost: str = request.getfixturevalue("own_vhost")
        registries = _registries(database, vhost, tmp_path / "registries", 2)
        try:
            yield Replicas(registries, Fabric(broker_url=_amqp_url(vhost),
                                              registry_url=registries[0].url, home=home,
                                              vhost=vhost), rabbitmqctl, vhost)
        finally:
            for served in registries:
                served.stop()
        return
    with _secured_replicas(database, tmp_path, home) as secured:
        yield secured


@contextmanager
def _secured_replicas(db_url: str, tmp: Path, home: Path) -> Iterator[Replicas]:
    """A secured node (``deploy/rabbitmq/start-secured-node.sh``) that asks the first of
    two tokens-mode registries on ``db_url``; alice is a user of theirs."""
    if not rabbitmq_installed():
        pytest.skip("RabbitMQ is not installed: `make test` installs it")
    ports = [free_port() for _ in range(2)]
    node = SecuredNode(directory=tmp / "node", name=f"gc-test-{uuid.uuid4().hex[:8]}@localhost",
                       port=free_port(), env={})
    node.env = {**os.environ, "GC_NODE_DIR": str(node.directory), "GC_NODE_NAME": node.name,
                "GC_NODE_PORT": str(node.port), "GC_DIST_PORT": str(free_port()),
                "GC_REGISTRY_URL": f"http://127.0.0.1:{ports[0]}",
                "GC_AUTH_CACHE_TTL": str(CACHE_TTL_MS)}
    sessions = open_database(db_url)
    with sessions() as db:
        identity.create_user(db, "alice")
        token = identity.issue_token(db, "alice").token
    sessions.kw["bind"].dispose()
    registries: list[Served] = []
    node.script("start")
    try:
        for n in range(2):
            registries.append(_serve(
                db_url, tmp / "registries", "--auth", "tokens",
                "--broker-url-file", str(node.directory / "registry-broker-url"),
                "--broker-auth-secret-file", str(node.directory / "registry-auth-secret"),
                name=f"registry-{n}", port=ports[n]))
        _all_consuming(registries)

        def ctl(*args: str) -> str:
            return node.script("ctl", *args)

        eventually(lambda: _ledger_consumers(ctl, "/") == 2, 30, "2 consumers of gc.ledger")
        yield Replicas(registries, SecuredFabric(
            broker_url=node.url, registry_url=registries[0].url, home=home, vhost="/",
            user="alice", token=token), ctl, "/", token)
    finally:
        for served in registries:
            served.stop()
        node.script("stop", timeout=60)
        shutil.rmtree(node.directory, ignore_errors=True)


def _sweep(replicas: Replicas, midway: Callable[[], None] | None = None) -> tuple[set[str], int]:
    """Run a SWEEP-task sweep through a real agent, calling ``midway`` (on a thread of its
    own, while tasks are still being submitted if need be) as soon as MIDWAY results are in;
    return the task ids and how many had finished when ``midway`` returned. Polling for the
    count instead let a fast machine finish the whole sweep between two looks."""
    endpoint = replicas.fabric.configure_endpoint("sweep", workers=4)
    endpoint.start()
    reached, lock = threading.Event(), threading.Lock()
    done = [0, 0]  # results in so far, and by the time midway returned
    futures: list[Any] = []

    def count(_future: object) -> None:
        with lock:
            done[0] += 1
            if done[0] == MIDWAY:
                reached.set()

    def at_midway() -> None:
        if reached.wait(SWEEP_TIMEOUT) and midway is not None:
            midway()
            with lock:
                done[1] = done[0]

    caller = threading.Thread(target=at_midway, name="midway", daemon=True)
    try:
        with replicas.client() as client, \
                Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
            caller.start()
            for x in range(SWEEP):
                futures.append(ex.submit(triple, x))
                futures[-1].add_done_callback(count)
            values = [f.result(timeout=SWEEP_TIMEOUT) for f in futures]
            task_ids = {f.task_id for f in futures}
            caller.join(SWEEP_TIMEOUT)
    finally:
        endpoint.stop_all()
    assert values == [3 * x for x in range(SWEEP)]
    assert len(task_ids) == SWEEP
    return task_ids, done[1]


def _assert_each_task_once(db_url: str, task_ids: set[str]) -> None:
    rows = eventually(lambda: _all_finished(db_url, task_ids), SWEEP_TIMEOUT,
                      "the ledger to record every result")
    assert len(rows) == SWEEP, f"{len(rows)} task rows for {SWEEP} tasks"
    assert {task_id for task_id, _status in rows} == task_ids
    assert {status for _task_id, status in rows} == {"success"}
    # and no result still waits aside for a manifest
    assert _task_rows(db_url, "early_results") == []


# -- the sweeps -----------------------------------------------------------------------------

def test_two_registries_record_each_task_once_and_one_killed_mid_sweep_loses_no_record(
        replicas: Replicas, database: str) -> None:
    # Given two registries on one database, both consuming the vhost's gc.ledger, and a
    # sweep under way (the agent and the client talk to the first; on the secured node the
    # broker asks it who may log in)
    survivor, victim = replicas.registries

    def kill_the_second() -> None:
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(30)

    # When the second is killed with SIGKILL mid-sweep, holding deliveries it had not
    # committed yet
    task_ids, done_at_kill = _sweep(replicas, midway=kill_the_second)
    # Then every task is recorded exactly once, whichever of the two took its result
    assert done_at_kill < SWEEP, "the sweep finished before the kill; the test proved nothing"
    _assert_each_task_once(database, task_ids)
    assert _consuming(survivor)
    eventually(lambda: _ledger_consumers(replicas.ctl, replicas.vhost) == 1, 30,
               "the broker to drop the killed registry's consumer")


# -- a result whose manifest another registry has not committed yet -------------------------

@pytest.fixture
def impersonator(own_vhost: str) -> Iterator[str]:
    """A broker account of this test's own that may stamp any ``user_id`` on ``own_vhost``
    (RabbitMQ's ``impersonator`` tag), as the secured node's checked senders would: the
    ledgers here believe ``user_id`` as a tokens-mode registry on a secured broker does.
    Yields its AMQP URL."""
    name, password = f"gc-impersonator-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rabbitmqctl("add_user", name, password)
    try:
        rabbitmqctl("set_user_tags", name, "impersonator")
        rabbitmqctl("set_permissions", "-p", own_vhost, name, ".*", ".*", ".*")
        yield _amqp_url(own_vhost, f"{name}:{password}")
    finally:
        rabbitmqctl("delete_user", name)


def _publish_as(url: str, sender: str, exchange: str, routing_key: str, envelope: Any) -> None:
    """Publish ``envelope`` stamped with ``user_id`` ``sender``; the broker must confirm it."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, routing_key, envelope.body, pika.BasicProperties(
            message_id=envelope.message_id or None,
            correlation_id=envelope.correlation_id or None,
            content_type=envelope.content_type, headers=envelope.headers, user_id=sender,
            delivery_mode=2))
    finally:
        connection.close()


def _ledger_ready(vhost: str) -> int:
    out = rabbitmqctl("list_queues", "-p", vhost, "name", "messages_ready",
                      "--no-table-headers")
    counts = dict(line.split() for line in out.splitlines() if line.strip())
    return int(counts.get(TOPOLOGY.queue("ledger").name, -1))


def test_a_result_whose_manifest_another_registry_is_still_writing_is_recorded_once_it_is(
        database: str, own_vhost: str, impersonator: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gc_core.registry.ledger")
    ledger_url = _amqp_url(own_vhost)
    sessions = open_database(database)
    engine = sessions.kw["bind"]
    group, task_id, endpoint = f"g-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()), "ep-a"
    # Given registry A's ledger, which takes one delivery at a time, and whose database
    # writes stall (another transaction holds the tasks table)
    monkeypatch.setattr(ledger_module, "LEDGER_PREFETCH", 1)
    # (no result expires here: that sweep would wait for the lock too)
    first = Ledger(broker_url=ledger_url, topology=TOPOLOGY, sessions=sessions,
                   retention=Retention(ttl=None), verify_senders=True)
    monkeypatch.undo()
    second: Ledger | None = None
    blocker = engine.connect()
    blocker.execute(text("LOCK TABLE tasks IN EXCLUSIVE MODE"))
    try:
        first.start()
        eventually(lambda: first.connected, 30, "registry A's ledger")
        # When alice's manifest reaches registry A, which cannot commit it yet
        _publish_as(impersonator, "alice", TOPOLOGY.exchange("events"),
                    TOPOLOGY.routing_key("group_submitted", task_group_id=group),
                    encode_event(GroupManifest(task_group_id=group, endpoint_id=endpoint,
                                               user="alice", task_ids=[task_id],
                                               submitted=time.time())))
        eventually(lambda: _ledger_ready(own_vhost) == 0, 30, "registry A to take the manifest")
        # and registry B's ledger gets the task's results: a forgery from another endpoint's
        # agent, then the real one from the task's own endpoint
        second = Ledger(broker_url=ledger_url, topology=TOPOLOGY,
                        sessions=open_database(database), retention=Retention(ttl=None),
                        verify_senders=True)
        second.start()
        eventually(lambda: second is not None and second.connected, 30, "registry B's ledger")
        key = TOPOLOGY.routing_key("result", user="alice", task_group_id=group)
        for sender, payload in (("endpoint-ep-b", b'"forged"'), (f"endpoint-{endpoint}", b"42")):
            _publish_as(impersonator, sender, TOPOLOGY.exchange("results"), key, encode_result(
                ResultMessage(task_id=task_id, task_group_id=group, endpoint_id=endpoint,
                              user="alice", state="success", content_type="application/json",
                              payload=payload)))
        # and registry A stays stuck for a while (a slow or locked database)
        time.sleep(8)
        blocker.rollback()
        # Then once A has committed the manifest, the real result is the task's
        def recorded() -> Any:
            with sessions() as db:
                (task,) = store.get_tasks(db, [task_id])
            return task if task.status != "waiting" and task.status != "unknown" else None

        task = eventually(recorded, 30, "the result to be recorded")
        assert (task.status, task.endpoint_id, task.user) == ("success", endpoint, "alice")
        assert task.payload_b64 == "NDI="  # b"42"
        # and the forgery cost a warning naming its sender
        assert any("'endpoint-ep-b'" in r.getMessage() and repr(task_id) in r.getMessage()
                   for r in caplog.records if r.levelno == logging.WARNING), caplog.text
    finally:
        blocker.close()
        first.stop()
        if second is not None:
            second.stop()
        engine.dispose()


#: Seconds between the broker's samples of its queues' message counts (RabbitMQ's
#: ``collect_statistics_interval``): ``list_queues`` may lag this much behind.
STATS_INTERVAL = 5.0


def _ledger_holds(vhost: str) -> int:
    """Messages in gc.ledger, ready or delivered and not yet acked."""
    out = rabbitmqctl("list_queues", "-p", vhost, "name", "messages", "--no-table-headers")
    counts = dict(line.split() for line in out.splitlines() if line.strip())
    return int(counts.get(TOPOLOGY.queue("ledger").name, -1))


def test_a_result_before_its_manifest_waits_aside_instead_of_circling_through_the_queue(
        database: str, own_vhost: str, impersonator: str) -> None:
    # Given a ledger that believes the broker's checked senders
    sessions = open_database(database)
    ledger = Ledger(broker_url=_amqp_url(own_vhost), topology=TOPOLOGY, sessions=sessions,
                    verify_senders=True)
    ledger.start()
    group, task_id, endpoint = f"g-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()), "ep-a"
    try:
        eventually(lambda: ledger.connected, 30, "the ledger")
        # When an agent's result comes for a task no manifest has named yet
        _publish_as(impersonator, f"endpoint-{endpoint}", TOPOLOGY.exchange("results"),
                    TOPOLOGY.routing_key("result", user="alice", task_group_id=group),
                    encode_result(ResultMessage(
                        task_id=task_id, task_group_id=group, endpoint_id=endpoint,
                        user="alice", state="success", content_type="application/json",
                        payload=b"42")))
        # Then the ledger takes it off gc.ledger (returned to the queue each time, it would
        # cost a redelivery every commit for as long as no manifest comes, for ever if none
        # does) and keeps it aside
        time.sleep(STATS_INTERVAL + 1)
        for _ in range(3):
            assert _ledger_holds(own_vhost) == 0, "the early result goes round gc.ledger"
            time.sleep(1)
        # and once the manifest comes, many commits later, the result is the task's
        _publish_as(impersonator, "alice", TOPOLOGY.exchange("events"),
                    TOPOLOGY.routing_key("group_submitted", task_group_id=group),
                    encode_event(GroupManifest(task_group_id=group, endpoint_id=endpoint,
                                               user="alice", task_ids=[task_id],
                                               submitted=time.time())))

        def recorded() -> Any:
            with sessions() as db:
                (task,) = store.get_tasks(db, [task_id])
            return task if task.status == "success" else None

        eventually(recorded, 30, "the early result to be recorded")
    finally:
        ledger.stop()
        sessions.kw["bind"].dispose()


def test_a_result_set_aside_just_after_its_manifest_was_committed_is_still_recorded(
        database: str, own_vhost: str) -> None:
    # Given the race the sweep is for: registry B set a result aside (no manifest named its
    # task when it looked) while registry A committed the manifest (no result was aside
    # when it looked), so neither took it back
    sessions = open_database(database)
    task_id = str(uuid.uuid4())
    with sessions() as db:
        store.record_manifest(db, GroupManifest(task_group_id="g", endpoint_id="ep-a",
                                                user="alice", task_ids=[task_id],
                                                submitted=time.time()))
        db.commit()
        store.set_aside_results(db, [store.ReceivedResult(ResultMessage(
            task_id=task_id, task_group_id="g", endpoint_id="ep-a", user="alice",
            state="success", content_type="application/json", payload=b"42"),
            "endpoint-ep-a", dead=False)])
        db.commit()
    # When any registry's ledger runs on the database
    ledger = Ledger(broker_url=_amqp_url(own_vhost), topology=TOPOLOGY, sessions=sessions,
                    verify_senders=True)
    ledger.start()
    try:
        # Then its sweep records the result, checked against the manifest
        def recorded() -> Any:
            with sessions() as db:
                (task,) = store.get_tasks(db, [task_id])
            return task if task.status == "success" else None

        task = eventually(recorded, 10 * ledger_module.SWEEP_INTERVAL + 10,
                          "the sweep to take the result back")
        assert task.payload_b64 == "NDI="
        assert _task_rows(database, "early_results") == []
    finally:
        ledger.stop()
        sessions.kw["bind"].dispose()


# -- concurrent writes to the same rows -----------------------------------------------------

def _in_threads(*calls: Callable[[], None], timeout: float = 60) -> list[BaseException]:
    """Run ``calls`` at once, each in a thread; return what they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], None]) -> None:
        try:
            start.wait()
            call()
        except BaseException as exc:  # noqa: BLE001  # reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a writer is stuck"
    return errors


def test_two_registries_writing_the_same_tasks_at_once_neither_deadlock_nor_double_them(
        database: str) -> None:
    # Given two registries' sessions on one database, and 2,000 tasks
    first, second = open_database(database), open_database(database)
    task_ids = [str(uuid.uuid4()) for _ in range(SWEEP)]
    manifest = GroupManifest(task_group_id="g", endpoint_id="ep", user="alice",
                             task_ids=task_ids, submitted=time.time())
    results = [ResultMessage(task_id=t, task_group_id="g", endpoint_id="ep", user="alice",
                             state="success", content_type="application/json", payload=b"1")
               for t in task_ids]

    def write(sessions: Any, backwards: bool) -> Callable[[], None]:
        # A redelivered manifest and results reach both, in any order
        def run() -> None:
            order = -1 if backwards else 1
            with sessions() as db:
                store.record_manifest(db, manifest.model_copy(
                    update={"task_ids": task_ids[::order]}))
                db.commit()
                store.record_results(db, results[::order])
                db.commit()
        return run

    # When both record them at the same time, in opposite orders
    for _ in range(3):
        errors = _in_threads(write(first, False), write(second, True))
        # Then neither fails (PostgreSQL finds no deadlock), and each task is one row
        assert errors == [], errors[0]
    rows = _task_rows(database)
    assert len(rows) == SWEEP and {status for _t, status in rows} == {"success"}
    for sessions in (first, second):
        sessions.kw["bind"].dispose()


def _heartbeat(endpoint_id: str, sent: float) -> Heartbeat:
    return Heartbeat(endpoint_id=endpoint_id, hostname="h", pid=1, sent=sent, period=10.0,
                     started=sent, engine="threads", workers=1, workers_busy=0,
                     tasks_received=0, tasks_succeeded=0, tasks_failed=0)


def test_a_newer_heartbeat_another_registry_recorded_meanwhile_is_never_undone(
        database: str) -> None:
    # Given an endpoint, and two registries' sessions on one database
    first, second = open_database(database), open_database(database)
    with first() as db:
        db.add(EndpointRow(endpoint_id="ep", name="ep", owner="alice", created=time.time()))
        db.commit()
        store.record_heartbeat(db, _heartbeat("ep", 1000.0), now=1000.0)
        db.commit()
    older, newer = first(), second()
    try:
        # When registry A records an older heartbeat, registry B a newer one meanwhile and
        # commits first, and then A commits
        store.record_heartbeat(older, _heartbeat("ep", 1001.0), now=2000.0)

        def record_newer() -> None:
            store.record_heartbeat(newer, _heartbeat("ep", 1002.0), now=2000.0)
            newer.commit()

        writer = threading.Thread(target=record_newer)
        writer.start()
        writer.join(2)  # B commits now, or waits for A's row lock
        older.commit()
        writer.join(30)
        assert not writer.is_alive()
    finally:
        older.close()
        newer.close()
    # Then the endpoint's last heartbeat is the newer one
    with first() as db:
        status = store.endpoint_status(db, "ep", now=1003.0)
    assert status.last_seen == 1002.0
    for sessions in (first, second):
        sessions.kw["bind"].dispose()


# -- one vhost, one database ----------------------------------------------------------------

def test_a_registry_on_another_database_refuses_a_vhost_already_served(
        database: str, own_vhost: str, tmp_path: Path) -> None:
    # Given a registry on a PostgreSQL database serving the vhost
    home = tmp_path / "registries"
    (first,) = _registries(database, own_vhost, home, 1)
    try:
        # When a registry on another database starts on the same vhost
        other = _serve(f"sqlite:///{tmp_path / 'other.db'}", home, name="other",
                       vhost=own_vhost)
        code = other.exit_code()
        # Then it refuses to start, naming the database the vhost belongs to and the ways out
        output = other.output()
        assert code != 0, output
        dbname = database.rsplit("/", 1)[1]
        assert dbname in output and own_vhost in output, output
        assert "release-vhost" in output, output
        assert _ledger_consumers(rabbitmqctl, own_vhost) == 1
        # and a second registry on the same database starts and consumes beside the first
        same = _serve(database, home, name="same", vhost=own_vhost)
        try:
            eventually(lambda: _consuming(same), START_TIMEOUT, "the second registry")
            eventually(lambda: _ledger_consumers(rabbitmqctl, own_vhost) == 2, 30,
                       "two consumers")
        finally:
            same.stop()
        # and the first went on undisturbed (its claim refused at once, never retried)
        assert "reconnect" not in first.output(), first.output()
    finally:
        first.stop()


def test_a_registry_app_on_another_database_stops_its_ledger_and_says_whose_the_vhost_is(
        database: str, own_vhost: str, tmp_path: Path) -> None:
    # Given a vhost a registry on a PostgreSQL database serves
    home = tmp_path / "registries"
    (first,) = _registries(database, own_vhost, home, 1)
    try:
        # When a registry app on another database starts in this process (as tests and
        # embedders do, without `gc-registry serve`'s check before it serves)
        server = RegistryServer(f"sqlite:///{tmp_path / 'other.db'}", _amqp_url(own_vhost))
        server.start()
        try:
            # Then its ledger consumes nothing, and /health says why, with a 503 (the
            # broker's refusal at once, then whose the vhost is, once the ledger has read it)
            def explained() -> httpx.Response | None:
                response = httpx.get(f"{server.url}/health", timeout=5)
                assert response.status_code in (200, 503), response.text
                said = response.json()["ledger"]
                return response if database.rsplit("/", 1)[1] in said else None

            response = eventually(explained, 30, "/health to say whose the vhost is")
            assert response.status_code == 503
            assert "release-vhost" in response.json()["ledger"]
            assert _ledger_consumers(rabbitmqctl, own_vhost) == 1
        finally:
            server.stop()
    finally:
        first.stop()


def test_release_vhost_lets_another_database_take_the_vhost(
        database: str, own_vhost: str, tmp_path: Path) -> None:
    # Given a vhost a registry on one database has served, and a registry on another
    home = tmp_path / "registries"
    (first,) = _registries(database, own_vhost, home, 1)
    first.stop()
    other_db = f"sqlite:///{tmp_path / 'other.db'}"
    refused = _serve(other_db, home, name="refused", vhost=own_vhost)
    assert refused.exit_code() != 0, refused.output()
    # When the operator releases the vhost
    released = subprocess.run([str(GC_REGISTRY), "release-vhost"], capture_output=True,
                              text=True, timeout=60,
                              env={**os.environ, "GC_BROKER_URL": _amqp_url(own_vhost)})
    assert released.returncode == 0, released.stderr
    assert database.rsplit("/", 1)[1] in released.stdout + released.stderr
    # Then the registry on the other database takes it
    other = _serve(other_db, home, name="other", vhost=own_vhost)
    try:
        eventually(lambda: _consuming(other), START_TIMEOUT, "the registry on the other database")
    finally:
        other.stop()
