"""Which registry database a broker vhost's ledger belongs to.

Registries that consume one vhost's ``gc.ledger`` share its messages, each taking some, so
they must write them to one database: with two, each would hold part of the ledger, and a
client asking one registry would wait for ever for tasks the other recorded. So a ledger
claims its vhost for its database, and a registry of another database refuses to start:

- The claim is the queue ``gc.registry.database`` (topology ``registry_database``),
  declared with the database's id (:func:`~gc_core.registry.db.database_id`) among its
  arguments. RabbitMQ refuses (406 PRECONDITION_FAILED) a declaration whose arguments
  differ from the queue's, and declarations of one queue are taken one at a time, so the
  first database to declare it holds the vhost: a registry of another database is refused
  each time it connects, until the queue is deleted (:func:`release_vhost`). The ledger
  declares it with its own queue, so a claim is checked on every reconnect too.
- The queue holds one message or so (``x-max-length: 1``, ``x-overflow: reject-publish``,
  which a quorum queue enforces once over the limit): a registry's description of its
  database (backend, host and name, never credentials), which a refused registry reads,
  and gives back, to say whose the vhost is. It is a quorum queue, like ``gc.ledger``: a
  classic one cannot be declared while its node is down, and the ledger declares it on
  every connection.

Why not the message alone (a classic queue of one message: a second publish is nacked,
the queue being full; then read the holder's id and compare): RabbitMQ counts only ready
messages against ``x-max-length``, so while one registry reads the claim, another's
publish is taken (seen on RabbitMQ 3.10), and two databases could each believe they hold
the vhost. A declaration leaves no such window.

On a secured broker only the registry's own account may declare, read or delete this
queue: it is the broker's internal user with every right on the fabric's vhost
(``deploy/rabbitmq/start-secured-node.sh``), and the registry's auth backend grants no one
else any queue of that name, nor the default exchange (``broker_auth.resource_allowed``).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import sessionmaker

from gc_core.broker import BrokerSession
from gc_core.broker_consumers import Delivery
from gc_core.broker_login import broker_vhost, redact_url
from gc_core.errors import BrokerError, BrokerRefused, BrokerUnreachable, RegistryError
from gc_core.protocol import Envelope
from gc_core.registry.db import database_id, describe_database
from gc_core.topology import QueueDeclaration, Topology

__all__ = ["CLAIM_TIMEOUT", "DatabaseClaim", "VhostTaken", "claim_vhost", "decode_claim",
           "read_holder", "refusal", "release_vhost"]

logger = logging.getLogger(__name__)

#: Seconds to wait for the broker when claiming, reading or releasing a vhost.
CLAIM_TIMEOUT = 10.0
#: Largest claim message read, in bytes; the fields in it, in characters.
MAX_CLAIM_BYTES = 4096
MAX_FIELD = 300
#: The queue's role in the topology.
QUEUE_KIND = "registry_database"


@dataclass(frozen=True)
class DatabaseClaim:
    """A registry database, as it claims a vhost: its id and where it is, for people."""

    database_id: str
    database: str

    @classmethod
    def of(cls, sessions: sessionmaker[Any], db_url: str) -> DatabaseClaim:
        """The claim of the database ``sessions`` open, which ``db_url`` names.

        Raises:
            RegistryError: the database has lost its id.
        """
        return cls(database_id(sessions), describe_database(db_url))

    def queue(self, topology: Topology) -> QueueDeclaration:
        """The claim queue, declared with this database's id."""
        return topology.queue(QUEUE_KIND, database_id=self.database_id)

    def envelope(self) -> Envelope:
        """The claim message: this database's id and description."""
        body = json.dumps({"database_id": self.database_id, "database": self.database,
                           "claimed_by": socket.gethostname(), "claimed_at": time.time()})
        return Envelope(self.database_id, "", "application/json", {}, body.encode())


def decode_claim(envelope: Envelope) -> DatabaseClaim | None:
    """The database a claim message names, or None if it names none we can show.

    >>> decode_claim(DatabaseClaim("0b6f", "postgresql database gc on db:5432").envelope())
    DatabaseClaim(database_id='0b6f', database='postgresql database gc on db:5432')
    """
    if len(envelope.body) > MAX_CLAIM_BYTES:
        return None
    try:
        fields = json.loads(envelope.body)
    except ValueError:
        return None
    if not isinstance(fields, dict):
        return None
    database_id, database = fields.get("database_id"), fields.get("database")
    if not (isinstance(database_id, str) and isinstance(database, str)):
        return None
    return DatabaseClaim(_shown(database_id), _shown(database))


