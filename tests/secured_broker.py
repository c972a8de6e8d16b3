"""A private RabbitMQ node set up as ``broker_config/`` says, with a registry deciding who may do what.

The node is started by ``deploy/rabbitmq/start-secured-node.sh`` on free ports, with a node
name, Erlang cookie and data directory of its own under a temp dir, so the shared broker on
127.0.0.1:5672 is never touched; the registry (tokens mode, SQLite) runs in a thread and its
ledger consumes through the node's internal ``gc-registry`` account.
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

from sqlalchemy.orm import Session, sessionmaker

from gc_core.registry.db import open_database
from tests.fabric import Fabric, RegistryServer, free_port

#: The start script under test.
START_SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "rabbitmq" / "start-secured-node.sh"
#: Milliseconds the node caches the registry's answers: short, so a revoked token is soon refused.
CACHE_TTL_MS = 500


@dataclass
class SecuredNode:
    """A running private node: its AMQP port and how to run its script."""

    directory: Path
    name: str
    port: int
    env: dict[str, str]

    @property
    def url(self) -> str:
        """The node's URL without credentials: clients and agents log in with their tokens."""
        return f"amqp://127.0.0.1:{self.port}/%2F"

    def url_for(self, username: str, password: str) -> str:
        """The node's URL with explicit credentials (for raw pika connections)."""
        return f"amqp://{username}:{password}@127.0.0.1:{self.port}/%2F"

    def script(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run(["bash", str(START_SCRIPT), *args], env=self.env,
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
def secured_fabric(tmp: Path) -> Iterator[tuple[SecuredNode, RegistryServer, sessionmaker[Session]]]:
    """Start a secured node and a tokens-mode registry it asks; stop both and clean up after."""
    password = secrets.token_hex(16)
    node = SecuredNode(directory=tmp / "node", name=f"gc-test-{uuid.uuid4().hex[:8]}@localhost",
                       port=free_port(), env={})
    db_url = f"sqlite:///{tmp / 'registry.db'}"
    # The registry's port must be known before the node starts, its broker password before
    # the registry is built: choose both here.
    registry = RegistryServer(db_url, node.url_for("gc-registry", password), auth="tokens")
    node.env = {**os.environ, "GC_NODE_DIR": str(node.directory), "GC_NODE_NAME": node.name,
                "GC_NODE_PORT": str(node.port), "GC_DIST_PORT": str(free_port()),
                "GC_REGISTRY_URL": registry.url, "GC_AUTH_CACHE_TTL": str(CACHE_TTL_MS),
                "GC_REGISTRY_BROKER_PASSWORD": password}
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
