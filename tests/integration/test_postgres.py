"""The registry's schema and store on SQLite and PostgreSQL: migrations, upserts, the ledger."""

from __future__ import annotations

import base64
import time
import uuid

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, select, text

from gc_core.broker import BrokerSession
from gc_core.errors import NotAuthenticated
from gc_core.protocol import GroupManifest, Heartbeat, ResultMessage, encode_result
from gc_core.registry import identity, store
from gc_core.registry.db import AgentHeartbeatRow, Base, TaskRow, open_database
from gc_core.registry_api.schemas import EndpointIn, EndpointPolicy, FunctionIn, FunctionSharing
from gc_core.topology import load_topology
from tests.fabric import eventually
from tests.integration.conftest import OwnRegistry


def _schema_differences(engine: Engine) -> list[object]:
    """What ``alembic check`` would report: the models against the migrated database."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def test_the_migrations_build_exactly_the_models(db_url: str) -> None:
    sessions = open_database(db_url)
    engine = sessions.kw["bind"]
    assert _schema_differences(engine) == []
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()


def test_a_database_made_before_migrations_is_completed_and_keeps_its_rows(db_url: str) -> None:
    # Given the tables create_all made before the ledger kept notes and before actions
    engine = create_engine(db_url)
    Base.metadata.create_all(engine, tables=[t for t in Base.metadata.sorted_tables
                                             if t.name != "actions"])
    with engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_tasks_recorded"))
        connection.execute(text("DROP INDEX ix_tasks_user_time"))  # it came with 0006
        for column in ("recorded", "result_note"):
            connection.execute(text(f"ALTER TABLE tasks DROP COLUMN {column}"))
        connection.execute(text(
            "INSERT INTO tasks (task_id, task_group_id, endpoint_id, function_id, \"user\", "
            "on_behalf_of, status, worker, content_type, stdout, stderr) "
            "VALUES ('old', 'g', 'e', 'f', 'u', '', 'success', '', 'application/json', '', '')"))
    engine.dispose()
    # When the registry opens it
    sessions = open_database(db_url)
    engine = sessions.kw["bind"]
    # Then it has every table and column of the models, and the old row is still there
    assert _schema_differences(engine) == []
    assert {"actions", "alembic_version"} <= set(inspect(engine).get_table_names())
    with sessions() as db:
        row = db.scalars(select(TaskRow).where(TaskRow.task_id == "old")).one()
        assert (row.status, row.result_note) == ("success", "")
    engine.dispose()


def test_the_store_and_the_ledger_upserts_work_on_both_databases(db_url: str) -> None:
    sessions = open_database(db_url)
    with sessions() as db:
        # Identities and tokens
        identity.create_user(db, "alice")
        token = identity.issue_token(db, "alice")
        assert identity.authenticate(db, token.token).name == "alice"
        # Functions and endpoints
        function = store.register_function(db, FunctionIn(
            name="f", content_type="application/vnd.gc.cloudpickle",
            payload_b64=base64.b64encode(b"\x80payload").decode(), python_version="3.11",
            serializer="cloudpickle"), owner="alice")
        again = store.register_function(db, FunctionIn(
            name="f", content_type="application/vnd.gc.cloudpickle",
            payload_b64=base64.b64encode(b"\x80payload").decode(), python_version="3.11",
            serializer="cloudpickle"), owner="alice")
        assert again.function_id == function.function_id
        assert store.get_function(db, function.function_id).payload_b64 == function.payload_b64
        endpoint = store.create_endpoint(db, EndpointIn(name="lab"), owner="alice")
        assert [e.endpoint_id for e in store.list_endpoints(db)] == [endpoint.endpoint_id]
        # The ledger: a manifest, then results (the first one wins), then the manifest again
        manifest = GroupManifest(task_group_id="g", endpoint_id=endpoint.endpoint_id,
                                 user="alice", task_ids=["t1", "t2"], submitted=time.time())
        store.record_manifest(db, manifest)
        db.commit()
        store.record_results(db, [_result("t1", b"1"), _result("t1", b"2")])
        db.commit()
        store.record_results(db, [_result("t1", b"3")])
        store.record_manifest(db, manifest)
        db.commit()
        t1, t2 = store.get_tasks(db, ["t1", "t2"])
        assert (t1.status, base64.b64decode(t1.payload_b64), t2.status) == ("success", b"1", "waiting")
        assert t1.submitted == pytest.approx(manifest.submitted)
    sessions.kw["bind"].dispose()


def test_a_manifest_naming_anothers_task_ids_leaves_them_theirs_and_says_which(
        db_url: str) -> None:
    sessions = open_database(db_url)
    with sessions() as db:
        def manifest(user: str, endpoint: str, task_ids: list[str]) -> GroupManifest:
            return GroupManifest(task_group_id=f"{user}-group", endpoint_id=endpoint, user=user,
                                 task_ids=task_ids, submitted=time.time())

        assert store.record_manifest(db, manifest("alice", "ep-a", ["t1", "t2"])) == []
        # bob names one of alice's, one of his own, and alice's again from her other endpoint
        assert store.record_manifest(db, manifest("bob", "ep-b", ["t3", "t2", "t2"])) == ["t2"]
        assert store.record_manifest(db, manifest("alice", "ep-c", ["t1"])) == ["t1"]
        # sent again, a manifest takes nothing from anyone
        assert store.record_manifest(db, manifest("alice", "ep-a", ["t1", "t2"])) == []
        db.commit()
        owners = store.task_owners(db, ["t1", "t2", "t3"])
        assert {t: (o.user, o.endpoint_id) for t, o in owners.items()} == {
            "t1": ("alice", "ep-a"), "t2": ("alice", "ep-a"), "t3": ("bob", "ep-b")}
    sessions.kw["bind"].dispose()


def test_groups_policies_tokens_and_retention_work_on_both_databases(db_url: str) -> None:
    sessions = open_database(db_url)
    with sessions() as db:
        # A group-based endpoint policy, as the agents' re-check applies it
        for name in ("alice", "bob"):
            identity.create_user(db, name)
        identity.create_group(db, "physics")
        identity.add_member(db, "physics", "bob")
        endpoint = store.create_endpoint(db, EndpointIn(name="lab", policy=EndpointPolicy(
            allowed_groups=["physics"])), owner="alice")
        function = store.register_function(db, FunctionIn(
            name="f", content_type="application/json", payload_b64="AA==",
            python_version="3.11", serializer="json", sharing=FunctionSharing(sharing="public")),
            owner="alice")
        assert store.authorize_task(db, endpoint.endpoint_id, "bob", function.function_id,
                                    "application/json") is None
        identity.remove_member(db, "physics", "bob")
        assert "not allowed" in str(store.authorize_task(
            db, endpoint.endpoint_id, "bob", function.function_id, "application/json"))
        # A revoked token is refused
        token = identity.issue_token(db, "bob")
        identity.revoke_token(db, token.token_id)
        with pytest.raises(NotAuthenticated, match="revoked"):
            identity.authenticate(db, token.token)
        # Results over the cap keep their state, not their value; old values expire
        store.record_results(db, [_result("big", b"x" * 100), _result("small", b"1")],
                             size_limit=10, now=1000.0)
        db.commit()
        assert store.expire_results(db, older_than=2000.0, ttl_text="1s") == 1
        db.commit()
        big, small = store.get_tasks(db, ["big", "small"])
        assert (big.status, big.payload_b64, "larger than" in big.result_note) == ("success", "", True)
        assert (small.payload_b64, "expired" in small.result_note) == ("", True)
        assert sorted(t.task_id for t in store.list_group_tasks(db, "g")) == ["big", "small"]
    sessions.kw["bind"].dispose()


def test_an_endpoint_keeps_the_heartbeats_of_its_newest_agents_only(db_url: str) -> None:
    # An agent's credential can send heartbeats naming any host and pid, each a row of its
    # own: a flood of them must not grow the database (every user's) without bound.
    sessions = open_database(db_url)
    flood = store.MAX_AGENTS_PER_ENDPOINT + 40
    with sessions() as db:
        endpoint_id = store.create_endpoint(db, EndpointIn(name="crowded"), owner="alice").endpoint_id
        for pid in range(flood):
            store.record_heartbeat(db, Heartbeat(
                endpoint_id=endpoint_id, hostname="h", pid=pid, sent=1000.0 + pid / 1000,
                period=10.0, started=1000.0, engine="threads", workers=1, workers_busy=0,
                tasks_received=0, tasks_succeeded=0, tasks_failed=0), now=2000.0)
            db.commit()
        kept = db.scalars(select(AgentHeartbeatRow.agent)).all()
        status = store.endpoint_status(db, endpoint_id, now=1001.0)
    assert sorted(kept) == sorted(f"h:{pid}" for pid in range(flood - store.MAX_AGENTS_PER_ENDPOINT, flood))
    assert status.details["workers"] == store.MAX_AGENTS_PER_ENDPOINT


def test_a_registry_on_postgresql_records_results_from_the_broker(
        own_registry: OwnRegistry, postgres_url: str) -> None:
    # Given a registry on PostgreSQL with its ledger on a vhost of its own
    server, broker_url = own_registry(postgres_url, "open")
    topology = load_topology()
    publisher = BrokerSession(broker_url, name="test-postgres", topology=topology)
    publisher.start()
    try:
        eventually(lambda: httpx.get(f"{server.url}/health").json()["ledger"] == "consuming",
                   what="the ledger to consume")
        # When a result reaches gc.results
        task_id = str(uuid.uuid4())
        publisher.publish(topology.exchange("results"), "someone.g",
                          encode_result(_result(task_id, b"42")))
        assert publisher.wait_settled(30)
        # Then the registry's ledger has it in PostgreSQL
        task = eventually(lambda: _finished(f"{server.url}/tasks/{task_id}"),
                          what="the result in the ledger")
        assert base64.b64decode(task["payload_b64"]) == b"42"
    finally:
        publisher.close()


def _finished(url: str) -> dict[str, object] | None:
    task: dict[str, object] = httpx.get(url).json()
    return task if task["status"] == "success" else None


def _result(task_id: str, payload: bytes) -> ResultMessage:
    return ResultMessage(task_id=task_id, task_group_id="g", user="someone", state="success",
                         content_type="application/json", payload=payload)
