"""The Flows-style action provider, end to end: HTTP in, a real agent runs the task."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from gc_client import Client
from gc_core.registry import identity, store
from gc_core.registry_api.schemas import EndpointIn, EndpointPolicy, FunctionIn
from tests.fabric import Endpoint, Fabric, eventually
from tests.integration.conftest import OwnRegistry


def add(a: int, b: int = 0) -> int:
    return a + b


def fail(message: str) -> None:
    raise RuntimeError(message)


def mark_and_sleep(marker: str, seconds: float) -> None:
    import time
    from pathlib import Path

    Path(marker).write_text("running")
    time.sleep(seconds)


@pytest.fixture
def http(fabric: Fabric) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fabric.registry_url, timeout=60) as session:
        yield session


def _run(http: httpx.Client, endpoint_id: str, function_id: str, *args: Any,
         **extra: Any) -> httpx.Response:
    body = {"endpoint_id": endpoint_id, "function_id": function_id, "args": list(args),
            **extra.pop("body", {})}
    return http.post("/actions/run", json={"request_id": str(uuid.uuid4()), "body": body,
                                           **extra})


def _final(http: httpx.Client, action_id: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        status: dict[str, Any] = http.get(f"/actions/{action_id}/status").json()
        return status if status["status"] != "ACTIVE" else None

    found: dict[str, Any] = eventually(finished, what=f"action {action_id} to finish")
    return found


def test_the_introspection_document_describes_the_run_body(http: httpx.Client) -> None:
    description = http.get("/actions").json()
    assert description["synchronous"] is False
    assert description["types"] == ["Action"]
    assert {"endpoint_id", "function_id", "args", "kwargs"} <= set(
        description["input_schema"]["properties"])
    assert description["input_schema"]["required"] == ["endpoint_id", "function_id"]


def test_an_action_is_active_until_its_endpoint_runs_it_then_succeeds_with_the_value(
        http: httpx.Client, client: Client, make_endpoint: Any) -> None:
    # Given an endpoint whose agent is not running yet
    idle: Endpoint = make_endpoint()
    response = _run(http, idle.endpoint_id, client.register_function(add), 2,
                    body={"kwargs": {"b": 40}}, label="add two numbers")
    assert response.status_code == 202, response.text
    action = response.json()
    # Then the action is active, and stays so while the task waits in the queue
    assert action["status"] == "ACTIVE"
    assert action["creator_id"] == "anonymous"
    status = http.get(f"/actions/{action['action_id']}/status").json()
    assert (status["status"], status["label"]) == ("ACTIVE", "add two numbers")
    # When the agent starts, the action succeeds with the function's JSON value
    idle.start()
    final = _final(http, action["action_id"])
    assert final["status"] == "SUCCEEDED"
    assert final["details"]["result"] == 42
    assert final["completion_time"] >= final["start_time"]


def test_a_failing_function_fails_the_action_with_its_message(
        http: httpx.Client, client: Client, endpoint: Endpoint) -> None:
    action = _run(http, endpoint.endpoint_id, client.register_function(fail), "bad input").json()
    final = _final(http, action["action_id"])
    assert (final["status"], final["display_status"]) == ("FAILED", "Failed")
    assert final["details"]["error"]["type"] == "RuntimeError"
    assert final["details"]["error"]["message"] == "bad input"


def test_cancelling_a_running_action_fails_it_as_cancelled(
        http: httpx.Client, client: Client, endpoint: Endpoint, tmp_path: Path) -> None:
    # Given an action whose function is running
    marker = tmp_path / "running"
    action = _run(http, endpoint.endpoint_id, client.register_function(mark_and_sleep),
                  str(marker), 300).json()
    eventually(marker.exists, what="the function to start")
    # When it is cancelled, the answer says so at once, and the action then fails as cancelled
    cancelling = http.post(f"/actions/{action['action_id']}/cancel")
    assert cancelling.status_code == 200, cancelling.text
    assert cancelling.json()["display_status"] == "Cancelling"
    final = _final(http, action["action_id"])
    assert (final["status"], final["display_status"]) == ("FAILED", "Cancelled")
    assert final["details"]["state"] == "cancelled"


def test_an_action_is_released_only_once_finished_and_then_gone(
        http: httpx.Client, client: Client, make_endpoint: Any) -> None:
    idle: Endpoint = make_endpoint()
    request = {"request_id": str(uuid.uuid4()), "body": {
        "endpoint_id": idle.endpoint_id, "function_id": client.register_function(add),
        "args": [1]}}
    action_id = http.post("/actions/run", json=request).json()["action_id"]
    # An active action cannot be released
    refused = http.post(f"/actions/{action_id}/release")
    assert refused.status_code == 409
    assert "still active" in refused.json()["detail"]
    idle.start()
    _final(http, action_id)
    # A finished one can; its final status is the answer, and then it is gone
    released = http.post(f"/actions/{action_id}/release")
    assert (released.status_code, released.json()["status"]) == (200, "SUCCEEDED")
    for path in ("status", "release", "cancel"):
        gone = http.request("GET" if path == "status" else "POST", f"/actions/{action_id}/{path}")
        assert gone.status_code == 404
        assert action_id in gone.json()["detail"]
    # and its request_id cannot start it again
    rerun = http.post("/actions/run", json=request)
    assert rerun.status_code == 409
    assert "released" in rerun.json()["detail"]


def test_a_repeated_request_id_returns_the_same_action_and_a_reused_one_is_refused(
        http: httpx.Client, client: Client, endpoint: Endpoint) -> None:
    request = {"request_id": str(uuid.uuid4()), "body": {
        "endpoint_id": endpoint.endpoint_id, "function_id": client.register_function(add),
        "args": [1, 2]}}
    first = http.post("/actions/run", json=request)
    again = http.post("/actions/run", json=request)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["action_id"] == first.json()["action_id"]
    request["body"]["args"] = [3, 4]  # type: ignore[index]
    reused = http.post("/actions/run", json=request)
    assert reused.status_code == 409
    assert "different request" in reused.json()["detail"]


def test_an_unknown_action_is_not_found(http: httpx.Client) -> None:
    response = http.get("/actions/no-such-action/status")
    assert response.status_code == 404
    assert "no action no-such-action" in response.json()["detail"]


@pytest.mark.parametrize(("request_json", "reason"), [
    ({"body": {"function_id": "f"}}, "endpoint_id"),
    ({"body": {"endpoint_id": "e", "function_id": "f", "args": {"a": 1}}}, "args"),
    ({"body": {"endpoint_id": "e", "function_id": "f"}, "colour": "blue"}, "colour"),
    ({"body": {"endpoint_id": "e", "function_id": "f"}, "release_after": "soon"}, "ISO 8601"),
])
def test_a_malformed_run_request_is_refused_with_the_reason(
        http: httpx.Client, request_json: dict[str, Any], reason: str) -> None:
    response = http.post("/actions/run", json=request_json)
    assert response.status_code == 422
    assert reason in response.text


# -- policies, on a registry that checks tokens ---------------------------------------------


@pytest.fixture(scope="module")
def guarded(own_registry: OwnRegistry, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, str]:
    """A tokens-mode registry: alice owns a listed endpoint (with no agent, nor queue) that
    bob may use, and a function she shares with nobody; carol may use neither."""
    db_url = f"sqlite:///{tmp_path_factory.mktemp('guarded') / 'registry.db'}"
    server, _broker_url = own_registry(db_url, "tokens")
    with Session(create_engine(db_url)) as db:
        for name in ("alice", "bob", "carol"):
            identity.create_user(db, name)
        endpoint = store.create_endpoint(db, EndpointIn(
            name="lab", owner="alice", policy=EndpointPolicy(visibility="listed", allowed_users=["bob"])))
        function = store.register_function(db, FunctionIn(
            name="f", content_type="application/vnd.gc.cloudpickle", payload_b64="AA==",
            python_version="3", serializer="cloudpickle"), owner="alice")
        return {"url": server.url, "endpoint_id": endpoint.endpoint_id,
                "function_id": function.function_id,
                **{name: identity.issue_token(db, name).token for name in ("alice", "bob", "carol")}}


def _run_as(guarded: dict[str, str], who: str | None, **body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {guarded[who]}"} if who else {}
    body = {"endpoint_id": guarded["endpoint_id"], "function_id": guarded["function_id"], **body}
    return httpx.post(f"{guarded['url']}/actions/run", json={"body": body}, headers=headers,
                      timeout=60)


def test_running_an_action_needs_a_token(guarded: dict[str, str]) -> None:
    response = _run_as(guarded, None)
    assert response.status_code == 401
    assert "needs a token" in response.json()["detail"]


def test_a_user_the_endpoint_does_not_allow_is_refused_saying_why(guarded: dict[str, str]) -> None:
    response = _run_as(guarded, "carol")
    assert response.status_code == 403
    assert f"carol is not allowed to use endpoint {guarded['endpoint_id']}" in \
        response.json()["detail"]


def test_a_function_not_shared_with_the_caller_is_refused_saying_why(
        guarded: dict[str, str]) -> None:
    response = _run_as(guarded, "bob")
    assert response.status_code == 403
    assert "not shared with bob" in response.json()["detail"]


def test_an_endpoint_without_a_task_queue_is_refused_saying_why(guarded: dict[str, str]) -> None:
    response = _run_as(guarded, "alice")
    assert response.status_code == 409
    assert "gc-agent start" in response.json()["detail"]


def test_arguments_that_are_not_plain_json_are_refused(guarded: dict[str, str]) -> None:
    body = (f'{{"body": {{"endpoint_id": "{guarded["endpoint_id"]}", '
            f'"function_id": "{guarded["function_id"]}", "args": [NaN]}}}}')
    response = httpx.post(f"{guarded['url']}/actions/run", content=body, timeout=60,
                          headers={"Authorization": f"Bearer {guarded['alice']}",
                                   "Content-Type": "application/json"})
    assert response.status_code == 422
    assert "plain JSON" in response.json()["detail"]
