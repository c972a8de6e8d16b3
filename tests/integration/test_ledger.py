"""The registry's ledger keeps going when its database fails for a while."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from gc_core.broker import BrokerSession
from gc_core.protocol import ResultMessage, encode_result
from gc_core.registry import store
from gc_core.registry.db import Base, open_database
from gc_core.registry.ledger import Ledger
from gc_core.topology import load_topology
from tests.conftest import BROKER_HOST, BROKER_PORT
from tests.fabric import fresh_vhost


@pytest.fixture
def own_vhost(vhost: str) -> Iterator[str]:
    """A vhost of this test's own: its ledger must be the only consumer of gc.ledger."""
    with fresh_vhost("gc-ledger") as name:
        yield f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{name}"


def test_a_result_that_cannot_be_written_is_kept_and_written_once_the_database_is_back(
        own_vhost: str, tmp_path: Path) -> None:
    # Given a running ledger whose tasks table has gone
    sessions = open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    topology = load_topology()
    ledger = Ledger(broker_url=own_vhost, topology=topology, sessions=sessions)
    ledger.start()
    publisher = BrokerSession(own_vhost, name="test-publisher", topology=topology)
    publisher.start()
    deadline = time.monotonic() + 30
    while not ledger.connected:  # its queue must exist before anything is routed to it
        assert time.monotonic() < deadline, "the ledger did not connect"
        time.sleep(0.05)
    try:
        with sessions() as db:
            db.execute(text("DROP TABLE tasks"))
            db.commit()
        # When a result arrives
        result = ResultMessage(task_id="t-1", task_group_id="g", user="u", state="success",
                               content_type="application/json", payload=b"42")
        publisher.publish(topology.exchange("results"), "u.g", encode_result(result))
        assert publisher.wait_settled(30)
        time.sleep(0.5)  # several failed commits
        # Then once the table is back, the same result is recorded
        Base.metadata.create_all(sessions.kw["bind"])
        deadline = time.monotonic() + 30
        while True:
            with sessions() as db:
                status = store.get_tasks(db, ["t-1"])[0].status
            if status == "success" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == "success"
    finally:
        publisher.close()
        ledger.stop()
