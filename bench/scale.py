"""Scale: one registry under many endpoints and clients, and per-endpoint quorum queues.

``python -m bench.scale registry --help`` and ``python -m bench.scale queues --help`` (run
from the repo root). Each writes its part of the "Scale (issue 13)" section of RESULTS.md.

``registry``: a registry (``gc-registry serve --auth open``, SQLite unless ``--db``) in its
own vhost; N endpoints registered through its API, then heartbeating as agents do (a
:class:`~gc_core.protocol.Heartbeat` per period each, published through one
:class:`~gc_core.broker.BrokerSession`); M client threads, each in a closed loop: publish a
task group's manifest, poll the task lookup until the ledger answers ``waiting``; publish the
group's results, poll until ``success``; ask one endpoint's status. A lag is the time from
the publish call to the end of the first lookup that shows it.

``queues``: a private 3-node cluster (``deploy/rabbitmq/start-cluster.sh``); endpoint task
queues declared as the topology declares them, a third through each node, in steps; after
each step every node's memory (``rabbitmqctl status``, after ``force_gc``) and idle CPU.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import click
import httpx
from sqlalchemy import create_engine, make_url, text

from bench.harness import background_cpu_busy, nearest_rank, replace_section, section_of
from bench.peers import _process
from gc_core.broker import BrokerSession
from gc_core.errors import GCError
from gc_core.protocol import (
    GroupManifest,
    Heartbeat,
    ResultMessage,
    Timings,
    encode_event,
    encode_result,
)
from gc_core.registry_api.client import RegistryClient
from gc_core.serialize import JSON
from gc_core.topology import Topology, load_topology

#: The section of RESULTS.md this module writes, and its two parts.
HEADING = "## Scale (issue 13)"
REGISTRY_HEADING = "### One registry under simulated endpoints and clients"  # + " (database)"
QUEUES_HEADING = "### Endpoint quorum queues on a 3-node cluster"
#: Who owns the simulated endpoints and submits the simulated tasks.
USER = "scale-user"
#: Longest wait for the ledger to answer for one task before the round counts as timed out.
LEDGER_TIMEOUT_S = 30.0
#: Seconds to wait for the registry to answer /health with its ledger consuming.
START_TIMEOUT_S = 60.0
#: Most parallel registrations while the endpoints are created.
REGISTER_THREADS = 8
#: The cluster script, and the seconds after ``force_gc`` before memory is read.
CLUSTER_SCRIPT = _process.REPO_ROOT / "deploy" / "rabbitmq" / "start-cluster.sh"
SETTLE_S = 2.0
#: Longest wait for one rabbitmqctl call, and for the cluster to start or stop.
CTL_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 300.0
#: Seconds over which each node's CPU use is sampled while nothing is asked of it.
IDLE_WINDOW_S = 5.0
MB = 1e6


def percentile_ms(samples: Sequence[float], pct: float) -> str:
    """The nearest-rank percentile of ``samples`` (seconds), in ms (a dash without samples)."""
    return f"{nearest_rank(samples, pct) * 1000:,.1f}" if samples else "–"


def replace_subsection(section: str, body: str, heading: str) -> str:
    """``section`` with its ``### heading`` part (to the next ``### ``) replaced by ``body``."""
    lines = section.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        return section.rstrip("\n") + "\n\n" + body
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("### ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + body + ("\n" + tail if tail else "")


def update_results(path: Path, body: str, heading: str) -> None:
    """Write ``body`` as the ``heading`` part of this module's section of ``path``."""
    old = path.read_text() if path.exists() else ""
    section = section_of(old, HEADING) or f"{HEADING}\n\n{SECTION_INTRO}\n"
    section = replace_subsection(section, body, heading)
    path.write_text(replace_section(old, section.rstrip("\n") + "\n", HEADING))


#: What the section measures; each sub-command rewrites only its own part.
SECTION_INTRO = (
    "Written by `python -m bench.scale registry` and `python -m bench.scale queues` (each "
    "rewrites its own part). Everything shares the machine's two cores: the registry, the "
    "broker, the load generator and (for the queues) three RabbitMQ nodes. "
    "`docs/scaling.md` reads these figures.\n")


def _header(command: str, settings: str, cpu_busy: str) -> str:
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"Date: {when}\n\nCommand: `{command}`\n\nSettings: {settings}; CPU busy before "
            f"the run (other processes): {cpu_busy}; load average at the end (1, 5, 15 min): "
            f"{load} on {os.cpu_count()} cores\n")


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MB
    return 0.0


