"""One vhost, one database: the claim's pure parts, and results set aside for a manifest."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import sessionmaker

from gc_core.protocol import Envelope, GroupManifest, ResultMessage
from gc_core.registry import store
from gc_core.registry.broker_auth import resource_allowed
from gc_core.registry.db import database_id, describe_database, open_database
from gc_core.registry.identity import Principal
from gc_core.registry.vhost_claim import DatabaseClaim, VhostTaken, decode_claim
from gc_core.topology import load_topology

TOPOLOGY = load_topology()
MINE = DatabaseClaim("11111111-1111-1111-1111-111111111111", "sqlite database /srv/b.db on h")
THEIRS = DatabaseClaim("22222222-2222-2222-2222-222222222222",
                       "postgresql database gc_registry on db.example:5432")


def test_a_database_is_described_by_backend_host_and_name_never_by_its_credentials() -> None:
    described = describe_database("postgresql+psycopg://gc:s3cret@db.example:5432/gc_registry"
                                   "?options=-csearch_path%3Dx")
    assert described == "postgresql database gc_registry on db.example:5432"
    assert "s3cret" not in described and "gc:" not in described
    assert describe_database("sqlite:////srv/registry.db").startswith(
        "sqlite database /srv/registry.db on ")


def test_the_claim_queue_carries_the_database_id_where_the_broker_compares_it() -> None:
    queue = MINE.queue(TOPOLOGY)
    assert queue.name == "gc.registry.database" and queue.bindings == ()
    assert queue.arguments["x-dead-letter-routing-key"].endswith(MINE.database_id)
    assert queue.arguments != THEIRS.queue(TOPOLOGY).arguments
    assert (queue.arguments["x-queue-type"], queue.arguments["x-max-length"],
            queue.arguments["x-overflow"]) == ("quorum", 1, "reject-publish")


def test_a_claim_message_names_its_database_and_nothing_else_is_believed() -> None:
    assert decode_claim(THEIRS.envelope()) == THEIRS

    def envelope(body: bytes) -> Envelope:
        return Envelope("", "", "application/json", {}, body)

    for junk in (b"not json", b"[1, 2]", json.dumps({"database_id": 1}).encode(),
                 json.dumps({"database_id": "a", "database": "b" * 5000}).encode()):
        assert decode_claim(envelope(junk)) is None
    forged = decode_claim(envelope(json.dumps(
        {"database_id": "x\n2026-12-06 ERROR forged line", "database": "d"}).encode()))
    assert forged is not None and "\n" not in forged.database_id


def test_a_refused_registry_says_whose_the_vhost_is_and_what_to_do() -> None:
    message = str(VhostTaken("amqp://gc-registry:s3cret@broker:5672/fabric", MINE, THEIRS))
    assert "'fabric'" in message and "s3cret" not in message
    assert THEIRS.database in message and THEIRS.database_id in message
    assert MINE.database in message and "release-vhost" in message and "--db" in message


@pytest.mark.parametrize("who", [
    Principal(name="alice", kind="user"),
    Principal(name="portal", kind="service"),
    Principal(name="endpoint-e1", kind="agent", endpoint_id="e1", owner="alice"),
])
def test_no_user_or_agent_may_touch_the_claim(who: Principal) -> None:
    # Only the registry's own account (the broker's internal user) declares, reads or
    # deletes it; publishing to it would take the default exchange, refused to all.
    for permission in ("configure", "write", "read"):
        assert not resource_allowed(who, "queue", "gc.registry.database", permission, TOPOLOGY)
        assert not resource_allowed(who, "exchange", "amq.default", permission, TOPOLOGY)


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Any]]:
    made = open_database(f"sqlite:///{tmp_path}/r.db")
    yield made
    made.kw["bind"].dispose()


def test_a_database_gets_its_id_once(sessions: sessionmaker[Any], tmp_path: Path) -> None:
    first = database_id(sessions)
    again = open_database(f"sqlite:///{tmp_path}/r.db")
    assert database_id(again) == first and len(first) == 36
    again.kw["bind"].dispose()


def _result(task_id: str, payload: bytes) -> ResultMessage:
    return ResultMessage(task_id=task_id, task_group_id="g", endpoint_id="ep-1", user="alice",
                         state="success", content_type="application/json", payload=payload)


def test_results_set_aside_come_back_once_their_task_is_recorded(
        sessions: sessionmaker[Any]) -> None:
    with sessions() as session:
        # Given results set aside, one too large to keep, for tasks nobody named yet
        store.set_aside_results(session, [
            store.ReceivedResult(_result("t1", b"1"), "endpoint-ep-1", dead=False),
            store.ReceivedResult(_result("t2", b"x" * 100), "endpoint-ep-1", dead=False),
            store.ReceivedResult(_result("t3", b"3"), "endpoint-ep-1", dead=False)],
            size_limit=10)
        session.commit()
        assert store.early_result_counts(session, ["endpoint-ep-1", "nobody"]) == {
            "endpoint-ep-1": 3}
        assert store.take_early_results(session) == []
        # When a manifest names two of them
        store.record_manifest(session, GroupManifest(task_group_id="g", endpoint_id="ep-1",
                                                     user="alice", task_ids=["t1", "t2"],
                                                     submitted=1.0))
        taken = store.take_early_results(session, ["t1", "t2", "t3"])
        # Then those two come back, in the order they came, the large one without its value
        assert [(t.result.task_id, t.result.payload, t.dropped_size) for t in taken] == [
            ("t1", b"1", None), ("t2", b"", 100)]
        store.record_results(session, [t.result for t in taken], size_limit=10,
                             dropped_sizes={"t2": 100})
        session.commit()
        one, two = store.get_tasks(session, ["t1", "t2"])
        assert (one.status, base64.b64decode(one.payload_b64)) == ("success", b"1")
        assert (two.status, two.payload_b64) == ("success", "")
        assert "100 bytes" in two.result_note
        # and the third waits until it is too old
        assert store.take_early_results(session) == []
        assert store.expire_early_results(session, older_than=0.0) == []
        assert store.expire_early_results(session, older_than=float("inf")) == [
            ("t3", "endpoint-ep-1")]
