"""The registry's logic as plain functions over a real SQLite file in a temp dir."""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from gc_core.errors import NotFound
from gc_core.protocol import ErrorInfo, GroupManifest, Heartbeat, ResultMessage, Timings
from gc_core.registry import store
from gc_core.registry.db import TaskRow, open_database
from gc_core.registry_api.schemas import EndpointIn, FunctionIn


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Session]:
    sessions = open_database(f"sqlite:///{tmp_path}/r.db")
    with sessions() as session:
        yield session
    sessions.kw["bind"].dispose()


def a_function(payload: bytes = b"function bytes", owner: str = "alice",
               name: str = "double") -> FunctionIn:
    return FunctionIn(name=name, content_type="application/vnd.gc.cloudpickle",
                      payload_b64=base64.b64encode(payload).decode(), source="def double(x): ...",
                      python_version="3.11.7", serializer="cloudpickle 3.1.3", owner=owner)


def a_manifest(task_ids: list[str], submitted: float = 100.0) -> GroupManifest:
    return GroupManifest(task_group_id="group-1", endpoint_id="ep-1", user="alice",
                         task_ids=task_ids, submitted=submitted)


def a_result(task_id: str, **overrides: Any) -> ResultMessage:
    fields: dict[str, Any] = {
        "task_id": task_id, "task_group_id": "group-1", "endpoint_id": "ep-1", "function_id": "fn-1",
        "user": "alice", "state": "success", "content_type": "application/json", "payload": b"42",
        "timings": Timings(received=101.0, started=102.0, finished=103.0), "worker": "node1:7"}
    fields.update(overrides)
    return ResultMessage(**fields)


def a_heartbeat(endpoint_id: str, sent: float, period: float = 10.0) -> Heartbeat:
    return Heartbeat(endpoint_id=endpoint_id, hostname="node1", pid=7, sent=sent, period=period,
                     started=0.0, engine="threads", workers=2, workers_busy=0, tasks_received=0,
                     tasks_succeeded=0, tasks_failed=0)


# -- functions ---------------------------------------------------------------------------


def test_registering_the_same_bytes_twice_for_one_owner_gives_the_same_function(db: Session) -> None:
    first = store.register_function(db, a_function())
    second = store.register_function(db, a_function(name="another name"))

    assert second.function_id == first.function_id
    assert second.name == "double"


def test_the_same_bytes_from_another_owner_are_another_function(db: Session) -> None:
    alice = store.register_function(db, a_function(owner="alice"))
    bob = store.register_function(db, a_function(owner="bob"))

    assert alice.function_id != bob.function_id
    assert bob.owner == "bob"


def test_different_bytes_from_one_owner_are_different_functions(db: Session) -> None:
    one = store.register_function(db, a_function(b"one"))
    two = store.register_function(db, a_function(b"two"))

    assert one.function_id != two.function_id
    assert one.content_hash != two.content_hash


def test_a_registered_function_comes_back_with_its_bytes(db: Session) -> None:
    registered = store.register_function(db, a_function(b"\x00\xffbytes"))

    fetched = store.get_function(db, registered.function_id)

    assert base64.b64decode(fetched.payload_b64) == b"\x00\xffbytes"
    assert fetched.python_version == "3.11.7"
    assert fetched.source == "def double(x): ..."


def test_get_function_of_an_unknown_id_raises_not_found(db: Session) -> None:
    with pytest.raises(NotFound) as info:
        store.get_function(db, "nope")

    assert info.value.status == 404


# -- the task ledger ---------------------------------------------------------------------


def test_a_task_in_a_manifest_waits_until_its_result_arrives(db: Session) -> None:
    store.record_manifest(db, a_manifest(["t1"]))
    db.commit()

    assert store.get_tasks(db, ["t1"])[0].status == "waiting"


def test_a_manifests_rows_hold_each_columns_default_where_it_says_nothing(db: Session) -> None:
    # The manifest's statement writes the columns it has no value for as constants: each
    # must be what the table's own default would have written.
    store.record_manifest(db, a_manifest(["t1"], submitted=100.0))
    db.commit()

    row = db.get(TaskRow, "t1")
    assert row is not None
    given = {"task_id": "t1", "task_group_id": "group-1", "endpoint_id": "ep-1",
             "user": "alice", "submitted": 100.0, "status": "waiting"}
    for column in TaskRow.__table__.columns:
        expected = given.get(column.name, getattr(column.default, "arg", None))
        assert getattr(row, column.name) == expected, column.name


def test_a_manifest_then_a_result_gives_success_with_the_results_value(db: Session) -> None:
    store.record_manifest(db, a_manifest(["t1", "t2"], submitted=100.0))
    db.commit()
    store.record_results(db, [a_result("t1")])
    db.commit()

    t1, t2 = store.get_tasks(db, ["t1", "t2"])

    assert t1.status == "success"
    assert base64.b64decode(t1.payload_b64) == b"42"
    assert t1.submitted == 100.0
    assert t1.timings == Timings(received=101.0, started=102.0, finished=103.0)
    assert t1.worker == "node1:7"
    assert t2.status == "waiting"