# -- registry: plan, tallies, report ---------------------------------------------------------

@dataclass(frozen=True)
class RegistryPlan:
    """How big the registry run is."""

    endpoints: int
    clients: int
    duration: float
    warmup: float
    heartbeat_period: float
    tasks_per_group: int
    poll_interval: float
    db: str | None


@dataclass
class Tally:
    """One client's samples (seconds) and counts, from the measured window only."""

    status: list[float] = field(default_factory=list)
    lookup: list[float] = field(default_factory=list)
    manifest_lag: list[float] = field(default_factory=list)
    result_lag: list[float] = field(default_factory=list)
    tasks: int = 0
    errors: int = 0
    timeouts: int = 0

    def add(self, other: Tally) -> None:
        """Fold ``other`` into this tally."""
        for name in ("status", "lookup", "manifest_lag", "result_lag"):
            getattr(self, name).extend(getattr(other, name))
        self.tasks += other.tasks
        self.errors += other.errors
        self.timeouts += other.timeouts


@dataclass(frozen=True)
class LoadFigures:
    """What the measured window of load saw."""

    tally: Tally
    #: Seconds from the end of the warm-up until the last client finished its last round.
    window_s: float
    heartbeats_per_s: float
    registry_cpu_s: float
    loadgen_cpu_s: float


@dataclass(frozen=True)
class RegistryReport:
    """What a registry run measured."""

    plan: RegistryPlan
    load: LoadFigures
    register_s: float
    online: int
    registry_rss_mb: float


def registry_heading(db: str | None) -> str:
    """The registry part's heading: one part per database kind, each rewritten on its own."""
    return f"{REGISTRY_HEADING} ({'SQLite' if db is None else 'PostgreSQL'})"


def render_registry(report: RegistryReport, command: str, cpu_busy: str) -> str:
    """The registry part of the section: settings, the latency table, the rates."""
    plan, load = report.plan, report.load
    tally, window = load.tally, load.window_s
    requests = len(tally.status) + len(tally.lookup)
    settings = (f"{plan.endpoints:,} endpoints heartbeating every {plan.heartbeat_period:g} s, "
                f"{plan.clients} clients, {plan.duration:g} s measured after {plan.warmup:g} s "
                f"of warm-up, {plan.tasks_per_group} tasks per group, lookups polled every "
                f"{plan.poll_interval * 1000:g} ms")
    rows = [("endpoint status: `GET /endpoints/{id}/status`", tally.status),
            ("task lookup: `POST /tasks/batch`, one id (`Client.get_task`)", tally.lookup),
            ("manifest published → the API answers `waiting`", tally.manifest_lag),
            ("results published → the API answers `success`", tally.result_lag)]
    lines = [f"{registry_heading(plan.db)}\n", _header(command, settings, cpu_busy),
             "| call | samples | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {len(s):,} | {percentile_ms(s, 50)} | {percentile_ms(s, 99)} |"
              for name, s in rows]
    lines += ["", (f"- Registering {plan.endpoints:,} endpoints through the API took "
                   f"{report.register_s:.1f} s ({plan.endpoints / report.register_s:,.0f}/s)."),
              (f"- Measured window ({window:.0f} s): {requests / window:,.0f} HTTP requests/s; "
               f"{tally.tasks / window:,.0f} tasks/s through the ledger (manifest, then "
               f"result); {load.heartbeats_per_s:,.0f} heartbeats/s."),
              (f"- Endpoints online at the end (status calls): {report.online:,} of "
               f"{plan.endpoints:,}. Errors: {tally.errors}; rounds timed out "
               f"(>{LEDGER_TIMEOUT_S:g} s): {tally.timeouts}."),
              (f"- CPU over the window: registry {100 * load.registry_cpu_s / window:.0f}% of "
               f"one core, load generator {100 * load.loadgen_cpu_s / window:.0f}%; registry "
               f"RSS at the end {report.registry_rss_mb:.0f} MB."), ""]
    return "\n".join(lines)


