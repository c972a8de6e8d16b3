"""Users, groups, tokens and policies as plain functions over a real SQLite file."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from gc_core.errors import Forbidden, NotAuthenticated, NotFound, RegistryError
from gc_core.protocol import ResultMessage
from gc_core.registry import identity, store
from gc_core.registry.db import TokenRow, open_database
from gc_core.registry_api.schemas import EndpointIn, EndpointPolicy, FunctionIn, FunctionSharing


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Session]:
    sessions = open_database(f"sqlite:///{tmp_path}/r.db")
    with sessions() as session:
        for name in ("alice", "bob", "carol"):
            identity.create_user(session, name)
        identity.create_user(session, "gateway", kind="service")
        identity.create_user(session, "root-admin", admin=True)
        identity.create_group(session, "physics")
        identity.add_member(session, "physics", "carol")
        yield session
    sessions.kw["bind"].dispose()


def principal(db: Session, name: str) -> identity.Principal:
    return identity.authenticate(db, identity.issue_token(db, name).token)


def a_function(db: Session, owner: str, sharing: FunctionSharing | None = None) -> str:
    body = FunctionIn(name="f", content_type="application/vnd.gc.cloudpickle",
                      payload_b64=base64.b64encode(owner.encode()).decode(), python_version="3.11",
                      serializer="cloudpickle", sharing=sharing or FunctionSharing())
    return store.register_function(db, body, owner=owner).function_id


# -- tokens ------------------------------------------------------------------------------


def test_a_token_stands_for_its_user_with_their_groups(db: Session) -> None:
    carol = principal(db, "carol")
    assert (carol.name, carol.kind, carol.groups, carol.admin) == (
        "carol", "user", frozenset({"physics"}), False)


def test_only_a_hash_of_a_token_is_stored(db: Session) -> None:
    issued = identity.issue_token(db, "alice")
    stored = db.get(TokenRow, issued.token_id)
    assert stored is not None and issued.token not in (stored.token_hash, stored.token_id)


def test_a_revoked_token_is_refused_with_a_message_that_says_so_and_what_to_do(db: Session) -> None:
    issued = identity.issue_token(db, "alice")
    identity.revoke_token(db, issued.token_id)
    with pytest.raises(NotAuthenticated, match=rf"token {issued.token_id} was revoked .*gc-client login"):
        identity.authenticate(db, issued.token)


def test_an_expired_token_is_refused_with_a_message_that_says_so(db: Session) -> None:
    issued = identity.issue_token(db, "alice", lifetime=60)
    assert issued.expires is not None
    identity.authenticate(db, issued.token, now=issued.expires - 1)
    with pytest.raises(NotAuthenticated, match=rf"token {issued.token_id} expired at"):
        identity.authenticate(db, issued.token, now=issued.expires + 1)


def test_an_unknown_token_is_refused(db: Session) -> None:
    with pytest.raises(NotAuthenticated, match="does not know this token"):
        identity.authenticate(db, "gct_not-a-token")


def test_a_user_may_revoke_only_their_own_tokens(db: Session) -> None:
    issued = identity.issue_token(db, "alice")
    with pytest.raises(NotFound):
        identity.revoke_token(db, issued.token_id, by=principal(db, "bob"))
    assert identity.revoke_token(db, issued.token_id, by=principal(db, "alice")).revoked


def test_an_agent_token_acts_for_its_endpoint_only_and_only_its_owner_may_issue_it(
        db: Session) -> None:
    endpoint = store.create_endpoint(db, EndpointIn(name="lab"), owner="alice")
    with pytest.raises(Forbidden, match="only the owner"):
        identity.issue_token(db, "bob", endpoint_id=endpoint.endpoint_id)
    agent = identity.authenticate(db, identity.issue_token(
        db, "alice", endpoint_id=endpoint.endpoint_id).token)
    assert (agent.kind, agent.name, agent.endpoint_id) == (
        "agent", f"endpoint-{endpoint.endpoint_id}", endpoint.endpoint_id)


@pytest.mark.parametrize("name", ["", "a.b", "endpoint-x", "x" * 65, "-lead", "sp ace"])
def test_user_names_must_fit_one_routing_key_word(db: Session, name: str) -> None:
    with pytest.raises(ValueError, match="is not allowed"):
        identity.create_user(db, name)


# -- endpoint and function policies ------------------------------------------------------


def test_a_private_endpoint_is_seen_and_used_only_by_its_owner_and_whom_it_allows(
        db: Session) -> None:
    lab = store.create_endpoint(db, EndpointIn(name="lab", policy=EndpointPolicy(
        allowed_users=["bob"], allowed_groups=["physics"])), owner="alice")
    store.create_endpoint(db, EndpointIn(name="alone"), owner="alice")
    listed = store.create_endpoint(db, EndpointIn(name="open", policy=EndpointPolicy(
        visibility="listed")), owner="alice")
    seen = {name: sorted(e.name for e in store.list_endpoints(db, principal(db, name)))
            for name in ("alice", "bob", "carol", "gateway")}
    assert seen == {"alice": ["alone", "lab", "open"], "bob": ["lab", "open"],
                    "carol": ["lab", "open"], "gateway": ["open"]}
    with pytest.raises(NotFound, match="private"):
        store.get_endpoint(db, lab.endpoint_id, principal(db, "gateway"))
    assert store.allowed_functions(db, listed.endpoint_id, principal(db, "bob")) == []


def test_only_the_owner_may_change_an_endpoints_policy(db: Session) -> None:
    lab = store.create_endpoint(db, EndpointIn(name="lab", policy=EndpointPolicy(
        allowed_users=["bob"])), owner="alice")
    with pytest.raises(Forbidden, match="only alice"):
        store.set_endpoint_policy(db, lab.endpoint_id, EndpointPolicy(allowed_users=["bob", "carol"]),
                                  principal(db, "bob"))
    changed = store.set_endpoint_policy(db, lab.endpoint_id, EndpointPolicy(allowed_users=["carol"]),
                                        principal(db, "alice"))
    assert changed.policy.allowed_users == ["carol"]


def test_allowed_functions_follow_sharing_and_the_endpoints_permitted_list(db: Session) -> None:
    lab = store.create_endpoint(db, EndpointIn(name="lab", policy=EndpointPolicy(
        allowed_users=["bob", "carol"])), owner="alice")
    private = a_function(db, "alice")
    public = a_function(db, "bob", FunctionSharing(sharing="public"))
    physics = a_function(db, "carol", FunctionSharing(sharing="groups", shared_groups=["physics"]))

    def allowed(name: str) -> set[str]:
        return {f.function_id for f in store.allowed_functions(db, lab.endpoint_id,
                                                               principal(db, name))}

    assert allowed("alice") == {private, public}
    assert allowed("bob") == {public}
    assert allowed("carol") == {public, physics}
    store.set_endpoint_policy(db, lab.endpoint_id, EndpointPolicy(
        allowed_users=["bob", "carol"], allowed_functions=[physics]), principal(db, "alice"))
    assert allowed("carol") == {physics} and allowed("bob") == set()


def test_the_agents_recheck_names_why_a_task_is_refused(db: Session) -> None:
    lab = store.create_endpoint(db, EndpointIn(name="lab", policy=EndpointPolicy(
        allowed_users=["bob"], allowed_serializers=["application/json"])), owner="alice")
    agent = identity.authenticate(db, identity.issue_token(
        db, "alice", endpoint_id=lab.endpoint_id).token)
    mine = a_function(db, "bob")

    def check(user: str, function_id: str, content_type: str = "application/json") -> str | None:
        return store.authorize_task(db, lab.endpoint_id, user, function_id, content_type, agent)

    assert check("bob", mine) is None
    assert check("carol", mine) == f"carol is not allowed to use endpoint {lab.endpoint_id}"
    assert check("mallory", mine) == "mallory is not a registered user"
    assert "is not shared with alice" in (check("alice", mine) or "")
    assert "takes only application/json" in (check("bob", mine, "application/vnd.gc.cloudpickle") or "")
    with pytest.raises(Forbidden, match="only the agent"):
        store.authorize_task(db, lab.endpoint_id, "bob", mine, "application/json",
                             principal(db, "bob"))


def test_a_task_is_visible_to_its_submitter_and_admins_only(db: Session) -> None:
    store.record_results(db, [ResultMessage(task_id="t1", task_group_id="g", user="alice",
                                            state="success", content_type="application/json",
                                            payload=b"1")])
    assert store.get_tasks(db, ["t1"], principal(db, "alice"))[0].status == "success"
    assert store.get_tasks(db, ["t1"], principal(db, "bob"))[0].status == "unknown"
    assert store.get_tasks(db, ["t1"], principal(db, "root-admin"))[0].status == "success"


@pytest.mark.parametrize(("cap", "said"), [(90 * 86400, "90 days"), (7200, "2 hours"),
                                           (60, "1 minute"), (45, "45 seconds")])
def test_a_token_over_the_lifetime_cap_is_refused_naming_the_cap(db: Session, cap: float,
                                                                  said: str) -> None:
    with pytest.raises(RegistryError, match=f"at most {said} "):
        identity.issue_token(db, "alice", lifetime=cap + 1, max_lifetime=cap)