def test_a_result_after_its_manifest_writes_every_column_of_its_row(db: Session) -> None:
    # The result's upsert names every column of the table and updates all but the task id
    # and submission time: a row that left one out would not be written, one with a column
    # the table lacks would have it dropped unseen.
    result = a_result("t1").model_copy(update={"stdout": "out", "stderr": "err",
                                               "on_behalf_of": "carol"})
    store.record_manifest(db, a_manifest(["t1"], submitted=100.0))
    store.record_results(db, [result], now=200.0)
    db.commit()

    row = db.get(TaskRow, "t1")
    expected = store._result_row(result, None, 200.0)

    assert set(expected) == {column.name for column in TaskRow.__table__.columns}
    assert {column: getattr(row, column) for column in expected if column != "submitted"} == \
        {column: value for column, value in expected.items() if column != "submitted"}
    assert row is not None and row.submitted == 100.0


def test_a_failed_result_is_recorded_with_its_error(db: Session) -> None:
    error = ErrorInfo(type="ValueError", message="bad", traceback="tb")
    store.record_manifest(db, a_manifest(["t1"]))
    store.record_results(db, [a_result("t1", state="failed", payload=b"", error=error)])
    db.commit()

    task = store.get_tasks(db, ["t1"])[0]

    assert task.status == "failed"
    assert task.error == error
    assert task.payload_b64 == ""


def test_a_second_result_for_a_task_does_not_overwrite_the_first(db: Session) -> None:
    store.record_manifest(db, a_manifest(["t1"]))
    store.record_results(db, [a_result("t1", payload=b"1", worker="first:1")])
    db.commit()

    store.record_results(db, [a_result("t1", payload=b"2", worker="second:2")])
    db.commit()

    task = store.get_tasks(db, ["t1"])[0]
    assert base64.b64decode(task.payload_b64) == b"1"
    assert task.worker == "first:1"


def test_the_first_of_two_results_in_one_batch_wins(db: Session) -> None:
    store.record_results(db, [a_result("t1", payload=b"1"),
                              a_result("t1", state="failed", payload=b"",
                                       error=ErrorInfo(type="TaskDeadLettered", message="late"))])
    db.commit()

    task = store.get_tasks(db, ["t1"])[0]
    assert task.status == "success"
    assert base64.b64decode(task.payload_b64) == b"1"


def test_a_manifest_arriving_after_the_result_keeps_the_result(db: Session) -> None:
    store.record_results(db, [a_result("t1")])
    db.commit()

    store.record_manifest(db, a_manifest(["t1", "t2"], submitted=99.0))
    db.commit()

    t1, t2 = store.get_tasks(db, ["t1", "t2"])
    assert t1.status == "success"
    assert base64.b64decode(t1.payload_b64) == b"42"
    assert t1.submitted == 99.0
    assert t2.status == "waiting"


def test_get_tasks_answers_in_the_order_asked_and_unknown_for_ids_never_seen(db: Session) -> None:
    store.record_manifest(db, a_manifest(["t1", "t2"]))
    store.record_results(db, [a_result("t2")])
    db.commit()

    tasks = store.get_tasks(db, ["nobody", "t2", "t1", "nothing"])

    assert [t.task_id for t in tasks] == ["nobody", "t2", "t1", "nothing"]
    assert [t.status for t in tasks] == ["unknown", "success", "waiting", "unknown"]


def test_list_group_tasks_lists_only_that_groups_tasks(db: Session) -> None:
    store.record_manifest(db, a_manifest(["t1", "t2"]))
    store.record_manifest(db, GroupManifest(task_group_id="group-2", endpoint_id="ep-1",
                                            user="alice", task_ids=["t3"], submitted=1.0))
    db.commit()

    assert sorted(t.task_id for t in store.list_group_tasks(db, "group-1")) == ["t1", "t2"]


#: SQLite's default cap on bound values per statement (builds may raise it; 999 before 3.32).
SQLITE_DEFAULT_MAX_VARIABLES = 32766