# -- registry: IO ----------------------------------------------------------------------------

def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextmanager
def _vhost() -> Iterator[str]:
    """A fresh vhost on the local broker, deleted afterwards; yields its URL."""
    name = f"gc-scale-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    finally:
        _rabbitmqctl("delete_vhost", name)


@contextmanager
def _database(url: str | None, home: Path) -> Iterator[str]:
    """SQLite in ``home``, or a scratch database on the PostgreSQL server ``url`` names
    (created here, dropped afterwards), so that every run starts from an empty ledger."""
    if url is None:
        yield f"sqlite:///{home / 'registry.db'}"
        return
    server = make_url(url)
    if server.drivername == "postgresql":  # the psycopg (3) driver the postgres extra installs
        server = server.set(drivername="postgresql+psycopg")
    name = f"gc_scale_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def _registry(broker_url: str, db_url: str, home: Path) -> Iterator[tuple[str, int]]:
    """``gc-registry serve --auth open`` as a subprocess; yields its URL and pid."""
    port = _free_port()
    args = [sys.executable, "-m", "gc_core.registry.cli", "serve", "--auth", "open", "--db",
            db_url, "--port", str(port), "--log-level", "WARNING"]
    process = _process.start_worker(args, home / "registry.log",
                                    {"GC_HOME": str(home), "GC_BROKER_URL": broker_url})
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_ledger(url, process, home / "registry.log")
        yield url, process.pid
    finally:
        _process.stop_worker(process)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_ledger(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).json().get("ledger") == "consuming":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the registry's ledger did not start: {_process.log_tail(log)}")


def register_endpoints(url: str, count: int) -> tuple[list[str], float]:
    """Create ``count`` endpoints through the API; return their ids and the seconds taken."""
    local = threading.local()

    def create(index: int) -> str:
        if not hasattr(local, "client"):
            local.client = RegistryClient(url)
        return str(local.client.create_endpoint(f"scale-{index:05d}", owner=USER).endpoint_id)

    started = time.perf_counter()
    with ThreadPoolExecutor(REGISTER_THREADS) as pool:
        ids = list(pool.map(create, range(count)))
    return ids, time.perf_counter() - started


def heartbeat_fleet(session: BrokerSession, topology: Topology, endpoint_ids: Sequence[str],
                    period: float, stop: threading.Event) -> int:
    """Publish each endpoint's heartbeat once a ``period``, spread evenly; return how many."""
    started, gap, sent = time.time(), period / len(endpoint_ids), 0
    while not stop.is_set():
        endpoint_id = endpoint_ids[sent % len(endpoint_ids)]
        beat = Heartbeat(endpoint_id=endpoint_id, hostname="scale-sim", pid=os.getpid(),
                         sent=time.time(), period=period, started=started, engine="threads",
                         workers=4, workers_busy=0, tasks_received=0, tasks_succeeded=0,
                         tasks_failed=0, queue_depth=0)
        session.publish(topology.exchange("events"),
                        topology.routing_key("heartbeat", endpoint_id=endpoint_id),
                        encode_event(beat), persistent=False)  # as the agent sends them
        sent += 1
        stop.wait(max(0.0, started + sent * gap - time.time()))
    return sent


