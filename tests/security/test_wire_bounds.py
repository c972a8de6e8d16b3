"""Forged task, result and event messages are refused where they are decoded, with a
ProtocolError and nothing else: no other exception escapes to kill a consumer thread."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gc_core.errors import ProtocolError
from gc_core.protocol import (
    MAX_ID_LENGTH,
    MAX_JSON_DEPTH,
    MAX_OUTPUT_HEADER,
    Envelope,
    ResultMessage,
    decode_event,
    decode_result,
    decode_task,
    encode_result,
)

GOOD_TASK = {"gc-protocol": 1, "gc-function-id": "f-1", "gc-endpoint-id": "ep-1",
             "gc-user": "alice", "gc-task-group": "g-1"}


def _task(headers: dict[str, Any], *, message_id: str = "t-1", correlation_id: str = "g-1",
          content_type: str = "application/json") -> Envelope:
    return Envelope(message_id, correlation_id, content_type, {**GOOD_TASK, **headers}, b"{}")


@pytest.mark.parametrize(("case", "envelope"), [
    ("deep JSON resource spec", _task({"gc-resource-spec": "[" * 5000 + "]" * 5000})),
    ("deep JSON options", _task({"gc-user-endpoint-config": '{"a":' * 3000 + "1" + "}" * 3000})),
    ("options nested past the bound",
     _task({"gc-user-endpoint-config": '{"a":' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1)})),
    ("NaN in a resource spec", _task({"gc-resource-spec": '{"num_nodes": NaN}'})),
    ("resource spec not an object", _task({"gc-resource-spec": "[1, 2]"})),
    ("function id over the bound", _task({"gc-function-id": "f" * (MAX_ID_LENGTH + 1)})),
    ("NUL in an identity", _task({"gc-identity": "alice\x00root"})),
    ("newline in an identity", _task({"gc-identity": "alice\nINFO forged log line"})),
    ("trailing newline in a user", _task({"gc-user": "alice\n"})),
    ("dot in a user (a routing key word)", _task({"gc-user": "alice.bob"})),
    ("empty correlation id and a 300-byte group", _task({"gc-task-group": "g" * 300}, correlation_id="")),
    ("empty task id", _task({}, message_id="")),
    ("user header a table", _task({"gc-user": {"name": "alice"}})),
    ("protocol a string", _task({"gc-protocol": "1"})),
    ("protocol a bool", _task({"gc-protocol": True})),
    ("content type with a newline", _task({}, content_type="application/json\nx")),
    ("dead-lettered into gc.tasks by a queue's arguments",
     _task({"x-death": [{"reason": "rejected", "queue": "gc.results.alice.g", "count": 1}]})),
])
def test_a_forged_task_is_refused_with_a_protocol_error(case: str, envelope: Envelope) -> None:
    with pytest.raises(ProtocolError):
        decode_task(envelope)


def _result(headers: dict[str, Any], body: bytes = b"1", **props: str) -> Envelope:
    base = {"gc-protocol": 1, "gc-state": "success", "gc-user": "alice", "gc-endpoint-id": "ep-1"}
    return Envelope(props.get("message_id", "t-1"), props.get("correlation_id", "g-1"),
                    props.get("content_type", "application/json"), {**base, **headers}, body)


@pytest.mark.parametrize(("case", "envelope"), [
    ("timing of infinite size", _result({"gc-finished": 2**1100})),
    ("timing a string", _result({"gc-started": "soon"})),
    ("stdout over its bound", _result({"gc-stdout": "x" * (MAX_OUTPUT_HEADER + 1)})),
    ("error body of deep JSON", _result({"gc-state": "failed"}, b"[" * 100_000)),
    ("error type with a newline", _result({"gc-state": "failed"}, json.dumps(
        {"type": "X\nY", "message": "m"}).encode())),
    ("unknown state", _result({"gc-state": "exploded"})),
    ("dead letter with a 300-byte group and no correlation id",
     _result({"gc-state": None, "x-death": [{"reason": "rejected", "queue": "q"}],
              "gc-task-group": "g" * 300}, correlation_id="")),
    ("dead letter whose x-death is a string", _result({"x-death": "forged"}, message_id="")),
    ("headers not a table", Envelope("t-1", "g-1", "application/json", [1, 2], b"")),  # type: ignore[arg-type]
])
def test_a_forged_result_is_refused_with_a_protocol_error(case: str, envelope: Envelope) -> None:
    if envelope.headers and "x-death" in envelope.headers:
        envelope.headers.pop("gc-state", None)
    with pytest.raises(ProtocolError):
        decode_result(envelope)


@pytest.mark.parametrize(("case", "headers", "body"), [
    ("heartbeat sent at NaN", {"gc-event": "heartbeat"}, b'{"sent": NaN}'),
    ("kind a table", {"gc-event": {"k": 1}}, b"{}"),
    ("manifest naming a task id with a newline", {"gc-event": "group-manifest"}, json.dumps(
        {"task_group_id": "g", "endpoint_id": "e", "user": "u", "task_ids": ["t\n"],
         "submitted": 0}).encode()),
    ("deep JSON heartbeat", {"gc-event": "heartbeat"}, b'{"engine_status":' + b"[" * 100_000),
    ("cancel dead-lettered into gc.commands", {"gc-event": "cancel", "x-death": [{}]},
     b'{"task_ids": ["t"], "user": "alice", "sent": 0}'),
])
def test_a_forged_event_is_refused_with_a_protocol_error(case: str, headers: dict[str, Any],
                                                           body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_event(Envelope("", "", "application/json", {"gc-protocol": 1, **headers}, body))


def test_a_result_with_output_past_the_bound_is_clipped_to_fit_its_frame() -> None:
    # A task that prints more than the wire allows still gets a result the broker takes.
    result = ResultMessage(task_id="t-1", task_group_id="g-1", user="alice", state="success",
                           content_type="application/json", payload=b"1",
                           stdout="é" * MAX_OUTPUT_HEADER, stderr="x" * (2 * MAX_OUTPUT_HEADER))
    envelope = encode_result(result)
    assert len(envelope.headers["gc-stdout"].encode()) <= MAX_OUTPUT_HEADER
    assert len(envelope.headers["gc-stderr"].encode()) <= MAX_OUTPUT_HEADER
    assert decode_result(envelope).stdout.startswith("é")
