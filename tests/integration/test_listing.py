"""``GET /tasks`` and ``GET /functions`` (and ``gc-client tasks``/``functions``) against a
real tokens-mode registry: keyset pages newest first, filters, and who sees what.

The ledger's rows are written with the registry's own store functions into the database
the running registry serves, which is what its ledger consumer does with each message; the
browser tests (test_ui_browser.py) run the whole path with a real agent.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from gc_core.errors import Forbidden, RegistryError
from gc_core.protocol import GroupManifest, ResultMessage, Timings
from gc_core.registry import identity, listing, store
from gc_core.registry.db import open_database
from gc_core.registry_api.client import RegistryClient
from gc_core.registry_api.listing import TaskSummary
from gc_core.registry_api.schemas import EndpointIn, FunctionIn, FunctionSharing
from tests.integration.conftest import OwnRegistry

#: alice's tasks: 40 on endpoint A in two groups, 12 on endpoint B; bob has 5 of his own.
ALICE_ON_A, ALICE_ON_B, BOBS = 40, 12, 5


@dataclass
class Ledger:
    """A tokens-mode registry whose ledger holds alice's and bob's tasks and functions."""

    url: str
    db: Session
    tokens: dict[str, str]
    endpoints: dict[str, str]
    alices: list[str]

    def as_user(self, user: str) -> RegistryClient:
        return RegistryClient(self.url, token=self.tokens[user])


def _record(db: Session, user: str, endpoint_id: str, group: str, count: int,
            first_second: float, batch: str = "") -> list[str]:
    """``count`` tasks submitted a second apart; every third one finishes, the rest wait."""
    task_ids = [f"{user}-{group}{batch}-{n:03d}" for n in range(count)]
    for n, task_id in enumerate(task_ids):
        store.record_manifest(db, GroupManifest(task_group_id=group, endpoint_id=endpoint_id,
                                                user=user, task_ids=[task_id],
                                                submitted=first_second + n))
    store.record_results(db, [ResultMessage(
        task_id=task_id, task_group_id=group, endpoint_id=endpoint_id, user=user,
        state="success", content_type="application/json", payload=b"1",
        timings=Timings(received=1.0, started=2.0, finished=3.0))
        for task_id in task_ids[::3]])
    db.commit()
    return task_ids


def _function(db: Session, owner: str, name: str, sharing: FunctionSharing) -> str:
    body = FunctionIn(name=name, content_type="application/vnd.gc.cloudpickle",
                      payload_b64=base64.b64encode(f"{owner}:{name}".encode()).decode(),
                      python_version="3.11.7", serializer="cloudpickle", sharing=sharing)
    return store.register_function(db, body, owner=owner).function_id


@pytest.fixture(scope="module")
def ledger(own_registry: OwnRegistry, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Ledger]:
    db_url = f"sqlite:///{tmp_path_factory.mktemp('listing') / 'registry.db'}"
    server, _ = own_registry(db_url, "tokens")
    with open_database(db_url)() as db:
        for name in ("alice", "bob", "carol"):
            identity.create_user(db, name)
        identity.create_user(db, "root", admin=True)
        identity.create_group(db, "physics")
        identity.add_member(db, "physics", "alice")
        identity.add_member(db, "physics", "carol")
        endpoints = {name: store.create_endpoint(db, EndpointIn(name=name), owner="alice")
                     .endpoint_id for name in ("A", "B")}
        tokens = {name: identity.issue_token(db, name, label="tests").token
                  for name in ("alice", "bob", "root")}
        tokens["agent-A"] = identity.issue_token(db, "alice", label="agent",
                                                 endpoint_id=endpoints["A"]).token
        alices = (_record(db, "alice", endpoints["A"], "g1", ALICE_ON_A // 2, 1000.0)
                  + _record(db, "alice", endpoints["A"], "g2", ALICE_ON_A // 2, 1000.5)
                  + _record(db, "alice", endpoints["B"], "g3", ALICE_ON_B, 900.0))
        _record(db, "bob", endpoints["A"], "g4", BOBS, 2000.0)
        yield Ledger(server.url, db, tokens, endpoints, alices)


def _walk_tasks(client: RegistryClient, limit: int, **filters: str) -> list[TaskSummary]:
    """Every page of a listing, following the cursors."""
    page = client.list_tasks(limit=limit, **filters)
    seen = list(page.tasks)
    while page.next_cursor is not None:
        page = client.list_tasks(limit=limit, cursor=page.next_cursor, **filters)
        seen.extend(page.tasks)
    return seen


def test_a_user_pages_through_all_their_tasks_newest_first_each_once(ledger: Ledger) -> None:
    listed = _walk_tasks(ledger.as_user("alice"), limit=7)

    assert sorted(t.task_id for t in listed) == sorted(ledger.alices)
    assert len({t.task_id for t in listed}) == len(listed)
    submitted = [t.submitted or 0.0 for t in listed]
    assert submitted == sorted(submitted, reverse=True)
    assert {t.user for t in listed} == {"alice"}


def test_tasks_recorded_between_pages_neither_repeat_nor_hide_older_ones(ledger: Ledger) -> None:
    alice = ledger.as_user("alice")
    first = alice.list_tasks(limit=5, task_group_id="g3")
    # Given three newer tasks in the group, recorded after the first page was read
    newer = _record(ledger.db, "alice", ledger.endpoints["B"], "g3", 3, 5000.0, batch="late")
    rest: list[TaskSummary] = []
    cursor = first.next_cursor
    while cursor is not None:
        page = alice.list_tasks(limit=5, task_group_id="g3", cursor=cursor)
        rest.extend(page.tasks)
        cursor = page.next_cursor

    shown = [t.task_id for t in first.tasks] + [t.task_id for t in rest]
    assert sorted(shown) == sorted(t for t in ledger.alices if "-g3-" in t)
    assert alice.list_tasks(limit=3, task_group_id="g3").tasks[0].task_id in newer


def test_filters_by_state_endpoint_and_group_combine(ledger: Ledger) -> None:
    alice = ledger.as_user("alice")

    on_b = _walk_tasks(alice, limit=50, endpoint_id=ledger.endpoints["B"])
    done_on_a = _walk_tasks(alice, limit=50, endpoint_id=ledger.endpoints["A"], state="success")
    waiting_in_g1 = _walk_tasks(alice, limit=50, task_group_id="g1", state="waiting")

    assert {t.task_id for t in on_b} >= {t for t in ledger.alices if "-g3-" in t}
    assert {t.endpoint_id for t in on_b} == {ledger.endpoints["B"]}
    assert {(t.status, t.endpoint_id) for t in done_on_a} == {("success", ledger.endpoints["A"])}
    assert len(done_on_a) == 2 * len(range(0, ALICE_ON_A // 2, 3))
    assert {(t.status, t.task_group_id) for t in waiting_in_g1} == {("waiting", "g1")}
    assert len(waiting_in_g1) == ALICE_ON_A // 2 - len(range(0, ALICE_ON_A // 2, 3))


def test_another_user_sees_only_their_own_an_agent_its_endpoints_an_admin_all(
        ledger: Ledger) -> None:
    bobs = _walk_tasks(ledger.as_user("bob"), limit=50)
    agents = _walk_tasks(ledger.as_user("agent-A"), limit=50)
    everything = _walk_tasks(ledger.as_user("root"), limit=500)

    assert {t.user for t in bobs} == {"bob"} and len(bobs) == BOBS
    assert {t.endpoint_id for t in agents} == {ledger.endpoints["A"]}
    assert len(agents) == ALICE_ON_A + BOBS
    assert {t.task_id for t in everything} >= set(ledger.alices) | {t.task_id for t in bobs}
    assert ledger.as_user("bob").list_tasks(task_group_id="g1").tasks == []


def test_a_cursor_the_registry_did_not_give_or_a_page_too_large_is_refused_saying_why(
        ledger: Ledger) -> None:
    alice = ledger.as_user("alice")

    with pytest.raises(RegistryError, match="not one this registry gave") as bad_cursor:
        alice.list_tasks(cursor="bm90LWEtY3Vyc29y")
    with pytest.raises(RegistryError, match="limit") as too_large:
        alice.list_tasks(limit=501)

    assert bad_cursor.value.status == too_large.value.status == 422


def test_functions_lists_own_group_shared_and_public_never_anothers_private(
        ledger: Ledger) -> None:
    db = ledger.db
    own = _function(db, "alice", "own", FunctionSharing())
    public = _function(db, "bob", "public", FunctionSharing(sharing="public"))
    bobs_private = _function(db, "bob", "private", FunctionSharing())
    physics = _function(db, "carol", "physics", FunctionSharing(sharing="groups",
                                                                shared_groups=["physics"]))
    # More functions shared with a group alice is not in than one scan of the table reads:
    # the page must still reach past them to her older ones.
    elsewhere = [_function(db, "carol", f"chem-{n}", FunctionSharing(
        sharing="groups", shared_groups=["chemistry"])) for n in range(250)]

    alice = ledger.as_user("alice")
    pages = [alice.list_functions(limit=1)]
    while pages[-1].next_cursor is not None:
        pages.append(alice.list_functions(limit=1, cursor=pages[-1].next_cursor))
    alices = [f.function_id for page in pages for f in page.functions]
    bobs = [f.function_id for f in ledger.as_user("bob").list_functions(limit=500).functions]

    assert alices == [physics, public, own]
    assert bobs == [bobs_private, public]
    assert not set(elsewhere) & (set(alices) | set(bobs))
    with pytest.raises(Forbidden, match="agent token cannot list functions"):
        ledger.as_user("agent-A").list_functions()


def test_gc_client_tasks_pages_with_the_command_it_prints_and_functions_lists(
        ledger: Ledger, tmp_path: Path) -> None:
    cli = str(Path(sys.executable).parent / "gc-client")
    env = {"PATH": "/usr/bin:/bin", "GC_HOME": str(tmp_path), "GC_REGISTRY_URL": ledger.url,
           "GC_TOKEN": ledger.tokens["alice"], "GC_USER": "alice"}
    registered = _function(ledger.db, "alice", "listed-by-the-cli", FunctionSharing())

    first = subprocess.run([cli, "tasks", "--group", "g1", "--state", "success", "--limit", "4"],
                           env=env, capture_output=True, text=True)
    more = first.stdout.strip().splitlines()[-1]
    second = subprocess.run([cli, *more.removeprefix("More: gc-client ").split()], env=env,
                            capture_output=True, text=True)
    functions = subprocess.run([cli, "functions"], env=env, capture_output=True, text=True)

    assert first.returncode == second.returncode == functions.returncode == 0, first.stderr
    assert more.startswith("More: gc-client tasks --group g1 --state success --limit 4 --cursor ")
    shown = [line.split()[0] for out in (first.stdout, second.stdout)
             for line in out.splitlines() if line.startswith("alice-g1-")]
    finished = [t for t in ledger.alices if t.startswith("alice-g1-")][::3]
    assert shown == sorted(finished, reverse=True)
    assert functions.stdout.splitlines()[0].split() == [
        "FUNCTION", "ID", "NAME", "OWNER", "SHARING", "REGISTERED", "(UTC)"]
    assert f"{registered}  listed-by-the-cli  alice" in functions.stdout


def test_pages_are_cut_the_same_on_sqlite_and_postgresql_ties_included(db_url: str) -> None:
    with open_database(db_url)() as db:
        identity.create_user(db, "alice")
        # Given tasks submitted in the same second, in three groups of ten
        for group in ("a", "b", "c"):
            store.record_manifest(db, GroupManifest(
                task_group_id=group, endpoint_id="ep", user="alice",
                task_ids=[f"{group}{n}" for n in range(10)], submitted=7.0))
        db.commit()
        alice = identity.principal_of_user(db, "alice")
        assert alice is not None
        pages = [listing.list_tasks(db, alice, limit=4)]
        while pages[-1].next_cursor is not None:
            pages.append(listing.list_tasks(db, alice, limit=4, cursor=pages[-1].next_cursor))
        in_b = listing.list_tasks(db, alice, listing.TaskFilter(task_group_id="b"), limit=100)

    shown = [task.task_id for page in pages for task in page.tasks]
    assert shown == sorted((f"{g}{n}" for g in "abc" for n in range(10)), reverse=True)
    assert [len(page.tasks) for page in pages] == [4] * 7 + [2]
    assert [task.task_id for task in in_b.tasks] == [f"b{n}" for n in range(9, -1, -1)]