@dataclass
class _Client:
    """One simulated client: its registry connection, the publisher and its tally."""

    registry: RegistryClient
    session: BrokerSession
    topology: Topology
    plan: RegistryPlan
    measure_from: float
    tally: Tally = field(default_factory=Tally)

    @property
    def measuring(self) -> bool:
        return time.monotonic() >= self.measure_from

    def run(self, endpoint_ids: Sequence[str], until: float, seed: int) -> Tally:
        """Loop over rounds until ``until`` (monotonic); return the measured tally."""
        rng = random.Random(seed)
        try:
            while time.monotonic() < until:
                try:
                    self.round(rng.choice(endpoint_ids), rng.choice(endpoint_ids))
                except GCError:
                    self.tally.errors += 1
                    time.sleep(self.plan.poll_interval)
        finally:
            self.registry.close()
        return self.tally

    def round(self, endpoint_id: str, other_endpoint: str) -> None:
        """Submit one task group as a client and its endpoint would; time the ledger."""
        measured, group = self.measuring, uuid.uuid4().hex
        task_ids = [uuid.uuid4().hex for _ in range(self.plan.tasks_per_group)]
        manifest = GroupManifest(task_group_id=group, endpoint_id=endpoint_id, user=USER,
                                 task_ids=task_ids, submitted=time.time())
        sent = time.perf_counter()
        self.session.publish(self.topology.exchange("events"), self.topology.routing_key(
            "group_submitted", task_group_id=group), encode_event(manifest))
        if not self._await(task_ids[-1], lambda s: s != "unknown", sent, measured,
                           self.tally.manifest_lag):
            return
        sent = time.perf_counter()
        key = self.topology.routing_key("result", user=USER, task_group_id=group)
        for task_id in task_ids:
            self.session.publish(self.topology.exchange("results"), key,
                                 encode_result(_result(task_id, group, endpoint_id)))
        if not self._await(task_ids[-1], lambda s: s == "success", sent, measured,
                           self.tally.result_lag):
            return
        asked = time.perf_counter()
        self.registry.get_endpoint_status(other_endpoint)
        if measured:
            self.tally.status.append(time.perf_counter() - asked)
            self.tally.tasks += len(task_ids)

    def _await(self, task_id: str, done: Callable[[str], bool], sent: float, measured: bool,
               lags: list[float]) -> bool:
        """Poll the task lookup until ``done(status)``; record the lag. False: timed out."""
        while time.perf_counter() - sent < LEDGER_TIMEOUT_S:
            asked = time.perf_counter()
            status = self.registry.get_tasks([task_id])[0].status
            answered = time.perf_counter()
            if measured:
                self.tally.lookup.append(answered - asked)
            if done(status):
                if measured:
                    lags.append(answered - sent)
                return True
            time.sleep(self.plan.poll_interval)
        self.tally.timeouts += 1
        return False


def _result(task_id: str, group: str, endpoint_id: str) -> ResultMessage:
    now = time.time()
    return ResultMessage(task_id=task_id, task_group_id=group, endpoint_id=endpoint_id,
                         user=USER, state="success", content_type=JSON.content_type,
                         payload=b"null", timings=Timings(received=now, started=now, finished=now),
                         worker="scale-sim")


def count_online(url: str, endpoint_ids: Sequence[str]) -> int:
    """How many of ``endpoint_ids`` the registry calls online."""
    local = threading.local()

    def online(endpoint_id: str) -> bool:
        if not hasattr(local, "client"):
            local.client = RegistryClient(url)
        return bool(local.client.get_endpoint_status(endpoint_id).status == "online")

    with ThreadPoolExecutor(REGISTER_THREADS) as pool:
        return sum(pool.map(online, endpoint_ids))


def run_registry(plan: RegistryPlan) -> RegistryReport:
    """Bring up a vhost, a database and a registry; load them; always take them down."""
    with tempfile.TemporaryDirectory(prefix="gc-scale-") as tmp, _vhost() as broker_url, \
            _database(plan.db, Path(tmp)) as db_url, \
            _registry(broker_url, db_url, Path(tmp)) as (url, pid):
        click.echo(f"registering {plan.endpoints:,} endpoints at {url}")
        endpoint_ids, register_s = register_endpoints(url, plan.endpoints)
        session = BrokerSession(broker_url, name="bench-scale", topology=load_topology())
        session.start()
        try:
            load = _load(plan, url, pid, session, endpoint_ids)
        finally:
            session.close()
        return RegistryReport(plan, load, register_s, count_online(url, endpoint_ids),
                              _proc_rss_mb(pid))