class VhostTaken(RegistryError):
    """The vhost's ledger belongs to another registry database than this registry's."""

    def __init__(self, broker_url: str, mine: DatabaseClaim, holder: DatabaseClaim | None,
                 refusal: str = "") -> None:
        first = broker_url.split(",")[0]
        where = f"vhost {broker_vhost(first)!r} of the broker at {redact_url(first)}"
        if holder is not None:
            whose = (f"belongs to another registry database: {holder.database} (id "
                     f"{holder.database_id})")
        else:
            whose = ("belongs to another registry database, which left no description "
                     f"(the broker said: {refusal})")
        super().__init__(
            f"{where} {whose}, and this registry's is {mine.database} (id "
            f"{mine.database_id}). Registries on one vhost share its ledger queue, each "
            "recording part of it, so they must share one database too. Point this "
            "registry at that database (--db), or give it a vhost of its own; if the vhost "
            "is to move to another database, stop every registry on it and run "
            "`gc-registry release-vhost`.")
        self.mine = mine
        self.holder = holder


def claim_vhost(broker_url: str, topology: Topology, mine: DatabaseClaim,
                timeout: float = CLAIM_TIMEOUT) -> bool:
    """Claim the vhost of ``broker_url`` for ``mine``; False if the broker could not be
    reached within ``timeout`` (the ledger checks the claim once it connects).

    Raises:
        VhostTaken: another database holds the vhost.
        RegistryError: the broker refused the registry's account.
    """
    session = BrokerSession(broker_url, name="gc-registry:claim", topology=topology,
                            queues=[mine.queue(topology)])
    try:
        session.start(timeout=timeout)
    except BrokerUnreachable:
        return False
    except BrokerRefused as refused:
        raise refusal(broker_url, topology, mine, refused, timeout) from refused
    try:
        # The first registry's description stays: a later publish is refused for good, the
        # queue being full, which is as good.
        session.publish("", mine.queue(topology).name, mine.envelope(), retry_nacked=False)
        session.wait_settled(timeout)
    finally:
        session.close()
    logger.info("vhost %r belongs to this registry's database, %s",
                broker_vhost(broker_url), mine.database)
    return True


def read_holder(broker_url: str, topology: Topology,
                timeout: float = CLAIM_TIMEOUT) -> DatabaseClaim | None:
    """The database the vhost's claim message names, or None (no claim, or no message in
    it within ``timeout``). The message is read and given back, never taken.

    Raises:
        BrokerError: the broker could not be reached, or refused the registry's account.
    """
    arrived = threading.Event()
    got: list[Delivery] = []

    def on_message(delivery: Delivery) -> None:
        got.append(delivery)
        arrived.set()

    session = BrokerSession(broker_url, name="gc-registry:claim-reader", topology=topology,
                            prefetch=1)
    session.consume(topology.queue(QUEUE_KIND, database_id="").name, on_message)
    try:
        session.start(timeout=timeout)
        arrived.wait(timeout)
    finally:
        session.close()  # the message, never acked, goes back to the queue
    return decode_claim(got[0].envelope) if got else None


def release_vhost(broker_url: str, topology: Topology,
                  timeout: float = CLAIM_TIMEOUT) -> tuple[bool, DatabaseClaim | None]:
    """Delete the vhost's claim, so that a registry of any database may claim it next.
    Returns whether it was claimed, and by which database if its claim said.

    Raises:
        BrokerError: the broker could not be reached, or refused the registry's account.
    """
    # A declaration with an id no database has tells whether a claim exists without waiting:
    # refused, one does; taken, none did (and this one is deleted at once).
    probe = DatabaseClaim(database_id="release", database="")
    claimed, holder = False, None
    try:
        session = _started(broker_url, topology, [probe.queue(topology)], timeout)
    except BrokerRefused:
        claimed = True
        holder = read_holder(broker_url, topology, timeout)
        session = _started(broker_url, topology, [], timeout)
    try:
        session.delete_queue(probe.queue(topology).name)
        session.wait_settled(timeout)
    finally:
        session.close()
    return claimed, holder


def _started(broker_url: str, topology: Topology, queues: list[QueueDeclaration],
             timeout: float) -> BrokerSession:
    session = BrokerSession(broker_url, name="gc-registry:release", topology=topology,
                            queues=queues)
    session.start(timeout=timeout)
    return session


def refusal(broker_url: str, topology: Topology, mine: DatabaseClaim, refused: BrokerRefused,
            timeout: float = CLAIM_TIMEOUT) -> RegistryError:
    """Why the broker refused a claim for ``mine`` for good: another database holds the
    vhost (:class:`VhostTaken`), or it refused the registry's account itself."""
    try:
        holder = read_holder(broker_url, topology, timeout)
    except BrokerError:
        return RegistryError(f"the broker refused the registry's ledger: {refused}")
    if holder is not None and holder.database_id == mine.database_id:
        return RegistryError(f"the broker refused the registry's ledger: {refused}")
    return VhostTaken(broker_url, mine, holder, str(refused))


def _shown(text: str) -> str:
    """A field of a claim message as it may be shown: printable, and not too long."""
    printable = "".join(char if char.isprintable() else "?" for char in text)
    return printable if len(printable) <= MAX_FIELD else printable[:MAX_FIELD] + "…"
