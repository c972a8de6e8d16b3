"""On the secured node the vhost's claim (``gc_core/registry/vhost_claim.py``) is the
registry's alone: its account declares it, and no user or agent may read, replace, empty,
delete or write it, which would let a registry of another database take the ledger."""

from __future__ import annotations

from collections.abc import Callable

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from gc_core.registry.db import database_id
from gc_core.registry.vhost_claim import DatabaseClaim, read_holder
from gc_core.topology import load_topology
from tests.secured_broker import Secured, amqp_error

TOPOLOGY = load_topology()
CLAIM = "gc.registry.database"
ACCESS_REFUSED = 403

Attempt = Callable[[BlockingChannel], object]

ATTEMPTS: dict[str, Attempt] = {
    "delete": lambda channel: channel.queue_delete(CLAIM),
    "purge": lambda channel: channel.queue_purge(CLAIM),
    "read": lambda channel: channel.basic_get(CLAIM),
    "declare for another database": lambda channel: channel.queue_declare(
        CLAIM, durable=True, arguments=DatabaseClaim("another", "").queue(TOPOLOGY).arguments),
    "publish": lambda channel: channel.basic_publish(
        "", CLAIM, b'{"database_id": "another", "database": "mine"}'),
}


def _registry_url(secured: Secured) -> str:
    return secured.node.url_for("gc-registry", secured.node.env["GC_REGISTRY_BROKER_PASSWORD"])


def test_the_registry_claims_the_secured_vhost_for_its_database(secured: Secured) -> None:
    holder = read_holder(_registry_url(secured), TOPOLOGY)
    assert holder is not None and holder.database_id == database_id(secured.sessions)


@pytest.mark.parametrize("attempt", sorted(ATTEMPTS))
def test_no_user_or_agent_may_touch_the_claim(secured: Secured, attempt: str) -> None:
    for who in ("alice", f"endpoint-{secured.endpoint_a}"):
        channel = secured.channel(who)
        try:
            with pytest.raises(pika.exceptions.AMQPError) as refused:
                ATTEMPTS[attempt](channel)
            assert amqp_error(refused.value)[0] == ACCESS_REFUSED, (who, refused.value)
        finally:
            if channel.connection.is_open:
                channel.connection.close()
    holder = read_holder(_registry_url(secured), TOPOLOGY)
    assert holder is not None and holder.database_id == database_id(secured.sessions)
