"""A private RabbitMQ node set up as ``broker_config/`` says, with a registry deciding who may do what.

The node is started by ``deploy/rabbitmq/start-secured-node.sh`` on free ports, with a node
name, Erlang cookie and data directory of its own under a temp dir, so the shared broker on
127.0.0.1:5672 is never touched; the registry (tokens mode, SQLite) runs in a thread and its
ledger consumes through the node's internal ``gc-registry`` account. Given a :class:`NodeTLS`,
the node listens for ``amqps://`` only, and every URL here names it by its certificate's host.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy.orm import Session, sessionmaker

from gc_client import Client
from gc_core.protocol import Envelope
from gc_core.registry import identity, store
from gc_core.registry.db import open_database
from gc_core.registry_api.schemas import EndpointIn
from tests.fabric import Fabric, RegistryServer, free_port

#: The start script under test.
START_SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "rabbitmq" / "start-secured-node.sh"
#: Milliseconds the node caches the registry's answers: short, so a revoked token is soon refused.
CACHE_TTL_MS = 500


@dataclass(frozen=True)
class NodeTLS:
    """A TLS listener for the node: its certificate and key, and the CA that signed them
    (PEM files); clients reach it as ``host``, a name in the certificate."""

    cert: Path
    key: Path
    ca: Path
    host: str = "localhost"

    @property
    def env(self) -> dict[str, str]:
        """The start script's settings for this listener."""
        return {"GC_NODE_TLS_CERT": str(self.cert), "GC_NODE_TLS_KEY": str(self.key),
                "GC_NODE_TLS_CA": str(self.ca), "GC_NODE_TLS_HOST": self.host}


@dataclass
class SecuredNode:
    """A running private node: its AMQP port (AMQPS with ``tls``) and how to run its script."""

    directory: Path
    name: str
    port: int
    env: dict[str, str]
    tls: NodeTLS | None = None

    @property
    def url(self) -> str:
        """The node's URL without credentials: clients and agents log in with their tokens."""
        return self._url("")

    def url_for(self, username: str, password: str) -> str:
        """The node's URL with explicit credentials (for raw pika connections on a node
        without TLS; pika takes no ``cafile``)."""
        return self._url(f"{username}:{password}@")

    def _url(self, credentials: str) -> str:
        if self.tls is None:
            return f"amqp://{credentials}127.0.0.1:{self.port}/%2F"
        return (f"amqps://{credentials}{self.tls.host}:{self.port}/%2F"
                f"?cafile={quote(str(self.tls.ca))}")

    def script(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run(["bash", str(START_SCRIPT), *args], env=self.env, check=False,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"start-secured-node.sh {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout


@dataclass
class SecuredFabric(Fabric):
    """A fabric on the secured node; ``env`` logs CLI subprocesses in as ``user``."""

    user: str = ""
    token: str = ""

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, "GC_USER": self.user, "GC_TOKEN": self.token}


@contextmanager
def secured_fabric(tmp: Path, tls: NodeTLS | None = None,
                   ) -> Iterator[tuple[SecuredNode, RegistryServer, sessionmaker[Session]]]:
    """Start a secured node (with ``tls``: an AMQPS listener only) and a tokens-mode registry
    it asks; stop both and clean up after."""
    password = secrets.token_hex(16)
    broker_secret = secrets.token_urlsafe(24)
    node = SecuredNode(directory=tmp / "node", name=f"gc-test-{uuid.uuid4().hex[:8]}@localhost",
                       port=free_port(), env={}, tls=tls)
    db_url = f"sqlite:///{tmp / 'registry.db'}"
    # The registry's port must be known before the node starts, its broker password before
    # the registry is built: choose both here.
    registry = RegistryServer(db_url, node.url_for("gc-registry", password), auth="tokens",
                              broker_auth_secret=broker_secret)
    node.env = {**os.environ, "GC_NODE_DIR": str(node.directory), "GC_NODE_NAME": node.name,
                "GC_NODE_PORT": str(node.port), "GC_DIST_PORT": str(free_port()),
                "GC_REGISTRY_URL": registry.url, "GC_AUTH_CACHE_TTL": str(CACHE_TTL_MS),
                "GC_REGISTRY_BROKER_PASSWORD": password, "GC_REGISTRY_AUTH_SECRET": broker_secret}
    if tls is not None:
        node.env.update(tls.env, GC_NODE_PORT="none", GC_NODE_TLS_PORT=str(node.port))
    registry_started = False
    try:
        node.script("start")
        registry_started = True  # from here on it has a thread to join
        registry.start()
        yield node, registry, open_database(db_url)
    finally:
        if registry_started:
            registry.stop()
        node.script("stop", timeout=60)
        shutil.rmtree(node.directory, ignore_errors=True)


def rabbitmq_installed() -> bool:
    """Whether this machine can start a RabbitMQ node of its own."""
    return Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists() or \
        shutil.which("rabbitmq-server") is not None


def node_log(node: SecuredNode) -> str:
    """The node's log, for a failing test's message."""
    logs = sorted((node.directory / "log").glob("*.log"))
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in logs)