def _load(plan: RegistryPlan, url: str, pid: int, session: BrokerSession,
          endpoint_ids: Sequence[str]) -> LoadFigures:
    """Heartbeats and clients: warm up, then measure for ``plan.duration``."""
    topology, stop = load_topology(), threading.Event()
    click.echo(f"{plan.clients} clients for {plan.warmup:g} + {plan.duration:g} s")
    with ThreadPoolExecutor(1 + plan.clients) as pool:
        fleet_started = time.monotonic()
        fleet = pool.submit(heartbeat_fleet, session, topology, endpoint_ids,
                            plan.heartbeat_period, stop)
        try:
            measure_from = time.monotonic() + plan.warmup
            clients = [pool.submit(_Client(RegistryClient(url), session, topology, plan,
                                           measure_from).run, endpoint_ids,
                                   measure_from + plan.duration, seed)
                       for seed in range(plan.clients)]
            time.sleep(max(0.0, measure_from - time.monotonic()))
            cpu_before = (_proc_cpu_s(pid), time.process_time())
            tally = Tally()
            for client in clients:
                tally.add(client.result())
            window = time.monotonic() - measure_from
            registry_cpu = _proc_cpu_s(pid) - cpu_before[0]
            loadgen_cpu = time.process_time() - cpu_before[1]
        finally:
            stop.set()  # or the fleet would keep the pool from closing
        heartbeats_per_s = fleet.result() / (time.monotonic() - fleet_started)
    return LoadFigures(tally, window, heartbeats_per_s, registry_cpu, loadgen_cpu)


# -- queues: steps, nodes, report ------------------------------------------------------------

@dataclass(frozen=True)
class NodeSample:
    """One node after a step: memory (MB) as RabbitMQ reports it, processes, idle CPU."""

    rss_mb: float
    erlang_mb: float
    quorum_mb: float
    processes: int
    idle_cpu_pct: float


@dataclass(frozen=True)
class QueueStep:
    """The cluster with ``queues`` endpoint task queues, and how long the last ones took."""

    queues: int
    nodes: tuple[NodeSample, ...]
    declare_s: float | None = None


