"""The registry's ledger keeps going when its database fails for a while, and commits a
backlog a bounded number of results at a time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from gc_core.batches import H_BATCH, MAX_BATCH_TASKS, encode_result_batch
from gc_core.broker import BrokerSession
from gc_core.protocol import Envelope, ResultMessage, encode_result
from gc_core.registry import store
from gc_core.registry.db import Base, open_database
from gc_core.registry.ledger import COMMIT_RESULTS, Ledger
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


def test_a_backlog_of_result_batches_is_committed_a_bounded_number_of_results_at_a_time(
        own_vhost: str, tmp_path: Path) -> None:
    # Given a backlog of result batches in the ledger's queue (its consumer was away), more
    # results than one commit may hold
    sessions = open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    topology = load_topology()
    ledger = Ledger(broker_url=own_vhost, topology=topology, sessions=sessions)
    ledger.start()  # declares the queue
    _wait_until(lambda: ledger.connected, "the ledger to connect")
    ledger.stop()
    publisher = BrokerSession(own_vhost, name="test-publisher", topology=topology)
    publisher.start()
    batches, per_batch = 12, MAX_BATCH_TASKS
    try:
        for batch in range(batches):
            results = [ResultMessage(task_id=f"t-{batch}-{n}", task_group_id="g", user="u",
                                     state="success", content_type="application/json",
                                     payload=b"42") for n in range(per_batch)]
            publisher.publish(topology.exchange("results"), "u.g", encode_result_batch(results))
        assert publisher.wait_settled(30)
    finally:
        publisher.close()
    # When a ledger comes back to it
    ledger = Ledger(broker_url=own_vhost, topology=topology, sessions=sessions)
    ledger.start()
    try:
        def recorded() -> int:
            with sessions() as db:
                return int(db.execute(text("SELECT count(*) FROM tasks")).scalar_one())
        _wait_until(lambda: recorded() == batches * per_batch, "every result to be recorded")
    finally:
        ledger.stop()
    # Then every result is recorded, and no commit held more than COMMIT_RESULTS of them
    # (the rows of one commit share its time of recording): the registry's memory holds
    # one commit's decoded results, however deep the backlog
    with sessions() as db:
        commits = [int(size) for size in db.execute(
            text("SELECT count(*) FROM tasks GROUP BY recorded")).scalars()]
    assert sum(commits) == batches * per_batch
    assert max(commits) <= COMMIT_RESULTS, commits
    assert len(commits) >= batches * per_batch // COMMIT_RESULTS


@pytest.mark.parametrize("count", ["1000", 10**9, -1, True, 1, MAX_BATCH_TASKS],
                         ids=["text", "huge", "negative", "boolean", "too few", "too many"])
def test_a_batch_whose_count_is_hostile_costs_itself_alone(
        own_vhost: str, tmp_path: Path, count: object) -> None:
    # The ledger reads a delivery's gc-batch header to bound its commits before anything is
    # decoded: a count that is no count, out of bounds, or a lie about the entries
    sessions = open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    topology = load_topology()
    ledger = Ledger(broker_url=own_vhost, topology=topology, sessions=sessions)
    ledger.start()
    _wait_until(lambda: ledger.connected, "the ledger to connect")
    publisher = BrokerSession(own_vhost, name="test-publisher", topology=topology)
    publisher.start()

    def batch(prefix: str) -> Envelope:
        return encode_result_batch([
            ResultMessage(task_id=f"{prefix}-{n}", task_group_id="g", user="u", state="success",
                          content_type="application/json", payload=b"42") for n in range(3)])

    try:
        hostile = batch("hostile")
        for envelope in (batch("before"),
                         hostile._replace(headers={**hostile.headers, H_BATCH: count}),
                         batch("after")):
            publisher.publish(topology.exchange("results"), "u.g", envelope)
        assert publisher.wait_settled(30)

        def recorded() -> set[str]:
            with sessions() as db:
                return {str(task_id) for task_id in db.execute(
                    text("SELECT task_id FROM tasks")).scalars()}
        # Then the batches around it are recorded, it is not, and the ledger goes on
        _wait_until(lambda: {f"{p}-{n}" for p in ("before", "after") for n in range(3)}
                    <= recorded(), "the good batches to be recorded")
        assert not {task_id for task_id in recorded() if task_id.startswith("hostile")}
        assert ledger.writing and ledger.failure is None
    finally:
        publisher.close()
        ledger.stop()


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
