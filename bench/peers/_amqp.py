"""Broker address and clean-up helpers shared by the AMQP-based peers."""

from __future__ import annotations

import logging
import subprocess
import uuid
from collections.abc import Iterable

import pika

logger = logging.getLogger(__name__)

#: The loopback broker every peer uses.
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
#: Prefix of every queue and exchange the benchmark creates.
NAME_PREFIX = "bench."


def queue_arguments(quorum: bool) -> dict[str, str] | None:
    """The arguments declaring a quorum queue, or None for a classic one."""
    return {"x-queue-type": "quorum"} if quorum else None


def unique_name(kind: str) -> str:
    """Return a fresh broker object name under NAME_PREFIX, e.g. ``bench.raw.3f2a9c1e``."""
    return f"{NAME_PREFIX}{kind}.{uuid.uuid4().hex[:8]}"


def delete_broker_objects(queues: Iterable[str] = (), exchanges: Iterable[str] = ()) -> None:
    """Delete the named queues and exchanges; missing ones are ignored."""
    queues, exchanges = list(queues), list(exchanges)
    names = queues + exchanges
    if any(not name.startswith(NAME_PREFIX) for name in names):
        raise ValueError(f"refusing to delete objects outside {NAME_PREFIX!r}: {names}")
    if not names:
        return
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        for queue in queues:
            channel = connection.channel()
            try:
                channel.queue_delete(queue)
            except pika.exceptions.ChannelClosedByBroker:
                logger.debug("queue %s already gone", queue)
        for exchange in exchanges:
            channel = connection.channel()
            try:
                channel.exchange_delete(exchange)
            except pika.exceptions.ChannelClosedByBroker:
                logger.debug("exchange %s already gone", exchange)
    finally:
        connection.close()


#: Longest wait for one rabbitmqctl call.
RABBITMQCTL_TIMEOUT_S = 60.0


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl -q ARGS`` against the local node and return its output."""
    done = subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True,
                          timeout=RABBITMQCTL_TIMEOUT_S)
    return done.stdout


def create_vhost(kind: str) -> str:
    """Create a fresh vhost ``bench-<kind>-<hex>`` that guest may use, and return its name."""
    vhost = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return vhost


def delete_vhost(vhost: str) -> None:
    """Delete a vhost create_vhost() made, with everything in it; a missing one is ignored."""
    if not vhost.startswith("bench-"):
        raise ValueError(f"refusing to delete vhost {vhost!r}: not one the benchmark made")
    try:
        rabbitmqctl("delete_vhost", vhost)
    except subprocess.CalledProcessError:
        logger.debug("vhost %s already gone", vhost)


def vhost_url(vhost: str) -> str:
    """The guest URL of ``vhost`` on the loopback broker."""
    return f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