def amqp_error(exc: BaseException) -> tuple[int, str]:
    """(reply code, reply text) of a pika channel or connection close."""
    args: Any = getattr(exc, "args", ())
    if len(args) >= 2 and isinstance(args[0], int):
        return args[0], str(args[1])
    return 0, str(exc)


@dataclass
class Secured:
    """A secured fabric and who is in it: alice owns endpoint A, bob owns endpoint B, and
    each user and endpoint has a token (``tokens`` by broker user name)."""

    node: SecuredNode
    registry_url: str
    sessions: sessionmaker[Session]
    home: Path
    tokens: dict[str, str]
    endpoint_a: str
    endpoint_b: str
    #: What the node presents to the registry's /auth/* (HTTP basic auth, any user name).
    broker_secret: str = ""

    def connect(self, who: str, token: str | None = None) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(
            self.node.url_for(who, token or self.tokens[who])))

    def channel(self, who: str) -> BlockingChannel:
        channel = self.connect(who).channel()
        channel.confirm_delivery()
        return channel

    def publish(self, who: str, exchange: str, routing_key: str, envelope: Envelope, *,
                user_id: str | None, mandatory: bool = False) -> None:
        """Publish ``envelope`` as broker user ``who``, stamped with ``user_id`` (which the
        broker checks is ``who``'s; None: unstamped), and wait for the broker's confirm.

        Raises:
            pika.exceptions.AMQPError: the broker refused it.
        """
        channel = self.channel(who)
        try:
            channel.basic_publish(exchange, routing_key, envelope.body, pika.BasicProperties(
                message_id=envelope.message_id or None,
                correlation_id=envelope.correlation_id or None,
                content_type=envelope.content_type, headers=envelope.headers, user_id=user_id,
                delivery_mode=2), mandatory=mandatory)
        finally:
            if channel.connection.is_open:
                channel.connection.close()

    def client(self, user: str) -> Client:
        return Client(broker_url=self.node.url, registry_url=self.registry_url,
                      token=self.tokens[user], user=user, home=str(self.home / user))

    def fabric(self, user: str, home: str) -> SecuredFabric:
        """A fabric in which CLI subprocesses run as ``user``, under ``home`` of their own."""
        return SecuredFabric(broker_url=self.node.url, registry_url=self.registry_url,
                             home=self.home / home, vhost="/", user=user, token=self.tokens[user])


@contextmanager
def secured_world(tmp: Path, tls: NodeTLS | None = None) -> Iterator[Secured]:
    """A secured node (see :func:`secured_fabric`) and registry with alice, bob and their
    endpoints; skip (fail in CI) where RabbitMQ is not installed."""
    if not rabbitmq_installed():
        message = "RabbitMQ is not installed: `make test` installs it (deploy/rabbitmq/ensure-broker.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with secured_fabric(tmp, tls) as (node, registry, sessions):
        with sessions() as db:
            for name in ("alice", "bob"):
                identity.create_user(db, name)
            endpoint_a = store.create_endpoint(db, EndpointIn(name="a"), owner="alice").endpoint_id
            endpoint_b = store.create_endpoint(db, EndpointIn(name="b"), owner="bob").endpoint_id
            tokens = {name: identity.issue_token(db, name).token for name in ("alice", "bob")}
            tokens[f"endpoint-{endpoint_a}"] = identity.issue_token(
                db, "alice", endpoint_id=endpoint_a).token
            tokens[f"endpoint-{endpoint_b}"] = identity.issue_token(
                db, "bob", endpoint_id=endpoint_b).token
        yield Secured(node, registry.url, sessions, tmp, tokens, endpoint_a, endpoint_b,
                      broker_secret=registry.broker_auth_secret or "")
