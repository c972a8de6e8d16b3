"""Deleting a function: its owner may, nobody else, and it is gone for good."""

from __future__ import annotations

import base64

import pytest
from sqlalchemy.orm import Session

from gc_core.errors import Forbidden, NotFound
from gc_core.registry import store
from gc_core.registry.identity import Principal
from gc_core.registry_api.schemas import FunctionIn, FunctionSharing
from tests.unit import test_registry_store

#: A session on a fresh SQLite registry: the store tests' fixture.
db = test_registry_store.db

ALICE = Principal(name="alice", kind="user")
BOB = Principal(name="bob", kind="user")
ALICES_AGENT = Principal(name="endpoint-ep1", kind="agent", endpoint_id="ep1", owner="alice")


def alices_function(db: Session, sharing: str = "private") -> str:
    body = FunctionIn(name="double", content_type="application/vnd.gc.cloudpickle",
                      payload_b64=base64.b64encode(b"function bytes").decode(), source=None,
                      python_version="3.11.7", serializer="cloudpickle 3.1.3", owner="alice",
                      sharing=FunctionSharing(sharing=sharing))  # type: ignore[arg-type]
    return store.register_function(db, body, owner="alice").function_id


def test_the_owner_deletes_a_function_and_it_is_gone(db: Session) -> None:
    function_id = alices_function(db)
    assert store.delete_function(db, function_id, ALICE).function_id == function_id
    with pytest.raises(NotFound):
        store.get_function(db, function_id, ALICE)
    # The same bytes register anew, under a new id.
    assert alices_function(db) != function_id


def test_a_user_it_is_shared_with_may_run_it_but_not_delete_it(db: Session) -> None:
    function_id = alices_function(db, sharing="public")
    with pytest.raises(Forbidden, match=r"only alice, who owns function .* may delete it"):
        store.delete_function(db, function_id, BOB)
    assert store.get_function(db, function_id, BOB).function_id == function_id


def test_a_private_function_of_another_user_is_not_even_found(db: Session) -> None:
    function_id = alices_function(db)
    with pytest.raises(NotFound):
        store.delete_function(db, function_id, BOB)
    assert store.get_function(db, function_id, ALICE).function_id == function_id


def test_the_owners_agent_cannot_delete_the_owners_function(db: Session) -> None:
    function_id = alices_function(db, sharing="public")
    with pytest.raises(Forbidden):
        store.delete_function(db, function_id, ALICES_AGENT)
