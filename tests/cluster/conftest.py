"""A RabbitMQ cluster of private nodes on this machine, for tests of broker node failures.

The nodes are started by ``deploy/rabbitmq/start-cluster.sh`` with node names, ports
(AMQP 5701.., distribution 25701..), an Erlang cookie and data directories of their own
under a temp dir, so the shared broker on 127.0.0.1:5672 is never touched. One cluster
serves the whole session; each test starts with every node up (``all_nodes_up``) and
isolates itself on a vhost of its own (:meth:`Cluster.add_vhost`).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.fabric import Endpoint, Fabric, RegistryServer, eventually
from tests.secured_broker import rabbitmq_installed

#: The script under test, which every method here goes through.
CLUSTER_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "start-cluster.sh"
#: Nodes in the session's cluster.
NODES = 3
#: AMQP port of node 1 (node K listens on PORT + K - 1); distribution ports likewise.
PORT = 5701
DIST_PORT = 25701


class Cluster:
    """A cluster of ``nodes`` private RabbitMQ nodes, numbered 1..nodes, run by the script."""

    def __init__(self, directory: Path, nodes: int = NODES, *, name: str = "gc-cluster",
                 port: int = PORT, dist_port: int = DIST_PORT, host: str = "127.0.0.1") -> None:
        self.directory = directory
        self.nodes = nodes
        self.name = name
        self.port = port
        self.host = host
        self.env = {**os.environ, "GC_CLUSTER_DIR": str(directory), "GC_CLUSTER_NODES": str(nodes),
                    "GC_CLUSTER_NAME": name, "GC_CLUSTER_PORT": str(port),
                    "GC_CLUSTER_DIST_PORT": str(dist_port)}

    # The script.

    def script(self, *args: str, timeout: float = 180) -> str:
        """Run the cluster script; its stdout. Raises RuntimeError (with stderr) on failure."""
        try:
            done = subprocess.run(["bash", str(CLUSTER_SCRIPT), *args], env=self.env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"start-cluster.sh {' '.join(args)}: no answer in {timeout:g}s") from exc
        if done.returncode != 0:
            raise RuntimeError(f"start-cluster.sh {' '.join(args)} failed ({done.returncode}): "
                               f"{done.stderr.strip()}")
        return done.stdout

    def start(self) -> str:
        """Start every node, clustered; the broker URL list (``url,url,...``)."""
        return self.script("start").strip()

    def stop(self) -> None:
        """Stop every node (paused ones too) and remove the cluster's directory."""
        self.script("stop")

    def kill(self, k: int) -> None:
        """``kill -9`` node ``k``'s Erlang VM; returns once it is gone."""
        self.script("kill", str(k))

    def restart(self, *ks: int) -> None:
        """Start nodes ``ks`` again (side by side); returns once each runs and has rejoined."""
        self.script("restart", *map(str, ks))

    def stop_node(self, k: int) -> None:
        """Stop node ``k`` gracefully; returns once its VM has exited."""
        self.script("stop-node", str(k))

    def pid(self, k: int) -> int | None:
        """The OS pid of node ``k``'s Erlang VM, or None when it is not running."""
        path = self.directory / f"node-{k}" / "node.pid"
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _state(pid) not in (None, "Z") else None

    def pause(self, k: int) -> None:
        """Freeze node ``k`` (SIGSTOP): it holds its sockets but answers nothing. Returns
        once the kernel has stopped it (a signal arrives a moment after it is sent)."""
        os.kill(self._pid(k), signal.SIGSTOP)
        eventually(lambda: self.is_paused(k), timeout=10, what=f"node {k} stopped")

    def resume(self, k: int) -> None:
        """Let a paused node ``k`` run on (SIGCONT), once it does."""
        os.kill(self._pid(k), signal.SIGCONT)
        eventually(lambda: not self.is_paused(k), timeout=10, what=f"node {k} running again")

    def is_paused(self, k: int) -> bool:
        pid = self.pid(k)
        return pid is not None and _state(pid) == "T"

    def ctl(self, k: int, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl`` against node ``k``; its output."""
        return self.script("ctl", str(k), *args, timeout=timeout)

    def queues(self, k: int, *args: str, timeout: float = 60) -> str:
        """``rabbitmq-queues`` against node ``k``; its output."""
        return self.script("queues", str(k), *args, timeout=timeout)

    # Addresses.

    def node_name(self, k: int) -> str:
        return f"{self.name}-{k}@localhost"

    def index_of(self, node_name: str) -> int:
        """The index of the node named ``node_name`` (ValueError for one not of this cluster)."""
        for k in range(1, self.nodes + 1):
            if self.node_name(k) == node_name:
                return k
        raise ValueError(f"{node_name!r} is not a node of this cluster")

    def url(self, k: int, vhost: str = "/") -> str:
        """Node ``k``'s AMQP URL (guest/guest) on ``vhost``."""
        return f"amqp://guest:guest@{self.host}:{self.port + k - 1}/{quote(vhost, safe='')}"

    def urls(self, vhost: str = "/") -> str:
        """Every node's URL, comma-separated: what GC_BROKER_URL takes for several brokers."""
        listed = self.script("urls").strip()
        return listed.replace("/%2F", "/" + quote(vhost, safe=""))

    # What the cluster says.

    def up(self) -> list[int]:
        """The nodes whose VM runs and is not paused."""
        return [k for k in range(1, self.nodes + 1) if self.pid(k) is not None and not self.is_paused(k)]

    def any_ctl(self, *args: str, timeout: float = 30) -> str:
        """``rabbitmqctl`` against the first node that is up and answers."""
        errors = []
        for k in self.up():
            try:
                return self.ctl(k, *args, timeout=timeout)
            except RuntimeError as exc:
                errors.append(str(exc))
        raise RuntimeError("no node answered: " + "; ".join(errors or ["none is up"]))

    def running_nodes(self, k: int) -> list[int]:
        """The nodes that node ``k`` sees running in its cluster."""
        status = json.loads(self.ctl(k, "cluster_status", "--formatter", "json", timeout=30))
        return sorted(self.index_of(name) for name in status["running_nodes"])

    def healthy(self) -> bool:
        """Whether every node is up and sees all of them running."""
        everyone = list(range(1, self.nodes + 1))
        if self.up() != everyone:
            return False
        try:
            return all(self.running_nodes(k) == everyone for k in everyone)
        except RuntimeError:
            return False

    def all_up(self, timeout: float = 180) -> None:
        """Bring every node back (resume paused ones, restart stopped or killed ones) and
        wait until they are all clustered and running."""
        for k in range(1, self.nodes + 1):
            if self.is_paused(k):
                self.resume(k)
        down = [k for k in range(1, self.nodes + 1) if self.pid(k) is None]
        if down:
            self.restart(*down)
        eventually(self.healthy, timeout=timeout, what="every node of the cluster running")

    def _queue_info(self, queue: str, vhost: str) -> dict[str, Any] | None:
        rows = json.loads(self.any_ctl("list_queues", "-p", vhost, "name", "type", "leader",
                                       "members", "online", "--formatter", "json") or "[]")
        return next((row for row in rows if row["name"] == queue), None)

    def leader_of(self, queue: str, vhost: str = "/") -> int | None:
        """The node leading quorum queue ``queue`` now, or None while it has none (or no
        such queue). From ``list_queues leader``, which RabbitMQ 3.10 has."""
        info = self._queue_info(queue, vhost)
        if info is None or not isinstance(info.get("leader"), str) or "@" not in info["leader"]:
            return None
        return self.index_of(info["leader"])

    def members_of(self, queue: str, vhost: str = "/") -> list[int]:
        """The nodes holding a replica of quorum queue ``queue``."""
        info = self._queue_info(queue, vhost)
        return sorted(self.index_of(name) for name in (info or {}).get("members") or [])

    def node_of_connection(self, connection_name: str, vhost: str = "/") -> int | None:
        """The node that the client connection named ``connection_name`` (its client-provided
        ``connection_name`` property) on ``vhost`` is connected to, or None if there is none.

        ``list_connections`` is cluster-wide, and its JSON shows pids without node names, so
        the node is found by the connection's own name, ``client:port -> server:port``.
        """
        rows = json.loads(self.any_ctl("list_connections", "name", "vhost", "client_properties",
                                       "--formatter", "json") or "[]")
        for row in rows:
            properties = {key: value for key, _type, value in row["client_properties"]}
            if row["vhost"] == vhost and properties.get("connection_name") == connection_name:
                server_port = int(row["name"].rsplit(":", 1)[1])
                return server_port - self.port + 1
        return None

    # Isolation.

    def add_vhost(self, name: str | None = None) -> str:
        """A fresh vhost on the cluster where guest may do anything; its name."""
        name = name or f"gc-test-{uuid.uuid4().hex[:8]}"
        self.any_ctl("add_vhost", name)
        self.any_ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return name

    def delete_vhost(self, name: str) -> None:
        self.any_ctl("delete_vhost", name)

    def _pid(self, k: int) -> int:
        pid = self.pid(k)
        if pid is None:
            raise RuntimeError(f"node {k} is not running")
        return pid


def _state(pid: int) -> str | None:
    """A process's state letter (R, S, T for stopped, Z for a zombie...), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name, in parentheses, may hold spaces: the state follows its ")".
    return stat.rsplit(")", 1)[1].split()[0]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-node cluster for the session; skip (fail in CI) where RabbitMQ is not installed."""
    if not rabbitmq_installed():
        message = "RabbitMQ is not installed: `make test` installs it (deploy/rabbitmq/ensure-broker.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def all_nodes_up(request: pytest.FixtureRequest) -> None:
    """Every node of the cluster up and clustered at the start of each test that uses it
    (a previous test may have killed, stopped or paused some)."""
    if "cluster" in request.fixturenames:
        request.getfixturevalue("cluster").all_up()


@pytest.fixture
def cluster_vhost(cluster: Cluster) -> Iterator[str]:
    """A fresh vhost on the cluster for one test, deleted after it (when a node can)."""
    name = cluster.add_vhost()
    yield name
    try:
        cluster.all_up()  # a vhost is deleted on every node: one down makes it wait ~20 s
        cluster.delete_vhost(name)
    except RuntimeError:
        pass  # the cluster may be left without a node that answers; the next test restarts them


def nodes_from(cluster: Cluster, vhost: str, first: int) -> str:
    """Every node's URL on ``vhost``, starting with node ``first``: a session connects to
    the first that answers."""
    order = [*range(first, cluster.nodes + 1), *range(1, first)]
    return ",".join(cluster.url(k, vhost) for k in order)


@dataclass
class ClusterFabric:
    """A registry, an agent and a client's fabric on the cluster, each connected to a node
    of its own (client 1, agent 2, registry 3), so that a fault can hit one of them alone."""

    cluster: Cluster
    fabric: Fabric
    endpoint: Endpoint
    database: Path

    def ledger_counts(self) -> dict[str, int]:
        with sqlite3.connect(self.database) as db:
            return dict(db.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall())


@pytest.fixture
def cluster_fabric(cluster: Cluster, cluster_vhost: str, tmp_path: Path) -> Iterator[ClusterFabric]:
    home = tmp_path / "gc-home"
    home.mkdir()
    database = home / "registry.db"
    registry = RegistryServer(f"sqlite:///{database}", nodes_from(cluster, cluster_vhost, 3))
    registry.start()
    fabric = Fabric(broker_url=nodes_from(cluster, cluster_vhost, 1), registry_url=registry.url,
                    home=home, vhost=cluster_vhost)
    endpoint = fabric.configure_endpoint("on-cluster", engine="threads", workers=4,
                                         heartbeat_period=1.0,
                                         broker_url=nodes_from(cluster, cluster_vhost, 2))
    endpoint.start()
    try:
        yield ClusterFabric(cluster, fabric, endpoint, database)
    finally:
        endpoint.stop_all()
        registry.stop()