def per_queue_mb(before: QueueStep, after: QueueStep, what: str = "rss_mb") -> float | None:
    """MB the whole cluster grew per queue declared between two steps (None: no new queue)."""
    added = after.queues - before.queues
    if added <= 0:
        return None
    grew = sum(getattr(n, what) for n in after.nodes) - sum(getattr(n, what) for n in before.nodes)
    return float(grew / added)


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def render_queues(steps: Sequence[QueueStep], stopped: str, command: str, settings: str,
                  cpu_busy: str) -> str:
    """The queues part of the section: one row per step, then the slope from first to last."""
    lines = [f"{QUEUES_HEADING}\n", _header(command, settings, cpu_busy),
             ("| queues | declare s | queues/s | RSS per node (MB) | RSS total (MB) | MB/queue "
              "(RSS, cluster) | MB/queue (Erlang, cluster) | quorum procs + ETS (MB, total) "
              "| Erlang processes per node | idle CPU, 3 nodes (% of a core) |"),
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for previous, step in zip([None, *steps[:-1]], steps):
        rate = "–" if not step.declare_s or previous is None else \
            f"{(step.queues - previous.queues) / step.declare_s:,.0f}"
        lines.append(
            f"| {step.queues:,} | {'–' if step.declare_s is None else f'{step.declare_s:.1f}'} "
            f"| {rate} | {' / '.join(f'{n.rss_mb:,.0f}' for n in step.nodes)} "
            f"| {sum(n.rss_mb for n in step.nodes):,.0f} "
            f"| {_mb(per_queue_mb(previous, step) if previous else None)} "
            f"| {_mb(per_queue_mb(previous, step, 'erlang_mb') if previous else None)} "
            f"| {sum(n.quorum_mb for n in step.nodes):,.0f} "
            f"| {max(n.processes for n in step.nodes):,} "
            f"| {sum(n.idle_cpu_pct for n in step.nodes):.0f} |")
    slope = per_queue_mb(steps[0], steps[-1]) if len(steps) > 1 else None
    replica = None if slope is None else slope / len(steps[-1].nodes)
    lines += ["", (f"From {steps[0].queues:,} to {steps[-1].queues:,} queues: {_mb(slope)} MB "
                   f"of RSS per queue across the cluster, {_mb(replica)} MB per replica (each "
                   f"queue has one on every node). {stopped}"), ""]
    return "\n".join(lines)


# -- queues: IO ------------------------------------------------------------------------------

def _run(args: Sequence[str], env: dict[str, str], timeout: float) -> str:
    """Run ``args`` in a process group of its own; return its stdout. On timeout the whole
    group goes (the script's rabbitmqctl children too), then TimeoutExpired is raised."""
    with subprocess.Popen(list(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, list(args), out, err)
    return out


@dataclass(frozen=True)
class Cluster:
    """A running private cluster: its nodes' URLs and the script's environment."""

    urls: tuple[str, ...]
    env: dict[str, str]

    def script(self, *args: str, timeout: float = CTL_TIMEOUT_S) -> str:
        """Run ``start-cluster.sh ARGS`` with this cluster's environment; return stdout."""
        return _run(["bash", str(CLUSTER_SCRIPT), *args], self.env, timeout)

    def stop(self) -> None:
        """Stop every node and remove the cluster's directory; a node too busy to stop in
        time is killed (by its pid, as the script itself does after its own timeout)."""
        try:
            self.script("stop", timeout=STOP_TIMEOUT_S)
            return
        except subprocess.SubprocessError:
            click.echo("the cluster did not stop in time; killing its nodes")
        for k in ("1", "2", "3"):
            try:
                os.kill(int(self.script("node-pid", k, timeout=30)), signal.SIGKILL)
            except (subprocess.SubprocessError, ValueError, ProcessLookupError):
                continue  # not running
        self.script("stop", timeout=STOP_TIMEOUT_S)


@contextmanager
def _cluster(port: int, directory: Path) -> Iterator[Cluster]:
    """Start a 3-node cluster; stop it (and remove ``directory``) whatever happens."""
    env = {**os.environ, "GC_CLUSTER_NODES": "3", "GC_CLUSTER_NAME": "gc-scale",
           "GC_CLUSTER_PORT": str(port), "GC_CLUSTER_DIST_PORT": str(port + 20000),
           "GC_CLUSTER_DIR": str(directory)}
    cluster = Cluster((), env)
    try:
        urls = cluster.script("start", timeout=STOP_TIMEOUT_S).strip().splitlines()[-1]
        yield Cluster(tuple(urls.split(",")), env)
    finally:
        cluster.stop()


def declare_queues(cluster: Cluster, first: int, last: int, timeout: float) -> float:
    """Declare endpoint task queues ``first``..``last - 1``, a third through each node (so
    each node leads a third); return the seconds until every one is declared and bound."""
    topology = load_topology()
    queues = [topology.queue("endpoint_tasks", endpoint_id=f"scale-{i:06d}")
              for i in range(first, last)]

    def declare(node: int) -> None:
        session = BrokerSession(cluster.urls[node], name=f"bench-scale-{node}",
                                topology=topology, queues=queues[node::len(cluster.urls)])
        session.start(timeout=timeout)  # returns once the broker answered every declaration
        session.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(len(cluster.urls)) as pool:
        list(pool.map(declare, range(len(cluster.urls))))
    return time.perf_counter() - started


def sample_nodes(cluster: Cluster) -> tuple[NodeSample, ...]:
    """Each node's memory after a full garbage collection, and its CPU while idle."""
    nodes = [str(k) for k in range(1, len(cluster.urls) + 1)]
    pids = [int(cluster.script("node-pid", k)) for k in nodes]
    before = [_proc_cpu_s(pid) for pid in pids]
    time.sleep(IDLE_WINDOW_S)
    cpu = [100 * (_proc_cpu_s(pid) - b) / IDLE_WINDOW_S for pid, b in zip(pids, before)]
    for k in nodes:
        cluster.script("ctl", k, "force_gc")
    time.sleep(SETTLE_S)
    samples = []
    for k, idle in zip(nodes, cpu):
        status = json.loads(cluster.script("ctl", k, "status", "--formatter", "json"))
        memory = status["memory"]
        samples.append(NodeSample(
            rss_mb=memory["total"]["rss"] / MB, erlang_mb=memory["total"]["erlang"] / MB,
            quorum_mb=(memory["quorum_queue_procs"] + memory["quorum_ets"]) / MB,
            processes=int(status["processes"]["used"]), idle_cpu_pct=idle))
    return tuple(samples)


@dataclass(frozen=True)
class QueueLimits:
    """When the queue run stops before its last step."""

    max_memory_mb: float
    max_step_s: float
    max_idle_cpu_pct: float

    def reached(self, step: QueueStep) -> str | None:
        """Why the run must stop after ``step``, or None."""
        total = sum(n.rss_mb for n in step.nodes)
        idle = sum(n.idle_cpu_pct for n in step.nodes)
        if total > self.max_memory_mb:
            return f"{total:,.0f} MB of RSS is over the {self.max_memory_mb:,.0f} MB budget"
        if step.declare_s is not None and step.declare_s > self.max_step_s:
            return f"the step took {step.declare_s:.0f} s (limit {self.max_step_s:.0f} s)"
        if idle > self.max_idle_cpu_pct:
            return f"the idle nodes took {idle:.0f}% of a core (limit {self.max_idle_cpu_pct:.0f}%)"
        return None


def run_queues(steps: Sequence[int], limits: QueueLimits, port: int,
               directory: Path) -> tuple[list[QueueStep], str]:
    """Declare queues up to each step in turn; return the steps measured and why it stopped."""
    measured: list[QueueStep] = []
    with _cluster(port, directory) as cluster:
        click.echo(f"cluster up: {', '.join(cluster.urls)}")
        for target in steps:
            declared = measured[-1].queues if measured else 0
            try:
                seconds = declare_queues(cluster, declared, target, limits.max_step_s) \
                    if target > declared else None
                measured.append(QueueStep(target, sample_nodes(cluster), seconds))
            except GCError as exc:  # includes a declaration that outlasted max_step_s
                return measured, (f"Stopped: declaring up to {target:,} queues failed or took "
                                  f"over {limits.max_step_s:.0f} s ({exc}).")
            except subprocess.SubprocessError as exc:
                return measured, f"Stopped at {target:,} queues: {_failure(exc)}."
            click.echo(render_queues(measured, "", "", "", "").splitlines()[-3])
            if (reason := limits.reached(measured[-1])) is not None:
                return measured, f"Stopped: {reason}."
        leaders = Counter(node for node in cluster.script("ctl", "1", "list_queues", "leader")
                          .split() if "@" in node)
    return measured, f"Every step ran; queue leaders per node: {', '.join(map(str, leaders.values()))}."


def _failure(exc: Exception) -> str:
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"`{shlex.join(str(a) for a in exc.cmd[2:])}` did not answer within {exc.timeout:.0f} s"
    if isinstance(exc, subprocess.CalledProcessError):
        return f"`{shlex.join(str(a) for a in exc.cmd[2:])}` failed: {(exc.stderr or '').strip()[:200]}"
    return str(exc)


# -- command line ----------------------------------------------------------------------------

def _command() -> str:
    return shlex.join(["python", "-m", "bench.scale", *sys.argv[1:]])


@click.group()
def main() -> None:
    """Scale benchmarks (issue 13): one registry under load, and quorum queues per endpoint.

    Each sub-command writes its part of the "Scale (issue 13)" section of bench/RESULTS.md;
    the defaults are a small run of a couple of minutes each.
    """


_output = click.option("--output", default="bench/RESULTS.md", show_default=True,
                       type=click.Path(dir_okay=False, path_type=Path),
                       help="Markdown file whose Scale section is updated.")


@main.command()
@click.option("--endpoints", default=200, show_default=True,
              help="Endpoints registered, then heartbeating (full scale: 1000).")
@click.option("--clients", default=10, show_default=True,
              help="Client threads, each in a closed loop (full scale: 50).")
@click.option("--duration", default=30.0, show_default=True, help="Seconds measured.")
@click.option("--warmup", default=10.0, show_default=True,
              help="Seconds of load before measuring (one heartbeat period reaches every endpoint).")
@click.option("--heartbeat-period", default=10.0, show_default=True,
              help="Seconds between one endpoint's heartbeats (the agent's default).")
@click.option("--tasks-per-group", default=10, show_default=True,
              help="Tasks per manifest; their results are published together.")
@click.option("--poll-interval", default=0.02, show_default=True,
              help="Seconds between task lookups while waiting for the ledger.")
@click.option("--db", default=None, metavar="URL",
              help="A PostgreSQL server (postgresql://user@host/db): a scratch database is "
                   "created there and dropped afterwards [default: SQLite in a temp dir].")
@_output
def registry(endpoints: int, clients: int, duration: float, warmup: float,
             heartbeat_period: float, tasks_per_group: int, poll_interval: float,
             db: str | None, output: Path) -> None:
    """One registry: endpoint status, task lookup and submit-to-ledger lag under load."""
    plan = RegistryPlan(endpoints, clients, duration, warmup, heartbeat_period,
                        tasks_per_group, poll_interval, db)
    cpu_busy = background_cpu_busy()
    report = run_registry(plan)
    command = _command() if db is None else \
        _command().replace(db, make_url(db).render_as_string(hide_password=True))
    body = render_registry(report, command, cpu_busy)
    click.echo(body)
    update_results(output, body, registry_heading(db))
    click.echo(f"wrote {registry_heading(db)[4:]!r} in {output}")


@main.command()
@click.option("--steps", default="0,100,250,500", show_default=True,
              help="Comma list of queue counts to measure at (full: 0,250,500,1000,2000,4000).")
@click.option("--max-memory-mb", default=6000.0, show_default=True,
              help="Stop once the three nodes' RSS together passes this.")
@click.option("--max-step-seconds", default=300.0, show_default=True,
              help="Stop once one step's declarations take longer than this.")
@click.option("--max-idle-cpu", default=100.0, show_default=True,
              help="Stop once the idle nodes together use more than this % of one core.")
@click.option("--port", default=5801, show_default=True,
              help="AMQP port of node 1 (nodes 2 and 3 take the next; Erlang distribution +20000).")
@click.option("--cluster-dir", default="/tmp/gc-scale-cluster", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="The nodes' data and logs; removed when the cluster stops.")
@_output
def queues(steps: str, max_memory_mb: float, max_step_seconds: float, max_idle_cpu: float,
           port: int, cluster_dir: Path, output: Path) -> None:
    """Endpoint task queues on a private 3-node cluster: memory per queue and declare rate."""
    try:
        counts = sorted({int(part) for part in steps.split(",") if part.strip()})
    except ValueError:
        raise click.BadParameter("whole numbers, comma-separated", param_hint="--steps") from None
    cpu_busy = background_cpu_busy()
    limits = QueueLimits(max_memory_mb, max_step_seconds, max_idle_cpu)
    measured, stopped = run_queues(counts, limits, port, cluster_dir)
    if not measured:
        raise click.ClickException(stopped)
    settings = (f"3 nodes on this machine, steps {', '.join(f'{c:,}' for c in counts)}, "
                f"`x-queue-type: quorum` with the topology's arguments, replicas on every node")
    body = render_queues(measured, stopped, _command(), settings, cpu_busy)
    click.echo(body)
    update_results(output, body, QUEUES_HEADING)
    click.echo(f"wrote {QUEUES_HEADING[4:]!r} in {output}")


if __name__ == "__main__":
    main()