def test_a_manifest_larger_than_sqlites_variable_limit_is_recorded(db: Session) -> None:
    # Given SQLite's default limit on the values one statement may bind
    raw = db.connection().connection.dbapi_connection
    assert isinstance(raw, sqlite3.Connection)
    raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, SQLITE_DEFAULT_MAX_VARIABLES)
    # and a task group (one client batch) with more tasks than one statement can bind
    task_ids = [f"t{i}" for i in range(SQLITE_DEFAULT_MAX_VARIABLES // 7 + 1)]

    # When the ledger records its manifest
    store.record_manifest(db, a_manifest(task_ids))
    db.commit()

    # Then every task is waiting
    assert {t.status for t in store.get_tasks(db, [task_ids[0], task_ids[-1]])} == {"waiting"}


# -- endpoints ---------------------------------------------------------------------------


def test_an_endpoint_without_heartbeats_was_never_seen(db: Session) -> None:
    endpoint = store.create_endpoint(db, EndpointIn(name="lab", owner="alice"))

    status = store.endpoint_status(db, endpoint.endpoint_id, now=1000.0)

    assert status.status == "never seen"
    assert status.last_seen is None


def test_an_endpoint_with_a_recent_heartbeat_is_online(db: Session) -> None:
    endpoint = store.create_endpoint(db, EndpointIn(name="lab"))
    store.record_heartbeat(db, a_heartbeat(endpoint.endpoint_id, sent=1000.0, period=10.0))
    db.commit()

    status = store.endpoint_status(db, endpoint.endpoint_id, now=1000.0 + 29.0)

    assert status.status == "online"
    assert status.last_seen == 1000.0
    assert status.details["hostname"] == "node1"


def test_an_endpoint_silent_for_more_than_three_periods_is_offline(db: Session) -> None:
    endpoint = store.create_endpoint(db, EndpointIn(name="lab"))
    store.record_heartbeat(db, a_heartbeat(endpoint.endpoint_id, sent=1000.0, period=10.0))
    db.commit()

    status = store.endpoint_status(db, endpoint.endpoint_id, now=1000.0 + 31.0)

    assert status.status == "offline"
    assert status.last_seen == 1000.0


def test_an_older_heartbeat_does_not_replace_a_newer_one(db: Session) -> None:
    endpoint = store.create_endpoint(db, EndpointIn(name="lab"))
    store.record_heartbeat(db, a_heartbeat(endpoint.endpoint_id, sent=2000.0))
    store.record_heartbeat(db, a_heartbeat(endpoint.endpoint_id, sent=1000.0))
    db.commit()

    assert store.endpoint_status(db, endpoint.endpoint_id, now=2001.0).last_seen == 2000.0


def test_a_heartbeat_of_an_unregistered_endpoint_is_dropped(db: Session) -> None:
    store.record_heartbeat(db, a_heartbeat("unregistered", sent=1.0))
    db.commit()

    with pytest.raises(NotFound):
        store.endpoint_status(db, "unregistered")


def test_list_endpoints_lists_the_oldest_first(db: Session) -> None:
    first = store.create_endpoint(db, EndpointIn(name="first"))
    second = store.create_endpoint(db, EndpointIn(name="second"))

    listed = [e.endpoint_id for e in store.list_endpoints(db)]

    assert listed.index(first.endpoint_id) < listed.index(second.endpoint_id)
    assert store.get_endpoint(db, second.endpoint_id).name == "second"


# -- history, size cap and time to live --------------------------------------------------


def test_a_finished_task_lists_each_state_it_passed_through_with_its_time(db: Session) -> None:
    store.record_manifest(db, a_manifest(["t1"], submitted=100.0))
    store.record_results(db, [a_result("t1")])
    history = store.get_tasks(db, ["t1"])[0].history
    assert [(e.state, e.at) for e in history] == [
        ("waiting", 100.0), ("received", 101.0), ("running", 102.0), ("success", 103.0)]


def test_a_dead_lettered_task_ends_its_history_dead_lettered_with_the_reason(db: Session) -> None:
    store.record_results(db, [a_result(
        "t1", state="failed", payload=b"", timings=Timings(),
        error=ErrorInfo(type="TaskDeadLettered", message="delivery limit reached"))], now=150.0)
    (event,) = store.get_tasks(db, ["t1"])[0].history
    assert (event.state, event.at, event.detail) == ("dead-lettered", 150.0, "delivery limit reached")


def test_a_result_over_the_size_cap_keeps_its_state_but_not_its_value(db: Session) -> None:
    store.record_results(db, [a_result("big", payload=b"x" * 2000), a_result("small")],
                         size_limit=1000)
    big, small = store.get_tasks(db, ["big", "small"])
    assert (big.status, big.payload_b64) == ("success", "")
    assert "2,000 bytes" in big.result_note and "1,000" in big.result_note
    assert (small.payload_b64, small.result_note) == (base64.b64encode(b"42").decode(), "")


def test_results_past_their_time_to_live_lose_their_values_and_say_so(db: Session) -> None:
    store.record_results(db, [a_result("old")], now=1000.0)
    store.record_results(db, [a_result("new")], now=5000.0)
    store.record_manifest(db, a_manifest(["waiting"]))
    assert store.expire_results(db, older_than=2000.0, ttl_text="7 days") == 1
    old, new, waiting = store.get_tasks(db, ["old", "new", "waiting"])
    assert (old.status, old.payload_b64) == ("success", "")
    assert old.result_note == "the result expired: this registry keeps results for 7 days"
    assert new.payload_b64 and not new.result_note
    assert waiting.status == "waiting" and not waiting.result_note


def test_the_end_user_a_gateway_submitted_for_is_recorded(db: Session) -> None:
    store.record_results(db, [a_result("t1", user="gateway", on_behalf_of="carol@uni.edu")])
    task = store.get_tasks(db, ["t1"])[0]
    assert (task.user, task.on_behalf_of) == ("gateway", "carol@uni.edu")
